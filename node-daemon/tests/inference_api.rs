//! Inference through the daemon binary, as the network node and its users drive it: a tiny
//! Qwen3 (random weights and a small tokenizer, written by the inference crate's reference
//! script) brought up with `/api/v1/inference/up` from the models directory, served on the
//! inference port (health, models, chat and text completions whole and streamed, tokenize,
//! vLLM's errors), down again; and PoC v2 on it: generation with artifacts delivered to the
//! callback while chat is held off (503), validation of an honest and a tampered sample, queued
//! jobs with their callback.
#![cfg(feature = "torch")]

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use common::{Daemon, eventually};
use fake_nvml::Scenario;
use gonka_devnet::inference_validation as validation;
use gonka_inference::generate::greedy;
use gonka_inference::poc_v2::{self, Reflections, Round};
use gonka_inference::tokenizer::ChatTokenizer;
use gonka_inference::{LoadOptions, load};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL: &str = "Qwen/Tiny-Qwen3";
const BLOCK_HASH: &str = "00ab7f3c9e1d2b4a5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d";
const PUBLIC_KEY: &str = "gonka1testparticipantpublickey";

/// A models directory holding [`MODEL`] in the `<org>/<name>` layout.
fn models_dir() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(MODEL);
    gonka_e2e::write_tiny_qwen(&dir, "qwen3", json!({"seed": 3})).unwrap();
    (root, dir)
}

fn free_port() -> u16 {
    gonka_e2e::free_port().unwrap()
}

struct Node {
    daemon: Daemon,
    inference: String,
    http: reqwest::Client,
}

fn start(models: &Path) -> Node {
    start_with_env(models, &[])
}

/// [`start`], with more of the daemon's environment (its flags' variables).
fn start_with_env(models: &Path, extra: &[(&str, &str)]) -> Node {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut env = vec![("GONKA_MODELS_DIR", models.to_str().unwrap()), ("GONKA_INFERENCE_LISTEN", listen.as_str())];
    env.extend_from_slice(extra);
    let daemon = Daemon::start_with_env(&Scenario::hgx_h100(), &env);
    let _ = rustls::crypto::ring::default_provider().install_default();
    Node { daemon, inference: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new() }
}

impl Node {
    fn up(&self, model: &str, args: &[&str]) -> (u16, Value) {
        self.daemon.post_json(
            "POST",
            "/api/v1/inference/up",
            &json!({"model": model, "dtype": "auto", "additional_args": args}),
        )
    }

    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.http.get(format!("{}{path}", self.inference)).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, String) {
        let r = self.http.post(format!("{}{path}", self.inference)).json(body).send().await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    }

    async fn post_json(&self, path: &str, body: &Value) -> (u16, Value) {
        let (status, text) = self.post(path, body).await;
        (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
    }
}

/// What the engine-free path gives: the chat template, then greedy decoding (which matches
/// transformers: gonka-inference's reference tests).
fn expected_chat(dir: &Path, messages: &Value, max_tokens: usize) -> (String, usize, usize) {
    let tokenizer = ChatTokenizer::load(dir).unwrap();
    let model = load(dir, &LoadOptions::default()).unwrap();
    let text = tokenizer.apply_chat_template(messages.as_array().unwrap(), true, None).unwrap();
    let prompt = tokenizer.encode(&text, false).unwrap();
    let mut ids = greedy(&model, &prompt, max_tokens, &tokenizer.eos_token_ids);
    let completion_tokens = ids.len();
    ids.retain(|id| !tokenizer.eos_token_ids.contains(id));
    (tokenizer.decode(&ids, true).unwrap(), prompt.len(), completion_tokens)
}

/// The `data:` payloads of a server-sent-events body.
fn sse_data(body: &str) -> Vec<String> {
    body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

/// DeepSeek-V4's chat prompts against the network's vLLM (0.25.1) writing them: the cases and
/// texts `deepseek_v4_chat_reference.py` recorded from that version's own chat parser, tools
/// written back, tokenizer wrapper and encoding (`deepseek_v4_chat.json`). The engine writes the same text for each, or refuses
/// where vLLM does; through the daemon's `/tokenize` (the request's `tools` and
/// `chat_template_kwargs`) the ids are transformers' encoding of that text, as vLLM's wrapper
/// tokenises it; a request's `reasoning_effort` reaches the encoding as vLLM 0.25.1 hands it
/// on; a chat completion runs on it.
#[tokio::test(flavor = "multi_thread")]
async fn deepseek_v4_chat_prompts_are_the_network_vllms() {
    const V4: &str = "deepseek-ai/Tiny-DeepSeek-V4";
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(V4);
    // Long enough for the prompts with the most reasoning effort asked (504 tokens).
    gonka_e2e::write_tiny_qwen(&dir, "deepseek_v4", json!({"config": {"max_position_embeddings": 1024}})).unwrap();
    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/reference/deepseek_v4_chat.json");
    let cases: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(recorded).unwrap()).unwrap();
    assert!(cases.len() >= 30, "{} cases", cases.len());

    // The request as the daemon hands it on (vLLM's chat parser, the tools written back), then
    // the engine's encoding.
    let tokenizer = ChatTokenizer::load(&dir).unwrap();
    let render = |case: &Value| {
        use gonka_node_daemon::inference::conversation;
        let reads = tokenizer.template_reads();
        let messages = conversation::messages(case["messages"].as_array().unwrap().clone(), reads)?;
        let tools = conversation::tools(Some(&case["tools"]))?;
        let kwargs = case["kwargs"].as_object();
        tokenizer.apply_chat_template_with(&messages, true, tools.as_ref(), kwargs).map_err(|e| e.to_string())
    };
    let (served, refused): (Vec<&Value>, Vec<&Value>) = cases.iter().partition(|c| c.get("text").is_some());
    for case in &served {
        let text = render(case).unwrap_or_else(|e| panic!("{}: {e}", case["name"]));
        assert_eq!(text, case["text"].as_str().unwrap(), "{}", case["name"]);
    }
    assert_eq!(refused.len(), 2);
    for case in &refused {
        assert!(render(case).is_err(), "{} is refused by vLLM: {}", case["name"], case["error"]);
    }

    let texts: Vec<&Value> = served.iter().map(|c| &c["text"]).collect();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/reference/tokenizer_reference.py");
    let out = std::process::Command::new(gonka_e2e::python())
        .arg(script)
        .arg(json!({"dir": dir, "texts": texts}).to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let encoded = serde_json::from_slice::<Value>(&out.stdout).unwrap()["encoded"].clone();

    let node = start(root.path());
    assert_eq!(node.up(V4, &[]).0, 200);
    for (case, ids) in served.iter().zip(encoded.as_array().unwrap()) {
        let body =
            json!({"messages": case["messages"], "tools": case["tools"], "chat_template_kwargs": case["kwargs"]});
        let (status, tokens) = node.post_json("/tokenize", &body).await;
        assert_eq!((status, &tokens["tokens"]), (200, ids), "{}", case["name"]);
    }
    // A chat's `reasoning_effort` (vLLM 0.25.1's request field; `/tokenize` has none) reaches
    // the encoding, and unless the request's kwargs name `enable_thinking`, turns thinking on
    // for any effort but "none". The prompt's ids come back with `return_token_ids`.
    let position = |name: &str| served.iter().position(|c| c["name"] == name).unwrap();
    let earlier = &served[position("max effort")]["messages"];
    let effort = |effort: &str, kwargs: Value| {
        json!({"messages": earlier, "reasoning_effort": effort, "chat_template_kwargs": kwargs,
               "max_tokens": 1, "return_token_ids": true})
    };
    for (body, expected) in [
        (effort("max", json!({})), "max effort"),
        (effort("xhigh", json!({"drop_thinking": true})), "xhigh effort"),
        (effort("high", json!({})), "high effort"),
        (effort("none", json!({"thinking": true})), "effort none"),
        (effort("max", json!({"enable_thinking": false})), "max effort in chat mode"),
    ] {
        let (status, reply) = node.post_json("/v1/chat/completions", &body).await;
        assert_eq!((status, &reply["prompt_token_ids"]), (200, &encoded[position(expected)]), "{reply}");
    }
    let (status, reply) = node.post_json("/v1/chat/completions", &effort("extreme", json!({}))).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply["error"]["message"].as_str().unwrap().contains("reasoning_effort"), "{reply}");
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3});
    let (status, reply) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!((status, reply["usage"]["completion_tokens"].as_u64()), (200, Some(3)), "{reply}");
}

/// A chat request as the network's vLLM (0.25.1) hands it to a Jinja template, against what
/// its own functions made of the same requests (`chat_conversation.py` recorded
/// `chat_conversation.json`): the content format and developer role it finds in each template,
/// the messages through its chat parser in each format with and without developer turns made
/// system turns, the tools written back, and whole prompts rendered (a continued last message
/// among them); then through the daemon's `/tokenize` and a chat, the ids of those prompts, and
/// vLLM's refusals.
#[tokio::test(flavor = "multi_thread")]
async fn chat_requests_reach_templates_as_the_network_vllm_hands_them_on() {
    use gonka_inference::chat_template_reads::{ContentFormat, TemplateReads};
    use gonka_node_daemon::inference::conversation;

    let recorded = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/chat_conversation.json");
    let recorded: Value = serde_json::from_str(&std::fs::read_to_string(recorded).unwrap()).unwrap();
    assert_eq!(recorded["vllm"], "0.25.1");
    let format = |name: &Value| match name.as_str() {
        Some("openai") => ContentFormat::OpenAi,
        Some("string") => ContentFormat::String,
        other => panic!("{other:?}"),
    };
    let mut sources = BTreeMap::new();
    for template in recorded["templates"].as_array().unwrap() {
        let source = template["source"].as_str().unwrap();
        let expected = TemplateReads {
            content: format(&template["content_format"]),
            knows_developer: template["knows_developer"].as_bool().unwrap(),
        };
        assert_eq!(TemplateReads::of(source), expected, "{}", template["name"]);
        sources.insert(template["name"].as_str().unwrap().to_string(), source.to_string());
    }
    let mut seen_openai_and_developer = (false, false);
    for case in recorded["conversations"].as_array().unwrap() {
        let reads = TemplateReads {
            content: format(&case["reads"]["content"]),
            knows_developer: case["reads"]["knows_developer"].as_bool().unwrap(),
        };
        let what = format!("{} {reads:?}", case["name"]);
        let ours = conversation::messages(case["messages"].as_array().unwrap().clone(), reads);
        match case["conversation"].get("value") {
            // As text, so that the keys' order counts too.
            Some(theirs) => assert_eq!(Value::Array(ours.unwrap()).to_string(), theirs.to_string(), "{what}"),
            None => assert!(ours.is_err(), "{what}: vLLM refuses it: {}", case["conversation"]["error"]),
        }
        let tools = conversation::tools(Some(&case["tools"])).unwrap().unwrap_or(Value::Null);
        assert_eq!(tools.to_string(), case["tools_written"]["value"].to_string(), "{what}");
        seen_openai_and_developer.0 |= reads.content == ContentFormat::OpenAi;
        seen_openai_and_developer.1 |= !reads.knows_developer;
    }
    assert_eq!(seen_openai_and_developer, (true, true));

    // Whole prompts: each template in a model directory, the request through the daemon's
    // conversation and the engine's template.
    let root = tempfile::tempdir().unwrap();
    let conversations: BTreeMap<&str, &Value> =
        recorded["conversations"].as_array().unwrap().iter().map(|c| (c["name"].as_str().unwrap(), c)).collect();
    let mut texts = Vec::new();
    let mut requests = Vec::new();
    for prompt in recorded["prompts"].as_array().unwrap() {
        let template = prompt["template"].as_str().unwrap();
        let dir = root.path().join("templates").join(template);
        if !dir.exists() {
            gonka_e2e::write_tiny_qwen(&dir, "qwen3", json!({})).unwrap();
            std::fs::write(dir.join("chat_template.jinja"), &sources[template]).unwrap();
        }
        let tokenizer = ChatTokenizer::load(&dir).unwrap();
        let case = conversations[prompt["conversation"].as_str().unwrap()];
        let messages = conversation::messages(case["messages"].as_array().unwrap().clone(), tokenizer.template_reads());
        let tools = conversation::tools(Some(&case["tools"])).unwrap();
        let (messages, kwargs) = (messages.unwrap(), prompt["kwargs"].as_object());
        let text = if prompt["request"]["continue_final_message"] == true {
            tokenizer.continue_final_message(&messages, tools.as_ref(), kwargs)
        } else {
            let add_generation_prompt = prompt["request"]["add_generation_prompt"].as_bool().unwrap_or(true);
            tokenizer.apply_chat_template_with(&messages, add_generation_prompt, tools.as_ref(), kwargs)
        };
        let text = text.unwrap();
        let expected = prompt["text"]["value"].as_str().unwrap();
        assert_eq!(text, expected, "{template}: {}", prompt["conversation"]);
        texts.push(expected.to_string());
        let mut request = json!({"messages": case["messages"], "tools": case["tools"],
            "chat_template_kwargs": prompt["kwargs"]});
        request.as_object_mut().unwrap().extend(prompt["request"].as_object().unwrap().clone());
        requests.push((template.to_string(), request));
    }
    // Through the daemon: the template that loops over content parts, a tool history on it.
    let parts = root.path().join("templates/parts");
    let model = root.path().join("Org/Parts");
    std::fs::create_dir_all(model.parent().unwrap()).unwrap();
    std::fs::rename(&parts, &model).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../inference/tests/reference/tokenizer_reference.py");
    let on_parts: Vec<usize> = (0..requests.len()).filter(|&i| requests[i].0 == "parts").collect();
    let out = std::process::Command::new(gonka_e2e::python())
        .arg(script)
        .arg(json!({"dir": model, "texts": on_parts.iter().map(|&i| &texts[i]).collect::<Vec<_>>()}).to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let encoded = serde_json::from_slice::<Value>(&out.stdout).unwrap()["encoded"].clone();
    let node = start(root.path());
    assert_eq!(node.up("Org/Parts", &[]).0, 200);
    for (n, &i) in on_parts.iter().enumerate() {
        let body = &requests[i].1;
        let (status, tokens) = node.post_json("/tokenize", body).await;
        assert_eq!((status, &tokens["tokens"]), (200, &encoded[n]), "{body}");
    }
    // A continued message's prompt in a chat comes back with `return_token_ids`.
    let continued = on_parts.iter().position(|&i| requests[i].1["continue_final_message"] == true).unwrap();
    let mut chat = requests[on_parts[continued]].1.clone();
    chat.as_object_mut().unwrap().extend([("max_tokens".into(), json!(1)), ("return_token_ids".into(), json!(true))]);
    let (status, reply) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!((status, &reply["prompt_token_ids"]), (200, &encoded[continued]), "{reply}");
    // Refused as vLLM refuses them: both ends at once, and a template of the request's own.
    let messages = json!([{"role": "user", "content": "hi"}]);
    for bad in [
        json!({"messages": messages, "continue_final_message": true}),
        json!({"messages": messages, "chat_template": "{{ messages }}"}),
        json!({"messages": messages, "chat_template_kwargs": {"chat_template": "{{ messages }}"}}),
    ] {
        let (status, reply) = node.post_json("/v1/chat/completions", &bad).await;
        assert_eq!(status, 400, "{bad}: {reply}");
        let (status, reply) = node.post_json("/tokenize", &bad).await;
        assert_eq!(status, 400, "{bad}: {reply}");
    }
    // A call's arguments that are not JSON are refused, as vLLM refuses them.
    let bad = json!({"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "a", "type": "function",
        "function": {"name": "f", "arguments": "{not json"}}]}], "max_tokens": 1});
    let (status, reply) = node.post_json("/v1/chat/completions", &bad).await;
    assert_eq!(status, 400, "{reply}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_comes_up_serves_the_openai_api_and_goes_down() {
    let (_root, dir) = models_dir();
    let node = start(dir.parent().unwrap().parent().unwrap());
    let d = &node.daemon;
    assert_eq!(d.json("GET", "/api/v1/inference/up/status").1["status"], "not_started");
    assert_eq!(node.get("/health").await.0, 503);
    let (status, body) = node.get("/v1/models").await;
    assert_eq!(status, 503);
    assert!(body.contains("/api/v1/inference/up"), "{body}");

    // vLLM arguments this engine applies (the context length) and ones it leaves alone.
    let (status, body) = node.up(MODEL, &["--max-model-len", "128", "--tensor-parallel-size", "1"]);
    assert_eq!((status, &body), (200, &json!({"status": "OK"})));
    let (status, body) = node.up(MODEL, &[]);
    assert_eq!(status, 409);
    assert!(body["detail"].as_str().unwrap().contains("already running"), "{body}");
    let state = d.json("GET", "/api/v1/state").1;
    assert_eq!(state["state"], "INFERENCE");
    assert_eq!(state["loaded_model"], MODEL);
    assert_eq!(state["inference_healthy"], true);
    assert_eq!(state["poc_status"], "IDLE");
    let startup = d.json("GET", "/api/v1/inference/up/status").1;
    assert_eq!((startup["status"].as_str(), startup["is_running"].as_bool()), (Some("completed"), Some(true)));
    assert_eq!(node.get("/health").await.0, 200);
    let models: Value = serde_json::from_str(&node.get("/v1/models").await.1).unwrap();
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["max_model_len"], 128);
    // While inference runs, a PoC v1 request is refused as upstream refuses it.
    let (status, _) = d.post_json("POST", "/api/v1/pow/init/generate", &json!({}));
    assert_eq!(status, 409);

    // Chat: the greedy answer of the chat template's prompt, with usage.
    let messages = json!([{"role": "user", "content": "Hello, world! How are you today?"}]);
    let (text, prompt_tokens, completion_tokens) = expected_chat(&dir, &messages, 12);
    let (status, chat) = node
        .post_json(
            "/v1/chat/completions",
            &json!({"model": MODEL, "messages": messages, "max_tokens": 12, "temperature": 0}),
        )
        .await;
    assert_eq!(status, 200, "{chat}");
    assert_eq!(chat["object"], "chat.completion");
    assert!(chat["id"].as_str().unwrap().starts_with("chatcmpl-"));
    // As vLLM writes it without answer parsers: no reasoning, no tool calls.
    let message = json!({"role": "assistant", "content": text, "reasoning": null, "tool_calls": []});
    assert_eq!(chat["choices"][0]["message"], message);
    assert_eq!(chat["usage"]["prompt_tokens"], prompt_tokens);
    assert_eq!(chat["usage"]["completion_tokens"], completion_tokens);
    let finish = if completion_tokens == 12 { "length" } else { "stop" };
    assert_eq!(chat["choices"][0]["finish_reason"], finish);

    // The same, streamed: a role chunk, content chunks that add up to it, the finish, usage, [DONE].
    let (status, body) = node
        .post(
            "/v1/chat/completions",
            &json!({"messages": messages, "max_tokens": 12, "temperature": 0, "stream": true,
                    "stream_options": {"include_usage": true}}),
        )
        .await;
    assert_eq!(status, 200);
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"], json!({"role": "assistant", "content": ""}));
    let streamed: String =
        chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect::<Vec<_>>().concat();
    assert_eq!(streamed, text);
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let finished = chunks.iter().find(|c| !c["choices"][0]["finish_reason"].is_null()).expect("a finish chunk");
    assert_eq!(finished["choices"][0]["finish_reason"], finish);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    assert_eq!(usage["usage"]["completion_tokens"], completion_tokens);

    // Text completion: exactly max_tokens when end-of-sequence is ignored; a seed repeats.
    let body =
        json!({"prompt": "The quick brown fox", "max_tokens": 5, "ignore_eos": true, "temperature": 0.8, "seed": 11});
    let (status, first) = node.post_json("/v1/completions", &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "text_completion");
    assert_eq!(first["usage"]["completion_tokens"], 5);
    assert_eq!(first["choices"][0]["finish_reason"], "length");
    let (_, again) = node.post_json("/v1/completions", &body).await;
    assert_eq!(again["choices"][0]["text"], first["choices"][0]["text"]);
    // Streamed completions end with [DONE] too.
    let (_, body) = node.post("/v1/completions", &json!({"prompt": [5, 6, 7], "max_tokens": 3, "stream": true})).await;
    assert_eq!(sse_data(&body).last().map(String::as_str), Some("[DONE]"));

    // Tokenize: the chat template's tokens.
    let (status, tokens) = node.post_json("/tokenize", &json!({"messages": messages})).await;
    assert_eq!((status, tokens["count"].as_u64()), (200, Some(prompt_tokens as u64)));

    // vLLM's errors.
    let (status, err) =
        node.post_json("/v1/chat/completions", &json!({"model": "other/model", "messages": messages})).await;
    assert_eq!((status, err["error"]["type"].as_str()), (404, Some("NotFoundError")));
    assert!(err["error"]["message"].as_str().unwrap().contains("other/model"));
    let (status, err) = node.post_json("/v1/chat/completions", &json!({"messages": "not a list"})).await;
    assert_eq!((status, err["error"]["code"].as_u64()), (400, Some(400)));
    let (status, _) = node.post_json("/v1/chat/completions", &json!({"messages": messages, "n": 2})).await;
    assert_eq!(status, 400);
    // Tools need a tool-call parser, as vLLM started without --enable-auto-tool-choice says.
    let tools = json!([{"type": "function", "function": {"name": "get_time"}}]);
    let (status, err) = node.post_json("/v1/chat/completions", &json!({"messages": messages, "tools": tools})).await;
    assert_eq!(status, 400);
    assert_eq!(
        err["error"]["message"],
        "\"auto\" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set"
    );
    let without = json!({"messages": messages, "tools": tools, "tool_choice": "none", "max_tokens": 1});
    assert_eq!(node.post_json("/v1/chat/completions", &without).await.0, 200);
    let (status, err) = node.post_json("/v1/chat/completions", &json!({"messages": messages, "tools": []})).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("must not be an empty array"), "{err}");
    let long_prompt = vec![5; 200];
    let (status, err) = node.post_json("/v1/completions", &json!({"prompt": long_prompt})).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("128"), "{err}");

    // Down: nothing served, the state says so.
    assert_eq!(d.post_json("POST", "/api/v1/inference/down", &Value::Null), (200, json!({"status": "OK"})));
    assert_eq!(node.get("/health").await.0, 503);
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED");

    // A model that is not there: 500 naming where it was looked for, and the status says failed.
    let (status, body) = node.up("Qwen/Missing", &[]);
    assert_eq!(status, 500);
    assert!(body["detail"].as_str().unwrap().contains("not found under"), "{body}");
    let startup = d.json("GET", "/api/v1/inference/up/status").1;
    assert_eq!(startup["status"], "failed");
    assert!(startup["error"].as_str().unwrap().contains("Qwen/Missing"));
    // Async start: answered at once, then completed.
    let (status, body) = d.post_json("POST", "/api/v1/inference/up/async", &json!({"model": MODEL, "dtype": "auto"}));
    assert_eq!((status, body["status"].as_str()), (200, Some("starting")));
    eventually("the async start completes", || d.json("GET", "/api/v1/inference/up/status").1["status"] == "completed");
    // /stop stops inference too.
    d.post_json("POST", "/api/v1/stop", &Value::Null);
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED");
}

/// The network node's callback server for PoC v2: what it was sent, by kind.
#[derive(Default)]
struct Callbacks {
    generated: Mutex<Vec<Value>>,
    validated: Mutex<Vec<Value>>,
}

async fn callback_server() -> (Arc<Callbacks>, String) {
    let callbacks = Arc::new(Callbacks::default());
    let record = |kind: &'static str| {
        move |State(cb): State<Arc<Callbacks>>, axum::Json(body): axum::Json<Value>| async move {
            let list = if kind == "generated" { &cb.generated } else { &cb.validated };
            list.lock().unwrap().push(body);
        }
    };
    // The network node's path: /v2/poc-batches/{url-escaped model}.
    let app = Router::new()
        .route("/v2/poc-batches/{model}/generated", post(record("generated")))
        .route("/v2/poc-batches/{model}/validated", post(record("validated")))
        .with_state(callbacks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v2/poc-batches/Qwen%2FTiny-Qwen3", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (callbacks, url)
}

fn received_artifacts(callbacks: &Callbacks) -> BTreeMap<i64, String> {
    let generated = callbacks.generated.lock().unwrap();
    generated
        .iter()
        .flat_map(|batch| batch["artifacts"].as_array().unwrap().clone())
        .map(|a| (a["nonce"].as_i64().unwrap(), a["vector_b64"].as_str().unwrap().to_string()))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn poc_v2_generates_with_chat_held_off_and_validates() {
    let (_root, dir) = models_dir();
    let node = start(dir.parent().unwrap().parent().unwrap());
    let d = &node.daemon;
    // Without a model there is no backend, as upstream says.
    assert_eq!(d.json("GET", "/api/v1/inference/pow/status").1, json!({"status": "NO_BACKENDS", "backends": []}));
    assert_eq!(node.up(MODEL, &[]).0, 200);
    let (callbacks, url) = callback_server().await;
    let params = json!({"model": MODEL, "seq_len": 8});

    // The 2026 network node's init request: no batch_size, no k_dim.
    let init = json!({"block_hash": BLOCK_HASH, "block_height": 1200, "public_key": PUBLIC_KEY, "node_id": 1,
        "node_count": 2, "params": params, "url": url, "batch_size": 4});
    let (status, answer) = d.post_json("POST", "/api/v1/inference/pow/init/generate", &init);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        (answer["status"].as_str(), answer["backends"].as_u64(), answer["errors"].clone()),
        (Some("OK"), Some(1), Value::Null)
    );
    let (status, again) = d.post_json("POST", "/api/v1/inference/pow/init/generate", &init);
    assert_eq!(status, 502);
    assert!(again["detail"]["errors"][0]["error"].as_str().unwrap().contains("Already generating"), "{again}");
    assert_eq!(d.json("GET", "/api/v1/state").1["poc_status"], "GENERATING");
    let status = d.json("GET", "/api/v1/inference/pow/status").1;
    assert_eq!(status["status"], "GENERATING");
    assert_eq!(status["backends"][0]["config"]["node_id"], 1);

    // While the round generates, chat and completions are refused as upstream's gonka_poc
    // refuses them (the engine runs chat first: open chats would starve the round).
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4});
    let (status, refused) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 503, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("PoC round is generating"), "{refused}");
    let (status, refused) = node.post_json("/v1/completions", &json!({"prompt": "Hi", "max_tokens": 2})).await;
    assert_eq!(status, 503, "{refused}");

    // Artifacts reach the callback every 5 s.
    eventually("artifacts reach the network node", || received_artifacts(&callbacks).len() >= 8);
    let (status, stopped) = d.post_json("POST", "/api/v1/inference/pow/stop", &json!({}));
    assert_eq!(
        (status, stopped["status"].as_str(), stopped["results"][0]["status"].as_str()),
        (200, Some("OK"), Some("stopped"))
    );
    assert_eq!(d.json("GET", "/api/v1/inference/pow/status").1["status"], "IDLE");
    // Stopped, the ML node serves chat again at once.
    let (status, answered) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answered}");
    let batch = callbacks.generated.lock().unwrap()[0].clone();
    assert_eq!(batch["block_height"], 1200);
    assert_eq!(batch["node_id"], 1);
    assert_eq!(batch["encoding"], json!({"dtype": "f16", "k_dim": 12, "endian": "le"}));
    let received = received_artifacts(&callbacks);
    // This ML node's nonces only (node 1 of 2: the odd ones), from the first on.
    assert!(received.keys().all(|n| n % 2 == 1));
    assert!(received.contains_key(&1) && received.contains_key(&3));

    // They are the artifacts PoC v2 computes on this model.
    let model = load(&dir, &LoadOptions::default()).unwrap();
    let round = Round { block_hash: BLOCK_HASH, public_key: PUBLIC_KEY, seq_len: 8, k_dim: 12, stronger_rng: false };
    let direct = poc_v2::compute(&model, &Reflections::new(&model, BLOCK_HASH), &round, &[1, 3]);
    assert_eq!(received[&1], direct[0].vector_b64);
    assert_eq!(received[&3], direct[1].vector_b64);

    // Validation, as the validator's network node asks its own ML node (waiting for the answer).
    let sample: Vec<(i64, String)> = received.iter().take(8).map(|(n, v)| (*n, v.clone())).collect();
    let validate = |artifacts: Vec<(i64, String)>, wait: bool, url: Option<&str>| {
        json!({"block_hash": BLOCK_HASH, "block_height": 1200, "public_key": PUBLIC_KEY, "node_id": 0, "node_count": 2,
            "nonces": artifacts.iter().map(|(n, _)| n).collect::<Vec<_>>(), "params": params, "wait": wait, "url": url,
            "validation": {"artifacts": artifacts.iter().map(|(n, v)| json!({"nonce": n, "vector_b64": v})).collect::<Vec<_>>()},
            "stat_test": {"dist_threshold": 0.02, "p_mismatch": 0.001, "p_value_threshold": 0.05}})
    };
    let (status, honest) = d.post_json("POST", "/api/v1/inference/pow/generate", &validate(sample.clone(), true, None));
    assert_eq!(status, 200, "{honest}");
    assert_eq!(
        (honest["n_total"].as_u64(), honest["n_mismatch"].as_u64(), honest["fraud_detected"].as_bool()),
        (Some(8), Some(0), Some(false))
    );
    // Every vector replaced by another nonce's: all mismatch, fraud.
    let tampered: Vec<(i64, String)> =
        sample.iter().enumerate().map(|(i, (n, _))| (*n, sample[(i + 1) % sample.len()].1.clone())).collect();
    let (_, fraud) = d.post_json("POST", "/api/v1/inference/pow/generate", &validate(tampered.clone(), true, None));
    assert_eq!((fraud["n_mismatch"].as_u64(), fraud["fraud_detected"].as_bool()), (Some(8), Some(true)));
    assert!(fraud["p_value"].as_f64().unwrap() < 1e-10);

    // Queued: an id to poll, and the verdict posted to {url}/validated.
    let (status, queued) =
        d.post_json("POST", "/api/v1/inference/pow/generate", &validate(tampered, false, Some(&url)));
    assert_eq!((status, queued["status"].as_str()), (200, Some("queued")));
    let request_id = queued["request_id"].as_str().unwrap().to_string();
    assert!(request_id.contains(':'));
    eventually("the queued validation completes", || {
        d.json("GET", &format!("/api/v1/inference/pow/generate/{request_id}")).1["status"] == "completed"
    });
    eventually("the verdict reaches the network node", || !callbacks.validated.lock().unwrap().is_empty());
    let verdict = callbacks.validated.lock().unwrap()[0].clone();
    assert_eq!((verdict["n_mismatch"].as_u64(), verdict["fraud_detected"].as_bool()), (Some(8), Some(true)));
    assert_eq!(verdict["public_key"], PUBLIC_KEY);

    // Another model's params are refused as upstream's ML node relays its backend's 409.
    let (status, refused) = d.post_json(
        "POST",
        "/api/v1/inference/pow/generate",
        &json!({"block_hash": BLOCK_HASH, "block_height": 1, "public_key": PUBLIC_KEY, "node_id": 0, "node_count": 1,
            "nonces": [1], "params": {"model": "other/model", "seq_len": 8}, "wait": true}),
    );
    assert_eq!(status, 502);
    assert!(refused["detail"]["errors"][0]["error"].as_str().unwrap().contains("params mismatch"));
    let (status, _) = d.json("GET", "/api/v1/inference/pow/generate/not-a-composite-id");
    assert_eq!(status, 400);
    // A job of no nonces is refused: queued, it would be kept without counting against the
    // queue's bound.
    let (status, refused) = d.post_json(
        "POST",
        "/api/v1/inference/pow/generate",
        &json!({"block_hash": BLOCK_HASH, "block_height": 1, "public_key": PUBLIC_KEY, "node_id": 0, "node_count": 1,
            "nonces": [], "params": params, "wait": false}),
    );
    assert_eq!((status, refused["detail"].as_str()), (422, Some("nonces must not be empty")));
}

/// A GonkaNode's `modelStorage` reaches the daemon as daemon.json `modelsDir` and
/// `preloadModel`: the model comes up as the daemon starts, with its `models` args, and the
/// network node finds it serving.
/// An answer carries what the network's inference validation reads, as gonka's vLLM fork
/// writes it, and validators' replays of it pass. The executor's request is the one the 2026
/// network node makes of a user's (`gonka_devnet::inference_validation`: logprobs with top 5,
/// `min_tokens`, special tokens kept, token ids, a seed, here `processed_logprobs`, streamed
/// with usage); the replays are built from the streamed answer as the network node builds them
/// (`enforced_tokens`, whole) and judged with its similarity: on the same ML node and on
/// another, the same tokens and similarity 1 where the threshold is 0.9. An executor serving
/// another model is caught (below 0.9); tampered or raw logprobs score lower; a replay naming
/// an id outside the vocabulary is refused (400, which the network node takes as a pass) and
/// the engine goes on.
#[tokio::test(flavor = "multi_thread")]
async fn answers_carry_logprobs_and_validators_replays_pass() {
    let (_root, dir) = models_dir();
    let node = start(dir.parent().unwrap().parent().unwrap());
    assert_eq!(node.up(MODEL, &[]).0, 200);
    let messages = json!([{"role": "user", "content": "Kubernetes operators reconcile desired state."}]);
    // 110 tokens: the similarity divides by at least 100 positions, so an answer this long is
    // one another model's logprobs can fail. top_p 0.05 keeps a few tokens (this model is far
    // from decisive): processed logprobs show the ones cut at -9999.
    let user = json!({"model": MODEL, "messages": messages, "max_tokens": 110, "min_tokens": 110,
                      "temperature": 0.9, "top_p": 0.05, "stream": true});
    let mode = Some("processed_logprobs");
    let request = validation::executor_request(&user, 7, mode);
    let (status, body) = node.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let executed = validation::Answer::read(&body).unwrap();
    let events = sse_data(&body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let prompt_ids = chunks[0]["prompt_token_ids"].as_array().expect("the prompt's ids on the first event").clone();
    assert!(chunks[1..].iter().all(|c| c.get("prompt_token_ids").is_none()));
    // The role event carries no tokens, so no token ids (as vLLM leaves the field unset).
    assert_eq!((chunks[0]["choices"][0].get("token_ids"), &chunks[0]["choices"][0]["logprobs"]), (None, &Value::Null));
    let ids: Vec<i64> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["token_ids"].as_array())
        .flatten()
        .map(|t| t.as_i64().unwrap())
        .collect();
    assert_eq!(executed.completion_tokens, Some(110), "min_tokens holds the end off");
    assert_eq!(executed.prompt_tokens, Some(prompt_ids.len() as u64));
    let content = &executed.logprobs;
    assert_eq!((content.len(), ids.len()), (110, 110));
    let tokenizer = ChatTokenizer::load(&dir).unwrap();
    for (entry, id) in content.iter().zip(&ids) {
        // The fork's writing: the id in decimal, the token's text as bytes, the chosen token
        // first in a top list of five ids in decimal (their bytes the digits'), none below -9999.
        assert_eq!(entry["token"], id.to_string());
        let text = tokenizer.decode(&[*id], false).unwrap();
        assert_eq!(entry["bytes"], json!(text.as_bytes()));
        let top = entry["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 5);
        assert_eq!((&top[0]["token"], &top[0]["logprob"]), (&entry["token"], &entry["logprob"]));
        for t in top {
            let token = t["token"].as_str().unwrap();
            assert!(token.parse::<u32>().is_ok() && t["bytes"] == json!(token.as_bytes()), "{t}");
            assert!(t["logprob"].as_f64().unwrap() >= -9999.0);
        }
    }
    assert!(content.iter().flat_map(|e| e["top_logprobs"].as_array().unwrap()).any(|t| t["logprob"] == -9999.0));

    // The validator's replay, on the same ML node, at the network node's other seed.
    let replay = validation::validation_request(&user, &executed, 12345, mode);
    let (status, validated) = node.post_json("/v1/chat/completions", &replay).await;
    assert_eq!(status, 200, "{validated}");
    assert_eq!(validated["choices"][0]["token_ids"], json!(ids));
    assert_eq!(validated["prompt_token_ids"], json!(prompt_ids));
    let replayed = validation::Answer::read(&validated.to_string()).unwrap();
    let verdict = validation::judge(&executed, &replayed);
    assert!(matches!(verdict, validation::Verdict::Similarity(s) if s > 0.9999), "{verdict:?}");
    // The same replay without logprobs_mode reads the executor's from its padded top lists.
    let mut unnamed = replay.clone();
    unnamed.as_object_mut().unwrap().remove("logprobs_mode");
    let (_, again) = node.post_json("/v1/chat/completions", &unnamed).await;
    assert_eq!(validation::judge(&executed, &validation::Answer::read(&again.to_string()).unwrap()), verdict);
    // Raw logprobs (no cut) against the executor's processed ones: a different distribution.
    let (_, raw) = node
        .post_json("/v1/chat/completions", &validation::validation_request(&user, &executed, 1, Some("raw_logprobs")))
        .await;
    let raw = validation::judge(&executed, &validation::Answer::read(&raw.to_string()).unwrap());
    assert!(
        matches!((&raw, &verdict), (validation::Verdict::Similarity(r), validation::Verdict::Similarity(s)) if r < s),
        "{raw:?}"
    );
    // An executor that reports another distribution (every kept token's logprob 5 lower).
    let mut tampered = executed.clone();
    for entry in &mut tampered.logprobs {
        for t in entry["top_logprobs"].as_array_mut().unwrap() {
            if t["logprob"].as_f64().unwrap() > -9999.0 {
                t["logprob"] = json!(t["logprob"].as_f64().unwrap() - 5.0);
            }
        }
    }
    assert!(!validation::judge(&tampered, &replayed).is_valid());

    // Another ML node with the same model validates it too; one serving another model (the
    // same architecture, other weights) as executor is caught by it.
    let (_other_root, other_dir) = models_dir();
    let validator = start(other_dir.parent().unwrap().parent().unwrap());
    assert_eq!(validator.up(MODEL, &[]).0, 200);
    let (_, elsewhere) = validator.post_json("/v1/chat/completions", &replay).await;
    let elsewhere = validation::judge(&executed, &validation::Answer::read(&elsewhere.to_string()).unwrap());
    assert!(elsewhere.is_valid(), "{elsewhere:?}");
    let cheap_root = tempfile::tempdir().unwrap();
    gonka_e2e::write_tiny_qwen(&cheap_root.path().join(MODEL), "qwen3", json!({"seed": 4})).unwrap();
    let cheat = start(cheap_root.path());
    assert_eq!(cheat.up(MODEL, &[]).0, 200);
    let (_, body) = cheat.post("/v1/chat/completions", &request).await;
    let cheated = validation::Answer::read(&body).unwrap();
    let (_, caught) =
        validator.post_json("/v1/chat/completions", &validation::validation_request(&user, &cheated, 9, mode)).await;
    let caught = validation::judge(&cheated, &validation::Answer::read(&caught.to_string()).unwrap());
    assert!(matches!(caught, validation::Verdict::Similarity(s) if s < validation::THRESHOLD), "{caught:?}");

    // Ids outside the vocabulary: the fork's refusal; the engine serves on.
    let mut bad = replay.clone();
    bad["enforced_tokens"]["tokens"][3]["token"] = json!("99999999");
    let (status, err) = node.post_json("/v1/chat/completions", &bad).await;
    assert_eq!(status, 400);
    let message = err["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("invalid enforced token at position 3: 99999999 not in [0, "), "{err}");
    let (status, err) = node.post_json("/v1/chat/completions", &json!({"messages": messages, "top_logprobs": 3})).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("`logprobs` must be set to true"), "{err}");
    let (status, plain) = node.post_json("/v1/chat/completions", &json!({"messages": messages, "max_tokens": 3})).await;
    assert_eq!(status, 200);
    assert_eq!((&plain["choices"][0]["logprobs"], plain["choices"][0].get("token_ids")), (&Value::Null, None));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_preloaded_model_serves_from_the_configured_models_dir() {
    let (_root, dir) = models_dir();
    let models = dir.parent().unwrap().parent().unwrap();
    let port = free_port();
    let config = json!({
        "gonkaNode": "gpu/h100", "mlCallbackUrl": "http://127.0.0.1:9", "pocPort": 8080, "inferencePort": port,
        "gpus": 8, "models": [{"id": MODEL, "args": ["--max-model-len", "64"]}],
        "modelsDir": models, "preloadModel": MODEL,
        "poc": {"batchSize": 4, "sendIntervalSeconds": 5, "maxPendingBatches": 100}
    });
    let listen = format!("127.0.0.1:{port}");
    let d = Daemon::start_configured_with_env(&Scenario::hgx_h100(), &config, &[("GONKA_INFERENCE_LISTEN", &listen)]);
    eventually("the preloaded model serves", || d.json("GET", "/api/v1/state").1["loaded_model"] == MODEL);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let models: Value = reqwest::get(format!("http://{listen}/v1/models")).await.unwrap().json().await.unwrap();
    assert_eq!(
        (models["data"][0]["id"].as_str(), models["data"][0]["max_model_len"].as_i64()),
        (Some(MODEL), Some(64))
    );
    // The network node's own /inference/up finds it running (409, as upstream answers).
    let (status, _) = d.post_json("POST", "/api/v1/inference/up", &json!({"model": MODEL, "dtype": "auto"}));
    assert_eq!(status, 409);
}

/// The native engine within its bounds: a KV cache that cannot hold one sequence of the model's
/// length is refused at start-up (vLLM's rule, naming the flags), stop lists are bounded, and
/// the port takes one request at a time when told so (`--inference-max-in-flight 1`). (The body
/// timeout and budget are tested on the middleware itself, `inference::port_bounds`.)
#[tokio::test(flavor = "multi_thread")]
async fn the_inference_port_and_the_engine_stay_within_their_bounds() {
    let (_root, dir) = models_dir();
    let node = start_with_env(dir.parent().unwrap().parent().unwrap(), &[("GONKA_INFERENCE_MAX_IN_FLIGHT", "1")]);

    // The tiny model's keys and values: 2 × layers × kv_heads × head_dim × 4 bytes a token.
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let per_token = 2
        * config["num_hidden_layers"].as_u64().unwrap()
        * config["num_key_value_heads"].as_u64().unwrap()
        * config["head_dim"].as_u64().unwrap()
        * 4;
    let too_small = (128 * per_token - 1).to_string();
    let (status, refused) = node.up(MODEL, &["--max-model-len", "128", "--kv-cache-memory-bytes", &too_small]);
    assert_eq!(status, 500, "{refused}");
    let detail = refused["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("one sequence of the maximum model length (128 tokens) needs")
            && detail.contains("lower --max-model-len, or raise --gpu-memory-utilization or --kv-cache-memory-bytes"),
        "{detail}"
    );
    let exact = (128 * per_token).to_string();
    let (status, body) = node.up(MODEL, &["--max-model-len", "128", "--kv-cache-memory-bytes", &exact]);
    assert_eq!(status, 200, "{body}");

    // Room for one sequence of 128 tokens: a request with a 128-token budget is served.
    let chat = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0});
    let (status, answer) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}");

    // Stop lists are scanned at every token: bounded, at the limit served.
    let stops = |n: usize, len: usize| {
        (0..n).map(|i| format!("{}{}", (b'a' + i as u8) as char, "s".repeat(len - 1))).collect::<Vec<_>>()
    };
    let (status, answer) = node
        .post_json(
            "/v1/chat/completions",
            &json!({"messages": chat["messages"], "max_tokens": 2, "stop": stops(16, 256)}),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    for bad in [json!({"stop": stops(17, 8)}), json!({"stop": stops(1, 257)}), json!({"stop_token_ids": vec![1; 1025]})]
    {
        let mut request = json!({"messages": chat["messages"], "max_tokens": 2});
        request.as_object_mut().unwrap().extend(bad.as_object().unwrap().clone());
        let (status, answer) = node.post_json("/v1/chat/completions", &request).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"]["message"].as_str().unwrap().contains("at most"), "{answer}");
    }

    let (status, answer) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}");

    // One slot. A client that sent its headers and holds back its body holds it (the gauge
    // says so); a request meanwhile is refused (429) and counted.
    let metric = |name: &str| node.daemon.metric(name).unwrap_or_else(|| panic!("{name} not in /metrics"));
    assert_eq!(metric("gonka_ml_node_inference_requests_in_flight"), 0.0);
    let body = serde_json::to_vec(&chat).unwrap();
    let addr = node.inference.trim_start_matches("http://").to_string();
    let mut held = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    held.write_all(head.as_bytes()).await.unwrap();
    eventually("the held request takes the slot", || metric("gonka_ml_node_inference_requests_in_flight") == 1.0);
    let (status, refused) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 429, "{refused}");
    assert!(refused["error"]["message"].as_str().unwrap().contains("1 requests are in flight"), "{refused}");
    assert_eq!(metric("gonka_ml_node_inference_requests_refused_total{reason=\"in_flight\"}"), 1.0);
    // The held request's body comes: it is answered, and its slot is free again.
    held.write_all(&body).await.unwrap();
    let mut response = Vec::new();
    held.read_to_end(&mut response).await.unwrap();
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    eventually("the slot is given back", || metric("gonka_ml_node_inference_requests_in_flight") == 0.0);
    let (status, answer) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{answer}");
}

/// MiniMax-M2 under governance's arguments (`--enable-auto-tool-choice --tool-call-parser
/// minimax_m2 --reasoning-parser minimax_m2_append_think`) on the native engine: a tiny
/// MiniMax-M2 whose tokenizer has the model's markers, its answer forced (`enforced_str`) to a
/// thought and a tool call, comes back as gonka's vLLM fork serves it — `<think>` restored in
/// front of the content, the call read out with its arguments coerced to the tool's schema,
/// `finish_reason` `tool_calls`; streamed, the content in pieces and the call whole in one
/// delta, and with `return_token_ids` every token (and its logprobs) still in the stream, as
/// the network node's validation needs. Without tools the text stays content; choices the
/// native engine cannot meet are refused; with a tool-call parser it lacks (`hermes`), tools
/// are taken and the answer comes back as the model wrote it.
#[tokio::test(flavor = "multi_thread")]
async fn minimax_m2_answers_are_parsed_as_the_networks_vllm_parses_them() {
    const M2: &str = "MiniMaxAI/Tiny-MiniMax-M2";
    let root = tempfile::tempdir().unwrap();
    let markers = ["<think>", "</think>", "<minimax:tool_call>", "</minimax:tool_call>"];
    gonka_e2e::write_tiny_qwen(&root.path().join(M2), "minimax_m2", json!({"added_tokens": markers})).unwrap();
    let node = start(root.path());
    let governance = [
        "--enable-auto-tool-choice",
        "--tool-call-parser",
        "minimax_m2",
        "--reasoning-parser",
        "minimax_m2_append_think",
    ];
    let (status, body) = node.up(M2, &governance);
    assert_eq!(status, 200, "{body}");

    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]);
    let thought = "Ok.</think>\n";
    let answer = format!(
        "{thought}<minimax:tool_call><invoke name=\"get_weather\"><parameter name=\"city\"> Oslo </parameter>\
         <parameter name=\"days\">3</parameter></invoke></minimax:tool_call>"
    );
    let messages = json!([{"role": "user", "content": "Weather in Oslo?"}]);
    let chat = json!({"messages": messages, "tools": tools, "enforced_str": answer, "temperature": 0});
    let (status, whole) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole}");
    let choice = &whole["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{whole}");
    let message = &choice["message"];
    assert_eq!((&message["content"], &message["reasoning"]), (&json!(format!("<think>{thought}")), &Value::Null));
    let calls = message["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{message}");
    let id = calls[0]["id"].as_str().unwrap();
    assert!(id.len() == 46 && id.starts_with("chatcmpl-tool-"), "{id}");
    assert_eq!(calls[0]["type"], "function");
    assert_eq!(calls[0]["function"], json!({"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"days\": 3}"}));

    // Streamed: the content in pieces, then the call whole in one delta with a call_ id.
    let stream = |extra: Value| {
        let mut body = chat.clone();
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        body["stream"] = json!(true);
        body
    };
    let (status, body) = node.post("/v1/chat/completions", &stream(json!({}))).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let content: String = deltas[1..].iter().filter_map(|d| d["content"].as_str()).collect();
    assert_eq!(content, format!("<think>{thought}"), "{body}");
    let streamed_calls: Vec<&Value> = deltas.iter().filter_map(|d| d["tool_calls"].as_array()).flatten().collect();
    assert_eq!(streamed_calls.len(), 1, "{body}");
    let call = streamed_calls[0];
    let id = call["id"].as_str().unwrap();
    assert!(id.len() == 29 && id.starts_with("call_"), "{id}");
    assert_eq!((&call["index"], &call["type"]), (&json!(0), &json!("function")));
    assert_eq!(call["function"], calls[0]["function"]);
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));
    // Without token ids, the call's markup sends no events: far fewer than the tokens.
    let completion_tokens = whole["usage"]["completion_tokens"].as_u64().unwrap() as usize;
    assert!(chunks.len() < completion_tokens / 2, "{} events for {completion_tokens} tokens", chunks.len());

    // With token ids and logprobs (as the network node asks), every token is in the stream.
    let (status, body) =
        node.post("/v1/chat/completions", &stream(json!({"return_token_ids": true, "logprobs": true}))).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let ids: Vec<&Value> = chunks.iter().filter_map(|c| c["choices"][0]["token_ids"].as_array()).flatten().collect();
    let logprobs: usize =
        chunks.iter().filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array()).map(Vec::len).sum();
    assert_eq!((ids.len(), logprobs), (completion_tokens, completion_tokens), "{body}");
    let tokenizer = ChatTokenizer::load(&root.path().join(M2)).unwrap();
    let mut forced = tokenizer.encode(&answer, false).unwrap();
    forced.push(tokenizer.eos_token_id().unwrap());
    assert_eq!(json!(ids), json!(forced));
    assert!(chunks.iter().any(|c| c["choices"][0]["delta"] == json!({})), "events the parser holds are sent empty");

    // No tools: nothing is parsed but the thinking's opening.
    let plain = json!({"messages": messages, "enforced_str": answer, "temperature": 0});
    let (status, reply) = node.post_json("/v1/chat/completions", &plain).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["choices"][0]["message"]["content"], json!(format!("<think>{answer}")));
    let reply = &reply["choices"][0];
    assert_eq!((&reply["message"]["tool_calls"], &reply["finish_reason"]), (&json!([]), &json!("stop")));

    // "required" would need decoding constrained to the schemas: refused, naming the vllm engine.
    let required = json!({"messages": messages, "tools": tools, "tool_choice": "required"});
    let (status, err) = node.post_json("/v1/chat/completions", &required).await;
    assert_eq!(status, 400);
    assert!(err["error"]["message"].as_str().unwrap().contains("vllm engine"), "{err}");

    // A tool-call parser the native engine lacks: served, the answer unparsed.
    assert_eq!(node.daemon.post_json("POST", "/api/v1/inference/down", &Value::Null).0, 200);
    let (status, body) = node.up(M2, &["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]);
    assert_eq!(status, 200, "{body}");
    let (status, reply) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{reply}");
    let reply = &reply["choices"][0];
    assert_eq!((&reply["message"]["content"], &reply["message"]["tool_calls"]), (&json!(answer), &json!([])));
    assert_eq!(reply["finish_reason"], "stop");
}

/// GLM-5.3-Flash under governance's parsers (`--enable-auto-tool-choice --tool-call-parser
/// glm47 --reasoning-parser glm45`) on the native engine: a tiny `glm5_next`, its answer forced
/// to a thought and a call, comes back with the thought as `reasoning` and the call read out
/// (its value typed by the tool's schema); streamed, the thought in `reasoning` deltas, the
/// call's name first and its arguments in pieces that add up to the whole answer's; a
/// "required" choice is served (GLM's parser needs no constrained decoding) and with thinking
/// off the thought stays content; a value Python reads as a set, which JSON cannot hold, ends
/// the stream with an error event and `[DONE]`, as the fork's does.
#[tokio::test(flavor = "multi_thread")]
async fn glm_answers_are_parsed_as_the_networks_vllm_parses_them() {
    const GLM: &str = "zai-org/Tiny-GLM-5.3-Flash";
    let root = tempfile::tempdir().unwrap();
    let markers = [
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
        "<arg_key>",
        "</arg_key>",
        "<arg_value>",
        "</arg_value>",
    ];
    gonka_e2e::write_tiny_qwen(&root.path().join(GLM), "glm5_next", json!({"added_tokens": markers})).unwrap();
    let node = start(root.path());
    let governance = ["--enable-auto-tool-choice", "--tool-call-parser", "glm47", "--reasoning-parser", "glm45"];
    let (status, body) = node.up(GLM, &governance);
    assert_eq!(status, 200, "{body}");

    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}}]);
    let answer = "Hm.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Oslo</arg_value>\
                  <arg_key>days</arg_key><arg_value>3</arg_value></tool_call>";
    let chat = json!({"messages": [{"role": "user", "content": "Weather?"}], "tools": tools, "enforced_str": answer,
                      "temperature": 0});
    let (status, whole) = node.post_json("/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{whole}");
    let (message, finish) = (&whole["choices"][0]["message"], &whole["choices"][0]["finish_reason"]);
    assert_eq!(
        (&message["reasoning"], &message["content"], finish),
        (&json!("Hm."), &Value::Null, &json!("tool_calls"))
    );
    let arguments = "{\"city\": \"Oslo\", \"days\": 3}";
    assert_eq!(message["tool_calls"][0]["function"], json!({"name": "get_weather", "arguments": arguments}));
    assert!(message["tool_calls"][0]["id"].as_str().unwrap().starts_with("chatcmpl-tool-"));

    let mut streamed = chat.clone();
    streamed["stream"] = json!(true);
    let (status, body) = node.post("/v1/chat/completions", &streamed).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap()).collect();
    let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
    let reasoning: String = deltas.iter().filter_map(|d| d["reasoning"].as_str()).collect();
    assert_eq!(reasoning, "Hm.", "{body}");
    let pieces: Vec<&Value> = deltas.iter().filter_map(|d| d["tool_calls"].as_array()).flatten().collect();
    assert_eq!(pieces[0]["function"], json!({"name": "get_weather", "arguments": ""}), "{body}");
    assert!(pieces[0]["id"].as_str().unwrap().starts_with("chatcmpl-tool-") && pieces[0]["type"] == "function");
    assert!(pieces.len() > 2 && pieces[1..].iter().all(|p| p.get("id").is_none() && p["index"] == 0), "{body}");
    let joined: String = pieces.iter().filter_map(|p| p["function"]["arguments"].as_str()).collect();
    assert_eq!(joined, arguments);
    let finish = chunks.iter().find_map(|c| c["choices"][0]["finish_reason"].as_str());
    assert_eq!(finish, Some("tool_calls"));

    let mut required = chat.clone();
    required["tool_choice"] = json!("required");
    let (status, reply) = node.post_json("/v1/chat/completions", &required).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        (&reply["choices"][0]["message"]["content"], &reply["choices"][0]["finish_reason"]),
        (&json!(""), &json!("tool_calls"))
    );

    let set = answer.replace("<arg_value>3</arg_value>", "<arg_value>{1, 2}</arg_value>");
    let mut failing = streamed.clone();
    failing["enforced_str"] = json!(set);
    let (status, body) = node.post("/v1/chat/completions", &failing).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_data(&body);
    let [.., error, done] = events.as_slice() else { panic!("{body}") };
    assert_eq!(done, "[DONE]");
    let error: Value = serde_json::from_str(error).unwrap();
    assert!(error["error"]["message"].as_str().unwrap().contains("glm47"), "{body}");
    assert!(events.iter().all(|e| !e.contains("finish_reason\":\"")), "no finish after the failure: {body}");

    let mut plain = chat.clone();
    plain["chat_template_kwargs"] = json!({"enable_thinking": false});
    plain["tool_choice"] = json!("none");
    let (status, reply) = node.post_json("/v1/chat/completions", &plain).await;
    assert_eq!(status, 200, "{reply}");
    let message = &reply["choices"][0]["message"];
    assert_eq!((&message["reasoning"], &message["content"]), (&Value::Null, &json!(answer)));
}
