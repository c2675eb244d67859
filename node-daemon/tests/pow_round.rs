//! A whole PoC v1 round as a 2025 network node runs it (its call sequence and request bytes),
//! with the devnet as the network node and two node-daemon processes as the ML nodes: both
//! generate their share of nonces, each validates the other's sample, both earn weight, and the
//! epoch ends with `/stop` and `/inference/up`.
#![cfg(feature = "torch")]

mod common;

use std::time::Duration;

use common::Daemon;
use fake_nvml::Scenario;
use gonka_devnet::round::{RoundConfig, run_round};
use gonka_protocol::admin::{InferenceNodeConfig, ModelArgs};
use serde_json::json;

#[test]
fn two_ml_nodes_prove_cross_validate_and_earn_weight() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": base, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    let nodes = [
        Daemon::start_configured(&Scenario::hgx_h100(), &config),
        Daemon::start_configured(&Scenario::mixed(), &config),
    ];

    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::of(
        gonka_devnet::Generation::Launch2025,
        ["Qwen/QwQ-32B".to_string()],
    )));
    for (i, d) in nodes.iter().enumerate() {
        let registration = InferenceNodeConfig {
            host: "127.0.0.1".into(),
            inference_segment: String::new(),
            inference_port: 5000,
            poc_segment: String::new(),
            poc_port: d.port,
            models: [("Qwen/QwQ-32B".to_string(), ModelArgs::default())].into(),
            id: format!("node-{i}"),
            max_concurrent: 500,
            hardware: vec![],
        };
        devnet.lock().unwrap().register(registration).unwrap();
    }
    let app = gonka_devnet::callback_router(devnet.clone());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let cfg = RoundConfig {
        block_hash: "0xround".into(),
        block_height: 500,
        public_key: "host-key".into(),
        params: serde_json::from_value(
            json!({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 96,
            "ffn_dim_multiplier": 1.3, "multiple_of": 32, "rope_theta": 10000.0, "seq_len": 8}),
        )
        .unwrap(),
        r_target: 1.41,
        fraud_threshold: 1e-7,
        batch_size: 8,
        generate_for: Duration::from_secs(3),
        settle_for: Duration::from_secs(3),
        validation_sample: 200,
        callback_url: format!("{base}/v1/poc-batches"),
    };
    let results = runtime.block_on(run_round(&devnet, &cfg, |m| eprintln!("round: {m}"))).unwrap();

    assert_eq!(results.len(), 2);
    for r in &results {
        assert!(r.valid_nonces > 0, "{r:?}");
        assert_eq!((r.n_invalid, r.fraud_detected), (Some(0), Some(false)), "{r:?}");
        assert_eq!(r.weight, r.valid_nonces);
        // No models directory here: the start fails, answered as upstream's ML node answers a
        // failed start (500).
        assert_eq!(r.inference_up.as_deref(), Some("HTTP 500"), "{r:?}");
    }
    assert_eq!(results[0].validated_by.as_deref(), Some("node-1"));
    assert_eq!(results[1].validated_by.as_deref(), Some("node-0"));
    // Disjoint nonce shares by broker number (1 and 2 of 2): odd and even nonces.
    let d = devnet.lock().unwrap();
    for b in d.generated.iter() {
        assert!(b.nonces.iter().all(|n| n % 2 == b.node_id % 2), "{b:?}");
    }
}
