//! Keeping autoscalers off the Kubernetes nodes that prove during a PoC window: an ML node whose
//! node is scaled down mid-window loses the epoch's weight, and neither the PodDisruptionBudget
//! (cluster-autoscaler evicts DaemonSet pods last, if at all) nor anything on the pod stops a
//! node from going. So while a window is on, each node hosting one of a GonkaNode's pods carries
//! cluster-autoscaler's `scale-down-disabled` and Karpenter's `do-not-disrupt` annotations, and
//! after it they go again.
//!
//! The annotations are written by server-side apply under a field manager of the GonkaNode's own
//! ([`field_manager`]): two GonkaNodes on one node each own their claim, so one lifting its own
//! leaves the other's in place, and an annotation someone else set is never removed. Pure: the
//! controller passes the nodes from its watch; [`crate::apply::Writer::protect_node`] writes.

use std::collections::BTreeSet;

use gonka_crds::GonkaNode;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;

/// cluster-autoscaler leaves a node with this annotation `"true"` out of scale-down.
pub const CLUSTER_AUTOSCALER_SCALE_DOWN_DISABLED: &str = "cluster-autoscaler.kubernetes.io/scale-down-disabled";
/// Karpenter does not voluntarily disrupt (consolidate, drift, expire) a node with this
/// annotation `"true"`.
pub const KARPENTER_DO_NOT_DISRUPT: &str = "karpenter.sh/do-not-disrupt";
/// The annotations a protected node carries, each `"true"`.
pub const ANNOTATIONS: [&str; 2] = [CLUSTER_AUTOSCALER_SCALE_DOWN_DISABLED, KARPENTER_DO_NOT_DISRUPT];

/// The prefix of the protections' field managers.
pub const FIELD_MANAGER_PREFIX: &str = "gonka-operator/poc-window/";

/// The field manager of `gn`'s claims: by UID, stable across renames and unique (a GonkaNode
/// made again under the same name does not inherit a claim it did not make).
pub fn field_manager(gn: &GonkaNode) -> String {
    format!("{FIELD_MANAGER_PREFIX}{}", gn.uid().unwrap_or_default())
}

/// What to write: nodes to protect, nodes whose protection (this GonkaNode's claim) to lift.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub protect: Vec<String>,
    pub lift: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.protect.is_empty() && self.lift.is_empty()
    }
}

/// Whether `manager` holds a claim on `node` (an entry in its managed fields).
fn claimed_by(node: &Node, manager: &str) -> bool {
    node.metadata.managed_fields.iter().flatten().any(|m| m.manager.as_deref() == Some(manager))
}

/// Whether `node` carries both annotations as `"true"`.
fn protected(node: &Node) -> bool {
    let annotations = node.metadata.annotations.as_ref();
    ANNOTATIONS.iter().all(|a| annotations.and_then(|m| m.get(*a)).is_some_and(|v| v == "true"))
}

/// The plan for one GonkaNode: during a window (`window`), every node in `hosting` (the nodes
/// its pods run on) that is not protected under its claim is protected; every node it claims
/// that no longer hosts one of its pods, or any node it claims once the window is over (or it
/// is being deleted: `window` false, `hosting` empty), is lifted. Nodes are taken from `nodes`
/// (the watch): a node not there is not written.
pub fn plan<'a>(
    window: bool,
    hosting: &BTreeSet<String>,
    nodes: impl IntoIterator<Item = &'a Node>,
    manager: &str,
) -> Plan {
    let mut plan = Plan::default();
    for node in nodes {
        let name = node.name_any();
        let claimed = claimed_by(node, manager);
        let wanted = window && hosting.contains(&name);
        if wanted && !(claimed && protected(node)) {
            plan.protect.push(name);
        } else if !wanted && claimed {
            plan.lift.push(name);
        }
    }
    plan.protect.sort();
    plan.lift.sort();
    plan
}

/// The server-side apply body of `node`'s claim: both annotations when protecting, none when
/// lifting (applying without them removes what this manager alone set).
pub fn claim(node: &str, protect: bool) -> serde_json::Value {
    let mut metadata = serde_json::json!({"name": node});
    if protect {
        metadata["annotations"] = ANNOTATIONS.iter().map(|a| (a.to_string(), serde_json::json!("true"))).collect();
    }
    serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": metadata})
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, managers: &[&str], annotations: serde_json::Value) -> Node {
        let managed: Vec<_> = managers.iter().map(|m| json!({"manager": m, "operation": "Apply"})).collect();
        serde_json::from_value(
            json!({"metadata": {"name": name, "managedFields": managed, "annotations": annotations}}),
        )
        .unwrap()
    }

    const OURS: &str = "gonka-operator/poc-window/uid-1";
    const THEIRS: &str = "gonka-operator/poc-window/uid-2";

    #[test]
    fn a_window_protects_the_hosting_nodes_and_its_end_lifts_only_our_claims() {
        let both = json!({CLUSTER_AUTOSCALER_SCALE_DOWN_DISABLED: "true", KARPENTER_DO_NOT_DISRUPT: "true"});
        let nodes = [
            node("gpu-a", &[], json!({})),
            node("gpu-b", &[OURS], both.clone()),
            node("gpu-c", &[THEIRS], both.clone()),
            node("cpu-1", &[], json!({})),
        ];
        let hosting: BTreeSet<String> = ["gpu-a", "gpu-b", "gpu-gone"].map(String::from).into();
        // During a window: gpu-a gets protected, gpu-b already is (ours), the rest is not ours.
        let p = plan(true, &hosting, &nodes, OURS);
        assert_eq!(p, Plan { protect: vec!["gpu-a".into()], lift: vec![] });
        // Another GonkaNode's claim on gpu-c does not count as ours: protected again under ours.
        let p = plan(true, &["gpu-c".to_string()].into(), &nodes, OURS);
        assert_eq!(p, Plan { protect: vec!["gpu-c".into()], lift: vec!["gpu-b".into()] });
        // After the window (or on deletion): our claim on gpu-b lifted, gpu-c's owner's kept.
        let p = plan(false, &hosting, &nodes, OURS);
        assert_eq!(p, Plan { protect: vec![], lift: vec!["gpu-b".into()] });
        assert!(plan(false, &BTreeSet::new(), &nodes[..1], OURS).is_empty());
    }

    #[test]
    fn a_claim_whose_annotation_someone_changed_is_made_again() {
        let changed = node(
            "gpu-a",
            &[OURS],
            json!({CLUSTER_AUTOSCALER_SCALE_DOWN_DISABLED: "false", KARPENTER_DO_NOT_DISRUPT: "true"}),
        );
        let p = plan(true, &["gpu-a".to_string()].into(), [&changed], OURS);
        assert_eq!(p.protect, ["gpu-a"]);
    }

    #[test]
    fn claims_carry_both_annotations_or_none() {
        assert_eq!(
            claim("gpu-a", true),
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-a", "annotations": {
                "cluster-autoscaler.kubernetes.io/scale-down-disabled": "true", "karpenter.sh/do-not-disrupt": "true"}}})
        );
        assert_eq!(claim("gpu-a", false), json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "gpu-a"}}));
    }
}
