//! `gonka-node-daemon`: the ML node of a GonkaNode pod.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Settings come from flags, else environment, else the operator's `daemon.json`.
#[derive(Parser, Debug)]
#[command(name = "gonka-node-daemon", version, about = "A Gonka ML node: GPU probe and the ML-node management API")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// The operator's daemon config (`daemon.json`).
    #[arg(long, env = "GONKA_DAEMON_CONFIG")]
    config: Option<PathBuf>,
    /// Address of the management API; default: all interfaces on the config's `pocPort`
    /// (upstream 8080).
    #[arg(long, env = "GONKA_LISTEN")]
    listen: Option<SocketAddr>,
    /// NVML library to load instead of the system's `libnvidia-ml.so.1`.
    #[arg(long, env = "GONKA_NVML_LIBRARY")]
    nvml_library: Option<PathBuf>,
    /// The pod's name, as the daemon reports itself to the operator (downward API).
    #[arg(long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// The Kubernetes node the pod runs on (downward API).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// The pod's IP (downward API); default: the listen address.
    #[arg(long, env = "POD_IP")]
    pod_ip: Option<String>,
    /// Development only: compute PoC on the CPU when there is no GPU, and report ready without
    /// GPUs. Never set it on a GPU fleet: a pod whose GPUs are missing would be registered.
    /// For speed on a CPU, see docs/cpu-compute.md (glibc's allocator settings; the daemon starts
    /// itself again with `GOMP_SPINCOUNT=10000` where neither it nor `OMP_WAIT_POLICY` is set).
    #[arg(long, env = "GONKA_ALLOW_CPU_COMPUTE")]
    allow_cpu_compute: bool,
    /// After SIGTERM, how long pending PoC batches may take to reach the network node (keep it
    /// under the pod's termination grace period, 60 s).
    #[arg(long, env = "GONKA_SHUTDOWN_GRACE_SECONDS", default_value_t = 45)]
    shutdown_grace_seconds: u64,
    /// A file holding the bearer token every API call must carry (the network node's
    /// `auth_token` for this ML node); unset, no token is asked for, as upstream.
    #[arg(long, env = "GONKA_API_TOKEN_FILE")]
    api_token_file: Option<PathBuf>,
    /// Where models live: `<dir>/<org>/<name>` or a Hugging Face cache (`models--org--name`),
    /// the GonkaNode's model volume.
    #[arg(long, env = "GONKA_MODELS_DIR")]
    models_dir: Option<PathBuf>,
    /// The Hugging Face hub, or a mirror of it, that `/api/v1/models/download` fetches from
    /// (e.g. `https://huggingface.co`); unset: offline, downloads are ignored as upstream's
    /// `HF_HUB_OFFLINE` ignores them.
    #[arg(long, env = "GONKA_MODEL_MIRROR")]
    model_mirror: Option<String>,
    /// Free space, in GiB, a model download leaves on the models volume (it stops, and fails,
    /// rather than fill it).
    #[arg(long, env = "GONKA_MODELS_MIN_FREE_GB", default_value_t = 10)]
    models_min_free_gb: u64,
    /// Address of the inference port (OpenAI API); default: the listen address's IP with
    /// daemon.json's inferencePort, else 5000.
    #[arg(long, env = "GONKA_INFERENCE_LISTEN")]
    inference_listen: Option<SocketAddr>,
    /// Requests in flight on the inference port at most, over both engines (a streamed answer
    /// counts until it ends); more are answered 429.
    #[arg(long, env = "GONKA_INFERENCE_MAX_IN_FLIGHT", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(1..))]
    inference_max_in_flight: u32,
    /// Seconds a request body on the inference port may take to arrive after its headers (408).
    #[arg(long, env = "GONKA_INFERENCE_BODY_TIMEOUT_SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    inference_body_timeout_seconds: u64,
    /// Address of the monitoring port (`/metrics` and the kubelet's probes, plain HTTP, nothing
    /// else); default: the listen address's IP with daemon.json's metricsPort, else 9090.
    #[arg(long, env = "GONKA_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Mutual TLS with the network node, upstream's pair (`gen-mlnode-certs.sh`): this ML node's
    /// certificate, `mlnode.crt`. With `--mtls-key` and `--mtls-peer-cert`, the ML-node API and
    /// the inference port take only a client presenting the pinned network-node certificate, and
    /// callbacks present this one.
    #[arg(long, env = "MLNODE_MTLS_CLIENT_CERT", requires_all = ["mtls_key", "mtls_peer_cert"])]
    mtls_cert: Option<PathBuf>,
    /// Its key, `mlnode.key`.
    #[arg(long, env = "MLNODE_MTLS_CLIENT_KEY", requires_all = ["mtls_cert", "mtls_peer_cert"])]
    mtls_key: Option<PathBuf>,
    /// The network node's certificate, pinned: `dapi.crt`.
    #[arg(long, env = "MLNODE_MTLS_SERVER_CA", requires_all = ["mtls_cert", "mtls_key"])]
    mtls_peer_cert: Option<PathBuf>,
    /// The Python with vLLM (upstream's `VLLM_PYTHON_PATH`): models the native engine does not
    /// run, or that the GonkaNode gives `engine: vllm`, are served by vLLM servers this daemon
    /// starts and fronts. Unset: no vLLM on this ML node.
    #[arg(long, env = "VLLM_PYTHON_PATH")]
    vllm_python: Option<PathBuf>,
    /// The module vLLM is served with (`python -m`; upstream's `MLNODE_VLLM_MODULE`).
    #[arg(long, env = "MLNODE_VLLM_MODULE", default_value = "vllm.entrypoints.openai.api_server")]
    vllm_module: String,
    /// vLLM instances at most (one per tensor × pipeline parallel block of GPUs; upstream's
    /// `INFERENCE_MAX_INSTANCES`).
    #[arg(long, env = "INFERENCE_MAX_INSTANCES", default_value_t = 128)]
    vllm_max_instances: usize,
    /// A vLLM instance with requests and no scheduler step for this long is killed and
    /// restarted (upstream's `MLNODE_HANG_GRACE_SEC`; 0: never).
    #[arg(long, env = "MLNODE_HANG_GRACE_SEC", default_value_t = 120)]
    vllm_hang_grace_seconds: u64,
    /// Longest a vLLM instance may take to serve (upstream's `VLLM_RUNNER_TIMEOUT`).
    #[arg(long, env = "VLLM_RUNNER_TIMEOUT", default_value_t = 1200)]
    vllm_startup_timeout_seconds: u64,
    /// vLLM instance `i` starts this many seconds times `i` after the first (upstream 5).
    #[arg(long, env = "GONKA_VLLM_STAGGER_SECONDS", default_value_t = 5)]
    vllm_stagger_seconds: u64,
    /// The `LD_LIBRARY_PATH` vLLM runs with, where the daemon's own (its libtorch first) must not
    /// reach vLLM's torch; unset: vLLM inherits the daemon's.
    #[arg(long, env = "GONKA_VLLM_LD_LIBRARY_PATH")]
    vllm_ld_library_path: Option<String>,
    /// How often an opportunistic ML node samples its GPUs for other work, in seconds.
    #[arg(long, env = "GONKA_LENDING_SAMPLE_SECONDS", default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    lending_sample_seconds: u64,
    /// How long after its own GPU work starts an opportunistic ML node takes new processes on its
    /// GPUs for its own, in seconds (long enough for a vLLM server or PoC session to create its
    /// CUDA contexts; every second of it is a second another job can start unnoticed).
    #[arg(long, env = "GONKA_LENDING_ADOPT_SECONDS", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    lending_adopt_seconds: u64,
    /// Log lines as JSON.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log filter, `RUST_LOG` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_filter: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the ML-node API (the default).
    Serve,
    /// Measure PoC v1 nonces per second on this machine; prints one JSON line.
    Bench {
        /// Model shape: `small`, `testnet`, `mainnet`, or the init request's `params` as JSON.
        #[arg(long, default_value = "small")]
        params: String,
        /// Nonces per forward pass.
        #[arg(long, default_value_t = 16)]
        batch_size: usize,
        /// Nonces to compute.
        #[arg(long, default_value_t = 256)]
        nonces: usize,
        /// Distance below which a nonce counts as a proof.
        #[arg(long, default_value_t = 1.4013564660458173)]
        r_target: f64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Bench { params, batch_size, nonces, r_target }) = &cli.command {
        return bench(params, *batch_size, *nonces, *r_target);
    }
    let builder = tracing_subscriber::fmt().with_env_filter(EnvFilter::try_new(&cli.log_filter)?);
    if cli.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
    // On the CPU, libgomp's spinning bounded for the engine's own threads (gonka_inference::
    // cpu_threads): libgomp reads it as it loads, so the daemon starts itself again with it set.
    #[cfg(feature = "torch")]
    if cli.allow_cpu_compute
        && let Err(e) = gonka_inference::cpu_threads::restart_with_bounded_spin()
    {
        tracing::warn!("could not start again with libgomp's spinning bounded ({e}); a MoE on the CPU runs slower");
    }

    let config = cli.config.as_deref().map(gonka_node_daemon::read_config).transpose()?;
    let port = config.as_ref().map_or(8080, |c| c.poc_port);
    let settings = gonka_node_daemon::Settings {
        listen: cli.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port))),
        config,
        nvml_library: cli.nvml_library,
        pod: gonka_node_daemon::PodInfo { name: cli.pod_name, node_name: cli.node_name, ip: cli.pod_ip },
        allow_cpu_compute: cli.allow_cpu_compute,
        shutdown_grace: std::time::Duration::from_secs(cli.shutdown_grace_seconds),
        api_token: match &cli.api_token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| anyhow::anyhow!("reading --api-token-file {}: {e}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            None => None,
        },
        models_dir: cli.models_dir,
        model_mirror: cli.model_mirror,
        models_min_free_gb: cli.models_min_free_gb,
        inference_listen: cli.inference_listen,
        inference_max_in_flight: cli.inference_max_in_flight as usize,
        inference_body_timeout: std::time::Duration::from_secs(cli.inference_body_timeout_seconds),
        metrics_listen: cli.metrics_listen,
        mtls: match (cli.mtls_cert, cli.mtls_key, cli.mtls_peer_cert) {
            (Some(cert), Some(key), Some(peer_cert)) => {
                Some(gonka_node_daemon::mtls::MtlsFiles { cert, key, peer_cert })
            }
            _ => None,
        },
        lending_sample: std::time::Duration::from_secs(cli.lending_sample_seconds),
        lending_adopt: std::time::Duration::from_secs(cli.lending_adopt_seconds),
        vllm: cli.vllm_python.map(|python| gonka_node_daemon::VllmOptions {
            python,
            module: cli.vllm_module,
            max_instances: cli.vllm_max_instances,
            hang_grace: std::time::Duration::from_secs(cli.vllm_hang_grace_seconds),
            startup_timeout: std::time::Duration::from_secs(cli.vllm_startup_timeout_seconds),
            stagger: std::time::Duration::from_secs(cli.vllm_stagger_seconds),
            ld_library_path: cli.vllm_ld_library_path,
        }),
    };
    gonka_node_daemon::run(settings, shutdown_signal()).await
}

/// Named model shapes for `bench`; anything else is parsed as JSON params.
fn bench_params(name: &str) -> anyhow::Result<gonka_node_daemon::poc::params::Params> {
    use gonka_node_daemon::poc::params::Params;
    let json = match name {
        "small" => serde_json::json!({"dim": 256, "n_layers": 4, "n_heads": 8, "n_kv_heads": 8, "vocab_size": 8196,
            "ffn_dim_multiplier": 1.3, "multiple_of": 256, "norm_eps": 1e-5, "rope_theta": 10000.0, "seq_len": 32}),
        "testnet" => {
            serde_json::json!({"dim": 1024, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 8196,
            "ffn_dim_multiplier": 10.0, "multiple_of": 2048, "norm_eps": 1e-5, "rope_theta": 10000.0, "seq_len": 128})
        }
        "mainnet" => return Ok(Params::mainnet()),
        other => serde_json::from_str(other)
            .map_err(|e| anyhow::anyhow!("--params: not a preset nor valid params JSON: {e}"))?,
    };
    Ok(serde_json::from_value(json)?)
}

#[cfg(feature = "torch")]
fn bench(params: &str, batch_size: usize, nonces: usize, r_target: f64) -> anyhow::Result<()> {
    let result = gonka_node_daemon::poc::bench::run(&bench_params(params)?, batch_size, nonces, r_target)?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

#[cfg(not(feature = "torch"))]
fn bench(params: &str, _batch_size: usize, _nonces: usize, _r_target: f64) -> anyhow::Result<()> {
    bench_params(params)?;
    anyhow::bail!("this build has no PoC engine: rebuild with `--features torch` (LIBTORCH pointing at libtorch)")
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
