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
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabels {
    /// NVIDIA's XID catalog class: `transient`, `needs_reset`, `fatal`.
    pub class: String,
}

impl Default for Metrics {
    fn default() -> Self {
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
        Self { registry: Arc::new(registry), reconciles, failures, duration, leader, report_streams, gpu_xids }
    }
}

impl Metrics {
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
    use super::*;

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
