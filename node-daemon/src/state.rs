//! The state every route of the ML-node API shares: the GPU probe, the policy `daemon.json`
//! sets, the managers (PoC v1, inference, PoC v2, model cache), metrics and reports. Below
//! every route module (none of them imports the router).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gonka_protocol::ml_node::{HealthResponse, ServiceState};
use sha2::{Digest, Sha256};

use crate::gpu::GpuProbe;
use crate::metrics::DaemonMetrics;

/// Requests handled at once; more are refused with 503 instead of queueing without end.
pub const MAX_IN_FLIGHT: usize = 64;

/// Where inference finds its models and serves, from `daemon.json` and the flags.
#[derive(Clone, Debug, Default)]
pub struct InferenceOptions {
    /// The models volume (`--models-dir`).
    pub models_dir: Option<std::path::PathBuf>,
    /// The inference port (upstream 5000).
    pub inference_port: u16,
    /// Where models are downloaded from (`--model-mirror`); `None`: offline.
    pub model_mirror: Option<String>,
    /// Free space a download leaves on the models volume (`--models-min-free-gb`).
    pub models_min_free_bytes: u64,
    /// The engine `daemon.json` names per model.
    pub engines: std::collections::BTreeMap<String, gonka_protocol::daemon_config::ModelEngine>,
    /// How vLLM runs here; `None`: no vLLM on this ML node.
    #[cfg(feature = "torch")]
    pub vllm: Option<crate::inference::vllm::VllmSettings>,
}

/// What the API holds this ML node to, from `daemon.json` and the flags.
#[derive(Clone, Debug, Default)]
pub struct Policy {
    /// Available GPUs it needs to be ready (the GonkaNode's `gpusPerMlNode`, else one).
    pub expected_gpus: usize,
    /// Development only: ready without GPUs.
    pub allow_cpu_compute: bool,
    /// The models the GonkaNode gives this ML node; empty: any.
    pub models: Vec<String>,
    /// The bearer token every API call must carry (the network node's `auth_token`); `None`:
    /// none asked for, as upstream's ML node.
    pub api_token: Option<String>,
}

pub struct AppState {
    pub probe: GpuProbe,
    pub policy: Policy,
    pub(crate) in_flight: tokio::sync::Semaphore,
    /// SHA-256 of `policy.api_token`.
    pub(crate) api_token_sha256: Option<[u8; 32]>,
    pub metrics: DaemonMetrics,
    pub version: String,
    /// The report hook: inventory, state, events.
    pub reporting: crate::node_state::Reporting,
    /// PoC v1 jobs (upstream's `PowManager`).
    #[cfg(feature = "torch")]
    pub pow: crate::poc::engine::PowService,
    /// The served model (upstream's `InferenceManager`).
    #[cfg(feature = "torch")]
    pub inference: Arc<crate::inference::manager::InferenceManager>,
    /// PoC v2 on the served model.
    #[cfg(feature = "torch")]
    pub pow_v2: Arc<crate::inference::pow_v2::PocV2Service>,
    /// The models directory as a cache (`/api/v1/models/*`).
    #[cfg(feature = "torch")]
    pub model_cache: Arc<crate::inference::model_cache::ModelCache>,
    /// PoC v2 over vLLM's instances: what it checks and sends with.
    #[cfg(feature = "torch")]
    pub vllm_fanout: crate::inference::vllm::pow_v2::FanoutSettings,
    pub(crate) health: Mutex<Option<(Instant, HealthResponse)>>,
    /// The last GPU readings and when they were taken ([`AppState::gpu_snapshot`]).
    gpu_snapshot: tokio::sync::Mutex<Option<(Instant, Vec<crate::gpu::GpuStatus>)>>,
}

/// GPU readings are taken at most this often: `/metrics`, `/readyz` and the probes are outside
/// the in-flight limit, and each NVML reading blocks a thread, so a flood of them must not
/// become a flood of NVML calls.
pub const GPU_SNAPSHOT_TTL: Duration = Duration::from_secs(1);

impl AppState {
    /// Every GPU's reading, at most [`GPU_SNAPSHOT_TTL`] old. One caller reads NVML (off the
    /// runtime's threads) while the others wait for its answer.
    pub async fn gpu_snapshot(&self) -> Vec<crate::gpu::GpuStatus> {
        let mut cached = self.gpu_snapshot.lock().await;
        if let Some((at, gpus)) = cached.as_ref()
            && at.elapsed() < GPU_SNAPSHOT_TTL
        {
            return gpus.clone();
        }
        let probe = self.probe.clone();
        let gpus = tokio::task::spawn_blocking(move || probe.snapshot()).await.unwrap_or_default();
        *cached = Some((Instant::now(), gpus.clone()));
        gpus
    }

    pub fn new(
        probe: GpuProbe,
        metrics: DaemonMetrics,
        version: impl Into<String>,
        #[cfg_attr(not(feature = "torch"), allow(unused_variables))] pow: crate::poc::PowSettings,
        reporting: crate::node_state::Reporting,
        policy: Policy,
        #[cfg_attr(not(feature = "torch"), allow(unused_variables))] inference: InferenceOptions,
    ) -> anyhow::Result<Arc<Self>> {
        #[cfg(feature = "torch")]
        let (pow, inference, pow_v2, model_cache, vllm_fanout) = {
            use crate::inference::{manager, model_cache, pow_v2, vllm};
            let (allow_cpu, callback_base, batch_size) = (pow.allow_cpu, pow.callback_base.clone(), pow.batch_size);
            let mtls = pow.mtls.is_some();
            let pow = crate::poc::engine::PowService::new(pow, metrics.clone(), reporting.clone())?;
            // vLLM's plugin can't present the ML node's certificate: its callbacks go through
            // the daemon (on loopback: only this pod's processes reach it).
            let relay = match (mtls, &inference.vllm) {
                (true, Some(_)) => {
                    Some(vllm::callback_relay::CallbackRelay::start(std::net::Ipv4Addr::LOCALHOST.into(), pow.http())?)
                }
                _ => None,
            };
            let model_cache = model_cache::ModelCache::new(
                inference.models_dir.clone(),
                inference.model_mirror,
                inference.models_min_free_bytes,
            )?;
            let manager = manager::InferenceManager::new(
                manager::InferenceSettings {
                    models_dir: inference.models_dir,
                    allow_cpu,
                    engine: Default::default(),
                    vllm: inference.vllm,
                    engines: inference.engines,
                    inference_port: inference.inference_port,
                },
                reporting.clone(),
            );
            let vllm_fanout = vllm::pow_v2::FanoutSettings {
                callback_base: callback_base.clone(),
                batch_size,
                http: vllm::proxy::client(),
                reporting: reporting.clone(),
                relay,
            };
            let pow_v2 = pow_v2::PocV2Service::new(
                pow_v2::PocV2Settings {
                    callback_base,
                    batch_size,
                    inference_port: inference.inference_port,
                    http: pow.http(),
                    reporting: reporting.clone(),
                    metrics: metrics.clone(),
                },
                manager.clone(),
            );
            (pow, manager, pow_v2, model_cache, vllm_fanout)
        };
        Ok(Arc::new(Self {
            probe,
            api_token_sha256: policy.api_token.as_ref().map(|t| Sha256::digest(t.as_bytes()).into()),
            policy,
            in_flight: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            #[cfg(feature = "torch")]
            pow,
            #[cfg(feature = "torch")]
            inference,
            #[cfg(feature = "torch")]
            pow_v2,
            #[cfg(feature = "torch")]
            model_cache,
            #[cfg(feature = "torch")]
            vllm_fanout,
            reporting,
            metrics,
            version: version.into(),
            health: Mutex::new(None),
            gpu_snapshot: tokio::sync::Mutex::new(None),
        }))
    }

    /// What the GPUs offer a model now (NVML): free memory, for refusing a model that cannot
    /// fit, and the available GPUs, for vLLM's instances.
    #[cfg(feature = "torch")]
    pub async fn gpu_offer(&self) -> crate::inference::manager::GpuOffer {
        let probe = self.probe.clone();
        let gpus = tokio::task::spawn_blocking(move || probe.snapshot()).await.unwrap_or_default();
        let devices: Vec<_> = gpus.iter().map(|g| g.to_device()).collect();
        crate::inference::manager::GpuOffer {
            free_per_gpu: devices.iter().filter_map(|d| d.free_memory_mb).map(|mb| mb * 1024 * 1024).collect(),
            available: devices.iter().filter(|d| d.is_available).map(|d| d.index).collect(),
        }
    }

    /// Which manager runs: POW while a PoC v1 session exists, INFERENCE while a model is up
    /// or coming up (PoC v2 runs inside it).
    pub(crate) fn service_state(&self) -> ServiceState {
        #[cfg(feature = "torch")]
        if self.pow.is_running() {
            return ServiceState::Pow;
        }
        #[cfg(feature = "torch")]
        if self.inference.is_running() || self.inference.is_starting() {
            return ServiceState::Inference;
        }
        ServiceState::Stopped
    }
}
