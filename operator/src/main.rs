//! `gonka-operator`: run the controller, or print the CRD.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gonka_operator::telemetry::{self, LogFormat};
use gonka_operator::{ControllerConfig, LeaseOptions, Options, ReportOptions};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(name = "gonka-operator", version, about = "Puts GPU fleets to work on the Gonka network")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the controller (the default).
    Run,
    /// Print the GonkaNode CustomResourceDefinition as YAML.
    Crd,
    /// Delete every GonkaNode in scope (`--namespace`, else all) and wait until their
    /// finalizers deregistered them (the Helm chart's pre-delete hook; the operator must run).
    Uninstall {
        /// How long to wait for the GonkaNodes to go (the chart keeps it inside Helm's default
        /// 5-minute timeout).
        #[arg(long, default_value_t = 240)]
        timeout_seconds: u64,
    },
}

/// Flags of `run`; global so both `gonka-operator --flag` and `gonka-operator run --flag` work.
#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Node-daemon image for GonkaNodes that set no `spec.image`.
    #[arg(
        global = true,
        long,
        env = "GONKA_DAEMON_IMAGE",
        default_value = "ghcr.io/gonka-operator/gonka-node-daemon:0.1.0"
    )]
    daemon_image: String,
    /// Node-daemon image for GonkaNodes with a model on the vLLM engine (`images/node-daemon-vllm`,
    /// built on upstream's ML-node image); empty: `--daemon-image` for those too.
    #[arg(
        global = true,
        long,
        env = "GONKA_DAEMON_IMAGE_VLLM",
        default_value = "ghcr.io/gonka-operator/gonka-node-daemon-vllm:0.1.0"
    )]
    daemon_image_vllm: String,
    /// Host directories `spec.modelStorage.hostPath` may name or lie under, comma-separated
    /// (e.g. `/srv/gonka-models`). Empty (the default): no GonkaNode gets a hostPath volume: a
    /// hostPath reads the GPU node's own files, in pods the operator creates with its rights.
    #[arg(global = true, long, env = "GONKA_ALLOWED_HOST_PATHS", value_delimiter = ',')]
    allowed_host_paths: Vec<String>,
    /// Image prefixes `spec.image` must start with, comma-separated (a registry or a repository
    /// path, e.g. `ghcr.io/gonka-operator`). Empty (the default): any image.
    #[arg(global = true, long, env = "GONKA_ALLOWED_IMAGE_PREFIXES", value_delimiter = ',')]
    allowed_image_prefixes: Vec<String>,
    /// Watch GonkaNodes in this namespace only (default: all namespaces).
    #[arg(global = true, long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the admin server (/healthz, /readyz, /metrics).
    #[arg(global = true, long, env = "GONKA_ADMIN_ADDR", default_value = "0.0.0.0:8080")]
    admin_addr: SocketAddr,
    /// Address of the report server node-daemons stream to (gRPC); `off` = none.
    #[arg(global = true, long, env = "GONKA_REPORT_ADDR", default_value = "0.0.0.0:8082")]
    report_addr: String,
    /// The report endpoint as daemons reach it, written into their `daemon.json`, e.g.
    /// `https://gonka-operator.gonka-system.svc:8082` (the operator's Service). `https://`
    /// serves TLS under the operator's own CA (kept in `--report-ca-secret`, handed to the
    /// daemons in `daemon.json`); `http://` is plain text (development only). Unset: daemons
    /// don't report (status shows no GPUs, weight or per-node reports).
    #[arg(global = true, long, env = "GONKA_REPORT_URL")]
    report_url: Option<String>,
    /// The Secret, in the operator's namespace, holding the report server's certificate and the
    /// CA bundle daemons trust (created when missing).
    #[arg(global = true, long, default_value = gonka_operator::runtime::REPORT_TLS_SECRET)]
    report_tls_secret: String,
    /// The Secret, in the operator's namespace, holding the report CA's certificate and key
    /// (created when missing; apart from the serving certificate).
    #[arg(global = true, long, default_value = gonka_operator::runtime::REPORT_CA_SECRET)]
    report_ca_secret: String,
    /// The report Service, in the operator's namespace (without a selector): the leader writes
    /// its own address as the Service's endpoint, and the report Secrets go with the Service.
    #[arg(global = true, long, env = "GONKA_REPORT_SERVICE")]
    report_service: Option<String>,
    /// Seconds between checks that the report TLS was not rotated (a rotation restarts the
    /// replica to serve the new certificate).
    #[arg(global = true, long, default_value_t = 600)]
    report_tls_check_seconds: u64,
    /// How daemons prove who they are: `service-account` (their pod's projected token, checked
    /// with a TokenReview) or `none` (development only).
    #[arg(global = true, long, value_enum, default_value_t = ReportAuth::ServiceAccount)]
    report_auth: ReportAuth,
    /// Seconds between daemon heartbeats; a daemon silent for three is counted as gone.
    #[arg(global = true, long, default_value_t = gonka_protocol::report::DEFAULT_HEARTBEAT_SECONDS)]
    report_heartbeat_seconds: u32,
    /// GonkaNodes reconciled at once.
    #[arg(global = true, long, default_value_t = 4)]
    concurrency: u16,
    /// Seconds between drift checks of a steady GonkaNode.
    #[arg(global = true, long, default_value_t = 300)]
    resync_seconds: u64,
    /// Seconds the disruption budgets stay closed while a network node's epoch phase can't be
    /// read (a PoC window may be on); after that evictions are allowed again and the GonkaNode
    /// is Degraded (PocWindowUnknown).
    #[arg(global = true, long, default_value_t = 1800)]
    unknown_poc_window_hold_seconds: u64,
    /// Name of the leader-election Lease.
    #[arg(global = true, long, default_value = "gonka-operator-leader")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else `default`).
    #[arg(global = true, long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease (default: the pod name, else host name and pid).
    #[arg(global = true, long)]
    identity: Option<String>,
    /// This replica's pod: while it leads, the report Service's endpoint (with `--pod-ip`).
    #[arg(global = true, long, env = "POD_NAME")]
    pod_name: Option<String>,
    /// This replica's pod IP (the downward API's `status.podIP`).
    #[arg(global = true, long, env = "POD_IP")]
    pod_ip: Option<String>,
    /// Seconds the Lease stays valid without renewal.
    #[arg(global = true, long, default_value_t = 15)]
    lease_duration_seconds: u64,
    /// Seconds before expiry the holder renews the Lease.
    #[arg(global = true, long, default_value_t = 5)]
    lease_grace_seconds: u64,
    /// Log format.
    #[arg(global = true, long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log filter, `RUST_LOG` syntax.
    #[arg(global = true, long, env = "RUST_LOG", default_value = "info")]
    log_filter: String,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ReportAuth {
    ServiceAccount,
    None,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Crd) = cli.command {
        print!("{}", gonka_crds::crd_yaml());
        return Ok(());
    }
    let args = cli.run;
    telemetry::init(args.log_format, &args.log_filter)?;
    if let Some(Command::Uninstall { timeout_seconds }) = cli.command {
        let client = kube::Client::try_default().await?;
        let holder =
            gonka_operator::uninstall::ensure_operator_leads(client.clone(), &args.lease_namespace, &args.lease_name)
                .await?;
        tracing::info!(%holder, "an operator leads: it will deregister the GonkaNodes' ML nodes");
        let timeout = Duration::from_secs(timeout_seconds);
        let deleted = gonka_operator::uninstall::delete_gonka_nodes(
            client,
            args.namespace.as_deref(),
            timeout,
            Duration::from_secs(2),
        )
        .await?;
        tracing::info!(deleted, "every GonkaNode is gone: its ML nodes were deregistered");
        return Ok(());
    }

    let identity = args.identity.clone().or_else(|| args.pod_name.clone()).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "localhost".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let options = Options {
        controller: ControllerConfig {
            daemon_image: args.daemon_image,
            daemon_image_vllm: args.daemon_image_vllm,
            namespace: args.namespace,
            concurrency: args.concurrency,
            resync: Duration::from_secs(args.resync_seconds),
            unknown_window_hold: Duration::from_secs(args.unknown_poc_window_hold_seconds),
            instance: Some(identity.clone()),
            report: args.report_url.map(|url| gonka_operator::build::ReportEndpoint { url, ca_bundle: None }),
            policy: gonka_operator::validate::ClusterPolicy::new(
                args.allowed_host_paths.into_iter().filter(|p| !p.is_empty()).collect(),
                args.allowed_image_prefixes.into_iter().filter(|p| !p.is_empty()).collect(),
            )
            .map_err(anyhow::Error::msg)?,
            ..ControllerConfig::default()
        },
        reports: ReportOptions {
            addr: match args.report_addr.as_str() {
                "off" => None,
                addr => Some(addr.parse().map_err(|e| anyhow::anyhow!("--report-addr {addr}: {e}"))?),
            },
            authenticate: args.report_auth == ReportAuth::ServiceAccount,
            heartbeat: Duration::from_secs(u64::from(args.report_heartbeat_seconds.max(1))),
            tls_secret: args.report_tls_secret,
            ca_secret: args.report_ca_secret,
            service: args.report_service,
            tls_check: Duration::from_secs(args.report_tls_check_seconds.max(1)),
        },
        lease: LeaseOptions {
            name: args.lease_name,
            namespace: args.lease_namespace,
            identity,
            duration_seconds: args.lease_duration_seconds,
            grace_seconds: args.lease_grace_seconds,
            pod: args.pod_name,
            pod_ip: args.pod_ip,
        },
        admin_addr: args.admin_addr,
        api_requests: gonka_operator::metrics::ApiRequests::default(),
    };

    let client = options.api_requests.client(kube::Config::infer().await?)?;
    let stop = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));
    gonka_operator::run(client, options, stop, None).await?;
    Ok(())
}

async fn stop_on_signal(stop: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
    stop.cancel();
}
