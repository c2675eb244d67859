//! Rollouts that don't cost a PoC window. With `holdDuringPoc` (and a public URL to read the
//! epoch phase), the DaemonSet updates `OnDelete` and the operator replaces outdated pods
//! itself: never during PoC generation, validation or a confirmation PoC, at most
//! `maxUnavailable` down at a time. This module picks the pods (pure); the controller checks the
//! phase, disables each ML node on the network node and deletes its pod.

/// A pod as the rollout sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RolloutPod {
    pub name: String,
    pub kubernetes_node: String,
    /// The pod's `gonka.ai/template-hash`: the spec it runs.
    pub template_hash: Option<String>,
    pub ready: bool,
}

/// Outdated pods, and those to replace now: outdated pods that are down anyway first, then
/// ready ones while fewer than `tolerated` pods are down.
pub fn replacements<'a>(pods: &'a [RolloutPod], desired_hash: &str, tolerated: i32) -> (usize, Vec<&'a RolloutPod>) {
    let outdated: Vec<&RolloutPod> = pods.iter().filter(|p| p.template_hash.as_deref() != Some(desired_hash)).collect();
    let down = pods.iter().filter(|p| !p.ready).count() as i32;
    let mut pick: Vec<&RolloutPod> = outdated.iter().copied().filter(|p| !p.ready).collect();
    let budget = (tolerated - down).max(0) as usize;
    pick.extend(outdated.iter().copied().filter(|p| p.ready).take(budget));
    (outdated.len(), pick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, hash: &str, ready: bool) -> RolloutPod {
        RolloutPod {
            name: name.into(),
            kubernetes_node: format!("node-{name}"),
            template_hash: Some(hash.into()),
            ready,
        }
    }

    #[test]
    fn replaces_within_the_budget_down_pods_first() {
        let names = |v: Vec<&RolloutPod>| v.iter().map(|p| p.name.clone()).collect::<Vec<_>>();
        let pods = [pod("a", "old", true), pod("b", "old", true), pod("c", "new", true)];
        let (outdated, pick) = replacements(&pods, "new", 1);
        assert_eq!((outdated, names(pick)), (2, vec!["a".to_string()]));
        // One new pod still starting uses the budget up.
        let pods = [pod("a", "old", true), pod("b", "old", true), pod("c", "new", false)];
        assert!(replacements(&pods, "new", 1).1.is_empty());
        // An outdated pod that is down anyway is replaced regardless.
        let pods = [pod("a", "old", false), pod("b", "old", true)];
        assert_eq!(names(replacements(&pods, "new", 1).1), ["a"]);
        // Nothing outdated: nothing to do.
        assert_eq!(replacements(&[pod("a", "new", true)], "new", 3), (0, vec![]));
        // A pod from before hashes existed counts as outdated.
        let legacy = RolloutPod { template_hash: None, ..pod("x", "", true) };
        assert_eq!(replacements(&[legacy], "new", 1).0, 1);
    }
}
