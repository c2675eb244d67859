//! DeepSeek-V4's chat encoding: the prompt vLLM renders under `--tokenizer-mode deepseek_v4`
//! (governance runs DeepSeek-V4-Flash so), restated from vLLM 0.32's
//! `tokenizers/deepseek_v4.py` (which reads the request's `chat_template_kwargs`) and
//! `tokenizers/deepseek_v4_encoding.py` (which writes the text). The model has no Jinja
//! template for this: special tokens mark the turns (`<｜User｜>`, `<｜Assistant｜>`), `<think>`
//! opens reasoning and `</think>` closes it, tools are described in the system turn and called
//! in "DSML" blocks, and tool results travel inside user turns.
//!
//! Messages are read as vLLM's chat parser hands them on: `role`, `content` (text, or text
//! parts), an assistant's `reasoning` and `tool_calls`, a tool result's `tool_call_id`. Other
//! fields (the encoding's internal `task`, `wo_eos`, `response_format`) never reach it there,
//! so they do not here either. Validators re-encode a chat's prompt with vLLM, so every byte
//! matters: tests compare with vLLM's own functions.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::tokenizer::python_json_string;

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const THINK: &str = "<think>";
const END_THINK: &str = "</think>";
const DSML: &str = "｜DSML｜";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
const LATEST_REMINDER: &str = "<｜latest_reminder｜>";
const IMAGE: &str = "<｜deepseek_image｜>";

/// What the first turn says of the effort to reason, in thinking mode.
const EFFORT_HIGH: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";
const EFFORT_MAX: &str = "Reasoning Effort: Beyond maximum — exhaustive, relentless, and uncompromising.\nYou MUST reason with the utmost depth and rigor, leaving absolutely nothing to chance: exhaustively decompose the problem into its most fundamental components, trace every causal chain to its root, and resolve the underlying cause rather than any surface symptom.\nDo not stop reasoning until you have independently verified the solution from multiple angles and are certain that no assumption remains unchecked and no error remains undiscovered.\n\n";

/// How the tools are offered, `{schemas}` replaced by one JSON schema a line.
const TOOLS: &str = r#"## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<｜DSML｜tool_calls>" block like the following:

<｜DSML｜tool_calls>
<｜DSML｜invoke name="$TOOL_NAME">
<｜DSML｜parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</｜DSML｜parameter>
...
</｜DSML｜invoke>
<｜DSML｜invoke name="$TOOL_NAME2">
...
</｜DSML｜invoke>
</｜DSML｜tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by <think>), you MUST output your complete reasoning inside <think>...</think> BEFORE any tool calls or final response.

Otherwise, output directly after </think> with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"#;

/// How much reasoning the first turn asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effort {
    Low,
    High,
    Max,
}

/// A request's reasoning settings, from its `chat_template_kwargs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoning {
    /// Thinking mode (`<think>` opens the answer) or chat mode (`</think>` does).
    pub thinking: bool,
    pub effort: Effort,
    /// Earlier turns' reasoning left out.
    pub drop_thinking: bool,
}

/// Python's truth of a JSON value (`bool(x)`; also how vLLM's parsers read template flags).
pub fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

impl Reasoning {
    /// As vLLM's `DeepseekV4Tokenizer` reads them: thinking unless `thinking` or
    /// `enable_thinking` is given and neither is true; `reasoning_effort` `"none"` turns
    /// thinking off, `"max"` is the most, `"low"`, `"minimal"` and `"medium"` the least, any
    /// other text high, and none at all high when thinking; `drop_thinking` true unless given.
    pub fn from_kwargs(kwargs: Option<&Map<String, Value>>) -> Self {
        let get = |key: &str| kwargs.and_then(|k| k.get(key));
        let mut thinking = match (get("thinking"), get("enable_thinking")) {
            (None, None) => true,
            (a, b) => a.is_some_and(truthy) || b.is_some_and(truthy),
        };
        let effort = match get("reasoning_effort").and_then(Value::as_str) {
            None if thinking => Effort::High,
            None => Effort::Low,
            Some("none") => {
                thinking = false;
                Effort::Low
            }
            Some("max") => Effort::Max,
            Some("low" | "minimal" | "medium") => Effort::Low,
            Some(_) => Effort::High,
        };
        let drop_thinking = get("drop_thinking").is_none_or(truthy);
        Self { thinking, effort, drop_thinking }
    }
}

/// A message as the encoding sees it.
#[derive(Debug, Clone, Default)]
struct Message {
    role: String,
    /// `None` where the request gave none (or null).
    content: Option<Value>,
    reasoning: Option<String>,
    tool_calls: Vec<Value>,
    tool_call_id: String,
    /// The tools offered (a system turn's, from the request).
    tools: Vec<Value>,
    /// A user turn's parts once tool results are merged into it (every user turn has them).
    blocks: Option<Vec<Block>>,
}

#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: String, content: Value },
}

impl Message {
    fn read(value: &Value) -> Result<Self, String> {
        let field = |name: &str| value.get(name).filter(|v| !v.is_null());
        let role = field("role").and_then(Value::as_str).ok_or_else(|| format!("a message without a role: {value}"))?;
        Ok(Self {
            role: role.to_string(),
            content: field("content").cloned(),
            reasoning: field("reasoning").map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_string)),
            tool_calls: field("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default(),
            tool_call_id: field("tool_call_id").and_then(Value::as_str).unwrap_or_default().to_string(),
            tools: Vec::new(),
            blocks: None,
        })
    }
}

/// `str.format` of a value Python would print: text as it is, `None` for nothing.
fn python_str(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "None".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => python_json_string(other),
    }
}

/// Text parts joined by blank lines, images as their placeholder; a string as it is.
fn flatten_content(content: Option<&Value>) -> Result<Option<String>, String> {
    let Some(content) = content else { return Ok(None) };
    let Value::Array(parts) = content else {
        return Ok(Some(content.as_str().map_or_else(|| python_str(Some(content)), str::to_string)));
    };
    let texts = parts
        .iter()
        .map(|part| match part.get("type").and_then(Value::as_str) {
            _ if !part.is_object() => Ok(python_str(Some(part))),
            Some("image" | "image_url") => Ok(IMAGE.to_string()),
            Some("text") => Ok(part.get("text").and_then(Value::as_str).unwrap_or_default().to_string()),
            other => Err(format!("unsupported content part type {other:?}")),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(texts.join("\n\n")))
}

/// Tool results become parts of a user turn, the previous one where it is made of parts already;
/// consecutive user turns merge likewise.
fn merge_tool_messages(messages: Vec<Message>) -> Result<Vec<Message>, String> {
    let mut merged: Vec<Message> = Vec::new();
    for mut message in messages {
        let open_user = merged.last_mut().filter(|m| m.role == "user" && m.blocks.is_some());
        match message.role.as_str() {
            "tool" => {
                let block = Block::ToolResult {
                    id: message.tool_call_id.clone(),
                    content: message.content.take().unwrap_or(Value::String(String::new())),
                };
                match open_user {
                    Some(user) => user.blocks.as_mut().expect("filtered").push(block),
                    None => {
                        merged.push(Message { role: "user".into(), blocks: Some(vec![block]), ..Message::default() })
                    }
                }
            }
            "user" => {
                let text = flatten_content(message.content.as_ref())?.unwrap_or_default();
                match open_user {
                    Some(user) => user.blocks.as_mut().expect("filtered").push(Block::Text(text)),
                    None => {
                        message.content = Some(Value::String(text.clone()));
                        message.blocks = Some(vec![Block::Text(text)]);
                        merged.push(message);
                    }
                }
            }
            _ => merged.push(message),
        }
    }
    Ok(merged)
}

/// A tool call's id (`id`, or its function's).
fn call_id(call: &Value) -> String {
    let id = call.get("id").filter(|v| truthy(v)).or_else(|| call.get("function").and_then(|f| f.get("id")));
    id.and_then(Value::as_str).unwrap_or_default().to_string()
}

/// Each user turn's tool results in the order the assistant before it called them.
fn sort_tool_results(messages: &mut [Message]) {
    // Each call's position by id; as Python's dict, a repeated id keeps its last.
    let mut order: HashMap<String, usize> = HashMap::new();
    for message in messages {
        if message.role == "assistant" && !message.tool_calls.is_empty() {
            order = message
                .tool_calls
                .iter()
                .enumerate()
                .map(|(i, call)| (call_id(call), i))
                .filter(|(id, _)| !id.is_empty())
                .collect();
        } else if message.role == "user"
            && let Some(blocks) = message.blocks.as_mut()
        {
            let position = |id: &str| order.get(id).copied().unwrap_or(0);
            let mut results: Vec<Block> =
                blocks.iter().filter(|b| matches!(b, Block::ToolResult { .. })).cloned().collect();
            if results.len() > 1 && !order.is_empty() {
                // A stable sort, as Python's `sorted`.
                results.sort_by_key(|b| match b {
                    Block::ToolResult { id, .. } => position(id),
                    Block::Text(_) => 0,
                });
                let mut sorted = results.into_iter();
                for block in blocks.iter_mut() {
                    if matches!(block, Block::ToolResult { .. }) {
                        *block = sorted.next().expect("as many as taken");
                    }
                }
            }
        }
    }
}

fn last_user_index(messages: &[Message]) -> Option<usize> {
    messages.iter().rposition(|m| m.role == "user" || m.role == "developer")
}

/// Earlier turns' reasoning left out: assistant turns before the last user turn lose theirs,
/// developer turns before it go.
fn drop_thinking_messages(messages: Vec<Message>) -> Vec<Message> {
    let last_user = last_user_index(&messages);
    messages
        .into_iter()
        .enumerate()
        .filter_map(|(i, mut message)| {
            let kept_role = matches!(message.role.as_str(), "user" | "system" | "tool" | "latest_reminder");
            if kept_role || last_user.is_none_or(|u| i >= u) {
                Some(message)
            } else if message.role == "assistant" {
                message.reasoning = None;
                Some(message)
            } else {
                None
            }
        })
        .collect()
}

/// The tools' section of a turn: each tool's `function`, as JSON, a line each.
fn render_tools(tools: &[Value]) -> Result<String, String> {
    let schemas = tools
        .iter()
        .map(|tool| {
            tool.get("function").map(python_json_string).ok_or_else(|| format!("a tool without a function: {tool}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TOOLS.replace("{schemas}", &schemas.join("\n")))
}

/// A tool call's arguments as DSML parameters, one a line: text as it is, anything else as JSON.
fn dsml_arguments(call: &Value) -> Result<String, String> {
    let arguments = call.get("function").and_then(|f| f.get("arguments")).unwrap_or(&Value::Null);
    let parsed;
    let arguments = match arguments {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text).map_err(|e| format!("tool call arguments: {e}"))?;
            &parsed
        }
        other => other,
    };
    let Value::Object(arguments) = arguments else {
        return Err(format!("tool call arguments are not an object: {arguments}"));
    };
    Ok(arguments
        .iter()
        .map(|(key, value)| {
            let (string, text) = match value {
                Value::String(s) => ("true", s.clone()),
                other => ("false", python_json_string(other)),
            };
            format!("<{DSML}parameter name=\"{key}\" string=\"{string}\">{text}</{DSML}parameter>")
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// One turn's text, and what opens the next.
fn render(
    index: usize,
    messages: &[Message],
    reasoning: Reasoning,
    last_user: Option<usize>,
) -> Result<String, String> {
    let message = &messages[index];
    let content = flatten_content(message.content.as_ref())?;
    let mut prompt = String::new();
    if index == 0 && reasoning.thinking {
        prompt += match reasoning.effort {
            Effort::Low => "",
            Effort::High => EFFORT_HIGH,
            Effort::Max => EFFORT_MAX,
        };
    }
    let tools = || -> Result<String, String> {
        if message.tools.is_empty() { Ok(String::new()) } else { Ok(format!("\n\n{}", render_tools(&message.tools)?)) }
    };
    let after_last_user = |i: usize| last_user.is_none_or(|u| i > u);
    match message.role.as_str() {
        "system" => {
            prompt += content.as_deref().unwrap_or_default();
            prompt += &tools()?;
        }
        "developer" => {
            let text = content.filter(|c| !c.is_empty()).ok_or("a developer message without content")?;
            prompt += USER;
            prompt += &text;
            prompt += &tools()?;
        }
        "user" => {
            prompt += USER;
            let parts: Vec<String> = message
                .blocks
                .iter()
                .flatten()
                .map(|block| match block {
                    Block::Text(text) => text.clone(),
                    Block::ToolResult { content, .. } => {
                        let text = match content {
                            Value::Array(parts) => parts
                                .iter()
                                .map(|p| match p.get("type").and_then(Value::as_str) {
                                    Some("text") => {
                                        p.get("text").and_then(Value::as_str).unwrap_or_default().to_string()
                                    }
                                    other => format!("[Unsupported {}]", python_str(other.map(Value::from).as_ref())),
                                })
                                .collect::<Vec<_>>()
                                .join("\n\n"),
                            other => python_str(Some(other)),
                        };
                        format!("<tool_result>{text}</tool_result>")
                    }
                })
                .collect();
            prompt += &parts.join("\n\n");
        }
        "latest_reminder" => {
            prompt += LATEST_REMINDER;
            prompt += &content.unwrap_or_else(|| "None".into());
        }
        "assistant" => {
            let mut calls = String::new();
            if !message.tool_calls.is_empty() {
                let invokes = message
                    .tool_calls
                    .iter()
                    .map(|call| {
                        let name = python_str(call.get("function").and_then(|f| f.get("name")));
                        Ok(format!("<{DSML}invoke name=\"{name}\">\n{}\n</{DSML}invoke>", dsml_arguments(call)?))
                    })
                    .collect::<Result<Vec<String>, String>>()?;
                calls = format!("\n\n<{DSML}tool_calls>\n{}\n</{DSML}tool_calls>", invokes.join("\n"));
            }
            if reasoning.thinking && (!reasoning.drop_thinking || after_last_user(index)) {
                prompt += message.reasoning.as_deref().unwrap_or_default();
                prompt += END_THINK;
            }
            prompt += content.as_deref().unwrap_or_default();
            prompt += &calls;
            prompt += EOS;
        }
        other => return Err(format!("a message of role {other:?}")),
    }
    let next = messages.get(index + 1).map(|m| m.role.as_str());
    if next.is_some_and(|r| r != "assistant" && r != "latest_reminder") {
        return Ok(prompt);
    }
    // The assistant's turn opens after a user's or a developer's, and after a system turn that
    // ends the conversation or opens an assistant's.
    let opens = match message.role.as_str() {
        "user" | "developer" => true,
        "system" => next.is_none_or(|r| r == "assistant"),
        _ => false,
    };
    if opens {
        prompt += ASSISTANT;
        let thinks = reasoning.thinking && (!reasoning.drop_thinking || last_user.is_none_or(|u| index >= u));
        prompt += if thinks { THINK } else { END_THINK };
    }
    Ok(prompt)
}

/// The prompt text of `messages` (OpenAI-shaped), with the request's `tools` offered in the
/// first system turn (one is made where there is none) and its `chat_template_kwargs`.
pub fn encode(
    messages: &[Value],
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
) -> Result<String, String> {
    let reasoning = Reasoning::from_kwargs(kwargs);
    let mut messages = messages.iter().map(Message::read).collect::<Result<Vec<_>, _>>()?;
    if let Some(tools) = tools.and_then(Value::as_array).filter(|t| !t.is_empty()) {
        let index = match messages.iter().position(|m| m.role == "system") {
            Some(i) => i,
            None => {
                let system = Message::read(&serde_json::json!({"role": "system"}))?;
                messages.insert(0, system);
                0
            }
        };
        messages[index].tools = tools.clone();
    }
    let mut messages = merge_tool_messages(messages)?;
    sort_tool_results(&mut messages);
    // Where tools are offered, earlier reasoning stays.
    let drop_thinking = reasoning.drop_thinking && messages.iter().all(|m| m.tools.is_empty());
    let reasoning = Reasoning { drop_thinking, ..reasoning };
    if reasoning.thinking && drop_thinking {
        messages = drop_thinking_messages(messages);
    }
    let last_user = last_user_index(&messages);
    let mut prompt = BOS.to_string();
    for index in 0..messages.len() {
        prompt += &render(index, &messages, reasoning, last_user)?;
    }
    Ok(prompt)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// `chat_template_kwargs` as vLLM's tokenizer reads them (its own behaviour is compared
    /// whole in the daemon's `inference_api` tests).
    #[test]
    fn kwargs_are_read_as_vllm_reads_them() {
        let read = |kwargs: Value| Reasoning::from_kwargs(kwargs.as_object());
        let r = |thinking, effort, drop_thinking| Reasoning { thinking, effort, drop_thinking };
        assert_eq!(read(json!({})), r(true, Effort::High, true), "thinking, high, by default");
        assert_eq!(read(json!({"thinking": false})), r(false, Effort::Low, true));
        // Either key true turns it on; present and falsy (null, 0, "") off.
        assert!(read(json!({"thinking": false, "enable_thinking": 1})).thinking);
        assert!(!read(json!({"enable_thinking": null})).thinking);
        assert!(!read(json!({"thinking": ""})).thinking);
        assert_eq!(read(json!({"reasoning_effort": "none"})), r(false, Effort::Low, true));
        assert_eq!(read(json!({"reasoning_effort": "max"})).effort, Effort::Max);
        for low in ["low", "minimal", "medium"] {
            assert_eq!(read(json!({"reasoning_effort": low})).effort, Effort::Low, "{low}");
        }
        assert_eq!(read(json!({"reasoning_effort": "extreme"})).effort, Effort::High);
        assert_eq!(read(json!({"reasoning_effort": 3})).effort, Effort::High, "not text: as if absent");
        assert!(!read(json!({"drop_thinking": false})).drop_thinking);
        assert!(!read(json!({"drop_thinking": 0})).drop_thinking);
    }

    /// Malformed requests are refused with the reason, not rendered.
    #[test]
    fn malformed_messages_are_refused() {
        let err = |messages: Value| encode(messages.as_array().unwrap(), None, None).unwrap_err();
        assert!(err(json!([{"content": "x"}])).contains("without a role"));
        assert!(err(json!([{"role": "wizard", "content": "x"}])).contains("\"wizard\""));
        let bad_call = json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
            "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{not json"}}]}]);
        assert!(err(bad_call).contains("tool call arguments"));
        let tools = json!([{"type": "function"}]);
        let refused = encode(&[json!({"role": "user", "content": "x"})], Some(&tools), None).unwrap_err();
        assert!(refused.contains("a tool without a function"), "{refused}");
    }
}
