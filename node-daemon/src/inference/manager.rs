//! The inference manager (upstream's `InferenceManager`, `api/inference/manager.py`, 2026):
//! `/inference/up` brings one model up on this ML node's GPUs and keeps it serving until
//! `/inference/down` or `/stop`; `/inference/up/status` reports the start-up.
//!
//! The model is resolved from the model directory (a path, `<models-dir>/<org>/<name>`, or a
//! Hugging Face cache `models--org--name/snapshots/<revision>`), then served by one of two
//! engines ([`Backend`]), as the GonkaNode chose (`models[].engine`) or, by default, by what
//! the checkpoint is ([`choose_engine`]): the native engine of `gonka-inference` (checked
//! against the GPUs' memory before anything is allocated, loaded on a blocking thread), or
//! vLLM servers run and fronted by the daemon as upstream runs them ([`super::vllm`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::collections::BTreeMap;

use gonka_inference::engine::{Engine, EngineOptions, InferenceEngine};
use gonka_inference::placement::{self, LayerBytes, Placement};
use gonka_inference::tokenizer::ChatTokenizer;
use gonka_inference::{LoadOptions, ModelSpec, config::parse_dtype};
use gonka_protocol::daemon_config::ModelEngine;
use gonka_protocol::ml_node::InferenceUpRequest;
use serde::Serialize;
use tch::Device;

use super::answer_parsers::{self, AnswerParsers};
use super::vllm::{self, VllmSettings, supervisor::VllmServer};
use crate::node_state::InferenceState;

#[derive(Clone, Debug, Default)]
pub struct InferenceSettings {
    /// Where models live (the GonkaNode's model volume); `None`: only absolute paths.
    pub models_dir: Option<PathBuf>,
    /// Development only: serve on the CPU when CUDA has no GPU.
    pub allow_cpu: bool,
    /// Engine limits before `additional_args` adjust them.
    pub engine: EngineOptions,
    /// How vLLM runs here; `None`: this ML node has no vLLM.
    pub vllm: Option<VllmSettings>,
    /// The engine `daemon.json` names per model (absent: [`ModelEngine::Auto`]).
    pub engines: BTreeMap<String, ModelEngine>,
    /// The inference port (vLLM instance `i` listens on it `+ i + 1`, as upstream's).
    pub inference_port: u16,
}

/// What the GPUs offer a start-up, from NVML.
#[derive(Clone, Debug, Default)]
pub struct GpuOffer {
    /// Memory free on each, in NVML's order (the native engine plans its layers with it; empty
    /// without GPUs).
    pub free_per_gpu: Vec<u64>,
    /// The available GPUs' NVML indices (vLLM instances get blocks of them).
    pub available: Vec<u32>,
}

/// The engine a model runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    Native,
    Vllm,
}

/// How the native engine fits the checkpoint in a directory.
enum NativeFit {
    Runs,
    /// It runs it, but where vLLM is here too vLLM serves it: FP8 block-quantised weights,
    /// whose native path is correct on the CPU but not yet measured on GPUs against vLLM's
    /// kernels (a fleet that has vLLM keeps earning with it).
    PrefersVllm,
    /// It cannot (why).
    Cannot(String),
}

fn native_fit(dir: &Path) -> NativeFit {
    let config = match gonka_inference::model::read_config(dir) {
        Ok(c) => c,
        Err(e) => return NativeFit::Cannot(e.to_string()),
    };
    if let Err(e) = gonka_inference::model::native_support(&config) {
        return NativeFit::Cannot(e.to_string());
    }
    match gonka_inference::config::fp8_block(&config) {
        Ok(None) => NativeFit::Runs,
        Ok(Some(_)) => NativeFit::PrefersVllm,
        Err(e) => NativeFit::Cannot(e.to_string()),
    }
}

/// Which engine serves a model: the GonkaNode's choice, else native when it runs the
/// checkpoint found in `dir`, else vLLM; an error when the engine needed is not here. `dir` is
/// the checkpoint's directory, or why the models directory has none.
pub fn choose_engine(
    choice: ModelEngine,
    dir: Result<&Path, &str>,
    has_vllm: bool,
    model: &str,
) -> Result<EngineKind, String> {
    let no_vllm =
        |why: &str| format!("{model}: {why}, and this ML node has no vLLM (an image with vLLM, --vllm-python)");
    match choice {
        ModelEngine::Native => Ok(EngineKind::Native),
        ModelEngine::Vllm if has_vllm => Ok(EngineKind::Vllm),
        ModelEngine::Vllm => Err(no_vllm("the GonkaNode asks for the vllm engine")),
        ModelEngine::Auto => match dir {
            // Not in the models directory: vLLM may find it in its own cache; without vLLM,
            // where it was looked for is the answer.
            Err(_) if has_vllm => Ok(EngineKind::Vllm),
            Err(not_found) => Err(not_found.to_string()),
            Ok(dir) => match native_fit(dir) {
                NativeFit::Runs => Ok(EngineKind::Native),
                NativeFit::PrefersVllm | NativeFit::Cannot(_) if has_vllm => Ok(EngineKind::Vllm),
                NativeFit::PrefersVllm => Ok(EngineKind::Native),
                NativeFit::Cannot(why) => Err(no_vllm(&format!("the native engine cannot serve it ({why})"))),
            },
        },
    }
}

/// The engine for a model whose arguments ask vLLM for answer parsers (governance runs the
/// network's models with them): where the native engine lacks one of them
/// ([`answer_parsers`]), under `auto` vLLM serves the model when this ML node has vLLM,
/// answering as the network's other hosts do; `engine`, the choice made from the checkpoint,
/// otherwise (the native engine then leaves those answers unparsed, and logs it).
pub fn engine_for_answers(engine: EngineKind, choice: ModelEngine, has_vllm: bool, args: &[String]) -> EngineKind {
    let native = parse_args(args)
        .is_ok_and(|a| answer_parsers::parsed_natively(a.tool_call_parser.as_deref(), a.reasoning_parser.as_deref()));
    match engine {
        EngineKind::Native if !native && has_vllm && choice == ModelEngine::Auto => EngineKind::Vllm,
        engine => engine,
    }
}

/// A start-up under way: what it will run.
enum Prepared {
    Native(Box<(InferenceSettings, InferenceUpRequest, Vec<u64>)>),
    Vllm(Arc<VllmServer>, std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>),
}

/// What serves the model.
#[derive(Clone)]
pub enum Backend {
    Native(Arc<Served>),
    Vllm(Arc<VllmServer>),
}

/// A model being served.
pub struct Served {
    /// The name it answers to (`--served-model-name`, else the requested model).
    pub name: String,
    pub engine: Arc<dyn InferenceEngine>,
    pub directory: PathBuf,
    /// Sampling defaults from the model's `generation_config.json` (vLLM applies them to
    /// requests that leave the field out).
    pub defaults: GenerationDefaults,
    /// GPU memory beside the weights that the KV cache and a forward's activations share (a PoC
    /// v2 batch, which runs when no chat does, may take all of it); `None` on the CPU.
    pub working_memory: Option<u64>,
    /// The reasoning and tool-call parsers its chat answers go through (`--reasoning-parser`,
    /// `--enable-auto-tool-choice --tool-call-parser`).
    pub parsers: AnswerParsers,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Deserialize)]
pub struct GenerationDefaults {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
}

impl GenerationDefaults {
    fn read(dir: &Path) -> Self {
        std::fs::read(dir.join("generation_config.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }
}

enum Phase {
    Stopped,
    /// Coming up; vLLM's servers are known (and fronted) from their start.
    Starting(Option<Arc<VllmServer>>),
    Running(Backend),
}

/// `GET /inference/up/status` (upstream `StartupStatus`).
#[derive(Serialize, Clone, Debug, PartialEq)]
pub struct StartupStatus {
    /// `not_started`, `in_progress`, `completed`, `failed` (`down` forgets a start-up: then
    /// `not_started`, as upstream).
    pub status: String,
    pub is_starting: bool,
    pub is_running: bool,
    pub elapsed_seconds: Option<f64>,
    pub error: Option<String>,
}

struct Startup {
    started: Instant,
    /// When it ended, and how.
    ended: Option<(Instant, Result<(), String>)>,
}

/// Upstream's words for a start-up that `down` overtook (its status is forgotten with it, as
/// upstream's is).
const CANCELLED: &str = "Startup was cancelled";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpError {
    #[error("VLLM is already running. Use /inference/down to stop it first.")]
    AlreadyRunning,
    #[error("VLLM startup is already in progress. Use /inference/up/status to check status.")]
    AlreadyStarting,
}

pub struct InferenceManager {
    settings: InferenceSettings,
    /// Where the ML node's state goes (the operator's reports): INFERENCE while serving.
    reporting: crate::node_state::Reporting,
    phase: Mutex<Phase>,
    startup: Mutex<Option<Startup>>,
    /// Bumped by `down`: a start-up that finishes after it serves nothing.
    generation: AtomicU64,
    /// Towards vLLM's servers: the supervisor's checks.
    http: reqwest::Client,
    /// PoC v2 rounds generating on the native engine (a stopped round may still be finishing
    /// while the next starts, hence a count).
    poc_rounds: std::sync::atomic::AtomicUsize,
}

/// Held while a PoC v2 round generates on the native engine; see
/// [`InferenceManager::poc_round_generating`].
pub struct PocRoundGuard(Arc<InferenceManager>);

impl Drop for PocRoundGuard {
    fn drop(&mut self) {
        self.0.poc_rounds.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl InferenceManager {
    pub fn new(settings: InferenceSettings, reporting: crate::node_state::Reporting) -> Arc<Self> {
        Arc::new(Self {
            settings,
            reporting,
            phase: Mutex::new(Phase::Stopped),
            startup: Mutex::new(None),
            generation: AtomicU64::new(0),
            http: vllm::proxy::client(),
            poc_rounds: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Marks a PoC v2 round generating until the guard is dropped.
    pub fn poc_round_started(self: &Arc<Self>) -> PocRoundGuard {
        self.poc_rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        PocRoundGuard(self.clone())
    }

    /// Whether a PoC v2 round generates on the native engine. Chat and completions are then
    /// refused (503), as upstream's gonka_poc refuses them while a round generates: the engine
    /// runs chat first, so a caller holding chats open would otherwise starve the round for
    /// the whole PoC window.
    pub fn poc_round_generating(&self) -> bool {
        self.poc_rounds.load(std::sync::atomic::Ordering::SeqCst) > 0
    }

    pub fn settings(&self) -> &InferenceSettings {
        &self.settings
    }

    /// The model on the native engine, once it serves.
    pub fn served(&self) -> Option<Arc<Served>> {
        match &*self.phase.lock().expect("phase") {
            Phase::Running(Backend::Native(served)) => Some(served.clone()),
            _ => None,
        }
    }

    /// vLLM's servers, from their start (while they come up, the inference port and PoC v2
    /// answer as upstream's ML node does then).
    pub fn vllm(&self) -> Option<Arc<VllmServer>> {
        match &*self.phase.lock().expect("phase") {
            Phase::Running(Backend::Vllm(server)) | Phase::Starting(Some(server)) => Some(server.clone()),
            _ => None,
        }
    }

    /// What serves, once the start-up completed.
    pub fn backend(&self) -> Option<Backend> {
        match &*self.phase.lock().expect("phase") {
            Phase::Running(backend) => Some(backend.clone()),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(*self.phase.lock().expect("phase"), Phase::Running(_))
    }

    pub fn is_starting(&self) -> bool {
        matches!(*self.phase.lock().expect("phase"), Phase::Starting(_))
    }

    /// Whether the model serves: the native engine's thread lives, or a vLLM instance is
    /// healthy (upstream's `inference_healthy`).
    pub fn is_healthy(&self) -> bool {
        match self.backend() {
            Some(Backend::Native(served)) => served.engine.is_alive(),
            Some(Backend::Vllm(server)) => !server.healthy().is_empty(),
            None => false,
        }
    }

    /// Starts bringing `request.model` up; the returned task ends with the outcome.
    /// `gpus` is what NVML shows: free memory (to refuse a model that cannot fit on the native
    /// engine) and the available GPUs (for vLLM's instances). The engine is chosen, and vLLM's
    /// servers started, before this returns: from then on the ports answer as that engine does
    /// while it comes up.
    pub fn start(
        self: &Arc<Self>,
        request: InferenceUpRequest,
        gpus: GpuOffer,
    ) -> Result<tokio::task::JoinHandle<Result<(), String>>, UpError> {
        let mut phase = self.phase.lock().expect("phase");
        match *phase {
            Phase::Running(_) => return Err(UpError::AlreadyRunning),
            Phase::Starting(_) => return Err(UpError::AlreadyStarting),
            Phase::Stopped => {}
        }
        let model = request.model.clone();
        let prepared = self.prepare(request, gpus);
        *phase = Phase::Starting(match &prepared {
            Ok(Prepared::Vllm(server, _)) => Some(server.clone()),
            _ => None,
        });
        drop(phase);
        let engine = match &prepared {
            Ok(Prepared::Vllm(server, _)) => {
                self.watch_instances(server.clone());
                "vllm"
            }
            Ok(Prepared::Native(_)) => "native",
            Err(_) => "none",
        };
        *self.startup.lock().expect("startup") = Some(Startup { started: Instant::now(), ended: None });
        let generation = self.generation.load(Ordering::SeqCst);
        let manager = self.clone();
        Ok(tokio::spawn(async move {
            let loaded = match prepared {
                Err(e) => Err(e),
                Ok(Prepared::Native(native)) => {
                    let (settings, request, free_per_gpu) = *native;
                    let model = request.model.clone();
                    tokio::task::spawn_blocking(move || bring_up_native(&settings, &request, &free_per_gpu))
                        .await
                        .unwrap_or_else(|e| Err(format!("loading {model} panicked: {e}")))
                        .map(|served| Backend::Native(Arc::new(served)))
                }
                Ok(Prepared::Vllm(server, started)) => match started.await {
                    Ok(()) => Ok(Backend::Vllm(server)),
                    Err(e) => {
                        server.stop().await;
                        Err(e)
                    }
                },
            };
            let mut phase = manager.phase.lock().expect("phase");
            let current = manager.generation.load(Ordering::SeqCst) == generation;
            let outcome = match loaded {
                Ok(backend) if current => {
                    let name = match &backend {
                        Backend::Native(served) => served.name.clone(),
                        Backend::Vllm(server) => server.served_name.clone(),
                    };
                    tracing::info!(model = %name, "inference up");
                    if let Backend::Native(_) = &backend {
                        manager.report_inference(Some(InferenceState {
                            model: model.clone(),
                            engine: engine.into(),
                            instances: 1,
                            instances_healthy: 1,
                            ..Default::default()
                        }));
                    }
                    *phase = Phase::Running(backend);
                    manager.reporting.update_state(|s| s.service = gonka_protocol::ml_node::ServiceState::Inference);
                    Ok(())
                }
                Ok(backend) => {
                    // `down` overtook the start-up: what came up goes again.
                    drop(phase);
                    stop_backend(backend).await;
                    return Err(CANCELLED.to_string());
                }
                Err(e) => {
                    tracing::error!(error = %e, "inference start-up failed");
                    if current {
                        *phase = Phase::Stopped;
                        // Why it does not serve stays in the report until the next up or down.
                        manager.report_inference(Some(InferenceState {
                            model: model.clone(),
                            engine: engine.into(),
                            last_error: Some(e.clone()),
                            ..Default::default()
                        }));
                    }
                    Err(e)
                }
            };
            drop(phase);
            // A start-up `down` overtook leaves no record (the one there is a newer start's).
            if current && let Some(s) = manager.startup.lock().expect("startup").as_mut() {
                s.ended = Some((Instant::now(), outcome.clone()));
            }
            outcome
        }))
    }

    fn report_inference(&self, inference: Option<InferenceState>) {
        self.reporting.update_state(|s| s.inference = inference);
    }

    /// Reports `server`'s health (instances serving, restarts, errors) while it is this
    /// manager's: checked under the phase lock, so a summary never lands after `down` cleared it.
    fn watch_instances(self: &Arc<Self>, server: Arc<VllmServer>) {
        let manager = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
            loop {
                tick.tick().await;
                let Some(manager) = manager.upgrade() else { return };
                let phase = manager.phase.lock().expect("phase");
                let ours = match &*phase {
                    Phase::Running(Backend::Vllm(s)) | Phase::Starting(Some(s)) => Arc::ptr_eq(s, &server),
                    _ => false,
                };
                if !ours {
                    return;
                }
                let (summary, nonces) = (server.summary(), server.poc_processed());
                manager.reporting.update_state(|s| {
                    s.inference = Some(summary);
                    // A PoC v2 round the fan-out started: the plugin's count (every nonce an
                    // artifact, so valid too).
                    if s.poc.block_height.is_some() {
                        s.poc.nonces_computed = nonces;
                        s.poc.nonces_valid = nonces;
                    }
                });
            }
        });
    }

    /// Resolves the model and chooses its engine; for vLLM, starts its servers.
    fn prepare(&self, request: InferenceUpRequest, gpus: GpuOffer) -> Result<Prepared, String> {
        let settings = &self.settings;
        let dir = resolve_model(settings.models_dir.as_deref(), &request.model);
        let choice = settings.engines.get(&request.model).copied().unwrap_or_default();
        let has_vllm = settings.vllm.is_some();
        let engine = choose_engine(choice, dir.as_deref().map_err(String::as_str), has_vllm, &request.model)?;
        let engine = engine_for_answers(engine, choice, has_vllm, &request.additional_args);
        tracing::info!(model = %request.model, ?choice, ?engine, "engine chosen");
        match (engine, &settings.vllm) {
            (EngineKind::Vllm, Some(vllm)) => {
                let (server, started) = vllm::start(
                    vllm,
                    settings.inference_port,
                    &request,
                    dir.as_deref().ok(),
                    &gpus.available,
                    self.http.clone(),
                )?;
                Ok(Prepared::Vllm(server, Box::pin(started)))
            }
            _ => Ok(Prepared::Native(Box::new((settings.clone(), request, gpus.free_per_gpu)))),
        }
    }

    pub fn startup_status(&self) -> StartupStatus {
        let is_running = self.is_running();
        match &*self.startup.lock().expect("startup") {
            None => StartupStatus {
                status: "not_started".into(),
                is_starting: false,
                is_running,
                elapsed_seconds: None,
                error: None,
            },
            Some(Startup { started, ended: None }) => StartupStatus {
                status: "in_progress".into(),
                is_starting: true,
                is_running: false,
                elapsed_seconds: Some(started.elapsed().as_secs_f64()),
                error: None,
            },
            Some(Startup { started, ended: Some((at, Ok(()))) }) => StartupStatus {
                status: "completed".into(),
                is_starting: false,
                is_running,
                elapsed_seconds: Some((*at - *started).as_secs_f64()),
                error: None,
            },
            Some(Startup { ended: Some((_, Err(e))), .. }) => StartupStatus {
                status: "failed".into(),
                is_starting: false,
                is_running,
                elapsed_seconds: None,
                error: Some(e.clone()),
            },
        }
    }

    /// Stops serving: vLLM's processes are gone when it returns; the native engine's thread
    /// and memory go once in-flight requests let go of it.
    pub async fn down(&self) {
        self.generation.fetch_add(1, Ordering::SeqCst);
        let previous = std::mem::replace(&mut *self.phase.lock().expect("phase"), Phase::Stopped);
        *self.startup.lock().expect("startup") = None;
        self.report_inference(None);
        match previous {
            Phase::Running(backend) => {
                tracing::info!("inference down");
                self.reporting.update_state(|s| s.service = gonka_protocol::ml_node::ServiceState::Stopped);
                stop_backend(backend).await;
            }
            Phase::Starting(Some(server)) => server.stop().await,
            Phase::Starting(None) | Phase::Stopped => {}
        }
    }
}

async fn stop_backend(backend: Backend) {
    match backend {
        Backend::Vllm(server) => server.stop().await,
        // Dropping the engine joins its thread: off the async workers.
        Backend::Native(served) => {
            let _ = tokio::task::spawn_blocking(move || drop(served)).await;
        }
    }
}

/// The model directory `model` names.
pub fn resolve_model(models_dir: Option<&Path>, model: &str) -> Result<PathBuf, String> {
    let direct = Path::new(model);
    if direct.is_absolute() {
        return if direct.join("config.json").is_file() {
            Ok(direct.to_path_buf())
        } else {
            Err(format!("{model} has no config.json"))
        };
    }
    let Some(root) = models_dir else {
        return Err(format!("model {model} not found: this ML node has no models directory (--models-dir)"));
    };
    if model.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
        return Err(format!("model {model:?} is not a Hugging Face repository name"));
    }
    let mut looked = Vec::new();
    let plain = root.join(model);
    looked.push(plain.clone());
    if plain.join("config.json").is_file() {
        return Ok(plain);
    }
    // Hugging Face's cache: <root>[/hub]/models--org--name/snapshots/<revision>, the revision
    // refs/main names, else the only one there is.
    let cache_name = format!("models--{}", model.replace('/', "--"));
    for base in [root.to_path_buf(), root.join("hub")] {
        let repo = base.join(&cache_name);
        looked.push(repo.clone());
        let snapshots = repo.join("snapshots");
        let revision =
            std::fs::read_to_string(repo.join("refs/main")).ok().map(|r| r.trim().to_string()).or_else(|| {
                let mut entries: Vec<_> =
                    std::fs::read_dir(&snapshots).ok()?.flatten().map(|e| e.file_name()).collect();
                (entries.len() == 1).then(|| entries.remove(0).to_string_lossy().into_owned())
            });
        if let Some(revision) = revision {
            let dir = snapshots.join(revision);
            if dir.join("config.json").is_file() {
                return Ok(dir);
            }
        }
    }
    Err(format!(
        "model {model} not found under {} (looked at {})",
        root.display(),
        looked.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    ))
}

/// What `additional_args` (the governance's `model_args` plus the node config's `args`, vLLM
/// flags) can change here; the rest tunes vLLM and is logged and left alone.
#[derive(Debug, Default, PartialEq)]
struct EngineArgs {
    served_model_name: Option<String>,
    max_model_len: Option<i64>,
    max_num_seqs: Option<usize>,
    max_num_batched_tokens: Option<usize>,
    /// The share of the GPUs' memory the engine may use (vLLM's default, 0.92, when absent).
    gpu_memory_utilization: Option<f64>,
    /// The KV cache's size per GPU, in place of what the utilization leaves (vLLM's flag).
    kv_cache_memory_bytes: Option<u64>,
    /// The dtype the KV cache keeps (`--kv-cache-dtype`; governance runs MiniMax-M2.7 with
    /// `fp8`); `None`: the model's.
    kv_cache_dtype: Option<tch::Kind>,
    /// The answer parsers (`--tool-call-parser`, `--reasoning-parser`), and whether tool calls
    /// are parsed at all (`--enable-auto-tool-choice`).
    tool_call_parser: Option<String>,
    reasoning_parser: Option<String>,
    auto_tools: bool,
    ignored: Vec<String>,
}

/// vLLM's default `--gpu-memory-utilization` (vLLM 0.32's `CacheConfig`).
const GPU_MEMORY_UTILIZATION: f64 = 0.92;

/// An integer as vLLM's `human_readable_int` reads one: a plain integer, or digits with a
/// suffix — `k`/`m`/`g`/`t` decimal (1k = 1000; a fraction allowed, the product truncated),
/// `K`/`M`/`G`/`T` binary (1K = 1024; whole numbers only).
fn human_readable_int(text: &str) -> Option<i64> {
    let text = text.trim();
    let Some(suffix) = text.chars().last().filter(|c| c.is_ascii_alphabetic()) else {
        return text.parse().ok();
    };
    let number = &text[..text.len() - 1];
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let binary = |power: u32| digits(number).then(|| number.parse::<i64>().ok()?.checked_mul(1 << (10 * power)))?;
    let decimal = |scale: f64| {
        let valid = match number.split_once('.') {
            Some((whole, fraction)) => digits(whole) && digits(fraction),
            None => digits(number),
        };
        let value = number.parse::<f64>().ok().filter(|_| valid)? * scale;
        (value < i64::MAX as f64).then_some(value as i64)
    };
    match suffix {
        'k' => decimal(1e3),
        'm' => decimal(1e6),
        'g' => decimal(1e9),
        't' => decimal(1e12),
        'K' => binary(1),
        'M' => binary(2),
        'G' => binary(3),
        'T' => binary(4),
        _ => None,
    }
}

fn parse_args(args: &[String]) -> Result<EngineArgs, String> {
    let mut out = EngineArgs::default();
    let mut i = 0;
    while i < args.len() {
        let (flag, inline) = match args[i].split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (args[i].clone(), None),
        };
        let takes_value = [
            "--served-model-name",
            "--max-model-len",
            "--max-num-seqs",
            "--max-num-batched-tokens",
            "--gpu-memory-utilization",
            "--kv-cache-memory-bytes",
            "--kv-cache-dtype",
            "--tool-call-parser",
            "--reasoning-parser",
        ]
        .contains(&flag.as_str());
        let value = if takes_value {
            match inline {
                Some(v) => Some(v),
                None => {
                    i += 1;
                    Some(args.get(i).cloned().ok_or_else(|| format!("{flag} needs a value"))?)
                }
            }
        } else {
            None
        };
        let number = |v: &Option<String>| -> Result<i64, String> {
            human_readable_int(v.as_deref().unwrap_or("")).ok_or_else(|| format!("{flag} takes a number, not {v:?}"))
        };
        match flag.as_str() {
            "--served-model-name" => out.served_model_name = value,
            "--tool-call-parser" => out.tool_call_parser = value,
            "--reasoning-parser" => out.reasoning_parser = value,
            "--enable-auto-tool-choice" => out.auto_tools = true,
            // vLLM's `auto` and -1: the model's own length.
            "--max-model-len" if matches!(value.as_deref(), Some("auto" | "-1")) => out.max_model_len = None,
            "--max-model-len" => out.max_model_len = Some(number(&value)?),
            "--max-num-seqs" => out.max_num_seqs = Some(number(&value)?.max(1) as usize),
            "--max-num-batched-tokens" => out.max_num_batched_tokens = Some(number(&value)?.max(1) as usize),
            "--gpu-memory-utilization" => {
                let share = value.as_deref().unwrap_or("").parse::<f64>().ok().filter(|u| *u > 0.0 && *u <= 1.0);
                out.gpu_memory_utilization =
                    Some(share.ok_or_else(|| format!("{flag} takes a share in (0, 1], not {value:?}"))?);
            }
            "--kv-cache-memory-bytes" => {
                let bytes = number(&value)?;
                if bytes <= 0 {
                    return Err(format!("{flag} must be positive, is {bytes}"));
                }
                out.kv_cache_memory_bytes = Some(bytes as u64);
            }
            "--kv-cache-dtype" => {
                out.kv_cache_dtype = match value.as_deref().unwrap_or("") {
                    "auto" => None,
                    // vLLM's `fp8` is e4m3.
                    "fp8" | "fp8_e4m3" => Some(tch::Kind::Float8e4m3fn),
                    "fp8_e5m2" => Some(tch::Kind::Float8e5m2),
                    "bfloat16" => Some(tch::Kind::BFloat16),
                    other => {
                        return Err(format!(
                            "{flag} {other:?} is not one the native engine keeps (auto, bfloat16, fp8, fp8_e4m3, fp8_e5m2)"
                        ));
                    }
                }
            }
            _ => out.ignored.push(args[i].clone()),
        }
        i += 1;
    }
    Ok(out)
}

fn devices(allow_cpu: bool) -> Result<Vec<Device>, String> {
    let count = tch::Cuda::device_count();
    if count > 0 {
        Ok((0..count as usize).map(Device::Cuda).collect())
    } else if allow_cpu {
        Ok(vec![Device::Cpu])
    } else {
        Err("no CUDA device is visible to this ML node (and CPU compute is off)".into())
    }
}

/// How the native engine lays a model over the ML node's GPUs.
#[derive(Debug)]
struct GpuPlan {
    placement: Placement,
    /// The KV cache's budget, all GPUs together: the tokens the placement fits on every layer.
    kv_cache_bytes: u64,
    /// What the weights leave on the tightest GPU holding layers (a forward's activations pass
    /// through every one of them).
    working_memory: u64,
}

/// Plans `bytes` over GPUs with `free_per_gpu` free: each may use `utilization` of it, less
/// `activations` (one forward's, on whichever GPU runs it), for its run of layers and their
/// KV cache. Pure, for tests on the released models' shapes.
fn plan_on_gpus(
    model: &str,
    bytes: &LayerBytes,
    spec: &ModelSpec,
    free_per_gpu: &[u64],
    utilization: f64,
    activations: u64,
) -> Result<GpuPlan, String> {
    let share = |free: u64| (free as f64 * utilization) as u64;
    let usable: Vec<u64> = free_per_gpu.iter().map(|&free| share(free).saturating_sub(activations)).collect();
    let kv_per_layer = spec.kv_bytes_per_token() / spec.layers.max(1) as u64;
    let placement = placement::plan(bytes, kv_per_layer, &usable).map_err(|e| {
        format!(
            "{model} does not fit this ML node's GPUs: {e}; each GPU offers {utilization} of its free memory \
             (--gpu-memory-utilization) less {:.1} GiB for a forward's activations",
            activations as f64 / (1u64 << 30) as f64
        )
    })?;
    let working_memory = placement
        .shares
        .iter()
        .zip(free_per_gpu)
        .filter(|(s, _)| !s.layers.is_empty())
        .map(|(s, &free)| share(free).saturating_sub(s.weight_bytes))
        .min()
        .unwrap_or(0);
    let kv_cache_bytes = placement.kv_tokens.saturating_mul(spec.kv_bytes_per_token());
    Ok(GpuPlan { placement, kv_cache_bytes, working_memory })
}

fn bring_up_native(
    settings: &InferenceSettings,
    request: &InferenceUpRequest,
    free_per_gpu: &[u64],
) -> Result<Served, String> {
    let directory = resolve_model(settings.models_dir.as_deref(), &request.model)?;
    let dtype = match request.dtype.as_str() {
        "auto" | "" => None,
        name => Some(parse_dtype(name).map_err(|e| e.to_string())?),
    };
    let args = parse_args(&request.additional_args)?;
    if !args.ignored.is_empty() {
        tracing::info!(ignored = ?args.ignored, "vLLM arguments this engine does not use");
    }
    // The tokenizer first: the answer parsers' markers are checked before the weights load.
    let tokenizer = ChatTokenizer::load(&directory).map_err(|e| e.to_string())?;
    let (parsers, not_native) = AnswerParsers::from_flags(
        args.tool_call_parser.as_deref(),
        args.reasoning_parser.as_deref(),
        args.auto_tools,
        |token| tokenizer.token_id(token),
    )
    .map_err(|e| e.to_string())?;
    if !not_native.is_empty() {
        tracing::warn!(
            flags = ?not_native,
            "answer parsers the native engine does not have: those answers come as the model writes them (the vllm \
             engine parses them)"
        );
    }
    let mut options = settings.engine.clone();
    if let Some(len) = args.max_model_len {
        options.max_model_len = Some(len);
    }
    if let Some(n) = args.max_num_seqs {
        options.max_sequences = n;
    }
    if let Some(n) = args.max_num_batched_tokens {
        options.max_step_tokens = n;
    }
    let devices = devices(settings.allow_cpu)?;
    let device_count = devices.len() as u64;
    let mut load_options =
        LoadOptions { dtype, devices: devices.clone(), layers_per_device: None, kv_cache_dtype: args.kv_cache_dtype };
    // On GPUs, the layers are placed with what NVML shows free on each (read from the
    // checkpoint's headers before anything is allocated): every GPU's run of layers, and the
    // KV cache's budget, fit it. NVML's GPUs are CUDA's here; should the counts differ, each is
    // taken to have an equal part of the total.
    let gpu_plan = if !free_per_gpu.is_empty() && devices.iter().all(|d| d.is_cuda()) {
        let free = if free_per_gpu.len() == devices.len() {
            free_per_gpu.to_vec()
        } else {
            vec![free_per_gpu.iter().sum::<u64>() / device_count.max(1); devices.len()]
        };
        let spec = gonka_inference::model::spec(&directory, &load_options).map_err(|e| e.to_string())?;
        let bytes = gonka_inference::model::layer_bytes(&directory, dtype).map_err(|e| e.to_string())?;
        // A step's activations (a prefill chunk of max_step_tokens and the logits of every
        // running sequence) and a layer's FP8 weights widened for its matmuls.
        let step = options.max_step_tokens as u64;
        let widened = gonka_inference::model::fp8_widened_bytes(&directory, dtype).map_err(|e| e.to_string())?;
        let activations = spec.forward_bytes(step, step * step, options.max_sequences as u64) + widened;
        let utilization = args.gpu_memory_utilization.unwrap_or(GPU_MEMORY_UTILIZATION);
        let plan = plan_on_gpus(&request.model, &bytes, &spec, &free, utilization, activations)?;
        tracing::info!(model = %request.model, "layers placed on the GPUs:\n{}", plan.placement);
        Some(plan)
    } else {
        None
    };
    load_options.layers_per_device = gpu_plan.as_ref().map(|plan| plan.placement.layers_per_device());
    let model = gonka_inference::load(&directory, &load_options).map_err(|e| e.to_string())?;
    if tokenizer.vocab_size() as i64 > model.spec.vocab_size {
        return Err(format!(
            "the tokenizer has {} tokens, the model's vocabulary {}",
            tokenizer.vocab_size(),
            model.spec.vocab_size
        ));
    }
    let max_model_len = gonka_inference::engine::context_length(&model.spec, &options);
    let per_token = model.spec.kv_bytes_per_token();
    options.kv_cache_bytes = match args.kv_cache_memory_bytes {
        Some(per_gpu) => Some(per_gpu.saturating_mul(device_count)),
        // On the CPU, nothing is reserved unless --kv-cache-memory-bytes says so.
        None => gpu_plan.as_ref().map(|plan| plan.kv_cache_bytes),
    };
    if let Some(budget) = options.kv_cache_bytes {
        let needed = model.spec.kv_bytes_for(max_model_len as u64);
        if needed > budget {
            let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
            return Err(format!(
                "one sequence of the maximum model length ({max_model_len} tokens) needs {:.2} GiB of KV cache, \
                 more than the {:.2} GiB this ML node has for it: lower --max-model-len, or raise \
                 --gpu-memory-utilization or --kv-cache-memory-bytes",
                gib(needed),
                gib(budget)
            ));
        }
        tracing::info!(
            kv_cache_bytes = budget,
            tokens = budget / per_token.max(1),
            "KV cache budget for the running sequences"
        );
    }
    let engine = Engine::start(model, Arc::new(tokenizer), options);
    Ok(Served {
        name: args.served_model_name.unwrap_or_else(|| request.model.clone()),
        engine: Arc::new(engine),
        defaults: GenerationDefaults::read(&directory),
        directory,
        working_memory: gpu_plan.map(|plan| plan.working_memory),
        parsers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_native_engine_plans_its_layers_with_each_gpus_free_memory() {
        const GIB: u64 = 1 << 30;
        let bytes = LayerBytes { embedding: GIB, layers: vec![10 * GIB; 4], head: GIB, tied: false };
        // 4 layers of 8 key/value heads of 128 in bfloat16: 4 KiB a token on each layer.
        let spec = ModelSpec {
            kv_shared: false,
            compressed: Vec::new(),
            residual_streams: 1,
            kv_window: None,
            kv_layers: 4,
            linear_attention: None,
            architecture: gonka_inference::config::Architecture::Qwen3,
            hidden_size: 4096,
            vocab_size: 32000,
            layers: 4,
            max_position_embeddings: 32768,
            kind: tch::Kind::BFloat16,
            kv_kind: tch::Kind::BFloat16,
            attention_heads: 32,
            kv_heads: 8,
            head_dim: 128,
            intermediate_size: 12288,
        };
        // 30 GiB free on each at 0.9 is 27 GiB; 1 GiB of activations leaves 26 for two layers
        // (21 GiB with the embedding or the head) and 5 GiB of cache at 8 KiB a token.
        let plan = plan_on_gpus("m", &bytes, &spec, &[30 * GIB, 30 * GIB], 0.9, GIB).unwrap();
        assert_eq!(plan.placement.layers_per_device(), vec![2, 2]);
        assert_eq!(plan.placement.kv_tokens, 5 * GIB / 8192);
        assert_eq!(plan.kv_cache_bytes, 5 * GIB / 8192 * 16384);
        // What the weights leave of 27 GiB, activations not taken out: PoC v2 sizes its batches
        // with it.
        assert_eq!(plan.working_memory, 6 * GIB);
        // A GPU someone else holds 10 GiB of: 17 GiB usable, too few for two layers and the head,
        // and the other cannot take three.
        let error = plan_on_gpus("m", &bytes, &spec, &[30 * GIB, 20 * GIB], 0.9, GIB).unwrap_err();
        assert!(error.starts_with("m does not fit this ML node's GPUs: the weights (42.0 GiB)"), "{error}");
        assert!(error.contains("(26.0 GiB + 17.0 GiB)") && error.contains("--gpu-memory-utilization"), "{error}");
        // A larger first GPU takes three layers where the second cannot hold two: 1 GiB left
        // for three layers' cache there (12 KiB a token) sets the cache, and the working memory.
        let plan = plan_on_gpus("m", &bytes, &spec, &[32 * GIB, 20 * GIB], 1.0, 0).unwrap();
        assert_eq!(plan.placement.layers_per_device(), vec![3, 1]);
        assert_eq!(plan.placement.kv_tokens, GIB / 12288);
        assert_eq!(plan.working_memory, GIB);
    }

    #[test]
    fn models_resolve_in_both_layouts_and_nowhere_else() {
        let root = tempfile::tempdir().unwrap();
        let plain = root.path().join("Qwen/Qwen3-0.6B");
        std::fs::create_dir_all(&plain).unwrap();
        std::fs::write(plain.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model(Some(root.path()), "Qwen/Qwen3-0.6B").unwrap(), plain);
        let snap = root.path().join("hub/models--Qwen--QwQ-32B/snapshots/abc123");
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(snap.join("config.json"), "{}").unwrap();
        assert_eq!(resolve_model(Some(root.path()), "Qwen/QwQ-32B").unwrap(), snap);
        std::fs::create_dir_all(root.path().join("hub/models--Qwen--QwQ-32B/refs")).unwrap();
        std::fs::write(root.path().join("hub/models--Qwen--QwQ-32B/refs/main"), "nope\n").unwrap();
        assert!(resolve_model(Some(root.path()), "Qwen/QwQ-32B").is_err());
        let err = resolve_model(Some(root.path()), "Qwen/Missing").unwrap_err();
        assert!(err.contains("Qwen/Missing") && err.contains("looked at"), "{err}");
        assert!(resolve_model(Some(root.path()), "../etc").unwrap_err().contains("not a Hugging Face"));
        assert!(resolve_model(None, "Qwen/Qwen3-0.6B").unwrap_err().contains("--models-dir"));
        assert_eq!(resolve_model(None, plain.to_str().unwrap()).unwrap(), plain);
    }

    #[test]
    fn the_engine_is_the_gonka_nodes_choice_else_what_the_checkpoint_needs() {
        let root = tempfile::tempdir().unwrap();
        let write = |name: &str, config: serde_json::Value| {
            let dir = root.path().join(name);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            dir
        };
        let qwen3 = write("qwen3", serde_json::json!({"model_type": "qwen3"}));
        // DeepSeek-V4 as released: FP8 blocks (and MXFP4 experts), which the native engine loads
        // but leaves to vLLM where it is here, as it does every block-quantised checkpoint.
        let deepseek = write(
            "deepseek",
            serde_json::json!({"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"],
                "compress_ratios": [0, 4, 128], "num_hidden_layers": 3, "quantization_config":
                {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}),
        );
        // Unquantised, every layer type runs natively; a layer type it does not know does not.
        let deepseek_plain = write(
            "deepseek-plain",
            serde_json::json!({"model_type": "deepseek_v4", "num_hidden_layers": 3, "compress_ratios": [0, 4, 128]}),
        );
        let deepseek_unknown = write(
            "deepseek-unknown",
            serde_json::json!({"model_type": "deepseek_v4", "num_hidden_layers": 2, "compress_ratios": [0, 16]}),
        );
        // GLM-5.3-Flash: its language model nested under text_config, in transformers' default
        // schedule (three linear layers in four, then an indexed one), runs natively
        // unquantised; a layer type the engine does not know goes to vLLM.
        let glm = write(
            "glm",
            serde_json::json!({"model_type": "glm5_next", "architectures": ["Glm5NextForConditionalGeneration"],
                "text_config": {"num_hidden_layers": 8}}),
        );
        let glm_unknown = write(
            "glm-unknown",
            serde_json::json!({"model_type": "glm5_next", "text_config": {"num_hidden_layers": 2,
                "layer_types": ["indexed_attention", "sliding_attention"]}}),
        );
        // MiniMax-M2 runs natively unquantised; the released checkpoint is FP8.
        let minimax = write("minimax", serde_json::json!({"model_type": "minimax_m2"}));
        // As released: FP8 in 128×128 blocks.
        let minimax_fp8 = write(
            "minimax-fp8",
            serde_json::json!({"model_type": "minimax_m2", "quantization_config":
                {"quant_method": "fp8", "fmt": "float8_e4m3fn", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}}),
        );
        let awq =
            write("awq", serde_json::json!({"model_type": "qwen3", "quantization_config": {"quant_method": "awq"}}));
        let fp8 =
            write("fp8", serde_json::json!({"model_type": "qwen3", "quantization_config": {"quant_method": "fp8"}}));
        let auto = ModelEngine::Auto;
        assert_eq!(choose_engine(auto, Ok(&qwen3), true, "q").unwrap(), EngineKind::Native);
        assert_eq!(choose_engine(auto, Ok(&deepseek), true, "d").unwrap(), EngineKind::Vllm);
        assert_eq!(choose_engine(auto, Ok(&deepseek_plain), true, "d").unwrap(), EngineKind::Native);
        assert_eq!(choose_engine(auto, Ok(&deepseek_unknown), true, "d").unwrap(), EngineKind::Vllm);
        let err = choose_engine(auto, Ok(&deepseek_unknown), false, "d").unwrap_err();
        assert!(err.contains("compress_ratios: 16 is none of 0, 4 and 128"), "{err}");
        assert_eq!(choose_engine(auto, Ok(&glm), true, "g").unwrap(), EngineKind::Native);
        assert_eq!(choose_engine(auto, Ok(&glm_unknown), true, "g").unwrap(), EngineKind::Vllm);
        let err = choose_engine(auto, Ok(&glm_unknown), false, "zai-org/GLM-5.3-Flash").unwrap_err();
        assert!(err.contains("layer 1's type \"sliding_attention\"") && err.contains("no vLLM"), "{err}");
        assert_eq!(choose_engine(auto, Ok(&minimax), true, "m").unwrap(), EngineKind::Native);
        assert_eq!(choose_engine(auto, Ok(&minimax_fp8), true, "m").unwrap(), EngineKind::Vllm);
        assert_eq!(choose_engine(auto, Ok(&fp8), true, "f").unwrap(), EngineKind::Vllm);
        assert_eq!(
            choose_engine(auto, Err("x not found"), true, "x").unwrap(),
            EngineKind::Vllm,
            "vLLM may find it in its cache"
        );
        assert_eq!(choose_engine(auto, Err("x not found under /m"), false, "x").unwrap_err(), "x not found under /m");
        // Forced either way.
        assert_eq!(choose_engine(ModelEngine::Vllm, Ok(&qwen3), true, "q").unwrap(), EngineKind::Vllm);
        assert_eq!(choose_engine(ModelEngine::Native, Ok(&deepseek), true, "d").unwrap(), EngineKind::Native);
        // Without vLLM: the released DeepSeek-V4 runs natively; what the native engine cannot
        // run is refused, naming why.
        assert_eq!(choose_engine(auto, Ok(&deepseek), false, "d").unwrap(), EngineKind::Native);
        let err = choose_engine(auto, Ok(&deepseek_unknown), false, "deepseek-ai/DeepSeek-V4-Flash-0731").unwrap_err();
        assert!(err.contains("deepseek-ai/DeepSeek-V4-Flash-0731") && err.contains("no vLLM"), "{err}");
        // FP8 in blocks: vLLM where it is here, else the native engine; other quantisations
        // (per-tensor FP8, AWQ) only vLLM.
        assert_eq!(choose_engine(auto, Ok(&minimax_fp8), false, "m").unwrap(), EngineKind::Native);
        assert_eq!(choose_engine(auto, Ok(&awq), true, "a").unwrap(), EngineKind::Vllm);
        let err = choose_engine(auto, Ok(&awq), false, "Qwen/Qwen3-32B-AWQ").unwrap_err();
        assert!(err.contains("Qwen/Qwen3-32B-AWQ") && err.contains("quantised (awq)"), "{err}");
        assert!(choose_engine(auto, Ok(&fp8), false, "f").unwrap_err().contains("quantised (fp8)"));
        assert!(
            choose_engine(ModelEngine::Vllm, Ok(&qwen3), false, "q").unwrap_err().contains("asks for the vllm engine")
        );
        assert_eq!(choose_engine(auto, Ok(&qwen3), false, "q").unwrap(), EngineKind::Native);
    }

    /// Parsers the native engine lacks send a model it runs to vLLM under `auto`, where there
    /// is one; governance's MiniMax-M2 and GLM ones, which it has, keep it native, as do a
    /// GonkaNode's explicit choice and an ML node without vLLM.
    #[test]
    fn answer_parsers_the_native_engine_lacks_prefer_vllm_under_auto() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let glm = args(&["--enable-auto-tool-choice", "--tool-call-parser", "glm47", "--reasoning-parser", "glm45"]);
        let hermes = args(&["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]);
        let minimax = args(&[
            "--enable-auto-tool-choice",
            "--tool-call-parser",
            "minimax_m2",
            "--reasoning-parser=minimax_m2_append_think",
        ]);
        let (auto, native) = (ModelEngine::Auto, EngineKind::Native);
        assert_eq!(engine_for_answers(native, auto, true, &hermes), EngineKind::Vllm);
        assert_eq!(engine_for_answers(native, auto, true, &args(&["--reasoning-parser=qwen3"])), EngineKind::Vllm);
        assert_eq!(engine_for_answers(native, auto, true, &minimax), native);
        assert_eq!(engine_for_answers(native, auto, true, &glm), native);
        assert_eq!(engine_for_answers(native, auto, true, &args(&["--max-model-len", "128"])), native);
        assert_eq!(engine_for_answers(native, auto, false, &hermes), native);
        assert_eq!(engine_for_answers(native, ModelEngine::Native, true, &hermes), native);
        assert_eq!(engine_for_answers(EngineKind::Vllm, auto, true, &[]), EngineKind::Vllm);
    }

    #[test]
    fn vllm_arguments_that_apply_here_are_read() {
        let args: Vec<String> =
            ["--max-model-len", "4096", "--served-model-name=qwen", "--tensor-parallel-size", "4", "--enforce-eager"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let parsed = parse_args(&args).unwrap();
        assert_eq!(parsed.max_model_len, Some(4096));
        assert_eq!(parsed.served_model_name.as_deref(), Some("qwen"));
        assert_eq!(parsed.ignored, vec!["--tensor-parallel-size", "4", "--enforce-eager"]);
        assert!(parse_args(&["--max-model-len".to_string()]).unwrap_err().contains("needs a value"));
        assert!(parse_args(&["--max-model-len=x".to_string()]).unwrap_err().contains("number"));
    }

    /// The arguments a network node hands an ML node for MiniMax-M2.7 today: governance's model
    /// args, then the H200 node args of upstream's deploy/join config (docs: gonka-network.md
    /// §9). The native engine reads the context length, the FP8 cache, the sequence limit and
    /// the answer parsers, and passes over the rest (tensor parallelism, vLLM's MoE and
    /// attention backends, its scheduling policy), values included.
    #[test]
    fn minimax_m2_7s_network_arguments_are_read() {
        let args: Vec<String> = [
            "--enable-auto-tool-choice",
            "--max-model-len",
            "180000",
            "--kv-cache-dtype",
            "fp8",
            "--tool-call-parser",
            "minimax_m2",
            "--reasoning-parser",
            "minimax_m2_append_think",
            "-tp",
            "2",
            "--kv-cache-dtype",
            "fp8",
            "--moe-backend",
            "triton",
            "--attention-backend",
            "FLASHINFER",
            "--max-num-seqs",
            "608",
            "--scheduling-policy",
            "priority",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let parsed = parse_args(&args).unwrap();
        assert_eq!(parsed.max_model_len, Some(180_000));
        assert_eq!(parsed.kv_cache_dtype, Some(tch::Kind::Float8e4m3fn));
        assert_eq!(parsed.max_num_seqs, Some(608));
        assert_eq!(parsed.served_model_name, None);
        assert_eq!(parsed.tool_call_parser.as_deref(), Some("minimax_m2"));
        assert_eq!(parsed.reasoning_parser.as_deref(), Some("minimax_m2_append_think"));
        assert!(parsed.auto_tools);
        assert_eq!(
            parsed.ignored,
            vec![
                "-tp",
                "2",
                "--moe-backend",
                "triton",
                "--attention-backend",
                "FLASHINFER",
                "--scheduling-policy",
                "priority",
            ]
        );
    }

    #[test]
    fn memory_flags_read_as_vllm_reads_them() {
        let parse = |args: &[&str]| parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let parsed =
            parse(&["--kv-cache-memory-bytes", "2G", "--gpu-memory-utilization=0.5", "--max-model-len=1k"]).unwrap();
        assert_eq!(parsed.kv_cache_memory_bytes, Some(2 << 30));
        assert_eq!(parsed.gpu_memory_utilization, Some(0.5));
        assert_eq!(parsed.max_model_len, Some(1000));
        assert_eq!(parse(&["--max-model-len", "auto"]).unwrap().max_model_len, None);
        assert!(parse(&["--gpu-memory-utilization", "1.5"]).unwrap_err().contains("(0, 1]"));
        assert!(parse(&["--gpu-memory-utilization", "0"]).unwrap_err().contains("(0, 1]"));
        assert!(parse(&["--kv-cache-memory-bytes", "0"]).unwrap_err().contains("positive"));
        // Governance's MiniMax-M2.7 args keep the cache in FP8 (e4m3, as vLLM's `fp8`).
        let kv = |value: &str| parse(&["--kv-cache-dtype", value]).map(|a| a.kv_cache_dtype);
        assert_eq!(kv("fp8"), Ok(Some(tch::Kind::Float8e4m3fn)));
        assert_eq!(kv("fp8_e4m3"), Ok(Some(tch::Kind::Float8e4m3fn)));
        assert_eq!(kv("fp8_e5m2"), Ok(Some(tch::Kind::Float8e5m2)));
        assert_eq!(kv("auto"), Ok(None));
        assert!(kv("fp8_ds_mla").unwrap_err().contains("not one the native engine keeps"));
        assert!(parse(&["--kv-cache-dtype=fp8"]).unwrap().ignored.is_empty());
        // vLLM's argparse_utils examples, and what it refuses.
        for (text, value) in
            [("1k", 1000), ("1K", 1024), ("25.6k", 25_600), ("1.0001k", 1000), ("2M", 2 << 20), ("123", 123)]
        {
            assert_eq!(human_readable_int(text), Some(value), "{text}");
        }
        for text in ["", "k", "1.5", "1.5K", "1x", "-k", "1.k", ".5k"] {
            assert_eq!(human_readable_int(text), None, "{text}");
        }
    }
}
