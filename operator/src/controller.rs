//! The GonkaNode controller. One reconcile is a pipeline:
//!
//! read (the watch hands us the object) → [`validate`](crate::validate) →
//! [`build`](crate::build) (pure) → [`apply`](crate::apply) (the only Kubernetes writer) →
//! registration ([`registration`](crate::registration) plans, pure;
//! [`network_node`](crate::network_node) carries it out on the network node) →
//! [`status`](crate::status) (pure, then written by apply).
//!
//! Deletion goes through a finalizer: every ML node is removed from the network node before
//! the GonkaNode disappears; the owned objects then go by garbage collection (owner references).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gonka_crds::{CREDENTIALS_LABEL, GonkaNode, condition};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::Predicate;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as FinalizerEvent, finalizer};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, predicates, reflector, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apply::{ApplyError, Mode, Writer};
use crate::build::{self, BuildError, LABEL_GONKA_NODE, LABEL_MANAGED_BY, MANAGER, Names};
use crate::capacity;
use crate::metrics::Metrics;
use crate::network_node::{self, NetworkNode, NetworkNodeError};
use crate::node_departure::{self, Departure};
use crate::node_protection;
use crate::registration;
use crate::report_store::{self, ReportStore};
use crate::rollout::{self, RolloutPod};
use crate::status::{self, Observation, Registration};
use crate::validate::{MTLS_FILES, MtlsSecret, ValidatedSpec, default_image_for, validate};
use gonka_protocol::network::EpochResponse;
use sha2::{Digest, Sha256};

/// Finalizer that holds a GonkaNode until its ML nodes are off the network node.
pub const FINALIZER: &str = "gonka.ai/network-registration";

/// Settings of the controller loop.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Node-daemon image for GonkaNodes that don't name one.
    pub daemon_image: String,
    /// The same for GonkaNodes with a model on the vLLM engine (the image built on upstream's
    /// ML-node image).
    pub daemon_image_vllm: String,
    /// Watch only this namespace; `None` = all namespaces.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// How long a GonkaNode's triggers gather before its pass runs (trailing edge): a rollout
    /// of many pods changes pods, the DaemonSet's status and reports in bursts, and a pass per
    /// change writes a status per step. 30 ms keeps registration as quick and cuts passes and
    /// writes back to what they were when every pass read the apiserver; 100 ms tripled the
    /// median Ready → registered (docs/benchmarks.md).
    pub debounce: Duration,
    /// How often a steady GonkaNode is re-checked for drift.
    pub resync: Duration,
    /// Wait before retrying a failed reconcile.
    pub retry: Duration,
    /// `reportingInstance` of events (the pod name).
    pub instance: Option<String>,
    /// How often a held or running rollout looks at the epoch phase again (no watch reports it).
    pub rollout_recheck: Duration,
    /// The report endpoint node-daemons stream to (`daemon.json`'s `report.url`); `None` = the
    /// daemons don't report.
    pub report: Option<build::ReportEndpoint>,
    /// How often reports that only move counters (PoC nonces) are folded into status.
    pub report_flush: Duration,
    /// What the cluster admin allows GonkaNode authors (host paths, image registries).
    pub policy: crate::validate::ClusterPolicy,
    /// How long evictions stay held while the epoch phase can't be read (a PoC window may be
    /// on); after it the disruption budget tolerates `maxUnavailable` again and `Degraded`
    /// says why.
    pub unknown_window_hold: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        Self {
            daemon_image: String::new(),
            daemon_image_vllm: String::new(),
            namespace: None,
            concurrency: 4,
            debounce: Duration::from_millis(30),
            resync: Duration::from_secs(300),
            retry: Duration::from_secs(15),
            instance: None,
            rollout_recheck: Duration::from_secs(30),
            report: None,
            report_flush: Duration::from_secs(30),
            policy: crate::validate::ClusterPolicy::default(),
            unknown_window_hold: Duration::from_secs(30 * 60),
        }
    }
}

/// What every reconcile shares.
pub struct Context {
    pub writer: Writer,
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub config: ControllerConfig,
    pub client: Client,
    /// What the node-daemons report.
    pub reports: ReportStore,
    /// Consecutive registration passes that found the network node unreachable, per GonkaNode.
    unreachable: std::sync::Mutex<std::collections::HashMap<report_store::GonkaNodeKey, u32>>,
    /// Since when each GonkaNode's epoch phase has been unreadable (in memory: a new leader
    /// starts counting again, so a hold lasts at most one limit longer).
    epoch_unreadable: std::sync::Mutex<std::collections::HashMap<report_store::GonkaNodeKey, std::time::Instant>>,
    /// The Kubernetes nodes (what tells whether they are going), from [`run`]'s watch.
    nodes: reflector::Store<Node>,
    node_writer: std::sync::Mutex<Option<reflector::store::Writer<Node>>>,
    /// What fills the writer's stores of owned objects: [`run`]'s watches.
    owned_writers: std::sync::Mutex<Option<crate::apply::OwnedStoreWriters>>,
    /// Every GonkaNode's ML-node pods (slim), from [`run`]'s pod watch.
    pods: reflector::Store<Pod>,
    pod_writer: std::sync::Mutex<Option<reflector::store::Writer<Pod>>>,
}

impl Context {
    pub fn new(client: Client, config: ControllerConfig, metrics: Metrics) -> Self {
        let reporter = Reporter { controller: MANAGER.into(), instance: config.instance.clone() };
        let (nodes, node_writer) = reflector::store();
        let (owned, owned_writers) = crate::apply::owned_stores();
        let (pods, pod_writer) = reflector::store();
        Self {
            writer: Writer::new(client.clone(), owned),
            recorder: Recorder::new(client.clone(), reporter),
            metrics,
            config,
            client,
            reports: ReportStore::default(),
            unreachable: Default::default(),
            epoch_unreadable: Default::default(),
            nodes,
            node_writer: std::sync::Mutex::new(Some(node_writer)),
            owned_writers: std::sync::Mutex::new(Some(owned_writers)),
            pods,
            pod_writer: std::sync::Mutex::new(Some(pod_writer)),
        }
    }

    /// The ML-node pods as a pod watch that has just listed `pods` would have them (tests that
    /// call [`reconcile`] without [`run`]).
    #[cfg(test)]
    pub(crate) fn pods_listed(&self, pods: Vec<Pod>) {
        let mut writer = self.pod_writer.lock().expect("pod writer").take().expect("not yet watched");
        writer.apply_watcher_event(&watcher::Event::Init);
        for mut pod in pods {
            slim_pod(&mut pod);
            writer.apply_watcher_event(&watcher::Event::InitApply(pod));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        *self.pod_writer.lock().expect("pod writer") = Some(writer);
    }

    /// `gn`'s pods (selected by its labels; which of them its DaemonSet controls is decided
    /// later), once the pod watch has listed them all: a pass that saw a half-listed fleet
    /// would deregister the ML nodes it missed, so an unlisted watch fails the pass instead.
    async fn pods_of(&self, gn: &GonkaNode) -> Option<Vec<Pod>> {
        if tokio::time::timeout(Duration::from_secs(30), self.pods.wait_until_ready()).await.is_err() {
            warn!(gonka_node = %gn.name_any(), "the ML-node pods are not listed yet");
            return None;
        }
        let namespace = gn.namespace();
        let selector = build::selector_labels(gn);
        Some(
            self.pods
                .state_filter(|p| {
                    p.namespace() == namespace && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                })
                .into_iter()
                .map(|p| (*p).clone())
                .collect(),
        )
    }

    /// The Kubernetes nodes as a watch that has just listed them would have them (tests that
    /// call [`reconcile`] without [`run`]).
    #[cfg(test)]
    pub(crate) fn nodes_listed(&self, nodes: Vec<Node>) {
        let mut writer = self.node_writer.lock().expect("node writer").take().expect("not yet watched");
        writer.apply_watcher_event(&watcher::Event::Init);
        for node in nodes {
            writer.apply_watcher_event(&watcher::Event::InitApply(node));
        }
        writer.apply_watcher_event(&watcher::Event::InitDone);
        // The store reads from the writer's state: keep it for the context's life.
        *self.node_writer.lock().expect("node writer") = Some(writer);
    }

    /// The Kubernetes nodes, once the watch has listed them all (a reconcile before that would
    /// see no node going and enable ML nodes a cordon holds). Waits at most 30 s; then what is
    /// known (a watch that cannot list must not stop registration).
    async fn kubernetes_nodes(&self) -> reflector::Store<Node> {
        if tokio::time::timeout(Duration::from_secs(30), self.nodes.wait_until_ready()).await.is_err() {
            warn!("the Kubernetes nodes are not listed yet; departures unknown");
        }
        self.nodes.clone()
    }

    /// How long `gn`'s epoch phase has been unreadable (zero when it was read), and the gauge of
    /// GonkaNodes past the hold limit brought up to date.
    fn epoch_unreadable_for(&self, gn: &GonkaNode, unreadable: bool) -> Duration {
        let key = (gn.namespace().unwrap_or_default(), gn.name_any());
        let mut since = self.epoch_unreadable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let elapsed = if unreadable {
            since.entry(key).or_insert_with(std::time::Instant::now).elapsed()
        } else {
            since.remove(&key);
            Duration::ZERO
        };
        self.count_unknown_windows(&since);
        elapsed
    }

    /// The gauge of GonkaNodes whose epoch phase has been unreadable past the hold limit.
    fn count_unknown_windows(&self, since: &std::collections::HashMap<report_store::GonkaNodeKey, std::time::Instant>) {
        let past = since.values().filter(|t| t.elapsed() >= self.config.unknown_window_hold).count();
        self.metrics.poc_window_unknown.set(past as i64);
    }

    /// When to try an unreachable network node again: `retry`, doubling with every consecutive
    /// failure up to the resync period; a success starts over.
    fn network_retry(&self, gn: &GonkaNode, reachable: bool) -> Duration {
        let key = (gn.namespace().unwrap_or_default(), gn.name_any());
        let mut failures = self.unreachable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if reachable {
            failures.remove(&key);
            return self.config.retry;
        }
        let n = failures.entry(key).or_default();
        let delay = retry_delay(self.config.retry, self.config.resync, *n);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets a GonkaNode's retry count and epoch watch (it is being deleted).
    fn forget_network_retries(&self, key: &report_store::GonkaNodeKey) {
        self.unreachable.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
        let mut since = self.epoch_unreadable.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        since.remove(key);
        self.count_unknown_windows(&since);
    }

    /// Reads reports from `reports` (the report server's store).
    pub fn with_reports(mut self, reports: ReportStore) -> Self {
        self.reports = reports;
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("finalizer: {0}")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
    #[error("deregistering ML nodes: {0}")]
    Deregistration(String),
}

impl Error {
    /// Stable label for the `reconcile_errors` metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Build(_) => "build",
            Self::Deregistration(_) => "deregistration",
            Self::Apply(ApplyError::Status(_)) => "status",
            Self::Apply(_) => "apply",
            Self::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e) | kube::runtime::finalizer::Error::CleanupFailed(e) => {
                    e.metric_label()
                }
                _ => "finalizer",
            },
        }
    }
}

/// Reconciles one GonkaNode.
pub async fn reconcile(gn: Arc<GonkaNode>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started();
    let Some(namespace) = gn.namespace() else {
        return Err(Error::Build(BuildError::NoNamespace));
    };
    let api: Api<GonkaNode> = Api::namespaced(ctx.client.clone(), &namespace);
    finalizer(&api, FINALIZER, gn, |event| async {
        match event {
            FinalizerEvent::Apply(gn) => apply_gonka_node(&gn, &ctx).await,
            FinalizerEvent::Cleanup(gn) => cleanup(&gn, &ctx).await,
        }
    })
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))
}

/// One pass over a GonkaNode, in stages: [`observe`] (the watches' stores, the reports, the
/// epoch, the Secrets the spec names; nothing written), [`apply_fleet`] (capacity labels, the
/// owned objects, the disruption budget), [`drive_ml_nodes`] (rollouts, autoscaler protection,
/// registration, nodes leaving a cap), then status and [`next_pass`]. The decisions are pure
/// functions next to their writers (`capacity::plan`, `build::*`, `node_protection::plan`,
/// `registration::plan`, `rollout::replacements`, [`ml_node_view`], `status::compute`); a new
/// rule lands in one of them.
async fn apply_gonka_node(gn: &GonkaNode, ctx: &Context) -> Result<Action, Error> {
    let spec = &gn.spec;
    let previous = gn.status.as_ref();
    let observed = observe(gn, ctx).await;
    let mut obs = Observation {
        generation: gn.metadata.generation,
        selector: Some(pod_selector(gn)),
        paused: spec.paused,
        hold_unchecked: spec.update_strategy.hold_during_poc && spec.network_node.public_url.is_none(),
        ml_node_api_closed: spec.network_node.ml_node_api_from.is_none(),
        poc_window_unknown: observed.window_unknown.clone(),
        max_unavailable: Some(&spec.update_strategy.max_unavailable),
        ..Observation::default()
    };
    let fleet = apply_fleet(gn, ctx, &observed).await?;
    obs.invalid_spec = observed.checked.as_ref().err().cloned();
    obs.apply_error = fleet.failure.as_ref().map(ApplyError::user_message);
    obs.daemon_set = fleet.daemon_set.as_ref();
    let rollout = drive_ml_nodes(gn, ctx, &observed, &fleet, &mut obs).await;
    if obs.invalid_spec.is_none() {
        obs.capacity = Some(fleet.capacity.as_ref().and_then(|p| p.status.clone()));
    }

    let new_status = status::compute(previous, &obs, &Time(jiff::Timestamp::now()));
    ctx.metrics.fleet.observe(&fleet_labels(gn), &new_status, spec.gpus_per_ml_node, observed.window());
    announce_transitions(gn, ctx, &new_status).await;
    if ctx.writer.patch_status(gn, &new_status).await? {
        info!(gonka_node = %gn.name_any(), generation = ?gn.metadata.generation, "status updated");
    }

    let synced = matches!(obs.registration, Some(Registration::Synced { .. }));
    if synced {
        ctx.network_retry(gn, true);
    }
    let pass = Pass {
        invalid_spec: obs.invalid_spec.is_some(),
        secret_refused: observed.secret_refused,
        epoch_followed: observed.epoch.is_some(),
        network_node_failed: matches!(
            obs.registration,
            Some(Registration::Unreachable(_) | Registration::Refused(_) | Registration::CredentialsRefused(_))
        ),
        rollout_idle: rollout == RolloutStep::Idle,
    };
    match fleet.failure {
        Some(e) => Err(e.into()),
        None => Ok(next_pass(&pass, &ctx.config, || ctx.network_retry(gn, false))),
    }
}

/// What a pass knows before it changes anything.
struct Observed {
    /// The spec as the cluster's policy and the Secrets it names allow it, or why not.
    checked: Result<ValidatedSpec, String>,
    /// A Secret was why the spec was refused (it gets better without an edit, and no watch tells).
    secret_refused: bool,
    /// The epoch phase, when rollouts or the budget follow it: read once, since rollouts, the
    /// disruption budget, autoscaler protection and capacity all follow PoC windows. Also
    /// while paused or invalid: the ML nodes that run still prove in the windows, and a budget
    /// closed for a window must open again after it.
    epoch: Option<Result<EpochResponse, NetworkNodeError>>,
    guard: build::DisruptionGuard,
    /// Why evictions are tolerated without knowing the window (read too long unsuccessfully).
    window_unknown: Option<String>,
    /// The pods the GonkaNode's labels select (a valid spec only), from the pod watch; read
    /// before anything is applied: a cap labels the nodes they run on before the DaemonSet
    /// selects that label.
    /// `Err`: the pod watch has not listed yet.
    pods: Option<Result<Vec<Pod>, ()>>,
    /// The Kubernetes nodes, from the node watch.
    nodes: reflector::Store<Node>,
}

impl Observed {
    /// A PoC window is on (or assumed on while the epoch is unreadable, up to the limit).
    fn window(&self) -> bool {
        self.guard == build::DisruptionGuard::PocWindow
    }
}

async fn observe(gn: &GonkaNode, ctx: &Context) -> Observed {
    let spec = &gn.spec;
    let (checked, secret_refused) = check_spec(gn, ctx).await;
    let epoch = match (&spec.network_node.public_url, build::holds_rollouts(gn)) {
        (Some(url), true) => Some(network_node::latest_epoch(url, spec.network_node.ca_bundle.as_deref()).await),
        _ => None,
    };
    let unreadable_for = ctx.epoch_unreadable_for(gn, matches!(epoch, Some(Err(_))));
    let (guard, window_unknown) = build::disruption_guard(
        epoch.as_ref().map(|e| e.as_ref().map(EpochResponse::poc_window).map_err(ToString::to_string)),
        unreadable_for,
        ctx.config.unknown_window_hold,
    );
    let pods = match &checked {
        Ok(_) => Some(ctx.pods_of(gn).await.ok_or(())),
        Err(_) => None,
    };
    let nodes = ctx.kubernetes_nodes().await;
    Observed { checked, secret_refused, epoch, guard, window_unknown, pods, nodes }
}

/// What [`apply_fleet`] leaves for the rest of the pass.
#[derive(Default)]
struct FleetApplied {
    /// The owned DaemonSet as the apiserver holds it (after the apply, or as it was).
    daemon_set: Option<DaemonSet>,
    /// What `spec.capacity` decided (a valid spec with a UID).
    capacity: Option<capacity::Plan>,
    /// The write that failed; the pass reports it and is retried.
    failure: Option<ApplyError>,
}

/// Capacity labels, the owned objects, the disruption budget; for an invalid spec only the
/// announcement (what runs keeps running on the last valid spec).
async fn apply_fleet(gn: &GonkaNode, ctx: &Context, observed: &Observed) -> Result<FleetApplied, Error> {
    let spec = &gn.spec;
    let mut fleet = FleetApplied::default();
    match &observed.checked {
        Err(message) => {
            if status::find(gn.status.as_ref(), condition::DEGRADED)
                .is_none_or(|c| c.reason != "InvalidSpec" || c.message != *message)
            {
                ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "InvalidSpec", message.clone()).await;
            }
            let name = Names::of(&gn.name_any()).daemon_set;
            fleet.daemon_set =
                ctx.writer.live::<DaemonSet>(&gn.namespace().unwrap_or_default(), &name).await.ok().flatten();
        }
        Ok(validated) => {
            let joined = match plan_capacity(gn, ctx, observed.pods.as_ref(), &observed.nodes, observed.window()).await
            {
                Ok(plan) => {
                    let joined = match &plan {
                        Some(plan) if !spec.paused => join_nodes(gn, ctx, &plan.join).await,
                        _ => Ok(()),
                    };
                    fleet.capacity = plan;
                    joined
                }
                Err(e) => Err(e),
            };
            let desired = build::desired_objects(gn, validated, ctx.config.report.as_ref())?;
            let mode = if spec.paused { Mode::Hold } else { Mode::Apply };
            // A selector must not get ahead of its labels: nothing is applied until they are on.
            let applied = match joined {
                Ok(()) => ctx.writer.apply_objects(&desired, mode).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(applied) => {
                    if !applied.created.is_empty() {
                        let note = format!("created {}", applied.created.join(", "));
                        ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Created", note).await;
                    }
                    if !applied.updated.is_empty() {
                        let note = format!("updated {}", applied.updated.join(", "));
                        ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Updated", note).await;
                    }
                    fleet.daemon_set = applied.daemon_set;
                }
                Err(e) => {
                    warn!(gonka_node = %gn.name_any(), error = %e, "apply failed");
                    ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "ApplyFailed", e.user_message()).await;
                    fleet.failure = Some(e);
                }
            }
        }
    }
    if let (Some(ds), None) = (&fleet.daemon_set, &fleet.failure) {
        let expected = ds.status.as_ref().map_or(0, |s| s.desired_number_scheduled);
        let pdb = build::disruption_budget(gn, expected, observed.guard)?;
        let mut applied = crate::apply::Applied::default();
        match ctx.writer.apply_disruption_budget(&pdb, &mut applied).await {
            Ok(()) if !applied.updated.is_empty() => {
                info!(gonka_node = %gn.name_any(), guard = ?observed.guard, expected, "disruption budget follows the PoC window")
            }
            Ok(()) => {}
            Err(e) => {
                warn!(gonka_node = %gn.name_any(), error = %e, "applying the disruption budget failed");
                fleet.failure = Some(e);
            }
        }
    }
    Ok(fleet)
}

/// The ML nodes: outdated pods replaced outside PoC windows, autoscalers kept off the hosting
/// nodes during one, registration with the network node, then the nodes a cap lets go.
async fn drive_ml_nodes<'a>(
    gn: &GonkaNode,
    ctx: &Context,
    observed: &Observed,
    fleet: &'a FleetApplied,
    obs: &mut Observation<'a>,
) -> RolloutStep {
    let spec = &gn.spec;
    let listed = match &observed.pods {
        Some(Ok(listed)) => listed,
        Some(Err(())) => {
            let why = ApplyError::NotListed { kind: "Pod".into() };
            obs.registration = Some(Registration::Unreachable(why.to_string()));
            return RolloutStep::Idle;
        }
        None => return RolloutStep::Idle,
    };
    // Labels select, the DaemonSet's controller reference decides: a pod anyone made with the
    // same labels is neither registered nor rolled.
    let daemon_set = fleet.daemon_set.as_ref();
    let ds_uid = daemon_set.and_then(|d| d.metadata.uid.clone());
    let items: Vec<Pod> = listed.iter().filter(|p| controlled_by(p, ds_uid.as_deref())).cloned().collect();
    let rollout = match daemon_set {
        Some(ds) => drive_rollout(gn, ctx, ds, &items, observed.epoch.as_ref()).await,
        None => RolloutStep::Idle,
    };
    if let RolloutStep::Held(why) = &rollout {
        obs.rollout_held = Some(why.clone());
    }
    let reports = read_reports(gn, ctx, &items);
    // A cap's leaving nodes are told apart like departing ones: disabled first, and kept
    // disabled while the DaemonSet deletes their pods.
    let leaving: BTreeSet<&str> = fleet
        .capacity
        .as_ref()
        .filter(|p| p.disable_first)
        .map(|p| p.leave.iter().chain(&p.going).map(String::as_str).collect())
        .unwrap_or_default();
    let pods = ml_node_view(&items, &reports, &observed.nodes, &leaving);
    // Autoscalers are kept off the nodes that prove while a window is on.
    let hosting: BTreeSet<String> = pods.iter().filter(|p| !p.terminating).map(|p| p.kubernetes_node.clone()).collect();
    let known = observed.nodes.state();
    let manager = node_protection::field_manager(gn);
    let plan = node_protection::plan(observed.window(), &hosting, known.iter().map(AsRef::as_ref), &manager);
    protect_nodes(gn, ctx, &manager, &plan).await;
    obs.fleet = Some(reports.fleet);
    obs.unschedulable = unschedulable_ml_nodes(&items);
    let expected =
        daemon_set.and_then(|d| d.status.as_ref()).map_or(pods.len(), |s| s.desired_number_scheduled.max(0) as usize);
    let registration = register(gn, ctx, &pods, expected).await;
    // A leaving node's label comes off (and the DaemonSet deletes its pod) once its ML node is
    // disabled; without a cap, once the DaemonSet no longer selects the label.
    if let Some(plan) = &fleet.capacity
        && !spec.paused
        && fleet.failure.is_none()
        && (!plan.disable_first || matches!(registration, Registration::Synced { .. }))
    {
        leave_nodes(gn, ctx, &plan.leave).await;
    }
    obs.registration = Some(registration);
    rollout
}

/// The ML nodes as registration sees them: each pod (bound to a node) with what its daemon
/// reported and whether its node is going (an autoscaler's taint, a cordon, a deletion) or
/// leaving a cap.
fn ml_node_view(
    pods: &[Pod],
    reports: &PodReports,
    nodes: &reflector::Store<Node>,
    leaving: &BTreeSet<&str>,
) -> Vec<registration::MlNodePod> {
    pods.iter()
        .filter_map(|p| {
            let mut pod = ml_node_pod(p)?;
            pod.hardware = reports.hardware.get(&p.name_any()).cloned();
            pod.yielded = reports.yielded.contains(&p.name_any());
            pod.departing = nodes
                .get(&ObjectRef::new(&pod.kubernetes_node))
                .and_then(|n| node_departure::departure(&n))
                .or_else(|| leaving.contains(pod.kubernetes_node.as_str()).then_some(Departure::OverCapacity));
            Some(pod)
        })
        .collect()
}

/// What decides when a pass that wrote nothing wrong looks again.
#[derive(Clone, Copy, Debug, Default)]
struct Pass {
    invalid_spec: bool,
    secret_refused: bool,
    /// The epoch phase is followed (rollouts held in windows, the budget).
    epoch_followed: bool,
    /// The network node was unreachable or refused.
    network_node_failed: bool,
    rollout_idle: bool,
}

/// When to look again after a pass without a failed write; `backoff` is the network node's
/// retry delay (it grows with each call).
fn next_pass(pass: &Pass, config: &ControllerConfig, backoff: impl FnOnce() -> Duration) -> Action {
    if pass.secret_refused {
        Action::requeue(backoff())
    } else if pass.invalid_spec && pass.epoch_followed {
        // The disruption budget follows the epoch phase, which no watch reports (also for an
        // invalid spec: the ML nodes that run still prove in the windows).
        Action::requeue(config.rollout_recheck)
    } else if pass.invalid_spec {
        // An invalid spec only gets better when the user edits it.
        Action::await_change()
    } else if pass.network_node_failed {
        // The network node is down, or refused (a model governance has not approved yet, a
        // failure on its side): come back soon, then less and less often.
        Action::requeue(backoff())
    } else if !pass.rollout_idle || pass.epoch_followed {
        // A held or running rollout, the disruption budget and nodes waiting to leave follow
        // the epoch phase, which no watch reports.
        Action::requeue(config.rollout_recheck)
    } else {
        Action::requeue(config.resync)
    }
}

/// The spec as the cluster's policy allows it, with the mutual-TLS Secret it names read (it
/// decides what the pods mount), or why not; and whether a Secret was the reason (a Secret
/// that is missing or not opted in gets better without an edit of the GonkaNode, and no watch
/// tells: it is looked at again, as an unreachable network node is).
async fn check_spec(gn: &GonkaNode, ctx: &Context) -> (Result<ValidatedSpec, String>, bool) {
    let image = default_image_for(gn, &ctx.config.daemon_image, &ctx.config.daemon_image_vllm);
    let mut validated = match validate(gn, image, &ctx.config.policy) {
        Ok(v) => v,
        Err(errors) => return (Err(errors.to_string()), false),
    };
    match mtls_secret(gn, ctx).await {
        Ok(mtls) => {
            validated.mtls = mtls;
            (Ok(validated), false)
        }
        Err(why) => (Err(why), true),
    }
}

/// The capacity plan of a valid GonkaNode (`None` before it has a UID). The nodes its pods run
/// on count as joined, so a cap set on a running fleet takes no pod away unannounced: which
/// those are is read from the pods its DaemonSet controls; failing to read them stops the pass
/// before the DaemonSet is applied.
async fn plan_capacity(
    gn: &GonkaNode,
    ctx: &Context,
    listed: Option<&Result<Vec<Pod>, ()>>,
    nodes: &reflector::Store<Node>,
    window: bool,
) -> Result<Option<capacity::Plan>, ApplyError> {
    let Some(label) = capacity::label_key(gn) else { return Ok(None) };
    let (mut hosting, mut selecting) = (BTreeSet::new(), false);
    if gn.spec.capacity.is_some() {
        let pods = match listed {
            Some(Ok(pods)) => pods,
            Some(Err(_)) => return Err(ApplyError::NotListed { kind: "Pod".into() }),
            None => return Ok(None),
        };
        let name = Names::of(&gn.name_any()).daemon_set;
        let ds = ctx.writer.live::<DaemonSet>(&gn.namespace().unwrap_or_default(), &name).await?;
        let uid = ds.as_ref().and_then(|d| d.metadata.uid.clone());
        selecting = ds
            .and_then(|d| d.spec?.template.spec?.node_selector)
            .is_some_and(|s| s.get(&label).is_some_and(|v| v == "true"));
        hosting = pods
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && controlled_by(p, uid.as_deref()))
            .filter_map(|p| p.spec.as_ref()?.node_name.clone())
            .collect();
    }
    let known = nodes.state();
    Ok(Some(capacity::plan(&gn.spec, known.iter().map(AsRef::as_ref), &hosting, selecting, &label, window)))
}

/// Puts `gn`'s capacity label on `nodes` (they join); the first refused write stops the pass
/// before the DaemonSet is applied.
async fn join_nodes(gn: &GonkaNode, ctx: &Context, nodes: &[String]) -> Result<(), ApplyError> {
    let Some(label) = capacity::label_key(gn) else { return Ok(()) };
    let manager = capacity::field_manager(gn);
    for node in nodes {
        ctx.writer.label_node(node, &label, &manager, true).await?;
    }
    if !nodes.is_empty() {
        let note = format!("nodes joined under spec.capacity: {}", nodes.join(", "));
        ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Joined", note).await;
    }
    Ok(())
}

/// The labels of `gn`'s fleet metrics.
fn fleet_labels(gn: &GonkaNode) -> crate::metrics::FleetLabels {
    crate::metrics::FleetLabels { gonka_node_namespace: gn.namespace().unwrap_or_default(), gonka_node: gn.name_any() }
}

/// Takes `gn`'s capacity label off `nodes` (they leave the fleet); a refused write is logged
/// and tried again next pass.
async fn leave_nodes(gn: &GonkaNode, ctx: &Context, nodes: &[String]) {
    let Some(label) = capacity::label_key(gn) else { return };
    let manager = capacity::field_manager(gn);
    let mut left = Vec::new();
    for node in nodes {
        match ctx.writer.label_node(node, &label, &manager, false).await {
            Ok(()) => left.push(node.clone()),
            Err(e) => warn!(gonka_node = %gn.name_any(), node, error = %e, "taking a capacity label off"),
        }
    }
    if !left.is_empty() && gn.spec.capacity.is_some() && gn.metadata.deletion_timestamp.is_none() {
        let note = format!("nodes left under spec.capacity (their ML nodes disabled first): {}", left.join(", "));
        ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Left", note).await;
    }
}

/// `base` doubled `failures` times, at most `cap`.
fn retry_delay(base: Duration, cap: Duration, failures: u32) -> Duration {
    base.saturating_mul(1u32 << failures.min(16)).min(cap.max(base))
}

/// What the pod store keeps of an ML-node pod: what registration, rollouts, capacity and status
/// read (names, labels, annotations, controller, deletion, the node it is bound or pinned to,
/// its conditions and IP); the containers, volumes and managed fields of 1,000 pods are not.
fn slim_pod(pod: &mut Pod) {
    pod.metadata.managed_fields = None;
    if let Some(spec) = pod.spec.take() {
        pod.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: spec.node_name,
            affinity: spec.affinity,
            ..Default::default()
        });
    }
    if let Some(status) = pod.status.take() {
        pod.status = Some(k8s_openapi::api::core::v1::PodStatus {
            conditions: status.conditions,
            pod_ip: status.pod_ip,
            phase: status.phase,
            ..Default::default()
        });
    }
}

/// The objects of an owned kind whose status changes often (a disruption budget's, with every
/// pod that becomes healthy) that a pass must look at: new ones, spec changes (a new
/// `generation` or `uid`), deletions. kube's generation predicate would also drop a deletion
/// that leaves the generation as it was, and a deleted budget must be made again.
fn spec_changes<K>(
    events: impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
) -> impl futures::Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: kube::Resource<DynamicType = ()> + Clone + Send + 'static,
{
    let mut seen: std::collections::HashMap<ObjectRef<K>, (Option<String>, Option<i64>)> = Default::default();
    events.filter_map(move |event| {
        let changed = match event {
            Err(e) => Some(Err(e)),
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                let version = (object.meta().uid.clone(), object.meta().generation);
                (seen.insert(ObjectRef::from_obj(&object), version.clone()) != Some(version)).then_some(Ok(object))
            }
            Ok(watcher::Event::Delete(object)) => {
                seen.remove(&ObjectRef::from_obj(&object));
                Some(Ok(object))
            }
            Ok(watcher::Event::Init | watcher::Event::InitDone) => None,
        };
        std::future::ready(changed)
    })
}

/// Whether the DaemonSet with `uid` is `pod`'s controller (no DaemonSet: no pod is ours).
fn controlled_by(pod: &Pod, daemon_set_uid: Option<&str>) -> bool {
    let Some(uid) = daemon_set_uid else { return false };
    pod.owner_references().iter().any(|o| o.controller == Some(true) && o.kind == "DaemonSet" && o.uid == uid)
}

/// The label selector of a GonkaNode's pods.
pub(crate) fn pod_selector(gn: &GonkaNode) -> String {
    build::selector_labels(gn).iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

/// Why a Secret a GonkaNode names could not be read; RBAC's refusal says what the admin can do
/// (the chart grants Secrets per namespace).
fn secret_read_error(namespace: &str, name: &str, field: &str, error: kube::Error) -> String {
    match error {
        kube::Error::Api(status) if status.code == 403 => format!(
            "the operator may not read Secrets in namespace {namespace} (spec.networkNode.{field}: {name}): the \
             cluster admin lists the namespace in the chart's secretNamespaces"
        ),
        e => format!("reading Secret {name} (spec.networkNode.{field}): {e}"),
    }
}

/// The Secret `spec.networkNode.<field>` names, in the GonkaNode's namespace, once its owner
/// opted in (the label): naming a Secret must not make the operator use one its author may not
/// read.
async fn opted_in_secret(gn: &GonkaNode, ctx: &Context, name: &str, field: &str) -> Result<Secret, String> {
    let namespace = gn.namespace().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = secrets
        .get_opt(name)
        .await
        .map_err(|e| secret_read_error(&namespace, name, field, e))?
        .ok_or_else(|| format!("Secret {name} (spec.networkNode.{field}) does not exist"))?;
    if secret.labels().get(CREDENTIALS_LABEL).map(String::as_str) != Some("true") {
        return Err(format!(
            "Secret {name} (spec.networkNode.{field}) is not labelled {CREDENTIALS_LABEL}=true: its owner must opt in \
             before the operator uses it"
        ));
    }
    Ok(secret)
}

/// The mutual-TLS Secret `spec.networkNode.mtlsSecretRef` names, if any: it must exist, carry its
/// owner's opt-in label (naming a Secret must not get it mounted into pods whose image the
/// GonkaNode's author picks) and hold upstream's three files. Its digest rolls the pods when
/// the pair changes.
async fn mtls_secret(gn: &GonkaNode, ctx: &Context) -> Result<Option<MtlsSecret>, String> {
    let Some(secret_ref) = &gn.spec.network_node.mtls_secret_ref else { return Ok(None) };
    let name = &secret_ref.name;
    let secret = opted_in_secret(gn, ctx, name, "mtlsSecretRef").await?;
    let data = secret.data.unwrap_or_default();
    let mut digest = Sha256::new();
    for file in MTLS_FILES {
        let value = data.get(file).filter(|v| !v.0.is_empty()).ok_or_else(|| {
            format!(
                "Secret {name} (spec.networkNode.mtlsSecretRef) has no `{file}`: it needs the files of upstream's \
                 gen-mlnode-certs.sh, {}",
                MTLS_FILES.join(", ")
            )
        })?;
        digest.update(file.as_bytes());
        digest.update((value.0.len() as u64).to_le_bytes());
        digest.update(&value.0);
    }
    Ok(Some(MtlsSecret { name: name.clone(), digest: hex::encode(&digest.finalize()[..8]) }))
}

/// The bearer token for the admin API, from `spec.networkNode.credentialsSecretRef` (key
/// `token`), if one is referenced. Refused, before anything is read or sent, when the token
/// would cross plain http without `allowPlaintextCredentials`; refused when the Secret lacks
/// its owner's opt-in label (a GonkaNode's author may not be allowed to read it: the operator
/// must not become the way to).
async fn admin_token(gn: &GonkaNode, ctx: &Context) -> Result<Option<String>, String> {
    let network = &gn.spec.network_node;
    let Some(secret_ref) = &network.credentials_secret_ref else { return Ok(None) };
    if network.admin_url.starts_with("http://") && !network.allow_plaintext_credentials {
        return Err(format!(
            "the credentials of Secret {} are not sent over plain http to {}: use an https adminUrl, or set \
             spec.networkNode.allowPlaintextCredentials on a network you trust",
            secret_ref.name, network.admin_url
        ));
    }
    let secret = opted_in_secret(gn, ctx, &secret_ref.name, "credentialsSecretRef").await?;
    let token = secret
        .data
        .and_then(|d| d.get("token").cloned())
        .ok_or_else(|| format!("Secret {} has no key `token`", secret_ref.name))?;
    String::from_utf8(token.0).map(|t| Some(t.trim().to_string())).map_err(|_| "the token is not UTF-8".into())
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum RolloutStep {
    /// No pod runs an old spec (or rollouts are not held: the DaemonSet rolls by itself).
    Idle,
    /// Pods are being replaced.
    Replacing,
    /// Outdated pods wait, and why.
    Held(String),
}

/// Replaces outdated pods outside PoC windows (`OnDelete` DaemonSets only): reads the epoch
/// phase, disables each chosen ML node on the network node, then deletes its pod; the
/// DaemonSet controller starts the new one and the registration pass enables it again.
async fn drive_rollout(
    gn: &GonkaNode,
    ctx: &Context,
    ds: &DaemonSet,
    pods: &[Pod],
    epoch: Option<&Result<EpochResponse, NetworkNodeError>>,
) -> RolloutStep {
    let (Some(epoch), Some(desired)) = (epoch, build::template_hash(ds)) else {
        return RolloutStep::Idle;
    };
    if gn.spec.paused {
        return RolloutStep::Idle;
    }
    let view: Vec<RolloutPod> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let node = ml_node_pod(p)?;
            Some(RolloutPod {
                name: p.name_any(),
                kubernetes_node: node.kubernetes_node,
                template_hash: p.annotations().get(build::ANNOTATION_TEMPLATE_HASH).cloned(),
                ready: node.ready,
            })
        })
        .collect();
    let tolerated = status::tolerated_unavailable(Some(&gn.spec.update_strategy.max_unavailable), view.len() as i32);
    let (outdated, pick) = rollout::replacements(&view, desired, tolerated);
    if outdated == 0 {
        return RolloutStep::Idle;
    }
    let epoch = match epoch {
        Ok(e) => e,
        Err(e) => return RolloutStep::Held(format!("{outdated} ML nodes wait: the epoch phase is unknown ({e})")),
    };
    if epoch.poc_window() {
        let confirmation = if epoch.is_confirmation_poc_active { ", confirmation PoC active" } else { "" };
        return RolloutStep::Held(format!(
            "{outdated} ML nodes wait for the PoC window to end (epoch {} phase {:?}{confirmation})",
            epoch.latest_epoch.index, epoch.phase
        ));
    }
    if pick.is_empty() {
        return RolloutStep::Replacing; // waiting for replaced pods to come up
    }
    // No pod is replaced unless its ML node could be disabled first.
    let network = match admin_token(gn, ctx)
        .await
        .and_then(|token| NetworkNode::of(&gn.spec.network_node, token).map_err(|e| e.to_string()))
    {
        Ok(n) => n,
        Err(why) => {
            return RolloutStep::Held(format!("{outdated} ML nodes wait: their ML nodes can't be disabled ({why})"));
        }
    };
    let namespace = gn.namespace().unwrap_or_default();
    let mut replaced = Vec::new();
    for pod in pick {
        let id = network_node::ml_node_id(&gn.namespace().unwrap_or_default(), &gn.name_any(), &pod.kubernetes_node);
        // Disable first so the network node stops routing work to it; a node it doesn't know
        // (never registered) is fine to replace, an unreachable network node is not.
        match network.set_enabled(&id, false).await {
            Ok(()) | Err(NetworkNodeError::Rejected { status: 404, .. }) => {}
            Err(e) => return RolloutStep::Held(format!("{outdated} ML nodes wait: disabling {id} failed ({e})")),
        }
        if let Err(e) = ctx.writer.delete_pod(&namespace, &pod.name).await {
            warn!(pod = %pod.name, error = %e, "could not delete an outdated ML-node pod");
            continue;
        }
        replaced.push(pod.name.clone());
    }
    if !replaced.is_empty() {
        let note = format!("replacing outdated ML-node pods outside the PoC window: {}", replaced.join(", "));
        ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Replacing", note).await;
    }
    RolloutStep::Replacing
}

/// One registration pass: compare the GonkaNode's pods with the network node's registrations
/// and change what differs. Writes go to the network node only.
async fn register(
    gn: &GonkaNode,
    ctx: &Context,
    pods: &[registration::MlNodePod],
    pods_expected: usize,
) -> Registration {
    let ready = pods.iter().filter(|p| p.ready && !p.terminating && p.pod_ip.is_some()).count() as i32;
    let token = match admin_token(gn, ctx).await {
        Ok(t) => t,
        Err(why) => return Registration::CredentialsRefused(why),
    };
    let network_node = match NetworkNode::of(&gn.spec.network_node, token) {
        Ok(n) => n,
        Err(e) => return Registration::Refused(e.to_string()),
    };
    let outcome = async {
        let registered = network_node.nodes().await?;
        let plan = registration::plan(gn, pods, pods_expected, &registered);
        if plan.is_empty() {
            return Ok((registration::registered_count(gn, &registered), plan));
        }
        registration::execute(&network_node, &plan).await?;
        let registered = network_node.nodes().await?;
        Ok::<_, NetworkNodeError>((registration::registered_count(gn, &registered), plan))
    }
    .await;
    match outcome {
        Ok((count, plan)) => {
            announce_registration(gn, ctx, &plan).await;
            Registration::Synced {
                registered: count as i32,
                ready,
                paused: gn.spec.paused,
                departing: registration::departing_counts(pods),
            }
        }
        Err(e) if e.is_outage() => Registration::Unreachable(e.to_string()),
        Err(e) => {
            ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "RegistrationRefused", e.to_string()).await;
            Registration::Refused(e.to_string())
        }
    }
}

async fn announce_registration(gn: &GonkaNode, ctx: &Context, plan: &registration::Plan) {
    let lists = [
        ("Registered", &plan.registered_ids()),
        ("Deregistered", &plan.delete),
        ("Disabled", &plan.disable),
        ("Enabled", &plan.enable),
    ];
    for (reason, ids) in lists {
        if !ids.is_empty() {
            let note = format!("ML nodes on the network node: {}", ids.join(", "));
            ctx.writer.event(&ctx.recorder, gn, EventType::Normal, reason, note).await;
        }
    }
}

/// What the reports of a GonkaNode's pods tell registration and status.
struct PodReports {
    fleet: report_store::Fleet,
    /// By pod name, the hardware each ML node reported.
    hardware: std::collections::BTreeMap<String, Vec<gonka_protocol::admin::Hardware>>,
    /// Pods whose ML node has yielded its GPUs to other work (opportunistic mode).
    yielded: BTreeSet<String>,
}

/// The reports of `gn`'s pods. Forgets reports of pods that are gone.
fn read_reports(gn: &GonkaNode, ctx: &Context, pods: &[Pod]) -> PodReports {
    let key = (gn.namespace().unwrap_or_default(), gn.name_any());
    let existing = pods.iter().map(ResourceExt::name_any).collect();
    ctx.reports.prune(&key, &existing);
    let reports = ctx.reports.of(&key);
    let refs: Vec<report_store::PodRef> = pods
        .iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            Some(report_store::PodRef { name: p.name_any(), kubernetes_node: node })
        })
        .collect();
    let previous = gn.status.as_ref().map(|s| s.ml_nodes.as_slice()).unwrap_or_default();
    let hardware = reports
        .iter()
        .filter_map(|(pod, r)| Some((pod.clone(), report_store::hardware(r.snapshot.as_ref()?))))
        .collect();
    let yielded = reports
        .iter()
        .filter(|(_, r)| r.snapshot.as_ref().is_some_and(|s| s.yielded.is_some()))
        .map(|(pod, _)| pod.clone())
        .collect();
    PodReports { fleet: report_store::fleet(&refs, &reports, previous), hardware, yielded }
}

/// What the controller keeps of a Kubernetes node in memory: its name and labels, what tells
/// whether it is going (taints, `unschedulable`, deletion), the GPUs it offers pods, and the
/// PoC-window claims on it (the protections' annotations and field managers, without their
/// field sets); no other status or annotations (a GPU node's status alone is kilobytes).
fn slim_node(node: &mut Node) {
    if let Some(status) = node.status.take() {
        let gpus = status.allocatable.and_then(|a| a.get(gonka_crds::NVIDIA_GPU_RESOURCE).cloned());
        node.status = gpus.map(|g| k8s_openapi::api::core::v1::NodeStatus {
            allocatable: Some([(gonka_crds::NVIDIA_GPU_RESOURCE.to_string(), g)].into()),
            ..Default::default()
        });
    }
    if let Some(annotations) = node.metadata.annotations.as_mut() {
        annotations.retain(|k, _| node_protection::ANNOTATIONS.contains(&k.as_str()));
    }
    if let Some(managed) = node.metadata.managed_fields.as_mut() {
        managed.retain(|m| m.manager.as_deref().is_some_and(|m| m.starts_with(node_protection::FIELD_MANAGER_PREFIX)));
        for m in managed.iter_mut() {
            m.fields_v1 = None;
        }
    }
    if let Some(spec) = node.spec.as_mut() {
        spec.pod_cidr = None;
        spec.pod_cidrs = None;
        spec.provider_id = None;
        spec.config_source = None;
    }
}

/// What of a (slim) node decides something for a GonkaNode: whether it is going, its labels
/// and taints (placement and capacity preferences), its GPUs. A change of any reconciles
/// every GonkaNode; heartbeats and status churn don't.
fn node_fingerprint(node: &Node) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    node_departure::departure(node).hash(&mut h);
    node.metadata.labels.hash(&mut h);
    for t in node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default() {
        (&t.key, &t.value, &t.effect).hash(&mut h);
    }
    let gpus = node.status.as_ref().and_then(|s| s.allocatable.as_ref()?.get(gonka_crds::NVIDIA_GPU_RESOURCE));
    gpus.map(|q| &q.0).hash(&mut h);
    h.finish()
}

/// Writes a protection plan; a refused write is logged and tried again next pass (a window
/// costs nothing while the node is not being removed).
async fn protect_nodes(gn: &GonkaNode, ctx: &Context, manager: &str, plan: &node_protection::Plan) {
    for (nodes, protect) in [(&plan.protect, true), (&plan.lift, false)] {
        for node in nodes {
            match ctx.writer.protect_node(node, manager, protect).await {
                Ok(()) => info!(gonka_node = %gn.name_any(), node, protect, "PoC-window protection of a node"),
                Err(e) => warn!(gonka_node = %gn.name_any(), node, protect, error = %e, "PoC-window protection"),
            }
        }
    }
}

/// A pod as registration needs it, as Kubernetes shows it (no report, its node not looked at).
fn ml_node_pod(pod: &Pod) -> Option<registration::MlNodePod> {
    let kubernetes_node = pod.spec.as_ref()?.node_name.clone()?;
    let status = pod.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    Some(registration::MlNodePod {
        pod_ip: status.and_then(|s| s.pod_ip.clone()),
        ready,
        kubernetes_node,
        hardware: None,
        departing: None,
        terminating: pod.metadata.deletion_timestamp.is_some(),
        yielded: false,
    })
}

/// The Kubernetes node a DaemonSet pod is made for: the DaemonSet controller pins each pod to
/// its node with a required `metadata.name` node affinity (bound or not).
pub fn daemon_pod_target_node(pod: &Pod) -> Option<String> {
    let affinity = pod.spec.as_ref()?.affinity.as_ref()?.node_affinity.as_ref()?;
    let required = affinity.required_during_scheduling_ignored_during_execution.as_ref()?;
    required.node_selector_terms.iter().find_map(|t| {
        t.match_fields.as_ref()?.iter().find(|f| f.key == "metadata.name")?.values.as_ref()?.first().cloned()
    })
}

/// ML-node pods the scheduler could not place, as `"<Kubernetes node>: <scheduler's reason>"`.
fn unschedulable_ml_nodes(pods: &[Pod]) -> Vec<String> {
    pods.iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| p.spec.as_ref().is_some_and(|s| s.node_name.is_none()))
        .filter_map(|p| {
            let conditions = p.status.as_ref()?.conditions.as_ref()?;
            let scheduled = conditions.iter().find(|c| c.type_ == "PodScheduled")?;
            if scheduled.status != "False" || scheduled.reason.as_deref() != Some("Unschedulable") {
                return None;
            }
            let target = daemon_pod_target_node(p).unwrap_or_else(|| p.name_any());
            Some(format!("{target}: {}", scheduled.message.as_deref().unwrap_or("no reason given")))
        })
        .collect()
}

/// Events for condition changes a user should see in `kubectl describe`.
async fn announce_transitions(gn: &GonkaNode, ctx: &Context, new: &gonka_crds::GonkaNodeStatus) {
    let previous = gn.status.as_ref();
    let before = |t| status::find(previous, t).map(|c| (c.status.clone(), c.reason.clone()));
    let after = |t| status::find(Some(new), t).map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));

    if let Some((s, reason, message)) = after(condition::DEGRADED) {
        // InvalidSpec and ApplyFailed have their own events.
        let own_event = reason == "InvalidSpec" || reason == "ApplyFailed";
        if s == "True" && !own_event && before(condition::DEGRADED).is_none_or(|(s, r)| s != "True" || r != reason) {
            ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "Degraded", message).await;
        }
    }
    if let Some((_, reason, message)) = after(condition::READY) {
        // Pods the scheduler can't place wait silently otherwise; say so once, when it starts.
        if reason == "MlNodesUnschedulable" && before(condition::READY).is_none_or(|(_, r)| r != reason) {
            ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "MlNodesUnschedulable", message).await;
        }
    }
    if let Some((_, reason, message)) = after(condition::PROGRESSING) {
        let was_paused = before(condition::PROGRESSING).is_some_and(|(_, r)| r == "Paused");
        if reason == "Paused" && !was_paused {
            ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Paused", message).await;
        } else if reason != "Paused" && was_paused {
            ctx.writer
                .event(
                    &ctx.recorder,
                    gn,
                    EventType::Normal,
                    "Resumed",
                    "spec.paused is false: changes roll out again".into(),
                )
                .await;
        }
    }
}

/// Annotation that lets a GonkaNode go without deregistering (the network node is gone for good).
pub const SKIP_DEREGISTRATION: &str = "gonka.ai/skip-deregistration";

/// Runs before a GonkaNode goes away: every ML node it registered is removed from the network
/// node first. While the network node is unreachable the GonkaNode stays (Terminating) and
/// this is retried, unless annotated `gonka.ai/skip-deregistration: "true"`.
async fn cleanup(gn: &GonkaNode, ctx: &Context) -> Result<Action, Error> {
    let key = (gn.namespace().unwrap_or_default(), gn.name_any());
    // Nothing keyed by a GonkaNode outlives it.
    ctx.reports.prune(&key, &BTreeSet::new());
    ctx.metrics.fleet.forget(&fleet_labels(gn));
    ctx.forget_network_retries(&key);
    // No PoC-window claim outlives it either.
    let nodes = ctx.kubernetes_nodes().await;
    let known = nodes.state();
    let manager = node_protection::field_manager(gn);
    let plan = node_protection::plan(false, &BTreeSet::new(), known.iter().map(AsRef::as_ref), &manager);
    protect_nodes(gn, ctx, &manager, &plan).await;
    let skip = gn.annotations().get(SKIP_DEREGISTRATION).is_some_and(|v| v == "true");
    if !skip {
        let token = admin_token(gn, ctx).await.map_err(Error::Deregistration)?;
        let network_node =
            NetworkNode::of(&gn.spec.network_node, token).map_err(|e| Error::Deregistration(e.to_string()))?;
        let outcome = async {
            let prefix = registration::id_prefix(gn);
            let ids: Vec<String> = network_node
                .nodes()
                .await?
                .into_iter()
                .map(|r| r.node.config.id)
                .filter(|id| id.starts_with(&prefix))
                .collect();
            for id in &ids {
                network_node.delete(id).await?;
            }
            Ok::<_, NetworkNodeError>(ids)
        }
        .await;
        match outcome {
            Ok(ids) if !ids.is_empty() => {
                let note = format!("ML nodes removed from the network node: {}", ids.join(", "));
                ctx.writer.event(&ctx.recorder, gn, EventType::Normal, "Deregistered", note).await;
            }
            Ok(_) => {}
            Err(e) => {
                let note =
                    format!("{e}; the GonkaNode stays until this succeeds (or annotate {SKIP_DEREGISTRATION}=true)");
                ctx.writer.event(&ctx.recorder, gn, EventType::Warning, "DeregistrationFailed", note).await;
                return Err(Error::Deregistration(e.to_string()));
            }
        }
    }
    // No capacity label outlives it either; taken off once the network node has let its ML
    // nodes go (the DaemonSet, still there until garbage collection, deletes their pods).
    if let Some(label) = capacity::label_key(gn) {
        let known = nodes.state();
        leave_nodes(gn, ctx, &capacity::labelled(known.iter().map(AsRef::as_ref), &label)).await;
    }
    ctx.writer
        .event(
            &ctx.recorder,
            gn,
            EventType::Normal,
            "Deleting",
            "owned DaemonSet, ConfigMap, Service and ServiceAccount go by garbage collection".into(),
        )
        .await;
    Ok(Action::await_change())
}

fn error_policy(gn: Arc<GonkaNode>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.reconcile_failed(error.metric_label());
    warn!(gonka_node = %gn.name_any(), error = %error, "reconcile failed; retrying");
    Action::requeue(ctx.config.retry)
}

/// Runs the controller until `stop` is cancelled, then lets running reconciles finish.
pub async fn run(ctx: Arc<Context>, stop: CancellationToken) {
    let client = ctx.client.clone();
    let namespace = ctx.config.namespace.clone();
    let api = |c: &Client| -> Api<GonkaNode> {
        match &namespace {
            Some(ns) => Api::namespaced(c.clone(), ns),
            None => Api::all(c.clone()),
        }
    };
    fn owned<K>(client: &Client, namespace: &Option<String>) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }

    // Status writes don't change generation and must not trigger a reconcile of their own;
    // finalizer changes must (the helper adds the finalizer, then waits for the next event).
    let (reader, writer) = reflector::store();
    let gonka_nodes = watcher(api(&client), watcher::Config::default().any_semantic())
        .default_backoff()
        .reflect(writer)
        .applied_objects()
        .predicate_filter(predicates::generation.combine(predicates::finalizers), Default::default());
    // Watch only our own objects: a cluster's DaemonSets and ConfigMaps are not our business.
    let ours = watcher::Config::default().labels(&format!("{LABEL_MANAGED_BY}={MANAGER}"));

    let flusher = {
        let (reports, every, stop) = (ctx.reports.clone(), ctx.config.report_flush, stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => reports.flush(),
                }
            }
        })
    };
    let every_gonka_node = reader.clone();
    // The Kubernetes nodes, kept in memory with only what a GonkaNode decides on; a change of
    // that (a cordon, an autoscaler's taint, a deletion, a node joining, labels) reconciles
    // every GonkaNode.
    let node_writer = ctx.node_writer.lock().expect("node writer").take().expect("run once per context");
    let departures = watcher(Api::<Node>::all(client.clone()), watcher::Config::default().any_semantic())
        .default_backoff()
        .modify(slim_node)
        .reflect(node_writer)
        .touched_objects()
        .predicate_filter(|node: &Node| Some(node_fingerprint(node)), Default::default());
    // The owned objects, kept in the writer's stores (it compares with them rather than reading
    // each object before applying); a change to one reconciles its GonkaNode.
    let stores = ctx.owned_writers.lock().expect("owned writers").take().expect("run once per context");
    fn reflected<K>(
        api: Api<K>,
        config: &watcher::Config,
        writer: reflector::store::Writer<K>,
    ) -> impl futures::Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        watcher(api, config.clone()).default_backoff().reflect(writer)
    }
    let pod_writer = ctx.pod_writer.lock().expect("pod writer").take().expect("run once per context");
    Controller::for_stream(gonka_nodes, reader)
        // The DaemonSet's status (pods scheduled, ready) is what status reports: every change.
        .owns_stream(reflected(owned::<DaemonSet>(&client, &namespace), &ours, stores.daemon_sets).touched_objects())
        .owns_stream(reflected(owned::<ConfigMap>(&client, &namespace), &ours, stores.config_maps).touched_objects())
        .owns_stream(reflected(owned::<Service>(&client, &namespace), &ours, stores.services).touched_objects())
        .owns_stream(
            reflected(owned::<ServiceAccount>(&client, &namespace), &ours, stores.service_accounts).touched_objects(),
        )
        // A budget's status changes with every pod that becomes healthy, which the pod watch
        // already reports: only a new, edited or deleted policy or budget is a reason to look.
        .owns_stream(spec_changes(reflected(
            owned::<NetworkPolicy>(&client, &namespace),
            &ours,
            stores.network_policies,
        )))
        .owns_stream(spec_changes(reflected(
            owned::<PodDisruptionBudget>(&client, &namespace),
            &ours,
            stores.disruption_budgets,
        )))
        // Pods belong to the DaemonSet, not to us; their label names the GonkaNode. Kept slim in
        // the store every pass reads them from.
        .watches_stream(
            watcher(owned::<Pod>(&client, &namespace), ours)
                .default_backoff()
                .modify(slim_pod)
                .reflect(pod_writer)
                .touched_objects(),
            |pod: Pod| {
                let name = pod.labels().get(LABEL_GONKA_NODE)?.clone();
                Some(ObjectRef::new(&name).within(&pod.namespace()?))
            },
        )
        // A node coming, going or changing what it offers: every GonkaNode looks again; such
        // changes are rare, GonkaNodes few.
        .watches_stream(departures, move |_| {
            every_gonka_node.state().iter().map(|gn| ObjectRef::from_obj(gn.as_ref())).collect::<Vec<_>>()
        })
        // Reports that change what status says reconcile their GonkaNode at once.
        .reconcile_on(tokio_stream::wrappers::ReceiverStream::new(ctx.reports.changes()))
        .with_config(controller::Config::default().concurrency(ctx.config.concurrency).debounce(ctx.config.debounce))
        .graceful_shutdown_on(stop.cancelled_owned())
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "controller event");
            }
        })
        .await;
    flusher.abort();
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn the_next_pass_comes_as_soon_as_something_no_watch_reports_can_change() {
        let config = ControllerConfig::default();
        let backoff = Duration::from_secs(7);
        let next = |pass: Pass| next_pass(&pass, &config, || backoff);
        let steady = Pass { rollout_idle: true, ..Pass::default() };
        assert_eq!(next(steady), Action::requeue(config.resync), "a steady fleet: the resync");
        assert_eq!(next(Pass { epoch_followed: true, ..steady }), Action::requeue(config.rollout_recheck));
        assert_eq!(next(Pass { rollout_idle: false, ..steady }), Action::requeue(config.rollout_recheck));
        assert_eq!(next(Pass { network_node_failed: true, epoch_followed: true, ..steady }), Action::requeue(backoff));
        assert_eq!(next(Pass { invalid_spec: true, ..steady }), Action::await_change(), "only an edit helps");
        assert_eq!(
            next(Pass { invalid_spec: true, epoch_followed: true, ..steady }),
            Action::requeue(config.rollout_recheck),
            "the budget still follows the windows"
        );
        assert_eq!(
            next(Pass { invalid_spec: true, secret_refused: true, ..steady }),
            Action::requeue(backoff),
            "a Secret gets better without an edit"
        );
        assert!(config.rollout_recheck < config.resync && backoff != config.rollout_recheck);
    }

    #[test]
    fn the_ml_node_view_tells_going_and_leaving_nodes_and_what_the_daemons_reported() {
        use serde_json::json;
        let pod = |node: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": format!("h100-ml-node-{node}")},
                                          "spec": {"nodeName": node},
                                          "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": "True"}]}}))
            .unwrap()
        };
        let unbound: Pod = serde_json::from_value(json!({"metadata": {"name": "h100-ml-node-x"}})).unwrap();
        let (nodes, mut writer) = reflector::store::<Node>();
        let cordoned: Node =
            serde_json::from_value(json!({"metadata": {"name": "gpu-b"}, "spec": {"unschedulable": true}})).unwrap();
        writer.apply_watcher_event(&watcher::Event::Apply(cordoned));
        let reports = PodReports {
            fleet: Default::default(),
            hardware: [("h100-ml-node-gpu-a".to_string(), Vec::new())].into(),
            yielded: ["h100-ml-node-gpu-c".to_string()].into(),
        };
        let leaving = BTreeSet::from(["gpu-c"]);
        let view = ml_node_view(&[pod("gpu-a"), pod("gpu-b"), pod("gpu-c"), unbound], &reports, &nodes, &leaving);
        let seen: Vec<_> =
            view.iter().map(|p| (p.kubernetes_node.as_str(), p.hardware.is_some(), p.yielded, p.departing)).collect();
        assert_eq!(
            seen,
            [
                ("gpu-a", true, false, None),
                ("gpu-b", false, false, node_departure::departure(&nodes.get(&ObjectRef::new("gpu-b")).unwrap())),
                ("gpu-c", false, true, Some(Departure::OverCapacity)),
            ]
        );
        assert!(seen[1].3.is_some(), "a cordoned node is going");
    }

    #[tokio::test]
    async fn a_budgets_status_changes_reconcile_nothing_its_spec_and_deletion_do() {
        use serde_json::json;
        let pdb = |uid: &str, generation: i64, healthy: i32| -> PodDisruptionBudget {
            serde_json::from_value(json!({"metadata": {"name": "h100-ml-nodes", "namespace": "gpu", "uid": uid, "generation": generation},
                                          "status": {"currentHealthy": healthy, "desiredHealthy": 0, "disruptionsAllowed": 0, "expectedPods": 2}}))
            .unwrap()
        };
        let events = vec![
            watcher::Event::Init,
            watcher::Event::InitApply(pdb("u1", 1, 0)),
            watcher::Event::InitDone,
            watcher::Event::Apply(pdb("u1", 1, 1)), // a pod became healthy
            watcher::Event::Apply(pdb("u1", 1, 2)),
            watcher::Event::Apply(pdb("u1", 2, 2)), // someone edited the spec
            watcher::Event::Delete(pdb("u1", 2, 2)),
            watcher::Event::Apply(pdb("u2", 1, 0)), // made again: same generation, new uid
            watcher::Event::Init,                   // the watch restarted: nothing changed meanwhile
            watcher::Event::InitApply(pdb("u2", 1, 1)),
            watcher::Event::InitDone,
        ];
        let passed: Vec<(String, i64, i32)> = spec_changes(futures::stream::iter(events.into_iter().map(Ok)))
            .map(|p| {
                let p = p.unwrap();
                (p.metadata.uid.unwrap(), p.metadata.generation.unwrap(), p.status.unwrap().current_healthy)
            })
            .collect()
            .await;
        assert_eq!(
            passed,
            [("u1".into(), 1, 0), ("u1".into(), 2, 2), ("u1".into(), 2, 2), ("u2".into(), 1, 0)],
            "new, edited, deleted, made again"
        );
    }

    #[test]
    fn a_slim_pod_tells_registration_rollouts_and_status_what_the_whole_one_does() {
        use serde_json::json;
        let whole: Pod = serde_json::from_value(json!({
            "metadata": {"name": "h100-ml-node-x1", "namespace": "gpu", "deletionTimestamp": "2026-12-04T10:00:00Z",
                         "labels": {"app.kubernetes.io/instance": "h100"},
                         "annotations": {build::ANNOTATION_TEMPLATE_HASH: "abc"},
                         "managedFields": [{"manager": "kubelet", "operation": "Update"}],
                         "ownerReferences": [{"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "h100-ml-node", "uid": "ds-1", "controller": true}]},
            "spec": {"nodeName": "gpu-a",
                     "containers": [{"name": "node-daemon", "image": "registry.test/daemon:1", "env": [{"name": "A", "value": "1"}]}],
                     "volumes": [{"name": "models", "hostPath": {"path": "/srv/models"}}],
                     "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                         {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["gpu-a"]}]}]}}}},
            "status": {"podIP": "10.244.0.12", "phase": "Running",
                       "conditions": [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}],
                       "containerStatuses": [{"name": "node-daemon", "image": "i", "imageID": "x", "ready": true, "restartCount": 0}]}
        }))
        .unwrap();
        let mut slim = whole.clone();
        slim_pod(&mut slim);
        assert_eq!(ml_node_pod(&slim), ml_node_pod(&whole));
        assert!(
            ml_node_pod(&slim).is_some_and(|p| p.ready && p.terminating && p.pod_ip.as_deref() == Some("10.244.0.12"))
        );
        assert_eq!(daemon_pod_target_node(&slim).as_deref(), Some("gpu-a"));
        assert!(controlled_by(&slim, Some("ds-1")));
        assert_eq!(slim.annotations(), whole.annotations());
        assert_eq!(slim.labels(), whole.labels());
        let spec = slim.spec.as_ref().unwrap();
        assert!(spec.containers.is_empty() && spec.volumes.is_none() && slim.metadata.managed_fields.is_none());
        assert!(slim.status.as_ref().unwrap().container_statuses.is_none());
    }

    #[tokio::test]
    async fn a_pass_reads_only_its_own_gonka_nodes_pods_and_none_before_the_watch_has_listed() {
        use serde_json::json;
        let (service, _handle) =
            tower_test::mock::pair::<http::Request<kube::client::Body>, http::Response<kube::client::Body>>();
        let ctx = Context::new(Client::new(service, "default"), ControllerConfig::default(), Metrics::default());
        let pod = |name: &str, namespace: &str, instance: &str| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace,
                "labels": {"app.kubernetes.io/name": "gonka-ml-node", "app.kubernetes.io/instance": instance}}}))
            .unwrap()
        };
        let gn = crate::test_fixtures::gonka_node("h100", |_| {});
        tokio::time::pause();
        // Not listed: no answer rather than an empty fleet (30 s, skipped by the paused clock).
        assert!(ctx.pods_of(&gn).await.is_none());
        ctx.pods_listed(vec![
            pod("h100-ml-node-a", "gpu", "h100"),
            pod("h100-ml-node-b", "other", "h100"),
            pod("h200-ml-node-a", "gpu", "h200"),
        ]);
        let names: Vec<String> = ctx.pods_of(&gn).await.unwrap().iter().map(ResourceExt::name_any).collect();
        assert_eq!(names, ["h100-ml-node-a"]);
    }

    #[test]
    fn pods_are_ours_only_under_the_daemon_sets_controller_reference() {
        use serde_json::json;
        let pod = |owner: serde_json::Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p", "ownerReferences": owner}})).unwrap()
        };
        let reference = |kind: &str, uid: &str, controller: bool| json!([{"apiVersion": "apps/v1", "kind": kind, "name": "h100-ml-node", "uid": uid, "controller": controller}]);
        assert!(controlled_by(&pod(reference("DaemonSet", "ds-1", true)), Some("ds-1")));
        assert!(!controlled_by(&pod(reference("DaemonSet", "ds-1", true)), None), "no DaemonSet, no pods");
        assert!(!controlled_by(&pod(reference("DaemonSet", "ds-2", true)), Some("ds-1")), "another DaemonSet");
        assert!(!controlled_by(&pod(reference("DaemonSet", "ds-1", false)), Some("ds-1")), "not its controller");
        assert!(!controlled_by(&pod(reference("ReplicaSet", "ds-1", true)), Some("ds-1")));
        assert!(!controlled_by(&pod(json!([])), Some("ds-1")), "a bare pod with the labels");
    }

    #[test]
    fn unschedulable_pods_are_named_by_their_target_node_with_the_schedulers_reason() {
        let pod = |name: &str, target: &str, bound: bool, scheduled: serde_json::Value| -> Pod {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {
                    "containers": [{"name": "node-daemon"}],
                    "nodeName": if bound { serde_json::json!(target) } else { serde_json::Value::Null },
                    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [{"matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": [target]}]}]}}},
                },
                "status": {"phase": "Pending", "conditions": [scheduled]},
            }))
            .unwrap()
        };
        let refused = serde_json::json!({"type": "PodScheduled", "status": "False", "reason": "Unschedulable",
            "message": "0/4 nodes are available: 1 Insufficient nvidia.com/gpu."});
        let pods = [
            pod("fleet-x1", "gpu-small", false, refused.clone()),
            pod("fleet-x2", "gpu-a", true, serde_json::json!({"type": "PodScheduled", "status": "True"})),
            // Not yet looked at by the scheduler: waiting, not refused.
            pod(
                "fleet-x3",
                "gpu-b",
                false,
                serde_json::json!({"type": "PodScheduled", "status": "False", "reason": "SchedulerError"}),
            ),
        ];
        assert_eq!(
            unschedulable_ml_nodes(&pods),
            ["gpu-small: 0/4 nodes are available: 1 Insufficient nvidia.com/gpu."]
        );
    }

    #[test]
    fn a_slim_node_still_tells_its_departure_and_our_claims() {
        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "gpu-a",
                "labels": {"a": "b"},
                "annotations": {"c": "d", "karpenter.sh/do-not-disrupt": "true"},
                "managedFields": [
                    {"manager": "kubelet", "operation": "Update", "fieldsV1": {"f:status": {}}},
                    {"manager": "gonka-operator/poc-window/uid-1", "operation": "Apply", "fieldsV1": {"f:metadata": {}}},
                ],
            },
            "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "value": "1", "effect": "NoSchedule"}],
                     "podCIDR": "10.0.0.0/24", "providerID": "aws:///i-1"},
            "status": {"capacity": {"nvidia.com/gpu": "8"}, "allocatable": {"nvidia.com/gpu": "8", "cpu": "64"},
                       "images": [{"names": ["a"], "sizeBytes": 1}]},
        }))
        .unwrap();
        let fingerprint = node_fingerprint(&node);
        slim_node(&mut node);
        assert_eq!(node_fingerprint(&node), fingerprint, "what decides survives the slimming");
        let status = node.status.as_ref().unwrap();
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            serde_json::json!({"allocatable": {"nvidia.com/gpu": "8"}}),
            "of the status, the GPUs pods may take"
        );
        assert_eq!(node.metadata.labels.as_ref().unwrap()["a"], "b", "labels decide placement and preference");
        assert_eq!(
            node.metadata.annotations.as_ref().unwrap().keys().collect::<Vec<_>>(),
            ["karpenter.sh/do-not-disrupt"]
        );
        let managed = node.metadata.managed_fields.as_ref().unwrap();
        assert_eq!(managed.len(), 1);
        assert_eq!(
            (managed[0].manager.as_deref(), managed[0].fields_v1.is_none()),
            (Some("gonka-operator/poc-window/uid-1"), true)
        );
        assert_eq!(node_departure::departure(&node), Some(node_departure::Departure::ScaleDown));
        let claimed = node_protection::plan(false, &BTreeSet::new(), [&node], "gonka-operator/poc-window/uid-1");
        assert_eq!(claimed.lift, ["gpu-a"], "our claim survives the slimming");

        // A heartbeat's kind of change does not reconcile; a new label or GPU count does.
        let mut beat = node.clone();
        beat.metadata.resource_version = Some("2".into());
        assert_eq!(node_fingerprint(&beat), fingerprint);
        let mut relabelled = node.clone();
        relabelled.metadata.labels.as_mut().unwrap().insert("pool".into(), "owned".into());
        assert_ne!(node_fingerprint(&relabelled), fingerprint);
        let mut fewer = node.clone();
        fewer
            .status
            .as_mut()
            .unwrap()
            .allocatable
            .as_mut()
            .unwrap()
            .insert("nvidia.com/gpu".into(), Quantity("4".into()));
        assert_ne!(node_fingerprint(&fewer), fingerprint);
    }

    #[test]
    fn an_unreachable_network_node_is_retried_less_and_less_often() {
        let (base, cap) = (Duration::from_secs(15), Duration::from_secs(300));
        let delays: Vec<u64> = (0..7).map(|n| retry_delay(base, cap, n).as_secs()).collect();
        assert_eq!(delays, [15, 30, 60, 120, 240, 300, 300]);
        assert_eq!(retry_delay(base, cap, u32::MAX), cap, "no overflow");
    }
}
