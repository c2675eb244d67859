//! A model directory's tokenizer (`tokenizer.json`, through the `tokenizers` crate) and chat
//! template (`chat_template.jinja`, or `tokenizer_config.json`'s `chat_template` as released
//! Qwen checkpoints carry it), rendered with minijinja the way transformers'
//! `apply_chat_template` renders with Jinja2: blocks trimmed, Python string methods, a
//! `raise_exception` function, `tojson` as Python's `json.dumps`. DeepSeek-V4 checkpoints take
//! their own encoding instead (`deepseek_v4_chat`), as vLLM's `--tokenizer-mode deepseek_v4`.

use std::path::Path;

use minijinja::value::Kwargs;
use minijinja::{Environment, Error as TemplateError, ErrorKind, Value as TemplateValue};
use serde_json::Value;

use crate::chat_template_reads::TemplateReads;
use crate::error::LoadError;
use crate::python_json::{Dumps, is_python_space, python_strip};

const TEMPLATE_NAME: &str = "chat";

pub struct ChatTokenizer {
    tokenizer: tokenizers::Tokenizer,
    chat: ChatFormat,
    /// Token ids that end a generation: `generation_config.json`'s `eos_token_id` (one or a
    /// list), else the tokenizer's `eos_token`.
    pub eos_token_ids: Vec<i64>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

/// How a model's chat messages become its prompt.
enum ChatFormat {
    /// Its Jinja template (boxed: the environment is large, and one is made per model), and
    /// what vLLM finds it reads of the messages.
    Template(Box<Environment<'static>>, TemplateReads),
    /// DeepSeek-V4's encoding (`config.json`'s `model_type` is `deepseek_v4`): what vLLM renders
    /// under `--tokenizer-mode deepseek_v4`, governance's setting for it, whatever template the
    /// checkpoint carries.
    DeepseekV4,
    /// None: chat is refused.
    None,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("this model has no chat template; use /v1/completions")]
    NoChatTemplate,
    #[error("chat template: {0}")]
    Template(String),
    #[error("chat encoding (deepseek_v4): {0}")]
    Encoding(String),
}

/// A special token in `tokenizer_config.json`: a string or `{"content": ...}`.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, LoadError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| LoadError::Json { path: path.to_path_buf(), source }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LoadError::Io { path: path.to_path_buf(), source }),
    }
}

impl ChatTokenizer {
    pub fn load(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| LoadError::Checkpoint { path: path.clone(), message: e.to_string() })?;
        let config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
        let template_file = dir.join("chat_template.jinja");
        let template = match std::fs::read_to_string(&template_file) {
            Ok(t) => Some(t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match config.get("chat_template") {
                Some(Value::String(t)) => Some(t.clone()),
                // Several named templates: the one called "default".
                Some(Value::Array(list)) => list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            },
            Err(source) => return Err(LoadError::Io { path: template_file, source }),
        };
        let env = template
            .map(|source| {
                let reads = TemplateReads::of(&source);
                let mut env = Environment::new();
                env.set_trim_blocks(true);
                env.set_lstrip_blocks(true);
                env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
                env.add_function("raise_exception", |message: String| -> Result<TemplateValue, TemplateError> {
                    Err(TemplateError::new(ErrorKind::InvalidOperation, message))
                });
                env.add_filter("tojson", python_json);
                env.add_template_owned(TEMPLATE_NAME, source).map(|_| (env, reads)).map_err(|e| LoadError::Checkpoint {
                    path: dir.join("chat_template.jinja"),
                    message: format!("chat template does not parse: {e}"),
                })
            })
            .transpose()?;
        let model_type = read_json(&dir.join("config.json"))?
            .and_then(|c| c.get("model_type").and_then(Value::as_str).map(str::to_string));
        let chat = match (model_type.as_deref(), env) {
            (Some("deepseek_v4"), _) => ChatFormat::DeepseekV4,
            (_, Some((env, reads))) => ChatFormat::Template(Box::new(env), reads),
            (_, None) => ChatFormat::None,
        };
        let bos_token = token_text(config.get("bos_token"));
        let eos_token = token_text(config.get("eos_token"));
        let mut eos_token_ids: Vec<i64> =
            match read_json(&dir.join("generation_config.json"))?.as_ref().and_then(|g| g.get("eos_token_id")) {
                Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
                Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_i64).collect(),
                _ => Vec::new(),
            };
        if eos_token_ids.is_empty()
            && let Some(id) = eos_token.as_deref().and_then(|t| tokenizer.token_to_id(t))
        {
            eos_token_ids.push(i64::from(id));
        }
        Ok(Self { tokenizer, chat, eos_token_ids, bos_token, eos_token })
    }

    /// The tokenizer's own end-of-sequence id (its config's `eos_token`, transformers'
    /// `eos_token_id`), else the first of the generation config's.
    pub fn eos_token_id(&self) -> Option<i64> {
        let own = self.eos_token.as_deref().and_then(|t| self.tokenizer.token_to_id(t)).map(i64::from);
        own.or_else(|| self.eos_token_ids.first().copied())
    }

    /// What the chat template reads of the messages (vLLM's content format and developer-role
    /// findings), which decides how a request's messages are handed to it.
    pub fn template_reads(&self) -> TemplateReads {
        match &self.chat {
            ChatFormat::Template(_, reads) => *reads,
            ChatFormat::DeepseekV4 | ChatFormat::None => TemplateReads::ENCODING,
        }
    }

    /// A token's id by its text (added tokens included), as vLLM's parsers look their markers up.
    pub fn token_id(&self, token: &str) -> Option<i64> {
        self.tokenizer.token_to_id(token).map(i64::from)
    }

    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>, TokenizeError> {
        let encoding =
            self.tokenizer.encode(text, add_special_tokens).map_err(|e| TokenizeError::Tokenizer(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String, TokenizeError> {
        let ids: Vec<u32> = ids.iter().map(|&id| u32::try_from(id).unwrap_or(u32::MAX)).collect();
        self.tokenizer.decode(&ids, skip_special_tokens).map_err(|e| TokenizeError::Tokenizer(e.to_string()))
    }

    /// The prompt text of `messages` (OpenAI-shaped objects), as transformers'
    /// `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)` renders it.
    pub fn apply_chat_template(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
    ) -> Result<String, TokenizeError> {
        self.apply_chat_template_with(messages, add_generation_prompt, tools, None)
    }

    /// [`Self::apply_chat_template`] with a request's `chat_template_kwargs`, which vLLM hands
    /// to the template as variables (Qwen3's `enable_thinking`) or to DeepSeek-V4's encoding
    /// (`thinking`, `reasoning_effort`, `drop_thinking`). They do not replace the messages,
    /// tools or special tokens. DeepSeek-V4's encoding always opens the assistant's turn.
    pub fn apply_chat_template_with(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizeError> {
        let env = match &self.chat {
            ChatFormat::Template(env, _) => env,
            ChatFormat::DeepseekV4 => {
                return crate::deepseek_v4_chat::encode(messages, tools, kwargs).map_err(TokenizeError::Encoding);
            }
            ChatFormat::None => return Err(TokenizeError::NoChatTemplate),
        };
        let template = env.get_template(TEMPLATE_NAME).map_err(|e| TokenizeError::Template(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                tools => tools,
                bos_token => self.bos_token,
                eos_token => self.eos_token,
                ..TemplateValue::from_serialize(kwargs.cloned().unwrap_or_default())
            })
            .map_err(|e| TokenizeError::Template(e.to_string()))
    }
}

impl ChatTokenizer {
    /// The prompt that carries on the last message instead of opening a new turn
    /// (`continue_final_message`), as transformers' `render_jinja_template` writes it: a tag
    /// after the last message's text (its last text part's), rendered without the generation
    /// prompt, and cut where the tag is (with the space the template trimmed, if it did).
    /// DeepSeek-V4's encoding has no such mode (vLLM's wrapper ignores the flag): its prompt is
    /// the usual one.
    pub fn continue_final_message(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        kwargs: Option<&serde_json::Map<String, Value>>,
    ) -> Result<String, TokenizeError> {
        const TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";
        let refused = |message: &str| Err(TokenizeError::Template(message.to_string()));
        let template = match &self.chat {
            ChatFormat::Template(env, _) => {
                env.get_template(TEMPLATE_NAME).map_err(|e| TokenizeError::Template(e.to_string()))?
            }
            ChatFormat::DeepseekV4 => return self.apply_chat_template_with(messages, true, tools, kwargs),
            ChatFormat::None => return Err(TokenizeError::NoChatTemplate),
        };
        let mut messages = messages.to_vec();
        let Some(last) = messages.last_mut() else {
            return refused("continue_final_message is set but the conversation is empty!");
        };
        let final_text = match last.get_mut("content") {
            None | Some(Value::Null) => {
                return refused("continue_final_message is set but the final message has no \"content\" to continue!");
            }
            _ if !template.source().contains("content") => {
                return refused(
                    "continue_final_message is set to \"content\" but this is not an accepted field in the chat_template",
                );
            }
            Some(Value::String(text)) => {
                let final_text = text.clone();
                text.push_str(TAG);
                final_text
            }
            Some(Value::Array(parts)) => {
                let Some(Value::String(text)) = parts.iter_mut().rev().find_map(|p| p.get_mut("text")) else {
                    return refused(
                        "continue_final_message is set but we could not find any text to continue in the final message!",
                    );
                };
                let final_text = text.clone();
                text.push_str(TAG);
                final_text
            }
            Some(_) => return refused("continue_final_message is set but the final message's content is not text"),
        };
        let rendered = self.apply_chat_template_with(&messages, false, tools, kwargs)?;
        let tag = TAG.trim_end();
        if !rendered.contains(python_strip(&final_text)) || !rendered.contains(tag) {
            return refused(
                "continue_final_message is set but the final message does not appear in the chat after applying the chat template!",
            );
        }
        let at = rendered.rfind(tag).expect("checked above");
        Ok(if rendered[at..].starts_with(TAG) {
            rendered[..at].to_string()
        } else {
            rendered[..at].trim_end_matches(is_python_space).to_string()
        })
    }
}

/// Incremental detokenisation (as vLLM and text-generation-inference do it): a piece is emitted
/// once the text of the newest ids, decoded with a little context before them, no longer ends
/// in a partial UTF-8 sequence, so multi-byte characters split over tokens come out whole.
#[derive(Debug, Clone, Default)]
pub struct TextStream {
    ids: Vec<i64>,
    prefix_offset: usize,
    read_offset: usize,
    skip_special_tokens: bool,
}

impl TextStream {
    pub fn new(skip_special_tokens: bool) -> Self {
        Self { skip_special_tokens, ..Self::default() }
    }

    /// Adds one id; returns the text it completes (often empty mid-character).
    pub fn push(&mut self, tokenizer: &ChatTokenizer, id: i64) -> Result<String, TokenizeError> {
        self.ids.push(id);
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
            let piece = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(piece)
        } else {
            Ok(String::new())
        }
    }

    /// The text held back at the end (an unfinished character, as U+FFFD as a whole decode
    /// renders it), when the generation ends.
    pub fn flush(&mut self, tokenizer: &ChatTokenizer) -> Result<String, TokenizeError> {
        let skip = self.skip_special_tokens;
        let prefix = tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset], skip)?;
        let full = tokenizer.decode(&self.ids[self.prefix_offset..], skip)?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(match full.strip_prefix(prefix.as_str()) {
            Some(rest) => rest.to_string(),
            None => String::new(),
        })
    }
}

/// transformers' `tojson` filter: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, its arguments given in that order or by name (MiniMax-M2's
/// and GLM's templates write `tojson(ensure_ascii=False)`).
fn python_json(value: TemplateValue, args: &[TemplateValue], kwargs: Kwargs) -> Result<TemplateValue, TemplateError> {
    const NAMES: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    let invalid = |message: String| TemplateError::new(ErrorKind::InvalidOperation, message);
    if args.len() > NAMES.len() {
        return Err(invalid(format!("tojson takes at most {} arguments", NAMES.len())));
    }
    let mut given = Vec::new();
    for (i, name) in NAMES.iter().enumerate() {
        let named: Option<TemplateValue> = kwargs.get(name)?;
        given.push(args.get(i).cloned().or(named).filter(|v| !v.is_none() && !v.is_undefined()));
    }
    kwargs.assert_all_used()?;
    let mut dumps = Dumps::default();
    if let Some(v) = &given[0] {
        dumps.ensure_ascii = v.is_true();
    }
    if let Some(v) = &given[1] {
        // An integer is that many spaces (none below one); text is used as it is.
        dumps.indent = Some(match v.as_str() {
            Some(text) => text.to_string(),
            None => " ".repeat(v.as_i64().ok_or_else(|| invalid(format!("tojson: indent {v}")))?.max(0) as usize),
        });
    }
    if let Some(v) = &given[2] {
        let pair: Vec<String> =
            v.try_iter().map_err(|_| invalid(format!("tojson: separators {v}")))?.map(|s| s.to_string()).collect();
        let [item, key] = <[String; 2]>::try_from(pair).map_err(|_| invalid(format!("tojson: separators {v}")))?;
        dumps.separators = Some((item, key));
    }
    if let Some(v) = &given[3] {
        dumps.sort_keys = v.is_true();
    }
    // The template value as JSON keeps its maps' order (Python's).
    let json = serde_json::to_value(&value).map_err(|e| invalid(e.to_string()))?;
    Ok(TemplateValue::from_safe_string(dumps.dumps(&json)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tojson_writes_what_python_writes() {
        let mut env = Environment::new();
        env.add_filter("tojson", python_json);
        let v = serde_json::json!({"name": "get_weather", "args": [1, "東京"]});
        let render =
            |call: &str| env.render_str(&format!("{{{{ v | {call} }}}}"), minijinja::context! {v => v}).unwrap();
        // Each as transformers' `tojson` (CPython's json.dumps) writes it.
        assert_eq!(render("tojson"), r#"{"name": "get_weather", "args": [1, "東京"]}"#);
        assert_eq!(render("tojson(ensure_ascii=False)"), r#"{"name": "get_weather", "args": [1, "東京"]}"#);
        assert_eq!(render("tojson(ensure_ascii=True)"), r#"{"name": "get_weather", "args": [1, "\u6771\u4eac"]}"#);
        assert_eq!(render("tojson(True)"), render("tojson(ensure_ascii=True)"), "the first argument is ensure_ascii");
        assert_eq!(
            render("tojson(indent=1, sort_keys=True)"),
            "{\n \"args\": [\n  1,\n  \"東京\"\n ],\n \"name\": \"get_weather\"\n}"
        );
        assert_eq!(render("tojson(separators=(',', ':'))"), r#"{"name":"get_weather","args":[1,"東京"]}"#);
        assert!(env.render_str("{{ v | tojson(colour=1) }}", minijinja::context! {v => v}).is_err());
    }
}
