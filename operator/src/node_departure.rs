//! Kubernetes nodes about to go, and why: cordoned (`kubectl cordon`, the start of a drain),
//! being removed by an autoscaler (cluster-autoscaler's `ToBeDeletedByClusterAutoscaler` taint,
//! Karpenter's `karpenter.sh/disrupted` taint), or being deleted. An ML node on such a node is
//! disabled on the network node before its pod goes, so it serves out what it has and is given
//! no new work. Pure: the controller reads the nodes from its watch.

use k8s_openapi::api::core::v1::Node;

/// cluster-autoscaler's taint on a node it is scaling down (NoSchedule, value: the Unix time).
pub const CLUSTER_AUTOSCALER_SCALE_DOWN_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
/// Karpenter's (v1) taint on a node it is disrupting (consolidation, drift, expiry).
pub const KARPENTER_DISRUPTED_TAINT: &str = "karpenter.sh/disrupted";
/// Karpenter's taint before v1 (`karpenter.sh/disruption=disrupting`).
pub const KARPENTER_DISRUPTION_TAINT_V0: &str = "karpenter.sh/disruption";

/// Why a Kubernetes node is going, the strongest reason first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Departure {
    /// Deleted (`deletionTimestamp` set).
    Deleting,
    /// An autoscaler is removing it.
    ScaleDown,
    /// Cordoned (`spec.unschedulable`).
    Cordoned,
    /// `spec.capacity` takes it out of the fleet (over the cap, or no longer eligible): not the
    /// node going, but its ML node's pod, as soon as the operator takes the node's label off.
    OverCapacity,
}

impl Departure {
    /// How status names the nodes.
    pub fn nodes(self) -> &'static str {
        match self {
            Self::Deleting => "nodes being deleted",
            Self::ScaleDown => "nodes an autoscaler is removing",
            Self::Cordoned => "cordoned nodes",
            Self::OverCapacity => "nodes spec.capacity takes out",
        }
    }
}

/// Whether `node` is going, and why. cluster-autoscaler's soft `DeletionCandidateOfClusterAutoscaler`
/// (PreferNoSchedule: a node it may remove later) is not a departure: such a node often stays.
pub fn departure(node: &Node) -> Option<Departure> {
    if node.metadata.deletion_timestamp.is_some() {
        return Some(Departure::Deleting);
    }
    let spec = node.spec.as_ref();
    let taints = spec.and_then(|s| s.taints.as_deref()).unwrap_or_default();
    let scaling_down = taints.iter().any(|t| {
        t.key == CLUSTER_AUTOSCALER_SCALE_DOWN_TAINT
            || t.key == KARPENTER_DISRUPTED_TAINT
            || (t.key == KARPENTER_DISRUPTION_TAINT_V0 && t.value.as_deref() == Some("disrupting"))
    });
    if scaling_down {
        return Some(Departure::ScaleDown);
    }
    spec.and_then(|s| s.unschedulable).unwrap_or(false).then_some(Departure::Cordoned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(spec: serde_json::Value, deleting: bool) -> Node {
        let mut metadata = json!({"name": "gpu-a"});
        if deleting {
            metadata["deletionTimestamp"] = json!("2026-12-03T10:00:00Z");
        }
        serde_json::from_value(json!({"metadata": metadata, "spec": spec})).unwrap()
    }

    fn taint(key: &str, value: Option<&str>, effect: &str) -> serde_json::Value {
        json!({"key": key, "value": value, "effect": effect})
    }

    #[test]
    fn autoscalers_taints_cordons_and_deletion_are_departures() {
        assert_eq!(departure(&node(json!({}), false)), None);
        assert_eq!(departure(&node(json!({"unschedulable": false}), false)), None);
        assert_eq!(departure(&node(json!({"unschedulable": true}), false)), Some(Departure::Cordoned));
        let ca = taint(CLUSTER_AUTOSCALER_SCALE_DOWN_TAINT, Some("1796300000"), "NoSchedule");
        assert_eq!(departure(&node(json!({"taints": [ca]}), false)), Some(Departure::ScaleDown));
        // cluster-autoscaler cordons too when told to: the stronger reason is named.
        assert_eq!(departure(&node(json!({"taints": [ca], "unschedulable": true}), false)), Some(Departure::ScaleDown));
        let karpenter = taint(KARPENTER_DISRUPTED_TAINT, None, "NoSchedule");
        assert_eq!(departure(&node(json!({"taints": [karpenter]}), false)), Some(Departure::ScaleDown));
        let karpenter_v0 = taint(KARPENTER_DISRUPTION_TAINT_V0, Some("disrupting"), "NoSchedule");
        assert_eq!(departure(&node(json!({"taints": [karpenter_v0]}), false)), Some(Departure::ScaleDown));
        assert_eq!(departure(&node(json!({"unschedulable": true}), true)), Some(Departure::Deleting));
    }

    #[test]
    fn other_taints_and_soft_candidates_are_not() {
        let soft = taint("DeletionCandidateOfClusterAutoscaler", Some("1796300000"), "PreferNoSchedule");
        let gpu = taint("nvidia.com/gpu", Some("present"), "NoSchedule");
        let karpenter_other = taint(KARPENTER_DISRUPTION_TAINT_V0, Some("other"), "NoSchedule");
        assert_eq!(departure(&node(json!({"taints": [soft, gpu, karpenter_other]}), false)), None);
    }
}
