//! A whole PoC v2 round as the 2026 network node runs it (its call sequence, the devnet as the
//! network node) over two node-daemon processes serving a tiny Qwen3 (and Qwen3-MoE, MiniMax-M2
//! plain and FP8, DeepSeek-V4 as released, GLM-5.3-Flash): both bring the model up,
//! generate their share of nonces with artifacts posted to `/v2/poc-batches/{model}/generated`,
//! each validates a sample of the other's through the queued `generate` with the chain's
//! `stat_test`, and both earn weight.
#![cfg(feature = "torch")]

mod common;

use std::time::Duration;

use common::Daemon;
use fake_nvml::Scenario;
use gonka_devnet::round_v2::{RoundConfig, run_round};
use serde_json::json;

const MODEL: &str = "Qwen/Tiny-Qwen3";

fn models_dir(arch: &str, extra: serde_json::Value) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    gonka_e2e::write_tiny_qwen(&root.path().join(MODEL), arch, extra).unwrap();
    root
}

#[test]
fn two_ml_nodes_serve_prove_cross_validate_and_earn_weight() {
    round_over_two_daemons("qwen3", json!({}));
}

/// The same with a mixture of experts (Qwen3-235B-A22B was the first PoC v2 model).
#[test]
fn a_qwen3_moe_round_too() {
    round_over_two_daemons("qwen3_moe", json!({}));
}

/// MiniMax-M2's architecture on the native engine (no vLLM on these daemons).
#[test]
fn a_minimax_m2_round_too() {
    round_over_two_daemons("minimax_m2", json!({}));
}

/// And quantised as MiniMax-M2.7 is released: FP8 in 128×128 blocks.
#[test]
fn an_fp8_minimax_m2_round_too() {
    round_over_two_daemons("minimax_m2", json!({"fp8_block": [128, 128]}));
}

/// DeepSeek-V4's architecture as it is released (FP8 projections and MXFP4 experts with UE8M0
/// factors; a hash-routed first layer, a sliding, a CSA and an HCA layer) on the native engine:
/// PoC v2 with the pseudo token ids its hash router reads, and chat in its own encoding.
#[test]
fn a_released_deepseek_v4_round_too() {
    let release =
        json!({"compressed": true, "released_spelling": true, "release_quantised": true, "fp8_block": [16, 16]});
    round_over_two_daemons("deepseek_v4", release);
}

/// GLM-5.3-Flash's language model (linear and indexed layers, a shared one among them, in a
/// multimodal checkpoint) on the native engine: PoC v2 unreflected, as upstream's hooks leave it.
#[test]
fn a_glm5_next_round_too() {
    round_over_two_daemons("glm5_next", json!({"linear_layers": true}));
}

/// Two daemons serving a tiny `arch` model (written with `extra`) through a 2026 PoC v2
/// round, then a streamed chat.
fn round_over_two_daemons(arch: &str, extra: serde_json::Value) {
    let models = models_dir(arch, extra);
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (devnet, base) = common::start_devnet_2026(&runtime, MODEL);
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": base, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [{"id": MODEL, "args": []}],
        "poc": {"batchSize": 4, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    // Each ML node's inference port, as the registration names it (the 2026 network node
    // refuses two nodes on one host+port).
    let inference_ports: Vec<u16> = (0..2).map(|_| gonka_e2e::free_port().unwrap()).collect();
    let scenarios = [Scenario::hgx_h100(), Scenario::mixed()];
    let nodes: Vec<Daemon> = scenarios
        .iter()
        .zip(&inference_ports)
        .map(|(scenario, port)| {
            let listen = format!("127.0.0.1:{port}");
            let models = models.path().to_str().unwrap();
            Daemon::start_configured_with_env(
                scenario,
                &config,
                &[("GONKA_MODELS_DIR", models), ("GONKA_INFERENCE_LISTEN", listen.as_str())],
            )
        })
        .collect();
    for (i, d) in nodes.iter().enumerate() {
        let args = ["--max-model-len".to_string(), "256".to_string()];
        common::register(&devnet, &format!("node-{i}"), d.port, inference_ports[i], MODEL, &args);
    }

    let cfg = RoundConfig {
        block_hash: "0b1c2d3e4f5a69788796a5b4c3d2e1f00f1e2d3c4b5a69788796a5b4c3d2e1f0".into(),
        block_height: 3600,
        public_key: "gonka1hostkey".into(),
        model: MODEL.into(),
        seq_len: 8,
        stronger_rng: true,
        generate_for: Duration::from_secs(4),
        settle_for: Duration::from_secs(2),
        validation_sample: 20,
        callback_base: base,
        // The chain's PoCStatTestParams defaults, as the network node forwards them.
        stat_test: json!({"dist_threshold": 0.4, "p_mismatch": 0.1, "p_value_threshold": 0.05}),
    };
    let results = runtime.block_on(run_round(&devnet, &cfg, |m| eprintln!("round: {m}"))).unwrap();

    common::assert_honest_pair(&results, &devnet, MODEL);
    // Each node's weight is the work its daemon counted doing (its own /metrics: every nonce
    // computed gave an artifact, every artifact reached the network node once): weight scales
    // with the work done, node by node, whatever the machine's speed.
    for (r, node) in results.iter().zip(&nodes) {
        let computed = node.metric("gonka_ml_node_poc_nonces_computed_total").unwrap();
        let artifacts = node.metric("gonka_ml_node_poc_nonces_valid_total").unwrap();
        let posts = node.metric("gonka_ml_node_poc_batches_sent_total{kind=\"generated\"}").unwrap_or(0.0);
        assert_eq!((r.weight as f64, r.weight as f64), (computed, artifacts), "{}: {r:?}", r.id);
        assert!(posts >= 1.0, "{}: the artifacts came in no callback post", r.id);
    }
    // Both nodes served the model (the round brought it up) and still do.
    for n in &nodes {
        let state = n.json("GET", "/api/v1/state").1;
        assert_eq!((state["state"].as_str(), state["loaded_model"].as_str()), (Some("INFERENCE"), Some(MODEL)));
    }
    // And it chats, streamed, on the inference port.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
        "ignore_eos": true, "stream": true, "stream_options": {"include_usage": true}});
    let answer = runtime.block_on(async {
        let url = format!("http://127.0.0.1:{}/v1/chat/completions", inference_ports[0]);
        reqwest::Client::new().post(url).json(&body).send().await.unwrap().text().await.unwrap()
    });
    let events: Vec<&str> = answer.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{answer}");
    let usage: serde_json::Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], 6, "{answer}");
}
