//! Registration: which ML nodes a GonkaNode should have on the network node, and what to change
//! there to get them. Pure: the controller lists pods and registrations, this module plans,
//! [`crate::network_node`] carries the plan out.
//!
//! Rules: a ready pod with an IP is registered (host = pod IP, upstream's ML-node ports, the
//! GonkaNode's models); a registration whose pod still exists stays even while the pod is not
//! ready (a restart must not cost the node its broker number and weight); a registration whose
//! pod is gone is removed — unless the DaemonSet still wants more pods than exist (a pod being
//! replaced comes back on the same Kubernetes node, under the same registration); while
//! `spec.paused` every registration is disabled (it serves out the epoch, then gets no new
//! work), and so is the registration of a pod on a cordoned Kubernetes node (a drain is
//! coming); a disabled registration is enabled again once neither holds and its pod is ready. The
//! hardware registered is what the pod's daemon reported; before it has, what is registered stays.

use std::collections::{BTreeMap, BTreeSet};

use gonka_crds::{DEFAULT_INFERENCE_PORT, DEFAULT_POC_PORT, GonkaNode};
use gonka_protocol::admin::{Hardware, InferenceNodeConfig, ModelArgs, NodeResponse};
use kube::ResourceExt;

use crate::network_node::ml_node_id;

/// Upstream's default cap of concurrent inference requests per ML node.
pub const MAX_CONCURRENT: u32 = 500;

/// A GonkaNode's pod as registration sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MlNodePod {
    pub kubernetes_node: String,
    pub pod_ip: Option<String>,
    pub ready: bool,
    /// GPUs its daemon reported, in upstream's hardware form; `None` = no report yet.
    pub hardware: Option<Vec<Hardware>>,
    /// Its Kubernetes node is cordoned (`kubectl cordon`, the start of `kubectl drain`).
    pub cordoned: bool,
}

/// What to change on the network node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub upsert: Vec<InferenceNodeConfig>,
    pub delete: Vec<String>,
    pub enable: Vec<String>,
    pub disable: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.delete.is_empty() && self.enable.is_empty() && self.disable.is_empty()
    }
}

/// The id prefix of a GonkaNode's ML nodes: `<name>.<namespace>@`.
pub fn id_prefix(gn: &GonkaNode) -> String {
    ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), "")
}

/// The registration of one pod, with the hardware its daemon reported (upstream's explicit
/// `hardware`, which wins over the network node's own probe of `/gpu/devices`).
pub fn node_config(
    gn: &GonkaNode,
    kubernetes_node: &str,
    pod_ip: &str,
    hardware: Vec<Hardware>,
) -> InferenceNodeConfig {
    InferenceNodeConfig {
        host: pod_ip.to_string(),
        inference_segment: String::new(),
        inference_port: DEFAULT_INFERENCE_PORT as u16,
        poc_segment: String::new(),
        poc_port: DEFAULT_POC_PORT as u16,
        models: gn.spec.models.iter().map(|m| (m.id.clone(), ModelArgs { args: m.args.clone() })).collect(),
        id: ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), kubernetes_node),
        max_concurrent: MAX_CONCURRENT,
        hardware,
    }
}

/// The plan that brings `registered` (everything the network node lists) to what `pods` call
/// for. `pods_expected` is how many pods the DaemonSet wants; while fewer exist, a missing pod
/// is on its way back and its registration stays. Registrations of other GonkaNodes, or made by
/// hand, are never touched.
pub fn plan(gn: &GonkaNode, pods: &[MlNodePod], pods_expected: usize, registered: &[NodeResponse]) -> Plan {
    let prefix = id_prefix(gn);
    let ours: BTreeMap<&str, &NodeResponse> = registered
        .iter()
        .filter(|r| r.node.config.id.starts_with(&prefix))
        .map(|r| (r.node.config.id.as_str(), r))
        .collect();
    let existing_pods: BTreeSet<String> = pods
        .iter()
        .map(|p| ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &p.kubernetes_node))
        .collect();

    let mut plan = Plan::default();
    for pod in pods.iter().filter(|p| p.ready) {
        let Some(ip) = &pod.pod_ip else { continue };
        let id = ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &pod.kubernetes_node);
        let current = ours.get(id.as_str());
        // Not reported yet (e.g. the operator just restarted): keep what is registered.
        let hardware =
            pod.hardware.clone().or_else(|| current.map(|r| r.node.config.hardware.clone())).unwrap_or_default();
        let want = node_config(gn, &pod.kubernetes_node, ip, hardware);
        if current.is_none_or(|r| r.node.config != want) {
            plan.upsert.push(want);
        }
    }
    let replacements_pending = pods_expected > pods.len();
    let ready_pods: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.ready)
        .map(|p| ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &p.kubernetes_node))
        .collect();
    let cordoned: BTreeSet<String> = pods
        .iter()
        .filter(|p| p.cordoned)
        .map(|p| ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &p.kubernetes_node))
        .collect();
    for (id, r) in &ours {
        let enabled = r.state.admin_state.enabled;
        let held = gn.spec.paused || cordoned.contains(*id);
        if !existing_pods.contains(*id) && !replacements_pending {
            plan.delete.push(id.to_string());
        } else if held && enabled {
            plan.disable.push(id.to_string());
        } else if !held && !enabled && ready_pods.contains(*id) {
            // Enabled again only once its pod serves: a node disabled for replacement stays
            // disabled until the new pod is ready.
            plan.enable.push(id.to_string());
        }
    }
    plan
}

/// How many ML nodes are held disabled because their Kubernetes node is cordoned.
pub fn cordoned_count(pods: &[MlNodePod]) -> usize {
    pods.iter().filter(|p| p.cordoned).count()
}

/// How many of the GonkaNode's ML nodes the network node lists.
pub fn registered_count(gn: &GonkaNode, registered: &[NodeResponse]) -> usize {
    let prefix = id_prefix(gn);
    registered.iter().filter(|r| r.node.config.id.starts_with(&prefix)).count()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_fixtures::gonka_node;
    use gonka_protocol::admin::{AdminState, Node, NodeState};

    fn pod(node: &str, ip: Option<&str>, ready: bool) -> MlNodePod {
        MlNodePod {
            kubernetes_node: node.into(),
            pod_ip: ip.map(str::to_string),
            ready,
            hardware: None,
            cordoned: false,
        }
    }

    fn registered(config: InferenceNodeConfig, enabled: bool) -> NodeResponse {
        NodeResponse {
            node: Node { config, node_num: 0 },
            state: NodeState { admin_state: AdminState { enabled, epoch: 1 }, ..NodeState::default() },
        }
    }

    #[test]
    fn ready_pods_are_registered_with_upstreams_ports_and_the_models() {
        let gn = gonka_node("h100", |_| {});
        let p = plan(
            &gn,
            &[pod("gpu-a", Some("10.0.0.5"), true), pod("gpu-b", None, true), pod("gpu-c", Some("10.0.0.7"), false)],
            3,
            &[],
        );
        assert_eq!(p.upsert.len(), 1, "only the ready pod with an IP");
        let c = &p.upsert[0];
        assert_eq!(
            (c.id.as_str(), c.host.as_str(), c.poc_port, c.inference_port),
            ("h100.gpu@gpu-a", "10.0.0.5", 8080, 5000)
        );
        assert_eq!(c.models["Qwen/Qwen2.5-7B-Instruct"].args, ["--quantization", "fp8"]);
    }

    /// Table: pods and registrations in, the plan out.
    #[test]
    fn plans_converge_and_touch_only_what_differs() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let other = registered(InferenceNodeConfig { id: "l40s.gpu@gpu-a".into(), ..a.clone() }, true);
        let manual = registered(InferenceNodeConfig { id: "my-own-node".into(), ..a.clone() }, true);

        // In sync: nothing to do (re-reconcile writes nothing).
        let p = plan(
            &gn,
            &[pod("gpu-a", Some("10.0.0.5"), true)],
            1,
            &[registered(a.clone(), true), other.clone(), manual.clone()],
        );
        assert!(p.is_empty(), "{p:?}");
        // The pod moved to a new IP: update in place.
        let p = plan(&gn, &[pod("gpu-a", Some("10.0.0.9"), true)], 1, &[registered(a.clone(), true)]);
        assert_eq!(p.upsert[0].host, "10.0.0.9");
        // Restarting (not ready): keep the registration as it is.
        assert!(plan(&gn, &[pod("gpu-a", Some("10.0.0.5"), false)], 1, &[registered(a.clone(), true)]).is_empty());
        // Replaced (the DaemonSet still wants the pod): the registration waits for it.
        assert!(plan(&gn, &[], 1, &[registered(a.clone(), true)]).is_empty());
        // The pod is gone for good: deregister; other GonkaNodes' and hand-made registrations stay.
        let p = plan(&gn, &[], 0, &[registered(a.clone(), true), other, manual]);
        assert_eq!((p.delete, p.upsert.len()), (vec!["h100.gpu@gpu-a".to_string()], 0));
    }

    #[test]
    fn hardware_comes_from_the_daemons_report_and_survives_an_operator_restart() {
        let gn = gonka_node("h100", |_| {});
        let h100s = vec![Hardware { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 8 }];
        let reported = MlNodePod { hardware: Some(h100s.clone()), ..pod("gpu-a", Some("10.0.0.5"), true) };
        let bare = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        // Registered before the daemon reported: the report updates it.
        let p = plan(&gn, std::slice::from_ref(&reported), 1, &[registered(bare, true)]);
        assert_eq!(p.upsert[0].hardware, h100s);
        // The operator restarted and has no report yet: what is registered stays.
        let full = node_config(&gn, "gpu-a", "10.0.0.5", h100s.clone());
        assert!(plan(&gn, &[pod("gpu-a", Some("10.0.0.5"), true)], 1, &[registered(full.clone(), true)]).is_empty());
        // A GPU fell off the bus: the registration says so.
        let seven = vec![Hardware { count: 7, ..h100s[0].clone() }];
        let degraded = MlNodePod { hardware: Some(seven.clone()), ..reported };
        assert_eq!(plan(&gn, &[degraded], 1, &[registered(full, true)]).upsert[0].hardware, seven);
    }

    #[test]
    fn pause_disables_and_resume_enables() {
        let a = node_config(&gonka_node("h100", |_| {}), "gpu-a", "10.0.0.5", Vec::new());
        let pods = [pod("gpu-a", Some("10.0.0.5"), true)];
        let paused = gonka_node("h100", |s| s.paused = true);
        assert_eq!(plan(&paused, &pods, 1, &[registered(a.clone(), true)]).disable, ["h100.gpu@gpu-a"]);
        assert!(plan(&paused, &pods, 1, &[registered(a.clone(), false)]).is_empty());
        let resumed = gonka_node("h100", |_| {});
        assert_eq!(plan(&resumed, &pods, 1, &[registered(a.clone(), false)]).enable, ["h100.gpu@gpu-a"]);
        // Paused while its pod is being replaced: disabled all the same.
        assert_eq!(plan(&paused, &[], 1, &[registered(a.clone(), true)]).disable, ["h100.gpu@gpu-a"]);
        // Resumed while its pod is being replaced (or starting): enabled once the pod is ready.
        assert!(plan(&resumed, &[], 1, &[registered(a.clone(), false)]).is_empty());
        let starting = [pod("gpu-a", Some("10.0.0.5"), false)];
        assert!(plan(&resumed, &starting, 1, &[registered(a, false)]).is_empty());
    }

    #[test]
    fn a_cordoned_node_is_disabled_and_enabled_again_when_uncordoned() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let b = node_config(&gn, "gpu-b", "10.0.0.6", Vec::new());
        let cordoned = MlNodePod { cordoned: true, ..pod("gpu-a", Some("10.0.0.5"), true) };
        let pods = [cordoned.clone(), pod("gpu-b", Some("10.0.0.6"), true)];
        let p = plan(&gn, &pods, 2, &[registered(a.clone(), true), registered(b.clone(), true)]);
        assert_eq!((p.disable, p.enable, p.upsert.len()), (vec!["h100.gpu@gpu-a".to_string()], vec![], 0));
        assert!(plan(&gn, &pods, 2, &[registered(a.clone(), false), registered(b.clone(), true)]).is_empty());
        let uncordoned = [pod("gpu-a", Some("10.0.0.5"), true), pod("gpu-b", Some("10.0.0.6"), true)];
        let p = plan(&gn, &uncordoned, 2, &[registered(a.clone(), false), registered(b.clone(), true)]);
        assert_eq!(p.enable, ["h100.gpu@gpu-a"]);
        // Uncordoned while paused: stays disabled.
        let paused = gonka_node("h100", |s| s.paused = true);
        let p = plan(&paused, &uncordoned, 2, &[registered(a, false), registered(b, false)]);
        assert!(p.is_empty(), "{p:?}");
    }

    #[test]
    fn counts_only_this_gonka_nodes_registrations() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let other = InferenceNodeConfig { id: "h100x.gpu@gpu-a".into(), ..a.clone() };
        assert_eq!(registered_count(&gn, &[registered(a, true), registered(other, true)]), 1);
    }
}
