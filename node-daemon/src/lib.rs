//! `gonka-node-daemon`: one Gonka ML node per pod. To the host's network node it looks like an
//! upstream ML node (the management API in [`api`]); to the operator it is the pod that owns
//! the node's GPUs ([`gpu`]: NVML inventory, health, XID events).
//!
//! What the daemon knows it publishes through the [`node_state`] hook; [`report_client`] streams that
//! to the operator when `daemon.json` names a report endpoint.

pub mod api;
pub mod gpu;
pub mod http;
#[cfg(feature = "torch")]
pub mod inference;
pub mod lending;
pub mod metrics;
pub mod modes;
pub mod mtls;
pub mod node_state;
pub mod poc;
pub mod report_client;
pub mod state;

use std::future::IntoFuture as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use gonka_protocol::daemon_config::DaemonConfig;

/// Settings after file, environment and flags are merged.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The operator's `daemon.json`, when running under a GonkaNode.
    pub config: Option<DaemonConfig>,
    /// Address of the management API.
    pub listen: SocketAddr,
    /// NVML library to load instead of the system's.
    pub nvml_library: Option<PathBuf>,
    /// The pod this daemon runs in (downward API), as it reports itself to the operator.
    pub pod: PodInfo,
    /// Development only: run PoC on the CPU when no GPU is there, and be ready without GPUs.
    /// Off, an ML node without the GPUs it expects is never ready (so never registered) and
    /// refuses PoC work.
    pub allow_cpu_compute: bool,
    /// How long, after SIGTERM, pending PoC batches may take to be delivered (within the pod's
    /// termination grace period).
    pub shutdown_grace: std::time::Duration,
    /// The bearer token API calls must carry (upstream node config's `auth_token`); `None`:
    /// none asked for.
    pub api_token: Option<String>,
    /// Where models live (the GonkaNode's model volume).
    pub models_dir: Option<PathBuf>,
    /// The hub mirror models are downloaded from (`/api/v1/models/download`); `None`: offline.
    pub model_mirror: Option<String>,
    /// Free space, in GiB, a download leaves on the models volume.
    pub models_min_free_gb: u64,
    /// Address of the inference port; `None`: the management API's address with
    /// `daemon.json`'s `inferencePort` (upstream's 5000 without one).
    pub inference_listen: Option<SocketAddr>,
    /// Requests in flight on the inference port at most (429 past it).
    pub inference_max_in_flight: usize,
    /// How long a request body on the inference port may take to arrive (408 past it).
    pub inference_body_timeout: std::time::Duration,
    /// Address of the monitoring port (`/metrics`, the kubelet's probes); `None`: the management
    /// API's address with `daemon.json`'s `metricsPort` ([`DEFAULT_METRICS_PORT`] without one).
    pub metrics_listen: Option<SocketAddr>,
    /// How to run vLLM for the models it serves; `None`: this ML node has no vLLM.
    pub vllm: Option<VllmOptions>,
    /// Mutual TLS with the network node (upstream's pinned pair); `None`: plain HTTP, as
    /// upstream's ML node without it.
    pub mtls: Option<mtls::MtlsFiles>,
    /// How often an opportunistic ML node (`daemon.json`'s `opportunistic`) samples its GPUs.
    pub lending_sample: std::time::Duration,
    /// How long after its own work starts new processes on its GPUs are taken for its own
    /// ([`lending::ADOPT_WINDOW`] by default).
    pub lending_adopt: std::time::Duration,
}

/// How the daemon runs vLLM (flags; upstream's environment names in brackets).
#[derive(Clone, Debug)]
pub struct VllmOptions {
    /// The Python with vLLM (`VLLM_PYTHON_PATH`).
    pub python: PathBuf,
    /// The module run with `-m` (`MLNODE_VLLM_MODULE`).
    pub module: String,
    /// Instances at most (`INFERENCE_MAX_INSTANCES`).
    pub max_instances: usize,
    /// A busy instance without a scheduler step this long is restarted (`MLNODE_HANG_GRACE_SEC`).
    pub hang_grace: std::time::Duration,
    /// Longest an instance may take to serve (`VLLM_RUNNER_TIMEOUT`).
    pub startup_timeout: std::time::Duration,
    /// Instance `i` starts this long times `i` after the first (upstream 5 s).
    pub stagger: std::time::Duration,
    /// vLLM's `LD_LIBRARY_PATH`, where the daemon's own must not reach it.
    pub ld_library_path: Option<String>,
}

/// Upstream's inference port.
pub const DEFAULT_INFERENCE_PORT: u16 = 5000;
/// The monitoring port's default (upstream's ML node has none).
pub const DEFAULT_METRICS_PORT: u16 = 9090;

/// The daemon's pod, from the downward API (`POD_NAME`, `NODE_NAME`, `POD_IP`).
#[derive(Clone, Debug, Default)]
pub struct PodInfo {
    pub name: Option<String>,
    pub node_name: Option<String>,
    pub ip: Option<String>,
}

/// Reads `daemon.json`, with an error that names the file and the problem.
pub fn read_config(path: &std::path::Path) -> anyhow::Result<DaemonConfig> {
    let text = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("reading {}: {e}", path.display()))?;
    DaemonConfig::from_json(&text).map_err(|e| anyhow::anyhow!("{} is not a valid daemon config: {e}", path.display()))
}

/// `host`: where vLLM's instances listen — loopback, only the daemon reaches them.
#[cfg(feature = "torch")]
fn vllm_settings(o: &VllmOptions, host: std::net::IpAddr) -> inference::vllm::VllmSettings {
    use inference::vllm::{VllmSettings, plan::VllmConfig, supervisor::Supervision};
    VllmSettings {
        config: VllmConfig {
            python: o.python.clone(),
            module: o.module.clone(),
            max_instances: o.max_instances,
            host: host.to_string(),
            worker_extension: None,
            stagger: o.stagger,
            ld_library_path: o.ld_library_path.clone(),
        },
        supervision: Supervision {
            hang_grace: o.hang_grace,
            startup_timeout: o.startup_timeout,
            ..Supervision::default()
        },
        detect_poc_plugin: true,
    }
}

/// How often the GPU inventory is re-probed for the report hook.
const INVENTORY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs the daemon until `shutdown` completes.
pub async fn run(
    settings: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(settings, node_state::Reporting::default(), shutdown).await
}

/// Runs the daemon, publishing inventory, state and events to `reporting`.
pub async fn run_with(
    settings: Settings,
    reporting: node_state::Reporting,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let probe = gpu::GpuProbe::open(settings.nvml_library.as_deref());
    let metrics = metrics::DaemonMetrics::default();
    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (metrics, reporting, probe_for_xid) = (metrics.clone(), reporting.clone(), probe.clone());
        probe.watch_xids(stop_watch.clone(), move |gpu, code, class| {
            metrics.xid(gpu, code, class);
            reporting.event(node_state::Event::Xid { gpu, code, class });
            // A GPU that needs a reset is no longer available: the inventory says so now.
            reporting.set_inventory(node_state::Inventory::probe(&probe_for_xid));
        })
    };
    if let Some(config) = &settings.config {
        tracing::info!(gonka_node = %config.gonka_node, models = config.models.len(), "configured by the operator");
    }
    let inventory = {
        let probe = probe.clone();
        tokio::task::spawn_blocking(move || node_state::Inventory::probe(&probe)).await?
    };
    tracing::info!(gpus = inventory.devices.len(), hardware = ?inventory.hardware, "GPU probe");
    reporting.set_inventory(inventory);
    let reprobe = {
        let (probe, reporting) = (probe.clone(), reporting.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(INVENTORY_INTERVAL);
            tick.tick().await;
            loop {
                tick.tick().await;
                let probe = probe.clone();
                if let Ok(inventory) = tokio::task::spawn_blocking(move || node_state::Inventory::probe(&probe)).await {
                    reporting.set_inventory(inventory);
                }
            }
        })
    };

    let mtls = match &settings.mtls {
        Some(files) => {
            // The addresses the network node may use: the pod IP it registers, the listen address.
            let mut addresses: Vec<std::net::IpAddr> =
                settings.pod.ip.iter().filter_map(|ip| ip.parse().ok()).collect();
            let listen = settings.listen.ip();
            if !listen.is_unspecified() && !addresses.contains(&listen) {
                addresses.push(listen);
            }
            let loaded = mtls::Mtls::load(files, &addresses).map_err(|e| anyhow::anyhow!("mutual TLS: {e}"))?;
            tracing::info!(
                serving_chain = loaded.serving_chain().len(),
                "mutual TLS: the ML-node API and inference port take only the network node's pinned certificate"
            );
            Some(Arc::new(loaded))
        }
        None => None,
    };
    // One server configuration for both ports.
    let tls = mtls.as_ref().map(|m| m.server_config()).transpose()?;
    let gpu_vram_gb =
        reporting.inventory().borrow().devices.iter().map(|d| d.total_memory_mb.unwrap_or(0) as f64 / 1024.0).collect();
    let pow = match &settings.config {
        Some(c) => poc::PowSettings {
            send_interval: std::time::Duration::from_secs(u64::from(c.poc.send_interval_seconds.max(1))),
            max_pending: c.poc.max_pending_batches.max(1) as usize,
            gpu_vram_gb,
            allow_cpu: settings.allow_cpu_compute,
            callback_base: Some(c.ml_callback_url.clone()),
            batch_size: Some(c.poc.batch_size.max(1) as usize),
            ca_bundle: c.ca_bundle.clone(),
            mtls: mtls.clone(),
        },
        None => poc::PowSettings {
            gpu_vram_gb,
            allow_cpu: settings.allow_cpu_compute,
            mtls: mtls.clone(),
            ..poc::PowSettings::default()
        },
    };
    let policy = state::Policy {
        // The GPUs the GonkaNode gives this ML node (`gpusPerMlNode`), else at least one.
        expected_gpus: settings.config.as_ref().and_then(|c| c.gpus).unwrap_or(1) as usize,
        allow_cpu_compute: settings.allow_cpu_compute,
        models: settings.config.iter().flat_map(|c| c.models.iter().map(|m| m.id.clone())).collect(),
        api_token: settings.api_token.clone(),
    };
    let reporter_stop = tokio_util::sync::CancellationToken::new();
    let reporter = settings.config.as_ref().and_then(|c| {
        let target = c.report.as_ref()?;
        let identity = report_client::Identity {
            gonka_node: c.gonka_node.clone(),
            pod_name: settings.pod.name.clone().unwrap_or_default(),
            kubernetes_node: settings.pod.node_name.clone().unwrap_or_default(),
            pod_ip: settings.pod.ip.clone().unwrap_or_else(|| settings.listen.ip().to_string()),
            poc_port: c.poc_port,
            inference_port: c.inference_port,
        };
        let mut reporter_settings =
            report_client::ReporterSettings::new(&target.url, target.token_file.as_ref().map(PathBuf::from), identity);
        reporter_settings.ca_bundle = target.ca_bundle.clone();
        tracing::info!(url = %target.url, "reporting to the operator");
        Some(tokio::spawn(report_client::run(reporter_settings, reporting.clone(), reporter_stop.clone())))
    });
    let inference_addr = settings.inference_listen.unwrap_or_else(|| {
        let port = settings.config.as_ref().map_or(DEFAULT_INFERENCE_PORT, |c| c.inference_port);
        SocketAddr::new(settings.listen.ip(), port)
    });
    // Bound first, so a port of 0 (tests) is known before the API names it.
    #[cfg(feature = "torch")]
    let inference_listener = tokio::net::TcpListener::bind(inference_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the inference port {inference_addr}: {e}"))?;
    #[cfg(feature = "torch")]
    let inference_addr = inference_listener.local_addr()?;
    // The flag wins over daemon.json's `modelsDir` (the GonkaNode's model volume).
    let models_dir =
        settings.models_dir.clone().or_else(|| settings.config.as_ref()?.models_dir.as_ref().map(PathBuf::from));
    let inference = state::InferenceOptions {
        models_dir,
        inference_port: inference_addr.port(),
        model_mirror: settings.model_mirror.clone(),
        models_min_free_bytes: settings.models_min_free_gb.saturating_mul(1 << 30),
        engines: settings.config.iter().flat_map(|c| c.models.iter().map(|m| (m.id.clone(), m.engine))).collect(),
        #[cfg(feature = "torch")]
        // The inference port's own address when that is a loopback one (development, several
        // daemons on one host), else 127.0.0.1 (a pod has its own).
        vllm: match settings.vllm.as_ref().map(|o| {
            let ip = inference_addr.ip();
            vllm_settings(o, if ip.is_loopback() { ip } else { std::net::Ipv4Addr::LOCALHOST.into() })
        }) {
            Some(mut vllm) => {
                inference::vllm::detect_poc_plugin(&mut vllm).await;
                Some(vllm)
            }
            None => None,
        },
    };
    let state = state::AppState::new(
        probe.clone(),
        metrics.clone(),
        env!("CARGO_PKG_VERSION"),
        pow,
        reporting.clone(),
        policy,
        inference,
    )?;
    let lending = settings.config.as_ref().and_then(|c| c.opportunistic.as_ref()).map(|o| {
        let policy = lending::Policy {
            rejoin_after_idle: std::time::Duration::from_secs(u64::from(o.rejoin_after_idle_seconds)),
            busy_utilization_percent: o.busy_utilization_percent,
            adopt_window: settings.lending_adopt,
        };
        tracing::info!(?policy, "opportunistic: yielding the GPUs to other work when it comes");
        let hand_back: lending::HandBack = {
            #[cfg_attr(not(feature = "torch"), allow(unused_variables))]
            let (state, grace) = (state.clone(), settings.shutdown_grace);
            Box::new(move || {
                #[cfg_attr(not(feature = "torch"), allow(unused_variables))]
                let state = state.clone();
                Box::pin(async move {
                    // What is pending reaches the network node; the model leaves the GPUs.
                    #[cfg(feature = "torch")]
                    {
                        state.pow.shutdown(grace).await;
                        state.pow_v2.shutdown(grace).await;
                        state.inference.down().await;
                    }
                })
            })
        };
        tokio::spawn(lending::run(
            probe.clone(),
            reporting.clone(),
            metrics.clone(),
            policy,
            settings.lending_sample,
            hand_back,
        ))
    });
    let listener = tokio::net::TcpListener::bind(settings.listen).await?;
    tracing::info!(addr = %listener.local_addr()?, "ML-node API listening");
    let metrics_addr = settings.metrics_listen.unwrap_or_else(|| {
        let port = settings.config.as_ref().and_then(|c| c.metrics_port).unwrap_or(DEFAULT_METRICS_PORT);
        SocketAddr::new(settings.listen.ip(), port)
    });
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .map_err(|e| anyhow::anyhow!("binding the monitoring port {metrics_addr}: {e}"))?;
    tracing::info!(addr = %metrics_listener.local_addr()?, "monitoring port (/metrics, probes) listening");
    // `modelStorage.preload`: the model comes up as the daemon starts, as `/inference/up` would
    // bring it (the network node then finds it serving).
    #[cfg(feature = "torch")]
    if let Some(config) = &settings.config
        && let Some(model) = &config.preload_model
    {
        let args = config.models.iter().find(|m| &m.id == model).map(|m| m.args.clone()).unwrap_or_default();
        let request = gonka_protocol::ml_node::InferenceUpRequest {
            model: model.clone(),
            dtype: "auto".into(),
            additional_args: args,
        };
        match state.inference.start(request, state.gpu_offer().await) {
            Ok(task) => {
                let model = model.clone();
                tokio::spawn(async move {
                    match task.await {
                        Ok(Ok(())) => tracing::info!(%model, "preloaded"),
                        Ok(Err(e)) => tracing::error!(%model, error = %e, "preloading failed"),
                        Err(e) => tracing::error!(%model, error = %e, "preloading panicked"),
                    }
                });
            }
            Err(e) => tracing::error!(%model, error = %e, "preloading refused"),
        }
    }
    #[cfg(feature = "torch")]
    let inference_server = {
        tracing::info!(addr = %inference_addr, "inference port listening");
        let limits = inference::port_bounds::PortLimits {
            max_in_flight: settings.inference_max_in_flight,
            body_timeout: settings.inference_body_timeout,
            ..Default::default()
        };
        let app = inference::inference_port(state.inference.clone(), limits, state.metrics.clone());
        let listener = mtls::ApiListener::new(inference_listener, tls.clone())?;
        tokio::spawn(async move { axum::serve(listener, app).await })
    };
    // Shutting down takes no new work (the server stops accepting), and delivers what is pending
    // while the requests in flight finish: side by side, both within the grace period. A held
    // request (a waited `generate`, a slow `inference/up` body) must not keep the proofs from
    // the network node until the kubelet's SIGKILL.
    let stop_serving = tokio_util::sync::CancellationToken::new();
    let monitoring = tokio::spawn(
        axum::serve(metrics_listener, api::monitoring_router(state.clone()))
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
            .into_future(),
    );
    let mut server = tokio::spawn(
        axum::serve(mtls::ApiListener::new(listener, tls)?, api::service(state.clone()))
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
            .into_future(),
    );
    tokio::select! {
        _ = shutdown => {}
        ended = &mut server => {
            ended??;
            anyhow::bail!("the ML-node API server stopped by itself");
        }
    }
    stop_serving.cancel();
    let grace = settings.shutdown_grace;
    let drain = async {
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            server.abort();
            tracing::warn!(?grace, "requests still in flight at the end of the grace period were dropped");
        }
    };
    let flush = async {
        #[cfg(feature = "torch")]
        {
            state.pow.shutdown(grace).await;
            inference_server.abort();
            state.pow_v2.shutdown(grace).await;
            state.inference.down().await;
        }
    };
    tokio::join!(drain, flush);
    monitoring.abort();

    reprobe.abort();
    if let Some(lending) = lending {
        lending.abort();
    }
    reporter_stop.cancel();
    if let Some(reporter) = reporter {
        let _ = reporter.await;
    }
    stop_watch.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(w) = watcher {
        let _ = tokio::task::spawn_blocking(move || w.join()).await;
    }
    Ok(())
}
