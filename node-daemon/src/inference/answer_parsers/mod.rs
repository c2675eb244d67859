//! The answer parsers vLLM runs when a model is served with `--reasoning-parser` and
//! `--enable-auto-tool-choice --tool-call-parser` (governance's arguments for the network's
//! models): reasoning and tool calls read out of the model's text, whole or as it streams, so
//! that the native engine answers as gonka's vLLM fork does. Pure: no engine, no I/O.
//!
//! Natively parsed: MiniMax-M2's (`minimax_m2`, `minimax_m2_append_think`, in [`minimax_m2`]).
//! How they join is the fork's `DelegatingParser` (`vllm/parser/abstract_parser.py`): the
//! reasoning parser reads the text first, and once the reasoning has ended the tool-call parser
//! reads what follows. `node-daemon/tests/reference/minimax_m2_parsers.py` records the fork's
//! own code on a set of answers (`minimax_m2_parsers.json`), which the tests here replay.

pub mod minimax_m2;
pub mod python_json;

use serde_json::Value;

use self::minimax_m2::{ThinkTokens, ToolCallStream, ToolCallTokens};

/// The parsers' names parsed here (vLLM's registry names).
pub const NATIVE_TOOL_CALL_PARSERS: [&str; 1] = ["minimax_m2"];
pub const NATIVE_REASONING_PARSERS: [&str; 1] = ["minimax_m2_append_think"];

/// Whether the native engine parses answers as these flags ask.
pub fn parsed_natively(tool_call_parser: Option<&str>, reasoning_parser: Option<&str>) -> bool {
    tool_call_parser.is_none_or(|p| NATIVE_TOOL_CALL_PARSERS.contains(&p))
        && reasoning_parser.is_none_or(|p| p.is_empty() || NATIVE_REASONING_PARSERS.contains(&p))
}

/// A parser flag this ML node cannot honour, or one the fork would refuse at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnswerParsersError {
    #[error(
        "{flag} {name} is not one the native engine parses (it parses {native}); serve the model with the vllm engine"
    )]
    NotNative { flag: &'static str, name: String, native: &'static str },
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
}

/// The tool-call parsers parsed here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolCallParser {
    /// `minimax_m2`.
    MinimaxM2(ToolCallTokens),
}

/// The parsers a served model's answers go through (none: the text as it is).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnswerParsers {
    pub reasoning: Option<ReasoningParser>,
    /// Only with `--enable-auto-tool-choice` (vLLM leaves the tool-call parser off without it).
    pub tool_calls: Option<ToolCallParser>,
}

impl AnswerParsers {
    /// The parsers vLLM's flags name; `vocab` gives a token's id.
    pub fn from_flags(
        tool_call_parser: Option<&str>,
        reasoning_parser: Option<&str>,
        auto_tools: bool,
        vocab: impl Fn(&str) -> Option<i64>,
    ) -> Result<Self, AnswerParsersError> {
        let token = |parser: &'static str, token: &'static str| {
            vocab(token).ok_or(AnswerParsersError::MissingToken { parser, token })
        };
        let reasoning = match reasoning_parser {
            None | Some("") => None,
            Some("minimax_m2_append_think") => {
                let parser = "minimax_m2_append_think";
                Some(ReasoningParser::MinimaxM2AppendThink(ThinkTokens {
                    start: token(parser, minimax_m2::THINK_START)?,
                    end: token(parser, minimax_m2::THINK_END)?,
                }))
            }
            Some(other) => {
                return Err(AnswerParsersError::NotNative {
                    flag: "--reasoning-parser",
                    name: other.into(),
                    native: "minimax_m2_append_think",
                });
            }
        };
        let tool_calls = match (auto_tools, tool_call_parser) {
            (true, None) => return Err(AnswerParsersError::AutoToolsWithoutParser),
            (false, _) => None,
            (true, Some("minimax_m2")) => Some(ToolCallParser::MinimaxM2(ToolCallTokens {
                start: token("minimax_m2", minimax_m2::TOOL_CALL_START)?,
                end: token("minimax_m2", minimax_m2::TOOL_CALL_END)?,
            })),
            (true, Some(other)) => {
                return Err(AnswerParsersError::NotNative {
                    flag: "--tool-call-parser",
                    name: other.into(),
                    native: "minimax_m2",
                });
            }
        };
        Ok(Self { reasoning, tool_calls })
    }

    /// Whether any parser is on.
    pub fn any(&self) -> bool {
        self.reasoning.is_some() || self.tool_calls.is_some()
    }

    /// A whole answer's reasoning, content and tool calls (`Parser.parse`); `tool_calls` is
    /// `None` when the tool-call parser did not run or found none.
    pub fn whole(&self, text: &str, request: &ToolRequest) -> ParsedAnswer {
        let (reasoning, mut content) = match self.reasoning {
            None => (None, Some(text.to_string())),
            Some(ReasoningParser::MinimaxM2AppendThink(_)) => (None, Some(minimax_m2::append_think(text))),
        };
        let mut tool_calls = None;
        // `_extract_tool_calls`: auto (or a null choice) runs the tool-call parser; "none" not
        // ("required" and named choices are refused before generating).
        if let Some(ToolCallParser::MinimaxM2(_)) = self.tool_calls
            && matches!(request.choice, ToolChoice::Auto | ToolChoice::Null)
            && let Some((calls, rest)) = minimax_m2::tool_calls(content.as_deref().unwrap_or(""), &request.tools)
        {
            content = rest.filter(|c| !python_json::python_strip(c).is_empty());
            tool_calls = Some(calls);
        }
        ParsedAnswer { reasoning, content, tool_calls }
    }

    /// The parser for one streamed answer; `prompt` tells whether its reasoning is over before
    /// it starts.
    pub fn stream(&self, request: ToolRequest, prompt: &[i64]) -> StreamParser {
        let reasoning_ended = match self.reasoning {
            None => true,
            Some(ReasoningParser::MinimaxM2AppendThink(think)) => think.reasoning_ended(prompt),
        };
        StreamParser {
            parsers: *self,
            request,
            reasoning_ended,
            tool_text_started: false,
            previous_text: String::new(),
            previous_ids: Vec::new(),
            tool_stream: ToolCallStream::default(),
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

/// A chat request's tools and how they may be called.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolRequest {
    pub tools: Vec<Value>,
    pub choice: ToolChoice,
    /// `parallel_tool_calls` (default true): false keeps the first call only.
    pub parallel: bool,
}

impl Default for ToolRequest {
    fn default() -> Self {
        Self { tools: Vec::new(), choice: ToolChoice::None, parallel: true }
    }
}

impl ToolRequest {
    /// `tools` and `tool_choice` (`None`: left out) checked as the fork's `check_tool_usage`
    /// checks them, with its messages.
    pub fn read(tools: Option<&Value>, choice: Option<&Value>, parallel: Option<bool>) -> Result<Self, String> {
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
        Ok(Self { tools, choice, parallel: parallel.unwrap_or(true) })
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

/// A call as it streams: its place among the answer's calls and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamedCall {
    pub index: usize,
    pub id: String,
    pub call: FunctionCall,
}

/// What one streamed delta says. `content`: left out, `null` (`Some(None)`) or text;
/// `tool_calls`: left out or a list (possibly empty), as the fork sets them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DeltaOut {
    pub content: Option<Option<String>>,
    pub tool_calls: Option<Vec<StreamedCall>>,
}

impl DeltaOut {
    pub fn content(text: &str) -> Self {
        Self { content: Some(Some(text.to_string())), tool_calls: None }
    }
}

/// One streamed answer's parser (`Parser.parse_delta` and its `StreamState`).
#[derive(Clone, Debug)]
pub struct StreamParser {
    parsers: AnswerParsers,
    request: ToolRequest,
    reasoning_ended: bool,
    tool_text_started: bool,
    previous_text: String,
    previous_ids: Vec<i64>,
    tool_stream: ToolCallStream,
    /// Whether a call has gone out (the finish reason is then `tool_calls`).
    pub tools_streamed: bool,
}

impl StreamParser {
    fn in_reasoning(&self) -> bool {
        self.parsers.reasoning.is_some() && !self.reasoning_ended
    }

    fn in_tool_calls(&self) -> bool {
        self.parsers.tool_calls.is_some() && self.reasoning_ended
    }

    /// The next delta of text and the tokens it came from; `None`: nothing to send for it.
    pub fn next(&mut self, delta_text: &str, delta_ids: &[i64]) -> Option<DeltaOut> {
        let mut text = delta_text.to_string();
        let mut ids = delta_ids.to_vec();
        let mut current_text = format!("{}{text}", self.previous_text);
        let mut current_ids = [self.previous_ids.as_slice(), &ids].concat();
        let mut out = None;
        if self.in_reasoning() {
            let Some(ReasoningParser::MinimaxM2AppendThink(think)) = self.parsers.reasoning else {
                unreachable!("in_reasoning needs a reasoning parser")
            };
            let prefix = if self.previous_ids.is_empty() { minimax_m2::THINK_START } else { "" };
            let content = format!("{prefix}{text}");
            if think.reasoning_ended(&current_ids) {
                // The tool-call parser starts from this delta, `<think>` and all.
                self.reasoning_ended = true;
                current_ids = ids.clone();
                current_text = content.clone();
                text = content.clone();
            }
            out = Some(DeltaOut::content(&content));
        }
        if self.in_tool_calls() {
            if !self.tool_text_started {
                self.tool_text_started = true;
                self.previous_text.clear();
                self.previous_ids.clear();
                text = current_text.clone();
                ids = current_ids.clone();
            }
            let Some(ToolCallParser::MinimaxM2(tokens)) = self.parsers.tool_calls else {
                unreachable!("in_tool_calls needs a tool-call parser")
            };
            out = match self.request.choice {
                ToolChoice::None => (!text.is_empty()).then(|| DeltaOut::content(&text)),
                _ => {
                    self.tool_stream.next(tokens, &self.previous_text, &current_text, &text, &ids, &self.request.tools)
                }
            };
            if out.as_ref().is_some_and(|o| o.tool_calls.as_ref().is_some_and(|c| !c.is_empty())) {
                self.tools_streamed = true;
            }
        }
        if out.is_none() && !self.in_reasoning() && !self.in_tool_calls() {
            out = Some(DeltaOut::content(&text));
        }
        self.previous_text = current_text;
        self.previous_ids = current_ids;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The fork's own parsers on each case of `minimax_m2_parsers.json`: the whole answer's
    /// message and finish reason, each streamed delta (or none sent) and the stream's finish
    /// reason, as the serving layer around them decides (`finish`/`stream` below restate it).
    #[test]
    fn minimax_m2_answers_parse_as_the_forks() {
        let recorded: Value =
            serde_json::from_str(include_str!("../../../tests/reference/minimax_m2_parsers.json")).unwrap();
        let vocab = recorded["vocab"].as_object().unwrap().clone();
        let parsers = AnswerParsers::from_flags(Some("minimax_m2"), Some("minimax_m2_append_think"), true, |t| {
            vocab.get(t).and_then(Value::as_i64)
        })
        .unwrap();
        let cases = recorded["cases"].as_array().unwrap();
        assert!(cases.len() >= 12, "the recording has every case");
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let request = ToolRequest::read(
                case.get("tools"),
                case.get("tool_choice"),
                case.get("parallel_tool_calls").and_then(Value::as_bool),
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
            let engine_finish = case["engine_finish_reason"].as_str().unwrap();

            let text: String = deltas.iter().map(|(_, t)| t.as_str()).collect();
            let (message, finish) = whole_message(&parsers, &text, &request, engine_finish);
            assert_eq!(message, case["whole"]["message"], "{name}: whole message");
            assert_eq!(finish, case["whole"]["finish_reason"], "{name}: whole finish reason");

            let prompt: Vec<i64> = case
                .get("prompt_ids")
                .map(|p| p.as_array().unwrap().iter().map(|i| i.as_i64().unwrap()).collect())
                .unwrap_or_else(|| vec![vocab["<think>"].as_i64().unwrap(), 7]);
            let (streamed, finish) = stream(&parsers, &request, &prompt, &deltas, engine_finish);
            assert_eq!(Value::Array(streamed), case["stream"]["deltas"], "{name}: streamed deltas");
            assert_eq!(finish, case["stream"]["finish_reason"], "{name}: stream finish reason");
        }
    }

    /// The fork's `chat_completion_full_generator` around the parser, for "auto", "none" and
    /// null choices.
    fn whole_message(parsers: &AnswerParsers, text: &str, request: &ToolRequest, engine: &str) -> (Value, String) {
        let parsed = parsers.whole(text, request);
        let called = request.choice == ToolChoice::Auto && parsed.tool_calls.as_ref().is_some_and(|c| !c.is_empty());
        let mut calls: Vec<Value> = match (&parsed.tool_calls, called) {
            (Some(calls), true) => calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect(),
            _ => Vec::new(),
        };
        if !request.parallel {
            calls.truncate(1);
        }
        let message = json!({"reasoning": parsed.reasoning, "content": parsed.content, "tool_calls": calls});
        (message, if called { "tool_calls" } else { engine }.to_string())
    }

    /// The fork's `chat_completion_stream_generator` around the parser: a delta with nothing
    /// is not sent (`null` here) unless it is the last; ids shown by their prefix.
    fn stream(
        parsers: &AnswerParsers,
        request: &ToolRequest,
        prompt: &[i64],
        deltas: &[(Vec<i64>, String)],
        engine: &str,
    ) -> (Vec<Value>, String) {
        let mut parser = parsers.stream(request.clone(), prompt);
        let mut out = Vec::new();
        for (n, (ids, text)) in deltas.iter().enumerate() {
            let last = n + 1 == deltas.len();
            let Some(delta) = parser.next(text, ids).or(last.then(DeltaOut::default)) else {
                out.push(Value::Null);
                continue;
            };
            let mut shown = serde_json::Map::new();
            if let Some(content) = delta.content {
                shown.insert("content".into(), json!(content));
            }
            if let Some(calls) = delta.tool_calls {
                let calls = calls.iter().filter(|c| request.parallel || c.index == 0).map(|c| {
                    assert!(c.id.len() == 29 && c.id[5..].bytes().all(|b| b.is_ascii_hexdigit()), "{}", c.id);
                    json!({"id": format!("{}*", &c.id[..5]), "type": "function", "index": c.index,
                        "function": {"name": c.call.name, "arguments": c.call.arguments}})
                });
                shown.insert("tool_calls".into(), Value::Array(calls.collect()));
            }
            out.push(Value::Object(shown));
        }
        (out, if parser.tools_streamed { "tool_calls" } else { engine }.to_string())
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
        assert_eq!(
            parsers,
            AnswerParsers {
                reasoning: Some(ReasoningParser::MinimaxM2AppendThink(ThinkTokens { start: 100, end: 101 })),
                tool_calls: Some(ToolCallParser::MinimaxM2(ToolCallTokens { start: 102, end: 103 })),
            }
        );
        // vLLM leaves the tool-call parser off without --enable-auto-tool-choice.
        let off = AnswerParsers::from_flags(Some("minimax_m2"), None, false, vocab).unwrap();
        assert!(!off.any());
        assert_eq!(AnswerParsers::from_flags(None, None, true, vocab), Err(AnswerParsersError::AutoToolsWithoutParser));
        let glm = AnswerParsers::from_flags(Some("glm47"), None, true, vocab).unwrap_err();
        assert!(glm.to_string().contains("--tool-call-parser glm47") && glm.to_string().contains("vllm engine"));
        assert!(matches!(
            AnswerParsers::from_flags(None, Some("glm45"), false, vocab),
            Err(AnswerParsersError::NotNative { flag: "--reasoning-parser", .. })
        ));
        let no_markers = |t: &str| (t == "<think>" || t == "</think>").then_some(1);
        assert_eq!(
            AnswerParsers::from_flags(Some("minimax_m2"), None, true, no_markers),
            Err(AnswerParsersError::MissingToken { parser: "minimax_m2", token: "<minimax:tool_call>" })
        );
    }

    /// The fork's `check_tool_usage`, message for message.
    #[test]
    fn tool_choices_are_checked_as_the_fork_checks_them() {
        let tools = json!([{"type": "function", "function": {"name": "f"}}]);
        let read = |tools: Option<&Value>, choice: Option<Value>| ToolRequest::read(tools, choice.as_ref(), None);
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
        assert!(!ToolRequest::read(Some(&tools), None, Some(false)).unwrap().parallel);
    }
}
