//! The gRPC server node-daemons report to (`gonka.report.v1.FleetReports`, see
//! `protocol/proto/gonka/report/v1/report.proto`).
//!
//! Every replica listens, over TLS under the operator's own CA ([`crate::report_tls`]); the
//! Service routes to the leader (it writes its own endpoint, [`crate::report_endpoint`]), and a follower reached
//! anyway (a stale endpoint during a leader change) answers `UNAVAILABLE` so the daemon retries:
//! the replica that writes status is the one that holds the reports.
//!
//! A stream is let in when its bearer token passes a TokenReview (audience `gonka-operator`)
//! as the GonkaNode's own ServiceAccount, bound to the pod that `Hello` names — a daemon can
//! speak only for its own pod. `--report-auth none` skips the check (development only).
//!
//! Bounded: messages up to 256 KiB, [`MAX_STREAMS`] streams at once, at most
//! [`MAX_TOKEN_REVIEWS`] TokenReviews in flight (more callers are told to come back), and a
//! reviewed token is remembered for [`TOKEN_CACHE_TTL`] so reconnects don't each cost one.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::Stream;
use gonka_protocol::report::fleet_reports_server::{FleetReports, FleetReportsServer};
use gonka_protocol::report::{self as proto, daemon_message::Body, operator_message};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, PostParams};
use kube::runtime::events::{Event, EventType, Recorder};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::build::Names;
use crate::metrics::Metrics;
use crate::report_store::{Connection, ReportStore};

/// How the operator checks who is reporting.
#[derive(Clone)]
pub enum ReportAuth {
    /// TokenReview of the daemon's projected ServiceAccount token.
    ServiceAccount(TokenReviewer),
    /// Take `Hello` at its word. For development against a local apiserver only.
    None,
}

/// Who a token belongs to, as the apiserver says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The pod the token is bound to.
    pub pod: Option<String>,
    /// The node that pod runs on.
    pub node: Option<String>,
}

/// Largest message a daemon may send (a snapshot of 64 GPUs is a few KiB).
pub const MAX_MESSAGE_BYTES: usize = 256 << 10;
/// Report streams open at once (one per ML-node pod, with room for reconnects).
pub const MAX_STREAMS: usize = 16_384;
/// TokenReviews in flight at once; beyond, a caller gets `UNAVAILABLE` and retries later.
pub const MAX_TOKEN_REVIEWS: usize = 16;
/// How long a reviewed token is taken without asking the apiserver again.
pub const TOKEN_CACHE_TTL: Duration = Duration::from_secs(60);
/// Reviewed tokens remembered at once.
const TOKEN_CACHE_ENTRIES: usize = 16_384;
/// How long a refused token is refused without asking the apiserver again: a caller repeating
/// one bad token costs one review, not one per attempt.
pub const REFUSAL_CACHE_TTL: Duration = Duration::from_secs(10);

/// What can be told from a token before the apiserver is asked: it must be a JWT for the
/// operator's audience that has not expired (the apiserver checks the signature). Tokens for
/// another audience, expired ones and garbage cost no TokenReview.
pub fn precheck_token(token: &str, now_unix: i64) -> Result<(), &'static str> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT");
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|_| "not a JWT")?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).map_err(|_| "not a JWT")?;
    let audience_ok = match &claims["aud"] {
        serde_json::Value::String(aud) => aud == proto::TOKEN_AUDIENCE,
        serde_json::Value::Array(auds) => auds.iter().any(|a| a == proto::TOKEN_AUDIENCE),
        _ => false,
    };
    if !audience_ok {
        return Err("not for the operator's audience");
    }
    match claims["exp"].as_i64() {
        Some(exp) if exp > now_unix => Ok(()),
        _ => Err("expired"),
    }
}

/// Tokens the apiserver vouched for lately, by SHA-256 (the tokens themselves are not kept).
#[derive(Default)]
pub struct TokenCache {
    entries: std::sync::Mutex<std::collections::HashMap<[u8; 32], (Caller, std::time::Instant)>>,
    refused: std::sync::Mutex<std::collections::HashMap<[u8; 32], std::time::Instant>>,
}

impl TokenCache {
    fn digest(token: &str) -> [u8; 32] {
        use sha2::Digest;
        sha2::Sha256::digest(token.as_bytes()).into()
    }

    pub fn get(&self, token: &str, now: std::time::Instant) -> Option<Caller> {
        let entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (caller, at) = entries.get(&Self::digest(token))?;
        (now.duration_since(*at) < TOKEN_CACHE_TTL).then(|| caller.clone())
    }

    pub fn put(&self, token: &str, caller: Caller, now: std::time::Instant) {
        let mut entries = self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if entries.len() >= TOKEN_CACHE_ENTRIES {
            entries.retain(|_, (_, at)| now.duration_since(*at) < TOKEN_CACHE_TTL);
            if entries.len() >= TOKEN_CACHE_ENTRIES {
                entries.clear();
            }
        }
        entries.insert(Self::digest(token), (caller, now));
    }

    /// Whether `token` was refused within [`REFUSAL_CACHE_TTL`].
    pub fn is_refused(&self, token: &str, now: std::time::Instant) -> bool {
        let refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        refused.get(&Self::digest(token)).is_some_and(|at| now.duration_since(*at) < REFUSAL_CACHE_TTL)
    }

    pub fn put_refusal(&self, token: &str, now: std::time::Instant) {
        let mut refused = self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if refused.len() >= TOKEN_CACHE_ENTRIES {
            refused.retain(|_, at| now.duration_since(*at) < REFUSAL_CACHE_TTL);
            if refused.len() >= TOKEN_CACHE_ENTRIES {
                refused.clear();
            }
        }
        refused.insert(Self::digest(token), now);
    }

    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// TokenReviews one peer address may cause: a burst, then one per [`PEER_REVIEW_EVERY`]. A
/// daemon reconnects with a token already reviewed (remembered for a minute) or a new one now
/// and then; a pod flooding the port with fresh tokens is held to this while the others get
/// their share of the [`MAX_TOKEN_REVIEWS`] slots.
pub const PEER_REVIEW_BURST: u32 = 8;
pub const PEER_REVIEW_EVERY: Duration = Duration::from_secs(5);
/// Peers remembered at most (as many as report streams).
const PEER_ENTRIES: usize = 16_384;

/// A token bucket per peer address.
#[derive(Debug, Default)]
pub struct PeerLimiter {
    peers: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
}

impl PeerLimiter {
    /// Takes one review from `peer`'s bucket if it has one.
    pub fn allow(&self, peer: std::net::IpAddr, now: std::time::Instant) -> bool {
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let refilled = PEER_REVIEW_EVERY * PEER_REVIEW_BURST;
        if peers.len() >= PEER_ENTRIES && !peers.contains_key(&peer) {
            // A full bucket is as good as none: forget those.
            peers.retain(|_, (_, at)| now.duration_since(*at) < refilled);
            if peers.len() >= PEER_ENTRIES {
                peers.clear();
            }
        }
        let burst = f64::from(PEER_REVIEW_BURST);
        let (tokens, at) = peers.entry(peer).or_insert((burst, now));
        let earned = now.duration_since(*at).as_secs_f64() / PEER_REVIEW_EVERY.as_secs_f64();
        *tokens = (*tokens + earned).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Asks the apiserver who a token belongs to, remembering answers and bounding questions.
#[derive(Clone)]
pub struct TokenReviewer {
    client: kube::Client,
    cache: Arc<TokenCache>,
    in_flight: Arc<tokio::sync::Semaphore>,
    peers: Arc<PeerLimiter>,
}

impl TokenReviewer {
    pub fn new(client: kube::Client) -> Self {
        Self {
            client,
            cache: Arc::default(),
            in_flight: Arc::new(tokio::sync::Semaphore::new(MAX_TOKEN_REVIEWS)),
            peers: Arc::default(),
        }
    }
}

impl ReportAuth {
    /// TokenReview of the daemons' tokens through `client`.
    pub fn service_account(client: kube::Client) -> Self {
        Self::ServiceAccount(TokenReviewer::new(client))
    }

    async fn authenticate(
        &self,
        token: Option<&str>,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Option<Caller>, Status> {
        let Self::ServiceAccount(reviewer) = self else { return Ok(None) };
        let token = token.ok_or_else(|| Status::unauthenticated("no bearer token: send the pod's report token"))?;
        let now = std::time::Instant::now();
        if let Some(caller) = reviewer.cache.get(token, now) {
            return Ok(Some(caller));
        }
        let refused = || Status::unauthenticated("the report token was refused: send the pod's projected report token");
        if let Err(why) = precheck_token(token, jiff::Timestamp::now().as_second()) {
            tracing::debug!(why, "report token refused before review");
            return Err(refused());
        }
        if reviewer.cache.is_refused(token, now) {
            return Err(refused());
        }
        if let Some(peer) = peer
            && !reviewer.peers.allow(peer, now)
        {
            return Err(Status::resource_exhausted(format!(
                "too many new report tokens from {peer}: one check per {}s after {PEER_REVIEW_BURST}; retry later",
                PEER_REVIEW_EVERY.as_secs()
            )));
        }
        let Ok(_permit) = reviewer.in_flight.try_acquire() else {
            return Err(Status::unavailable(format!("{MAX_TOKEN_REVIEWS} token checks under way; retry")));
        };
        match Self::review(&reviewer.client, token).await {
            Ok(caller) => {
                reviewer.cache.put(token, caller.clone(), std::time::Instant::now());
                Ok(Some(caller))
            }
            Err(status) if status.code() == tonic::Code::Unauthenticated => {
                reviewer.cache.put_refusal(token, std::time::Instant::now());
                Err(status)
            }
            Err(status) => Err(status),
        }
    }

    async fn review(client: &kube::Client, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![proto::TOKEN_AUDIENCE.to_string()]),
            },
            ..TokenReview::default()
        };
        let reviewed =
            Api::<TokenReview>::all(client.clone()).create(&PostParams::default(), &review).await.map_err(|e| {
                // The apiserver's words stay in the operator's log: the caller is not yet known.
                tracing::warn!(error = %e, "TokenReview failed");
                Status::unavailable("the operator could not check the token now; retry")
            })?;
        let status = reviewed.status.unwrap_or_default();
        let for_us = status.audiences.as_ref().is_some_and(|a| a.iter().any(|a| a == proto::TOKEN_AUDIENCE));
        if status.authenticated != Some(true) || !for_us {
            let why = status.error.unwrap_or_else(|| "not for the operator's audience".into());
            tracing::debug!(%why, "report token refused by TokenReview");
            return Err(Status::unauthenticated("the report token was refused: send the pod's projected report token"));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
        else {
            return Err(Status::permission_denied(format!("{username} is not a ServiceAccount")));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
        Ok(Caller {
            namespace: namespace.into(),
            service_account: service_account.into(),
            pod: first(POD_NAME_EXTRA),
            node: first(NODE_NAME_EXTRA),
        })
    }
}

/// Checks that `caller` may report as `hello` says; returns the GonkaNode's key.
pub fn check_identity(hello: &proto::Hello, caller: Option<&Caller>) -> Result<(String, String), String> {
    let (namespace, name) = hello
        .gonka_node
        .split_once('/')
        .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
        .ok_or_else(|| format!("hello.gonka_node {:?} is not <namespace>/<name>", hello.gonka_node))?;
    if hello.pod_name.is_empty() {
        return Err("hello.pod_name is empty".into());
    }
    if let Some(caller) = caller {
        let expected = Names::of(name).service_account;
        if caller.namespace != namespace || caller.service_account != expected {
            return Err(format!(
                "ServiceAccount {}/{} may not report for GonkaNode {namespace}/{name} (its ServiceAccount is {expected})",
                caller.namespace, caller.service_account
            ));
        }
        match &caller.pod {
            Some(pod) if *pod != hello.pod_name => {
                return Err(format!("the token is bound to pod {pod}, not {}", hello.pod_name));
            }
            None => return Err("the token is not bound to a pod: use the pod's projected token".into()),
            Some(_) => {}
        }
        if let Some(node) = &caller.node
            && *node != hello.kubernetes_node
        {
            return Err(format!("pod {} runs on {node}, not {}", hello.pod_name, hello.kubernetes_node));
        }
    }
    Ok((namespace.to_string(), name.to_string()))
}

/// The service.
#[derive(Clone)]
pub struct ReportService {
    pub store: ReportStore,
    pub auth: ReportAuth,
    /// True while this replica leads.
    pub leading: Arc<AtomicBool>,
    pub heartbeat: Duration,
    pub metrics: Metrics,
    /// Kubernetes events for GPU faults, on the GonkaNode.
    pub recorder: Recorder,
    /// Ends every stream (shutdown).
    pub stop: CancellationToken,
    /// Streams open now, at most [`MAX_STREAMS`].
    pub streams: Arc<tokio::sync::Semaphore>,
}

type OperatorStream = Pin<Box<dyn Stream<Item = Result<proto::OperatorMessage, Status>> + Send>>;

fn bearer(request: &Request<Streaming<proto::DaemonMessage>>) -> Option<String> {
    let value = request.metadata().get("authorization")?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(|t| t.trim().to_string())
}

#[tonic::async_trait]
impl FleetReports for ReportService {
    type ReportStream = OperatorStream;

    async fn report(
        &self,
        request: Request<Streaming<proto::DaemonMessage>>,
    ) -> Result<Response<Self::ReportStream>, Status> {
        if !self.leading.load(Ordering::Relaxed) {
            return Err(Status::unavailable("this operator replica is not the leader; reconnect"));
        }
        let Ok(stream_permit) = self.streams.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!("{MAX_STREAMS} report streams open already")));
        };
        let token = bearer(&request);
        let peer = request.remote_addr().map(|a| a.ip());
        let caller = self.auth.authenticate(token.as_deref(), peer).await?;
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(Duration::from_secs(10), inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no hello within 10s"))??;
        let Some(proto::DaemonMessage { seq, body: Some(Body::Hello(hello)) }) = first else {
            return Err(Status::invalid_argument("the first message must be a hello"));
        };
        let key = check_identity(&hello, caller.as_ref()).map_err(Status::permission_denied)?;
        info!(gonka_node = %hello.gonka_node, pod = %hello.pod_name, node = %hello.kubernetes_node, "ML node reporting");
        let connection = self.store.connect(key, hello.clone(), seq);

        let (tx, rx) = mpsc::channel(16);
        let welcome =
            operator_message::Body::Welcome(proto::Welcome { heartbeat_seconds: self.heartbeat.as_secs() as u32 });
        let _ = tx.try_send(Ok(proto::OperatorMessage { body: Some(welcome) }));
        let service = self.clone();
        tokio::spawn(async move {
            let _permit = stream_permit;
            service.metrics.report_streams.inc();
            let end = service.serve_stream(&connection, &hello, &mut inbound, &tx).await;
            service.metrics.report_streams.dec();
            service.store.disconnect(&connection);
            match end {
                Ok(()) => info!(pod = %hello.pod_name, "report stream ended"),
                // Silence is worth a warning; a daemon going away (pod deleted, node drained,
                // operator shutting down) is everyday Kubernetes.
                Err(status) if status.code() == tonic::Code::DeadlineExceeded => {
                    warn!(pod = %hello.pod_name, reason = %status.message(), "report stream ended");
                    let _ = tx.try_send(Err(status));
                }
                Err(status) => {
                    info!(pod = %hello.pod_name, reason = %status.message(), "report stream ended");
                    let _ = tx.try_send(Err(status));
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as OperatorStream))
    }
}

impl ReportService {
    async fn serve_stream(
        &self,
        connection: &Connection,
        hello: &proto::Hello,
        inbound: &mut Streaming<proto::DaemonMessage>,
        tx: &mpsc::Sender<Result<proto::OperatorMessage, Status>>,
    ) -> Result<(), Status> {
        // Three missed heartbeats and the daemon counts as gone.
        let silence = self.heartbeat * 3;
        loop {
            let message = tokio::select! {
                _ = self.stop.cancelled() => return Err(Status::unavailable("the operator is shutting down")),
                m = tokio::time::timeout(silence, inbound.message()) => m,
            };
            let message = match message {
                Err(_) => return Err(Status::deadline_exceeded(format!("no message for {}s", silence.as_secs()))),
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => return Ok(()),
                Ok(Ok(Some(m))) => m,
            };
            if !self.leading.load(Ordering::Relaxed) {
                return Err(Status::unavailable("this operator replica is no longer the leader; reconnect"));
            }
            let received = self.store.receive(connection, message);
            if received.superseded {
                return Err(Status::aborted("a newer report stream from this pod took over"));
            }
            if let Some(event) = received.event {
                self.gpu_event(hello, &event).await;
            }
            // Acks are cumulative: when the daemon is slow to read, skipping one loses nothing.
            let ack = operator_message::Body::Ack(proto::Ack { seq: received.ack });
            let _ = tx.try_send(Ok(proto::OperatorMessage { body: Some(ack) }));
        }
    }

    async fn gpu_event(&self, hello: &proto::Hello, event: &proto::GpuEvent) {
        let class = proto::XidClass::try_from(event.class).unwrap_or(proto::XidClass::Unspecified);
        let label = match class {
            proto::XidClass::Transient => "transient",
            proto::XidClass::NeedsReset => "needs_reset",
            proto::XidClass::Fatal => "fatal",
            proto::XidClass::Unspecified => "unknown",
        };
        self.metrics.gpu_xid(label);
        // Transient XIDs are the application's business; the rest need a person.
        if !matches!(class, proto::XidClass::NeedsReset | proto::XidClass::Fatal) {
            return;
        }
        let Some((namespace, name)) = hello.gonka_node.split_once('/') else { return };
        let what = if class == proto::XidClass::Fatal {
            "the GPU is gone or broken: service the node"
        } else {
            "the GPU needs a reset before it can be trusted"
        };
        let note = format!(
            "XID {} on GPU {} of node {} (pod {}): {what}",
            event.xid, event.gpu, hello.kubernetes_node, hello.pod_name
        );
        let reference = ObjectReference {
            api_version: Some("gonka.ai/v1alpha1".into()),
            kind: Some("GonkaNode".into()),
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            ..ObjectReference::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: "GpuXid".into(),
            note: Some(note),
            action: "Report".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            warn!(error = %e, "could not publish a GPU event");
        }
    }
}

/// Serves the report service on `addr` until `stop`; returns the bound address and the task.
pub async fn serve(
    addr: SocketAddr,
    service: ReportService,
    tls: Option<&crate::report_tls::ReportTls>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        builder = builder
            .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
            .map_err(std::io::Error::other)?;
    }
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let stop = service.stop.clone();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let task = tokio::spawn(async move {
        let result = builder
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(FleetReportsServer::new(service).max_decoding_message_size(MAX_MESSAGE_BYTES))
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await;
        if let Err(e) = result {
            warn!(error = %e, "report server failed");
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(gonka_node: &str, pod: &str, node: &str) -> proto::Hello {
        proto::Hello {
            gonka_node: gonka_node.into(),
            pod_name: pod.into(),
            kubernetes_node: node.into(),
            ..Default::default()
        }
    }

    fn caller(ns: &str, sa: &str, pod: Option<&str>, node: Option<&str>) -> Caller {
        Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            pod: pod.map(str::to_string),
            node: node.map(str::to_string),
        }
    }

    fn jwt(claims: serde_json::Value) -> String {
        use base64::Engine as _;
        let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.{}", b64(br#"{"alg":"RS256"}"#), b64(claims.to_string().as_bytes()), b64(b"signature"))
    }

    /// Only a JWT for the operator's audience that has not expired is worth a TokenReview.
    #[test]
    fn tokens_for_another_audience_or_expired_cost_no_review() {
        let now = 1_800_000_000;
        let aud = proto::TOKEN_AUDIENCE;
        assert_eq!(precheck_token(&jwt(serde_json::json!({"aud": [aud], "exp": now + 60})), now), Ok(()));
        assert_eq!(precheck_token(&jwt(serde_json::json!({"aud": aud, "exp": now + 1})), now), Ok(()));
        let refused = [
            (jwt(serde_json::json!({"aud": ["https://kubernetes.default.svc"], "exp": now + 60})), "audience"),
            (jwt(serde_json::json!({"exp": now + 60})), "audience"),
            (jwt(serde_json::json!({"aud": [aud], "exp": now})), "expired"),
            (jwt(serde_json::json!({"aud": [aud]})), "expired"),
            ("x".repeat(4096), "not a JWT"),
            ("a.b.c".into(), "not a JWT"),
            (format!("{}.extra", jwt(serde_json::json!({"aud": [aud], "exp": now + 60}))), "not a JWT"),
        ];
        for (token, why) in refused {
            let err = precheck_token(&token, now).unwrap_err();
            assert!(err.contains(why), "{err} should say {why}");
        }
    }

    #[test]
    fn each_peer_gets_a_burst_of_reviews_then_one_per_interval() {
        let limiter = PeerLimiter::default();
        let start = std::time::Instant::now();
        let (a, b): (std::net::IpAddr, std::net::IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..PEER_REVIEW_BURST {
            assert!(limiter.allow(a, start));
        }
        assert!(!limiter.allow(a, start), "the burst is spent");
        assert!(limiter.allow(b, start), "another peer has its own");
        assert!(!limiter.allow(a, start + PEER_REVIEW_EVERY / 2), "half an interval earns nothing whole");
        assert!(limiter.allow(a, start + PEER_REVIEW_EVERY), "one per interval");
        assert!(!limiter.allow(a, start + PEER_REVIEW_EVERY));
        // A long silence refills the burst, not more.
        let later = start + PEER_REVIEW_EVERY * 100;
        for _ in 0..PEER_REVIEW_BURST {
            assert!(limiter.allow(a, later));
        }
        assert!(!limiter.allow(a, later));
    }

    #[test]
    fn refusals_are_remembered_briefly() {
        let cache = TokenCache::default();
        let t0 = std::time::Instant::now();
        assert!(!cache.is_refused("bad", t0));
        cache.put_refusal("bad", t0);
        assert!(cache.is_refused("bad", t0 + REFUSAL_CACHE_TTL - Duration::from_millis(1)));
        assert!(!cache.is_refused("bad", t0 + REFUSAL_CACHE_TTL), "asked again after the TTL");
        assert!(!cache.is_refused("other", t0));
        assert!(cache.get("bad", t0).is_none(), "a refusal is no caller");
    }

    #[test]
    fn a_daemon_speaks_only_for_its_own_pod() {
        let h = hello("gpu/h100", "h100-ml-node-x1", "gpu-a");
        let own = caller("gpu", "h100-ml-node", Some("h100-ml-node-x1"), Some("gpu-a"));
        assert_eq!(check_identity(&h, Some(&own)), Ok(("gpu".into(), "h100".into())));
        // No auth: taken at its word.
        assert!(check_identity(&h, None).is_ok());

        let refused = [
            (caller("other", "h100-ml-node", Some("h100-ml-node-x1"), None), "may not report"),
            (caller("gpu", "l40s-ml-node", Some("h100-ml-node-x1"), None), "its ServiceAccount is h100-ml-node"),
            (caller("gpu", "h100-ml-node", Some("h100-ml-node-x2"), None), "bound to pod h100-ml-node-x2"),
            (caller("gpu", "h100-ml-node", None, None), "not bound to a pod"),
            (caller("gpu", "h100-ml-node", Some("h100-ml-node-x1"), Some("gpu-b")), "runs on gpu-b"),
        ];
        for (c, why) in refused {
            let err = check_identity(&h, Some(&c)).unwrap_err();
            assert!(err.contains(why), "{err} should say {why}");
        }
        assert!(check_identity(&hello("h100", "p", "n"), None).unwrap_err().contains("<namespace>/<name>"));
        assert!(check_identity(&hello("gpu/h100", "", "n"), None).unwrap_err().contains("pod_name"));
    }

    #[test]
    fn reviewed_tokens_are_remembered_briefly_and_not_kept_in_clear() {
        let cache = TokenCache::default();
        let now = std::time::Instant::now();
        let caller = Caller { namespace: "gpu".into(), service_account: "h100-ml-node".into(), pod: None, node: None };
        cache.put("secret-token", caller.clone(), now);
        assert_eq!(cache.get("secret-token", now + Duration::from_secs(30)), Some(caller));
        assert_eq!(cache.get("secret-token", now + TOKEN_CACHE_TTL), None, "expired");
        assert_eq!(cache.get("another-token", now), None);
        let kept = cache.entries.lock().unwrap();
        assert!(kept.keys().all(|k| !k.windows(12).any(|w| w == b"secret-token")), "only digests");
    }
}
