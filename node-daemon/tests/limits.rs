//! Bounded input on the ML-node API: a request can't make the ML node allocate what it does not
//! have, hold it up, or be larger than a request needs to be; each refusal names the limit.
#![cfg(feature = "torch")]

mod common;

use common::Daemon;
use fake_nvml::Scenario;
use serde_json::{Value, json};

fn init_request(params: Value, batch_size: usize) -> Value {
    json!({
        "node_id": 0, "node_count": 1, "block_hash": "0xblock", "block_height": 100, "public_key": "prover",
        "batch_size": batch_size, "r_target": 1.41, "fraud_threshold": 1e-7, "params": params,
        "url": "http://127.0.0.1:9/v1/poc-batches"
    })
}

#[test]
fn oversized_poc_work_is_refused_before_anything_is_allocated() {
    let d = Daemon::start(&Scenario::hgx_h100());
    let before = d.rss_bytes();

    // Far beyond any model: refused by the shape's bounds.
    let (status, answer) =
        d.post_json("POST", "/api/v1/pow/init/generate", &init_request(json!({"dim": 1 << 24, "n_heads": 16}), 8));
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["detail"], "invalid PoC params: dim 16777216 is above the limit of 65536");

    // Within the bounds but far beyond this machine: refused by the memory it has.
    let huge = json!({"dim": 65536, "n_layers": 1024, "n_heads": 1024, "n_kv_heads": 1024, "vocab_size": 1 << 20});
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request(huge, 64));
    assert_eq!(status, 400, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(
        detail.starts_with("the proof model and a batch of 64 need")
            && detail.contains("GiB of available system memory"),
        "{detail}"
    );

    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request(json!({}), 1_000_000));
    assert_eq!((status, answer["detail"].as_str()), (400, Some("batch_size 1000000 is outside 1..=4096")));

    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED", "no session started");
    let grown = d.rss_bytes().saturating_sub(before);
    assert!(grown < 64 << 20, "the daemon grew by {} MiB", grown >> 20);
}

#[test]
fn bodies_are_bounded() {
    let d = Daemon::start(&Scenario::hgx_h100());
    let padding = "x".repeat((1 << 20) + 4096);
    let body = json!({"model": "Qwen/Qwen3-0.6B", "dtype": "auto", "additional_args": [padding]}).to_string();
    let (status, answer) = d.send("POST", "/api/v1/inference/up", &body).unwrap();
    assert_eq!(status, 413, "{answer}");
    // Still serving.
    assert_eq!(d.json("GET", "/api/v1/state").0, 200);
}
