//! PoC v2 on the served model: `/api/v1/inference/pow/*` as upstream's ML node answers them,
//! over one engine where upstream fans out to vLLM backends (so answers name one backend, at
//! the port upstream gives its first instance: the inference port + 1).
//!
//! - `init/generate` starts the round's generation: this ML node's nonces (`node_id + x ·
//!   node_count`), `batch_size` at a time through the engine (chat and completions answer 503
//!   meanwhile, as upstream's gonka_poc does, so open chats cannot starve the round), the
//!   artifacts buffered and posted to `{url}/generated` every 5 s until `stop`, retried with
//!   backoff, what is left flushed at `stop` (upstream drops it);
//! - `generate` computes given nonces: queued (`request_id` `<port>:<uuid>`, polled at
//!   `generate/{id}`, result posted to `{url}/generated` or `{url}/validated`) or waited for;
//!   with `validation` it recomputes another ML node's artifacts and runs upstream's
//!   binomial test;
//! - `status`, `stop`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gonka_inference::engine::PocBatch;
use gonka_inference::poc_v2::decode_vector;
use gonka_protocol::pow_v2::{
    Artifact, BackendResult, Encoding, GenerateRequest, GeneratedArtifactBatch, InitGenerateRequest,
    InitGenerateResponse, PocParams, StatTest, StatusResponse, StopResponse, ValidatedResult,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::manager::{InferenceManager, Served};
use crate::http::{JsonBody, error};
use crate::poc::validation::binomial_p_value_greater;

/// How often buffered artifacts are posted (upstream `POC_CALLBACK_INTERVAL_SEC`).
pub const CALLBACK_INTERVAL: Duration = Duration::from_secs(5);
/// Artifacts buffered at most; the oldest go first beyond it (upstream
/// `POC_CALLBACK_MAX_ARTIFACTS`).
const MAX_BUFFERED_ARTIFACTS: usize = 1_000_000;
/// Bytes of buffered artifacts at most, whatever their count: the caller picks `k_dim` (up to
/// the model's hidden size), so a million artifacts could be gigabytes.
const MAX_BUFFERED_BYTES: usize = 256 << 20;
/// Nonces queued for `generate` at most (upstream `POC_MAX_QUEUED_NONCES`).
const MAX_QUEUED_NONCES: usize = 100_000;
/// Nonces one batch may carry (one forward): bounds a request's activations.
const MAX_BATCH_SIZE: usize = 1024;
/// Nonces one `generate` may name.
const MAX_GENERATE_NONCES: usize = 10_000;
/// How long finished `generate` results stay to be polled (upstream 300 s).
const RESULT_TTL: Duration = Duration::from_secs(300);
/// Bytes of finished `generate` results kept for polling at most, whatever their count: their
/// size is the caller's `k_dim` times its nonces. Beyond it the oldest go first (their poll
/// answers 404, as after the TTL; a callback still gets its result).
const MAX_RESULT_BYTES: usize = 256 << 20;
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct PocV2Settings {
    /// The network node's callback base (`daemon.json` `mlCallbackUrl`): a request's `url` must
    /// be under it. `None` (development): any.
    pub callback_base: Option<String>,
    /// The host's batch size for its GPUs (`daemon.json` `poc.batchSize`); `None`: the
    /// request's.
    pub batch_size: Option<usize>,
    /// The inference port: answers name backend `inference_port + 1`, upstream's first vLLM.
    pub inference_port: u16,
    pub http: reqwest::Client,
    /// Round progress for the operator's reports (its status `weight`).
    pub reporting: crate::node_state::Reporting,
    /// The PoC counters on `/metrics` (nonces computed, artifacts, callback posts).
    pub metrics: crate::metrics::DaemonMetrics,
}

#[derive(Clone, Debug, serde::Serialize)]
struct RoundConfig {
    block_hash: String,
    block_height: i64,
    public_key: String,
    node_id: i64,
    node_count: i64,
    group_id: i64,
    n_groups: i64,
    seq_len: i64,
    k_dim: i64,
    #[serde(skip)]
    batch_size: usize,
    #[serde(skip)]
    stronger_rng: bool,
}

struct Generation {
    config: RoundConfig,
    started: Instant,
    processed: Arc<std::sync::atomic::AtomicU64>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Chat and completions answer 503 while it is held: dropped with the generation at
    /// `stop`, not when the last delivery ends (a slow callback server).
    _round: super::manager::PocRoundGuard,
}

#[derive(Clone, Debug)]
enum JobState {
    Queued,
    Running,
    Completed(Value),
    Failed(String),
}

struct JobRecord {
    state: JobState,
    finished: Option<Instant>,
    /// The result's size (JSON bytes) once finished.
    bytes: usize,
}

/// Keeps finished results within `max` bytes, dropping the oldest finished first; queued and
/// running jobs are never dropped here.
fn keep_results_within(jobs: &mut HashMap<String, JobRecord>, max: usize) {
    let mut total: usize = jobs.values().map(|r| r.bytes).sum();
    if total <= max {
        return;
    }
    let mut finished: Vec<(Instant, String, usize)> =
        jobs.iter().filter_map(|(id, r)| r.finished.map(|at| (at, id.clone(), r.bytes))).collect();
    finished.sort();
    for (_, id, bytes) in finished {
        if total <= max {
            break;
        }
        jobs.remove(&id);
        total -= bytes;
    }
}

pub struct PocV2Service {
    settings: PocV2Settings,
    manager: Arc<InferenceManager>,
    generation: tokio::sync::Mutex<Option<Generation>>,
    jobs: Mutex<HashMap<String, JobRecord>>,
    queued_nonces: Mutex<usize>,
    /// Cancels every queued and running `generate` job (`stop`).
    jobs_stop: Mutex<CancellationToken>,
    /// One `generate` job at a time, in order.
    job_lane: tokio::sync::Mutex<()>,
}

impl PocV2Service {
    pub fn new(settings: PocV2Settings, manager: Arc<InferenceManager>) -> Arc<Self> {
        Arc::new(Self {
            settings,
            manager,
            generation: tokio::sync::Mutex::new(None),
            jobs: Mutex::new(HashMap::new()),
            queued_nonces: Mutex::new(0),
            jobs_stop: Mutex::new(CancellationToken::new()),
            job_lane: tokio::sync::Mutex::new(()),
        })
    }

    fn backend_port(&self) -> u16 {
        self.settings.inference_port.wrapping_add(1)
    }

    /// Whether a round's generation runs (the state's `poc_status`).
    pub async fn is_generating(&self) -> bool {
        self.generation.lock().await.as_ref().is_some_and(|g| !g.task.is_finished())
    }

    /// Stops generation and drops queued jobs at once; pending artifacts get one last
    /// delivery in the background (a slow callback server does not hold up the answer).
    pub async fn stop(&self) {
        self.stop_generation().await;
    }

    /// As [`Self::stop`], then waits up to `grace` for that last delivery (SIGTERM).
    pub async fn shutdown(&self, grace: Duration) {
        if let Some(task) = self.stop_generation().await {
            let _ = tokio::time::timeout(grace, task).await;
        }
    }

    async fn stop_generation(&self) -> Option<tokio::task::JoinHandle<()>> {
        let generation = self.generation.lock().await.take();
        let task = generation.map(|g| {
            g.stop.cancel();
            g.task
        });
        let jobs_stop = std::mem::replace(&mut *self.jobs_stop.lock().expect("jobs"), CancellationToken::new());
        jobs_stop.cancel();
        self.jobs.lock().expect("jobs").clear();
        *self.queued_nonces.lock().expect("queued") = 0;
        task
    }

    /// What `init/generate` and `generate` check first: a model is served and is the one
    /// `params` names, the callback is under `mlCallbackUrl`, the batch size is in bounds.
    fn admit(&self, params: &PocParams, url: Option<&str>, batch_size: usize) -> Result<(Arc<Served>, usize), Refusal> {
        let served = self
            .manager
            .served()
            .ok_or_else(|| Refusal::Detail(StatusCode::SERVICE_UNAVAILABLE, "No vLLM backends available".into()))?;
        check_params(&served, params).map_err(|detail| self.backend_refusal(StatusCode::CONFLICT, detail))?;
        if let (Some(url), Some(base)) = (url, &self.settings.callback_base)
            && !crate::poc::callback_allowed(url, base)
        {
            return Err(Refusal::Detail(
                StatusCode::BAD_REQUEST,
                format!("callback URL {url} is not under this ML node's mlCallbackUrl {base}"),
            ));
        }
        let size = self.settings.batch_size.unwrap_or(batch_size);
        if !(1..=MAX_BATCH_SIZE).contains(&size) {
            return Err(Refusal::Detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("batch_size must be between 1 and {MAX_BATCH_SIZE}, is {size}"),
            ));
        }
        check_batch_memory(&served, params, size).map_err(|detail| Refusal::Detail(StatusCode::BAD_REQUEST, detail))?;
        Ok((served, size))
    }

    fn backend_refusal(&self, status: StatusCode, detail: Value) -> Refusal {
        Refusal::Backend { port: self.backend_port(), status, detail }
    }
}

enum Refusal {
    /// The ML node's own: FastAPI's `{"detail": ...}` with its status.
    Detail(StatusCode, String),
    /// The backend's, as upstream's ML node relays it: 502 with the backend's words
    /// (`{"detail": {"errors": [{"port", "error": "<backend body>"}]}}`) whatever the backend's
    /// own status (`status`, logged).
    Backend { port: u16, status: StatusCode, detail: Value },
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::Detail(status, detail) => error(status, detail),
            Refusal::Backend { port, status, detail } => {
                tracing::debug!(backend_status = %status, %detail, "PoC v2 request refused");
                let text = json!({"detail": detail}).to_string();
                let body = json!({"detail": {"errors": [{"port": port, "error": text}]}});
                (StatusCode::BAD_GATEWAY, Json(body)).into_response()
            }
        }
    }
}

/// The model in `params` must be the one served (vLLM's `check_params_match`).
/// A batch of `batch_size` nonces of `seq_len` tokens each is one forward: refused before
/// anything is queued when its activations cannot fit what the weights leave of the GPUs (the
/// engine's working memory: a PoC batch runs when no chat does, so the KV cache's share is
/// free to it), or on the CPU the memory the system has available — as PoC v1 checks.
fn check_batch_memory(served: &Served, params: &PocParams, batch_size: usize) -> Result<(), String> {
    let memory = match served.working_memory {
        Some(bytes) => (bytes, "GPU memory beside the weights"),
        None => (crate::poc::engine::available_memory_bytes().unwrap_or(u64::MAX), "available system memory"),
    };
    batch_fits(served.engine.spec(), memory, params.seq_len, batch_size)
}

/// Whether a PoC v2 forward of `batch_size` nonces of `seq_len` tokens fits `budget` bytes of
/// `memory` (named in the refusal).
fn batch_fits(
    spec: &gonka_inference::ModelSpec,
    (budget, memory): (u64, &str),
    seq_len: i64,
    batch_size: usize,
) -> Result<(), String> {
    let (n, seq_len) = (batch_size as u64, seq_len.max(1) as u64);
    let tokens = n.saturating_mul(seq_len);
    let needed = spec.forward_bytes(tokens, tokens.saturating_mul(seq_len), n);
    if needed > budget {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(format!(
            "a PoC batch of {batch_size} nonces of seq_len {seq_len} needs {:.1} GiB; this ML node has {:.1} GiB of {memory}: lower poc.batchSize",
            gib(needed),
            gib(budget)
        ));
    }
    Ok(())
}

fn check_params(served: &Served, params: &PocParams) -> Result<(), Value> {
    if params.model != served.name && served.directory.to_str() != Some(params.model.as_str()) {
        return Err(json!({
            "error": "params mismatch",
            "requested": {"model": params.model, "seq_len": params.seq_len, "k_dim": params.k_dim},
            "deployed": {"model": [served.name], "seq_len": null, "k_dim": null},
        }));
    }
    Ok(())
}

/// The PoC v2 routes' paths, one table for both engines (the seam hands a request matched here
/// to the vLLM fan-out's router, which must know the same paths).
pub mod paths {
    pub const INIT_GENERATE: &str = "/api/v1/inference/pow/init/generate";
    pub const GENERATE: &str = "/api/v1/inference/pow/generate";
    /// `GENERATE` + `/` + the request id.
    pub const GENERATE_RESULT_PREFIX: &str = "/api/v1/inference/pow/generate/";
    pub const GENERATE_RESULT: &str = "/api/v1/inference/pow/generate/{*request_id}";
    pub const STATUS: &str = "/api/v1/inference/pow/status";
    pub const STOP: &str = "/api/v1/inference/pow/stop";
}

pub fn routes() -> Router<Arc<crate::state::AppState>> {
    Router::new()
        .route(paths::INIT_GENERATE, post(init_generate))
        .route(paths::GENERATE, post(generate))
        .route(paths::GENERATE_RESULT, get(generate_result))
        .route(paths::STATUS, get(status))
        .route(paths::STOP, post(stop))
}

type AppState = Arc<crate::state::AppState>;

/// The PoC v2 routes' engine seam: while vLLM serves (or comes up), its fan-out answers them
/// (`super::vllm::pow_v2`), else these routes over the native engine.
pub async fn engine_seam(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use tower::ServiceExt;
    match state.inference.vllm() {
        Some(server) => {
            let routes = super::vllm::pow_v2::routes(server, state.vllm_fanout.clone());
            match routes.oneshot(request).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
        None => next.run(request).await,
    }
}

async fn init_generate(State(state): State<AppState>, JsonBody(body): JsonBody<InitGenerateRequest>) -> Response {
    let service = &state.pow_v2;
    let (served, batch_size) = match service.admit(&body.params, body.url.as_deref(), body.batch_size) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    // Broker numbers run 1..=node_count: node_id may equal node_count (its nonces are then
    // the multiples of node_count, which no other ML node of the host takes).
    if body.node_count < 1 || body.node_id < 0 || body.n_groups < 1 || !(0..body.n_groups).contains(&body.group_id) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "node_count and n_groups must be at least 1, node_id at least 0, group_id below n_groups",
        );
    }
    let mut generation = service.generation.lock().await;
    if generation.as_ref().is_some_and(|g| !g.task.is_finished()) {
        return service.backend_refusal(StatusCode::CONFLICT, json!("Already generating")).into_response();
    }
    let config = RoundConfig {
        block_hash: body.block_hash,
        block_height: body.block_height,
        public_key: body.public_key,
        node_id: body.node_id,
        node_count: body.node_count,
        group_id: body.group_id,
        n_groups: body.n_groups,
        seq_len: body.params.seq_len,
        k_dim: body.params.k_dim,
        batch_size,
        stronger_rng: body.poc_stronger_rng,
    };
    let stop = CancellationToken::new();
    let processed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sender = body.url.map(|url| {
        CallbackSender::start(
            service.settings.http.clone(),
            format!("{}/generated", url.trim_end_matches('/')),
            stop.clone(),
            service.settings.metrics.clone(),
        )
    });
    let reporting = service.settings.reporting.clone();
    reporting.update_state(|s| {
        s.poc = crate::node_state::PocCounters { block_height: Some(config.block_height), ..Default::default() };
    });
    let counters = Counters { processed: processed.clone(), reporting, metrics: service.settings.metrics.clone() };
    let task = tokio::spawn(generation_loop(served, config.clone(), sender, counters, stop.clone()));
    tracing::info!(block_height = config.block_height, node_id = config.node_id, "PoC v2 generation started");
    let _round = service.manager.poc_round_started();
    *generation = Some(Generation { config, started: Instant::now(), processed, stop, task, _round });
    Json(InitGenerateResponse {
        status: "OK".into(),
        backends: 1,
        n_groups: 1,
        results: vec![BackendResult { port: service.backend_port(), status: "OK".into() }],
        errors: None,
    })
    .into_response()
}

/// This ML node's nonces: `node_id + group_id·node_count + x·(n_groups·node_count)`.
fn nonce_sequence(c: &RoundConfig) -> impl Iterator<Item = i64> + use<> {
    let offset = c.node_id + c.group_id * c.node_count;
    let step = c.n_groups * c.node_count;
    (0..).map(move |x: i64| offset + x * step)
}

/// Where a generation's progress is counted: `/inference/pow/status`, the operator's reports,
/// `/metrics`.
struct Counters {
    processed: Arc<std::sync::atomic::AtomicU64>,
    reporting: crate::node_state::Reporting,
    metrics: crate::metrics::DaemonMetrics,
}

impl Counters {
    fn batch_done(&self, nonces: usize, artifacts: usize) {
        self.processed.fetch_add(nonces as u64, std::sync::atomic::Ordering::Relaxed);
        self.reporting.update_state(|s| {
            s.poc.nonces_computed += nonces as u64;
            s.poc.nonces_valid += artifacts as u64;
        });
        // Every PoC v2 nonce that gives an artifact counts (no r_target).
        self.metrics.pow_computed(nonces as u64);
        self.metrics.pow_valid(artifacts as u64);
    }
}

async fn generation_loop(
    served: Arc<Served>,
    config: RoundConfig,
    sender: Option<CallbackSender>,
    counters: Counters,
    stop: CancellationToken,
) {
    let mut nonces = nonce_sequence(&config);
    let mut failures = 0u32;
    let mut pending: Option<Vec<i64>> = None;
    while !stop.is_cancelled() {
        let batch: Vec<i64> = pending.take().unwrap_or_else(|| nonces.by_ref().take(config.batch_size).collect());
        let request = PocBatch {
            block_hash: config.block_hash.clone(),
            public_key: config.public_key.clone(),
            seq_len: config.seq_len,
            k_dim: config.k_dim,
            stronger_rng: config.stronger_rng,
            nonces: batch.clone(),
        };
        let outcome = match served.engine.poc(request) {
            Ok(reply) => tokio::select! {
                r = reply => r.map_err(|_| "the engine stopped".to_string()).and_then(|r| r),
                _ = stop.cancelled() => break,
            },
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok(artifacts) => {
                failures = 0;
                counters.batch_done(batch.len(), artifacts.len());
                if let Some(sender) = &sender {
                    sender.add(
                        artifacts.into_iter().map(|a| Artifact { nonce: a.nonce, vector_b64: a.vector_b64 }),
                        &config,
                    );
                }
            }
            Err(e) => {
                // A failed batch is retried, not skipped: its nonces are the round's.
                failures += 1;
                tracing::warn!(error = %e, failures, "PoC v2 batch failed");
                pending = Some(batch);
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(50)))) => {}
                    _ = stop.cancelled() => break,
                }
            }
        }
    }
    if let Some(sender) = sender {
        sender.finish().await;
    }
}

/// Buffers artifacts and posts them to `{url}/generated` every [`CALLBACK_INTERVAL`], retrying
/// a failed post with backoff (up to 30 s) until stopped; at stop, one last delivery.
struct CallbackSender {
    buffer: Arc<Mutex<Buffered>>,
    task: tokio::task::JoinHandle<()>,
}

/// Artifacts waiting for the callback, their size, and the round they belong to.
#[derive(Default)]
struct Buffered {
    artifacts: VecDeque<Artifact>,
    bytes: usize,
    config: Option<RoundConfig>,
}

/// What one buffered artifact costs.
fn artifact_bytes(a: &Artifact) -> usize {
    a.vector_b64.len() + std::mem::size_of::<Artifact>()
}

impl Buffered {
    /// Adds `artifacts`, then drops the oldest beyond `max_count` or `max_bytes`; returns how
    /// many were dropped.
    fn add(&mut self, artifacts: impl Iterator<Item = Artifact>, max_count: usize, max_bytes: usize) -> usize {
        for a in artifacts {
            self.bytes += artifact_bytes(&a);
            self.artifacts.push_back(a);
        }
        let mut dropped = 0;
        while self.artifacts.len() > max_count || self.bytes > max_bytes {
            let Some(oldest) = self.artifacts.pop_front() else { break };
            self.bytes -= artifact_bytes(&oldest);
            dropped += 1;
        }
        dropped
    }
}

impl CallbackSender {
    fn start(
        http: reqwest::Client,
        url: String,
        stop: CancellationToken,
        metrics: crate::metrics::DaemonMetrics,
    ) -> Self {
        let buffer: Arc<Mutex<Buffered>> = Arc::default();
        let task = {
            let buffer = buffer.clone();
            tokio::spawn(async move {
                let mut backoff = Duration::from_secs(1);
                let mut pending: Option<GeneratedArtifactBatch> = None;
                loop {
                    let stopped = tokio::select! {
                        _ = tokio::time::sleep(CALLBACK_INTERVAL) => false,
                        _ = stop.cancelled() => true,
                    };
                    if pending.is_none() {
                        pending = take_batch(&buffer);
                    }
                    if let Some(batch) = &pending {
                        match post_json(&http, &url, batch).await {
                            Ok(()) => {
                                metrics.pow_sent("generated");
                                pending = None;
                                backoff = Duration::from_secs(1);
                            }
                            Err(e) => {
                                metrics.pow_send_failed("generated");
                                tracing::warn!(error = %e, artifacts = batch.artifacts.len(), "PoC v2 callback failed; retrying");
                                if !stopped {
                                    tokio::select! {
                                        _ = tokio::time::sleep(backoff) => {}
                                        _ = stop.cancelled() => {}
                                    }
                                    backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
                                }
                            }
                        }
                    }
                    if stopped {
                        // The last delivery: what is pending and what the final batch added.
                        let rest = take_batch(&buffer);
                        for batch in pending.iter().chain(rest.iter()) {
                            match post_json(&http, &url, batch).await {
                                Ok(()) => metrics.pow_sent("generated"),
                                Err(e) => {
                                    metrics.pow_send_failed("generated");
                                    tracing::warn!(error = %e, artifacts = batch.artifacts.len(), "PoC v2 artifacts undelivered at stop");
                                }
                            }
                        }
                        return;
                    }
                }
            })
        };
        Self { buffer, task }
    }

    fn add(&self, artifacts: impl Iterator<Item = Artifact>, config: &RoundConfig) {
        let mut guard = self.buffer.lock().expect("buffer");
        let dropped = guard.add(artifacts, MAX_BUFFERED_ARTIFACTS, MAX_BUFFERED_BYTES);
        if dropped > 0 {
            tracing::warn!(dropped, "PoC v2 callback buffer full; dropping the oldest artifacts");
        }
        guard.config = Some(config.clone());
    }

    async fn finish(self) {
        let _ = self.task.await;
    }
}

fn take_batch(buffer: &Mutex<Buffered>) -> Option<GeneratedArtifactBatch> {
    let mut guard = buffer.lock().expect("buffer");
    let config = guard.config.clone()?;
    if guard.artifacts.is_empty() {
        return None;
    }
    let artifacts: Vec<Artifact> = guard.artifacts.drain(..).collect();
    guard.bytes = 0;
    Some(GeneratedArtifactBatch {
        request_id: None,
        block_hash: config.block_hash,
        block_height: config.block_height,
        public_key: config.public_key,
        node_id: config.node_id,
        artifacts,
        encoding: Encoding::f16_le(config.k_dim),
    })
}

async fn post_json<T: serde::Serialize>(http: &reqwest::Client, url: &str, body: &T) -> Result<(), String> {
    let response = http.post(url).json(body).send().await.map_err(|e| e.to_string())?;
    // Only a 2xx delivers: redirects are not followed (the URL was checked, where it points
    // was not), so a 3xx is an undelivered batch, kept for the retry.
    if response.status().is_success() { Ok(()) } else { Err(format!("{url} answered {}", response.status())) }
}

/// Upstream's comparison: per computed artifact with a received one, a mismatch when the
/// received vector is not `k_dim` finite numbers or lies further than `dist_threshold`.
fn compare(computed: &[Artifact], received: &HashMap<i64, String>, threshold: f64, k_dim: i64) -> Vec<i64> {
    computed
        .iter()
        .filter_map(|a| {
            let theirs = decode_vector(received.get(&a.nonce)?);
            let ours = decode_vector(&a.vector_b64)?;
            let mismatch = match theirs {
                Some(v) if v.len() as i64 == k_dim && v.iter().all(|x| x.is_finite()) => {
                    let d: f64 = ours.iter().zip(&v).map(|(x, y)| f64::from(x - y).powi(2)).sum::<f64>().sqrt();
                    d > threshold
                }
                _ => true,
            };
            mismatch.then_some(a.nonce)
        })
        .collect()
}

struct Job {
    id: String,
    body: GenerateRequest,
    batch_size: usize,
}

/// What a finished `generate` job found.
enum Outcome {
    Artifacts(Vec<Artifact>),
    /// A validation's verdict.
    Verdict {
        n_total: i64,
        mismatch_nonces: Vec<i64>,
        p_value: f64,
        fraud_detected: bool,
    },
}

impl Outcome {
    /// The completed answer (`wait: true`, and the poll of a queued job).
    fn answer(&self, job: &Job) -> Value {
        match self {
            Outcome::Artifacts(artifacts) => json!({
                "status": "completed",
                "request_id": job.id,
                "artifacts": artifacts,
                "encoding": Encoding::f16_le(job.body.params.k_dim),
            }),
            Outcome::Verdict { n_total, mismatch_nonces, p_value, fraud_detected } => json!({
                "status": "completed",
                "request_id": job.id,
                "n_total": n_total,
                "n_mismatch": mismatch_nonces.len(),
                "mismatch_nonces": mismatch_nonces,
                "p_value": p_value,
                "fraud_detected": fraud_detected,
            }),
        }
    }
}

/// Computes a job's artifacts (after any round generation, as upstream waits for it) and, for a
/// validation, the verdict.
async fn run_job(
    service: &PocV2Service,
    served: &Served,
    job: &Job,
    cancel: &CancellationToken,
) -> Result<Outcome, String> {
    while service.is_generating().await {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = cancel.cancelled() => return Err("Job cancelled".into()),
        }
    }
    let body = &job.body;
    let mut computed = Vec::with_capacity(body.nonces.len());
    for chunk in body.nonces.chunks(job.batch_size) {
        let reply = served
            .engine
            .poc(PocBatch {
                block_hash: body.block_hash.clone(),
                public_key: body.public_key.clone(),
                seq_len: body.params.seq_len,
                k_dim: body.params.k_dim,
                stronger_rng: body.poc_stronger_rng,
                nonces: chunk.to_vec(),
            })
            .map_err(|e| e.to_string())?;
        let artifacts = tokio::select! {
            r = reply => r.map_err(|_| "the engine stopped".to_string())??,
            _ = cancel.cancelled() => return Err("Job cancelled".into()),
        };
        computed.extend(artifacts.into_iter().map(|a| Artifact { nonce: a.nonce, vector_b64: a.vector_b64 }));
    }
    let Some(validation) = &body.validation else { return Ok(Outcome::Artifacts(computed)) };
    let stat = body.stat_test.clone().unwrap_or_default();
    Ok(judge(&computed, &validation.artifacts, &stat, body.params.k_dim, body.nonces.len() as u64))
}

/// A validation's verdict (upstream's): the received artifacts that are no match for ours, and
/// whether that many mismatches out of `n_total` is implausible for honest hardware (a
/// one-sided binomial test against `p_mismatch`, fraud below `fraud_threshold`).
fn judge(computed: &[Artifact], received: &[Artifact], stat: &StatTest, k_dim: i64, n_total: u64) -> Outcome {
    let received: HashMap<i64, String> = received.iter().map(|a| (a.nonce, a.vector_b64.clone())).collect();
    let mismatch_nonces = compare(computed, &received, stat.dist_threshold, k_dim);
    let p_value = if n_total == 0 {
        1.0
    } else {
        binomial_p_value_greater(mismatch_nonces.len() as u64, n_total, stat.p_mismatch)
    };
    Outcome::Verdict {
        n_total: n_total as i64,
        mismatch_nonces,
        p_value,
        fraud_detected: p_value < stat.fraud_threshold,
    }
}

async fn generate(State(state): State<AppState>, JsonBody(body): JsonBody<GenerateRequest>) -> Response {
    let service = state.pow_v2.clone();
    let (served, batch_size) = match service.admit(&body.params, body.url.as_deref(), body.batch_size) {
        Ok(admitted) => admitted,
        Err(refusal) => return refusal.into_response(),
    };
    let port = service.backend_port();
    // An empty job would bypass the queue's bound (it counts nonces) yet still be kept.
    if body.nonces.is_empty() {
        return error(StatusCode::UNPROCESSABLE_ENTITY, "nonces must not be empty");
    }
    if body.nonces.len() > MAX_GENERATE_NONCES {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("{} nonces in one request; at most {MAX_GENERATE_NONCES}", body.nonces.len()),
        );
    }
    if let Some(v) = &body.validation {
        let theirs: std::collections::BTreeSet<i64> = v.artifacts.iter().map(|a| a.nonce).collect();
        let ours: std::collections::BTreeSet<i64> = body.nonces.iter().copied().collect();
        if theirs != ours {
            let detail = json!("validation.artifacts nonces must match nonces field");
            return service.backend_refusal(StatusCode::BAD_REQUEST, detail).into_response();
        }
    }
    let job = Job { id: uuid::Uuid::new_v4().to_string(), body, batch_size };
    let cancel = service.jobs_stop.lock().expect("jobs").clone();
    if job.body.wait {
        return match run_job(&service, &served, &job, &cancel).await {
            Ok(outcome) => Json(outcome.answer(&job)).into_response(),
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e),
        };
    }
    {
        let mut queued = service.queued_nonces.lock().expect("queued");
        if *queued + job.body.nonces.len() > MAX_QUEUED_NONCES {
            let detail = json!(format!("Queue full: {} nonces queued, limit is {MAX_QUEUED_NONCES}", *queued));
            return service.backend_refusal(StatusCode::TOO_MANY_REQUESTS, detail).into_response();
        }
        *queued += job.body.nonces.len();
    }
    let count = job.body.nonces.len();
    let id = job.id.clone();
    {
        let mut jobs = service.jobs.lock().expect("jobs");
        jobs.retain(|_, r| r.finished.is_none_or(|t| t.elapsed() < RESULT_TTL));
        jobs.insert(id.clone(), JobRecord { state: JobState::Queued, finished: None, bytes: 0 });
    }
    tokio::spawn(async move {
        let _lane = service.job_lane.lock().await;
        if cancel.is_cancelled() {
            return;
        }
        let set = |s: JobState| {
            let mut jobs = service.jobs.lock().expect("jobs");
            if let Some(r) = jobs.get_mut(&job.id) {
                if matches!(s, JobState::Completed(_) | JobState::Failed(_)) {
                    r.finished = Some(Instant::now());
                }
                r.bytes = match &s {
                    JobState::Completed(result) => serde_json::to_vec(result).map_or(0, |b| b.len()),
                    JobState::Failed(e) => e.len(),
                    _ => 0,
                };
                r.state = s;
            }
            keep_results_within(&mut jobs, MAX_RESULT_BYTES);
        };
        set(JobState::Running);
        let outcome = run_job(&service, &served, &job, &cancel).await;
        {
            let mut queued = service.queued_nonces.lock().expect("queued");
            *queued = queued.saturating_sub(job.body.nonces.len());
        }
        match outcome {
            Ok(outcome) => {
                set(JobState::Completed(outcome.answer(&job)));
                if let Some(url) = &job.body.url {
                    deliver(&service.settings.http, url, &job, outcome, &cancel).await;
                }
            }
            Err(e) => set(JobState::Failed(e)),
        }
    });
    Json(json!({"status": "queued", "request_id": format!("{port}:{id}"), "queued_count": count})).into_response()
}

/// Posts a finished job to `{url}/generated` or `{url}/validated`, retrying with backoff until
/// delivered or stopped.
async fn deliver(http: &reqwest::Client, url: &str, job: &Job, outcome: Outcome, cancel: &CancellationToken) {
    let body = &job.body;
    let (path, payload) = match outcome {
        Outcome::Artifacts(artifacts) => (
            "generated",
            serde_json::to_value(GeneratedArtifactBatch {
                request_id: Some(job.id.clone()),
                block_hash: body.block_hash.clone(),
                block_height: body.block_height,
                public_key: body.public_key.clone(),
                node_id: body.node_id,
                artifacts,
                encoding: Encoding::f16_le(body.params.k_dim),
            }),
        ),
        Outcome::Verdict { n_total, mismatch_nonces, p_value, fraud_detected } => (
            "validated",
            serde_json::to_value(ValidatedResult {
                request_id: job.id.clone(),
                block_hash: body.block_hash.clone(),
                block_height: body.block_height,
                public_key: body.public_key.clone(),
                node_id: body.node_id,
                n_total,
                n_mismatch: mismatch_nonces.len() as i64,
                mismatch_nonces,
                p_value,
                fraud_detected,
            }),
        ),
    };
    let Ok(payload) = payload else { return };
    let target = format!("{}/{path}", url.trim_end_matches('/'));
    let mut backoff = Duration::from_secs(1);
    loop {
        match post_json(http, &target, &payload).await {
            Ok(()) => return,
            Err(e) => tracing::warn!(error = %e, "PoC v2 {path} callback failed; retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = cancel.cancelled() => return,
        }
        backoff = (backoff * 2).min(RETRY_BACKOFF_MAX);
    }
}

async fn generate_result(State(state): State<AppState>, Path(request_id): Path<String>) -> Response {
    let service = &state.pow_v2;
    let Some((port, id)) = request_id.split_once(':') else {
        return error(StatusCode::BAD_REQUEST, "Invalid request_id format (expected port:uuid)");
    };
    if port.parse::<u16>().is_err() {
        return error(StatusCode::BAD_REQUEST, "Invalid port in request_id");
    }
    let jobs = service.jobs.lock().expect("jobs");
    let Some(record) = jobs.get(id) else { return error(StatusCode::NOT_FOUND, "Request not found") };
    let mut answer = match &record.state {
        JobState::Queued => json!({"status": "queued"}),
        JobState::Running => json!({"status": "running"}),
        JobState::Completed(result) => result.clone(),
        JobState::Failed(e) => json!({"status": "failed", "error": e}),
    };
    answer["request_id"] = json!(request_id);
    Json(answer).into_response()
}

async fn status(State(state): State<AppState>) -> Json<StatusResponse> {
    let service = &state.pow_v2;
    if !service.manager.is_running() {
        return Json(StatusResponse { status: "NO_BACKENDS".into(), backends: Vec::new() });
    }
    let generation = service.generation.lock().await;
    let backend = match generation.as_ref().filter(|g| !g.task.is_finished()) {
        Some(g) => {
            let processed = g.processed.load(std::sync::atomic::Ordering::Relaxed);
            let elapsed = g.started.elapsed().as_secs_f64();
            json!({
                "port": service.backend_port(),
                "status": "GENERATING",
                "config": g.config,
                "stats": {"total_processed": processed, "nonces_per_second": if elapsed > 0.0 { processed as f64 / elapsed } else { 0.0 }},
            })
        }
        None => json!({"port": service.backend_port(), "status": "IDLE", "config": null, "stats": null}),
    };
    let status = backend["status"].as_str().unwrap_or("IDLE").to_string();
    Json(StatusResponse { status, backends: vec![backend] })
}

async fn stop(State(state): State<AppState>) -> Response {
    let service = &state.pow_v2;
    if !service.manager.is_running() {
        return Json(json!({"status": "OK", "message": "No backends to stop"})).into_response();
    }
    service.stop().await;
    Json(StopResponse {
        status: "OK".into(),
        results: vec![BackendResult { port: service.backend_port(), status: "stopped".into() }],
        errors: None,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_results_are_bounded_in_bytes_oldest_first() {
        let start = Instant::now();
        let record = |state: JobState, finished: Option<u64>, bytes: usize| JobRecord {
            state,
            finished: finished.map(|s| start + Duration::from_secs(s)),
            bytes,
        };
        let mut jobs = HashMap::from([
            ("old".to_string(), record(JobState::Completed(json!({})), Some(1), 100)),
            ("mid".to_string(), record(JobState::Failed("x".into()), Some(2), 100)),
            ("new".to_string(), record(JobState::Completed(json!({})), Some(3), 100)),
            ("running".to_string(), record(JobState::Running, None, 0)),
        ]);
        keep_results_within(&mut jobs, 300);
        assert_eq!(jobs.len(), 4, "at the bound nothing goes");
        keep_results_within(&mut jobs, 250);
        let mut left: Vec<&str> = jobs.keys().map(String::as_str).collect();
        left.sort();
        assert_eq!(left, ["mid", "new", "running"], "the oldest finished went first");
        keep_results_within(&mut jobs, 0);
        assert_eq!(jobs.keys().collect::<Vec<_>>(), ["running"], "a running job is never dropped");
    }

    #[test]
    fn the_callback_buffer_is_bounded_by_count_and_by_bytes() {
        let artifact = |nonce: i64, len: usize| Artifact { nonce, vector_b64: "A".repeat(len) };
        let each = artifact_bytes(&artifact(0, 100));
        // By bytes: room for three artifacts of this size; the oldest go first.
        let mut buffered = Buffered::default();
        assert_eq!(buffered.add((0..3).map(|n| artifact(n, 100)), 1_000, 3 * each), 0);
        assert_eq!(buffered.add((3..5).map(|n| artifact(n, 100)), 1_000, 3 * each), 2);
        let kept: Vec<i64> = buffered.artifacts.iter().map(|a| a.nonce).collect();
        assert_eq!((kept, buffered.bytes), (vec![2, 3, 4], 3 * each));
        // By count, with small artifacts.
        let mut buffered = Buffered::default();
        assert_eq!(buffered.add((0..10).map(|n| artifact(n, 1)), 4, usize::MAX), 6);
        assert_eq!(buffered.artifacts.front().map(|a| a.nonce), Some(6));
        // One artifact larger than the whole bound is not kept either.
        let mut buffered = Buffered::default();
        assert_eq!(buffered.add(std::iter::once(artifact(0, 10_000)), 10, 1_000), 1);
        assert_eq!((buffered.artifacts.len(), buffered.bytes), (0, 0));
    }

    fn encode(v: &[f32]) -> String {
        use base64::Engine as _;
        let bytes: Vec<u8> = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn verdict_of(outcome: Outcome) -> (Vec<i64>, f64, bool) {
        match outcome {
            Outcome::Verdict { mismatch_nonces, p_value, fraud_detected, .. } => {
                (mismatch_nonces, p_value, fraud_detected)
            }
            Outcome::Artifacts(_) => panic!("not a verdict"),
        }
    }

    /// At the edges of the statistics: a few of n artifacts off, and vectors just inside and
    /// just outside `dist_threshold`.
    #[test]
    fn verdicts_at_the_thresholds() {
        let k_dim = 4;
        // Unit-length vectors on the axes, as f16 represents them exactly.
        let ours: Vec<Artifact> = (0..8)
            .map(|n| {
                let mut v = vec![0.0f32; 4];
                v[n as usize % 4] = 1.0;
                Artifact { nonce: n, vector_b64: encode(&v) }
            })
            .collect();
        // 3 of 8 replaced by another axis (distance √2): P(X ≥ 3; 8, 0.1) = 1 − 0.9⁸ − 8·0.1·0.9⁷
        // − 28·0.01·0.9⁶ = 0.03809179 (exact, by hand).
        let mut theirs = ours.clone();
        for a in &mut theirs[..3] {
            let mut v = decode_vector(&a.vector_b64).unwrap();
            v.rotate_right(1);
            a.vector_b64 = encode(&v);
        }
        let stat = |fraud_threshold: f64| StatTest { dist_threshold: 0.4, p_mismatch: 0.1, fraud_threshold };
        let (mismatches, p, fraud) = verdict_of(judge(&ours, &theirs, &stat(0.01), k_dim, 8));
        assert_eq!(mismatches, [0, 1, 2]);
        assert!((p - 0.038_091_79).abs() < 1e-8, "{p}");
        assert!(!fraud, "p ≈ 0.038 is not fraud at 0.01");
        assert!(verdict_of(judge(&ours, &theirs, &stat(0.05), k_dim, 8)).2, "but is at 0.05");
        // 2 of 8: P(X ≥ 2) = 0.18689527: not fraud even at 0.05.
        let (mismatches, p, fraud) = verdict_of(judge(&ours, &theirs[1..], &stat(0.05), k_dim, 8));
        assert_eq!((mismatches, fraud), (vec![1, 2], false));
        assert!((p - 0.186_895_27).abs() < 1e-8, "{p}");

        // One component moved by 0.375 (below 0.4) and by 0.4375 (above), both exact in f16.
        for (shift, mismatch) in [(0.375f32, false), (0.4375, true)] {
            let mut moved = ours.clone();
            let mut v = decode_vector(&moved[5].vector_b64).unwrap();
            v[0] += shift;
            moved[5].vector_b64 = encode(&v);
            let (mismatches, _, _) = verdict_of(judge(&ours, &moved, &stat(0.01), k_dim, 8));
            assert_eq!(mismatches.contains(&5), mismatch, "shifted by {shift}");
        }
        // Not k_dim finite numbers: mismatches (a nonce not received is not judged, as
        // upstream's; an extra one is ignored).
        let mut broken = ours.clone();
        broken[6].vector_b64 = encode(&[f32::NAN, 0.0, 0.0, 0.0]);
        broken[7].vector_b64 = encode(&[1.0, 0.0]);
        broken.push(Artifact { nonce: 99, vector_b64: encode(&[0.0; 4]) });
        let (mismatches, _, _) = verdict_of(judge(&ours, &broken, &stat(0.01), k_dim, 8));
        assert_eq!(mismatches, [6, 7]);
    }

    /// Qwen3-32B's shapes (its config.json).
    fn qwen3_32b() -> gonka_inference::ModelSpec {
        gonka_inference::ModelSpec {
            kv_shared: false,
            compressed: Vec::new(),
            residual_streams: 1,
            kv_window: None,
            kv_layers: 64,
            linear_attention: None,
            architecture: gonka_inference::config::Architecture::Qwen3,
            hidden_size: 5120,
            vocab_size: 151_936,
            layers: 64,
            max_position_embeddings: 40_960,
            kind: tch::Kind::BFloat16,
            kv_kind: tch::Kind::BFloat16,
            attention_heads: 64,
            kv_heads: 8,
            head_dim: 128,
            intermediate_size: 25_600,
        }
    }

    #[test]
    fn a_poc_batch_is_sized_before_it_is_queued() {
        let spec = qwen3_32b();
        // By hand: a row is 6·5120 + (64 + 2·8)·128 + 3·25600 = 117,760 elements of 2 bytes;
        // 4 nonces × 256 tokens = 1024 rows, 4·256·256 = 262,144 query-key pairs × 64 heads ×
        // 4 bytes, and 4 rows of float32 logits copied once (151,936 × 8 bytes each).
        let needed = 1024 * 117_760 * 2 + 262_144 * 64 * 4 + 4 * 151_936 * 8;
        assert_eq!(spec.forward_bytes(1024, 262_144, 4), needed);
        assert_eq!(batch_fits(&spec, (needed, "GPU memory"), 256, 4), Ok(()), "exactly at the budget");
        let refused = batch_fits(&spec, (needed - 1, "GPU memory beside the weights"), 256, 4).unwrap_err();
        assert!(
            refused.starts_with("a PoC batch of 4 nonces of seq_len 256 needs")
                && refused.ends_with("GiB of GPU memory beside the weights: lower poc.batchSize"),
            "{refused}"
        );
        // Upstream's largest batch at a long seq_len on an H100's 80 GB: refused; a small one fits.
        let h100 = (80u64 << 30, "GPU memory beside the weights");
        assert!(batch_fits(&spec, h100, 1024, 1024).is_err());
        assert!(batch_fits(&spec, h100, 1024, 8).is_ok());
    }

    #[test]
    fn the_kv_cache_per_token_is_the_models_keys_and_values() {
        // 2 (keys, values) × 64 layers × 8 heads × 128 dims × 2 bytes: vLLM's 256 KiB a token.
        assert_eq!(qwen3_32b().kv_bytes_per_token(), 262_144);
    }

    fn config(node_id: i64, node_count: i64) -> RoundConfig {
        RoundConfig {
            block_hash: String::new(),
            block_height: 0,
            public_key: String::new(),
            node_id,
            node_count,
            group_id: 0,
            n_groups: 1,
            seq_len: 1,
            k_dim: 12,
            batch_size: 1,
            stronger_rng: false,
        }
    }

    #[test]
    fn nonces_are_disjoint_across_ml_nodes() {
        let a: Vec<i64> = nonce_sequence(&config(0, 3)).take(4).collect();
        let b: Vec<i64> = nonce_sequence(&config(2, 3)).take(4).collect();
        assert_eq!(a, vec![0, 3, 6, 9]);
        assert_eq!(b, vec![2, 5, 8, 11]);
    }

    #[test]
    fn comparison_is_upstreams() {
        use base64::Engine as _;
        let encode = |v: &[f32]| {
            let bytes: Vec<u8> = v.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
            base64::engine::general_purpose::STANDARD.encode(bytes)
        };
        let ours = vec![
            Artifact { nonce: 1, vector_b64: encode(&[1.0, 0.0]) },
            Artifact { nonce: 2, vector_b64: encode(&[0.0, 1.0]) },
        ];
        let received: HashMap<i64, String> =
            [(1, encode(&[0.99, 0.0])), (2, encode(&[1.0, 0.0]))].into_iter().collect();
        assert_eq!(compare(&ours, &received, 0.02, 2), vec![2]);
        // Not k_dim numbers, or not finite: a mismatch.
        let bad: HashMap<i64, String> = [(1, encode(&[1.0])), (2, encode(&[f32::NAN, 1.0]))].into_iter().collect();
        assert_eq!(compare(&ours, &bad, 0.02, 2), vec![1, 2]);
    }
}
