//! The engine: one thread owns the model and runs a continuous-batching loop (mistral.rs's
//! split: this scheduler and the KV caches apart from the model code). Callers on any thread
//! submit generations and PoC batches through an [`Engine`] handle and read results from
//! channels.
//!
//! Each iteration takes every running sequence one step: sequences that are decoding bring
//! their last token, sequences still reading their prompt bring a chunk of it (prefill is split
//! over steps under a token budget), all in one forward. New requests join at the next
//! iteration, finished or abandoned ones (their receiver dropped) leave. PoC batches run only
//! when no chat sequence is waiting or running: PoC yields to inference, as upstream's queue
//! makes it.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tch::{Device, Kind, Tensor};
use tokio::sync::{mpsc as async_mpsc, oneshot};

use crate::batch::{Output, Step, StepInput};
use crate::kv_cache::SequenceCache;
use crate::models::{ModelSpec, Transformer};
use crate::poc_v2::{self, Artifact, Reflections, Round};
use crate::sampling::{Choice, Sampler, SamplingParams};
use crate::tokenizer::{ChatTokenizer, TextStream};

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Sequences decoded together at most; more wait their turn.
    pub max_sequences: usize,
    /// Tokens one step forwards at most (bounds a step's activations; long prompts are read
    /// in chunks of this).
    pub max_step_tokens: usize,
    /// Prompt plus completion at most; the model's `max_position_embeddings` when `None`.
    pub max_model_len: Option<i64>,
    /// Bytes the running sequences' KV caches may take together; `None`: no limit (the CPU,
    /// tests). A sequence is admitted only when the keys and values of its prompt and its
    /// `max_tokens` fit beside those of the sequences running (vLLM's admission, without its
    /// paging): a step never allocates past the budget, so one long request cannot make the
    /// device run out of memory and fail every sequence in the step.
    pub kv_cache_bytes: Option<u64>,
    /// Positions of a validator's replay whose logits one step reads at most (each a row of
    /// the vocabulary's width in float32: 256 rows of a 200,000-token vocabulary are 200 MB).
    pub max_replay_rows: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            max_sequences: 32,
            max_step_tokens: 2048,
            max_model_len: None,
            kv_cache_bytes: None,
            max_replay_rows: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An end-of-sequence token, a stop token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl FinishReason {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A token generated (every one, the one that ends the generation too), with its logprobs
    /// when they were asked for; it comes before any text it completes.
    Token(Choice),
    /// Text the newest tokens complete (text that might begin a stop string is held back).
    Text(String),
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The engine failed this sequence (a device error); the engine itself goes on.
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct Generation {
    pub prompt: Vec<i64>,
    pub params: SamplingParams,
}

/// A PoC v2 batch: the round's fixed inputs and the nonces to compute.
#[derive(Debug, Clone)]
pub struct PocBatch {
    pub block_hash: String,
    pub public_key: String,
    pub seq_len: i64,
    pub k_dim: i64,
    pub stronger_rng: bool,
    pub nonces: Vec<i64>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EngineError {
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the prompt is {prompt} tokens; this model takes at most {max_model_len} tokens in all")]
    PromptTooLong { prompt: usize, max_model_len: i64 },
    #[error("token id {0} is outside the vocabulary")]
    TokenOutOfRange(i64),
    #[error(
        "the prompt and max_tokens take {tokens} tokens of KV cache ({needed} bytes); this engine's KV cache holds {budget} bytes"
    )]
    KvCacheTooSmall { tokens: i64, needed: u64, budget: u64 },
    #[error("PoC v2: seq_len {seq_len} must be 1..={max_model_len} and k_dim {k_dim} 1..={hidden}")]
    PocShape { seq_len: i64, k_dim: i64, max_model_len: i64, hidden: i64 },
    #[error("the engine has stopped")]
    Stopped,
}

/// Where a PoC batch's artifacts (or why there are none) go.
pub type PocReply = oneshot::Sender<Result<Vec<Artifact>, String>>;

enum Command {
    Generate { request: Generation, events: async_mpsc::UnboundedSender<Event> },
    Poc { batch: PocBatch, reply: PocReply },
}

/// Load at a glance, for health answers and PoC's "is inference busy".
#[derive(Debug, Default)]
pub struct EngineLoad {
    running: AtomicUsize,
    waiting: AtomicUsize,
    poc_waiting: AtomicUsize,
    kv_reserved: AtomicU64,
}

impl EngineLoad {
    pub fn running(&self) -> usize {
        self.running.load(Ordering::Relaxed)
    }

    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    pub fn poc_waiting(&self) -> usize {
        self.poc_waiting.load(Ordering::Relaxed)
    }

    /// KV-cache bytes the running sequences hold (as of the last admission).
    pub fn kv_reserved(&self) -> u64 {
        self.kv_reserved.load(Ordering::Relaxed)
    }
}

/// What an ML node asks of an inference engine: generations, PoC v2 batches on the served
/// model, its tokenizer and context length. [`Engine`] (libtorch, this crate) is one; an engine
/// driving upstream's vLLM fork, for models too large for this one, plugs in behind the same
/// calls.
pub trait InferenceEngine: Send + Sync {
    /// Queues a generation; its events arrive on the receiver (drop it to cancel).
    fn generate(&self, request: Generation) -> Result<async_mpsc::UnboundedReceiver<Event>, EngineError>;
    /// Queues a PoC v2 batch, run when no chat waits.
    fn poc(&self, batch: PocBatch) -> Result<oneshot::Receiver<Result<Vec<Artifact>, String>>, EngineError>;
    fn tokenizer(&self) -> &ChatTokenizer;
    /// Prompt plus completion at most.
    fn max_model_len(&self) -> i64;
    /// The served model's shapes (for sizing work before it is queued).
    fn spec(&self) -> &ModelSpec;
    /// Whether the engine still runs (else the ML node is unhealthy).
    fn is_alive(&self) -> bool;
}

impl InferenceEngine for Engine {
    fn generate(&self, request: Generation) -> Result<async_mpsc::UnboundedReceiver<Event>, EngineError> {
        Engine::generate(self, request)
    }

    fn poc(&self, batch: PocBatch) -> Result<oneshot::Receiver<Result<Vec<Artifact>, String>>, EngineError> {
        Engine::poc(self, batch)
    }

    fn tokenizer(&self) -> &ChatTokenizer {
        Engine::tokenizer(self)
    }

    fn max_model_len(&self) -> i64 {
        Engine::max_model_len(self)
    }

    fn spec(&self) -> &ModelSpec {
        Engine::spec(self)
    }

    fn is_alive(&self) -> bool {
        Engine::is_alive(self)
    }
}

/// Prompt plus completion at most: `options.max_model_len`, never past the model's positions.
pub fn context_length(spec: &ModelSpec, options: &EngineOptions) -> i64 {
    options.max_model_len.unwrap_or(spec.max_position_embeddings).min(spec.max_position_embeddings)
}

/// A handle on the engine thread; dropping the last one stops it (after the current step).
pub struct Engine {
    commands: Option<mpsc::Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    spec: ModelSpec,
    tokenizer: Arc<ChatTokenizer>,
    max_model_len: i64,
    kv_cache_bytes: Option<u64>,
    load: Arc<EngineLoad>,
}

impl Engine {
    pub fn start(model: Transformer, tokenizer: Arc<ChatTokenizer>, options: EngineOptions) -> Self {
        let spec = model.spec.clone();
        let max_model_len = context_length(&spec, &options);
        let (commands, inbox) = mpsc::channel();
        let load = Arc::new(EngineLoad::default());
        let kv_cache_bytes = options.kv_cache_bytes;
        let mut scheduler = Scheduler {
            model,
            tokenizer: tokenizer.clone(),
            options,
            max_model_len,
            inbox,
            waiting: VecDeque::new(),
            running: Vec::new(),
            poc: VecDeque::new(),
            reflections: None,
            load: load.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("inference-engine".into())
            .spawn(move || scheduler.run())
            .expect("spawning the engine thread");
        Self { commands: Some(commands), thread: Some(thread), spec, tokenizer, max_model_len, kv_cache_bytes, load }
    }

    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }

    pub fn max_model_len(&self) -> i64 {
        self.max_model_len
    }

    pub fn load(&self) -> &EngineLoad {
        &self.load
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Whether the engine thread still runs.
    pub fn is_alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Queues a generation; its events arrive on the returned receiver (drop it to cancel).
    pub fn generate(&self, mut request: Generation) -> Result<async_mpsc::UnboundedReceiver<Event>, EngineError> {
        if request.prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if request.prompt.len() as i64 >= self.max_model_len {
            return Err(EngineError::PromptTooLong { prompt: request.prompt.len(), max_model_len: self.max_model_len });
        }
        if let Some(&bad) =
            request.prompt.iter().chain(&request.params.enforced).find(|&&t| t < 0 || t >= self.spec.vocab_size)
        {
            return Err(EngineError::TokenOutOfRange(bad));
        }
        let room = (self.max_model_len - request.prompt.len() as i64) as usize;
        request.params.max_tokens = request.params.max_tokens.min(room);
        let tokens = (request.prompt.len() + request.params.max_tokens) as i64;
        let needed = self.spec.kv_bytes_for(tokens as u64);
        if let Some(budget) = self.kv_cache_bytes
            && needed > budget
        {
            return Err(EngineError::KvCacheTooSmall { tokens, needed, budget });
        }
        let (events, receiver) = async_mpsc::unbounded_channel();
        // Counted before the engine can see it (and take it off the count).
        self.load.waiting.fetch_add(1, Ordering::Relaxed);
        self.send(Command::Generate { request, events }).inspect_err(|_| {
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
        })?;
        Ok(receiver)
    }

    /// Queues a PoC v2 batch; it runs when no chat sequence is waiting or running.
    pub fn poc(&self, batch: PocBatch) -> Result<oneshot::Receiver<Result<Vec<Artifact>, String>>, EngineError> {
        let hidden = self.spec.hidden_size;
        if !(1..=self.max_model_len).contains(&batch.seq_len) || !(1..=hidden).contains(&batch.k_dim) {
            return Err(EngineError::PocShape {
                seq_len: batch.seq_len,
                k_dim: batch.k_dim,
                max_model_len: self.max_model_len,
                hidden,
            });
        }
        let (reply, receiver) = oneshot::channel();
        self.load.poc_waiting.fetch_add(1, Ordering::Relaxed);
        self.send(Command::Poc { batch, reply }).inspect_err(|_| {
            self.load.poc_waiting.fetch_sub(1, Ordering::Relaxed);
        })?;
        Ok(receiver)
    }

    fn send(&self, command: Command) -> Result<(), EngineError> {
        self.commands.as_ref().ok_or(EngineError::Stopped)?.send(command).map_err(|_| EngineError::Stopped)
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        // Closing the channel ends the loop once nothing is left to do; the model's memory is
        // freed when the thread returns.
        self.commands.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Sequence {
    cache: SequenceCache,
    /// KV-cache bytes held for it while it runs (prompt plus `max_tokens`).
    reserved: u64,
    prompt: Vec<i64>,
    /// What is prefilled: the prompt, then a replay's enforced tokens but the last (their
    /// logits are all known to be needed, so a replay takes one prefill, not a decode step a
    /// token).
    feed: Vec<i64>,
    /// Tokens of `feed` already in the cache.
    prefilled: usize,
    /// The last sampled token (the next step's input once the prompt is in).
    last: Option<i64>,
    completion_tokens: usize,
    params: SamplingParams,
    /// The ids that end it: its stop token ids, and end-of-sequence ids unless ignored.
    stops: Vec<i64>,
    sampler: Sampler,
    stream: TextStream,
    /// Generated text (special tokens skipped) and how much of it was sent.
    text: String,
    sent: usize,
    events: async_mpsc::UnboundedSender<Event>,
    /// This step's input, planned before the forward.
    input: Option<Vec<i64>>,
}

impl Sequence {
    fn finish(&mut self, reason: FinishReason) {
        let _ = self.events.send(Event::Finished {
            reason,
            prompt_tokens: self.prompt.len(),
            completion_tokens: self.completion_tokens,
        });
    }

    /// Sends everything, including text the stream held back mid-character (a whole decode
    /// shows it as U+FFFD, and so does the final answer).
    fn flush(&mut self, tokenizer: &ChatTokenizer) {
        if let Ok(rest) = self.stream.flush(tokenizer) {
            self.text.push_str(&rest);
        }
        self.send_until(self.text.len());
    }

    /// Sends text up to `end` (a char boundary past `sent`).
    fn send_until(&mut self, end: usize) {
        if end > self.sent {
            let _ = self.events.send(Event::Text(self.text[self.sent..end].to_string()));
            self.sent = end;
        }
    }
}

struct Scheduler {
    model: Transformer,
    tokenizer: Arc<ChatTokenizer>,
    options: EngineOptions,
    max_model_len: i64,
    inbox: mpsc::Receiver<Command>,
    waiting: VecDeque<Sequence>,
    running: Vec<Sequence>,
    poc: VecDeque<(PocBatch, PocReply)>,
    /// The reflections of the last PoC round's block hash.
    reflections: Option<Reflections>,
    load: Arc<EngineLoad>,
}

impl Scheduler {
    fn run(&mut self) {
        let _guard = tch::no_grad_guard();
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty() && self.poc.is_empty();
            if idle {
                match self.inbox.recv() {
                    Ok(command) => self.accept(command),
                    Err(_) => return,
                }
            }
            while let Ok(command) = self.inbox.try_recv() {
                self.accept(command);
            }
            self.admit();
            if !self.running.is_empty() {
                self.step();
            } else if let Some((batch, reply)) = self.poc.pop_front() {
                self.load.poc_waiting.fetch_sub(1, Ordering::Relaxed);
                if !reply.is_closed() {
                    let _ = reply.send(self.run_poc(&batch));
                }
            }
            self.load.running.store(self.running.len(), Ordering::Relaxed);
        }
    }

    fn accept(&mut self, command: Command) {
        match command {
            Command::Generate { request, events } => {
                let sampler = Sampler::new(&request.params);
                let stream = TextStream::new(request.params.skip_special_tokens);
                // `generate` bounded max_tokens by the room the context leaves.
                let tokens = (request.prompt.len() + request.params.max_tokens) as i64;
                let replayed = request.params.enforced.len().min(request.params.max_tokens);
                let feed = [&request.prompt[..], &request.params.enforced[..replayed.saturating_sub(1)]].concat();
                let mut stops = request.params.stop_token_ids.clone();
                if !request.params.ignore_eos {
                    stops.extend_from_slice(&self.tokenizer.eos_token_ids);
                }
                self.waiting.push_back(Sequence {
                    cache: self.model.new_cache(tokens),
                    reserved: self.model.spec.kv_bytes_for(tokens as u64),
                    prompt: request.prompt,
                    feed,
                    prefilled: 0,
                    last: None,
                    completion_tokens: 0,
                    params: request.params,
                    stops,
                    sampler,
                    stream,
                    text: String::new(),
                    sent: 0,
                    events,
                    input: None,
                });
            }
            Command::Poc { batch, reply } => self.poc.push_back((batch, reply)),
        }
    }

    /// Moves waiting sequences into the running set, first come first served, while there is
    /// a slot and KV-cache budget for the next; drops abandoned ones.
    fn admit(&mut self) {
        self.running.retain(|s| !s.events.is_closed());
        let mut reserved: u64 = self.running.iter().map(|s| s.reserved).sum();
        while self.running.len() < self.options.max_sequences {
            let Some(next) = self.waiting.front() else { break };
            let abandoned = next.events.is_closed();
            if !abandoned && self.options.kv_cache_bytes.is_some_and(|budget| reserved + next.reserved > budget) {
                break;
            }
            let sequence = self.waiting.pop_front().expect("looked at above");
            self.load.waiting.fetch_sub(1, Ordering::Relaxed);
            if !abandoned {
                reserved += sequence.reserved;
                self.running.push(sequence);
            }
        }
        self.load.kv_reserved.store(reserved, Ordering::Relaxed);
    }

    fn step(&mut self) {
        // Decoding sequences first (one token each), then prefill chunks in the budget left.
        let mut budget = self.options.max_step_tokens.max(1);
        for s in self.running.iter_mut().filter(|s| s.prefilled == s.feed.len()) {
            s.input = Some(vec![s.last.expect("a prefilled sequence has sampled")]);
            budget = budget.saturating_sub(1);
        }
        for s in self.running.iter_mut().filter(|s| s.prefilled < s.feed.len()) {
            if budget == 0 {
                break;
            }
            // A replay's rows each make a row of logits: at most max_replay_rows a step.
            let sampled_from = (s.prompt.len() - 1).max(s.prefilled);
            let rows_cap = sampled_from + self.options.max_replay_rows.max(1) - s.prefilled;
            let chunk = (s.feed.len() - s.prefilled).min(budget).min(rows_cap);
            s.input = Some(s.feed[s.prefilled..s.prefilled + chunk].to_vec());
            budget -= chunk;
        }
        let model = &self.model;
        // The rows that give a token, in step order: (sequence, its step entry, row of the
        // step's tokens).
        let mut samples: Vec<(usize, i64, i64)> = Vec::new();
        let mut steps = Vec::new();
        let mut row = 0i64;
        for (i, s) in self.running.iter_mut().enumerate() {
            let Sequence { input, cache, prefilled, feed, prompt, .. } = s;
            if let Some(tokens) = input.take() {
                let len = tokens.len() as i64;
                if *prefilled < feed.len() {
                    // Positions from the prompt's last on give a token: a sequence samples once
                    // its whole prompt is in, a replay at each of its tokens.
                    let start = *prefilled as i64;
                    *prefilled += tokens.len();
                    let first = (prompt.len() as i64 - 1).max(start);
                    let entry = steps.len() as i64;
                    samples.extend((first..start + len).map(|p| (i, entry, row + p - start)));
                } else {
                    samples.push((i, steps.len() as i64, row));
                }
                row += len;
                steps.push(Step { input: StepInput::Tokens(tokens), cache: Some(cache) });
            }
        }
        // One row a sequence but for replays, which need every row of theirs.
        let last_rows = samples.windows(2).all(|w| w[0].0 != w[1].0);
        let rows: Vec<i64> = samples.iter().map(|&(_, _, row)| row).collect();
        let mut batch = steps;
        let forward = catch_unwind(AssertUnwindSafe(|| {
            let hidden = if last_rows {
                // `Output::Last` gives each entry's last row: those of the entries that sample.
                let sampled: Vec<i64> = samples.iter().map(|&(_, entry, _)| entry).collect();
                let hidden = model.forward(&mut batch, None, Output::Last);
                hidden.index_select(0, &Tensor::from_slice(&sampled).to_device(hidden.device()))
            } else {
                let hidden = model.forward(&mut batch, None, Output::All);
                hidden.index_select(0, &Tensor::from_slice(&rows).to_device(hidden.device()))
            };
            let logits = model.logits(&hidden).to_kind(Kind::Float).to_device(Device::Cpu);
            let width = logits.size()[1] as usize;
            let flat = Vec::<f32>::try_from(logits.flatten(0, -1)).expect("float logits");
            (flat, width)
        }));
        drop(batch);
        let (flat, width) = match forward {
            Ok(out) => out,
            Err(panic) => {
                let message = panic_message(panic);
                tracing::error!(%message, sequences = self.running.len(), "inference step failed");
                for s in self.running.drain(..) {
                    let _ = s.events.send(Event::Failed(message.clone()));
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (n, &(i, _, _)) in samples.iter().enumerate() {
            if finished.contains(&i) {
                // A replay that ended within its prefill: the rest of its rows are not its.
                continue;
            }
            let s = &mut self.running[i];
            let choice = s.sampler.choose(&flat[n * width..(n + 1) * width], s.completion_tokens, &s.stops);
            let token = choice.token;
            let _ = s.events.send(Event::Token(choice));
            s.last = Some(token);
            s.completion_tokens += 1;
            if let Some(reason) = self.after_token(i, token) {
                self.running[i].finish(reason);
                finished.push(i);
            }
        }
        for i in finished.into_iter().rev() {
            self.running.swap_remove(i);
        }
    }

    /// Takes sequence `i`'s new token into its text; the reason it ends, if it does.
    fn after_token(&mut self, i: usize, token: i64) -> Option<FinishReason> {
        let s = &mut self.running[i];
        // Before min_tokens nothing but the length ends it (a replay may enforce a stop id).
        let may_stop = s.completion_tokens >= s.params.min_tokens;
        if may_stop && s.stops.contains(&token) {
            s.flush(&self.tokenizer);
            return Some(FinishReason::Stop);
        }
        match s.stream.push(&self.tokenizer, token) {
            Ok(piece) => s.text.push_str(&piece),
            Err(e) => {
                let _ = s.events.send(Event::Failed(e.to_string()));
                return Some(FinishReason::Stop);
            }
        }
        // A stop string ends the text before it.
        let longest = s.params.stop.iter().map(String::len).max().unwrap_or(0);
        let mut from = s.sent.saturating_sub(longest);
        while !s.text.is_char_boundary(from) {
            from -= 1;
        }
        if let Some(at) = s
            .params
            .stop
            .iter()
            .filter(|_| may_stop)
            .filter_map(|stop| s.text[from..].find(stop.as_str()).map(|p| from + p))
            .min()
        {
            s.text.truncate(at);
            s.send_until(at);
            return Some(FinishReason::Stop);
        }
        let out_of_room = s.completion_tokens >= s.params.max_tokens
            || (s.prompt.len() + s.completion_tokens) as i64 >= self.max_model_len;
        if out_of_room {
            s.flush(&self.tokenizer);
            return Some(FinishReason::Length);
        }
        // Hold back a tail that could still grow into a stop string.
        let held = s
            .params
            .stop
            .iter()
            .flat_map(|stop| (1..stop.len()).filter(|&n| stop.is_char_boundary(n)).map(move |n| &stop[..n]))
            .filter(|prefix| s.text.ends_with(prefix))
            .map(str::len)
            .max()
            .unwrap_or(0);
        s.send_until(s.text.len() - held);
        None
    }

    fn run_poc(&mut self, batch: &PocBatch) -> Result<Vec<Artifact>, String> {
        if self.reflections.as_ref().is_none_or(|r| r.block_hash() != batch.block_hash) {
            self.reflections = Some(Reflections::new(&self.model, &batch.block_hash));
        }
        let reflections = self.reflections.as_ref().expect("made above");
        let round = Round {
            block_hash: &batch.block_hash,
            public_key: &batch.public_key,
            seq_len: batch.seq_len,
            k_dim: batch.k_dim,
            stronger_rng: batch.stronger_rng,
        };
        catch_unwind(AssertUnwindSafe(|| poc_v2::compute(&self.model, reflections, &round, &batch.nonces)))
            .map_err(panic_message)
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "the engine panicked".into())
}
