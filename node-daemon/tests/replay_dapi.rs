//! The replay suite: the daemon driven exactly as upstream's network node drives an ML node.
//!
//! The requests are the bytes Go's net/http wrote for upstream's dapi calls
//! (`protocol/tests/fixtures/ml-node-requests-2025/`, recorded by `testing/dapi-wire`): no
//! `Content-Type` on JSON bodies, `User-Agent: Go-http-client/1.1`, `Accept-Encoding: gzip`,
//! `Content-Length: 0` on a POST without body, keep-alive. They go out in the order a 2025
//! network node sends them around a PoC epoch (`broker/node_worker_commands.go`):
//! `/state` → `/pow/status` → `/stop` → `/pow/init/generate` → `/pow/init/validate` →
//! `/pow/validate` → `/stop` → `/inference/up`, and each answer is checked against what
//! upstream's Python ML node (`mlnode/packages`, same commit) answers. The proofs and verdicts
//! go to the devnet's callback server, which is as strict as upstream's (echo wants a JSON
//! content type). The newest network node's extra calls follow, and then a 2026 network node's
//! PoC v2 round from its own recorded bytes (`ml-node-requests-2026/`).
#![cfg(feature = "torch")]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use common::{Daemon, eventually};
use fake_nvml::Scenario;
use gonka_protocol::pow::ProofBatch;
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../protocol/tests/fixtures/ml-node-requests-2025/");

const FIXTURES_2026: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../protocol/tests/fixtures/ml-node-requests-2026/");

/// A recorded request with `{host}` and `{callback}` filled in and its `Content-Length` fixed
/// to the body it now has.
fn recorded(name: &str, host: &str, callback: &str) -> Vec<u8> {
    recorded_in(FIXTURES, name, host, &[("{callback}", callback)])
}

/// A request recorded in `dir`, its placeholders replaced, its `Content-Length` fixed.
fn recorded_in(dir: &str, name: &str, host: &str, fills: &[(&str, &str)]) -> Vec<u8> {
    let raw = std::fs::read_to_string(format!("{dir}{name}")).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let body = fills.iter().fold(body.to_string(), |b, (from, to)| b.replace(from, to));
    with_body(&head.replace("{host}", host), &body)
}

/// `head` (a recorded request's head) carrying `body` instead.
fn with_body(head: &str, body: &str) -> Vec<u8> {
    let head: Vec<String> = head
        .split("\r\n")
        .map(|l| if l.starts_with("Content-Length: ") { format!("Content-Length: {}", body.len()) } else { l.into() })
        .collect();
    format!("{}\r\n\r\n{body}", head.join("\r\n")).into_bytes()
}

/// One connection kept alive across requests, as Go's client keeps it.
struct GoConnection {
    reader: BufReader<TcpStream>,
}

impl GoConnection {
    fn open(port: u16) -> Self {
        Self { reader: BufReader::new(TcpStream::connect(("127.0.0.1", port)).unwrap()) }
    }

    /// Sends `request`'s bytes; returns the status and the JSON body.
    fn exchange(&mut self, request: &[u8]) -> (u16, Value) {
        self.reader.get_mut().write_all(request).unwrap();
        let mut status_line = String::new();
        self.reader.read_line(&mut status_line).unwrap();
        let status = status_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        // Every answer is JSON (upstream's `None` is the body `null`): anything else fails here.
        let value = serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!("status {status}: a body that is not JSON ({e}): {:?}", String::from_utf8_lossy(&body))
        });
        (status, value)
    }
}

#[test]
fn a_2025_network_node_drives_a_poc_epoch_and_gets_upstreams_answers() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::of(
        gonka_devnet::Generation::Launch2025,
        Vec::new(),
    )));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let callback = listener.local_addr().unwrap().to_string();
    runtime.spawn(axum::serve(listener, gonka_devnet::callback_router(devnet.clone())).into_future());
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": format!("http://{callback}"), "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    let daemon = Daemon::start_configured(&Scenario::hgx_h100(), &config);
    let host = format!("127.0.0.1:{}", daemon.port);
    let request = |name: &str| recorded(name, &host, &callback);
    let mut dapi = GoConnection::open(daemon.port);

    // StartPoCNodeCommand: state, PoC status, stop, init/generate.
    let (status, state) = dapi.exchange(&request("state.http"));
    assert_eq!((status, &state["state"]), (200, &json!("STOPPED")), "{state}");
    assert_eq!(dapi.exchange(&request("pow_status.http")), (200, json!({"status": "NOT_LOADED"})));
    assert_eq!(dapi.exchange(&request("stop.http")), (200, json!({"status": "OK"})));
    let (status, answer) = dapi.exchange(&request("pow_init_generate.http"));
    assert_eq!((status, &answer["status"], &answer["pow_status"]["status"]), (200, &json!("OK"), &json!("GENERATING")));

    // Proofs reach the callback server, under the broker number the network node sent (1 of 2:
    // odd nonces).
    let generated = || devnet.lock().unwrap().generated.clone();
    eventually("proofs at the callback server", || generated().iter().map(|b| b.nonces.len()).sum::<usize>() >= 8);
    for b in generated() {
        assert_eq!((b.node_id, b.block_height, b.block_hash.as_str()), (1, 1000, "0xblockhash"));
        assert!(b.nonces.iter().all(|n| n % 2 == 1), "{:?}", b.nonces);
    }
    let (_, state) = dapi.exchange(&request("state.http"));
    assert_eq!(state["state"], "POW");
    assert_eq!(dapi.exchange(&request("pow_status.http")).1["status"], "GENERATING");

    // InitValidateNodeCommand: the same init, so the session (and its model) stays.
    let (status, answer) = dapi.exchange(&request("pow_init_validate.http"));
    assert_eq!((status, &answer["pow_status"]), (200, &json!({"status": "VALIDATING", "is_model_initialized": true})));

    // A validator's sample: the recorded claims (nonces 7 and 9, node_id 0 as upstream samples),
    // then an honest sample of this node's own proofs in the same bytes' shape.
    assert_eq!(dapi.exchange(&request("pow_validate.http")), (200, Value::Null));
    let verdict_for = |nonces: &[i64]| devnet.lock().unwrap().validated.iter().find(|v| v.nonces == nonces).cloned();
    eventually("the recorded sample judged", || verdict_for(&[7, 9]).is_some());
    let judged = verdict_for(&[7, 9]).unwrap();
    assert_eq!((judged.node_id, judged.received_dist.clone()), (0, vec![1.2, 1.3]));
    let proofs_at_switch = generated().len();

    let own = generated().into_iter().next().unwrap();
    let sample = ProofBatch { node_id: 0, ..own };
    let head = String::from_utf8(request("pow_validate.http")).unwrap();
    let head = head.split_once("\r\n\r\n").unwrap().0.to_string();
    let body = serde_json::to_string(&sample).unwrap();
    assert_eq!(dapi.exchange(&with_body(&head, &body)), (200, Value::Null));
    eventually("the honest sample judged", || verdict_for(&sample.nonces).is_some());
    let honest = verdict_for(&sample.nonces).unwrap();
    assert_eq!((honest.n_invalid, honest.fraud_detected), (0, false), "{honest:?}");
    // Upstream's sender posts proofs only while generating: none since the switch.
    assert_eq!(generated().len(), proofs_at_switch, "proofs posted in the validate phase");

    // The epoch moves on: stop, then inference up. This daemon has no models directory, so the
    // start fails as upstream's ML node reports a failed start: 500 naming why.
    assert_eq!(dapi.exchange(&request("stop.http")), (200, json!({"status": "OK"})));
    assert_eq!(dapi.exchange(&request("state.http")).1["state"], "STOPPED");
    let (status, answer) = dapi.exchange(&request("inference_up.http"));
    assert_eq!(status, 500, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("Qwen/Qwen2.5-7B-Instruct"), "{answer}");
    let (status, health) = dapi.exchange(&request("health.http"));
    assert_eq!((status, &health["status"]), (200, &json!("healthy")));
}

#[test]
fn upstreams_leniency_and_the_newest_network_nodes_calls() {
    let daemon = Daemon::start(&Scenario::hgx_h100());
    let host = format!("127.0.0.1:{}", daemon.port);
    let request = |name: &str| recorded(name, &host, "127.0.0.1:9");
    let mut dapi = GoConnection::open(daemon.port);

    // The version prefix the network node puts in front of every path.
    let prefixed = String::from_utf8(request("state.http")).unwrap().replacen("GET /api", "GET /v3.0.8/api", 1);
    assert_eq!(dapi.exchange(prefixed.as_bytes()).1["state"], "STOPPED");

    // Unknown fields are ignored, as pydantic does; `n_kv_heads` defaults to upstream's 16.
    let raw = String::from_utf8(request("pow_init_generate.http")).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut init: Value = serde_json::from_str(body).unwrap();
    init["from_a_newer_network_node"] = json!(true);
    init["params"]["from_a_newer_network_node"] = json!(1);
    init["params"]["n_heads"] = json!(16);
    init["params"]["dim"] = json!(128);
    init["params"].as_object_mut().unwrap().remove("n_kv_heads");
    let (status, answer) = dapi.exchange(&with_body(head, &init.to_string()));
    assert_eq!((status, &answer["status"]), (200, &json!("OK")), "{answer}");
    assert_eq!(dapi.exchange(&request("stop.http")), (200, json!({"status": "OK"})));

    // A body that says it is not JSON is refused, as FastAPI refuses it.
    let typed = with_body(&format!("{head}\r\nContent-Type: text/plain"), &init.to_string());
    assert_eq!(dapi.exchange(&typed).0, 422);

    // The newest network node: the versions handshake, the encrypted identity (503: not
    // enabled), and its bearer `auth_token` on every call.
    let get = |path: &str, extra: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: Go-http-client/1.1\r\n{extra}Accept-Encoding: gzip\r\n\r\n"
        )
    };
    let (status, versions) = dapi.exchange(get("/api/v1/inference/pow/versions", "").as_bytes());
    assert_eq!(status, 200);
    assert_eq!((&versions["vllm_version"], &versions["poc_validation_inference"]), (&Value::Null, &json!(false)));
    assert_eq!(dapi.exchange(get("/api/v1/encrypted/identity", "").as_bytes()).0, 503);
    let authorized = get("/api/v1/state", "Authorization: Bearer node-config-auth-token\r\n");
    assert_eq!(dapi.exchange(authorized.as_bytes()).0, 200);
}

/// The 2026 network node's PoC v2 calls, as its Go client wrote them (`ml-node-requests-2026/`,
/// recorded by testing/dapi-wire from upstream's request structs): state, inference up with
/// `dtype: "auto"`, PoC v2 status, init/generate (no `batch_size`, no `k_dim`, the callback URL
/// with the model escaped twice), stop with `{}`, and a queued validation of another ML node's
/// artifacts with the chain's `stat_test` — each answered as upstream's ML node answers, the
/// artifacts and the verdict reaching the callback server under the model's name.
#[test]
fn a_2026_network_node_drives_a_poc_v2_round_with_its_bytes() {
    const MODEL: &str = "Qwen/Tiny-Qwen3";
    let models = tempfile::tempdir().unwrap();
    gonka_e2e::write_tiny_qwen(&models.path().join(MODEL), "qwen3", json!({})).unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::new([MODEL.to_string()])));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let callback = listener.local_addr().unwrap().to_string();
    runtime.spawn(axum::serve(listener, gonka_devnet::callback_router(devnet.clone())).into_future());
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": format!("http://{callback}"), "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [{"id": MODEL, "args": []}],
        "poc": {"batchSize": 4, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    let daemon = Daemon::start_configured_with_env(
        &Scenario::hgx_h100(),
        &config,
        &[("GONKA_MODELS_DIR", models.path().to_str().unwrap())],
    );
    let host = format!("127.0.0.1:{}", daemon.port);
    let request = |name: &str, fills: &[(&str, &str)]| {
        let mut all = vec![("{callback}", callback.as_str())];
        all.extend_from_slice(fills);
        recorded_in(FIXTURES_2026, name, &host, &all)
    };
    let mut dapi = GoConnection::open(daemon.port);

    // InferenceUpNodeCommand: state, then the model up.
    assert_eq!(dapi.exchange(&request("state.http", &[])).1["state"], "STOPPED");
    assert_eq!(dapi.exchange(&request("inference_up.http", &[])), (200, json!({"status": "OK"})));
    let state = dapi.exchange(&request("state.http", &[])).1;
    assert_eq!((state["state"].as_str(), state["loaded_model"].as_str()), (Some("INFERENCE"), Some(MODEL)));
    // StartPoCNodeCommandV2: status, then init/generate.
    let (status, idle) = dapi.exchange(&request("pow_status_v2.http", &[]));
    assert_eq!((status, idle["status"].as_str()), (200, Some("IDLE")));
    let (status, started) = dapi.exchange(&request("init_generate_v2.http", &[]));
    assert_eq!((status, started["status"].as_str(), started["backends"].as_u64()), (200, Some("OK"), Some(1)));
    assert_eq!(dapi.exchange(&request("pow_status_v2.http", &[])).1["status"], "GENERATING");
    // Artifacts of node 1 of 2 (odd nonces) reach /v2/poc-batches/{model}/generated, the model
    // read back from its doubly escaped segment.
    let artifact = |nonce: i64| {
        let d = devnet.lock().unwrap();
        d.generated_v2
            .iter()
            .filter(|(model, b)| model == MODEL && b.node_id == 1 && b.block_height == 3600)
            .flat_map(|(_, b)| b.artifacts.clone())
            .find(|a| a.nonce == nonce)
            .map(|a| a.vector_b64)
    };
    eventually("artifacts of nonces 1 and 3 delivered", || artifact(1).is_some() && artifact(3).is_some());
    // TransitionPoCToValidatingCommandV2: stop once.
    let (status, stopped) = dapi.exchange(&request("stop_pow_v2.http", &[]));
    assert_eq!((status, stopped["status"].as_str()), (200, Some("OK")));

    // The validator's GenerateV2: the artifacts as the network node fetched them, queued, the
    // verdict posted to /validated.
    let (v1, v3) = (artifact(1).unwrap(), artifact(3).unwrap());
    let (status, queued) =
        dapi.exchange(&request("generate_v2_validation.http", &[("{vector_1}", &v1), ("{vector_3}", &v3)]));
    assert_eq!((status, queued["status"].as_str()), (200, Some("queued")), "{queued}");
    eventually("the verdict reaches the network node", || !devnet.lock().unwrap().validated_v2.is_empty());
    let (model, verdict) = devnet.lock().unwrap().validated_v2[0].clone();
    assert_eq!(model, MODEL);
    assert_eq!((verdict.n_total, verdict.n_mismatch, verdict.fraud_detected), (2, 0, false));
    assert_eq!((verdict.node_id, verdict.block_height), (2, 3600));
}
