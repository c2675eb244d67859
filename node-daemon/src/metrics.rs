//! Prometheus metrics of one ML node, on `/metrics`. GPU gauges are refreshed from a fresh
//! probe at every scrape; XID counters grow as events arrive.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::gpu::{GpuStatus, XidClass};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GpuLabels {
    pub gpu: String,
    pub uuid: String,
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BatchLabels {
    /// `generated` or `validated`.
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct XidLabels {
    pub gpu: String,
    pub xid: String,
    pub class: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// `in_flight`, `body_budget`, `body_too_large`, `body_timeout`, `body_unreadable`.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabels {
    pub phase: String,
}

/// One vLLM instance as a scrape sees it.
#[derive(Clone, Debug)]
pub struct VllmInstanceSample {
    pub index: usize,
    /// `starting`, `healthy`, `unhealthy`, `restarting`, `failed`, `stopped`.
    pub phase: &'static str,
    pub restarts: u64,
    pub requests_waiting: Option<f64>,
    pub requests_running: Option<f64>,
}

/// Every phase a vLLM instance can be in (each gets a gauge, zero when none is there).
pub const VLLM_PHASES: [&str; 6] = ["starting", "healthy", "unhealthy", "restarting", "failed", "stopped"];

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone)]
pub struct DaemonMetrics {
    registry: Arc<Registry>,
    gpus: Gauge<i64, AtomicI64>,
    available: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    utilization: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    memory_used: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    memory_total: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    temperature: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    power: Family<GpuLabels, FloatGauge>,
    ecc_corrected: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    ecc_uncorrected: Family<GpuLabels, Gauge<i64, AtomicI64>>,
    xids: Family<XidLabels, Counter>,
    nonces_computed: Counter,
    nonces_valid: Counter,
    batches_sent: Family<BatchLabels, Counter>,
    send_failures: Family<BatchLabels, Counter>,
    pending_batches: Gauge<i64, AtomicI64>,
    api_in_flight: Gauge<i64, AtomicI64>,
    inference_in_flight: Gauge<i64, AtomicI64>,
    inference_refused: Family<RefusalLabels, Counter>,
    vllm_instances: Family<PhaseLabels, Gauge<i64, AtomicI64>>,
    vllm_restarts: Family<InstanceLabels, Gauge<i64, AtomicI64>>,
    vllm_waiting: Family<InstanceLabels, FloatGauge>,
    vllm_running: Family<InstanceLabels, FloatGauge>,
    yielded: Gauge<i64, AtomicI64>,
    yields: Counter,
}

impl Default for DaemonMetrics {
    fn default() -> Self {
        let (gpus, available, utilization) = (Gauge::default(), Family::default(), Family::default());
        let (memory_used, memory_total, temperature) = (Family::default(), Family::default(), Family::default());
        let (power, ecc_corrected, ecc_uncorrected, xids) =
            (Family::default(), Family::default(), Family::default(), Family::default());
        let mut registry = Registry::with_prefix("gonka_ml_node");
        registry.register("gpus", "GPUs NVML reports", Gauge::clone(&gpus));
        registry.register("gpu_available", "1 when the GPU is fit for proof and inference", Family::clone(&available));
        registry.register("gpu_utilization_percent", "GPU compute utilization", Family::clone(&utilization));
        registry.register("gpu_memory_used_mebibytes", "GPU memory in use", Family::clone(&memory_used));
        registry.register("gpu_memory_total_mebibytes", "GPU memory in total", Family::clone(&memory_total));
        registry.register("gpu_temperature_celsius", "GPU temperature", Family::clone(&temperature));
        registry.register("gpu_power_watts", "GPU power draw", Family::clone(&power));
        registry.register(
            "gpu_ecc_corrected_errors",
            "Corrected ECC errors (aggregate)",
            Family::clone(&ecc_corrected),
        );
        registry.register(
            "gpu_ecc_uncorrected_errors",
            "Uncorrected ECC errors (aggregate)",
            Family::clone(&ecc_uncorrected),
        );
        registry.register("gpu_xid_errors", "XID events by code and class", Family::clone(&xids));
        let (nonces_computed, nonces_valid) = (Counter::default(), Counter::default());
        let (batches_sent, send_failures) = (Family::default(), Family::default());
        let pending_batches = Gauge::default();
        registry.register("poc_nonces_computed", "PoC nonces computed", Counter::clone(&nonces_computed));
        registry.register("poc_nonces_valid", "PoC nonces below r_target (proofs)", Counter::clone(&nonces_valid));
        registry.register("poc_batches_sent", "PoC batches delivered to the callback", Family::clone(&batches_sent));
        registry.register(
            "poc_send_failures",
            "PoC batch posts that failed (kept for retry)",
            Family::clone(&send_failures),
        );
        registry.register(
            "poc_pending_batches",
            "PoC batches waiting for the callback",
            Gauge::clone(&pending_batches),
        );
        let api_in_flight = Gauge::default();
        registry.register(
            "api_requests_in_flight",
            "ML-node API requests being served (probes and scrapes not counted)",
            Gauge::clone(&api_in_flight),
        );
        let (inference_in_flight, inference_refused) = (Gauge::default(), Family::default());
        registry.register(
            "inference_requests_in_flight",
            "Requests on the inference port being served, over both engines (a streamed answer counts until its last byte)",
            Gauge::clone(&inference_in_flight),
        );
        registry.register(
            "inference_requests_refused",
            "Requests the inference port refused, by reason: in_flight and body_budget (429), body_too_large (413), body_timeout (408), body_unreadable (400)",
            Family::clone(&inference_refused),
        );
        let (vllm_instances, vllm_restarts) = (Family::default(), Family::default());
        let (vllm_waiting, vllm_running) = (Family::default(), Family::default());
        registry.register("vllm_instances", "vLLM instances by phase", Family::clone(&vllm_instances));
        registry.register(
            "vllm_instance_restarts",
            "Restarts of each vLLM instance since the model came up",
            Family::clone(&vllm_restarts),
        );
        registry.register(
            "vllm_requests_waiting",
            "Requests queued in each vLLM instance (its scheduler)",
            Family::clone(&vllm_waiting),
        );
        registry.register(
            "vllm_requests_running",
            "Requests running in each vLLM instance",
            Family::clone(&vllm_running),
        );
        let (yielded, yields) = (Gauge::default(), Counter::default());
        registry.register(
            "yielded",
            "1 while an opportunistic ML node has handed its GPUs back to other work",
            Gauge::clone(&yielded),
        );
        registry.register("yields", "Times an opportunistic ML node yielded its GPUs", Counter::clone(&yields));
        Self {
            registry: Arc::new(registry),
            gpus,
            available,
            utilization,
            memory_used,
            memory_total,
            temperature,
            power,
            ecc_corrected,
            ecc_uncorrected,
            xids,
            nonces_computed,
            nonces_valid,
            batches_sent,
            send_failures,
            pending_batches,
            api_in_flight,
            inference_in_flight,
            inference_refused,
            vllm_instances,
            vllm_restarts,
            vllm_waiting,
            vllm_running,
            yielded,
            yields,
        }
    }
}

impl DaemonMetrics {
    pub fn xid(&self, gpu: u32, code: u64, class: XidClass) {
        let labels = XidLabels { gpu: gpu.to_string(), xid: code.to_string(), class: class.as_str().into() };
        self.xids.get_or_create(&labels).inc();
    }

    /// An opportunistic ML node yielded its GPUs (`true`) or took them again.
    pub fn lending(&self, yielded: bool) {
        if yielded {
            self.yields.inc();
        }
        self.yielded.set(i64::from(yielded));
    }

    pub fn pow_computed(&self, n: u64) {
        self.nonces_computed.inc_by(n);
    }

    pub fn pow_valid(&self, n: u64) {
        self.nonces_valid.inc_by(n);
    }

    pub fn pow_sent(&self, kind: &str) {
        self.batches_sent.get_or_create(&BatchLabels { kind: kind.into() }).inc();
    }

    pub fn pow_send_failed(&self, kind: &str) {
        self.send_failures.get_or_create(&BatchLabels { kind: kind.into() }).inc();
    }

    pub fn pow_pending(&self, n: i64) {
        self.pending_batches.set(n);
    }

    pub fn api_in_flight(&self, n: i64) {
        self.api_in_flight.set(n);
    }

    pub fn inference_in_flight(&self, n: i64) {
        self.inference_in_flight.set(n);
    }

    pub fn inference_refused(&self, reason: &str) {
        self.inference_refused.get_or_create(&RefusalLabels { reason: reason.into() }).inc();
    }

    /// Sets the vLLM gauges (none served: every phase zero).
    pub fn observe_vllm(&self, instances: &[VllmInstanceSample]) {
        for phase in VLLM_PHASES {
            let n = instances.iter().filter(|i| i.phase == phase).count();
            self.vllm_instances.get_or_create(&PhaseLabels { phase: phase.into() }).set(n as i64);
        }
        for i in instances {
            let l = InstanceLabels { instance: i.index.to_string() };
            self.vllm_restarts.get_or_create(&l).set(i.restarts as i64);
            self.vllm_waiting.get_or_create(&l).set(i.requests_waiting.unwrap_or(0.0));
            self.vllm_running.get_or_create(&l).set(i.requests_running.unwrap_or(0.0));
        }
    }

    /// Sets the GPU gauges from a probe snapshot.
    pub fn observe(&self, gpus: &[GpuStatus]) {
        self.gpus.set(gpus.len() as i64);
        for g in gpus {
            let l =
                GpuLabels { gpu: g.index.to_string(), uuid: g.uuid.clone().unwrap_or_default(), model: g.name.clone() };
            self.available.get_or_create(&l).set(i64::from(g.is_available()));
            let set = |family: &Family<GpuLabels, Gauge<i64, AtomicI64>>, v: Option<u64>| {
                if let Some(v) = v {
                    family.get_or_create(&l).set(v as i64);
                }
            };
            set(&self.utilization, g.utilization_percent.map(u64::from));
            set(&self.memory_used, g.used_memory_mb);
            set(&self.memory_total, g.total_memory_mb);
            set(&self.temperature, g.temperature_c.map(u64::from));
            set(&self.ecc_corrected, g.ecc_corrected);
            set(&self.ecc_uncorrected, g.ecc_uncorrected);
            if let Some(w) = g.power_watts {
                self.power.get_or_create(&l).set(w);
            }
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
