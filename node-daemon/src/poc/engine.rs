//! PoC v1 jobs: one session per init request, as upstream's `PowManager` + controller + sender.
//!
//! A session builds the block's proof model, then, in the generate phase, walks this ML node's
//! nonces batch by batch and queues the proofs; in the validate phase it recomputes batches the
//! network node hands in and queues verdicts. A sender posts them to the callback URL every
//! interval, as upstream's does: proofs while generating, verdicts while validating (what waits
//! for the other phase stays queued); it keeps what failed for the next try. Nothing is dropped
//! while the session lives: when the sender holds `max_pending` batches it stops taking more,
//! the bounded queue fills, and generation waits.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gonka_protocol::pow::{InitRequest, PowState, PowStatus, ProofBatch, ValidatedBatch};
use tch::{Device, Kind};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::PowSettings;
use super::groups::{gpu_groups, min_group_vram_gb};
use super::model::ProofModel;
use super::pipeline::{distance, nonce_inputs, nonce_permutation, nonces, target};
use super::validation::{ValidationError, check_claims, verdict};
use crate::metrics::DaemonMetrics;
use crate::node_state::{PocCounters, Reporting};
use gonka_protocol::ml_node::ServiceState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Idle,
    Generate,
    Validate,
}

#[derive(Debug, thiserror::Error)]
pub enum PowError {
    #[error("Node ID and node count must be set")]
    NodeUnset,
    #[error("PoW is not running")]
    NotRunning,
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("invalid PoC params: {0}")]
    Params(String),
    #[error("callback URL {url} is not under this ML node's mlCallbackUrl {base}")]
    CallbackNotAllowed { url: String, base: String },
    #[error("no GPU: this ML node proves compute on GPUs only (the CPU is for development, --allow-cpu-compute)")]
    NoGpu,
    #[error(
        "the proof model and a batch of {batch_size} need {needed_gib:.1} GiB; this ML node has {budget_gib:.1} GiB of {memory}"
    )]
    TooLarge { batch_size: usize, needed_gib: f64, budget_gib: f64, memory: &'static str },
    #[error("batch_size {0} is outside 1..={MAX_BATCH_SIZE}")]
    BatchSize(usize),
    #[error("a validation batch holds at most {MAX_VALIDATION_NONCES} nonces, this one {0}")]
    ValidationBatch(usize),
    #[error("{VALIDATION_QUEUE} batches already wait for validation; try again later")]
    ValidationBusy,
}

/// Nonces per forward pass accepted (the GonkaNode's `poc.batchSize` allows as many).
pub const MAX_BATCH_SIZE: usize = 4096;
/// Nonces in one `/pow/validate` batch (upstream samples 200 per participant).
pub const MAX_VALIDATION_NONCES: usize = 100_000;
/// Batches waiting for validation; more are refused (503) rather than waited for.
pub const VALIDATION_QUEUE: usize = 1024;

/// What a session may use: the GPUs' memory (NVML), or on the CPU (development) the memory
/// the system has available.
fn memory_budget(settings: &PowSettings) -> (u64, &'static str) {
    if tch::Cuda::is_available() {
        let gib: f64 = settings.gpu_vram_gb.iter().sum();
        ((gib * (1u64 << 30) as f64) as u64, "GPU memory")
    } else {
        (available_memory_bytes().unwrap_or(0), "available system memory")
    }
}

/// `MemAvailable` of `/proc/meminfo`.
pub(crate) fn available_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Session {
    request: InitRequest,
    phase: watch::Sender<Phase>,
    /// Model replicas built so far, one per GPU group.
    models_ready: Arc<AtomicUsize>,
    groups: usize,
    /// Ends everything at once (`/stop`, a new session): what was not sent is dropped, as
    /// upstream drops it.
    stop: CancellationToken,
    /// Ends the GPU groups' work only (a child of `stop`).
    workers: CancellationToken,
    /// Asks the sender to deliver what is pending, then end.
    flush: CancellationToken,
    sender: Option<tokio::task::JoinHandle<()>>,
    to_validate: mpsc::Sender<ProofBatch>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The PoC manager of one ML node.
pub struct PowService {
    settings: PowSettings,
    metrics: DaemonMetrics,
    reporting: Reporting,
    http: reqwest::Client,
    session: Mutex<Option<Session>>,
}

impl PowService {
    /// Fails when `settings.ca_bundle` holds no PEM certificate.
    pub fn new(settings: PowSettings, metrics: DaemonMetrics, reporting: Reporting) -> anyhow::Result<Self> {
        // reqwest's rustls takes the process-wide crypto provider: ring (Err: installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        // No redirects: callbacks go to the checked URL under mlCallbackUrl and nowhere else.
        let mut builder =
            reqwest::Client::builder().timeout(Duration::from_secs(30)).redirect(reqwest::redirect::Policy::none());
        if let Some(mtls) = &settings.mtls {
            builder = builder.tls_backend_preconfigured(mtls.client_config()?);
        } else if let Some(pem) = &settings.ca_bundle {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| anyhow::anyhow!("caBundle: not PEM certificates: {e}"))?;
            anyhow::ensure!(!certs.is_empty(), "caBundle: no certificate in it");
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build()?;
        Ok(Self { settings, metrics, reporting, http, session: Mutex::new(None) })
    }

    pub fn is_running(&self) -> bool {
        self.session.lock().expect("session").is_some()
    }

    /// The callback client (timeouts, trusted CAs), shared with PoC v2.
    pub fn http(&self) -> reqwest::Client {
        self.http.clone()
    }

    /// `/pow/init*`: (re)starts the session when the request differs, then enters `phase`.
    pub fn init(&self, request: InitRequest, phase: Phase) -> Result<PowStatus, PowError> {
        if phase == Phase::Generate && (request.node_id == -1 || request.node_count == -1) {
            return Err(PowError::NodeUnset);
        }
        if let Some(base) = &self.settings.callback_base
            && !super::callback_allowed(&request.url, base)
        {
            return Err(PowError::CallbackNotAllowed { url: request.url.clone(), base: base.clone() });
        }
        request.params.validate().map_err(|e| PowError::Params(e.0))?;
        let batch_size = self.settings.batch_size.unwrap_or(request.batch_size);
        if !(1..=MAX_BATCH_SIZE).contains(&request.batch_size) || !(1..=MAX_BATCH_SIZE).contains(&batch_size) {
            return Err(PowError::BatchSize(request.batch_size));
        }
        let cuda = tch::Cuda::is_available();
        if !self.settings.allow_cpu && !cuda {
            return Err(PowError::NoGpu);
        }
        // Refused before anything is allocated: one request must not take the node down.
        let needed = request.params.memory_bytes(batch_size, if cuda { 2 } else { 4 });
        let (budget, memory) = memory_budget(&self.settings);
        if needed > budget {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(PowError::TooLarge { batch_size, needed_gib: gib(needed), budget_gib: gib(budget), memory });
        }
        let mut session = self.session.lock().expect("session");
        if session.as_ref().is_none_or(|s| s.request != request) {
            let block_height = request.block_height;
            *session = Some(self.start(request, batch_size));
            self.reporting.update_state(|s| {
                s.service = ServiceState::Pow;
                s.poc = PocCounters { block_height: Some(block_height), ..PocCounters::default() };
            });
        }
        let s = session.as_ref().expect("just set");
        if phase != Phase::Idle {
            s.phase.send_replace(phase);
        }
        Ok(status_of(s))
    }

    /// `/pow/phase/*`: switches the running session.
    pub fn set_phase(&self, phase: Phase) -> Result<PowStatus, PowError> {
        let session = self.session.lock().expect("session");
        let s = session.as_ref().ok_or(PowError::NotRunning)?;
        if phase == Phase::Generate && (s.request.node_id == -1 || s.request.node_count == -1) {
            return Err(PowError::NodeUnset);
        }
        s.phase.send_replace(phase);
        Ok(status_of(s))
    }

    /// `/pow/validate`: queues another node's batch for recomputation; a full queue is a
    /// refusal, not a wait.
    pub fn validate(&self, batch: ProofBatch) -> Result<(), PowError> {
        if batch.nonces.len() > MAX_VALIDATION_NONCES {
            return Err(PowError::ValidationBatch(batch.nonces.len()));
        }
        let session = self.session.lock().expect("session");
        let s = session.as_ref().ok_or(PowError::NotRunning)?;
        check_claims(&batch)?;
        s.to_validate.try_send(batch).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PowError::ValidationBusy,
            mpsc::error::TrySendError::Closed(_) => PowError::NotRunning,
        })
    }

    pub fn status(&self) -> PowStatus {
        match self.session.lock().expect("session").as_ref() {
            Some(s) => status_of(s),
            None => PowStatus { status: PowState::NotLoaded, is_model_initialized: None },
        }
    }

    /// The daemon is shutting down (SIGTERM): stop computing, deliver every pending batch the
    /// phase lets through within `grace`, then end the session.
    pub async fn shutdown(&self, grace: Duration) {
        let Some(mut session) = self.session.lock().expect("session").take() else { return };
        session.workers.cancel();
        session.flush.cancel();
        if let Some(sender) = session.sender.take() {
            match tokio::time::timeout(grace, sender).await {
                Ok(_) => tracing::info!("pending PoC batches delivered"),
                Err(_) => tracing::warn!(?grace, "pending PoC batches not all delivered within the grace period"),
            }
        }
        self.reporting.update_state(|s| s.service = ServiceState::Stopped);
    }

    /// Ends the session; returns whether one ran.
    pub fn stop(&self) -> bool {
        let stopped = self.session.lock().expect("session").take().is_some();
        if stopped {
            self.reporting.update_state(|s| s.service = ServiceState::Stopped);
        }
        stopped
    }

    fn start(&self, request: InitRequest, batch_size: usize) -> Session {
        tracing::info!(block_height = request.block_height, node_id = request.node_id, "starting a PoC session");
        let (phase, phase_rx) = watch::channel(Phase::Idle);
        let stop = CancellationToken::new();
        let workers = stop.child_token();
        let flush = CancellationToken::new();
        let models_ready = Arc::new(AtomicUsize::new(0));
        let capacity = self.settings.max_pending.max(1);
        let (generated_tx, generated_rx) = mpsc::channel(capacity);
        let (validated_tx, validated_rx) = mpsc::channel(capacity);
        let (to_validate, to_validate_rx) = mpsc::channel(VALIDATION_QUEUE);
        let to_validate_rx = Arc::new(Mutex::new(to_validate_rx));

        let (groups, kind) = self.device_groups(&request);
        if groups.is_empty() {
            tracing::error!(vram = ?self.settings.gpu_vram_gb, "no GPU group can hold the proof model");
        }
        let n_groups = groups.len();
        for (group_id, devices) in groups.into_iter().enumerate() {
            let worker = Worker {
                request: request.clone(),
                batch_size,
                devices,
                kind,
                group_id: group_id as u64,
                n_groups: n_groups as u64,
                phase: phase_rx.clone(),
                stop: workers.clone(),
                models_ready: models_ready.clone(),
                generated: generated_tx.clone(),
                validated: validated_tx.clone(),
                to_validate: to_validate_rx.clone(),
                metrics: self.metrics.clone(),
                reporting: self.reporting.clone(),
            };
            tokio::task::spawn_blocking(move || worker.run());
        }
        let sender = Sender {
            phase: phase_rx,
            url: request.url.trim_end_matches('/').to_string(),
            http: self.http.clone(),
            settings: self.settings.clone(),
            generated: generated_rx,
            validated: validated_rx,
            metrics: self.metrics.clone(),
            reporting: self.reporting.clone(),
        };
        let sender = Some(tokio::spawn(sender.run(stop.clone(), flush.clone())));
        Session { request, phase, models_ready, groups: n_groups, stop, workers, flush, sender, to_validate }
    }

    /// CPU: one group in float32. GPUs: upstream's groups (consecutive GPUs holding one model
    /// replica together), in float16.
    fn device_groups(&self, request: &InitRequest) -> (Vec<Vec<Device>>, Kind) {
        if !tch::Cuda::is_available() {
            return (vec![vec![Device::Cpu]], Kind::Float);
        }
        let count = tch::Cuda::device_count() as usize;
        let vram: Vec<f64> = (0..count).map(|i| self.settings.gpu_vram_gb.get(i).copied().unwrap_or(0.0)).collect();
        let groups = gpu_groups(&vram, min_group_vram_gb(&request.params));
        (groups.into_iter().map(|g| g.into_iter().map(Device::Cuda).collect()).collect(), Kind::Half)
    }
}

fn status_of(s: &Session) -> PowStatus {
    let ready = s.groups > 0 && s.models_ready.load(Ordering::Relaxed) >= s.groups;
    let status = match *s.phase.borrow() {
        Phase::Idle if !ready => PowState::Loading,
        Phase::Idle => PowState::Idle,
        Phase::Generate => PowState::Generating,
        Phase::Validate => PowState::Validating,
    };
    PowStatus { status, is_model_initialized: Some(ready) }
}

/// One GPU group's loop (the CPU is one group): its model replica, its nonce stream.
struct Worker {
    request: InitRequest,
    /// Nonces per forward pass.
    batch_size: usize,
    devices: Vec<Device>,
    kind: Kind,
    group_id: u64,
    n_groups: u64,
    phase: watch::Receiver<Phase>,
    stop: CancellationToken,
    models_ready: Arc<AtomicUsize>,
    generated: mpsc::Sender<ProofBatch>,
    validated: mpsc::Sender<ValidatedBatch>,
    /// Shared by the groups: whichever is free takes the next batch to validate.
    to_validate: Arc<Mutex<mpsc::Receiver<ProofBatch>>>,
    metrics: DaemonMetrics,
    reporting: Reporting,
}

impl Worker {
    fn run(self) {
        let r = &self.request;
        let model = match ProofModel::sharded(&r.params, &r.block_hash, &self.devices, self.kind) {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the proof model");
                return;
            }
        };
        let target = target(&r.block_hash, r.params.vocab_size);
        self.models_ready.fetch_add(1, Ordering::Relaxed);
        tracing::info!(params = model.params().parameter_count(), group = self.group_id, devices = ?self.devices, "proof model ready");
        let mut own_nonces = nonces(r.node_id.max(0) as u64, r.node_count.max(1) as u64, self.group_id, self.n_groups);
        while !self.stop.is_cancelled() {
            let phase = *self.phase.borrow();
            match phase {
                Phase::Generate => {
                    let batch: Vec<u64> = own_nonces.by_ref().take(self.batch_size).collect();
                    let dist = self.distances(&model, &target, &r.public_key, &batch);
                    self.metrics.pow_computed(batch.len() as u64);
                    let proofs = ProofBatch {
                        public_key: r.public_key.clone(),
                        block_hash: r.block_hash.clone(),
                        block_height: r.block_height,
                        nonces: batch.iter().map(|&n| n as i64).collect(),
                        dist,
                        node_id: r.node_id,
                    }
                    .proofs(r.r_target);
                    self.metrics.pow_valid(proofs.nonces.len() as u64);
                    let (computed, valid) = (batch.len() as u64, proofs.nonces.len() as u64);
                    self.reporting.update_state(|s| {
                        s.poc.nonces_computed += computed;
                        s.poc.nonces_valid += valid;
                    });
                    // Waits while the sender's queue is full: backpressure, not loss.
                    if !proofs.nonces.is_empty() && self.generated.blocking_send(proofs).is_err() {
                        return;
                    }
                }
                Phase::Validate => match self.next_to_validate() {
                    Some(batch) => {
                        let nonces: Vec<u64> = batch.nonces.iter().map(|&n| n as u64).collect();
                        let dist = self.distances(&model, &target, &batch.public_key, &nonces);
                        let result = verdict(&batch, dist, r.r_target, r.fraud_threshold);
                        if self.validated.blocking_send(result).is_err() {
                            return;
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                },
                Phase::Idle => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }

    /// Takes the next batch to validate without holding the queue while computing.
    fn next_to_validate(&self) -> Option<ProofBatch> {
        self.to_validate.lock().expect("validation queue").try_recv().ok()
    }

    fn distances(&self, model: &ProofModel, target: &[f64], public_key: &str, nonces: &[u64]) -> Vec<f64> {
        let p = model.params();
        let bh = &self.request.block_hash;
        let inputs: Vec<Vec<f32>> = nonces.iter().map(|&n| nonce_inputs(bh, public_key, n, p.seq_len, p.dim)).collect();
        let logits = model.last_logits(&inputs);
        nonces
            .iter()
            .zip(&logits)
            .map(|(&n, l)| distance(l, &nonce_permutation(bh, public_key, n, p.vocab_size), target))
            .collect()
    }
}

struct Sender {
    phase: watch::Receiver<Phase>,
    url: String,
    http: reqwest::Client,
    settings: PowSettings,
    generated: mpsc::Receiver<ProofBatch>,
    validated: mpsc::Receiver<ValidatedBatch>,
    metrics: DaemonMetrics,
    reporting: Reporting,
}

impl Sender {
    async fn run(mut self, stop: CancellationToken, flush: CancellationToken) {
        let mut pending_generated: Vec<ProofBatch> = Vec::new();
        let mut pending_validated: Vec<ValidatedBatch> = Vec::new();
        let mut tick = tokio::time::interval(self.settings.send_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = flush.cancelled() => {
                    self.deliver_all(pending_generated, pending_validated, &stop).await;
                    break;
                }
                _ = tick.tick() => {}
            }
            // Upstream's sender posts proofs only in the generate phase and verdicts only in the
            // validate phase (the network node takes each only then).
            let (mut sent, mut failed) = (0, 0);
            let phase = *self.phase.borrow();
            match phase {
                Phase::Generate => {
                    // What was generated since the last tick, as one merged batch, while there
                    // is room.
                    let mut merged: Option<ProofBatch> = None;
                    while pending_generated.len() < self.settings.max_pending {
                        let Ok(batch) = self.generated.try_recv() else { break };
                        match &mut merged {
                            Some(m) => {
                                m.nonces.extend(batch.nonces);
                                m.dist.extend(batch.dist);
                            }
                            None => merged = Some(batch),
                        }
                    }
                    pending_generated.extend(merged);
                    (pending_generated, sent, failed) = self.send_all(pending_generated, "generated").await;
                }
                Phase::Validate => {
                    while pending_validated.len() < self.settings.max_pending {
                        let Ok(batch) = self.validated.try_recv() else { break };
                        pending_validated.push(batch);
                    }
                    (pending_validated, sent, failed) = self.send_all(pending_validated, "validated").await;
                }
                Phase::Idle => {}
            }
            let pending = (pending_generated.len() + pending_validated.len()) as u64;
            self.metrics.pow_pending(pending as i64);
            self.reporting.update_state(|s| {
                s.poc.batches_sent += sent;
                s.poc.send_failures += failed;
                s.poc.pending_batches = pending;
            });
        }
    }

    /// The last delivery, at shutdown: everything the workers still hand over (until their
    /// channels close: they have stopped) and everything pending, of the kind the phase lets
    /// through, retried until sent or `stop`.
    async fn deliver_all(
        &mut self,
        mut generated: Vec<ProofBatch>,
        mut validated: Vec<ValidatedBatch>,
        stop: &CancellationToken,
    ) {
        let phase = *self.phase.borrow();
        loop {
            // Both, so neither channel's workers wait on a full queue while they stop.
            let open = drain(&mut self.generated, &mut generated) | drain(&mut self.validated, &mut validated);
            match phase {
                Phase::Generate => generated = self.send_all(generated, "generated").await.0,
                Phase::Validate => validated = self.send_all(validated, "validated").await.0,
                Phase::Idle => {}
            }
            let waiting = match phase {
                Phase::Generate => !generated.is_empty(),
                Phase::Validate => !validated.is_empty(),
                Phase::Idle => false,
            };
            if !open && !waiting {
                return;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
        }
    }

    /// Posts each batch; returns those that failed, in order, for the next tick, and how many
    /// posts went through and failed.
    async fn send_all<T: serde::Serialize>(&self, batches: Vec<T>, kind: &str) -> (Vec<T>, u64, u64) {
        let url = format!("{}/{kind}", self.url);
        let (mut sent, mut failures) = (0, 0);
        let mut failed = Vec::new();
        for batch in batches {
            if !failed.is_empty() {
                failed.push(batch); // the callback is down; keep order and try next tick
                continue;
            }
            // Only a 2xx delivers: a redirect (not followed) is no delivery either, and the
            // batch waits like one refused.
            let result = match self.http.post(&url).json(&batch).send().await {
                Ok(r) if r.status().is_success() => Ok(()),
                Ok(r) => Err(format!("HTTP {}", r.status())),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => {
                    sent += 1;
                    self.metrics.pow_sent(kind);
                }
                Err(e) => {
                    tracing::warn!(%url, error = %e, "sending PoC batch failed; kept for retry");
                    failures += 1;
                    self.metrics.pow_send_failed(kind);
                    failed.push(batch);
                }
            }
        }
        (failed, sent, failures)
    }
}

/// Moves what `rx` holds into `into`; whether senders may still add more.
fn drain<T>(rx: &mut mpsc::Receiver<T>, into: &mut Vec<T>) -> bool {
    loop {
        match rx.try_recv() {
            Ok(item) => into.push(item),
            Err(mpsc::error::TryRecvError::Empty) => return true,
            Err(mpsc::error::TryRecvError::Disconnected) => return false,
        }
    }
}
