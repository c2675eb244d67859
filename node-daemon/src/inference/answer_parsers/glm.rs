//! GLM's answer parsers as gonka's vLLM fork runs them under governance's arguments for
//! GLM-5.3-Flash: `--reasoning-parser glm45` (`DeepSeekV3ReasoningWithThinkingParser`: `<think>`
//! … `</think>` read out as reasoning while the request thinks, which it does unless its
//! `chat_template_kwargs` say `thinking`/`enable_thinking` false; everything content otherwise)
//! and `--tool-call-parser glm47` (`Glm47MoeModelToolParser`: `<tool_call>name<arg_key>k
//! </arg_key><arg_value>v</arg_value></tool_call>`, values typed by the tool's schema: text
//! for string parameters, else JSON or a Python literal).
//!
//! Streamed, a call's name goes out first and its arguments' JSON grows in pieces, diffed by
//! length as the fork diffs it. The fork's quirks are kept, because clients of the network see
//! them: a call without arguments (`<tool_call>f</tool_call>`) is only read whole, never
//! streamed, and nothing after it in the stream is; a streamed value that is not text may be
//! sent raw and its JSON never closed.

use gonka_inference::python_json::truthy;
use serde_json::Value;

use super::python_json::{self, PyJson, is_python_space, python_strip};
use super::python_literal::{self, Evaluated};
use super::{DeltaOut, FunctionCall, StreamedCall, THINK_END, THINK_START, ThinkTokens};

pub const TOOL_CALL_START: &str = "<tool_call>";
pub const TOOL_CALL_END: &str = "</tool_call>";
const ARG_KEY: &str = "<arg_key>";
const ARG_KEY_END: &str = "</arg_key>";
const ARG_VALUE: &str = "<arg_value>";
const ARG_VALUE_END: &str = "</arg_value>";

/// An exception the fork's parser does not catch (a value Python reads but `json.dumps` cannot
/// write, an unhashable key): a whole answer then keeps its text, a stream ends in an error.
#[derive(Debug, PartialEq, Eq)]
pub struct Raised(pub &'static str);

/// Whether a request thinks under `glm45`: unless `thinking` or `enable_thinking` is set (not
/// null), yes; else whether either is true.
pub fn thinks(kwargs: Option<&serde_json::Map<String, Value>>) -> bool {
    let get = |key: &str| kwargs.and_then(|k| k.get(key)).filter(|v| !v.is_null());
    match (get("thinking"), get("enable_thinking")) {
        (None, None) => true,
        (thinking, enable) => thinking.is_some_and(truthy) || enable.is_some_and(truthy),
    }
}

/// Python's `str.find`: the character index, or -1.
fn find(text: &[char], needle: &str) -> isize {
    let needle: Vec<char> = needle.chars().collect();
    if needle.is_empty() {
        return 0;
    }
    text.windows(needle.len()).position(|w| w == needle.as_slice()).map_or(-1, |i| i as isize)
}

/// Python's `text[start:end]` (negative indices from the end, clamped).
fn slice(text: &[char], start: isize, end: Option<isize>) -> String {
    let len = text.len() as isize;
    let clamp = |i: isize| if i < 0 { (len + i).max(0) } else { i.min(len) } as usize;
    let (from, to) = (clamp(start), end.map_or(text.len(), clamp));
    if from >= to { String::new() } else { text[from..to].iter().collect() }
}

/// The reasoning parser on a whole answer while thinking (`BaseThinkingReasoningParser`): the
/// reasoning, and the content after `</think>` (`None` when empty or not reached).
pub fn reasoning_whole(text: &str) -> (Option<String>, Option<String>) {
    let text = match text.split_once(THINK_START) {
        Some((_, after)) => after,
        None => text,
    };
    match text.split_once(THINK_END) {
        None => (Some(text.to_string()), None),
        Some((reasoning, content)) => (Some(reasoning.to_string()), (!content.is_empty()).then(|| content.to_string())),
    }
}

/// R1's reading of a stream (`glm45` while the request thinks).
impl ThinkTokens {
    /// A delta while thinking (`DeepSeekR1ReasoningParser.extract_reasoning_streaming` over its
    /// base's): reasoning, content, both, or nothing for a marker alone.
    pub fn stream(&self, previous_ids: &[i64], delta_ids: &[i64], delta_text: &str) -> Option<DeltaOut> {
        let chars: Vec<char> = delta_text.chars().collect();
        let reasoning = |text: &str| DeltaOut { reasoning: Some(text.to_string()), ..DeltaOut::default() };
        let content = |text: &str| DeltaOut::content(text);
        // Split at `</think>` (the fork finds its text; -1 where the text is not there).
        let split = |from: isize| {
            let end = find(&chars, THINK_END);
            let after = slice(&chars, end + THINK_END.chars().count() as isize, None);
            DeltaOut {
                reasoning: Some(slice(&chars, from, Some(end))),
                content: Some((!after.is_empty()).then_some(after)),
                tool_calls: None,
            }
        };
        if delta_ids.len() == 1 && (delta_ids[0] == self.start || delta_ids[0] == self.end) {
            return None;
        }
        let (start, end) = (self.start, self.end);
        Some(if previous_ids.contains(&start) || !delta_ids.contains(&start) {
            // `<think>` before this delta, or never seen (the chat template opened the thinking:
            // R1's reading, which is its base's for the former).
            if delta_ids.contains(&end) {
                split(0)
            } else if previous_ids.contains(&end) {
                content(delta_text)
            } else {
                reasoning(delta_text)
            }
        } else if delta_ids.contains(&end) {
            split(find(&chars, THINK_START) + THINK_START.chars().count() as isize)
        } else {
            reasoning(delta_text)
        })
    }

    /// The ids after `</think>` in a delta that ends the thinking (`extract_content_ids`): none
    /// unless `</think>` is before its last id.
    pub fn content_ids(&self, delta_ids: &[i64]) -> Vec<i64> {
        let head = &delta_ids[..delta_ids.len().saturating_sub(1)];
        match head.iter().position(|&id| id == self.end) {
            Some(at) => delta_ids[at + 1..].to_vec(),
            None => Vec::new(),
        }
    }
}

/// Whether `tool`'s parameter `name` is text alone (`_is_string_type`).
fn is_string_type(tools: &[Value], tool: &str, name: &str) -> bool {
    let function = tools.iter().map(|t| &t["function"]).find(|f| f["name"].as_str() == Some(tool));
    let Some(schema) = function.and_then(|f| f["parameters"]["properties"].get(name)) else { return false };
    let mut types = python_json::schema_types(schema);
    types.retain(|t| t != "null");
    !types.is_empty() && types.iter().all(|t| t == "string")
}

/// A value that is not text (`_deserialize`): JSON, else a Python literal, else the text.
fn deserialize(value: &str) -> Result<PyJson, Raised> {
    if let Some(json) = PyJson::loads(value) {
        return Ok(json);
    }
    match python_literal::literal_eval(value) {
        Evaluated::Value(literal) => literal.to_json().map_err(Raised),
        Evaluated::NotALiteral => Ok(PyJson::Str(value.to_string())),
        Evaluated::Raises(what) => Err(Raised(what)),
    }
}

/// Each `<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>` of `text`, left to right (a
/// key runs on to a later `</arg_key>` when no value follows the first, as the regex does).
fn arg_pairs(text: &str) -> Vec<(&str, &str)> {
    let mut out = Vec::new();
    let mut from = 0;
    'keys: while let Some(at) = text[from..].find(ARG_KEY).map(|i| from + i) {
        let key_start = at + ARG_KEY.len();
        let mut end_from = key_start;
        while let Some(key_end) = text[end_from..].find(ARG_KEY_END).map(|i| end_from + i) {
            let after = key_end + ARG_KEY_END.len();
            let value_open = after + text[after..].find(|c: char| !is_python_space(c)).unwrap_or(text.len() - after);
            if text[value_open..].starts_with(ARG_VALUE) {
                let value_start = value_open + ARG_VALUE.len();
                if let Some(value_end) = text[value_start..].find(ARG_VALUE_END).map(|i| value_start + i) {
                    out.push((&text[key_start..key_end], &text[value_start..value_end]));
                    from = value_end + ARG_VALUE_END.len();
                    continue 'keys;
                }
            }
            end_from = key_end + 1;
        }
        from = at + 1;
    }
    out
}

/// A `<tool_call>…</tool_call>` match's name and arguments' text (glm47's
/// `<tool_call>\s*(\S+?)\s*(<arg_key>.*)?</tool_call>`); `None` where it does not match.
fn call_detail(call: &str) -> Option<(&str, Option<&str>)> {
    let mut from = 0;
    while let Some(at) = call[from..].find(TOOL_CALL_START).map(|i| from + i) {
        let body = &call[at + TOOL_CALL_START.len()..];
        let name_start = body.find(|c: char| !is_python_space(c)).unwrap_or(body.len());
        let rest = &body[name_start..];
        // The shortest run of non-space characters after which the rest fits.
        for (i, c) in rest.char_indices() {
            if is_python_space(c) && i == 0 {
                break;
            }
            let end = i + c.len_utf8();
            let tail = &rest[end..];
            let tail = &tail[tail.find(|c: char| !is_python_space(c)).unwrap_or(tail.len())..];
            if tail.starts_with(ARG_KEY)
                && let Some(close) = tail.rfind(TOOL_CALL_END)
            {
                return Some((&rest[..end], Some(&tail[..close])));
            }
            if tail.starts_with(TOOL_CALL_END) {
                return Some((&rest[..end], None));
            }
            if rest[end..].starts_with(is_python_space) {
                break;
            }
        }
        from = at + 1;
    }
    None
}

/// The tool-call parser on a whole answer (`extract_tool_calls`): the calls and the text
/// before the first (`None` when blank); `None` when it calls nothing or the fork's parse
/// raised.
pub fn tool_calls(text: &str, tools: &[Value]) -> Option<(Vec<FunctionCall>, Option<String>)> {
    let mut calls = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(TOOL_CALL_START).map(|i| from + i) {
        let Some(end) = text[at..].find(TOOL_CALL_END).map(|i| at + i + TOOL_CALL_END.len()) else { break };
        from = end;
        let Some((name, args)) = call_detail(&text[at..end]) else { continue };
        let name = python_strip(name);
        let mut arguments = Vec::new();
        for (key, value) in args.map(arg_pairs).unwrap_or_default() {
            let key = python_strip(key);
            let value = if is_string_type(tools, name, key) {
                PyJson::Str(value.to_string())
            } else {
                deserialize(python_strip(value)).ok()?
            };
            arguments.push((key.to_string(), value));
        }
        calls.push(FunctionCall { name: name.to_string(), arguments: PyJson::object(arguments).dumps() });
    }
    if calls.is_empty() {
        return None;
    }
    let content = &text[..text.find(TOOL_CALL_START).expect("a call was read")];
    Some((calls, (!python_strip(content).is_empty()).then(|| content.to_string())))
}

/// How long a prefix of `tag` ends `text` (`partial_tag_overlap`; tags are ASCII).
fn partial_overlap(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1)).rev().find(|&k| text.ends_with(&tag[..k])).unwrap_or(0)
}

/// What the stream has sent of one call (`prev_tool_call_arr`, `streamed_args_for_tool`).
#[derive(Clone, Debug, Default)]
struct SentCall {
    name_sent: bool,
    /// The last arguments' text a diff was taken from (`None`: none yet).
    arguments: Option<String>,
    streamed: String,
}

/// The tool-call parser on a stream (`extract_tool_calls_streaming`): the text so far read again
/// at every delta, content outside the calls sent once, each call's name, then its
/// arguments' JSON as far as it can be written.
#[derive(Clone, Debug, Default)]
pub struct ToolCallStream {
    /// How far content has been sent (`_sent_content_idx`, in bytes of the text).
    content_sent: usize,
    ids: Vec<String>,
    calls: Vec<SentCall>,
}

impl ToolCallStream {
    /// Content not sent yet, outside the calls; a tail that may be a `<tool_call>` waits.
    fn content(&mut self, text: &str) -> Option<String> {
        let mut segments: Vec<&str> = Vec::new();
        let mut pos = self.content_sent;
        while pos < text.len() {
            let Some(start) = text[pos..].find(TOOL_CALL_START).map(|i| pos + i) else {
                let tail = &text[pos..];
                let overlap = partial_overlap(tail, TOOL_CALL_START);
                let sendable = &tail[..tail.len() - overlap];
                if !sendable.is_empty() {
                    segments.push(sendable);
                }
                pos = text.len() - overlap;
                break;
            };
            if start > pos {
                segments.push(&text[pos..start]);
            }
            match text[start..].find(TOOL_CALL_END) {
                Some(end) => pos = start + end + TOOL_CALL_END.len(),
                None => {
                    pos = start;
                    break;
                }
            }
        }
        if !segments.is_empty() {
            self.content_sent = pos;
            return Some(segments.concat());
        }
        self.content_sent = self.content_sent.max(pos);
        None
    }

    /// The arguments' JSON as far as it is known (`_build_args_json_so_far`).
    fn arguments_so_far(tools: &[Value], name: &str, inner: &str, complete: bool) -> Result<String, Raised> {
        let value_json = |key: &str, value: &str, strip: bool| -> Result<String, Raised> {
            Ok(if is_string_type(tools, name, key) {
                PyJson::Str(value.to_string()).dumps()
            } else {
                deserialize(if strip { python_strip(value) } else { value })?.dumps()
            })
        };
        let mut parts = Vec::new();
        for (key, value) in arg_pairs(inner) {
            let key = python_strip(key);
            parts.push(format!("{}: {}", PyJson::Str(key.to_string()).dumps(), value_json(key, value, true)?));
        }
        let last_open = inner.rfind(ARG_VALUE);
        let last_close = inner.rfind(ARG_VALUE_END);
        if let Some(open) = last_open.filter(|&o| last_close.is_none_or(|c| c < o)) {
            // The last key before the value still being written.
            let mut key = None;
            let mut from = 0;
            let head = &inner[..open];
            while let Some(at) = head[from..].find(ARG_KEY).map(|i| from + i) {
                let start = at + ARG_KEY.len();
                let Some(end) = head[start..].find(ARG_KEY_END).map(|i| start + i) else { break };
                key = Some(python_strip(&head[start..end]));
                from = end + ARG_KEY_END.len();
            }
            if let Some(key) = key {
                let mut partial = &inner[open + ARG_VALUE.len()..];
                partial = &partial[..partial.len() - partial_overlap(partial, ARG_VALUE_END)];
                let key_json = PyJson::Str(key.to_string()).dumps();
                if complete {
                    parts.push(format!("{key_json}: {}", value_json(key, partial, true)?));
                } else if is_string_type(tools, name, key) {
                    let escaped = PyJson::Str(partial.to_string()).dumps();
                    let escaped = if partial.is_empty() { "" } else { &escaped[1..escaped.len() - 1] };
                    parts.push(format!("{key_json}: \"{escaped}"));
                } else {
                    parts.push(format!("{key_json}: {partial}"));
                }
            }
        }
        if parts.is_empty() {
            return Ok(if complete { "{}".into() } else { String::new() });
        }
        Ok(format!("{{{}{}", parts.join(", "), if complete { "}" } else { "" }))
    }

    /// One delta (`current` is the text since the reasoning ended); `Err` where the fork's
    /// stream fails.
    pub fn next(&mut self, current: &str, delta_text: &str, tools: &[Value]) -> Result<Option<DeltaOut>, Raised> {
        if tools.is_empty() {
            return Ok((!delta_text.is_empty()).then(|| DeltaOut::content(delta_text)));
        }
        let content = self.content(current);
        let mut calls = Vec::new();
        let mut pos = 0;
        let mut index = 0;
        while let Some(start) = current[pos..].find(TOOL_CALL_START).map(|i| pos + i) {
            let inner_start = start + TOOL_CALL_START.len();
            let (inner, complete) = match current[inner_start..].find(TOOL_CALL_END) {
                Some(end) => {
                    pos = inner_start + end + TOOL_CALL_END.len();
                    (&current[inner_start..inner_start + end], true)
                }
                None => {
                    let raw = &current[inner_start..];
                    (&raw[..raw.len() - partial_overlap(raw, TOOL_CALL_END)], false)
                }
            };
            while self.ids.len() <= index {
                self.ids.push(format!("chatcmpl-tool-{}", uuid::Uuid::new_v4().simple()));
                self.calls.push(SentCall::default());
            }
            // The name: up to a line end or the first key.
            let cut = [inner.find('\n'), inner.find(ARG_KEY)].into_iter().flatten().min();
            let Some(name) = cut.map(|c| python_strip(&inner[..c])).filter(|n| !n.is_empty()) else { break };
            if !self.calls[index].name_sent {
                self.calls[index].name_sent = true;
                calls.push(StreamedCall {
                    index,
                    id: Some(self.ids[index].clone()),
                    name: Some(name.to_string()),
                    arguments: String::new(),
                });
            }
            let so_far = Self::arguments_so_far(tools, name, inner, complete)?;
            // Diffed by length, in characters (`_compute_args_diff`).
            let sent = &mut self.calls[index];
            let sent_chars = sent.streamed.chars().count();
            if !so_far.is_empty() && so_far.chars().count() > sent_chars {
                let diff: String = so_far.chars().skip(sent_chars).collect();
                sent.streamed = so_far.clone();
                sent.arguments = Some(so_far);
                calls.push(StreamedCall { index, id: None, name: None, arguments: diff });
            }
            index += 1;
            if !complete {
                break;
            }
        }
        if content.is_some() || !calls.is_empty() {
            return Ok(Some(DeltaOut { content: Some(content), reasoning: None, tool_calls: Some(calls) }));
        }
        Ok(None)
    }

    /// Arguments parsed but not sent, for the answer's last delta
    /// (`get_remaining_unstreamed_args`): of the last call seen, what its arguments (`{}` before
    /// any) add to what was sent.
    pub fn unsent_arguments(&self) -> String {
        let Some(last) = self.calls.last() else { return String::new() };
        let expected = last.arguments.clone().unwrap_or_else(|| "{}".into());
        expected.strip_prefix(last.streamed.as_str()).unwrap_or("").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn thinking_follows_the_template_arguments() {
        let kwargs = |v: Value| v.as_object().cloned();
        assert!(thinks(None));
        assert!(thinks(kwargs(json!({"thinking": null})).as_ref()));
        assert!(!thinks(kwargs(json!({"enable_thinking": false})).as_ref()));
        assert!(!thinks(kwargs(json!({"thinking": 0, "enable_thinking": ""})).as_ref()));
        assert!(thinks(kwargs(json!({"thinking": false, "enable_thinking": "yes"})).as_ref()));
    }

    #[test]
    fn call_details_match_glm47s_pattern() {
        assert_eq!(call_detail("<tool_call>f</tool_call>"), Some(("f", None)));
        assert_eq!(call_detail("<tool_call> f \n</tool_call>"), Some(("f", None)));
        assert_eq!(
            call_detail("<tool_call>f<arg_key>a</arg_key></tool_call>"),
            Some(("f", Some("<arg_key>a</arg_key>")))
        );
        assert_eq!(call_detail("<tool_call>get weather</tool_call>"), None);
        assert_eq!(call_detail("<tool_call></tool_call>"), None);
        assert_eq!(call_detail("<tool_call>a<tool_call>b</tool_call>"), Some(("a<tool_call>b", None)));
        assert_eq!(call_detail("<tool_call>a b<tool_call>c</tool_call>"), Some(("c", None)));
    }

    #[test]
    fn argument_pairs_match_the_regex() {
        assert_eq!(arg_pairs("<arg_key>a</arg_key> \n<arg_value>1</arg_value>"), [("a", "1")]);
        assert_eq!(
            arg_pairs("<arg_key>a</arg_key>x<arg_key>b</arg_key><arg_value>1</arg_value>"),
            [("a</arg_key>x<arg_key>b", "1")]
        );
        assert_eq!(arg_pairs("<arg_key>a</arg_key><arg_value>1"), Vec::<(&str, &str)>::new());
    }
}
