//! MiniMax-M2's answer parsers as gonka's vLLM fork runs them under governance's arguments:
//! `--reasoning-parser minimax_m2_append_think` (`MiniMaxM2AppendThinkReasoningParser`: the
//! chat template opens the thinking in the prompt, so the answer's text gets `<think>` back in
//! front and stays content) and `--tool-call-parser minimax_m2` (`MinimaxM2ToolParser`: XML
//! calls, `<minimax:tool_call><invoke name="f"><parameter name="p">v</parameter></invoke>
//! </minimax:tool_call>`, each value coerced to its parameter's schema type).
//!
//! The fork's own quirks are kept, because clients of the network see them: a streamed answer
//! whose reasoning never closes streams its calls as text; calls are parsed whole, one delta per
//! `</invoke>`; text after the calls is not streamed.

use serde_json::Value;

use super::python_json::{self, Overflow, PyJson, python_strip};
use super::{DeltaOut, FunctionCall, StreamedCall, THINK_START};

pub const TOOL_CALL_START: &str = "<minimax:tool_call>";
pub const TOOL_CALL_END: &str = "</minimax:tool_call>";
const INVOKE_START: &str = "<invoke name=";
const INVOKE_END: &str = "</invoke>";
const PARAMETER_START: &str = "<parameter name=";
const PARAMETER_END: &str = "</parameter>";

/// The tool-call markers' ids (the fork refuses to start without them in the vocabulary).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ToolCallTokens {
    pub start: i64,
    pub end: i64,
}

/// The reasoning parser on a whole answer: no reasoning, the text with `<think>` before it.
pub fn append_think(text: &str) -> String {
    format!("{THINK_START}{text}")
}

/// Each `(.*?)` between `open` and `close` in `text`, left to right (`re.findall` with DOTALL).
fn between<'a>(text: &'a str, open: &str, close: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find(open) {
        let body = &rest[at + open.len()..];
        let Some(end) = body.find(close) else { break };
        out.push(&body[..end]);
        rest = &body[end + close.len()..];
    }
    out
}

/// The leading run of characters other than `>`, and what follows it (`^([^>]+)`); `None` when
/// `text` starts with `>` or is empty.
fn up_to_angle(text: &str) -> Option<(&str, &str)> {
    let end = text.find('>').unwrap_or(text.len());
    (end > 0).then(|| text.split_at(end))
}

/// A name without the quotes around it (`_extract_name`).
fn unquote(name: &str) -> &str {
    let name = python_strip(name);
    let quoted = |q: char| name.starts_with(q) && name.ends_with(q);
    if quoted('"') || quoted('\'') {
        // One quote alone is both its first and last character: Python's `[1:-1]` of it is "".
        if name.len() < 2 { "" } else { &name[1..name.len() - 1] }
    } else {
        name
    }
}

/// The schema of each parameter of tool `name` (`find_tool_properties`).
fn properties<'a>(tools: &'a [Value], name: &str) -> Option<&'a serde_json::Map<String, Value>> {
    let function = tools.iter().map(|t| &t["function"]).find(|f| f["name"].as_str() == Some(name))?;
    function["parameters"]["properties"].as_object()
}

/// One `<invoke name=…</invoke>` body (`_parse_single_invoke`): the call, or `None` without a
/// name; `Err` where the fork's coercion raises.
pub fn invoke(body: &str, tools: &[Value]) -> Result<Option<FunctionCall>, Overflow> {
    let Some((name, _)) = up_to_angle(body) else { return Ok(None) };
    let name = unquote(name);
    let schema = properties(tools, name);
    let mut parameters = Vec::new();
    for parameter in between(body, PARAMETER_START, PARAMETER_END) {
        // `^([^>]+)>(.*)`: a name, `>`, the value.
        let Some((parameter_name, value)) = up_to_angle(parameter) else { continue };
        let Some(value) = value.strip_prefix('>') else { continue };
        let parameter_name = unquote(parameter_name);
        // No schema for it: text, as the fork's `{}`.
        let types = python_json::schema_types(schema.and_then(|s| s.get(parameter_name)).unwrap_or(&Value::Null));
        parameters.push((parameter_name.to_string(), python_json::coerce(python_strip(value), &types)?));
    }
    Ok(Some(FunctionCall { name: name.to_string(), arguments: PyJson::object(parameters).dumps() }))
}

/// The tool-call parser on a whole answer (`extract_tool_calls`): the calls in its
/// `<minimax:tool_call>` blocks and the text before the first block (`None` when it starts
/// there); `None` when it calls nothing (or the fork's parse would have failed).
pub fn tool_calls(text: &str, tools: &[Value]) -> Option<(Vec<FunctionCall>, Option<String>)> {
    let first = text.find(TOOL_CALL_START)?;
    let mut calls = Vec::new();
    for block in between(text, TOOL_CALL_START, TOOL_CALL_END) {
        for body in between(block, INVOKE_START, INVOKE_END) {
            match invoke(body, tools) {
                Ok(Some(call)) => calls.push(call),
                Ok(None) => {}
                Err(Overflow) => return None,
            }
        }
    }
    if calls.is_empty() {
        return None;
    }
    Some((calls, (first > 0).then(|| text[..first].to_string())))
}

/// The tool-call parser on a stream (`extract_tool_calls_streaming`): text passes until the
/// calls start, then each `<invoke>` goes out whole once its `</invoke>` is in.
#[derive(Clone, Debug, Default)]
pub struct ToolCallStream {
    started: bool,
    /// Invokes of the text so far already read (`current_tool_index`).
    invokes_read: usize,
    /// Calls sent since the calls started (`prev_tool_call_arr`).
    calls_sent: usize,
}

impl ToolCallStream {
    /// One delta: `previous` and `current` are the text before and after it (since the
    /// reasoning ended).
    pub fn next(
        &mut self,
        tokens: ToolCallTokens,
        previous: &str,
        current: &str,
        delta_text: &str,
        delta_ids: &[i64],
        tools: &[Value],
    ) -> Option<DeltaOut> {
        let start_in_text = delta_text.contains(TOOL_CALL_START);
        let starting = start_in_text || delta_ids.contains(&tokens.start);
        // The fork starts over at a stream's first text and at every start marker (a second
        // block makes it read the first block's calls again, as it does).
        if previous.is_empty() || starting {
            self.invokes_read = 0;
            self.calls_sent = 0;
            self.started = starting;
        }
        if !self.started {
            return (!delta_text.is_empty()).then(|| DeltaOut::content(delta_text));
        }
        let before = start_in_text
            .then(|| &delta_text[..delta_text.find(TOOL_CALL_START).expect("contained")])
            .filter(|b| !b.is_empty());
        let invokes = between(current, INVOKE_START, INVOKE_END);
        let mut calls = Vec::new();
        while invokes.len() > self.invokes_read {
            let index = self.invokes_read;
            self.invokes_read += 1;
            match invoke(invokes[index], tools) {
                Ok(Some(call)) => {
                    self.calls_sent += 1;
                    calls.push(StreamedCall {
                        index,
                        id: Some(format!("call_{}", &random_hex()[..24])),
                        name: Some(call.name),
                        arguments: call.arguments,
                    });
                }
                Ok(None) => {}
                // The fork's stream fails here with the coercion's exception; this one leaves
                // the call out and goes on.
                Err(Overflow) => tracing::warn!("a tool call's number overflows an integer: left out"),
            }
        }
        if !calls.is_empty() || before.is_some() {
            return Some(DeltaOut {
                content: Some(before.map(str::to_string)),
                reasoning: None,
                tool_calls: Some(calls),
            });
        }
        // The end of the sequence after a call: an empty delta, so that the finish goes out.
        let eos_after_calls =
            delta_text.is_empty() && !delta_ids.is_empty() && self.calls_sent > 0 && !delta_ids.contains(&tokens.end);
        eos_after_calls.then(|| DeltaOut::content(""))
    }
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn invokes_read_names_and_values_as_the_fork_does() {
        let tools = [json!({"type": "function", "function": {"name": "f", "parameters": {"type": "object",
            "properties": {"n": {"type": "integer"}}}}})];
        let call = |body: &str| invoke(body, &tools).unwrap().map(|c| (c.name, c.arguments));
        let some = |n: &str, a: &str| Some((n.to_string(), a.to_string()));
        assert_eq!(call("\"f\">\n<parameter name=\"n\">\n 42 \n</parameter>"), some("f", "{\"n\": 42}"));
        assert_eq!(call("'f'><parameter name='n'>x</parameter>"), some("f", "{\"n\": \"x\"}"));
        assert_eq!(call("f><parameter name=n>1</parameter><parameter name=n>2</parameter>"), some("f", "{\"n\": 2}"));
        assert_eq!(call("\"g\"><parameter name=\"n\">7</parameter>"), some("g", "{\"n\": \"7\"}"), "no schema: text");
        assert_eq!(call("\"f\"><parameter name=\"n\"</parameter><parameter name=>1</parameter>"), some("f", "{}"));
        assert_eq!(call("\"\">"), some("", "{}"));
        assert_eq!(call("\">"), some("", "{}"), "one quote: Python's [1:-1] of it is empty");
        assert_eq!(call(">\"f\""), None);
        assert_eq!(call(""), None);
    }
}
