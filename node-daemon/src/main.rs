//! `gonka-node-daemon`: the ML node of a GonkaNode pod.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Settings come from flags, else environment, else the operator's `daemon.json`.
#[derive(Parser, Debug)]
#[command(name = "gonka-node-daemon", version, about = "A Gonka ML node: GPU probe and the ML-node management API")]
struct Cli {
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
    /// Log lines as JSON.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    /// Log filter, `RUST_LOG` syntax.
    #[arg(long, env = "RUST_LOG", default_value = "info")]
    log_filter: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let builder = tracing_subscriber::fmt().with_env_filter(EnvFilter::try_new(&cli.log_filter)?);
    if cli.log_format == "json" {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }

    let config = cli.config.as_deref().map(gonka_node_daemon::read_config).transpose()?;
    let port = config.as_ref().map_or(8080, |c| c.poc_port);
    let settings = gonka_node_daemon::Settings {
        listen: cli.listen.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], port))),
        config,
        nvml_library: cli.nvml_library,
    };
    gonka_node_daemon::run(settings, shutdown_signal()).await
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}
