//! The report stream to the operator: the [`Reporting`] hook's values and events, sent over
//! `gonka.report.v1.FleetReports/Report` (see `protocol/proto/gonka/report/v1/report.proto`).
//!
//! One stream at a time. It opens with `Hello` and a whole `Snapshot`, then sends a snapshot
//! on every change, GPU events as they happen and a heartbeat when nothing else went out for
//! the interval the operator asked for. When the stream breaks (operator restart, leader
//! change, network) the reporter reconnects with jittered exponential backoff and starts over
//! with `Hello` and a snapshot. Events wait in a bounded buffer until the operator acknowledges
//! them and are resent after a reconnect; when the buffer is full the oldest go and the next
//! snapshot counts them in `events_dropped`. Nothing here grows without bound.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use gonka_protocol::report::{self as proto, daemon_message::Body, fleet_reports_client::FleetReportsClient};
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::gpu::XidClass;
use crate::node_state::{DaemonState, Event, Inventory, Reporting};

/// Who this daemon is, from the pod (downward API) and its `daemon.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// `<namespace>/<name>` of the GonkaNode.
    pub gonka_node: String,
    pub pod_name: String,
    pub kubernetes_node: String,
    pub pod_ip: String,
    pub poc_port: u16,
    pub inference_port: u16,
}

#[derive(Clone, Debug)]
pub struct ReporterSettings {
    /// The operator's report endpoint, `http://host:port`.
    pub url: String,
    /// Bearer token file, read again at every connect (projected tokens rotate).
    pub token_file: Option<PathBuf>,
    /// The CA (PEM) an `https://` url's certificate must chain to: the operator's report CA.
    pub ca_bundle: Option<String>,
    pub identity: Identity,
    /// Events kept until acknowledged.
    pub event_buffer: usize,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
}

impl ReporterSettings {
    pub fn new(url: impl Into<String>, token_file: Option<PathBuf>, identity: Identity) -> Self {
        Self {
            url: url.into(),
            token_file,
            ca_bundle: None,
            identity,
            event_buffer: 1024,
            min_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("connecting to {url}: {source}")]
    Connect { url: String, source: tonic::transport::Error },
    #[error("{url} is https but daemon.json gives no report.caBundle to check the operator's certificate with")]
    NoCa { url: String },
    #[error("reading the report token {path}: {source}")]
    Token { path: String, source: std::io::Error },
    #[error("the report token is not valid header text")]
    TokenFormat,
    #[error("the operator refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("the stream broke: {0}")]
    Broken(tonic::Status),
    #[error("the operator closed the stream")]
    Closed,
    #[error("the operator sent no heartbeat interval")]
    NoWelcome,
    #[error("the operator stopped reading")]
    Stalled,
}

/// The events not yet acknowledged, oldest first, and how many overflowed.
struct EventBuffer {
    events: VecDeque<proto::DaemonMessage>,
    capacity: usize,
    dropped: u64,
}

impl EventBuffer {
    fn push(&mut self, message: proto::DaemonMessage) {
        if self.events.len() == self.capacity.max(1) {
            self.events.pop_front();
            self.dropped += 1;
        }
        self.events.push_back(message);
    }

    fn acknowledge(&mut self, seq: u64) {
        self.events.retain(|m| m.seq > seq);
    }
}

struct Reporter {
    settings: ReporterSettings,
    reporting: Reporting,
    events: broadcast::Receiver<Event>,
    buffer: EventBuffer,
    boot_id: String,
    seq: u64,
}

/// Streams reports until `stop` is cancelled, reconnecting as long as it takes.
pub async fn run(settings: ReporterSettings, reporting: Reporting, stop: CancellationToken) {
    let events = reporting.events();
    let capacity = settings.event_buffer;
    let mut reporter = Reporter {
        settings,
        reporting,
        events,
        buffer: EventBuffer { events: VecDeque::new(), capacity, dropped: 0 },
        boot_id: boot_id(),
        seq: 0,
    };
    let (min, max) = (reporter.settings.min_backoff, reporter.settings.max_backoff);
    let backoff = move || {
        ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).with_jitter().without_max_times().build()
    };
    let mut delays = backoff();
    loop {
        let mut welcomed = false;
        match reporter.session(&stop, &mut welcomed).await {
            Ok(()) => return, // stopped
            Err(e) => {
                tracing::warn!(url = %reporter.settings.url, error = %e, "report stream to the operator down; reconnecting")
            }
        }
        if welcomed {
            delays = backoff(); // it worked for a while: start over from the shortest wait
        }
        let wait = delays.next().unwrap_or(max);
        if !reporter.wait(wait, &stop).await {
            return;
        }
    }
}

/// Random per process, so the operator can tell a restarted daemon from a reconnected one.
fn boot_id() -> String {
    use sha2::Digest;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let seed = format!("{nanos}:{}:{:p}", std::process::id(), &nanos);
    hex::encode(&sha2::Sha256::digest(seed.as_bytes())[..8])
}

impl Reporter {
    /// Waits `wait` (keeping up with events meanwhile); false when stopped.
    async fn wait(&mut self, wait: Duration, stop: &CancellationToken) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                event = self.events.recv() => { self.take_event(event); }
            }
        }
    }

    fn next(&mut self, body: Body) -> proto::DaemonMessage {
        self.seq += 1;
        proto::DaemonMessage { seq: self.seq, body: Some(body) }
    }

    /// Buffers a GPU event; returns the message to send now, if any.
    fn take_event(&mut self, event: Result<Event, broadcast::error::RecvError>) -> Option<proto::DaemonMessage> {
        match event {
            Ok(Event::Xid { gpu, code, class }) => {
                let observed_at = jiff::Timestamp::now().as_second();
                let class = match class {
                    XidClass::Transient => proto::XidClass::Transient,
                    XidClass::NeedsReset => proto::XidClass::NeedsReset,
                    XidClass::Fatal => proto::XidClass::Fatal,
                } as i32;
                let message = self.next(Body::GpuEvent(proto::GpuEvent { gpu, xid: code, class, observed_at }));
                self.buffer.push(message.clone());
                Some(message)
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                self.buffer.dropped += missed;
                None
            }
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }

    fn hello(&mut self) -> proto::DaemonMessage {
        let id = &self.settings.identity;
        let hello = proto::Hello {
            gonka_node: id.gonka_node.clone(),
            pod_name: id.pod_name.clone(),
            kubernetes_node: id.kubernetes_node.clone(),
            pod_ip: id.pod_ip.clone(),
            poc_port: id.poc_port.into(),
            inference_port: id.inference_port.into(),
            daemon_version: env!("CARGO_PKG_VERSION").into(),
            boot_id: self.boot_id.clone(),
        };
        self.next(Body::Hello(hello))
    }

    /// The current values as a snapshot message; marks both seen.
    fn snapshot(
        &mut self,
        inventory: &mut watch::Receiver<Inventory>,
        state: &mut watch::Receiver<DaemonState>,
    ) -> proto::DaemonMessage {
        let snapshot = snapshot(&inventory.borrow_and_update(), &state.borrow_and_update(), self.buffer.dropped);
        self.next(Body::Snapshot(snapshot))
    }

    /// One connection, until it breaks (`Err`; `welcomed` says whether the operator had taken
    /// it) or `stop` (`Ok`).
    async fn session(&mut self, stop: &CancellationToken, welcomed: &mut bool) -> Result<(), SessionError> {
        let url = self.settings.url.clone();
        let token = match &self.settings.token_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|source| SessionError::Token { path: path.display().to_string(), source })?,
            ),
            None => None,
        };
        let mut endpoint =
            Endpoint::from_shared(url.clone()).map_err(|source| SessionError::Connect { url: url.clone(), source })?;
        if url.starts_with("https://") {
            // Only the operator's CA: a token must not go to anything else that holds a
            // publicly trusted certificate for the name.
            let ca = self.settings.ca_bundle.as_ref().ok_or_else(|| SessionError::NoCa { url: url.clone() })?;
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
            endpoint = endpoint.tls_config(tls).map_err(|source| SessionError::Connect { url: url.clone(), source })?;
        }
        let endpoint = endpoint
            .connect_timeout(Duration::from_secs(5))
            // A silently dead connection (a node gone) is noticed within ~40 s.
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true);
        let channel = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            c = endpoint.connect() => c.map_err(|source| SessionError::Connect { url: url.clone(), source })?,
        };
        let mut client = FleetReportsClient::new(channel);

        let (tx, rx) = mpsc::channel::<proto::DaemonMessage>(32);
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            let value = format!("Bearer {}", token.trim()).parse().map_err(|_| SessionError::TokenFormat)?;
            request.metadata_mut().insert("authorization", value);
        }
        // Queued before the call: the operator reads `Hello` before it answers.
        let hello = self.hello();
        let _ = tx.try_send(hello);
        let mut inbound = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            r = client.report(request) => r.map_err(SessionError::Refused)?.into_inner(),
        };
        let heartbeat = match inbound.message().await {
            Ok(Some(proto::OperatorMessage { body: Some(proto::operator_message::Body::Welcome(w)) })) => {
                Duration::from_secs(u64::from(w.heartbeat_seconds.max(1)))
            }
            Ok(_) => return Err(SessionError::NoWelcome),
            Err(s) => return Err(SessionError::Broken(s)),
        };
        *welcomed = true;
        tracing::info!(%url, heartbeat_s = heartbeat.as_secs(), "reporting to the operator");

        let send = |message: proto::DaemonMessage| {
            let tx = tx.clone();
            async move {
                // A peer that reads nothing for this long is as good as gone.
                match tokio::time::timeout(Duration::from_secs(30), tx.send(message)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(SessionError::Closed),
                    Err(_) => Err(SessionError::Stalled),
                }
            }
        };
        let mut inventory = self.reporting.inventory();
        let mut state = self.reporting.state();
        inventory.mark_changed();
        state.mark_changed();
        // Resend what the operator has not acknowledged, oldest first.
        for message in self.buffer.events.clone() {
            send(message).await?;
        }
        let mut idle = tokio::time::interval(heartbeat);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        idle.tick().await;
        loop {
            let message = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                reply = inbound.message() => {
                    match reply {
                        Ok(Some(proto::OperatorMessage { body: Some(proto::operator_message::Body::Ack(ack)) })) => {
                            self.buffer.acknowledge(ack.seq);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => return Err(SessionError::Closed),
                        Err(s) => return Err(SessionError::Broken(s)),
                    }
                    continue;
                }
                changed = inventory.changed() => {
                    if changed.is_err() { return Ok(()) }
                    self.snapshot(&mut inventory, &mut state)
                }
                changed = state.changed() => {
                    if changed.is_err() { return Ok(()) }
                    self.snapshot(&mut inventory, &mut state)
                }
                event = self.events.recv() => {
                    let lagged = matches!(event, Err(broadcast::error::RecvError::Lagged(_)));
                    match self.take_event(event) {
                        Some(message) => message,
                        // Missed events: the next snapshot says how many.
                        None if lagged => self.snapshot(&mut inventory, &mut state),
                        None => continue,
                    }
                }
                _ = idle.tick() => self.next(Body::Heartbeat(proto::Heartbeat {})),
            };
            send(message).await?;
            idle.reset();
        }
    }
}

/// The snapshot message for the hook's current values.
pub fn snapshot(inventory: &Inventory, state: &DaemonState, events_dropped: u64) -> proto::Snapshot {
    let driver = inventory.driver.as_ref();
    proto::Snapshot {
        state: state.service.as_str().into(),
        gpus: inventory
            .devices
            .iter()
            .map(|d| proto::Gpu {
                index: d.index,
                name: d.name.clone(),
                total_memory_mb: d.total_memory_mb,
                free_memory_mb: d.free_memory_mb,
                utilization_percent: d.utilization_percent,
                temperature_c: d.temperature_c,
                available: d.is_available,
                error: d.error_message.clone().unwrap_or_default(),
            })
            .collect(),
        hardware: inventory
            .hardware
            .iter()
            .map(|(type_, count)| proto::HardwareCount { r#type: type_.clone(), count: *count })
            .collect(),
        driver_version: driver.map(|d| d.driver_version.clone()).unwrap_or_default(),
        cuda_driver_version: driver.map(|d| d.cuda_driver_version.clone()).unwrap_or_default(),
        nvml_error: inventory.nvml_error.clone().unwrap_or_default(),
        poc: Some(proto::PocProgress {
            block_height: state.poc.block_height,
            nonces_computed: state.poc.nonces_computed,
            nonces_valid: state.poc.nonces_valid,
            batches_sent: state.poc.batches_sent,
            send_failures: state.poc.send_failures,
            pending_batches: state.poc.pending_batches,
        }),
        events_dropped,
        inference: state.inference.as_ref().map(|i| proto::Inference {
            model: i.model.clone(),
            engine: i.engine.clone(),
            instances: i.instances,
            instances_healthy: i.instances_healthy,
            restarts: i.restarts,
            last_error: i.last_error.clone().unwrap_or_default(),
        }),
        yielded: state.yielded.as_ref().map(|y| proto::Yield {
            reason: y.reason.clone(),
            since: unix_seconds(y.since),
            idle_since: y.idle_since.map_or(0, unix_seconds),
            rejoin_after_idle_seconds: y.rejoin_after_idle.as_secs().min(u64::from(u32::MAX)) as u32,
        }),
    }
}

fn unix_seconds(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64) -> proto::DaemonMessage {
        proto::DaemonMessage { seq, body: Some(Body::Heartbeat(proto::Heartbeat {})) }
    }

    #[test]
    fn the_event_buffer_is_bounded_and_forgets_what_was_acknowledged() {
        let mut buffer = EventBuffer { events: VecDeque::new(), capacity: 3, dropped: 0 };
        for seq in 1..=5 {
            buffer.push(event(seq));
        }
        assert_eq!(buffer.events.iter().map(|m| m.seq).collect::<Vec<_>>(), [3, 4, 5]);
        assert_eq!(buffer.dropped, 2);
        buffer.acknowledge(4);
        assert_eq!(buffer.events.iter().map(|m| m.seq).collect::<Vec<_>>(), [5]);
    }

    #[test]
    fn snapshots_carry_upstreams_state_string_and_hardware() {
        let inventory = Inventory { hardware: vec![("NVIDIA H100 80GB HBM3 | 79GB".into(), 8)], ..Default::default() };
        let mut state = DaemonState::default();
        state.poc.block_height = Some(42);
        state.poc.nonces_valid = 7;
        let s = snapshot(&inventory, &state, 3);
        assert_eq!(s.state, "STOPPED");
        assert_eq!((s.hardware[0].r#type.as_str(), s.hardware[0].count), ("NVIDIA H100 80GB HBM3 | 79GB", 8));
        let poc = s.poc.unwrap();
        assert_eq!((poc.block_height, poc.nonces_valid, s.events_dropped), (Some(42), 7, 3));
        assert_eq!(s.inference, None);
        state.inference = Some(crate::node_state::InferenceState {
            model: "MiniMaxAI/MiniMax-M2.7".into(),
            engine: "vllm".into(),
            instances: 4,
            instances_healthy: 3,
            restarts: 2,
            last_error: Some("hung: ...".into()),
        });
        let i = snapshot(&inventory, &state, 0).inference.unwrap();
        assert_eq!((i.engine.as_str(), i.instances, i.instances_healthy, i.restarts), ("vllm", 4, 3, 2));
        assert_eq!((i.model.as_str(), i.last_error.as_str()), ("MiniMaxAI/MiniMax-M2.7", "hung: ..."));
        assert_eq!(snapshot(&inventory, &state, 0).yielded, None);
        let since = std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        state.yielded = Some(crate::node_state::Yielded {
            reason: "GPU 1: process 4242 is not this ML node's".into(),
            since,
            idle_since: None,
            rejoin_after_idle: Duration::from_secs(600),
        });
        let y = snapshot(&inventory, &state, 0).yielded.unwrap();
        assert_eq!((y.since, y.idle_since, y.rejoin_after_idle_seconds), (1_800_000_000, 0, 600));
        assert_eq!(y.reason, "GPU 1: process 4242 is not this ML node's");
    }

    #[test]
    fn boot_ids_differ() {
        assert_ne!(boot_id(), boot_id());
    }
}
