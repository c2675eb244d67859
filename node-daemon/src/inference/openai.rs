//! The inference port (upstream 5000): what vLLM serves there and the network node uses —
//! `/health` and `/v1/models` (its checks that an ML node really serves), OpenAI chat and text
//! completions, whole or streamed as server-sent events, and `/tokenize`. Errors carry vLLM's
//! body, `{"error": {"message", "type", "param", "code"}}`.
//!
//! Tokenising and rendering chat templates run on blocking threads, never on the runtime that
//! answers health checks; stop lists are bounded (they are scanned at every token); a
//! generation that produces nothing for [`IDLE_TIMEOUT`] is ended (and its sequence freed).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::{Stream, StreamExt};
use gonka_inference::engine::{Event, FinishReason, Generation};
use gonka_inference::sampling::{Choice, SamplingParams};
use gonka_inference::tokenizer::ChatTokenizer;
use gonka_protocol::openai::{
    ChatChoice, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatLogprobs, ChatMessage, ChunkChoice,
    Completion, CompletionChoice, CompletionRequest, Delta, DeltaFunctionCall, DeltaToolCall, ErrorInfo, ErrorResponse,
    FunctionCall, ModelCard, ModelList, Prompt, Sampling, TokenizeRequest, TokenizeResponse, ToolCall, Usage,
};
use serde_json::{Map, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::answer_parsers::{AnswerParsers, DeltaOut, StreamFailed, ToolChoice, ToolRequest};
use super::conversation;
use super::logprobs;
use super::manager::{InferenceManager, Served};

/// OpenAI's default `max_tokens` for text completions.
const COMPLETION_DEFAULT_MAX_TOKENS: u64 = 16;
/// Stop strings per request at most, and bytes per stop string (each is looked for at every
/// token); OpenAI takes 4.
pub const MAX_STOP_STRINGS: usize = 16;
pub const MAX_STOP_BYTES: usize = 256;
/// Stop token ids per request at most.
pub const MAX_STOP_TOKEN_IDS: usize = 1024;
/// A generation silent this long is ended (upstream's proxy's read timeout towards vLLM).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(900);

/// The native engine's routes; `max_body` is the port's body limit (the port's bounds read the
/// body first).
pub fn router(manager: Arc<InferenceManager>, max_body: usize) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .fallback(|| async { openai_error(StatusCode::NOT_FOUND, "Not Found") })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .with_state(manager)
}

/// A refusal in vLLM's shape; handlers return it with `?`.
#[derive(Debug)]
pub struct OpenAiError {
    status: StatusCode,
    message: String,
}

impl OpenAiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self { status, message: message.into() }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        openai_error(self.status, self.message)
    }
}

pub fn openai_error(status: StatusCode, message: impl Into<String>) -> Response {
    let kind = match status {
        StatusCode::BAD_REQUEST => "BadRequestError",
        StatusCode::NOT_FOUND => "NotFoundError",
        StatusCode::PAYLOAD_TOO_LARGE => "BadRequestError",
        StatusCode::REQUEST_TIMEOUT => "TimeoutError",
        StatusCode::TOO_MANY_REQUESTS => "RateLimitError",
        StatusCode::SERVICE_UNAVAILABLE => "service_unavailable",
        _ => "InternalServerError",
    };
    let body = ErrorResponse {
        error: ErrorInfo { message: message.into(), kind: kind.into(), param: None, code: status.as_u16() },
    };
    (status, Json(body)).into_response()
}

/// A JSON body, or vLLM's 400 naming what is wrong with it.
pub struct OpenAiJson<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for OpenAiJson<T> {
    type Rejection = OpenAiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, OpenAiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| OpenAiError::new(e.status(), e.body_text()))?;
        serde_json::from_slice(&bytes)
            .map(OpenAiJson)
            .map_err(|e| OpenAiError::bad_request(format!("invalid request body: {e}")))
    }
}

fn unavailable() -> OpenAiError {
    OpenAiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "no model is being served: the network node brings one up with /api/v1/inference/up",
    )
}

/// The served model, if `requested` names it (or names nothing).
/// The served model for a chat or completion: refused while a PoC v2 round generates
/// ([`InferenceManager::poc_round_generating`]).
fn generating(manager: &InferenceManager, requested: Option<&str>) -> Result<Arc<Served>, OpenAiError> {
    if manager.poc_round_generating() {
        return Err(OpenAiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "a PoC round is generating on this ML node; inference resumes when it stops",
        ));
    }
    serving(manager, requested)
}

fn serving(manager: &InferenceManager, requested: Option<&str>) -> Result<Arc<Served>, OpenAiError> {
    let served = manager.served().ok_or_else(unavailable)?;
    match requested {
        Some(name) if name != served.name => {
            Err(OpenAiError::new(StatusCode::NOT_FOUND, format!("The model `{name}` does not exist.")))
        }
        _ => Ok(served),
    }
}

async fn health(State(manager): State<Arc<InferenceManager>>) -> Response {
    if manager.is_running() { StatusCode::OK.into_response() } else { unavailable().into_response() }
}

fn now() -> i64 {
    jiff::Timestamp::now().as_second()
}

async fn models(State(manager): State<Arc<InferenceManager>>) -> Result<Json<ModelList>, OpenAiError> {
    let served = manager.served().ok_or_else(unavailable)?;
    Ok(Json(ModelList {
        object: "list".into(),
        data: vec![ModelCard {
            id: served.name.clone(),
            object: "model".into(),
            created: now(),
            owned_by: "vllm".into(),
            root: served.directory.display().to_string(),
            max_model_len: served.engine.max_model_len(),
        }],
    }))
}

/// OpenAI's sampling fields over the model's own defaults (`generation_config.json`, as vLLM
/// applies them).
fn sampling(served: &Served, s: Sampling, max_tokens: Option<u64>) -> Result<SamplingParams, OpenAiError> {
    if s.n.is_some_and(|n| n != 1) {
        return Err(OpenAiError::bad_request("n must be 1: one choice per request is served"));
    }
    let temperature = s.temperature.or(served.defaults.temperature).unwrap_or(1.0);
    let top_p = s.top_p.or(served.defaults.top_p).unwrap_or(1.0);
    let valid = (0.0..=2.0).contains(&temperature) && top_p > 0.0 && top_p <= 1.0;
    if !valid {
        return Err(OpenAiError::bad_request("temperature must be in [0, 2] and top_p in (0, 1]"));
    }
    if max_tokens == Some(0) {
        return Err(OpenAiError::bad_request("max_tokens must be at least 1"));
    }
    let stop = s.stop.map(|s| s.into_vec()).unwrap_or_default();
    if stop.len() > MAX_STOP_STRINGS || stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(OpenAiError::bad_request(format!(
            "stop takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    let stop_token_ids = s.stop_token_ids.unwrap_or_default();
    if stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
        return Err(OpenAiError::bad_request(format!("stop_token_ids takes at most {MAX_STOP_TOKEN_IDS} ids")));
    }
    let logprobs_mode = s.logprobs_mode.as_deref().map(logprobs::mode).transpose().map_err(OpenAiError::bad_request)?;
    let max_tokens = max_tokens.map_or(usize::MAX, |m| m as usize);
    Ok(SamplingParams {
        temperature,
        top_p,
        seed: s.seed.map(|s| s as u64),
        max_tokens,
        // vLLM refuses min_tokens above max_tokens; the network node clamps it first.
        min_tokens: s.min_tokens.map_or(0, |m| m as usize).min(max_tokens),
        stop,
        stop_token_ids,
        ignore_eos: s.ignore_eos,
        skip_special_tokens: s.skip_special_tokens.unwrap_or(true),
        logprobs: None,
        logprobs_mode: logprobs_mode.unwrap_or_default(),
        enforced: Vec::new(),
    })
}

/// A chat request's prompt, as vLLM makes it: the messages and tools handed on
/// ([`conversation`]), the template's variables, and how the prompt ends.
struct ChatPrompt {
    messages: Vec<Value>,
    tools: Option<Value>,
    kwargs: Option<Map<String, Value>>,
    end: PromptEnd,
}

/// The request fields a chat prompt is made of (a chat completion's and `/tokenize`'s alike).
struct ChatFields {
    messages: Vec<Value>,
    tools: Option<Value>,
    kwargs: Option<Map<String, Value>>,
    add_generation_prompt: bool,
    continue_final_message: bool,
    chat_template: Option<String>,
}

impl ChatPrompt {
    /// The request's messages and tools as vLLM hands them to this model's template; a template
    /// of the request's own refused, as vLLM refuses it.
    fn read(served: &Served, fields: ChatFields) -> Result<Self, OpenAiError> {
        let kwargs = fields.kwargs;
        let template_given = kwargs.as_ref().and_then(|k| k.get("chat_template")).is_some_and(|t| !t.is_null());
        if fields.chat_template.is_some() || template_given {
            return Err(OpenAiError::bad_request(
                "Chat template is passed with request, but --trust-request-chat-template is not set. Refused \
                 request with untrusted chat template.",
            ));
        }
        let end = match (fields.add_generation_prompt, fields.continue_final_message) {
            (true, true) => {
                return Err(OpenAiError::bad_request(
                    "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                ));
            }
            (_, true) => PromptEnd::ContinueFinalMessage,
            (add_generation_prompt, false) => PromptEnd::Render { add_generation_prompt },
        };
        let reads = served.engine.tokenizer().template_reads();
        let messages = conversation::messages(fields.messages, reads).map_err(OpenAiError::bad_request)?;
        let tools = conversation::tools(fields.tools.as_ref()).map_err(OpenAiError::bad_request)?;
        Ok(Self { messages, tools, kwargs, end })
    }

    /// The prompt's token ids (CPU-bound: run off the runtime).
    fn token_ids(&self, tokenizer: &ChatTokenizer) -> Result<Vec<i64>, String> {
        let (messages, tools, kwargs) = (&self.messages, self.tools.as_ref(), self.kwargs.as_ref());
        let text = match self.end {
            PromptEnd::Render { add_generation_prompt } => {
                tokenizer.apply_chat_template_with(messages, add_generation_prompt, tools, kwargs)
            }
            PromptEnd::ContinueFinalMessage => tokenizer.continue_final_message(messages, tools, kwargs),
        };
        text.and_then(|text| tokenizer.encode(&text, false)).map_err(|e| e.to_string())
    }
}

/// How a chat prompt ends: opening the assistant's turn (or not), or carrying on the last
/// message (an assistant's prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromptEnd {
    Render { add_generation_prompt: bool },
    ContinueFinalMessage,
}

/// The efforts vLLM's chat request takes (`reasoning_effort`).
const REASONING_EFFORTS: [&str; 7] = ["none", "minimal", "low", "medium", "high", "xhigh", "max"];

/// The variables a chat's template sees, as vLLM (0.25.1, `build_chat_params`) makes them: the
/// request's `chat_template_kwargs`, with its `reasoning_effort` over theirs and, where the
/// kwargs do not name `enable_thinking`, thinking on for any effort but `none`. The answer
/// parsers read the same (GLM's reasoning parser takes thinking from them).
fn template_kwargs(
    kwargs: Option<Map<String, Value>>,
    reasoning_effort: Option<String>,
) -> Result<Option<Map<String, Value>>, OpenAiError> {
    let Some(effort) = reasoning_effort else { return Ok(kwargs) };
    if !REASONING_EFFORTS.contains(&effort.as_str()) {
        return Err(OpenAiError::bad_request(format!(
            "reasoning_effort must be one of {REASONING_EFFORTS:?}, not {effort:?}"
        )));
    }
    let mut kwargs = kwargs.unwrap_or_default();
    let thinking = effort != "none";
    kwargs.insert("reasoning_effort".into(), Value::String(effort));
    if !kwargs.contains_key("enable_thinking") {
        kwargs.insert("enable_thinking".into(), Value::Bool(thinking));
    }
    Ok(Some(kwargs))
}

fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Runs `work` (tokenising, rendering a chat template: CPU-bound, as long as the prompt) on a
/// blocking thread.
async fn off_the_runtime<T: Send + 'static>(
    served: &Arc<Served>,
    work: impl FnOnce(&Served) -> Result<T, String> + Send + 'static,
) -> Result<T, OpenAiError> {
    let served = served.clone();
    tokio::task::spawn_blocking(move || work(&served))
        .await
        .map_err(|e| OpenAiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("tokenizing failed: {e}")))?
        .map_err(OpenAiError::bad_request)
}

/// A generation's events, ended by a failure when the engine sends nothing for
/// [`IDLE_TIMEOUT`] (dropping the receiver then cancels the sequence).
type Events = std::pin::Pin<Box<dyn Stream<Item = Event> + Send>>;

fn start(served: &Served, prompt: Vec<i64>, params: SamplingParams) -> Result<Events, OpenAiError> {
    let receiver =
        served.engine.generate(Generation { prompt, params }).map_err(|e| OpenAiError::bad_request(e.to_string()))?;
    Ok(with_idle_timeout(receiver, IDLE_TIMEOUT))
}

fn with_idle_timeout(receiver: UnboundedReceiver<Event>, idle: Duration) -> Events {
    let events = tokio_stream::StreamExt::timeout(UnboundedReceiverStream::new(receiver), idle);
    Box::pin(events.scan(false, move |ended, event| {
        let next = match event {
            _ if *ended => None,
            Ok(event) => Some(event),
            Err(_) => {
                *ended = true;
                Some(Event::Failed(format!("the engine produced nothing for {} s", idle.as_secs())))
            }
        };
        futures::future::ready(next)
    }))
}

/// A whole generation: its text, the tokens it chose, how it ended, its usage.
struct Answer {
    text: String,
    tokens: Vec<Choice>,
    reason: FinishReason,
    usage: Usage,
}

/// Reads a generation to its end; `Err` for an engine failure.
async fn finish(mut events: Events) -> Result<Answer, String> {
    let (mut text, mut tokens) = (String::new(), Vec::new());
    while let Some(event) = events.next().await {
        match event {
            Event::Token(choice) => tokens.push(choice),
            Event::Text(piece) => text.push_str(&piece),
            Event::Finished { reason, prompt_tokens, completion_tokens } => {
                return Ok(Answer { text, tokens, reason, usage: Usage::new(prompt_tokens, completion_tokens) });
            }
            Event::Failed(e) => return Err(e),
        }
    }
    Err("the engine stopped".into())
}

/// Server-sent events of a generation: `first` if any, what `render` makes of each event (its
/// tokens, text and end: the last of them `[DONE]`), or an error event and `[DONE]` when the
/// engine fails. Nothing follows a `[DONE]` (the generation is dropped, which cancels it).
fn stream_events<R>(
    events: Events,
    first: Option<String>,
    mut render: R,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>>
where
    R: FnMut(Event) -> Vec<String> + Send + 'static,
{
    let body = events.flat_map(move |event| {
        let out: Vec<String> = match event {
            Event::Failed(message) => {
                let error = ErrorResponse {
                    error: ErrorInfo { message, kind: "InternalServerError".into(), param: None, code: 500 },
                };
                vec![serde_json::to_string(&error).expect("serialisable"), "[DONE]".into()]
            }
            event => render(event),
        };
        futures::stream::iter(out)
    });
    let head = futures::stream::iter(first);
    let until_done = head.chain(body).scan(false, |done, data: String| {
        let next = (!*done).then(|| {
            *done = data == "[DONE]";
            data
        });
        futures::future::ready(next)
    });
    Sse::new(until_done.map(|data| Ok(SseEvent::default().data(data))))
}

async fn chat(
    State(manager): State<Arc<InferenceManager>>,
    OpenAiJson(request): OpenAiJson<ChatCompletionRequest>,
) -> Result<Response, OpenAiError> {
    let served = generating(&manager, request.model.as_deref())?;
    let max_tokens = request.max_completion_tokens.or(request.max_tokens);
    let mode_named = request.sampling.logprobs_mode.is_some();
    let mut params = sampling(&served, request.sampling, max_tokens)?;
    let top = logprobs::top_count(request.logprobs, request.top_logprobs).map_err(OpenAiError::bad_request)?;
    params.logprobs = top;
    let kwargs = template_kwargs(request.chat_template_kwargs, request.reasoning_effort)?;
    let tool_request = ToolRequest::read(
        request.tools.as_ref(),
        request.tool_choice.as_ref(),
        request.parallel_tool_calls,
        kwargs.as_ref(),
    )
    .map_err(OpenAiError::bad_request)?;
    tools_servable(&served.parsers, &tool_request.choice)?;
    if served.parsers.keeps_special_tokens(&tool_request) {
        params.skip_special_tokens = false;
    }
    let chat_prompt = ChatPrompt::read(
        &served,
        ChatFields {
            messages: request.messages,
            tools: request.tools,
            kwargs,
            add_generation_prompt: request.add_generation_prompt,
            continue_final_message: request.continue_final_message,
            chat_template: request.chat_template,
        },
    )?;
    let (enforced_tokens, enforced_str) = (request.enforced_tokens, request.enforced_str);
    // A replay naming no logprobs mode reads the executor's from its top lists, as the fork does.
    if !mode_named && let Some(mode) = enforced_tokens.as_ref().and_then(logprobs::detected_mode) {
        params.logprobs_mode = mode;
    }
    let vocab_size = served.engine.spec().vocab_size;
    let (prompt, enforced) = off_the_runtime(&served, move |served| {
        let tokenizer = served.engine.tokenizer();
        let prompt = chat_prompt.token_ids(tokenizer)?;
        let enforced =
            logprobs::enforced_ids(enforced_tokens.as_ref(), enforced_str.as_deref(), tokenizer, vocab_size)?;
        Ok((prompt, enforced))
    })
    .await?;
    params.enforced = enforced.unwrap_or_default();
    let prompt_token_ids = request.return_token_ids.then(|| prompt.clone());
    let parsers = served.parsers;
    let mut stream_parser = parsers.stream(tool_request.clone(), &prompt);
    let events = start(&served, prompt, params)?;
    let (id, created, model) = (request_id("chatcmpl"), now(), served.name.clone());
    let return_token_ids = request.return_token_ids;
    // The logprobs of a run of tokens, when asked for.
    let logprobs_of = {
        let served = served.clone();
        move |tokens: &[Choice]| {
            let top = top?;
            let tokenizer = served.engine.tokenizer();
            Some(ChatLogprobs { content: tokens.iter().map(|c| logprobs::entry(c, top, tokenizer)).collect() })
        }
    };
    let ids_of = move |tokens: &[Choice]| return_token_ids.then(|| tokens.iter().map(|c| c.token).collect::<Vec<_>>());
    if request.stream {
        let chunk = {
            let (id, model) = (id.clone(), model.clone());
            move |delta: Delta, tokens: &[Choice], finish_reason: Option<&str>, usage: Option<Usage>| {
                let choices = if usage.is_none() {
                    vec![ChunkChoice {
                        index: 0,
                        delta,
                        logprobs: if tokens.is_empty() { None } else { logprobs_of(tokens) },
                        finish_reason: finish_reason.map(str::to_string),
                        token_ids: if tokens.is_empty() { None } else { ids_of(tokens) },
                    }]
                } else {
                    Vec::new()
                };
                ChatCompletionChunk {
                    id: id.clone(),
                    object: "chat.completion.chunk".into(),
                    created,
                    model: model.clone(),
                    choices,
                    usage,
                    prompt_token_ids: None,
                }
            }
        };
        let role = Delta { role: Some("assistant".into()), content: Some(Some(String::new())), ..Delta::default() };
        let mut first = chunk(role, &[], None, None);
        first.prompt_token_ids = prompt_token_ids;
        let first = serde_json::to_string(&first).expect("serialisable");
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        // Tokens wait for the text they make (a stop string may hold it back) and go out with it,
        // or with the finish. The answer parsers read each piece; where they hold one back
        // (a tool call being written), no event goes out for it unless token ids were asked
        // for, and its tokens' logprobs with it, as vLLM streams.
        let mut pending: Vec<Choice> = Vec::new();
        let render = move |event: Event| {
            let json = |c: &ChatCompletionChunk| serde_json::to_string(c).expect("serialisable");
            match event {
                Event::Token(choice) => {
                    pending.push(choice);
                    Vec::new()
                }
                Event::Text(text) => {
                    let tokens = std::mem::take(&mut pending);
                    let ids: Vec<i64> = tokens.iter().map(|c| c.token).collect();
                    match stream_parser.next(&text, &ids, false) {
                        Ok(Some(out)) => vec![json(&chunk(delta(out), &tokens, None, None))],
                        Ok(None) if return_token_ids => vec![json(&chunk(Delta::default(), &tokens, None, None))],
                        Ok(None) => Vec::new(),
                        Err(failed) => parser_failed(&failed),
                    }
                }
                Event::Finished { reason, prompt_tokens, completion_tokens } => {
                    let tokens = std::mem::take(&mut pending);
                    let ids: Vec<i64> = tokens.iter().map(|c| c.token).collect();
                    let last = match stream_parser.next("", &ids, true) {
                        Ok(out) => out.map(delta).unwrap_or_default(),
                        Err(failed) => return parser_failed(&failed),
                    };
                    let reason = stream_parser.finish_reason(reason.as_str());
                    let mut out = vec![json(&chunk(last, &tokens, Some(&reason), None))];
                    if include_usage {
                        let usage = Usage::new(prompt_tokens, completion_tokens);
                        out.push(json(&chunk(Delta::default(), &[], None, Some(usage))));
                    }
                    out.push("[DONE]".into());
                    out
                }
                Event::Failed(_) => Vec::new(),
            }
        };
        return Ok(stream_events(events, Some(first), render).into_response());
    }
    let answer = finish(events).await.map_err(|e| OpenAiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    let (message, finish_reason) = whole_message(&parsers, &answer, &tool_request);
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion".into(),
        created,
        model,
        choices: vec![ChatChoice {
            index: 0,
            message,
            logprobs: logprobs_of(&answer.tokens),
            finish_reason: Some(finish_reason),
            token_ids: ids_of(&answer.tokens),
        }],
        usage: answer.usage,
        prompt_token_ids,
    })
    .into_response())
}

/// Refuses a `tool_choice` this model's answers cannot meet, with vLLM's messages where vLLM
/// refuses it too: tools need `--enable-auto-tool-choice --tool-call-parser`, and "required"
/// and named choices constrain decoding to the tools' schemas, which the native engine does
/// not do.
fn tools_servable(parsers: &AnswerParsers, choice: &ToolChoice) -> Result<(), OpenAiError> {
    let named = |c: &ToolChoice| match c {
        ToolChoice::Named(name) => format!("{{\"type\": \"function\", \"function\": {{\"name\": \"{name}\"}}}}"),
        _ => "required".into(),
    };
    match choice {
        ToolChoice::None | ToolChoice::Null => Ok(()),
        ToolChoice::Auto if !parsers.auto_tools => Err(OpenAiError::bad_request(
            "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set",
        )),
        ToolChoice::Auto => Ok(()),
        _ if parsers.tool_calls.is_some_and(|p| p.parses_required_and_named()) => Ok(()),
        other if !parsers.auto_tools => Err(OpenAiError::bad_request(format!(
            "tool_choice=\"{}\" requires --tool-call-parser to be set",
            named(other)
        ))),
        other => Err(OpenAiError::bad_request(format!(
            "tool_choice \"{}\" needs decoding constrained to the tools' JSON schemas, which the native engine does \
             not do; serve the model with the vllm engine for it",
            named(other)
        ))),
    }
}

/// A whole answer's message and finish reason, through the model's answer parsers (the fork's
/// `chat_completion_full_generator`); each call gets vLLM's `chatcmpl-tool-` id.
fn whole_message(parsers: &AnswerParsers, answer: &Answer, request: &ToolRequest) -> (ChatMessage, String) {
    let message = parsers.message(&answer.text, request, answer.reason.as_str());
    let tool_calls = message
        .tool_calls
        .into_iter()
        .map(|c| ToolCall {
            id: format!("chatcmpl-tool-{}", uuid::Uuid::new_v4().simple()),
            kind: "function".into(),
            function: FunctionCall { name: c.name, arguments: c.arguments },
        })
        .collect();
    let chat =
        ChatMessage { role: "assistant".into(), content: message.content, reasoning: message.reasoning, tool_calls };
    (chat, message.finish_reason)
}

/// A streamed delta as the wire writes it.
fn delta(out: DeltaOut) -> Delta {
    let tool_calls = out.tool_calls.map(|calls| {
        calls
            .into_iter()
            .map(|c| DeltaToolCall {
                kind: c.id.is_some().then(|| "function".to_string()),
                id: c.id,
                index: c.index,
                function: DeltaFunctionCall { name: c.name, arguments: c.arguments },
            })
            .collect()
    });
    Delta { role: None, content: out.content, reasoning: out.reasoning, tool_calls }
}

/// Where the fork's stream fails (a parser's exception): vLLM's error event, then the end.
fn parser_failed(failed: &StreamFailed) -> Vec<String> {
    let error = ErrorResponse {
        error: ErrorInfo { message: failed.to_string(), kind: "InternalServerError".into(), param: None, code: 500 },
    };
    vec![serde_json::to_string(&error).expect("serialisable"), "[DONE]".into()]
}

async fn completions(
    State(manager): State<Arc<InferenceManager>>,
    OpenAiJson(request): OpenAiJson<CompletionRequest>,
) -> Result<Response, OpenAiError> {
    let served = generating(&manager, request.model.as_deref())?;
    if request.logprobs.is_some() {
        return Err(OpenAiError::bad_request(
            "logprobs are served on /v1/chat/completions only by the native engine, not on /v1/completions",
        ));
    }
    let max_tokens = Some(request.max_tokens.unwrap_or(COMPLETION_DEFAULT_MAX_TOKENS));
    let params = sampling(&served, request.sampling, max_tokens)?;
    let text = match request.prompt {
        Prompt::Text(text) => Ok(text),
        Prompt::Tokens(ids) => Err(ids),
        Prompt::Texts(mut texts) if texts.len() == 1 => Ok(texts.remove(0)),
        Prompt::TokenLists(mut lists) if lists.len() == 1 => Err(lists.remove(0)),
        _ => return Err(OpenAiError::bad_request("one prompt per request: lists of prompts are not served")),
    };
    let prompt = match text {
        Ok(text) => {
            off_the_runtime(&served, move |served| {
                served.engine.tokenizer().encode(&text, true).map_err(|e| e.to_string())
            })
            .await?
        }
        Err(ids) => ids,
    };
    let events = start(&served, prompt, params)?;
    let (id, created, model) = (request_id("cmpl"), now(), served.name.clone());
    let completion = move |text: String, finish_reason: Option<&str>, usage: Option<Usage>| Completion {
        id: id.clone(),
        object: "text_completion".into(),
        created,
        model: model.clone(),
        choices: vec![CompletionChoice {
            index: 0,
            text,
            logprobs: None,
            finish_reason: finish_reason.map(str::to_string),
        }],
        usage,
    };
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        let render = move |event: Event| {
            let json = |c: &Completion| serde_json::to_string(c).expect("serialisable");
            match event {
                Event::Text(text) => vec![json(&completion(text, None, None))],
                Event::Finished { reason, prompt_tokens, completion_tokens } => {
                    let mut out = vec![json(&completion(String::new(), Some(reason.as_str()), None))];
                    if include_usage {
                        let mut usage =
                            completion(String::new(), None, Some(Usage::new(prompt_tokens, completion_tokens)));
                        usage.choices.clear();
                        out.push(json(&usage));
                    }
                    out.push("[DONE]".into());
                    out
                }
                Event::Token(_) | Event::Failed(_) => Vec::new(),
            }
        };
        return Ok(stream_events(events, None, render).into_response());
    }
    let answer = finish(events).await.map_err(|e| OpenAiError::new(StatusCode::INTERNAL_SERVER_ERROR, e))?;
    Ok(Json(completion(answer.text, Some(answer.reason.as_str()), Some(answer.usage))).into_response())
}

async fn tokenize(
    State(manager): State<Arc<InferenceManager>>,
    OpenAiJson(request): OpenAiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, OpenAiError> {
    let served = serving(&manager, request.model.as_deref())?;
    let add_special_tokens = request.add_special_tokens;
    let tokens = match (request.prompt, request.messages) {
        (Some(prompt), None) => {
            off_the_runtime(&served, move |served| {
                served.engine.tokenizer().encode(&prompt, add_special_tokens).map_err(|e| e.to_string())
            })
            .await?
        }
        (None, Some(messages)) => {
            let chat_prompt = ChatPrompt::read(
                &served,
                ChatFields {
                    messages,
                    tools: request.tools,
                    kwargs: request.chat_template_kwargs,
                    add_generation_prompt: request.add_generation_prompt,
                    continue_final_message: request.continue_final_message,
                    chat_template: request.chat_template,
                },
            )?;
            off_the_runtime(&served, move |served| chat_prompt.token_ids(served.engine.tokenizer())).await?
        }
        _ => return Err(OpenAiError::bad_request("give either prompt or messages")),
    };
    Ok(Json(TokenizeResponse { count: tokens.len(), max_model_len: served.engine.max_model_len(), tokens }))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A chat's `reasoning_effort` over its kwargs, as vLLM 0.25.1's `build_chat_params`
    /// merges them.
    #[test]
    fn reasoning_effort_joins_the_template_kwargs() {
        let merged = |kwargs: Value, effort: Option<&str>| {
            template_kwargs(kwargs.as_object().cloned(), effort.map(str::to_string)).map(|k| k.map(Value::Object))
        };
        assert_eq!(merged(json!({"a": 1}), None).unwrap(), Some(json!({"a": 1})), "no effort: as given");
        assert_eq!(merged(Value::Null, None).unwrap(), None);
        assert_eq!(
            merged(Value::Null, Some("low")).unwrap(),
            Some(json!({"reasoning_effort": "low", "enable_thinking": true}))
        );
        assert_eq!(
            merged(json!({"reasoning_effort": "max"}), Some("none")).unwrap(),
            Some(json!({"reasoning_effort": "none", "enable_thinking": false})),
            "the request's field wins over the kwargs'"
        );
        assert_eq!(
            merged(json!({"enable_thinking": false}), Some("high")).unwrap(),
            Some(json!({"enable_thinking": false, "reasoning_effort": "high"})),
            "the kwargs' enable_thinking stays"
        );
        let refused = merged(Value::Null, Some("extreme")).unwrap_err();
        assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_generation_ends_with_a_failure_and_nothing_after() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut events = with_idle_timeout(rx, Duration::from_secs(5));
        tx.send(Event::Text("a".into())).unwrap();
        assert_eq!(events.next().await, Some(Event::Text("a".into())));
        let started = tokio::time::Instant::now();
        assert_eq!(events.next().await, Some(Event::Failed("the engine produced nothing for 5 s".into())));
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        // Ended: a late event is not read (the receiver goes, which cancels the sequence).
        let _ = tx.send(Event::Text("late".into()));
        assert_eq!(events.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_generation_that_keeps_producing_is_never_cut() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut events = with_idle_timeout(rx, Duration::from_secs(5));
        for i in 0..10 {
            tokio::time::advance(Duration::from_secs(4)).await;
            tx.send(Event::Text(i.to_string())).unwrap();
            assert_eq!(events.next().await, Some(Event::Text(i.to_string())));
        }
        drop(tx);
        assert_eq!(events.next().await, None);
    }
}
