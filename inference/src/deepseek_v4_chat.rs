//! DeepSeek-V4's chat encoding: the prompt vLLM renders under `--tokenizer-mode deepseek_v4`
//! (governance runs DeepSeek-V4-Flash so), restated from vLLM 0.25.1's
//! `tokenizers/deepseek_v4.py` (which reads the request's `chat_template_kwargs`) and
//! `tokenizers/deepseek_v4_encoding.py` (which writes the text). The model has no Jinja
//! template for this: special tokens mark the turns (`<｜User｜>`, `<｜Assistant｜>`), `<think>`
//! opens reasoning and `</think>` closes it, tools are described in a system turn and called
//! in "DSML" blocks, tool results travel inside user turns, and a turn may carry a `task`
//! whose special token follows it.
//!
//! Why 0.25.1: it is the vLLM the network's ML nodes run (`mlnode:3.0.16` is stock 0.25.1 with
//! gonka's PoC seams, which leave the tokenizer alone; gonka's fork on 0.23 carries the same two
//! files, byte for byte), and a validator re-encodes an executor's prompt with it, so every
//! byte matters. vLLM 0.32 changed the defaults (thinking on at high effort unless turned off,
//! the request's tools in the first system turn instead of a new one, a last system turn opening
//! the answer, text parts joined by blank lines); a prompt written 0.32's way would not be the
//! prompt a validator reproduces. The tests compare with 0.25.1's own functions' output.
//!
//! Messages are read as vLLM 0.25.1's chat parser hands them on (content format "string"):
//! `role`, `content` as text (its text parts joined by a line break: the daemon's
//! `conversation` and [`text_of`] here), an assistant's `reasoning` and `tool_calls`, a
//! tool result's `tool_call_id`, a developer's `tools`, and any message's `task` (a string).
//! Nothing else of a message reaches the encoding there (`response_format`, `wo_eos` do not).

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::python_json::{self, truthy};

const BOS: &str = "<｜begin▁of▁sentence｜>";
const EOS: &str = "<｜end▁of▁sentence｜>";
const THINK: &str = "<think>";
const END_THINK: &str = "</think>";
const DSML: &str = "｜DSML｜";
const USER: &str = "<｜User｜>";
const ASSISTANT: &str = "<｜Assistant｜>";
const LATEST_REMINDER: &str = "<｜latest_reminder｜>";

/// What the first turn says of the effort to reason, in thinking mode at the most effort (0.25.1
/// says nothing at any other).
const EFFORT_MAX: &str = "Reasoning Effort: Absolute maximum with no shortcuts permitted.\nYou MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial scenarios.\nExplicitly write out your entire deliberation process, documenting every intermediate step, considered alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n";

/// The special token each `task` puts after its turn (quick instruction tasks: the model
/// classifies or extracts instead of answering).
const TASKS: [(&str, &str); 6] = [
    ("action", "<｜action｜>"),
    ("query", "<｜query｜>"),
    ("authority", "<｜authority｜>"),
    ("domain", "<｜domain｜>"),
    ("title", "<｜title｜>"),
    ("read_url", "<｜read_url｜>"),
];

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

/// A request's reasoning settings, from its `chat_template_kwargs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reasoning {
    /// Thinking mode (`<think>` opens the answer) or chat mode (`</think>` does).
    pub thinking: bool,
    /// `reasoning_effort` at its most (`max`, `xhigh`): the first turn asks for exhaustive
    /// reasoning. Any other effort writes the same prompt as none.
    pub max_effort: bool,
    /// Earlier turns' reasoning left out.
    pub drop_thinking: bool,
}

impl Reasoning {
    /// As vLLM 0.25.1's `DeepseekV4Tokenizer` reads them: chat mode unless `thinking` or
    /// `enable_thinking` is true; `reasoning_effort` `"none"` turns thinking off, `"max"` and
    /// `"xhigh"` ask for the most, any other text for "high" (which changes nothing written);
    /// `drop_thinking` true unless given.
    pub fn from_kwargs(kwargs: Option<&Map<String, Value>>) -> Self {
        let get = |key: &str| kwargs.and_then(|k| k.get(key));
        let mut thinking = get("thinking").is_some_and(truthy) || get("enable_thinking").is_some_and(truthy);
        let effort = get("reasoning_effort").and_then(Value::as_str);
        if effort == Some("none") {
            thinking = false;
        }
        let max_effort = matches!(effort, Some("max" | "xhigh"));
        let drop_thinking = get("drop_thinking").is_none_or(truthy);
        Self { thinking, max_effort, drop_thinking }
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
    /// The tools offered: the request's (in a system turn made for them) or a developer's own.
    tools: Vec<Value>,
    task: Option<String>,
    /// A user turn's parts once tool results are merged into it (every user turn has them).
    blocks: Option<Vec<Block>>,
}

#[derive(Debug, Clone)]
enum Block {
    Text(String),
    ToolResult { id: String, content: String },
}

impl Message {
    fn read(value: &Value) -> Result<Self, String> {
        let field = |name: &str| value.get(name).filter(|v| !v.is_null());
        let role = field("role").and_then(Value::as_str).ok_or_else(|| format!("a message without a role: {value}"))?;
        let tool_calls = field("tool_calls").and_then(Value::as_array).cloned().unwrap_or_default();
        for call in &tool_calls {
            let function = call.get("function").filter(|f| f.is_object());
            let typed = call.get("type").is_none_or(|t| t == "function");
            if !call.is_object() || function.is_none() || !typed {
                return Err("chat completions only support assistant tool_calls of type 'function'.".into());
            }
        }
        // vLLM's chat parser keeps a developer's tools only.
        let tools = match role {
            "developer" => field("tools").and_then(Value::as_array).cloned().unwrap_or_default(),
            _ => Vec::new(),
        };
        Ok(Self {
            role: role.to_string(),
            content: field("content").cloned(),
            reasoning: field("reasoning").map(|r| r.as_str().map_or_else(|| r.to_string(), str::to_string)),
            tool_calls,
            tool_call_id: field("tool_call_id").and_then(Value::as_str).unwrap_or_default().to_string(),
            tools,
            task: field("task").and_then(Value::as_str).map(str::to_string),
            blocks: None,
        })
    }

    fn text(&self) -> Result<Option<String>, String> {
        text_of(self.content.as_ref())
    }
}

/// `str.format` of a value Python would print: text as it is, `None` for nothing.
fn python_str(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "None".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => python_json::dumps(other),
    }
}

/// A message's content as text, as vLLM's "string" content format makes it: text as it is,
/// text parts joined by a line break (any other part refused).
pub fn text_of(content: Option<&Value>) -> Result<Option<String>, String> {
    match content {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(Value::Array(parts)) => {
            let texts = parts
                .iter()
                .map(|part| match (part.get("type").and_then(Value::as_str), part.get("text")) {
                    (Some("text"), Some(Value::String(text))) => Ok(text.as_str()),
                    _ => Err("only text content parts are supported".to_string()),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some(texts.join("\n")))
        }
        Some(other) => Ok(Some(python_str(Some(other)))),
    }
}

/// Tool results become parts of a user turn, the previous one where it is made of parts already;
/// consecutive user turns merge likewise, unless the earlier one carries a task.
fn merge_tool_messages(messages: Vec<Message>) -> Result<Vec<Message>, String> {
    let mut merged: Vec<Message> = Vec::new();
    for message in messages {
        match message.role.as_str() {
            "tool" => {
                let content = message.text()?.unwrap_or_default();
                let block = Block::ToolResult { id: message.tool_call_id, content };
                match open_user(&mut merged, false) {
                    Some(user) => user.blocks.as_mut().expect("filtered").push(block),
                    None => {
                        merged.push(Message { role: "user".into(), blocks: Some(vec![block]), ..Message::default() })
                    }
                }
            }
            "user" => {
                let text = message.text()?.unwrap_or_default();
                match open_user(&mut merged, true) {
                    Some(user) => user.blocks.as_mut().expect("filtered").push(Block::Text(text)),
                    // A new user turn keeps its task, nothing else but its text.
                    None => merged.push(Message {
                        role: "user".into(),
                        content: Some(Value::String(text.clone())),
                        blocks: Some(vec![Block::Text(text)]),
                        task: message.task,
                        ..Message::default()
                    }),
                }
            }
            _ => merged.push(message),
        }
    }
    Ok(merged)
}

/// The last turn if a tool result or a user's text joins it: a user turn made of parts (for a
/// user's text, one without a task).
fn open_user(merged: &mut [Message], untasked: bool) -> Option<&mut Message> {
    merged.last_mut().filter(|m| m.role == "user" && m.blocks.is_some() && (!untasked || m.task.is_none()))
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
/// developer turns (and turns of roles the encoding does not know) before it go.
fn drop_thinking_messages(messages: Vec<Message>) -> Vec<Message> {
    let last_user = last_user_index(&messages);
    messages
        .into_iter()
        .enumerate()
        .filter_map(|(i, mut message)| {
            let kept_role = matches!(
                message.role.as_str(),
                "user" | "system" | "tool" | "latest_reminder" | "direct_search_results"
            );
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
            tool.get("function").map(python_json::dumps).ok_or_else(|| format!("a tool without a function: {tool}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(TOOLS.replace("{schemas}", &schemas.join("\n")))
}

/// A tool call's arguments as DSML parameters, one a line: text as it is, anything else as JSON.
/// As vLLM's chat parser reads them first: JSON text is parsed, and none (or JSON's null) is
/// no arguments.
fn dsml_arguments(call: &Value) -> Result<String, String> {
    let arguments = call.get("function").and_then(|f| f.get("arguments")).unwrap_or(&Value::Null);
    let parsed = match arguments {
        none if !truthy(none) => Value::Object(Map::new()),
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Null) => Value::Object(Map::new()),
            Ok(value) => value,
            Err(e) => return Err(format!("tool call arguments: {e}")),
        },
        other => other.clone(),
    };
    let Value::Object(arguments) = parsed else {
        return Err(format!("tool call arguments are not an object: {parsed}"));
    };
    Ok(arguments
        .iter()
        .map(|(key, value)| {
            let (string, text) = match value {
                Value::String(s) => ("true", s.clone()),
                other => ("false", python_json::dumps(other)),
            };
            format!("<{DSML}parameter name=\"{key}\" string=\"{string}\">{text}</{DSML}parameter>")
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// An assistant turn's tool calls as a DSML block (empty without calls).
fn dsml_calls(calls: &[Value]) -> Result<String, String> {
    if calls.is_empty() {
        return Ok(String::new());
    }
    let invokes = calls
        .iter()
        .map(|call| {
            let name = call
                .get("function")
                .and_then(|f| f.get("name"))
                .ok_or_else(|| format!("a tool call without a name: {call}"))?;
            Ok(format!(
                "<{DSML}invoke name=\"{}\">\n{}\n</{DSML}invoke>",
                python_str(Some(name)),
                dsml_arguments(call)?
            ))
        })
        .collect::<Result<Vec<String>, String>>()?;
    Ok(format!("\n\n<{DSML}tool_calls>\n{}\n</{DSML}tool_calls>", invokes.join("\n")))
}

/// One turn's text, and what opens the next.
fn render(
    index: usize,
    messages: &[Message],
    reasoning: Reasoning,
    last_user: Option<usize>,
) -> Result<String, String> {
    let message = &messages[index];
    let content = message.text()?;
    let mut prompt = String::new();
    if index == 0 && reasoning.thinking && reasoning.max_effort {
        prompt += EFFORT_MAX;
    }
    let tools = || -> Result<String, String> {
        if message.tools.is_empty() { Ok(String::new()) } else { Ok(format!("\n\n{}", render_tools(&message.tools)?)) }
    };
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
            let parts: Vec<String> = match &message.blocks {
                Some(blocks) => blocks
                    .iter()
                    .map(|block| match block {
                        Block::Text(text) => text.clone(),
                        Block::ToolResult { content, .. } => format!("<tool_result>{content}</tool_result>"),
                    })
                    .collect(),
                None => vec![content.unwrap_or_default()],
            };
            prompt += &parts.join("\n\n");
        }
        "latest_reminder" => {
            prompt += LATEST_REMINDER;
            prompt += &content.unwrap_or_else(|| "None".into());
        }
        "assistant" => {
            let calls = dsml_calls(&message.tool_calls)?;
            // The answer to a task is not reasoned.
            let after_task = index > 0 && messages[index - 1].task.is_some();
            let after_last_user = last_user.is_none_or(|u| index > u);
            if reasoning.thinking && !after_task && (!reasoning.drop_thinking || after_last_user) {
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
    if let Some(task) = &message.task {
        let token = TASKS.iter().find(|(name, _)| name == task).map(|(_, token)| *token).ok_or_else(|| {
            let valid: Vec<&str> = TASKS.iter().map(|(name, _)| *name).collect();
            format!("invalid task {task:?}: valid tasks are {valid:?}")
        })?;
        if task == "action" {
            prompt += ASSISTANT;
            prompt += if reasoning.thinking { THINK } else { END_THINK };
        }
        prompt += token;
    } else if matches!(message.role.as_str(), "user" | "developer") {
        // The assistant's turn opens after a user's or a developer's (a system turn never opens it).
        prompt += ASSISTANT;
        let thinks = reasoning.thinking && (!reasoning.drop_thinking || last_user.is_none_or(|u| index >= u));
        prompt += if thinks { THINK } else { END_THINK };
    }
    Ok(prompt)
}

/// The prompt text of `messages` (OpenAI-shaped), with the request's `tools` offered in a
/// system turn of their own put first, and its `chat_template_kwargs`.
pub fn encode(
    messages: &[Value],
    tools: Option<&Value>,
    kwargs: Option<&Map<String, Value>>,
) -> Result<String, String> {
    let reasoning = Reasoning::from_kwargs(kwargs);
    let mut messages = messages.iter().map(Message::read).collect::<Result<Vec<_>, _>>()?;
    if let Some(tools) = tools.and_then(Value::as_array).filter(|t| !t.is_empty()) {
        messages.insert(0, Message { role: "system".into(), tools: tools.clone(), ..Message::default() });
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

    /// `chat_template_kwargs` as vLLM 0.25.1's tokenizer reads them (its own behaviour is
    /// compared whole in the daemon's `inference_api` tests).
    #[test]
    fn kwargs_are_read_as_vllm_reads_them() {
        let read = |kwargs: Value| Reasoning::from_kwargs(kwargs.as_object());
        let r = |thinking, max_effort, drop_thinking| Reasoning { thinking, max_effort, drop_thinking };
        assert_eq!(read(json!({})), r(false, false, true), "chat mode by default");
        assert_eq!(read(json!({"thinking": true})), r(true, false, true));
        // Either key true turns it on; present and falsy (null, 0, "") leave it off.
        assert!(read(json!({"thinking": false, "enable_thinking": 1})).thinking);
        assert!(!read(json!({"enable_thinking": null})).thinking);
        assert!(!read(json!({"thinking": ""})).thinking);
        assert_eq!(read(json!({"thinking": true, "reasoning_effort": "none"})), r(false, false, true));
        for max in ["max", "xhigh"] {
            assert!(read(json!({"reasoning_effort": max})).max_effort, "{max}");
        }
        for other in [json!("high"), json!("low"), json!("extreme"), json!(3)] {
            assert!(!read(json!({"reasoning_effort": other})).max_effort, "{other}");
        }
        assert!(!read(json!({"drop_thinking": false})).drop_thinking);
        assert!(!read(json!({"drop_thinking": 0})).drop_thinking);
        assert!(!read(json!({"drop_thinking": null})).drop_thinking);
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
        let untyped = json!([{"role": "assistant", "content": "", "tool_calls": [{"type": "code", "function": {}}]}]);
        assert!(err(untyped).contains("type 'function'"));
        let images = json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]);
        assert!(err(images).contains("only text content parts"));
        // A task is checked where its token would be written.
        let task = json!([{"role": "user", "content": "x", "task": "poem"}]);
        assert!(err(task).contains("invalid task \"poem\""));
    }
}
