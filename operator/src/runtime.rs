//! Running the operator: admin server, CRD check, leader election, controller.
//!
//! Every replica serves `/healthz`, `/readyz` and `/metrics`; only the holder of the Lease
//! runs the controller, so two replicas never write at once. A replica that loses the lease
//! stops its controller and returns [`RunError::LostLeadership`] (the binary exits and is
//! restarted as a follower). On shutdown the lease is released so a follower takes over at once.
//! The leader points the report Service at itself ([`crate::report_endpoint`]). Every replica
//! checks the report TLS every [`ReportOptions::tls_check`] and, when it was rotated
//! ([`crate::report_tls`]), stops with [`RunError::ReportTlsRotated`] to be restarted serving
//! the new certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use gonka_crds::GonkaNode;
use k8s_openapi::api::core::v1::Service;
use kube::Client;
use kube::api::{Api, ListParams};
use kube_lease_manager::LeaseManagerBuilder;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::controller::{self, Context, ControllerConfig};
use crate::http::{self, AdminState};
use crate::metrics::Metrics;
use crate::report_endpoint::{self, Leader};
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
    /// This replica's pod (in `namespace`) and its IP: while it leads, the report Service's
    /// endpoint; `None` outside a cluster.
    pub pod: Option<String>,
    pub pod_ip: Option<String>,
}

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
    /// The Secrets (in the Lease's namespace) holding the report server's certificate and the
    /// CA's, used when the report URL is `https://` (see [`crate::report_tls`]).
    pub tls_secret: String,
    pub ca_secret: String,
    /// The report Service (in the Lease's namespace), whose endpoint the leader writes and which
    /// owns the report Secrets; `None`: no Service (development).
    pub service: Option<String>,
    /// How often every replica checks whether the report TLS was rotated.
    pub tls_check: std::time::Duration,
}

/// The report TLS Secrets' default names.
pub const REPORT_TLS_SECRET: &str = "gonka-operator-report-tls";
pub const REPORT_CA_SECRET: &str = "gonka-operator-report-ca";

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            addr: None,
            authenticate: true,
            heartbeat: std::time::Duration::from_secs(u64::from(gonka_protocol::report::DEFAULT_HEARTBEAT_SECONDS)),
            tls_secret: REPORT_TLS_SECRET.into(),
            ca_secret: REPORT_CA_SECRET.into(),
            service: None,
            tls_check: std::time::Duration::from_secs(600),
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
    #[error("the report server's certificate was rotated; stopping so this replica restarts serving the new one")]
    ReportTlsRotated,
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
    let mut tls_watch = None;
    let mut endpoint = None;
    let mut options = options;
    if let Some(addr) = options.reports.addr {
        let service = match &options.reports.service {
            Some(name) => {
                let found = Api::<Service>::namespaced(client.clone(), &options.lease.namespace).get_opt(name).await?;
                if found.is_none() {
                    warn!(service = %name, "the report Service does not exist: no endpoint is written for it");
                }
                found
            }
            None => None,
        };
        // The URL's scheme decides: https (the manifests' and chart's) serves TLS under the
        // operator's CA, which the daemons get in daemon.json; http is for development.
        let tls = match options.controller.report.as_ref().map(|r| r.url.clone()).as_deref() {
            Some(url) if url.starts_with("https://") => {
                let hosts = vec![report_tls::host_of(url)?];
                let secrets = report_tls::TlsSecrets {
                    namespace: options.lease.namespace.clone(),
                    ca: options.reports.ca_secret.clone(),
                    serving: options.reports.tls_secret.clone(),
                    owner: service.as_ref().and_then(report_endpoint::owner),
                };
                let tls = report_tls::ensure(client.clone(), &secrets, &hosts).await?;
                if let Some(report) = options.controller.report.as_mut() {
                    report.ca_bundle = Some(tls.ca_pem.clone());
                }
                tls_watch = Some((secrets, hosts, tls.clone()));
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
        let service_impl = ReportService {
            store: reports.clone(),
            auth,
            leading: leading.clone(),
            heartbeat: options.reports.heartbeat,
            metrics: metrics.clone(),
            recorder: Recorder::new(client.clone(), reporter),
            stop: server_stop.clone(),
            streams: Arc::new(tokio::sync::Semaphore::new(report_server::MAX_STREAMS)),
        };
        let (addr, task) = report_server::serve(addr, service_impl, tls.as_ref()).await?;
        info!(%addr, "report server listening");
        if let (Some(service), Some(pod), Some(ip)) = (service, &options.lease.pod, &options.lease.pod_ip) {
            endpoint = Some((service, Leader { pod: pod.clone(), ip: ip.clone(), port: addr.port() }));
        }
        report_addr = Some(addr);
        report_server = Some(task);
    }
    if let Some(started) = started {
        let _ = started.send(Running { admin_addr, report_addr, metrics: metrics.clone() });
    }

    // A rotation stops this replica: the leading part first (it releases the lease), then the
    // servers; the binary exits and is restarted with the new certificate.
    let leading_stop = stop.child_token();
    let rotated = Arc::new(AtomicBool::new(false));
    let watcher = tls_watch.map(|(secrets, hosts, served)| {
        let (client, leading_stop, rotated, every) =
            (client.clone(), leading_stop.clone(), rotated.clone(), options.reports.tls_check);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = leading_stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                match report_tls::ensure(client.clone(), &secrets, &hosts).await {
                    Ok(now) if now == served => {}
                    Ok(_) => {
                        info!("the report TLS was rotated: restarting to serve it");
                        rotated.store(true, Ordering::SeqCst);
                        leading_stop.cancel();
                        return;
                    }
                    Err(e) => warn!(error = %e, "checking the report TLS"),
                }
            }
        })
    });
    let signals = LeaderSignals { leading: &leading, endpoint: endpoint.as_ref() };
    let result = lead_and_reconcile(client, &options, &metrics, &ready, &leading_stop, &reports, signals).await;
    let result = if rotated.load(Ordering::SeqCst) { Err(RunError::ReportTlsRotated) } else { result };
    leading_stop.cancel();
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    server_stop.cancel();
    let _ = server.await;
    if let Some(task) = report_server {
        let _ = task.await;
    }
    result
}

/// How this replica tells others it leads: the report server's flag, and the report Service's
/// endpoint (the Service and this replica's address) when there is one.
struct LeaderSignals<'a> {
    leading: &'a AtomicBool,
    endpoint: Option<&'a (Service, Leader)>,
}

async fn lead_and_reconcile(
    client: Client,
    options: &Options,
    metrics: &Metrics,
    ready: &AtomicBool,
    stop: &CancellationToken,
    reports: &ReportStore,
    leader: LeaderSignals<'_>,
) -> Result<(), RunError> {
    let LeaderSignals { leading: leading_flag, endpoint } = leader;
    check_crd(&client, options.controller.namespace.as_deref()).await?;
    ready.store(true, Ordering::Relaxed);
    // A restarted replica may still be listed: it is no leader until it wins again.
    point_report_service(&client, endpoint, false).await;

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
        point_report_service(&client, endpoint, true).await;
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
        point_report_service(&client, endpoint, false).await;
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

/// Points the report Service at this replica (`leading`), or takes this replica's address out
/// of it. A failure is logged, not fatal: the Service then misses the leader (or keeps a
/// follower, which answers `UNAVAILABLE`), and daemons retry until it is put right.
async fn point_report_service(client: &Client, endpoint: Option<&(Service, Leader)>, leading: bool) {
    let Some((service, me)) = endpoint else { return };
    let (leader, withdraw) = if leading { (Some(me), None) } else { (None, Some(me.ip.as_str())) };
    match report_endpoint::write(client.clone(), service, leader, withdraw, me.port).await {
        Ok(true) => info!(pod = %me.pod, ip = %me.ip, leading, "report Service endpoint written"),
        Ok(false) => {}
        Err(e) => {
            warn!(pod = %me.pod, leading, error = %e, "could not write the report Service's endpoint; reports may go to the wrong replica")
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
