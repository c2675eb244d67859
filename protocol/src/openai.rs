//! The inference port's OpenAI-compatible API, in the shapes vLLM serves (the network node
//! proxies users' requests there and reads `/v1/models`): chat and text completions (whole or
//! as server-sent events), the model list, tokenisation, and vLLM's error body.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stop`: one string or several.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields chat and text completions share (OpenAI's, and vLLM's extras
/// `stop_token_ids`, `ignore_eos`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct Sampling {
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub stop: Option<Stop>,
    #[serde(default)]
    pub stop_token_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Choices per request; only 1 is served.
    #[serde(default)]
    pub n: Option<u32>,
    /// vLLM's: tokens generated before end-of-sequence, stop token ids or stop strings may end
    /// the answer (the network node asks for some).
    #[serde(default)]
    pub min_tokens: Option<u64>,
    /// vLLM's: whether special tokens' text is left out (default true; the network node
    /// sends false).
    #[serde(default)]
    pub skip_special_tokens: Option<bool>,
    /// gonka's vLLM fork: which distribution logprobs are read from, `raw_logprobs` (default)
    /// or `processed_logprobs` (the network node sets it from the chain's parameters).
    #[serde(default)]
    pub logprobs_mode: Option<String>,
}

/// `POST /v1/chat/completions`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<Value>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    /// OpenAI's newer name for `max_tokens`; wins when both are given.
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub tools: Option<Value>,
    /// `"none"`, `"auto"`, `"required"` or `{"type": "function", "function": {"name": …}}`;
    /// `None` when left out, `Some(Value::Null)` for an explicit `null` (vLLM tells them apart).
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<Value>,
    /// Whether an answer may call several tools at once (default true; false keeps the first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    /// vLLM's: the prompt carries on the last message (an assistant's prefix) instead of opening
    /// a turn; needs `add_generation_prompt` false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_final_message: bool,
    /// vLLM's: a template of the request's own, refused (vLLM's `--trust-request-chat-template`
    /// is off): a validator would render the prompt with the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// vLLM's: variables for the chat template (Qwen3's `enable_thinking`), or DeepSeek-V4's
    /// encoding settings (`thinking`, `reasoning_effort`, `drop_thinking`).
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
    /// OpenAI's (`none`, `minimal`, `low`, `medium`, `high`, `xhigh`; vLLM adds `max`): how much
    /// a reasoning model reasons. vLLM hands it to the chat template (and DeepSeek-V4's
    /// encoding) as `reasoning_effort`, and as `enable_thinking` unless the kwargs name it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    /// Whether each generated token's logprob is returned (OpenAI's).
    #[serde(default)]
    pub logprobs: bool,
    /// How many of the most likely tokens' logprobs each position also returns (0–20; needs
    /// `logprobs`).
    #[serde(default)]
    pub top_logprobs: Option<i64>,
    /// vLLM's: the prompt's and the answer's token ids in the response.
    #[serde(default)]
    pub return_token_ids: bool,
    /// gonka's vLLM fork: a validator's replay of an executor's answer, the tokens it reported
    /// (token ids as decimal strings), forced in turn while the logprobs are the model's.
    #[serde(default)]
    pub enforced_tokens: Option<EnforcedTokens>,
    /// gonka's vLLM fork: the same, as text to tokenise.
    #[serde(default)]
    pub enforced_str: Option<String>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// gonka's `enforced_tokens`: each position's token and the top tokens the executor reported
/// (`EnforcedTokens.from_content` of its logprobs), ids as decimal strings.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EnforcedTokens {
    pub tokens: Vec<EnforcedToken>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct EnforcedToken {
    pub token: String,
    #[serde(default)]
    pub top_tokens: Vec<String>,
}

fn yes() -> bool {
    true
}

/// A field that is present, `null` included (left out, `#[serde(default)]` makes it `None`).
fn present<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(deserializer).map(Some)
}

/// `prompt` of a text completion: text or token ids (one prompt; lists of prompts are refused).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(untagged)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
    Texts(Vec<String>),
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/completions`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    pub prompt: Prompt,
    /// OpenAI's default for completions is 16.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// OpenAI's top logprobs count for text completions; refused by the native engine, which
    /// returns logprobs on chat completions only.
    #[serde(default)]
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens }
    }
}

/// A whole answer's message, as vLLM writes it: the content (`null` when the answer is only
/// tool calls), the reasoning a reasoning parser read out (`null` otherwise), the tool calls.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(default)]
    pub reasoning: Option<String>,
    #[serde(default)]
    pub tool_calls: Vec<ToolCall>,
}

/// A tool call in a whole answer.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub function: FunctionCall,
}

/// The function a tool call calls, and its arguments as a JSON object's text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A tool call's piece in a streamed delta: where a call starts, its id, type and name; then
/// (or with them, as MiniMax-M2's parser sends each call whole) its arguments' text.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub index: usize,
    pub function: DeltaFunctionCall,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct DeltaFunctionCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub arguments: String,
}

/// A chat answer's logprobs (vLLM's `ChatCompletionLogProbs`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct ChatLogprobs {
    pub content: Vec<TokenLogprob>,
}

/// One generated token's logprob and the most likely tokens' at its position. As gonka's vLLM
/// fork writes them: `token` is the token id in decimal, `bytes` the UTF-8 of the token's text
/// (of the id's decimal in `top_logprobs`), and minus infinity is written -9999.0.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
    pub top_logprobs: Vec<TopLogprob>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatMessage,
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    /// The answer's token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<i64>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
    /// The prompt's token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<i64>>,
}

/// A streamed answer's delta. Fields are left out unless set, as vLLM writes deltas:
/// `content` may be set to `null` (`Some(None)`, beside tool calls), `tool_calls` to a list.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Delta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<Option<String>>,
    /// What a reasoning parser read out of this delta.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reasoning: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<DeltaToolCall>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChunkChoice {
    pub index: u32,
    pub delta: Delta,
    /// The logprobs of the tokens this event's text comes from.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: Option<String>,
    /// This event's token ids (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<i64>>,
}

/// One server-sent event of a streamed chat completion.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ChatCompletionChunk {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<ChunkChoice>,
    /// Only on the last event, when `stream_options.include_usage`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The prompt's token ids, on the first event only (`return_token_ids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<i64>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct CompletionChoice {
    pub index: u32,
    pub text: String,
    pub logprobs: Option<Value>,
    pub finish_reason: Option<String>,
}

/// A text completion, whole or one streamed event (`usage` then only on the last, if asked).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Completion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<CompletionChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelCard {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub owned_by: String,
    pub root: String,
    pub max_model_len: i64,
}

/// `GET /v1/models` (the network node reads `data[].id`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ModelList {
    pub object: String,
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize`: a prompt, or messages rendered with the chat template.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    #[serde(default = "yes")]
    pub add_special_tokens: bool,
    #[serde(default = "yes")]
    pub add_generation_prompt: bool,
    /// With `messages`, as a chat request's.
    #[serde(default)]
    pub continue_final_message: bool,
    /// With `messages`, as a chat request's (refused).
    #[serde(default)]
    pub chat_template: Option<String>,
    /// With `messages`, as a chat request's.
    #[serde(default)]
    pub tools: Option<Value>,
    /// With `messages`, as a chat request's.
    #[serde(default)]
    pub chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct TokenizeResponse {
    pub count: usize,
    pub max_model_len: i64,
    pub tokens: Vec<i64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorInfo {
    pub message: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub param: Option<String>,
    pub code: u16,
}

/// vLLM's error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct ErrorResponse {
    pub error: ErrorInfo,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn requests_read_as_clients_send_them() {
        let chat: ChatCompletionRequest = serde_json::from_value(json!({"model": "Qwen/Qwen3-0.6B",
            "messages": [{"role": "user", "content": "Hi"}], "stream": true, "stop": "\n", "temperature": 0,
            "seed": 7, "stream_options": {"include_usage": true}, "logit_bias": {}}))
        .unwrap();
        assert_eq!(chat.sampling.stop.clone().unwrap().into_vec(), vec!["\n"]);
        assert_eq!(chat.sampling.temperature, Some(0.0));
        assert!(chat.add_generation_prompt && chat.stream);
        let completion: CompletionRequest =
            serde_json::from_value(json!({"prompt": [1, 2, 3], "max_tokens": 4})).unwrap();
        assert_eq!(completion.prompt, Prompt::Tokens(vec![1, 2, 3]));
        let completion: CompletionRequest =
            serde_json::from_value(json!({"prompt": "text", "stop": ["a", "b"]})).unwrap();
        assert_eq!(completion.prompt, Prompt::Text("text".into()));
        assert_eq!(completion.sampling.stop.unwrap().into_vec().len(), 2);
    }
}
