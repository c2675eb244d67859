//! Prometheus metrics, served on `/metrics` in the OpenMetrics text format.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// Stable name of the error kind (`Error::metric_label`).
    pub error: String,
}

/// The operator's metrics. Cheap to clone; all clones update the same registry.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Arc<Registry>,
    pub reconciles: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    pub leader: Gauge<i64, AtomicI64>,
    pub report_streams: Gauge<i64, AtomicI64>,
    pub gpu_xids: Family<XidLabels, Counter>,
    /// GonkaNodes whose epoch phase has been unreadable past the hold limit: evictions are
    /// tolerated again without knowing whether a PoC window is on.
    pub poc_window_unknown: Gauge<i64, AtomicI64>,
    /// Requests this replica sent to the apiserver, by verb (see [`ApiRequests`]).
    pub api_requests: ApiRequests,
    /// Each GonkaNode's fleet, what a platform team scales on (see [`Fleet`]).
    pub fleet: Fleet,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FleetLabels {
    /// The GonkaNode's namespace (not `namespace`: scrapes put the operator pod's there).
    pub gonka_node_namespace: String,
    pub gonka_node: String,
}

/// Per GonkaNode, as its last reconcile saw it (the leader's): GPUs joined, GPUs that could
/// join and that the cap keeps idle, the weight of the latest PoC round, whether a PoC window
/// is on. Weight per GPU is `weight / gpus`; the share of time in windows
/// `avg_over_time(poc_window[1d])`.
#[derive(Clone, Debug, Default)]
pub struct Fleet {
    /// GPUs the ML nodes report (`status.totalGpus`).
    pub gpus: Family<FleetLabels, Gauge<i64, AtomicI64>>,
    /// GPUs on eligible nodes: with a cap, `status.capacity.eligible` × `gpusPerMlNode`;
    /// without, the nodes the DaemonSet wants × `gpusPerMlNode` (every eligible node joins).
    pub eligible_gpus: Family<FleetLabels, Gauge<i64, AtomicI64>>,
    /// GPUs on eligible nodes the cap keeps out (`heldBack` × `gpusPerMlNode`): what more
    /// could join.
    pub idle_eligible_gpus: Family<FleetLabels, Gauge<i64, AtomicI64>>,
    /// Valid nonces of the latest PoC round the ML nodes reported (`status.weight`).
    pub weight: Family<FleetLabels, Gauge<i64, AtomicI64>>,
    /// 1 while a PoC window is on (as rollouts and the disruption budget read it).
    pub poc_window: Family<FleetLabels, Gauge<i64, AtomicI64>>,
    /// GPUs of opportunistic ML nodes that have yielded to other work (`status.mlNodes[]`
    /// with `yielded`): the lent GPUs in-house work holds now.
    pub yielded_gpus: Family<FleetLabels, Gauge<i64, AtomicI64>>,
}

impl Fleet {
    fn register(&self, registry: &mut Registry) {
        registry.register("fleet_gpus", "GPUs a GonkaNode's ML nodes report", self.gpus.clone());
        registry.register(
            "fleet_eligible_gpus",
            "GPUs on the Kubernetes nodes a GonkaNode's ML nodes could run on",
            self.eligible_gpus.clone(),
        );
        registry.register(
            "fleet_idle_eligible_gpus",
            "GPUs on eligible nodes a GonkaNode's spec.capacity keeps out",
            self.idle_eligible_gpus.clone(),
        );
        registry.register(
            "fleet_weight",
            "Valid nonces of the latest PoC round a GonkaNode's ML nodes reported",
            self.weight.clone(),
        );
        registry.register(
            "fleet_poc_window",
            "1 while a GonkaNode's network node is in a PoC window",
            self.poc_window.clone(),
        );
        registry.register(
            "fleet_yielded_gpus",
            "GPUs of a GonkaNode's opportunistic ML nodes yielded to other work",
            self.yielded_gpus.clone(),
        );
    }

    /// Records what one reconcile of the GonkaNode `labels` names ended with.
    pub fn observe(
        &self,
        labels: &FleetLabels,
        status: &gonka_crds::GonkaNodeStatus,
        gpus_per_ml_node: i32,
        window: bool,
    ) {
        let per = i64::from(gpus_per_ml_node);
        let (eligible, held_back) = match &status.capacity {
            Some(c) => (i64::from(c.eligible), i64::from(c.held_back)),
            None => (i64::from(status.desired_ml_nodes), 0),
        };
        self.gpus.get_or_create(labels).set(i64::from(status.total_gpus));
        self.eligible_gpus.get_or_create(labels).set(eligible * per);
        self.idle_eligible_gpus.get_or_create(labels).set(held_back * per);
        self.weight.get_or_create(labels).set(status.weight.unwrap_or(0));
        self.poc_window.get_or_create(labels).set(i64::from(window));
        let yielded = status.ml_nodes.iter().filter(|n| n.yielded.is_some()).map(|n| i64::from(n.gpus)).sum();
        self.yielded_gpus.get_or_create(labels).set(yielded);
    }

    /// Drops a deleted GonkaNode's series.
    pub fn forget(&self, labels: &FleetLabels) {
        self.gpus.remove(labels);
        self.eligible_gpus.remove(labels);
        self.idle_eligible_gpus.remove(labels);
        self.weight.remove(labels);
        self.poc_window.remove(labels);
        self.yielded_gpus.remove(labels);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VerbLabels {
    /// `get` (an object or a list), `watch`, `create`, `update`, `patch`, `delete`.
    pub verb: String,
    /// The resource, `daemonsets` or `gonkanodes/status` (a subresource after a slash).
    pub resource: String,
}

/// Counts the apiserver requests of a client built with [`ApiRequests::client`]: what the
/// operator costs the control plane, and whether a steady fleet is really left alone (no writes).
#[derive(Clone, Debug, Default)]
pub struct ApiRequests(pub Family<VerbLabels, Counter>);

impl ApiRequests {
    /// The verb of a request, from its method (and `watch` in the query for a GET).
    pub fn verb(method: &http::Method, query: Option<&str>) -> &'static str {
        match *method {
            http::Method::GET if query.is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1")) => {
                "watch"
            }
            http::Method::GET => "get",
            http::Method::POST => "create",
            http::Method::PUT => "update",
            http::Method::PATCH => "patch",
            http::Method::DELETE => "delete",
            _ => "other",
        }
    }

    /// The resource a request path names: `/api/v1/namespaces/gpu/pods/x` → `pods`,
    /// `/apis/gonka.ai/v1alpha1/namespaces/gpu/gonkanodes/h100/status` → `gonkanodes/status`,
    /// `/api/v1/nodes` → `nodes`, `/api/v1/namespaces/gpu` → `namespaces`.
    pub fn resource(path: &str) -> String {
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let rest = match segments.first() {
            Some(&"api") => segments.get(2..),
            Some(&"apis") => segments.get(3..),
            _ => None,
        }
        .unwrap_or_default();
        let rest = match rest {
            ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
            other => other,
        };
        match rest {
            [resource, _, sub, ..] => format!("{resource}/{sub}"),
            [resource, ..] => (*resource).to_string(),
            [] => "other".into(),
        }
    }

    /// A client for `config` whose every request is counted here.
    pub fn client(&self, config: kube::Config) -> Result<kube::Client, kube::Error> {
        let family = self.0.clone();
        let count = tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            let verb = Self::verb(request.method(), request.uri().query());
            let resource = Self::resource(request.uri().path());
            family.get_or_create(&VerbLabels { verb: verb.into(), resource }).inc();
            request
        });
        Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&count).build())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabels {
    /// NVIDIA's XID catalog class: `transient`, `needs_reset`, `fatal`.
    pub class: String,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(ApiRequests::default())
    }
}

impl Metrics {
    /// The metrics, `api_requests` among them (the counter the client was built with).
    pub fn new(api_requests: ApiRequests) -> Self {
        let mut registry = Registry::with_prefix("gonka_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let leader = Gauge::<i64, AtomicI64>::default();
        registry.register("reconciles", "GonkaNode reconciles started", reconciles.clone());
        registry.register("reconcile_errors", "GonkaNode reconciles that failed, by error kind", failures.clone());
        registry.register_with_unit(
            "reconcile_duration",
            "Time one GonkaNode reconcile took",
            prometheus_client::registry::Unit::Seconds,
            duration.clone(),
        );
        registry.register("leader", "1 while this replica holds the leader lease", leader.clone());
        let report_streams = Gauge::<i64, AtomicI64>::default();
        registry.register("report_streams", "Node-daemon report streams open to this replica", report_streams.clone());
        let gpu_xids = Family::<XidLabels, Counter>::default();
        registry.register("gpu_xid_events", "XID errors the node-daemons reported, by class", gpu_xids.clone());
        let poc_window_unknown = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "poc_window_unknown",
            "GonkaNodes whose network node's epoch phase has been unreadable past the hold limit",
            poc_window_unknown.clone(),
        );
        registry.register(
            "apiserver_requests",
            "Requests sent to the kube-apiserver, by verb and resource",
            api_requests.0.clone(),
        );
        let fleet = Fleet::default();
        fleet.register(&mut registry);
        Self {
            fleet,
            registry: Arc::new(registry),
            reconciles,
            failures,
            duration,
            leader,
            report_streams,
            gpu_xids,
            poc_window_unknown,
            api_requests,
        }
    }

    /// Counts a reconcile and times it until the returned guard drops.
    pub fn reconcile_started(&self) -> ReconcileTimer {
        self.reconciles.inc();
        ReconcileTimer { start: Instant::now(), histogram: self.duration.clone() }
    }

    pub fn gpu_xid(&self, class: &str) {
        self.gpu_xids.get_or_create(&XidLabels { class: class.to_string() }).inc();
    }

    pub fn reconcile_failed(&self, label: &str) {
        self.failures.get_or_create(&ErrorLabels { error: label.to_string() }).inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn apiserver_requests_are_counted_by_verb() {
        use http::Method;
        assert_eq!(ApiRequests::verb(&Method::GET, Some("watch=true&resourceVersion=1")), "watch");
        assert_eq!(ApiRequests::verb(&Method::GET, Some("labelSelector=a%3Db")), "get");
        assert_eq!(ApiRequests::verb(&Method::GET, None), "get");
        assert_eq!(ApiRequests::verb(&Method::PATCH, Some("fieldManager=x")), "patch");
        assert_eq!(ApiRequests::verb(&Method::POST, None), "create");
        assert_eq!(ApiRequests::verb(&Method::DELETE, None), "delete");
        assert_eq!(ApiRequests::resource("/api/v1/namespaces/gpu/pods"), "pods");
        assert_eq!(ApiRequests::resource("/api/v1/namespaces/gpu/pods/x"), "pods");
        assert_eq!(
            ApiRequests::resource("/apis/gonka.ai/v1alpha1/namespaces/gpu/gonkanodes/h100/status"),
            "gonkanodes/status"
        );
        assert_eq!(ApiRequests::resource("/apis/coordination.k8s.io/v1/namespaces/x/leases/l"), "leases");
        assert_eq!(ApiRequests::resource("/api/v1/nodes"), "nodes");
        assert_eq!(ApiRequests::resource("/api/v1/namespaces/gpu"), "namespaces");
        assert_eq!(ApiRequests::resource("/apis/gonka.ai/v1alpha1/gonkanodes"), "gonkanodes");
    }

    use super::*;

    #[test]
    fn a_fleet_is_exposed_per_gonka_node_and_forgotten_with_it() {
        let m = Metrics::default();
        let h100 = FleetLabels { gonka_node_namespace: "gpu".into(), gonka_node: "h100".into() };
        let capped = gonka_crds::GonkaNodeStatus {
            total_gpus: 16,
            weight: Some(420),
            desired_ml_nodes: 2,
            capacity: Some(gonka_crds::CapacityStatus { eligible: 5, joined: 2, held_back: 3, ..Default::default() }),
            // One of the two ML nodes has handed its 8 GPUs back to in-house work.
            ml_nodes: serde_json::from_value(serde_json::json!([
                {"node": "gpu-a", "pod": "a", "gpus": 8, "reporting": true, "since": "2026-12-04T10:00:00Z",
                 "yielded": {"reason": "GPU 0: process 7 is not this ML node's", "since": "2026-12-04T11:00:00Z"}},
                {"node": "gpu-b", "pod": "b", "gpus": 8, "reporting": true, "since": "2026-12-04T10:00:00Z"},
            ]))
            .unwrap(),
            ..Default::default()
        };
        m.fleet.observe(&h100, &capped, 8, true);
        let text = m.encode();
        for line in [
            "gonka_operator_fleet_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 16",
            "gonka_operator_fleet_eligible_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 40",
            "gonka_operator_fleet_idle_eligible_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 24",
            "gonka_operator_fleet_weight{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 420",
            "gonka_operator_fleet_poc_window{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 1",
            "gonka_operator_fleet_yielded_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 8",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Without a cap every eligible node joins: the DaemonSet's count is the eligible one.
        let uncapped = gonka_crds::GonkaNodeStatus { desired_ml_nodes: 3, ..Default::default() };
        m.fleet.observe(&h100, &uncapped, 8, false);
        let text = m.encode();
        assert!(
            text.contains("gonka_operator_fleet_eligible_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 24"),
            "{text}"
        );
        assert!(
            text.contains(
                "gonka_operator_fleet_idle_eligible_gpus{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 0"
            ),
            "{text}"
        );
        assert!(
            text.contains("gonka_operator_fleet_poc_window{gonka_node_namespace=\"gpu\",gonka_node=\"h100\"} 0"),
            "{text}"
        );
        m.fleet.forget(&h100);
        assert!(!m.encode().contains("gonka_node=\"h100\""), "a deleted GonkaNode leaves no series");
    }

    #[test]
    fn exposes_reconciles_errors_duration_and_leadership() {
        let m = Metrics::default();
        drop(m.reconcile_started());
        m.reconcile_failed("apply");
        m.leader.set(1);
        let text = m.encode();
        for line in [
            "gonka_operator_reconciles_total 1",
            "gonka_operator_reconcile_errors_total{error=\"apply\"} 1",
            "gonka_operator_reconcile_duration_seconds_count 1",
            "gonka_operator_leader 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
    }
}
