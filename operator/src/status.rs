//! Status: what the fleet looks like, derived from what was observed. Pure: the caller passes
//! the clock, so the same observation always gives the same status, and a condition keeps its
//! `lastTransitionTime` until its status really changes (no flapping timestamps, no status
//! writes that only move a clock, no reconcile storms).

use gonka_crds::{GonkaNodeStatus, condition};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::node_departure::Departure;

/// What one reconcile observed, the input of [`compute`].
#[derive(Debug, Default)]
pub struct Observation<'a> {
    /// `metadata.generation` of the GonkaNode.
    pub generation: Option<i64>,
    /// Why the spec is invalid, if it is.
    pub invalid_spec: Option<String>,
    /// Why applying the owned objects failed, if it did.
    pub apply_error: Option<String>,
    /// The owned DaemonSet as last read, if it exists.
    pub daemon_set: Option<&'a DaemonSet>,
    /// `spec.paused`.
    pub paused: bool,
    /// `spec.updateStrategy.maxUnavailable`.
    pub max_unavailable: Option<&'a IntOrString>,
    /// `holdDuringPoc` is asked for but cannot be checked (no `networkNode.publicUrl`).
    pub hold_unchecked: bool,
    /// No `networkNode.mlNodeApiFrom`: the ML nodes' NetworkPolicy admits no caller to their
    /// API, so a registered ML node is out of the network node's reach (where the policy is
    /// enforced) and `Registered` says so.
    pub ml_node_api_closed: bool,
    /// Why the operator holds the rollout now (a PoC window), if it does.
    pub rollout_held: Option<String>,
    /// The epoch phase has been unreadable past the hold limit: why evictions are tolerated
    /// without knowing the PoC window.
    pub poc_window_unknown: Option<String>,
    /// How registration with the network node went this time; `None` = not attempted (the
    /// previous `Registered` condition and count stand).
    pub registration: Option<Registration>,
    /// What the node-daemons report; `None` = not read this time (the previous fleet stands).
    pub fleet: Option<crate::report_store::Fleet>,
    /// ML-node pods the scheduler could not place: `"<Kubernetes node>: <reason>"`.
    pub unschedulable: Vec<String>,
    /// What `spec.capacity` lets join (`Some(None)`: no cap); `None` = not looked at this time
    /// (an invalid spec: the previous stands).
    pub capacity: Option<Option<gonka_crds::CapacityStatus>>,
    /// The ML-node pods' label selector (the scale subresource's); `None` keeps the previous.
    pub selector: Option<String>,
}

/// What `Registered` adds while the ML nodes' NetworkPolicy admits no caller.
pub const CLOSED_API_NOTE: &str = "; their API admits no caller (default-deny NetworkPolicy): name the network node \
     in spec.networkNode.mlNodeApiFrom, or [] for any caller";

/// At most this many unschedulable ML nodes are named in a condition message.
const NAMED_UNSCHEDULABLE: usize = 3;

/// The outcome of one registration pass.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// The network node lists `registered` of this GonkaNode's ML nodes; `ready` pods want to be.
    Synced { registered: i32, ready: i32, paused: bool, departing: Vec<(Departure, i32)> },
    /// The network node did not answer; retried with backoff.
    Unreachable(String),
    /// The network node refused (e.g. a model governance did not approve).
    Refused(String),
    /// The operator will not use the credentials the spec names (no opt-in label, plain http);
    /// nothing was sent.
    CredentialsRefused(String),
}

/// Counts from the DaemonSet's status; `None` until the DaemonSet controller has looked at it.
struct Rollout {
    desired: i32,
    updated: i32,
    ready: i32,
    available: i32,
    unavailable: i32,
    /// The DaemonSet controller has seen the DaemonSet's current spec.
    caught_up: bool,
}

fn rollout(ds: &DaemonSet) -> Option<Rollout> {
    let status = ds.status.as_ref()?;
    let observed = status.observed_generation?;
    Some(Rollout {
        desired: status.desired_number_scheduled,
        updated: status.updated_number_scheduled.unwrap_or(0),
        ready: status.number_ready,
        available: status.number_available.unwrap_or(0),
        unavailable: status.number_unavailable.unwrap_or(0),
        caught_up: ds.metadata.generation.is_none_or(|g| observed >= g),
    })
}

/// ML nodes that may be down at once: `maxUnavailable` as a count, or as a percentage of
/// `desired` rounded up with a floor of one (as Kubernetes resolves it).
pub fn tolerated_unavailable(max_unavailable: Option<&IntOrString>, desired: i32) -> i32 {
    match max_unavailable {
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(p)) => {
            let percent: i32 = p.trim_end_matches('%').parse().unwrap_or(0);
            ((desired * percent + 99) / 100).max(1)
        }
        None => 1,
    }
}

/// How long ML nodes may be unavailable (starting, loading a model) before the fleet counts as
/// degraded. Checked at every reconcile, so it shows within one resync period after.
pub const UNAVAILABLE_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// Seconds since `Ready` last turned False, if it is False.
fn not_ready_since(previous: &[Condition], now: &Time) -> Option<i64> {
    let ready = previous.iter().find(|c| c.type_ == condition::READY && c.status == "False")?;
    Some(now.0.as_second() - ready.last_transition_time.0.as_second())
}

/// The new status. `previous` supplies transition times to keep and the fields other layers
/// own (registration, GPU inventory, weight), carried over unchanged when this observation did
/// not look at them.
pub fn compute(previous: Option<&GonkaNodeStatus>, obs: &Observation<'_>, now: &Time) -> GonkaNodeStatus {
    let previous_conditions = previous.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let rollout = obs.daemon_set.and_then(rollout);
    let cond = |type_: &str, status: bool, reason: &str, message: String| Condition {
        type_: type_.into(),
        status: if status { "True" } else { "False" }.into(),
        reason: reason.into(),
        message,
        observed_generation: obs.generation,
        last_transition_time: previous_conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == if status { "True" } else { "False" })
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| now.clone()),
    };

    let ready = match (&obs.invalid_spec, &rollout) {
        (Some(why), None) => cond(condition::READY, false, "InvalidSpec", why.clone()),
        (_, None) if obs.daemon_set.is_none() => {
            cond(condition::READY, false, "DaemonSetMissing", "the ML-node DaemonSet does not exist yet".into())
        }
        (_, None) => cond(
            condition::READY,
            false,
            "AwaitingDaemonSetController",
            "the DaemonSet controller has not reported on the ML-node DaemonSet yet".into(),
        ),
        (_, Some(r)) if r.desired == 0 => cond(
            condition::READY,
            false,
            "NoMatchingNodes",
            "no Kubernetes node matches spec.placement (node selector, affinity, tolerations)".into(),
        ),
        (_, Some(r)) if r.ready >= r.desired => {
            cond(condition::READY, true, "AllMlNodesReady", format!("{}/{} ML nodes ready", r.ready, r.desired))
        }
        (_, Some(r)) if !obs.unschedulable.is_empty() => {
            let named = obs.unschedulable.iter().take(NAMED_UNSCHEDULABLE).cloned().collect::<Vec<_>>().join("; ");
            let more = obs.unschedulable.len().saturating_sub(NAMED_UNSCHEDULABLE);
            let more = if more > 0 { format!("; and {more} more") } else { String::new() };
            cond(
                condition::READY,
                false,
                "MlNodesUnschedulable",
                format!(
                    "{}/{} ML nodes ready; {} cannot be scheduled: {named}{more}",
                    r.ready,
                    r.desired,
                    obs.unschedulable.len()
                ),
            )
        }
        (_, Some(r)) => {
            cond(condition::READY, false, "MlNodesNotReady", format!("{}/{} ML nodes ready", r.ready, r.desired))
        }
    };

    let progressing = match &rollout {
        _ if obs.paused => {
            cond(condition::PROGRESSING, false, "Paused", "spec.paused is true: changes to the fleet are held".into())
        }
        _ if obs.invalid_spec.is_some() => cond(
            condition::PROGRESSING,
            false,
            "InvalidSpec",
            "the spec is invalid; the last valid spec stays in place".into(),
        ),
        _ if obs.rollout_held.is_some() => {
            cond(condition::PROGRESSING, true, "HeldForPoC", obs.rollout_held.clone().unwrap_or_default())
        }
        Some(r) if r.caught_up && r.updated >= r.desired && r.available >= r.desired => cond(
            condition::PROGRESSING,
            false,
            "RolloutComplete",
            format!("{}/{} ML nodes run the current spec", r.updated, r.desired),
        ),
        Some(r) if r.caught_up => {
            let mut message =
                format!("{}/{} ML nodes updated, {}/{} available", r.updated, r.desired, r.available, r.desired);
            if obs.hold_unchecked {
                message.push_str("; PoC windows are not checked: set spec.networkNode.publicUrl to hold rollouts");
            }
            cond(condition::PROGRESSING, true, "RollingOut", message)
        }
        _ => cond(
            condition::PROGRESSING,
            true,
            "RolloutPending",
            "waiting for the DaemonSet controller to pick up the ML-node DaemonSet".into(),
        ),
    };

    let tolerated = |desired: i32| tolerated_unavailable(obs.max_unavailable, desired);
    let degraded = match (&obs.invalid_spec, &obs.apply_error, &rollout) {
        (Some(why), _, _) => cond(condition::DEGRADED, true, "InvalidSpec", why.clone()),
        (_, Some(why), _) => cond(condition::DEGRADED, true, "ApplyFailed", why.clone()),
        (_, _, _) if obs.poc_window_unknown.is_some() => {
            cond(condition::DEGRADED, true, "PocWindowUnknown", obs.poc_window_unknown.clone().unwrap_or_default())
        }
        // Pods starting up (a rollout, a new node, model loading) are unavailable for a while;
        // only ML nodes missing for longer than the grace period are a problem.
        (_, _, Some(r))
            if r.caught_up
                && r.updated >= r.desired
                && r.unavailable > tolerated(r.desired)
                && not_ready_since(previous_conditions, now)
                    .is_some_and(|s| s >= UNAVAILABLE_GRACE.as_secs() as i64) =>
        {
            cond(
                condition::DEGRADED,
                true,
                "MlNodesUnavailable",
                format!(
                    "{} of {} ML nodes unavailable, more than maxUnavailable allows ({})",
                    r.unavailable,
                    r.desired,
                    tolerated(r.desired)
                ),
            )
        }
        _ => cond(condition::DEGRADED, false, "AsExpected", "no problem observed".into()),
    };

    let registered = match &obs.registration {
        None => previous_conditions.iter().find(|c| c.type_ == condition::REGISTERED).cloned().unwrap_or_else(|| {
            Condition {
                type_: condition::REGISTERED.into(),
                status: "Unknown".into(),
                reason: "RegistrationPending".into(),
                message: "registration with the network node has not run yet".into(),
                observed_generation: obs.generation,
                last_transition_time: now.clone(),
            }
        }),
        Some(Registration::Synced { registered, ready, paused, departing }) => {
            let held = if *paused {
                " (disabled while spec.paused)".to_string()
            } else {
                departing.iter().map(|(why, n)| format!("; {n} disabled on {}", why.nodes())).collect()
            };
            if *ready == 0 && *registered == 0 {
                cond(condition::REGISTERED, false, "NoReadyMlNodes", "no ML node is ready to register yet".into())
            } else if registered >= ready {
                let closed = if obs.ml_node_api_closed { CLOSED_API_NOTE } else { "" };
                cond(
                    condition::REGISTERED,
                    true,
                    "MlNodesRegistered",
                    format!("{registered} ML nodes registered with the network node{held}{closed}"),
                )
            } else {
                cond(
                    condition::REGISTERED,
                    false,
                    "RegistrationPending",
                    format!("{registered}/{ready} ready ML nodes registered{held}"),
                )
            }
        }
        Some(Registration::Unreachable(why)) => {
            cond(condition::REGISTERED, false, "NetworkNodeUnreachable", format!("{why}; retrying"))
        }
        Some(Registration::Refused(why)) => cond(condition::REGISTERED, false, "RegistrationRefused", why.clone()),
        Some(Registration::CredentialsRefused(why)) => {
            cond(condition::REGISTERED, false, "CredentialsRefused", why.clone())
        }
    };

    let previous = previous.cloned().unwrap_or_default();
    let registered_ml_nodes = match &obs.registration {
        Some(Registration::Synced { registered, .. }) => *registered,
        _ => previous.registered_ml_nodes,
    };
    let (ml_nodes, gpus, total_gpus, weight, poc_block_height) = match &obs.fleet {
        Some(f) => (f.ml_nodes.clone(), f.gpus.clone(), f.total_gpus, f.weight.map(|w| w.0), f.weight.map(|w| w.1)),
        None => (
            previous.ml_nodes.clone(),
            previous.gpus.clone(),
            previous.total_gpus,
            previous.weight,
            previous.poc_block_height,
        ),
    };
    GonkaNodeStatus {
        ml_nodes,
        gpus,
        total_gpus,
        weight,
        poc_block_height,
        registered_ml_nodes,
        observed_generation: obs.generation,
        conditions: vec![ready, progressing, degraded, registered],
        desired_ml_nodes: rollout.as_ref().map_or(0, |r| r.desired),
        updated_ml_nodes: rollout.as_ref().map_or(0, |r| r.updated),
        ready_ml_nodes: rollout.as_ref().map_or(0, |r| r.ready),
        capacity: obs.capacity.clone().unwrap_or_else(|| previous.capacity.clone()),
        selector: obs.selector.clone().or_else(|| previous.selector.clone()),
    }
}

/// The condition of `type_`, if present.
pub fn find<'a>(status: Option<&'a GonkaNodeStatus>, type_: &str) -> Option<&'a Condition> {
    status?.conditions.iter().find(|c| c.type_ == type_)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DaemonSetStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn at(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(1_800_000_000 + secs).unwrap())
    }

    fn ds(generation: i64, observed: i64, desired: i32, updated: i32, ready: i32, unavailable: i32) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta { generation: Some(generation), ..Default::default() },
            status: Some(DaemonSetStatus {
                observed_generation: Some(observed),
                desired_number_scheduled: desired,
                current_number_scheduled: desired,
                updated_number_scheduled: Some(updated),
                number_ready: ready,
                number_available: Some(desired - unavailable),
                number_unavailable: Some(unavailable),
                number_misscheduled: 0,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A status whose `Ready` has been False since `secs_ago` seconds before `at(0)`.
    fn not_ready_for(secs_ago: i64) -> GonkaNodeStatus {
        let obs = Observation::default();
        compute(None, &obs, &at(-secs_ago))
    }

    fn get<'a>(s: &'a GonkaNodeStatus, t: &str) -> (&'a str, &'a str) {
        let c = s.conditions.iter().find(|c| c.type_ == t).unwrap();
        (c.status.as_str(), c.reason.as_str())
    }

    /// Table: DaemonSet state in, the four conditions out.
    #[test]
    fn conditions_follow_the_daemon_set() {
        let one = IntOrString::Int(1);
        type Case<'a> = (&'a str, Option<DaemonSet>, bool, [(&'a str, &'a str); 3]);
        let cases: Vec<Case> = vec![
            (
                "no DaemonSet yet",
                None,
                false,
                [("False", "DaemonSetMissing"), ("True", "RolloutPending"), ("False", "AsExpected")],
            ),
            (
                "DaemonSet controller not caught up",
                Some(DaemonSet { status: None, ..ds(1, 1, 0, 0, 0, 0) }),
                false,
                [("False", "AwaitingDaemonSetController"), ("True", "RolloutPending"), ("False", "AsExpected")],
            ),
            (
                "no GPU node matches",
                Some(ds(1, 1, 0, 0, 0, 0)),
                false,
                [("False", "NoMatchingNodes"), ("False", "RolloutComplete"), ("False", "AsExpected")],
            ),
            (
                "all ready",
                Some(ds(2, 2, 3, 3, 3, 0)),
                false,
                [("True", "AllMlNodesReady"), ("False", "RolloutComplete"), ("False", "AsExpected")],
            ),
            (
                "rolling, within budget",
                Some(ds(3, 3, 3, 1, 2, 1)),
                false,
                [("False", "MlNodesNotReady"), ("True", "RollingOut"), ("False", "AsExpected")],
            ),
            (
                "new generation not seen",
                Some(ds(4, 3, 3, 3, 3, 0)),
                false,
                [("True", "AllMlNodesReady"), ("True", "RolloutPending"), ("False", "AsExpected")],
            ),
            (
                "too many down",
                Some(ds(3, 3, 4, 4, 2, 2)),
                false,
                [("False", "MlNodesNotReady"), ("True", "RollingOut"), ("True", "MlNodesUnavailable")],
            ),
            (
                "paused",
                Some(ds(3, 3, 3, 1, 3, 0)),
                true,
                [("True", "AllMlNodesReady"), ("False", "Paused"), ("False", "AsExpected")],
            ),
        ];
        for (name, ds, paused, want) in cases {
            let obs = Observation {
                generation: Some(7),
                daemon_set: ds.as_ref(),
                paused,
                max_unavailable: Some(&one),
                ..Default::default()
            };
            let long_unready = not_ready_for(700);
            let s = compute(Some(&long_unready), &obs, &at(0));
            let got = [get(&s, "Ready"), get(&s, "Progressing"), get(&s, "Degraded")];
            assert_eq!(got, want, "case {name}");
            assert_eq!(s.observed_generation, Some(7));
            // Registered was not evaluated here (no registration pass): it keeps its own generation.
            assert!(s.conditions.iter().filter(|c| c.type_ != "Registered").all(|c| c.observed_generation == Some(7)));
        }
    }

    #[test]
    fn unavailability_degrades_only_after_the_grace_period() {
        let d = ds(1, 1, 2, 2, 0, 2); // created, both pods still starting
        let one = IntOrString::Int(1);
        let obs = Observation { daemon_set: Some(&d), max_unavailable: Some(&one), ..Default::default() };
        assert_eq!(get(&compute(None, &obs, &at(0)), "Degraded"), ("False", "AsExpected"), "brand new fleet");
        assert_eq!(get(&compute(Some(&not_ready_for(60)), &obs, &at(0)), "Degraded"), ("False", "AsExpected"));
        assert_eq!(get(&compute(Some(&not_ready_for(601)), &obs, &at(0)), "Degraded"), ("True", "MlNodesUnavailable"));
    }

    #[test]
    fn unschedulable_ml_nodes_are_named_with_the_schedulers_reason() {
        let d = ds(1, 1, 5, 5, 1, 4);
        let unschedulable: Vec<String> =
            (1..=4).map(|i| format!("gpu-{i}: 0/9 nodes are available: 1 Insufficient nvidia.com/gpu.")).collect();
        let obs = Observation { daemon_set: Some(&d), unschedulable, ..Default::default() };
        let s = compute(None, &obs, &at(0));
        assert_eq!(get(&s, "Ready"), ("False", "MlNodesUnschedulable"));
        let message = &s.conditions.iter().find(|c| c.type_ == "Ready").unwrap().message;
        assert!(message.starts_with("1/5 ML nodes ready; 4 cannot be scheduled: gpu-1: 0/9 nodes"), "{message}");
        assert!(message.contains("gpu-3:") && !message.contains("gpu-4:"), "at most three named: {message}");
        assert!(message.ends_with("; and 1 more"), "{message}");
        // Once placed, the plain count is back.
        let obs = Observation { daemon_set: Some(&d), ..Default::default() };
        assert_eq!(get(&compute(Some(&s), &obs, &at(1)), "Ready"), ("False", "MlNodesNotReady"));
    }

    #[test]
    fn a_held_rollout_says_why() {
        let d = ds(2, 2, 3, 0, 3, 0);
        let obs = Observation {
            daemon_set: Some(&d),
            rollout_held: Some("3 ML nodes wait for the PoC window to end (phase PoCGenerate)".into()),
            ..Default::default()
        };
        let s = compute(None, &obs, &at(0));
        assert_eq!(get(&s, "Progressing"), ("True", "HeldForPoC"));
        assert!(s.conditions[1].message.contains("PoCGenerate"));
    }

    #[test]
    fn counts_come_from_the_daemon_set() {
        let d = ds(1, 1, 5, 4, 3, 2);
        let s = compute(None, &Observation { daemon_set: Some(&d), ..Default::default() }, &at(0));
        assert_eq!((s.desired_ml_nodes, s.updated_ml_nodes, s.ready_ml_nodes), (5, 4, 3));
    }

    #[test]
    fn percentage_budget_rounds_up() {
        let quarter = IntOrString::String("25%".into());
        // 10 nodes, 25% -> 3 may be down.
        for (unavailable, degraded) in [(3, "False"), (4, "True")] {
            let d = ds(1, 1, 10, 10, 10 - unavailable, unavailable);
            let obs = Observation { daemon_set: Some(&d), max_unavailable: Some(&quarter), ..Default::default() };
            assert_eq!(
                get(&compute(Some(&not_ready_for(700)), &obs, &at(0)), "Degraded").0,
                degraded,
                "{unavailable} down"
            );
        }
    }

    #[test]
    fn invalid_spec_and_apply_errors_degrade_with_the_message() {
        let obs = Observation { invalid_spec: Some("spec.image: required".into()), ..Default::default() };
        let s = compute(None, &obs, &at(0));
        assert_eq!(get(&s, "Degraded"), ("True", "InvalidSpec"));
        assert_eq!(get(&s, "Ready"), ("False", "InvalidSpec"));
        assert_eq!(s.conditions[2].message, "spec.image: required");

        let d = ds(1, 1, 2, 2, 2, 0);
        let obs = Observation { apply_error: Some("forbidden".into()), daemon_set: Some(&d), ..Default::default() };
        let s = compute(None, &obs, &at(0));
        assert_eq!(get(&s, "Degraded"), ("True", "ApplyFailed"));
        assert_eq!(get(&s, "Ready"), ("True", "AllMlNodesReady"), "existing ML nodes keep serving");
    }

    #[test]
    fn transition_time_moves_only_when_the_status_flips() {
        let d = ds(1, 1, 2, 2, 2, 0);
        let obs = Observation { daemon_set: Some(&d), ..Default::default() };
        let first = compute(None, &obs, &at(0));
        let again = compute(Some(&first), &obs, &at(100));
        assert_eq!(first, again, "same observation, same status: nothing to write");

        let d2 = ds(1, 1, 2, 2, 1, 1);
        let obs2 =
            Observation { daemon_set: Some(&d2), max_unavailable: Some(&IntOrString::Int(1)), ..Default::default() };
        let flipped = compute(Some(&again), &obs2, &at(200));
        let ready = flipped.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!((ready.status.as_str(), &ready.last_transition_time), ("False", &at(200)));
        let degraded = flipped.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.last_transition_time, at(0), "Degraded stayed False");
    }

    #[test]
    fn registered_follows_the_registration_pass() {
        let cases = [
            (
                Registration::Synced { registered: 0, ready: 0, paused: false, departing: vec![] },
                ("False", "NoReadyMlNodes"),
                0,
            ),
            (
                Registration::Synced { registered: 1, ready: 3, paused: false, departing: vec![] },
                ("False", "RegistrationPending"),
                1,
            ),
            (
                Registration::Synced { registered: 3, ready: 3, paused: true, departing: vec![] },
                ("True", "MlNodesRegistered"),
                3,
            ),
            (
                Registration::Synced {
                    registered: 3,
                    ready: 3,
                    paused: false,
                    departing: vec![(Departure::Cordoned, 1), (Departure::ScaleDown, 2)],
                },
                ("True", "MlNodesRegistered"),
                3,
            ),
            (Registration::Unreachable("connection refused".into()), ("False", "NetworkNodeUnreachable"), 7),
            (Registration::Refused("model not approved".into()), ("False", "RegistrationRefused"), 7),
            (Registration::CredentialsRefused("no opt-in label".into()), ("False", "CredentialsRefused"), 7),
        ];
        let previous = GonkaNodeStatus { registered_ml_nodes: 7, ..Default::default() };
        for (registration, want, count) in cases {
            let obs = Observation { registration: Some(registration.clone()), ..Default::default() };
            let s = compute(Some(&previous), &obs, &at(0));
            assert_eq!((get(&s, "Registered"), s.registered_ml_nodes), (want, count), "{registration:?}");
        }
        // Held ML nodes are counted by why their Kubernetes node is going.
        let departing = vec![(Departure::ScaleDown, 2), (Departure::Cordoned, 1)];
        let obs = Observation {
            registration: Some(Registration::Synced { registered: 3, ready: 3, paused: false, departing }),
            ..Default::default()
        };
        let s = compute(None, &obs, &at(0));
        let message = &s.conditions.iter().find(|c| c.type_ == "Registered").unwrap().message;
        assert!(
            message.ends_with("; 2 disabled on nodes an autoscaler is removing; 1 disabled on cordoned nodes"),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_poc_window_past_the_limit_is_degraded() {
        let obs = Observation { poc_window_unknown: Some("unreadable for 30 min".into()), ..Default::default() };
        let s = compute(None, &obs, &at(0));
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str(), degraded.message.as_str()),
            ("True", "PocWindowUnknown", "unreadable for 30 min")
        );
        // An invalid spec says more: it is what the user has to fix first.
        let obs = Observation { invalid_spec: Some("bad".into()), ..obs };
        assert_eq!(get(&compute(None, &obs, &at(0)), "Degraded"), ("True", "InvalidSpec"));
    }

    #[test]
    fn registered_says_when_the_ml_node_api_admits_no_caller() {
        let registration = Some(Registration::Synced { registered: 2, ready: 2, paused: false, departing: vec![] });
        let message = |closed: bool| {
            let obs =
                Observation { registration: registration.clone(), ml_node_api_closed: closed, ..Default::default() };
            let s = compute(None, &obs, &at(0));
            s.conditions.iter().find(|c| c.type_ == "Registered").unwrap().message.clone()
        };
        assert_eq!(message(false), "2 ML nodes registered with the network node");
        assert_eq!(message(true), format!("2 ML nodes registered with the network node{CLOSED_API_NOTE}"));
        assert!(CLOSED_API_NOTE.contains("spec.networkNode.mlNodeApiFrom"));
    }

    #[test]
    fn registration_fields_are_carried_over() {
        let previous =
            GonkaNodeStatus { registered_ml_nodes: 2, total_gpus: 16, weight: Some(42), ..Default::default() };
        let s = compute(Some(&previous), &Observation::default(), &at(0));
        assert_eq!((s.registered_ml_nodes, s.total_gpus, s.weight), (2, 16, Some(42)));
        assert_eq!(get(&s, "Registered"), ("Unknown", "RegistrationPending"));
    }

    #[test]
    fn capacity_is_what_was_looked_at_else_what_was() {
        let held = gonka_crds::CapacityStatus { eligible: 3, joined: 2, held_back: 1, limit: 2, ..Default::default() };
        let previous = GonkaNodeStatus { capacity: Some(held.clone()), ..Default::default() };
        let keep = compute(Some(&previous), &Observation::default(), &at(0));
        assert_eq!(keep.capacity, Some(held.clone()), "not looked at (invalid spec): the previous stands");
        let uncapped = Observation { capacity: Some(None), ..Observation::default() };
        assert_eq!(compute(Some(&previous), &uncapped, &at(0)).capacity, None, "the cap was lifted");
        let now = gonka_crds::CapacityStatus { joined: 3, held_back: 0, limit: 3, ..held };
        let capped = Observation { capacity: Some(Some(now.clone())), ..Observation::default() };
        assert_eq!(compute(Some(&previous), &capped, &at(0)).capacity, Some(now));
    }
}
