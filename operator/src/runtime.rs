//! Running the operator: admin server, CRD check, leader election, controller.
//!
//! Every replica serves `/healthz`, `/readyz` and `/metrics`; only the holder of the Lease
//! runs the controller, so two replicas never write at once. A replica that loses the lease
//! stops its controller and returns [`RunError::LostLeadership`] (the binary exits and is
//! restarted as a follower). On shutdown the lease is released so a follower takes over at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gonka_crds::GonkaNode;
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::{self, Context, ControllerConfig};
use crate::http::{self, AdminState};
use crate::metrics::Metrics;
use crate::report_server::{self, ReportAuth, ReportService};
use crate::report_store::ReportStore;
use crate::report_tls;
use kube::runtime::events::{Recorder, Reporter};

/// The Lease that elects the leader.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    pub namespace: String,
    /// Unique per replica; the pod name in a cluster.
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry the holder renews.
    pub grace_seconds: u64,
    /// This replica's pod (in `namespace`), labelled [`LEADER_LABEL`] while it leads so the
    /// report Service routes to the leader alone; `None` outside a cluster.
    pub pod: Option<String>,
}

/// On the leading replica's pod; the report Service selects it.
pub const LEADER_LABEL: &str = "gonka.ai/operator-leader";

#[derive(Clone, Debug)]
pub struct Options {
    pub controller: ControllerConfig,
    pub lease: LeaseOptions,
    /// Where `/healthz`, `/readyz` and `/metrics` listen.
    pub admin_addr: SocketAddr,
    pub reports: ReportOptions,
    /// The counter the client was built with ([`crate::metrics::ApiRequests::client`]), shown
    /// on `/metrics`; default: a fresh one (nothing counted).
    pub api_requests: crate::metrics::ApiRequests,
}

/// The report server the node-daemons stream to.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Where it listens; `None` = no report server.
    pub addr: Option<SocketAddr>,
    /// Check daemons' tokens with TokenReview (`true`), or take them at their word.
    pub authenticate: bool,
    /// The heartbeat interval daemons are asked for.
    pub heartbeat: std::time::Duration,
    /// The Secret (in the Lease's namespace) holding the report server's CA and certificate,
    /// used when the report URL is `https://` (see [`crate::report_tls`]).
    pub tls_secret: String,
}

/// The report TLS Secret's default name.
pub const REPORT_TLS_SECRET: &str = "gonka-operator-report-tls";

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            addr: None,
            authenticate: true,
            heartbeat: std::time::Duration::from_secs(u64::from(gonka_protocol::report::DEFAULT_HEARTBEAT_SECONDS)),
            tls_secret: REPORT_TLS_SECRET.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(
        "the GonkaNode CRD is not installed (gonkanodes.gonka.ai not found): install it with `kubectl apply --server-side -f crds/gonkanode.yaml` or the Helm chart"
    )]
    CrdMissing,
    #[error("talking to the apiserver: {0}")]
    Api(#[from] kube::Error),
    #[error("leader election: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease to another replica; stopping so this one restarts as a follower")]
    LostLeadership,
    #[error("admin server: {0}")]
    Io(#[from] std::io::Error),
    #[error("report server TLS: {0}")]
    ReportTls(#[from] crate::report_tls::TlsError),
}

/// A running operator's handles, for callers that need the admin address or metrics.
pub struct Running {
    pub admin_addr: SocketAddr,
    /// Where the report server listens, if it runs.
    pub report_addr: Option<SocketAddr>,
    pub metrics: Metrics,
}

/// Runs the operator until `stop` is cancelled (Ok) or leadership is lost (Err). `started`
/// receives the admin address and metrics once the server listens.
pub async fn run(
    client: Client,
    options: Options,
    stop: CancellationToken,
    started: Option<tokio::sync::oneshot::Sender<Running>>,
) -> Result<(), RunError> {
    let metrics = Metrics::new(options.api_requests.clone());
    let ready = Arc::new(AtomicBool::new(false));
    let admin = AdminState { metrics: metrics.clone(), ready: ready.clone() };
    let server_stop = stop.child_token();
    let (admin_addr, server) = http::serve(options.admin_addr, admin, server_stop.clone().cancelled_owned()).await?;
    info!(%admin_addr, "admin server listening");

    let reports = ReportStore::default();
    let leading = Arc::new(AtomicBool::new(false));
    let mut report_addr = None;
    let mut report_server = None;
    let mut options = options;
    if let Some(addr) = options.reports.addr {
        // The URL's scheme decides: https (the manifests' and chart's) serves TLS under the
        // operator's CA, which the daemons get in daemon.json; http is for development.
        let tls = match options.controller.report.as_ref().map(|r| r.url.clone()).as_deref() {
            Some(url) if url.starts_with("https://") => {
                let hosts = vec![report_tls::host_of(url)?];
                let tls =
                    report_tls::ensure(client.clone(), &options.lease.namespace, &options.reports.tls_secret, &hosts)
                        .await?;
                if let Some(report) = options.controller.report.as_mut() {
                    report.ca_bundle = Some(tls.ca_pem.clone());
                }
                Some(tls)
            }
            Some(url) => {
                warn!(%url, "the report URL is plain http: the daemons' pod tokens travel unencrypted");
                None
            }
            None => None,
        };
        let auth = if options.reports.authenticate {
            ReportAuth::service_account(client.clone())
        } else {
            warn!("--report-auth none: node-daemon reports are not authenticated");
            ReportAuth::None
        };
        let reporter =
            Reporter { controller: crate::build::MANAGER.into(), instance: options.controller.instance.clone() };
        let service = ReportService {
            store: reports.clone(),
            auth,
            leading: leading.clone(),
            heartbeat: options.reports.heartbeat,
            metrics: metrics.clone(),
            recorder: Recorder::new(client.clone(), reporter),
            stop: server_stop.clone(),
            streams: Arc::new(tokio::sync::Semaphore::new(report_server::MAX_STREAMS)),
        };
        let (addr, task) = report_server::serve(addr, service, tls.as_ref()).await?;
        info!(%addr, "report server listening");
        report_addr = Some(addr);
        report_server = Some(task);
    }
    if let Some(started) = started {
        let _ = started.send(Running { admin_addr, report_addr, metrics: metrics.clone() });
    }

    let result = lead_and_reconcile(client, &options, &metrics, &ready, &stop, &reports, &leading).await;
    server_stop.cancel();
    let _ = server.await;
    if let Some(task) = report_server {
        let _ = task.await;
    }
    result
}

async fn lead_and_reconcile(
    client: Client,
    options: &Options,
    metrics: &Metrics,
    ready: &AtomicBool,
    stop: &CancellationToken,
    reports: &ReportStore,
    leading_flag: &AtomicBool,
) -> Result<(), RunError> {
    check_crd(&client, options.controller.namespace.as_deref()).await?;
    ready.store(true, Ordering::Relaxed);
    // A restarted container keeps its pod's labels: it is no leader until it wins again.
    mark_leader(&client, &options.lease, false).await;

    let lease = &options.lease;
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .with_field_manager(crate::build::MANAGER)
        .build()
        .await?;
    let (mut leading, lease_task) = manager.watch().await;
    info!(identity = %lease.identity, lease = %lease.name, "waiting for the leader lease");

    let outcome = async {
        while !*leading.borrow_and_update() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                changed = leading.changed() => if changed.is_err() { return Err(RunError::LostLeadership) },
            }
        }
        info!(identity = %lease.identity, "leading: starting the controller");
        metrics.leader.set(1);
        leading_flag.store(true, Ordering::Relaxed);
        mark_leader(&client, lease, true).await;
        let ctx = Arc::new(
            Context::new(client.clone(), options.controller.clone(), metrics.clone()).with_reports(reports.clone()),
        );
        let controller_stop = stop.child_token();
        let mut controller = tokio::spawn(controller::run(ctx, controller_stop.clone()));
        let (result, finished) = tokio::select! {
            _ = stop.cancelled() => (Ok(()), false),
            _ = &mut controller => (Ok(()), true),
            lost = lost_lease(&mut leading) => {
                warn!(identity = %lease.identity, "lost the leader lease");
                (Err(lost), false)
            }
        };
        controller_stop.cancel();
        if !finished {
            let _ = controller.await;
        }
        metrics.leader.set(0);
        leading_flag.store(false, Ordering::Relaxed);
        mark_leader(&client, lease, false).await;
        result
    }
    .await;

    // Closing the channel makes the lease task release the lease before it ends.
    drop(leading);
    match lease_task.await {
        Ok(Err(e)) => warn!(error = %e, "releasing the leader lease"),
        Err(e) => warn!(error = %e, "lease task failed"),
        Ok(Ok(_)) => info!("leader lease released"),
    }
    outcome
}

/// Labels this replica's pod as the leader, or takes the label off. A failure is logged, not
/// fatal: the report Service then misses the leader (or keeps a follower, which answers
/// `UNAVAILABLE`), and daemons retry until it is put right.
async fn mark_leader(client: &Client, lease: &LeaseOptions, leading: bool) {
    let Some(pod) = &lease.pod else { return };
    let pods: Api<Pod> = Api::namespaced(client.clone(), &lease.namespace);
    let value = if leading { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: value}}});
    match pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
        Ok(_) => info!(%pod, leading, "leader label set on this replica's pod"),
        Err(e) => {
            warn!(%pod, leading, error = %e, "could not label this replica's pod; the report Service may route to the wrong replica")
        }
    }
}

/// Resolves when this replica no longer holds the lease.
async fn lost_lease(leading: &mut tokio::sync::watch::Receiver<bool>) -> RunError {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return RunError::LostLeadership;
        }
    }
}

/// Fails fast, with the fix in the message, when the CRD is missing.
async fn check_crd(client: &Client, namespace: Option<&str>) -> Result<(), RunError> {
    let api: Api<GonkaNode> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    match api.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Err(RunError::CrdMissing),
        Err(e) => Err(e.into()),
    }
}
