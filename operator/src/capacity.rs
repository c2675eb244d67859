//! Caps on how much of a cluster a GonkaNode takes (`spec.capacity`), and which nodes join
//! first. A DaemonSet runs a pod on every node its template matches, with no count; so with a
//! cap the template also selects a label of the GonkaNode's own ([`label_key`]) and the
//! operator puts that label on the nodes that join and takes it off nodes that leave.
//!
//! A node leaves the way a departing node does: its ML node is disabled on the network node
//! first (the controller marks its pod [`Departure::OverCapacity`]), and the label comes off
//! only once that pass reached the network node, and never during a PoC window (a window lost
//! is an epoch's weight). Nodes join before the DaemonSet is applied, so a template that starts
//! selecting the label never finds a running ML node's node without it (the DaemonSet
//! controller would delete that pod at once, with no word to the network node).
//!
//! Pure: the controller passes the nodes from its watch and the nodes its pods run on;
//! [`crate::apply::Writer::label_node`] writes, under a field manager of the GonkaNode's own.

use std::collections::BTreeSet;

use gonka_crds::{Capacity, CapacityStatus, GonkaNode, GonkaNodeSpec, NVIDIA_GPU_RESOURCE};
use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Taint, Toleration};
use kube::ResourceExt;

use crate::node_departure::{self, Departure};

/// The prefix of the label that makes a node one of a capped GonkaNode's (then its UID).
pub const LABEL_PREFIX: &str = "joined.gonka.ai/";
/// The prefix of the field managers that write those labels.
pub const FIELD_MANAGER_PREFIX: &str = "gonka-operator/capacity/";

/// The label `gn`'s joined nodes carry (`"true"`), by UID: unique, and a GonkaNode made again
/// under the same name does not inherit nodes it did not pick. `None` before the apiserver
/// gave it one.
pub fn label_key(gn: &GonkaNode) -> Option<String> {
    gn.uid().map(|uid| format!("{LABEL_PREFIX}{uid}"))
}

/// The field manager of `gn`'s labels.
pub fn field_manager(gn: &GonkaNode) -> String {
    format!("{FIELD_MANAGER_PREFIX}{}", gn.uid().unwrap_or_default())
}

/// Why an ML node can't run on a Kubernetes node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ineligible {
    /// The node is going.
    Departing(Departure),
    /// It lacks a label of `placement.nodeSelector`.
    NodeSelector,
    /// `placement.affinity`'s required node affinity excludes it.
    NodeAffinity,
    /// It carries a taint the pods don't tolerate (the taint's key).
    Taint(String),
    /// Fewer GPUs allocatable than `gpusPerMlNode`.
    Gpus { allocatable: i64 },
}

/// Taints the DaemonSet controller tolerates on every daemon pod by itself (key, effect): an
/// ML node is not kept off a node by them.
const DAEMON_SET_TOLERATIONS: [(&str, &str); 5] = [
    ("node.kubernetes.io/not-ready", "NoExecute"),
    ("node.kubernetes.io/unreachable", "NoExecute"),
    ("node.kubernetes.io/disk-pressure", "NoSchedule"),
    ("node.kubernetes.io/memory-pressure", "NoSchedule"),
    ("node.kubernetes.io/pid-pressure", "NoSchedule"),
];

/// Whether `toleration` tolerates `taint`, as the scheduler decides it.
fn tolerates(toleration: &Toleration, taint: &Taint) -> bool {
    let effect = toleration.effect.as_deref().unwrap_or_default();
    if !effect.is_empty() && effect != taint.effect {
        return false;
    }
    let key = toleration.key.as_deref().unwrap_or_default();
    match toleration.operator.as_deref().unwrap_or("Equal") {
        "Exists" => key.is_empty() || key == taint.key,
        _ => {
            key == taint.key
                && toleration.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default()
        }
    }
}

/// Whether a label set satisfies one node-selector requirement (the scheduler's semantics:
/// `NotIn` and `DoesNotExist` hold for an absent label, `Gt`/`Lt` compare integers).
fn requirement_holds(labels: &std::collections::BTreeMap<String, String>, r: &NodeSelectorRequirement) -> bool {
    let value = labels.get(&r.key);
    let values = r.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator.as_str() {
        "In" => value.is_some_and(|v| values.contains(v)),
        "NotIn" => value.is_none_or(|v| !values.contains(v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" | "Lt" => {
            let (Some(v), Some(bound)) = (value.and_then(|v| number(v)), values.first().and_then(|b| number(b))) else {
                return false;
            };
            if r.operator == "Gt" { v > bound } else { v < bound }
        }
        _ => false,
    }
}

/// Whether `node` matches one node-selector term (its expressions and fields, all of them; an
/// empty term matches nothing, as in the scheduler).
fn term_matches(node: &Node, term: &NodeSelectorTerm) -> bool {
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    let labels = node.labels();
    let name = std::collections::BTreeMap::from([("metadata.name".to_string(), node.name_any())]);
    expressions.iter().all(|r| requirement_holds(labels, r)) && fields.iter().all(|r| requirement_holds(&name, r))
}

/// GPUs `node` offers pods (`status.allocatable`, as the device plugin reports them).
fn allocatable_gpus(node: &Node) -> i64 {
    node.status
        .as_ref()
        .and_then(|s| s.allocatable.as_ref())
        .and_then(|a| a.get(NVIDIA_GPU_RESOURCE))
        .and_then(|q| q.0.parse().ok())
        .unwrap_or(0)
}

/// Whether an ML node of `spec` could run on `node`, and if not, the first reason why.
pub fn eligibility(node: &Node, spec: &GonkaNodeSpec) -> Result<(), Ineligible> {
    if let Some(departure) = node_departure::departure(node) {
        return Err(Ineligible::Departing(departure));
    }
    let labels = node.labels();
    if !spec.placement.node_selector.iter().all(|(k, v)| labels.get(k) == Some(v)) {
        return Err(Ineligible::NodeSelector);
    }
    let required = spec
        .placement
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    if let Some(required) = required
        && !required.node_selector_terms.iter().any(|t| term_matches(node, t))
    {
        return Err(Ineligible::NodeAffinity);
    }
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
    for taint in taints.iter().filter(|t| t.effect == "NoSchedule" || t.effect == "NoExecute") {
        let by_daemon_set = DAEMON_SET_TOLERATIONS.iter().any(|(k, e)| taint.key == *k && taint.effect == *e);
        if !by_daemon_set && !spec.placement.tolerations.iter().any(|t| tolerates(t, taint)) {
            return Err(Ineligible::Taint(taint.key.clone()));
        }
    }
    let allocatable = allocatable_gpus(node);
    if allocatable < i64::from(spec.gpus_per_ml_node) {
        return Err(Ineligible::Gpus { allocatable });
    }
    Ok(())
}

/// The most ML nodes `capacity` allows at `gpus_per_ml_node` GPUs each.
pub fn limit(capacity: &Capacity, gpus_per_ml_node: i32) -> i32 {
    let by_gpus = capacity.max_gpus.map(|g| g / gpus_per_ml_node.max(1));
    match (capacity.max_ml_nodes, by_gpus) {
        (Some(n), Some(g)) => n.min(g),
        (Some(n), None) => n,
        (None, Some(g)) => g,
        (None, None) => i32::MAX,
    }
    .max(0)
}

/// `node`'s score: the weights of the preferences whose labels it all carries.
fn score(node: &Node, capacity: &Capacity) -> i64 {
    let labels = node.labels();
    capacity
        .preferences
        .iter()
        .filter(|p| p.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .map(|p| i64::from(p.weight))
        .sum()
}

/// The nodes that carry `label`, by name.
pub fn labelled<'a>(nodes: impl IntoIterator<Item = &'a Node>, label: &str) -> Vec<String> {
    let mut names: Vec<String> = nodes
        .into_iter()
        .filter(|n| n.labels().get(label).is_some_and(|v| v == "true"))
        .map(|n| n.name_any())
        .collect();
    names.sort();
    names
}

/// What to write and what to say.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Nodes to label now, before the DaemonSet is applied.
    pub join: Vec<String>,
    /// Nodes to unlabel once their ML nodes are disabled on the network node (`disable_first`),
    /// or right after the DaemonSet is applied (it no longer selects the label).
    pub leave: Vec<String>,
    /// Whether the nodes in `leave` run ML nodes the label decides on (a cap is set): they are
    /// disabled on the network node before the label comes off.
    pub disable_first: bool,
    /// Joined nodes that wait to leave (a PoC window is on): their ML nodes keep working.
    pub waiting: Vec<String>,
    /// Nodes that still run one of its pods but no longer carry the label: the DaemonSet is
    /// deleting those pods, and their ML nodes stay disabled meanwhile.
    pub going: Vec<String>,
    /// What status says; `None` without a cap.
    pub status: Option<CapacityStatus>,
}

/// The plan for one GonkaNode. `nodes` are the cluster's nodes (the watch), `label` its
/// [`label_key`], `hosting` the nodes its pods run on now, `selecting` whether its DaemonSet
/// already selects the label (until it does — a cap just set — the nodes its pods run on join
/// first, so none loses its pod unannounced, and those over the cap then leave in order; once it
/// does, a pod on a node without the label is one being deleted), `window` whether a PoC window
/// is on (no node leaves during one).
pub fn plan<'a>(
    spec: &GonkaNodeSpec,
    nodes: impl IntoIterator<Item = &'a Node>,
    hosting: &BTreeSet<String>,
    selecting: bool,
    label: &str,
    window: bool,
) -> Plan {
    let nodes: Vec<&Node> = nodes.into_iter().collect();
    let labelled = |n: &Node| n.labels().get(label).is_some_and(|v| v == "true");
    let Some(capacity) = &spec.capacity else {
        // No cap: the DaemonSet selects no label, and the labels go (after it is applied).
        return Plan { leave: self::labelled(nodes, label), ..Plan::default() };
    };
    let limit = limit(capacity, spec.gpus_per_ml_node);
    // Highest score first, then by name: the order nodes join in (and the reverse, leave in).
    let mut ranked: Vec<(&Node, Result<(), Ineligible>)> = nodes.iter().map(|n| (*n, eligibility(n, spec))).collect();
    ranked.sort_by(|(a, _), (b, _)| {
        score(b, capacity).cmp(&score(a, capacity)).then_with(|| a.name_any().cmp(&b.name_any()))
    });
    let joined = |n: &Node| labelled(n) || (!selecting && hosting.contains(&n.name_any()));

    let mut plan = Plan { disable_first: true, ..Plan::default() };
    if selecting {
        plan.going =
            nodes.iter().filter(|n| !labelled(n) && hosting.contains(&n.name_any())).map(|n| n.name_any()).collect();
        plan.going.sort();
    }
    let mut staying = Vec::new();
    let mut leaving = Vec::new();
    let mut not_eligible_joined = 0;
    for (node, eligible) in &ranked {
        if !joined(node) {
            continue;
        }
        if eligible.is_ok() && (staying.len() as i32) < limit {
            staying.push(node.name_any());
        } else {
            if eligible.is_err() {
                not_eligible_joined += 1;
            }
            leaving.push(node.name_any());
        }
    }
    // Free places go to the best eligible nodes that have not joined.
    let free = (limit as usize).saturating_sub(staying.len());
    let newcomers: Vec<String> = ranked
        .iter()
        .filter(|(n, e)| e.is_ok() && !joined(n) && !plan.going.contains(&n.name_any()))
        .map(|(n, _)| n.name_any())
        // Into places nodes still leaving hold, only once they have left: the cap holds also
        // while the network node can't be told (leaving waits for it) or a window is on.
        .take(free.saturating_sub(leaving.len()))
        .collect();
    let eligible = ranked.iter().filter(|(_, e)| e.is_ok()).count() as i32;
    let joined_eligible = staying.len() + leaving.len() - not_eligible_joined;
    let held_back = eligible - (joined_eligible + newcomers.len()) as i32;

    // Everything joined must carry the label before the DaemonSet selects it.
    plan.join = ranked
        .iter()
        .filter(|(n, _)| !labelled(n) && (joined(n) || newcomers.contains(&n.name_any())))
        .map(|(n, _)| n.name_any())
        .collect();
    plan.join.sort();
    if window {
        plan.waiting = leaving.clone();
    } else {
        plan.leave = leaving.clone();
    }
    plan.leave.sort();
    plan.waiting.sort();

    let mut why = Vec::new();
    if held_back > 0 {
        why.push(format!("{held_back} eligible nodes held back by the cap of {limit} ML nodes"));
    }
    if !leaving.is_empty() {
        let when = if window { "after the PoC window" } else { "once their ML nodes are disabled on the network node" };
        why.push(format!("{} nodes leave {when}", leaving.len()));
    }
    plan.status = Some(CapacityStatus {
        eligible,
        joined: (staying.len() + leaving.len() + newcomers.len()) as i32,
        held_back: held_back.max(0),
        leaving: leaving.len() as i32,
        limit,
        message: (!why.is_empty()).then(|| why.join("; ")),
    });
    plan
}

/// The server-side apply body of `node`'s label: `"true"` to join, nothing to leave (applying
/// without it removes what this manager alone set).
pub fn claim(node: &str, label: &str, join: bool) -> serde_json::Value {
    let mut metadata = serde_json::json!({"name": node});
    if join {
        metadata["labels"] = serde_json::json!({label: "true"});
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": metadata})
}

#[cfg(test)]
mod tests {
    use super::*;
    use gonka_crds::CapacityPreference;
    use serde_json::json;

    const LABEL: &str = "joined.gonka.ai/0b5c";

    fn spec(capacity: serde_json::Value) -> GonkaNodeSpec {
        crate::test_fixtures::gonka_node("h100", |s| s.capacity = serde_json::from_value(capacity).unwrap()).spec
    }

    /// A GPU node as GPU Feature Discovery and the device plugin show it, with extra labels.
    fn node(name: &str, gpus: u32, labels: serde_json::Value) -> Node {
        let mut all = json!({"nvidia.com/gpu.present": "true"});
        for (k, v) in labels.as_object().unwrap() {
            all[k] = v.clone();
        }
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": all},
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"nvidia.com/gpu": gpus.to_string()}},
        }))
        .unwrap()
    }

    fn joined(name: &str) -> Node {
        node(name, 8, json!({LABEL: "true"}))
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_cap_is_the_smaller_of_ml_nodes_and_gpus_rounded_down() {
        let cap = |v| serde_json::from_value::<Capacity>(v).unwrap();
        assert_eq!(limit(&cap(json!({"maxMlNodes": 3})), 8), 3);
        assert_eq!(limit(&cap(json!({"maxGpus": 23})), 8), 2, "23 GPUs hold two ML nodes of 8");
        assert_eq!(limit(&cap(json!({"maxGpus": 24})), 8), 3);
        assert_eq!(limit(&cap(json!({"maxGpus": 7})), 8), 0);
        assert_eq!(limit(&cap(json!({"maxMlNodes": 5, "maxGpus": 16})), 8), 2);
        assert_eq!(limit(&cap(json!({"maxMlNodes": 1, "maxGpus": 64})), 8), 1);
    }

    #[test]
    fn eligibility_follows_what_the_scheduler_and_the_daemon_set_decide() {
        let spec = spec(json!({"maxMlNodes": 1}));
        assert_eq!(eligibility(&node("a", 8, json!({})), &spec), Ok(()));
        assert_eq!(eligibility(&node("a", 16, json!({})), &spec), Ok(()), "more GPUs than needed");
        assert_eq!(eligibility(&node("a", 4, json!({})), &spec), Err(Ineligible::Gpus { allocatable: 4 }));
        let mut no_gpu_label = node("a", 8, json!({}));
        no_gpu_label.metadata.labels.as_mut().unwrap().remove("nvidia.com/gpu.present");
        assert_eq!(eligibility(&no_gpu_label, &spec), Err(Ineligible::NodeSelector));

        // Taints: the GPU taint is tolerated by default; another NoSchedule taint is not; a
        // PreferNoSchedule one never keeps a pod off; the DaemonSet's own tolerations apply.
        let mut tainted = node("a", 8, json!({}));
        let taint = |key: &str, effect: &str| Taint { key: key.into(), effect: effect.into(), ..Taint::default() };
        tainted.spec.as_mut().unwrap().taints.as_mut().unwrap().push(taint("dedicated", "NoSchedule"));
        assert_eq!(eligibility(&tainted, &spec), Err(Ineligible::Taint("dedicated".into())));
        let mut tolerant = spec.clone();
        tolerant.placement.tolerations.push(Toleration {
            key: Some("dedicated".into()),
            operator: Some("Exists".into()),
            ..Toleration::default()
        });
        assert_eq!(eligibility(&tainted, &tolerant), Ok(()), "an effect-less toleration covers every effect");
        let mut soft = node("a", 8, json!({}));
        soft.spec.as_mut().unwrap().taints.as_mut().unwrap().push(taint("dedicated", "PreferNoSchedule"));
        assert_eq!(eligibility(&soft, &spec), Ok(()));
        let mut pressured = node("a", 8, json!({}));
        pressured
            .spec
            .as_mut()
            .unwrap()
            .taints
            .as_mut()
            .unwrap()
            .push(taint("node.kubernetes.io/memory-pressure", "NoSchedule"));
        assert_eq!(eligibility(&pressured, &spec), Ok(()), "a daemon pod tolerates memory pressure");
        let mut equal = tolerant.clone();
        equal.placement.tolerations[1] =
            Toleration { key: Some("dedicated".into()), value: Some("other".into()), ..Toleration::default() };
        tainted.spec.as_mut().unwrap().taints.as_mut().unwrap()[1].value = Some("gonka".into());
        assert_eq!(eligibility(&tainted, &equal), Err(Ineligible::Taint("dedicated".into())), "Equal compares values");

        // Going nodes are not eligible, whatever else holds.
        let mut cordoned = node("a", 8, json!({}));
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        assert_eq!(eligibility(&cordoned, &spec), Err(Ineligible::Departing(Departure::Cordoned)));
    }

    #[test]
    fn required_node_affinity_is_matched_as_the_scheduler_matches_it() {
        let mut spec = spec(json!({"maxMlNodes": 1}));
        spec.placement.affinity = Some(
            serde_json::from_value(json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "nvidia.com/gpu.product", "operator": "In", "values": ["H100", "H200"]},
                    {"key": "nvidia.com/gpu.memory", "operator": "Gt", "values": ["80000"]},
                    {"key": "spot", "operator": "DoesNotExist"}]},
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["chosen"]}]},
            ]}}}))
            .unwrap(),
        );
        let h200 = json!({"nvidia.com/gpu.product": "H200", "nvidia.com/gpu.memory": "143771"});
        assert_eq!(eligibility(&node("a", 8, h200.clone()), &spec), Ok(()));
        let small = json!({"nvidia.com/gpu.product": "H200", "nvidia.com/gpu.memory": "80000"});
        assert_eq!(eligibility(&node("a", 8, small), &spec), Err(Ineligible::NodeAffinity), "Gt is strict");
        let mut spot = h200.clone();
        spot["spot"] = json!("");
        assert_eq!(eligibility(&node("a", 8, spot), &spec), Err(Ineligible::NodeAffinity));
        let a100 = json!({"nvidia.com/gpu.product": "A100", "nvidia.com/gpu.memory": "81920"});
        assert_eq!(eligibility(&node("a", 8, a100.clone()), &spec), Err(Ineligible::NodeAffinity));
        assert_eq!(eligibility(&node("chosen", 8, a100), &spec), Ok(()), "terms are ORed; fields match the name");
    }

    #[test]
    fn nodes_join_by_preference_up_to_the_cap_then_by_name() {
        let mut spec = spec(json!({"maxMlNodes": 2}));
        spec.capacity.as_mut().unwrap().preferences = vec![
            CapacityPreference { weight: 10, match_labels: [("pool".to_string(), "owned".to_string())].into() },
            CapacityPreference { weight: 5, match_labels: [("zone".to_string(), "a".to_string())].into() },
        ];
        let nodes = [
            node("n1", 8, json!({})),
            node("n2", 8, json!({"zone": "a"})),
            node("n3", 8, json!({"pool": "owned"})),
            node("n4", 8, json!({"pool": "owned", "zone": "a"})),
            node("n5", 4, json!({"pool": "owned", "zone": "a"})),
        ];
        let plan = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, false);
        assert_eq!(plan.join, names(&["n3", "n4"]), "the two best eligible nodes (n5 has too few GPUs)");
        assert!(plan.leave.is_empty());
        let status = plan.status.unwrap();
        assert_eq!((status.eligible, status.joined, status.held_back, status.leaving, status.limit), (4, 2, 2, 0, 2));
        assert_eq!(status.message.as_deref(), Some("2 eligible nodes held back by the cap of 2 ML nodes"));

        // Without preferences: by name.
        let mut plain = spec.clone();
        plain.capacity.as_mut().unwrap().preferences.clear();
        assert_eq!(super::plan(&plain, &nodes, &BTreeSet::new(), false, LABEL, false).join, names(&["n1", "n2"]));
    }

    #[test]
    fn joined_nodes_stay_and_a_better_newcomer_waits_for_a_free_place() {
        let mut spec = spec(json!({"maxMlNodes": 2}));
        spec.capacity.as_mut().unwrap().preferences =
            vec![CapacityPreference { weight: 50, match_labels: [("pool".to_string(), "owned".to_string())].into() }];
        let nodes = [joined("n1"), joined("n2"), node("n3", 8, json!({"pool": "owned"}))];
        let plan = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, false);
        assert_eq!(
            plan,
            Plan {
                disable_first: true,
                status: Some(CapacityStatus {
                    eligible: 3,
                    joined: 2,
                    held_back: 1,
                    leaving: 0,
                    limit: 2,
                    message: Some("1 eligible nodes held back by the cap of 2 ML nodes".into()),
                }),
                ..Plan::default()
            }
        );
    }

    #[test]
    fn a_shrunk_cap_takes_out_the_lowest_ranked_but_never_during_a_window() {
        let mut spec = spec(json!({"maxGpus": 8}));
        spec.capacity.as_mut().unwrap().preferences =
            vec![CapacityPreference { weight: 1, match_labels: [("pool".to_string(), "owned".to_string())].into() }];
        let mut n2 = joined("n2");
        n2.metadata.labels.as_mut().unwrap().insert("pool".into(), "owned".into());
        let nodes = [joined("n1"), n2, joined("n3")];
        let out = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, false);
        assert_eq!(out.leave, names(&["n1", "n3"]), "n2 is preferred");
        assert!(out.disable_first && out.join.is_empty() && out.waiting.is_empty());
        let status = out.status.unwrap();
        assert_eq!((status.joined, status.leaving, status.held_back), (3, 2, 0));
        assert_eq!(
            status.message.as_deref(),
            Some("2 nodes leave once their ML nodes are disabled on the network node")
        );

        let held = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, true);
        assert!(held.leave.is_empty(), "no node leaves during a PoC window");
        assert_eq!(held.waiting, names(&["n1", "n3"]));
        assert_eq!(held.status.unwrap().message.as_deref(), Some("2 nodes leave after the PoC window"));
    }

    #[test]
    fn a_joined_node_that_goes_or_stops_matching_leaves_and_its_place_is_taken() {
        let spec = spec(json!({"maxMlNodes": 2}));
        let mut cordoned = joined("n1");
        cordoned.spec.as_mut().unwrap().unschedulable = Some(true);
        let mut relabelled = joined("n2");
        relabelled.metadata.labels.as_mut().unwrap().remove("nvidia.com/gpu.present");
        let nodes = [cordoned, relabelled, node("n3", 8, json!({})), node("n4", 8, json!({}))];
        let out = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, false);
        assert_eq!(out.leave, names(&["n1", "n2"]));
        assert!(out.join.is_empty(), "their places are taken once they have left: the cap holds meanwhile");
        let status = out.status.unwrap();
        assert_eq!((status.eligible, status.joined, status.held_back, status.leaving), (2, 2, 2, 2));

        let held = plan(&spec, &nodes, &BTreeSet::new(), false, LABEL, true);
        assert!(held.join.is_empty() && held.leave.is_empty());
        assert_eq!(held.waiting, names(&["n1", "n2"]));

        // Once they have left (the label is off), the best eligible nodes take their places.
        let mut after = nodes.clone();
        for n in &mut after[..2] {
            n.metadata.labels.as_mut().unwrap().remove(LABEL);
        }
        let out = plan(&spec, &after, &BTreeSet::new(), false, LABEL, false);
        assert_eq!((out.join, out.leave), (names(&["n3", "n4"]), vec![]));
    }

    #[test]
    fn a_cap_set_on_a_running_fleet_labels_every_hosting_node_first() {
        // Three ML nodes run; a cap of one arrives. All three are labelled before the DaemonSet
        // selects the label (else two pods would vanish unannounced), two leave in order.
        let spec = spec(json!({"maxMlNodes": 1}));
        let nodes = [node("n1", 8, json!({})), node("n2", 8, json!({})), node("n3", 8, json!({}))];
        let hosting: BTreeSet<String> = names(&["n1", "n2", "n3"]).into_iter().collect();
        let out = plan(&spec, &nodes, &hosting, false, LABEL, false);
        assert_eq!(out.join, names(&["n1", "n2", "n3"]));
        assert_eq!(out.leave, names(&["n2", "n3"]));
        let held = plan(&spec, &nodes, &hosting, false, LABEL, true);
        assert_eq!(held.join, names(&["n1", "n2", "n3"]), "joining is never held");
        assert!(held.leave.is_empty());
    }

    #[test]
    fn once_the_daemon_set_selects_the_label_a_pod_without_it_is_going() {
        // gpu-b's label came off (it left); its pod, being deleted by the DaemonSet, still runs.
        let spec = spec(json!({"maxMlNodes": 2}));
        let nodes = [joined("n1"), node("n2", 8, json!({})), node("n3", 8, json!({}))];
        let hosting: BTreeSet<String> = names(&["n1", "n2"]).into_iter().collect();
        let out = plan(&spec, &nodes, &hosting, true, LABEL, false);
        assert_eq!(out.going, names(&["n2"]), "its ML node stays disabled until the pod is gone");
        assert_eq!(out.join, names(&["n3"]), "n2 does not join again: the next by name takes the place");
        // Before the DaemonSet selects the label, the same pod makes its node join.
        let first = plan(&spec, &nodes, &hosting, false, LABEL, false);
        assert!(first.going.is_empty());
        assert_eq!(first.join, names(&["n2"]));
    }

    #[test]
    fn without_a_cap_every_label_goes_and_nothing_joins() {
        let spec = spec(json!(null));
        let nodes = [joined("n1"), node("n2", 8, json!({})), joined("n3")];
        let hosting: BTreeSet<String> = names(&["n2"]).into_iter().collect();
        assert_eq!(
            plan(&spec, &nodes, &hosting, false, LABEL, true),
            Plan { leave: names(&["n1", "n3"]), ..Plan::default() }
        );
        assert_eq!(plan(&spec, &[node("n2", 8, json!({}))], &hosting, false, LABEL, false), Plan::default());
    }

    #[test]
    fn a_zero_cap_joins_nothing_and_another_gonka_nodes_label_is_not_ours() {
        let spec = spec(json!({"maxMlNodes": 0}));
        let other = node("n1", 8, json!({"joined.gonka.ai/other-uid": "true"}));
        let out = plan(&spec, &[other], &BTreeSet::new(), false, LABEL, false);
        assert!(out.join.is_empty() && out.leave.is_empty());
        assert_eq!(out.status.unwrap().held_back, 1);
    }

    #[test]
    fn claims_are_server_side_apply_bodies_of_the_label_alone() {
        assert_eq!(
            claim("n1", LABEL, true),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1", "labels": {LABEL: "true"}}})
        );
        assert_eq!(claim("n1", LABEL, false), json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}}));
    }
}
