//! A chat request as the network's vLLM (0.25.1) hands it to the chat template, or to
//! DeepSeek-V4's encoding: the messages through its chat parser (`entrypoints/chat_utils.py`:
//! `parse_chat_messages`, `_postprocess_messages`), developer turns as system turns where the
//! template does not know the role (`renderers/hf.py`: `_convert_developer_to_system`,
//! `_consolidate_system_messages`), and the tools as its request model writes them back
//! (`ChatCompletionToolsParam.model_dump()`).
//!
//! Why it matters: a validator renders an executor's prompt with vLLM, and compares logprobs
//! over it, so the prompt must be the one vLLM renders, byte for byte. Handing a template the
//! client's messages as they came differs where vLLM does not: a tool call's arguments are an
//! object to the template (MiniMax-M2's and GLM's iterate them, and refuse text; Qwen's write
//! an object with `json.dumps`' spacing), a tool's function is written back with its
//! `description` and `parameters` in the model's order (null where missing), and a template that
//! loops over a message's content gets parts, not text. Pure: no engine, no I/O.

use gonka_inference::chat_template_reads::{ContentFormat, TemplateReads};
use gonka_inference::python_json::truthy;
use serde_json::{Map, Value, json};

/// The messages as vLLM's chat parser makes them for a template that reads them as `reads`
/// says.
pub fn messages(messages: Vec<Value>, reads: TemplateReads) -> Result<Vec<Value>, String> {
    let mut conversation = messages.iter().map(|m| message(m, reads.content)).collect::<Result<Vec<_>, _>>()?;
    for message in &mut conversation {
        parse_tool_call_arguments(message)?;
    }
    let has_developer = conversation.iter().any(|m| m["role"] == "developer");
    if has_developer && !reads.knows_developer {
        conversation = consolidate_system(conversation.into_iter().map(developer_as_system).collect());
    }
    Ok(conversation)
}

/// The request's tools as vLLM writes them back for the template: `type` and `function` first
/// (`defer_loading` where given), then anything else the client sent; in the function `name`,
/// `description` and `parameters` (null where left out), `strict` and `defer_loading` where
/// given, then the rest.
pub fn tools(tools: Option<&Value>) -> Result<Option<Value>, String> {
    let Some(tools) = tools.filter(|t| !t.is_null()) else { return Ok(None) };
    let list = tools.as_array().ok_or("`tools` must be a list of tools")?;
    list.iter().map(tool).collect::<Result<Vec<_>, _>>().map(|t| Some(Value::Array(t)))
}

fn tool(tool: &Value) -> Result<Value, String> {
    let fields = tool.as_object().ok_or("each of `tools` must be an object")?;
    if fields.get("type").is_some_and(|t| t != "function") {
        return Err("a tool's `type` must be \"function\"".into());
    }
    let function = fields.get("function").and_then(Value::as_object).ok_or("a tool without a `function`")?;
    let given = |map: &Map<String, Value>, key: &str| map.get(key).filter(|v| !v.is_null()).cloned();
    let tool_defer = given(fields, "defer_loading");
    let mut written = Map::new();
    let name = function.get("name").filter(|n| n.is_string()).ok_or("a tool's function without a `name`")?;
    written.insert("name".into(), name.clone());
    written.insert("description".into(), given(function, "description").unwrap_or(Value::Null));
    written.insert("parameters".into(), given(function, "parameters").unwrap_or(Value::Null));
    if let Some(strict) = given(function, "strict") {
        written.insert("strict".into(), strict);
    }
    if let Some(defer) = given(function, "defer_loading").or_else(|| tool_defer.clone()) {
        written.insert("defer_loading".into(), defer);
    }
    let declared = ["name", "description", "parameters", "strict", "defer_loading"];
    for (key, value) in function.iter().filter(|(k, _)| !declared.contains(&k.as_str())) {
        written.insert(key.clone(), value.clone());
    }
    let mut out = Map::new();
    out.insert("type".into(), json!("function"));
    out.insert("function".into(), Value::Object(written));
    if let Some(defer) = tool_defer {
        out.insert("defer_loading".into(), defer);
    }
    for (key, value) in fields.iter().filter(|(k, _)| !["type", "function", "defer_loading"].contains(&k.as_str())) {
        out.insert(key.clone(), value.clone());
    }
    Ok(Value::Object(out))
}

/// A content part's text (`None`: a text part without any, which vLLM skips).
fn part_text(part: &Value) -> Result<Option<String>, String> {
    let text = match part {
        Value::String(text) => return Ok(Some(text.clone())),
        Value::Object(fields) => match fields.get("type").and_then(Value::as_str) {
            Some("text" | "input_text" | "output_text") => fields.get("text"),
            Some("refusal") => fields.get("refusal"),
            Some("thinking") => fields.get("thinking"),
            _ => return Err("only text content parts are supported".into()),
        },
        _ => return Err("a content part must be text or an object".into()),
    };
    match text {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err("a content part's text must be a string".into()),
    }
}

/// One message as `_parse_chat_message_content` makes it.
fn message(message: &Value, format: ContentFormat) -> Result<Value, String> {
    let fields = message.as_object().ok_or("each message must be an object")?;
    let role =
        fields.get("role").and_then(Value::as_str).ok_or_else(|| format!("a message without a role: {message}"))?;
    let texts: Vec<String> = match fields.get("content") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(parts)) => {
            parts.iter().map(part_text).filter_map(Result::transpose).collect::<Result<_, _>>()?
        }
        Some(_) => return Err("a message's content must be text or a list of parts".into()),
    };
    let content = match format {
        ContentFormat::String => Value::String(texts.join("\n")),
        ContentFormat::OpenAi => texts.iter().map(|t| json!({"type": "text", "text": t})).collect(),
    };
    let mut out = Map::new();
    out.insert("role".into(), json!(role));
    out.insert("content".into(), content);
    match role {
        "assistant" => {
            if let Some(calls) = fields.get("tool_calls").filter(|c| !c.is_null()) {
                out.insert("tool_calls".into(), calls.clone());
            }
            if let Some(reasoning) = fields.get("reasoning").filter(|r| !r.is_null()) {
                out.insert("reasoning".into(), reasoning.clone());
                out.insert("reasoning_content".into(), reasoning.clone());
            }
        }
        "tool" => {
            if let Some(id) = fields.get("tool_call_id") {
                out.insert("tool_call_id".into(), id.clone());
            }
            // A tool result's text parts become text whatever the format.
            out.insert("content".into(), Value::String(texts.join("\n")));
        }
        _ => {}
    }
    for key in ["name", "task"] {
        if let Some(text) = fields.get(key).filter(|v| v.is_string()) {
            out.insert(key.into(), text.clone());
        }
    }
    if role == "developer" {
        out.insert("tools".into(), fields.get("tools").cloned().unwrap_or(Value::Null));
    }
    Ok(Value::Object(out))
}

/// An assistant turn's tool calls as templates expect them: arguments an object (JSON text
/// parsed; none, or JSON's null, an empty object); an empty list of calls left out.
fn parse_tool_call_arguments(message: &mut Value) -> Result<(), String> {
    if message["role"] != "assistant" {
        return Ok(());
    }
    let Some(Value::Array(calls)) = message.get_mut("tool_calls") else { return Ok(()) };
    if calls.is_empty() {
        message.as_object_mut().expect("an object").remove("tool_calls");
        return Ok(());
    }
    for call in calls {
        let Some(call) = call.as_object_mut() else {
            return Err("assistant tool_calls entries must be objects.".into());
        };
        let typed = call.get("type").is_none_or(|t| t == "function");
        let Some(function) = call.get_mut("function").and_then(Value::as_object_mut).filter(|_| typed) else {
            return Err("chat completions only support assistant tool_calls of type 'function'.".into());
        };
        let arguments = match function.get("arguments") {
            Some(given) if truthy(given) => match given {
                Value::Object(_) | Value::Array(_) => given.clone(),
                Value::String(text) => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Null) => json!({}),
                    Ok(parsed) => parsed,
                    Err(e) => return Err(format!("a tool call's arguments are not JSON: {e}")),
                },
                _ => return Err("a tool call's arguments must be JSON text".into()),
            },
            _ => json!({}),
        };
        function.insert("arguments".into(), arguments);
    }
    Ok(())
}

/// A developer turn as a system turn (without its tools).
fn developer_as_system(mut message: Value) -> Value {
    if message["role"] == "developer" {
        let fields = message.as_object_mut().expect("an object");
        fields.insert("role".into(), json!("system"));
        fields.remove("tools");
    }
    message
}

/// System turns merged into one at the start where there are several or one comes later
/// (their texts joined by a blank line, empty ones left out); otherwise the turns as they are.
fn consolidate_system(conversation: Vec<Value>) -> Vec<Value> {
    // (A second system turn is a later one.)
    let later_system = conversation.iter().skip(1).any(|m| m["role"] == "system");
    if !later_system {
        return conversation;
    }
    let mut texts = Vec::new();
    let mut others = Vec::new();
    for message in conversation {
        if message["role"] != "system" {
            others.push(message);
            continue;
        }
        let text = match &message["content"] {
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str).or(p.as_str()))
                .collect::<Vec<_>>()
                .join("\n"),
            Value::String(text) => text.clone(),
            _ => String::new(),
        };
        if !text.is_empty() {
            texts.push(text);
        }
    }
    let mut out = vec![json!({"role": "system", "content": texts.join("\n\n")})];
    out.extend(others);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRING: TemplateReads = TemplateReads { content: ContentFormat::String, knows_developer: true };

    /// The smaller rules; the whole is compared with vLLM 0.25.1's own functions in
    /// `tests/inference_api.rs`.
    #[test]
    fn arguments_become_objects_and_bad_calls_are_refused() {
        let call = |arguments: Value| {
            json!([{"role": "assistant", "content": null, "tool_calls": [
                {"id": "a", "type": "function", "function": {"name": "f", "arguments": arguments}}]}])
        };
        let arguments = |given: Value| {
            let out = messages(call(given).as_array().unwrap().clone(), STRING).unwrap();
            out[0]["tool_calls"][0]["function"]["arguments"].clone()
        };
        assert_eq!(arguments(json!("{\"b\": 1, \"a\": [2]}")), json!({"b": 1, "a": [2]}));
        assert_eq!(arguments(json!("")), json!({}));
        assert_eq!(arguments(json!("null")), json!({}));
        assert_eq!(arguments(Value::Null), json!({}));
        assert_eq!(arguments(json!({"x": 1})), json!({"x": 1}));
        let refused = |given: Value| messages(given.as_array().unwrap().clone(), STRING).unwrap_err();
        assert!(refused(call(json!("{not json"))).contains("not JSON"));
        let typed = json!([{"role": "assistant", "tool_calls": [{"type": "code", "function": {}}]}]);
        assert!(refused(typed).contains("type 'function'"));
        assert!(refused(json!([{"role": "assistant", "tool_calls": ["x"]}])).contains("must be objects"));
        let empty = messages(vec![json!({"role": "assistant", "content": "x", "tool_calls": []})], STRING).unwrap();
        assert_eq!(empty[0], json!({"role": "assistant", "content": "x"}), "no calls: left out");
        assert!(refused(json!([{"role": "user", "content": [{"type": "image_url"}]}])).contains("only text"));
    }

    #[test]
    fn tools_are_written_back_as_the_request_model_writes_them() {
        let given = json!([{"function": {"parameters": {"type": "object"}, "name": "f", "x": 1}, "type": "function"}]);
        assert_eq!(
            tools(Some(&given)).unwrap().unwrap().to_string(),
            json!([{"type": "function", "function": {"name": "f", "description": null,
                "parameters": {"type": "object"}, "x": 1}}])
            .to_string(),
            "declared fields first, null where left out, extras after"
        );
        assert_eq!(tools(None).unwrap(), None);
        assert!(tools(Some(&json!([{"type": "code", "function": {"name": "f"}}]))).is_err());
    }
}
