//! The answer parsers vLLM runs when a model is served with `--reasoning-parser` and
//! `--enable-auto-tool-choice --tool-call-parser` (governance's arguments for the network's
//! models): reasoning and tool calls read out of the model's text, whole or as it streams, so
//! that the native engine answers as gonka's vLLM fork does. Pure: no engine, no I/O.
//!
//! Natively parsed: MiniMax-M2's (`minimax_m2`, `minimax_m2_append_think`, in [`minimax_m2`])
//! and GLM's (`glm47`, `glm45`, in [`glm`]). How they join is the fork's `DelegatingParser`
//! (`vllm/parser/abstract_parser.py`): the reasoning parser reads the text first, and once the
//! reasoning has ended the tool-call parser reads what follows.
//! `node-daemon/tests/reference/answer_parsers.py` records the fork's own code on a set of
//! answers for each (`minimax_m2_parsers.json`, `glm_parsers.json`), which the tests here
//! replay.

pub mod glm;
pub mod minimax_m2;
pub mod python_json;
pub mod python_literal;

use serde_json::Value;

/// The parsers' names parsed here (vLLM's registry names).
pub const NATIVE_TOOL_CALL_PARSERS: [&str; 2] = ["minimax_m2", "glm47"];
pub const NATIVE_REASONING_PARSERS: [&str; 2] = ["minimax_m2_append_think", "glm45"];

/// Whether the native engine parses answers as these flags ask.
pub fn parsed_natively(tool_call_parser: Option<&str>, reasoning_parser: Option<&str>) -> bool {
    tool_call_parser.is_none_or(|p| NATIVE_TOOL_CALL_PARSERS.contains(&p))
        && reasoning_parser.is_none_or(|p| p.is_empty() || NATIVE_REASONING_PARSERS.contains(&p))
}

/// The thinking's markers, which both families' reasoning parsers read.
pub const THINK_START: &str = "<think>";
pub const THINK_END: &str = "</think>";

/// The ids of `<think>` and `</think>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThinkTokens {
    pub start: i64,
    pub end: i64,
}

impl ThinkTokens {
    /// Whether the thinking is over in `ids`: the last of `<think>` and `</think>` in them is
    /// `</think>` (the fork's `is_reasoning_end`).
    pub fn reasoning_ended(&self, ids: &[i64]) -> bool {
        ids.iter().rev().find(|&&id| id == self.start || id == self.end) == Some(&self.end)
    }
}

/// Parser flags the fork would refuse to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerParsersError {
    #[error("{parser} needs the token {token} in the tokenizer's vocabulary")]
    MissingToken { parser: &'static str, token: &'static str },
    #[error("--enable-auto-tool-choice requires --tool-call-parser")]
    AutoToolsWithoutParser,
}

/// The reasoning parsers parsed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasoningParser {
    /// `minimax_m2_append_think`.
    MinimaxM2AppendThink(ThinkTokens),
    /// `glm45` (`DeepSeekV3ReasoningWithThinkingParser`): R1's thinking when the request
    /// thinks, else none.
    Glm45(ThinkTokens),
}

/// The tool-call parsers parsed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallParser {
    /// `minimax_m2`.
    MinimaxM2(minimax_m2::ToolCallTokens),
    /// `glm47`.
    Glm47,
}

impl ToolCallParser {
    /// Whether "required" and named choices are served without constrained decoding: GLM's
    /// parser reads its XML calls for them as for "auto" (`supports_required_and_named`
    /// false), where MiniMax-M2's has vLLM constrain the output to JSON.
    pub fn parses_required_and_named(&self) -> bool {
        matches!(self, ToolCallParser::Glm47)
    }
}

/// The parsers a served model's answers go through (none: the text as it is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerParsers {
    pub reasoning: Option<ReasoningParser>,
    /// Only with `--enable-auto-tool-choice` (vLLM leaves the tool-call parser off without it).
    pub tool_calls: Option<ToolCallParser>,
    /// `--enable-auto-tool-choice`: requests may offer tools (with a tool-call parser the
    /// native engine lacks, its answers come back unparsed).
    pub auto_tools: bool,
}

/// A request's reasoning parser: GLM's thinks or not by the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reasoning {
    AppendThink(ThinkTokens),
    Thinking(ThinkTokens),
    /// `IdentityReasoningParser`: all content, the reasoning over from the start.
    Identity,
}

impl AnswerParsers {
    /// The parsers vLLM's flags name, and the flags naming parsers the native engine lacks
    /// (`"--tool-call-parser hermes"`: served, their answers left as the model writes them, so
    /// that the model still earns where its answers' shape is not the network's); `vocab` gives
    /// a token's id.
    pub fn from_flags(
        tool_call_parser: Option<&str>,
        reasoning_parser: Option<&str>,
        auto_tools: bool,
        vocab: impl Fn(&str) -> Option<i64>,
    ) -> Result<(Self, Vec<String>), AnswerParsersError> {
        let mut not_native = Vec::new();
        let token = |parser: &'static str, token: &'static str| {
            vocab(token).ok_or(AnswerParsersError::MissingToken { parser, token })
        };
        let reasoning = match reasoning_parser {
            None | Some("") => None,
            Some("minimax_m2_append_think") => {
                let parser = "minimax_m2_append_think";
                Some(ReasoningParser::MinimaxM2AppendThink(ThinkTokens {
                    start: token(parser, THINK_START)?,
                    end: token(parser, THINK_END)?,
                }))
            }
            Some("glm45") => Some(ReasoningParser::Glm45(ThinkTokens {
                start: token("glm45", THINK_START)?,
                end: token("glm45", THINK_END)?,
            })),
            Some(other) => {
                not_native.push(format!("--reasoning-parser {other}"));
                None
            }
        };
        let tool_calls = match (auto_tools, tool_call_parser) {
            (true, None) => return Err(AnswerParsersError::AutoToolsWithoutParser),
            (false, _) => None,
            (true, Some("minimax_m2")) => Some(ToolCallParser::MinimaxM2(minimax_m2::ToolCallTokens {
                start: token("minimax_m2", minimax_m2::TOOL_CALL_START)?,
                end: token("minimax_m2", minimax_m2::TOOL_CALL_END)?,
            })),
            // GLM's parser looks its markers up but reads the text alone.
            (true, Some("glm47")) => Some(ToolCallParser::Glm47),
            (true, Some(other)) => {
                not_native.push(format!("--tool-call-parser {other}"));
                None
            }
        };
        Ok((Self { reasoning, tool_calls, auto_tools }, not_native))
    }

    /// Whether a request's answer keeps special tokens' text whatever it asks
    /// (`skip_special_tokens` false): GLM's parser sets it for requests with tools whose
    /// choice is not "none" (its `adjust_request`), so that markers a tokenizer counts as
    /// special still reach it.
    pub fn keeps_special_tokens(&self, request: &ToolRequest) -> bool {
        self.tool_calls == Some(ToolCallParser::Glm47)
            && !request.tools.is_empty()
            && request.choice != ToolChoice::None
    }

    fn reasoning_for(&self, request: &ToolRequest) -> Option<Reasoning> {
        Some(match self.reasoning? {
            ReasoningParser::MinimaxM2AppendThink(think) => Reasoning::AppendThink(think),
            ReasoningParser::Glm45(think) if request.thinking => Reasoning::Thinking(think),
            ReasoningParser::Glm45(_) => Reasoning::Identity,
        })
    }

    /// A whole answer's reasoning, content and tool calls (`Parser.parse`); `tool_calls` is
    /// `None` when the tool-call parser did not run or found none.
    pub fn whole(&self, text: &str, request: &ToolRequest) -> ParsedAnswer {
        let (reasoning, mut content) = match self.reasoning_for(request) {
            None | Some(Reasoning::Identity) => (None, Some(text.to_string())),
            Some(Reasoning::AppendThink(_)) => (None, Some(minimax_m2::append_think(text))),
            Some(Reasoning::Thinking(_)) => glm::reasoning_whole(text),
        };
        // `_extract_tool_calls`: auto (or a null choice) runs the tool-call parser, and for a
        // parser that reads them unconstrained, "required" and named choices too; "none" not.
        let runs = match (&self.tool_calls, &request.choice) {
            (None, _) | (_, ToolChoice::None) => false,
            (_, ToolChoice::Auto | ToolChoice::Null) => true,
            (Some(parser), ToolChoice::Required | ToolChoice::Named(_)) => parser.parses_required_and_named(),
        };
        let text = content.as_deref().unwrap_or("");
        let found = match self.tool_calls {
            Some(ToolCallParser::MinimaxM2(_)) if runs => minimax_m2::tool_calls(text, &request.tools),
            Some(ToolCallParser::Glm47) if runs => glm::tool_calls(text, &request.tools),
            _ => None,
        };
        let mut tool_calls = None;
        if let Some((calls, rest)) = found {
            content = rest.filter(|c| !python_json::python_strip(c).is_empty());
            tool_calls = Some(calls);
        }
        ParsedAnswer { reasoning, content, tool_calls }
    }

    /// The parser for one streamed answer; `prompt` tells whether its reasoning is over before
    /// it starts.
    pub fn stream(&self, request: ToolRequest, prompt: &[i64]) -> StreamParser {
        let reasoning = self.reasoning_for(&request);
        let reasoning_ended = match reasoning {
            None | Some(Reasoning::Identity) => true,
            Some(Reasoning::AppendThink(think)) => think.reasoning_ended(prompt),
            Some(Reasoning::Thinking(think)) => think.reasoning_ended(prompt),
        };
        StreamParser {
            tool_calls: self.tool_calls,
            reasoning,
            request,
            reasoning_ended,
            tool_text_started: false,
            previous_text: String::new(),
            previous_ids: Vec::new(),
            minimax: minimax_m2::ToolCallStream::default(),
            glm: glm::ToolCallStream::default(),
            tools_streamed: false,
        }
    }
}

/// `tool_choice`, as the fork reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolChoice {
    /// `"none"`, or left out with no tools.
    None,
    /// `"auto"`, or left out with tools.
    Auto,
    /// An explicit `null`: its tool calls are parsed, but a whole answer's message leaves them
    /// out (the fork's serving layer reads null as "none" there).
    Null,
    Required,
    Named(String),
}

/// What of a chat request the parsers read: its tools and how they may be called, and whether
/// it thinks (GLM's reasoning parser asks its `chat_template_kwargs`).
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false keeps the first call only.
    pub parallel: bool,
    pub thinking: bool,
}

impl Default for ToolRequest {
    fn default() -> Self {
        Self { tools: Vec::new(), choice: ToolChoice::None, parallel: true, thinking: true }
    }
}

impl ToolRequest {
    /// `tools` and `tool_choice` (`None`: left out) checked as the fork's `check_tool_usage`
    /// checks them, with its messages; `kwargs`, the request's `chat_template_kwargs`.
    pub fn read(
        tools: Option<&Value>,
        choice: Option<&Value>,
        parallel: Option<bool>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<Self, String> {
        let tools = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(list)) if list.is_empty() => {
                return Err("`tools` must not be an empty array. Either provide at least one tool or omit the field \
                            entirely."
                    .into());
            }
            Some(Value::Array(list)) => {
                if !list.iter().all(|t| t["function"]["name"].is_string()) {
                    return Err("each of `tools` must be {\"type\": \"function\", \"function\": {\"name\": …}}".into());
                }
                list.clone()
            }
            Some(_) => return Err("`tools` must be a list of tools".into()),
        };
        let usage = r#"Correct usage: `{"type": "function", "function": {"name": "my_function"}}`"#;
        let choice = match choice {
            None if tools.is_empty() => ToolChoice::None,
            None => ToolChoice::Auto,
            Some(Value::Null) => ToolChoice::Null,
            Some(Value::String(s)) if s == "none" => ToolChoice::None,
            Some(_) if tools.is_empty() => return Err("When using `tool_choice`, `tools` must be set.".into()),
            Some(Value::String(s)) if s == "auto" => ToolChoice::Auto,
            Some(Value::String(s)) if s == "required" => ToolChoice::Required,
            Some(Value::Object(named)) => {
                let Some(function) = named.get("function").filter(|f| f.is_object()) else {
                    let function = named.get("function").map_or("None".to_string(), Value::to_string);
                    return Err(format!("Invalid value for `function`: `{function}` in `tool_choice`! {usage}"));
                };
                let Some(name) = function.get("name") else {
                    return Err(format!("Expected field `name` in `function` in `tool_choice`! {usage}"));
                };
                let Some(name) = name.as_str().filter(|n| !n.is_empty()) else {
                    return Err(format!("Invalid `name` in `function`: `{name}` in `tool_choice`! {usage}"));
                };
                if !tools.iter().any(|t| t["function"]["name"] == name) {
                    return Err(
                        "The tool specified in `tool_choice` does not match any of the specified `tools`".into()
                    );
                }
                ToolChoice::Named(name.to_string())
            }
            Some(other) => {
                let shown = other.as_str().map_or_else(|| other.to_string(), str::to_string);
                return Err(format!(
                    "Invalid value for `tool_choice`: {shown}! Only named tools, \"none\", \"auto\" or \"required\" are \
                     supported."
                ));
            }
        };
        Ok(Self { tools, choice, parallel: parallel.unwrap_or(true), thinking: glm::thinks(kwargs) })
    }
}

/// A call: the function's name and its arguments as a JSON object's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionCall {
    pub name: String,
    pub arguments: String,
}

/// A whole answer, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedAnswer {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Option<Vec<FunctionCall>>,
}

/// A whole answer's message as the fork's serving layer makes it
/// (`chat_completion_full_generator`), ids aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub tool_calls: Vec<FunctionCall>,
    pub finish_reason: String,
}

impl AnswerParsers {
    /// A whole answer's message and finish reason (`engine`: how the generation ended): an
    /// "auto" choice gets the calls and `tool_calls`; "required" and named ones (GLM's) the
    /// calls and no content, `tool_calls` for "required" that stopped, the engine's reason
    /// for a named one; "none" and null the content alone.
    pub fn message(&self, text: &str, request: &ToolRequest, engine: &str) -> Message {
        let parsed = self.whole(text, request);
        let calls = |calls: Option<Vec<FunctionCall>>| {
            let mut calls = calls.unwrap_or_default();
            if !request.parallel {
                calls.truncate(1);
            }
            calls
        };
        let (content, tool_calls, finish_reason) = match request.choice {
            ToolChoice::Named(_) => (Some(String::new()), calls(parsed.tool_calls), engine.to_string()),
            ToolChoice::Required => {
                let finish = if engine == "stop" { "tool_calls" } else { engine };
                (Some(String::new()), calls(parsed.tool_calls), finish.to_string())
            }
            ToolChoice::Auto if parsed.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                (parsed.content, calls(parsed.tool_calls), "tool_calls".to_string())
            }
            _ => (parsed.content, Vec::new(), engine.to_string()),
        };
        Message { reasoning: parsed.reasoning, content, tool_calls, finish_reason }
    }
}

/// A call's piece in a streamed delta: its place among the answer's calls; its id and name
/// where the call starts (MiniMax-M2's come whole, GLM's name first and then the arguments'
/// text in pieces).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamedCall {
    pub index: usize,
    pub id: Option<String>,
    pub name: Option<String>,
    pub arguments: String,
}

/// What one streamed delta says. `content`: left out, `null` (`Some(None)`) or text;
/// `reasoning`: left out or text; `tool_calls`: left out or a list (possibly empty), as the
/// fork sets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaOut {
    pub content: Option<Option<String>>,
    pub reasoning: Option<String>,
    pub tool_calls: Option<Vec<StreamedCall>>,
}

impl DeltaOut {
    pub fn content(text: &str) -> Self {
        Self { content: Some(Some(text.to_string())), ..Self::default() }
    }
}

/// The stream's end where the fork's parser raised: vLLM sends an error event and ends it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the {parser} tool-call parser failed: {reason}")]
pub struct StreamFailed {
    pub parser: &'static str,
    pub reason: &'static str,
}

/// One streamed answer's parser (`Parser.parse_delta` and its `StreamState`).
#[derive(Clone, Debug)]
pub struct StreamParser {
    tool_calls: Option<ToolCallParser>,
    reasoning: Option<Reasoning>,
    request: ToolRequest,
    reasoning_ended: bool,
    tool_text_started: bool,
    previous_text: String,
    previous_ids: Vec<i64>,
    minimax: minimax_m2::ToolCallStream,
    glm: glm::ToolCallStream,
    /// Whether a call has gone out (the finish reason is then `tool_calls`, named choices
    /// aside).
    tools_streamed: bool,
}

impl StreamParser {
    /// The stream's finish reason (`engine`: how the generation ended).
    pub fn finish_reason(&self, engine: &str) -> String {
        let named = matches!(self.request.choice, ToolChoice::Named(_));
        if self.tools_streamed && !named { "tool_calls".into() } else { engine.into() }
    }

    fn in_reasoning(&self) -> bool {
        self.reasoning.is_some() && !self.reasoning_ended
    }

    fn in_tool_calls(&self) -> bool {
        self.tool_calls.is_some() && self.reasoning_ended
    }

    /// The next delta of text and the tokens it came from (`last`: the answer's end); `None`:
    /// nothing to send for it.
    pub fn next(&mut self, delta_text: &str, delta_ids: &[i64], last: bool) -> Result<Option<DeltaOut>, StreamFailed> {
        let mut text = delta_text.to_string();
        let mut ids = delta_ids.to_vec();
        let mut current_text = format!("{}{text}", self.previous_text);
        let mut current_ids = [self.previous_ids.as_slice(), &ids].concat();
        let mut out = None;
        if self.in_reasoning() {
            let (delta, ended, content_ids) = match self.reasoning {
                Some(Reasoning::AppendThink(think)) => {
                    let prefix = if self.previous_ids.is_empty() { THINK_START } else { "" };
                    let delta = DeltaOut::content(&format!("{prefix}{text}"));
                    (Some(delta), think.reasoning_ended(&current_ids), ids.clone())
                }
                Some(Reasoning::Thinking(think)) => {
                    let delta = think.stream(&self.previous_ids, &ids, &text);
                    (delta, ids.contains(&think.end), think.content_ids(&ids))
                }
                Some(Reasoning::Identity) | None => unreachable!("the reasoning is over from the start"),
            };
            out = delta;
            if ended {
                // The tool-call parser starts from this delta's content.
                self.reasoning_ended = true;
                current_ids = content_ids;
                current_text = out.as_ref().and_then(|o| o.content.clone().flatten()).unwrap_or_default();
                text = current_text.clone();
                ids = current_ids.clone();
            }
        }
        if self.in_tool_calls() {
            if !self.tool_text_started {
                self.tool_text_started = true;
                self.previous_text.clear();
                self.previous_ids.clear();
                text = current_text.clone();
                ids = current_ids.clone();
            }
            // A delta that ends the reasoning may carry reasoning and calls at once.
            let reasoning = out.as_ref().and_then(|o| o.reasoning.clone()).filter(|r| !r.is_empty());
            out = match (self.request.choice.clone(), self.tool_calls) {
                (ToolChoice::None, _) => (!text.is_empty()).then(|| DeltaOut::content(&text)),
                (_, Some(ToolCallParser::MinimaxM2(tokens))) => {
                    self.minimax.next(tokens, &self.previous_text, &current_text, &text, &ids, &self.request.tools)
                }
                (_, Some(ToolCallParser::Glm47)) => self
                    .glm
                    .next(&current_text, &text, &self.request.tools)
                    .map_err(|glm::Raised(reason)| StreamFailed { parser: "glm47", reason })?,
                (_, None) => unreachable!("in_tool_calls needs a tool-call parser"),
            };
            if let Some(reasoning) = reasoning {
                out.get_or_insert_with(DeltaOut::default).reasoning = Some(reasoning);
            }
            if out.as_ref().is_some_and(|o| o.tool_calls.as_ref().is_some_and(|c| !c.is_empty())) {
                self.tools_streamed = true;
            }
        }
        if out.is_none() && !self.in_reasoning() && !self.in_tool_calls() {
            out = Some(DeltaOut::content(&text));
        }
        self.previous_text = current_text;
        self.previous_ids = current_ids;
        // Arguments parsed but not sent go out with the last delta (GLM's; MiniMax-M2 sends
        // each call whole).
        if last
            && let Some(ToolCallParser::Glm47) = self.tool_calls
            && let Some(call) = out.as_mut().and_then(|o| o.tool_calls.as_mut()).and_then(|c| c.last_mut())
        {
            call.arguments.push_str(&self.glm.unsent_arguments());
        }
        // `parallel_tool_calls` false: the first call's pieces only.
        if !self.request.parallel
            && let Some(calls) = out.as_mut().and_then(|o| o.tool_calls.as_mut())
        {
            calls.retain(|c| c.index == 0);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The fork's own parsers on each recorded case (`tests/reference/answer_parsers.py`): the
    /// whole answer's message and finish reason, each streamed delta (or none sent, or the
    /// stream's error) and the stream's finish reason.
    fn replay(recording: &str, tool_call_parser: &str, reasoning_parser: &str, at_least: usize) {
        let recorded: Value = serde_json::from_str(recording).unwrap();
        let vocab = recorded["vocab"].as_object().unwrap().clone();
        let (parsers, not_native) =
            AnswerParsers::from_flags(Some(tool_call_parser), Some(reasoning_parser), true, |t| {
                vocab.get(t).and_then(Value::as_i64)
            })
            .unwrap();
        assert!(not_native.is_empty());
        let cases = recorded["cases"].as_array().unwrap();
        assert!(cases.len() >= at_least, "the recording has every case");
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let request = ToolRequest::read(
                case.get("tools"),
                case.get("tool_choice"),
                case.get("parallel_tool_calls").and_then(Value::as_bool),
                case.get("chat_template_kwargs").and_then(Value::as_object),
            )
            .unwrap();
            let deltas: Vec<(Vec<i64>, String)> = case["deltas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| {
                    let ids = d[0].as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect();
                    (ids, d[1].as_str().unwrap().to_string())
                })
                .collect();
            let engine = case["engine_finish_reason"].as_str().unwrap();

            let text: String = deltas.iter().map(|(_, t)| t.as_str()).collect();
            let message = parsers.message(&text, &request, engine);
            let calls: Vec<Value> =
                message.tool_calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect();
            let shown = json!({"reasoning": message.reasoning, "content": message.content, "tool_calls": calls});
            assert_eq!(shown, case["whole"]["message"], "{name}: whole message");
            assert_eq!(message.finish_reason, case["whole"]["finish_reason"], "{name}: whole finish reason");

            let prompt: Vec<i64> = case
                .get("prompt_ids")
                .map(|p| p.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect())
                .unwrap_or_else(|| vec![vocab["<think>"].as_i64().unwrap(), 7]);
            let (streamed, finish) = stream(&parsers, &request, &prompt, &deltas, engine);
            assert_eq!(Value::Array(streamed), case["stream"]["deltas"], "{name}: streamed deltas");
            assert_eq!(finish, case["stream"]["finish_reason"], "{name}: stream finish reason");
        }
    }

    /// The fork's `chat_completion_stream_generator` around the parser: a delta with nothing
    /// is not sent (`null` here) unless it is the last; a failure ends the stream; ids shown
    /// by their prefix.
    fn stream(
        parsers: &AnswerParsers,
        request: &ToolRequest,
        prompt: &[i64],
        deltas: &[(Vec<i64>, String)],
        engine: &str,
    ) -> (Vec<Value>, Value) {
        let mut parser = parsers.stream(request.clone(), prompt);
        let mut out = Vec::new();
        for (n, (ids, text)) in deltas.iter().enumerate() {
            let last = n + 1 == deltas.len();
            let delta = match parser.next(text, ids, last) {
                Ok(delta) => delta,
                Err(StreamFailed { reason, .. }) => {
                    assert!(!reason.is_empty());
                    out.push(json!({"error": "TypeError"}));
                    return (out, Value::Null);
                }
            };
            let Some(delta) = delta.or(last.then(DeltaOut::default)) else {
                out.push(Value::Null);
                continue;
            };
            let mut shown = serde_json::Map::new();
            if let Some(content) = delta.content {
                shown.insert("content".into(), json!(content));
            }
            if let Some(reasoning) = delta.reasoning {
                shown.insert("reasoning".into(), json!(reasoning));
            }
            if let Some(calls) = delta.tool_calls {
                let calls = calls.iter().map(|c| {
                    let mut call = json!({"index": c.index, "function": {"arguments": c.arguments}});
                    if let Some(id) = &c.id {
                        let (prefix, hex) = match id.strip_prefix("call_") {
                            Some(hex) => ("call_", hex),
                            None => ("chatcmpl-tool-", id.strip_prefix("chatcmpl-tool-").unwrap()),
                        };
                        assert!(matches!(hex.len(), 24 | 32) && hex.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
                        call["id"] = json!(format!("{prefix}*"));
                        call["type"] = json!("function");
                    }
                    if let Some(name) = &c.name {
                        call["function"]["name"] = json!(name);
                    }
                    call
                });
                shown.insert("tool_calls".into(), Value::Array(calls.collect()));
            }
            out.push(Value::Object(shown));
        }
        (out, json!(parser.finish_reason(engine)))
    }

    #[test]
    fn minimax_m2_answers_parse_as_the_forks() {
        let recording = include_str!("../../../tests/reference/minimax_m2_parsers.json");
        replay(recording, "minimax_m2", "minimax_m2_append_think", 13);
    }

    #[test]
    fn glm_answers_parse_as_the_forks() {
        replay(include_str!("../../../tests/reference/glm_parsers.json"), "glm47", "glm45", 14);
    }

    #[test]
    fn flags_name_the_parsers_or_are_refused() {
        let vocab = |t: &str| {
            ["<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"]
                .iter()
                .position(|&s| s == t)
                .map(|i| 100 + i as i64)
        };
        let parsers =
            AnswerParsers::from_flags(Some("minimax_m2"), Some("minimax_m2_append_think"), true, vocab).unwrap();
        let think = ThinkTokens { start: 100, end: 101 };
        let markers = minimax_m2::ToolCallTokens { start: 102, end: 103 };
        let expected = AnswerParsers {
            reasoning: Some(ReasoningParser::MinimaxM2AppendThink(think)),
            tool_calls: Some(ToolCallParser::MinimaxM2(markers)),
            auto_tools: true,
        };
        assert_eq!(parsers, (expected, Vec::new()));
        // vLLM leaves the tool-call parser off without --enable-auto-tool-choice.
        let (off, _) = AnswerParsers::from_flags(Some("minimax_m2"), None, false, vocab).unwrap();
        assert_eq!(off, AnswerParsers::default());
        assert_eq!(AnswerParsers::from_flags(None, None, true, vocab), Err(AnswerParsersError::AutoToolsWithoutParser));
        let (glm, not_native) = AnswerParsers::from_flags(Some("glm47"), Some("glm45"), true, vocab).unwrap();
        let think = ThinkTokens { start: 100, end: 101 };
        let expected = AnswerParsers {
            reasoning: Some(ReasoningParser::Glm45(think)),
            tool_calls: Some(ToolCallParser::Glm47),
            auto_tools: true,
        };
        assert_eq!((glm, not_native), (expected, Vec::new()));
        // Parsers the native engine lacks: tools accepted, answers unparsed, the flags named.
        let (other, not_native) = AnswerParsers::from_flags(Some("hermes"), Some("qwen3"), true, vocab).unwrap();
        assert_eq!(other, AnswerParsers { reasoning: None, tool_calls: None, auto_tools: true });
        assert_eq!(not_native, ["--reasoning-parser qwen3", "--tool-call-parser hermes"]);
        let no_markers = |t: &str| (t == "<think>" || t == "</think>").then_some(1);
        assert_eq!(
            AnswerParsers::from_flags(Some("minimax_m2"), None, true, no_markers),
            Err(AnswerParsersError::MissingToken { parser: "minimax_m2", token: "<minimax:tool_call>" })
        );
        assert_eq!(
            AnswerParsers::from_flags(None, Some("glm45"), false, |_| None),
            Err(AnswerParsersError::MissingToken { parser: "glm45", token: "<think>" })
        );
    }

    #[test]
    fn reasoning_ends_at_the_last_think_marker() {
        let think = ThinkTokens { start: 1, end: 2 };
        assert!(think.reasoning_ended(&[5, 1, 5, 2, 5]));
        assert!(!think.reasoning_ended(&[2, 5, 1, 5]));
        assert!(!think.reasoning_ended(&[5, 5]));
        assert!(!think.reasoning_ended(&[]));
    }

    #[test]
    fn glms_parser_keeps_special_tokens_where_tools_may_be_called() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let request = |choice: Option<Value>| ToolRequest::read(Some(&tools), choice.as_ref(), None, None).unwrap();
        let glm = AnswerParsers { tool_calls: Some(ToolCallParser::Glm47), auto_tools: true, ..Default::default() };
        assert!(glm.keeps_special_tokens(&request(None)));
        assert!(glm.keeps_special_tokens(&request(Some(json!("required")))));
        assert!(glm.keeps_special_tokens(&request(Some(Value::Null))));
        assert!(!glm.keeps_special_tokens(&request(Some(json!("none")))));
        assert!(!glm.keeps_special_tokens(&ToolRequest::default()));
        let minimax = ToolCallParser::MinimaxM2(minimax_m2::ToolCallTokens { start: 1, end: 2 });
        let minimax = AnswerParsers { tool_calls: Some(minimax), auto_tools: true, ..Default::default() };
        assert!(!minimax.keeps_special_tokens(&request(None)));
    }

    /// The fork's `check_tool_usage`, message for message.
    #[test]
    fn tool_choices_are_checked_as_the_fork_checks_them() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let read = |tools: Option<&Value>, choice: Option<Value>| ToolRequest::read(tools, choice.as_ref(), None, None);
        assert_eq!(read(Some(&tools), None).unwrap().choice, ToolChoice::Auto);
        assert_eq!(read(None, None).unwrap().choice, ToolChoice::None);
        assert_eq!(read(None, Some(json!("none"))).unwrap().choice, ToolChoice::None);
        assert_eq!(read(Some(&tools), Some(Value::Null)).unwrap().choice, ToolChoice::Null);
        assert_eq!(read(Some(&tools), Some(json!("required"))).unwrap().choice, ToolChoice::Required);
        let named = json!({"type": "function", "function": {"name": "f"}});
        assert_eq!(read(Some(&tools), Some(named)).unwrap().choice, ToolChoice::Named("f".into()));
        let refused = |tools: Option<&Value>, choice: Value| read(tools, Some(choice)).unwrap_err();
        assert_eq!(refused(None, json!("auto")), "When using `tool_choice`, `tools` must be set.");
        assert!(refused(Some(&tools), json!("sometimes")).starts_with("Invalid value for `tool_choice`: sometimes!"));
        assert!(refused(Some(&tools), json!({"function": 1})).starts_with("Invalid value for `function`: `1`"));
        assert!(refused(Some(&tools), json!({"function": {}})).starts_with("Expected field `name`"));
        assert!(refused(Some(&tools), json!({"function": {"name": ""}})).starts_with("Invalid `name` in `function`"));
        assert!(refused(Some(&tools), json!({"function": {"name": "g"}})).contains("does not match any"));
        assert!(read(Some(&json!([])), None).unwrap_err().contains("must not be an empty array"));
        assert!(read(Some(&json!([{"function": {}}])), None).is_err());
        assert!(!ToolRequest::read(Some(&tools), None, Some(false), None).unwrap().parallel);
        let off = json!({"enable_thinking": false});
        assert!(!ToolRequest::read(None, None, None, off.as_object()).unwrap().thinking);
    }
}
