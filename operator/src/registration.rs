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
//! work), and so is the registration of a pod on a Kubernetes node that is going (cordoned for
//! a drain, being removed by an autoscaler, deleted: [`crate::node_departure`]) and of a pod
//! being deleted, whatever deletes it (eviction, preemption, a node going
//! away, a rollout), and of an opportunistic ML node that has yielded its GPUs to other work
//! (one that yielded before it was ever registered is registered once it rejoins); a disabled
//! registration is enabled again once none holds and its pod is ready. The
//! hardware registered is what the pod's daemon reported; before it has, what is registered stays.
//!
//! How a changed registration is written depends on the network node's generation (told from
//! its node list, [`Generation::of`]): a 2026 one updates in place (`PUT`, broker number and
//! state kept). A 2025 one has no update, and its `POST` of a known id registers the node again
//! (new broker number, state reset, a duplicate in its config file); there a change that matters
//! for work (address, ports, models) is made by removing the node and registering it anew
//! (a new broker number, unavoidable; the config file keeps one entry; a held node is disabled
//! again), and a change of hardware alone, which is informational, is not written at all, so the
//! broker number stays.

use std::collections::{BTreeMap, BTreeSet};

use gonka_crds::{DEFAULT_INFERENCE_PORT, DEFAULT_POC_PORT, GonkaNode};
use gonka_protocol::admin::{Generation, Hardware, InferenceNodeConfig, ModelArgs, NodeResponse};
use kube::ResourceExt;

use crate::network_node::{NetworkNode, NetworkNodeError, ml_node_id};
use crate::node_departure::Departure;

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
    /// Its Kubernetes node is going (cordoned, scaled down, deleted), and why.
    pub departing: Option<Departure>,
    /// The pod is being deleted (`deletionTimestamp` set): its ML node is about to stop.
    pub terminating: bool,
    /// Its daemon reported that it has yielded its GPUs to other work (opportunistic mode).
    pub yielded: bool,
}

/// What to change on the network node, in this order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Not listed yet: `POST`.
    pub register: Vec<InferenceNodeConfig>,
    /// Listed and changed, updated in place: `PUT`.
    pub update: Vec<InferenceNodeConfig>,
    /// Listed and changed on a 2025 network node: removed, then registered anew.
    pub reregister: Vec<InferenceNodeConfig>,
    pub delete: Vec<String>,
    pub disable: Vec<String>,
    pub enable: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.register.is_empty()
            && self.update.is_empty()
            && self.reregister.is_empty()
            && self.delete.is_empty()
            && self.enable.is_empty()
            && self.disable.is_empty()
    }

    /// Ids whose registration is written (registered, updated or registered anew).
    pub fn registered_ids(&self) -> Vec<String> {
        self.register.iter().chain(&self.update).chain(&self.reregister).map(|c| c.id.clone()).collect()
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
    let generation = Generation::of(registered);
    let id_of = |p: &MlNodePod| ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &p.kubernetes_node);
    let prefix = id_prefix(gn);
    let ours: BTreeMap<&str, &NodeResponse> = registered
        .iter()
        .filter(|r| r.node.config.id.starts_with(&prefix))
        .map(|r| (r.node.config.id.as_str(), r))
        .collect();
    let existing_pods: BTreeSet<String> = pods.iter().map(id_of).collect();

    let mut plan = Plan::default();
    for pod in pods.iter().filter(|p| p.ready && !p.terminating) {
        let Some(ip) = &pod.pod_ip else { continue };
        let current = ours.get(id_of(pod).as_str());
        if pod.yielded && current.is_none() {
            // Registered enabled, it would be given work it has handed back.
            continue;
        }
        // Not reported yet (e.g. the operator just restarted): keep what is registered.
        let hardware =
            pod.hardware.clone().or_else(|| current.map(|r| r.node.config.hardware.clone())).unwrap_or_default();
        let want = node_config(gn, &pod.kubernetes_node, ip, hardware);
        match current {
            None => plan.register.push(want),
            Some(r) if r.node.config == want => {}
            Some(r) if generation == Some(Generation::Launch2025) => {
                // Hardware alone is informational: not worth a new broker number.
                let same_work = InferenceNodeConfig { hardware: want.hardware.clone(), ..r.node.config.clone() };
                if same_work != want {
                    plan.reregister.push(want);
                }
            }
            Some(_) => plan.update.push(want),
        }
    }
    let replacements_pending = pods_expected > pods.len();
    let ready_pods: BTreeSet<String> = pods.iter().filter(|p| p.ready && !p.terminating).map(id_of).collect();
    // Being deleted, and no other pod serves that ML node (a replacement may already run).
    let serving: BTreeSet<String> = pods.iter().filter(|p| !p.terminating).map(id_of).collect();
    let stopping: BTreeSet<String> =
        pods.iter().filter(|p| p.terminating).map(id_of).filter(|id| !serving.contains(id)).collect();
    let departing: BTreeSet<String> = pods.iter().filter(|p| p.departing.is_some()).map(id_of).collect();
    let yielded: BTreeSet<String> = pods.iter().filter(|p| p.yielded && !p.terminating).map(id_of).collect();
    let reregistered: BTreeSet<String> = plan.reregister.iter().map(|c| c.id.clone()).collect();
    for (id, r) in &ours {
        // Registering anew leaves a node enabled.
        let enabled = r.state.admin_state.enabled || reregistered.contains(*id);
        let held = gn.spec.paused || departing.contains(*id) || stopping.contains(*id) || yielded.contains(*id);
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

/// Carries `plan` out on the network node, in the plan's order. An update a network node has
/// no route for (a 2025 one answers `PUT` with 405, when its list did not tell its generation)
/// is made as a 2025 one needs it: removed, registered anew.
pub async fn execute(network_node: &NetworkNode, plan: &Plan) -> Result<(), NetworkNodeError> {
    for config in &plan.register {
        network_node.register(config).await?;
    }
    for config in &plan.update {
        match network_node.update(config).await {
            Err(e) if e.is_method_not_allowed() => register_anew(network_node, config).await?,
            other => other?,
        }
    }
    for config in &plan.reregister {
        register_anew(network_node, config).await?;
    }
    for id in &plan.delete {
        network_node.delete(id).await?;
    }
    for id in &plan.disable {
        network_node.set_enabled(id, false).await?;
    }
    for id in &plan.enable {
        network_node.set_enabled(id, true).await?;
    }
    Ok(())
}

/// Removes the node first, so the network node's config file keeps one entry for it.
async fn register_anew(network_node: &NetworkNode, config: &InferenceNodeConfig) -> Result<(), NetworkNodeError> {
    network_node.delete(&config.id).await?;
    network_node.register(config).await
}

/// How many ML nodes are held disabled because their Kubernetes node is going, by reason
/// (strongest first).
pub fn departing_counts(pods: &[MlNodePod]) -> Vec<(Departure, i32)> {
    let mut counts: BTreeMap<Departure, i32> = BTreeMap::new();
    for d in pods.iter().filter_map(|p| p.departing) {
        *counts.entry(d).or_default() += 1;
    }
    counts.into_iter().collect()
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
            departing: None,
            terminating: false,
            yielded: false,
        }
    }

    fn registered(config: InferenceNodeConfig, enabled: bool) -> NodeResponse {
        NodeResponse {
            node: Node { config, node_num: 0, version: None },
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
        assert_eq!(p.register.len(), 1, "only the ready pod with an IP");
        let c = &p.register[0];
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
        assert_eq!((p.update[0].host.as_str(), p.register.len()), ("10.0.0.9", 0));
        // Restarting (not ready): keep the registration as it is.
        assert!(plan(&gn, &[pod("gpu-a", Some("10.0.0.5"), false)], 1, &[registered(a.clone(), true)]).is_empty());
        // Replaced (the DaemonSet still wants the pod): the registration waits for it.
        assert!(plan(&gn, &[], 1, &[registered(a.clone(), true)]).is_empty());
        // The pod is gone for good: deregister; other GonkaNodes' and hand-made registrations stay.
        let p = plan(&gn, &[], 0, &[registered(a.clone(), true), other, manual]);
        assert_eq!((p.registered_ids().len(), p.delete), (0, vec!["h100.gpu@gpu-a".to_string()]));
    }

    #[test]
    fn hardware_comes_from_the_daemons_report_and_survives_an_operator_restart() {
        let gn = gonka_node("h100", |_| {});
        let h100s = vec![Hardware { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 8 }];
        let reported = MlNodePod { hardware: Some(h100s.clone()), ..pod("gpu-a", Some("10.0.0.5"), true) };
        let bare = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        // Registered before the daemon reported: the report updates it.
        let p = plan(&gn, std::slice::from_ref(&reported), 1, &[registered(bare, true)]);
        assert_eq!(p.update[0].hardware, h100s);
        // The operator restarted and has no report yet: what is registered stays.
        let full = node_config(&gn, "gpu-a", "10.0.0.5", h100s.clone());
        assert!(plan(&gn, &[pod("gpu-a", Some("10.0.0.5"), true)], 1, &[registered(full.clone(), true)]).is_empty());
        // A GPU fell off the bus: the registration says so.
        let seven = vec![Hardware { count: 7, ..h100s[0].clone() }];
        let degraded = MlNodePod { hardware: Some(seven.clone()), ..reported };
        assert_eq!(plan(&gn, &[degraded], 1, &[registered(full, true)]).update[0].hardware, seven);
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
    fn a_departing_node_is_disabled_and_enabled_again_when_it_stays() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let b = node_config(&gn, "gpu-b", "10.0.0.6", Vec::new());
        for departure in [Departure::Cordoned, Departure::ScaleDown, Departure::Deleting] {
            let going = MlNodePod { departing: Some(departure), ..pod("gpu-a", Some("10.0.0.5"), true) };
            let pods = [going, pod("gpu-b", Some("10.0.0.6"), true)];
            let p = plan(&gn, &pods, 2, &[registered(a.clone(), true), registered(b.clone(), true)]);
            let disabled = (p.registered_ids().len(), p.disable, p.enable);
            assert_eq!(disabled, (0, vec!["h100.gpu@gpu-a".to_string()], vec![]), "{departure:?}");
            assert!(plan(&gn, &pods, 2, &[registered(a.clone(), false), registered(b.clone(), true)]).is_empty());
            assert_eq!(departing_counts(&pods), [(departure, 1)]);
        }
        let uncordoned = [pod("gpu-a", Some("10.0.0.5"), true), pod("gpu-b", Some("10.0.0.6"), true)];
        let p = plan(&gn, &uncordoned, 2, &[registered(a.clone(), false), registered(b.clone(), true)]);
        assert_eq!(p.enable, ["h100.gpu@gpu-a"]);
        // Uncordoned while paused: stays disabled.
        let paused = gonka_node("h100", |s| s.paused = true);
        let p = plan(&paused, &uncordoned, 2, &[registered(a, false), registered(b, false)]);
        assert!(p.is_empty(), "{p:?}");
    }

    /// A node as each generation lists it (2025: the node's `version`; 2026: the state's
    /// `ml_node_version`).
    fn listed(config: InferenceNodeConfig, enabled: bool, generation: Generation) -> NodeResponse {
        let mut r = registered(config, enabled);
        match generation {
            Generation::Launch2025 => r.node.version = Some(String::new()),
            Generation::Mainline2026 => r.state.ml_node_version = Some(String::new()),
        }
        r
    }

    #[test]
    fn a_2025_network_node_gets_no_update_it_would_turn_into_a_new_registration() {
        let gn = gonka_node("h100", |_| {});
        let h100s = vec![Hardware { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 8 }];
        let bare = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let reported = MlNodePod { hardware: Some(h100s.clone()), ..pod("gpu-a", Some("10.0.0.5"), true) };
        // Hardware alone changed: 2026 updates in place, 2025 keeps the broker number instead.
        let p = plan(&gn, std::slice::from_ref(&reported), 1, &[listed(bare.clone(), true, Generation::Mainline2026)]);
        assert_eq!(p.update.len(), 1);
        let p = plan(&gn, std::slice::from_ref(&reported), 1, &[listed(bare.clone(), true, Generation::Launch2025)]);
        assert!(p.is_empty(), "{p:?}");
        // The address changed: 2025 must register it anew (never a POST over the old one).
        let moved = MlNodePod { pod_ip: Some("10.0.0.9".into()), ..reported };
        let p = plan(&gn, std::slice::from_ref(&moved), 1, &[listed(bare.clone(), true, Generation::Launch2025)]);
        assert_eq!((p.reregister.len(), p.update.len(), p.register.len()), (1, 0, 0));
        assert_eq!(p.reregister[0].host, "10.0.0.9");
        // A held node registered anew comes back enabled: it is disabled again.
        let cordoned = MlNodePod { departing: Some(Departure::Cordoned), ..moved };
        let p = plan(&gn, &[cordoned], 1, &[listed(bare, false, Generation::Launch2025)]);
        assert_eq!((p.reregister.len(), p.disable.clone()), (1, vec!["h100.gpu@gpu-a".to_string()]));
    }

    #[test]
    fn a_pod_being_deleted_is_disabled_first_whatever_deletes_it() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let evicted = MlNodePod { terminating: true, ..pod("gpu-a", Some("10.0.0.5"), true) };
        let p = plan(&gn, std::slice::from_ref(&evicted), 1, &[registered(a.clone(), true)]);
        assert_eq!((p.disable.clone(), p.delete.len(), p.registered_ids().len()), (vec![a.id.clone()], 0, 0));
        // Its replacement is up on the same node: that one counts.
        let replacement = pod("gpu-a", Some("10.0.0.5"), true);
        let p = plan(&gn, &[evicted, replacement], 1, &[registered(a.clone(), false)]);
        assert_eq!((p.enable, p.disable.len()), (vec![a.id.clone()], 0));
    }

    #[test]
    fn a_yielded_ml_node_is_disabled_until_it_rejoins_and_not_registered_before() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let lent = pod("gpu-a", Some("10.0.0.5"), true);
        let yielded = MlNodePod { yielded: true, ..lent.clone() };
        // Registered and enabled: disabled, the registration (broker number) kept.
        let p = plan(&gn, std::slice::from_ref(&yielded), 1, &[registered(a.clone(), true)]);
        assert_eq!((p.disable.clone(), p.delete.len(), p.enable.len()), (vec![a.id.clone()], 0, 0));
        // Still yielded, already disabled: nothing to do.
        assert!(plan(&gn, std::slice::from_ref(&yielded), 1, &[registered(a.clone(), false)]).is_empty());
        // Rejoined: enabled again.
        let p = plan(&gn, std::slice::from_ref(&lent), 1, &[registered(a.clone(), false)]);
        assert_eq!((p.enable, p.disable.len()), (vec![a.id.clone()], 0));
        // Yielded before it was ever registered: registered once it rejoins, not before.
        assert!(plan(&gn, std::slice::from_ref(&yielded), 1, &[]).is_empty());
        assert_eq!(plan(&gn, &[lent], 1, &[]).registered_ids(), std::slice::from_ref(&a.id));
    }

    #[test]
    fn counts_only_this_gonka_nodes_registrations() {
        let gn = gonka_node("h100", |_| {});
        let a = node_config(&gn, "gpu-a", "10.0.0.5", Vec::new());
        let other = InferenceNodeConfig { id: "h100x.gpu@gpu-a".into(), ..a.clone() };
        assert_eq!(registered_count(&gn, &[registered(a, true), registered(other, true)]), 1);
    }

    /// Reconciles in a row against each generation of network node: plan from what it lists,
    /// carry the plan out.
    #[tokio::test]
    async fn neither_generation_gets_a_duplicate_or_a_needless_new_broker_number() {
        use gonka_devnet::{Devnet, admin_router};
        use std::sync::{Arc, Mutex};
        for generation in [Generation::Launch2025, Generation::Mainline2026] {
            let devnet = Arc::new(Mutex::new(Devnet::of(generation, ["Qwen/Qwen2.5-7B-Instruct".to_string()])));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            tokio::spawn(axum::serve(listener, admin_router(devnet.clone())).into_future());
            let network = NetworkNode::new(&url, None, None).unwrap();
            let gn = gonka_node("h100", |_| {});
            let id = "h100.gpu@gpu-a";
            let reconcile = async |pod: &MlNodePod| {
                let listed = network.nodes().await.unwrap();
                let p = plan(&gn, std::slice::from_ref(pod), 1, &listed);
                execute(&network, &p).await.unwrap();
                let d = devnet.lock().unwrap();
                assert_eq!((d.nodes().len(), d.config_entries(id)), (1, 1), "{generation:?}: one registration");
                let n = &d.nodes()[0];
                (n.node.node_num, n.node.config.host.clone(), n.state.admin_state.enabled, d.admin_writes)
            };
            let mut ml_node = pod("gpu-a", Some("10.0.0.5"), true);
            assert_eq!(reconcile(&ml_node).await, (1, "10.0.0.5".into(), true, 1));
            // A steady fleet: nothing written.
            assert_eq!(reconcile(&ml_node).await, (1, "10.0.0.5".into(), true, 1));
            // The daemon reports its GPUs: 2026 updates in place, 2025 leaves it be.
            ml_node.hardware = Some(vec![Hardware { type_: "NVIDIA H100 80GB HBM3 | 79GB".into(), count: 8 }]);
            let writes = if generation == Generation::Mainline2026 { 2 } else { 1 };
            assert_eq!(reconcile(&ml_node).await, (1, "10.0.0.5".into(), true, writes));
            assert_eq!(reconcile(&ml_node).await.3, writes, "{generation:?}: steady again");
            // Cordoned, then replaced on a new address: still one registration, held.
            ml_node.departing = Some(Departure::Cordoned);
            reconcile(&ml_node).await;
            ml_node.pod_ip = Some("10.0.0.9".into());
            let (num, host, enabled, _) = reconcile(&ml_node).await;
            assert_eq!((host.as_str(), enabled), ("10.0.0.9", false), "{generation:?}");
            // Only a 2025 network node can't move a node without a new broker number.
            assert_eq!(num, if generation == Generation::Launch2025 { 2 } else { 1 }, "{generation:?}");
        }
    }
}
