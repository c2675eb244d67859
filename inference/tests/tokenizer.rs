//! The engine's tokenizer and chat templates against transformers' for a tokenizer written by
//! `tests/reference/qwen_reference.py` (a byte-level BPE in Qwen's shape with ChatML specials):
//! ids, decoded text, rendered conversations, streaming detokenisation of multi-byte
//! characters, and the template as released Qwen checkpoints carry it (in
//! `tokenizer_config.json`).

mod common;

use common::run_reference;
use gonka_inference::tokenizer::{ChatTokenizer, TextStream, TokenizeError};
use serde_json::{Value, json};

const TEXTS: [&str; 6] = [
    "Hello, world! How are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "café naïve 東京 🚀 and some unseen words: zyxwvut",
    "  leading spaces\n\nand newlines\r\n",
    "<|im_start|>user\nspecial tokens inline<|im_end|>",
    "numbers 3.14159 and 1234567890",
];

fn chats() -> Value {
    json!([
        {"messages": [{"role": "user", "content": "Hi there"}], "add_generation_prompt": true},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  /think   What is 2+2? "},
                      {"role": "assistant", "content": "4"}, {"role": "user", "content": "東京?"}],
         "add_generation_prompt": false},
    ])
}

#[test]
fn tokenizer_and_chat_template_match_transformers() {
    let dir = tempfile::tempdir().unwrap();
    run_reference("qwen_reference.py", &json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1], "tokenizer": true}));
    let theirs = run_reference("tokenizer_reference.py", &json!({"dir": dir.path(), "texts": TEXTS, "chats": chats()}));
    let check = |ours: &ChatTokenizer| {
        for (i, text) in TEXTS.iter().enumerate() {
            let ids = ours.encode(text, false).unwrap();
            assert_eq!(json!(ids), theirs["encoded"][i], "ids of {text:?}");
            assert_eq!(ours.decode(&ids, false).unwrap(), theirs["decoded"][i].as_str().unwrap());
        }
        for (i, chat) in chats().as_array().unwrap().iter().enumerate() {
            let rendered = ours
                .apply_chat_template(
                    chat["messages"].as_array().unwrap(),
                    chat["add_generation_prompt"].as_bool().unwrap(),
                    None,
                )
                .unwrap();
            assert_eq!(rendered, theirs["chats"][i].as_str().unwrap(), "conversation {i}");
        }
    };
    let ours = ChatTokenizer::load(dir.path()).unwrap();
    check(&ours);
    // generation_config.json's list: <|im_end|> then <|endoftext|>.
    let im_end = ours.encode("<|im_end|>", false).unwrap();
    assert_eq!(ours.eos_token_ids.first(), im_end.first());
    assert_eq!(ours.eos_token_ids.len(), 2);

    // Streaming: pieces concatenate to the whole text, each a whole character sequence.
    let ids = ours.encode(TEXTS[2], false).unwrap();
    let mut stream = TextStream::new(false);
    let mut pieces = Vec::new();
    for id in &ids {
        pieces.push(stream.push(&ours, *id).unwrap());
    }
    assert_eq!(pieces.concat(), TEXTS[2]);
    assert!(pieces.iter().any(String::is_empty), "some ids end mid-character: {pieces:?}");

    // The template inside tokenizer_config.json, as released Qwen checkpoints have it.
    let template = std::fs::read_to_string(dir.path().join("chat_template.jinja")).unwrap();
    std::fs::remove_file(dir.path().join("chat_template.jinja")).unwrap();
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(template);
    std::fs::write(&config_path, config.to_string()).unwrap();
    check(&ChatTokenizer::load(dir.path()).unwrap());

    // No template at all: a clear refusal, and completions still tokenize.
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let bare = ChatTokenizer::load(dir.path()).unwrap();
    assert!(matches!(
        bare.apply_chat_template(&[json!({"role": "user", "content": "x"})], true, None),
        Err(TokenizeError::NoChatTemplate)
    ));
    assert!(!bare.encode("Hello", false).unwrap().is_empty());
}

#[test]
fn template_errors_are_reported_not_panicked() {
    let dir = tempfile::tempdir().unwrap();
    run_reference("qwen_reference.py", &json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1], "tokenizer": true}));
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        "{% if messages|length > 1 %}{{ raise_exception('Only one message is supported') }}{% endif %}{{ messages[0]['content'] }}",
    )
    .unwrap();
    let tok = ChatTokenizer::load(dir.path()).unwrap();
    let one = [json!({"role": "user", "content": "x"})];
    assert_eq!(tok.apply_chat_template(&one, false, None).unwrap(), "x");
    let err = tok.apply_chat_template(&[one[0].clone(), one[0].clone()], false, None).unwrap_err();
    assert!(err.to_string().contains("Only one message is supported"), "{err}");
    std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
    let err = ChatTokenizer::load(dir.path()).err().unwrap().to_string();
    assert!(err.contains("chat template does not parse"), "{err}");
}

/// Conversations that use what the released Qwen templates can do: a system turn and several
/// turns, tools with a call and two tool responses, non-ASCII, and (Qwen3) reasoning.
fn tool_chats() -> Value {
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]);
    json!([
        {"messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Weather in Paris?"}],
         "add_generation_prompt": true},
        {"messages": [{"role": "user", "content": "What's the weather in Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function":
                          {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
                      {"role": "tool", "content": "{\"temperature\": 21}"},
                      {"role": "tool", "content": "{\"sky\": \"clear\"}"},
                      {"role": "assistant", "content": "It is 21 °C and clear."},
                      {"role": "user", "content": "東京は?"}],
         "tools": tools, "add_generation_prompt": true},
        {"messages": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": "Paris?"}],
         "tools": tools, "add_generation_prompt": false},
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
                      {"role": "user", "content": "3+3?"}],
         "add_generation_prompt": true},
        // A request's chat_template_kwargs reach the template (Qwen3's `enable_thinking`).
        {"messages": [{"role": "user", "content": "2+2?"}], "add_generation_prompt": true,
         "kwargs": {"enable_thinking": false}},
    ])
}

/// The chat templates released checkpoints ship — Qwen2.5-Instruct's and Qwen3's
/// (`tests/reference/templates/`, from their tokenizer_config.json as public code quotes it) —
/// render as transformers renders them, with a request's `chat_template_kwargs` too (Qwen3's
/// `enable_thinking: false` writes an empty reasoning block; Qwen2.5's template ignores it).
#[test]
fn released_qwen_chat_templates_render_as_transformers_renders_them() {
    for name in ["qwen2.5-instruct", "qwen3"] {
        let dir = tempfile::tempdir().unwrap();
        run_reference(
            "qwen_reference.py",
            &json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1], "tokenizer": true}),
        );
        let template = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/reference/templates/{name}.jinja")),
        )
        .unwrap();
        std::fs::write(dir.path().join("chat_template.jinja"), &template).unwrap();
        let theirs = run_reference("tokenizer_reference.py", &json!({"dir": dir.path(), "chats": tool_chats()}));
        let ours = ChatTokenizer::load(dir.path()).unwrap();
        for (i, chat) in tool_chats().as_array().unwrap().iter().enumerate() {
            let rendered = ours
                .apply_chat_template_with(
                    chat["messages"].as_array().unwrap(),
                    chat["add_generation_prompt"].as_bool().unwrap(),
                    chat.get("tools"),
                    chat.get("kwargs").and_then(Value::as_object),
                )
                .unwrap_or_else(|e| panic!("{name}, conversation {i}: {e}"));
            assert_eq!(rendered, theirs["chats"][i].as_str().unwrap(), "{name}, conversation {i}");
        }
    }
}
