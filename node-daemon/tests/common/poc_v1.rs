//! PoC v1 as the network node drives it, for tests that need a session running: its callback
//! server, an init request and the proofs an honest ML node finds.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use gonka_node_daemon::poc::model::ProofModel;
use gonka_node_daemon::poc::params::Params;
use gonka_node_daemon::poc::pipeline::{distance, nonce_inputs, nonce_permutation, target};
use serde_json::{Value, json};

// Near sqrt(2), the distance of a random unit vector: about half the nonces are proofs.
pub const R_TARGET: f64 = 1.41;

/// The network node's ML callback server: records what it is sent, or answers 503 while down.
#[derive(Default)]
pub struct Callback {
    pub down: AtomicBool,
    pub generated: Mutex<Vec<Value>>,
    pub validated: Mutex<Vec<Value>>,
}

pub fn start_callback(runtime: &tokio::runtime::Runtime) -> (Arc<Callback>, String) {
    let (callback, app) = callback_app();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/v1/poc-batches", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (callback, url)
}

/// The callback server and what it records.
pub fn callback_app() -> (Arc<Callback>, Router) {
    let callback = Arc::new(Callback::default());
    let record = |kind: &'static str| {
        move |State(cb): State<Arc<Callback>>, axum::Json(body): axum::Json<Value>| async move {
            if cb.down.load(Ordering::SeqCst) {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            let list = if kind == "generated" { &cb.generated } else { &cb.validated };
            list.lock().unwrap().push(body);
            StatusCode::OK
        }
    };
    let app = Router::new()
        .route("/v1/poc-batches/generated", post(record("generated")))
        .route("/v1/poc-batches/validated", post(record("validated")))
        .with_state(callback.clone());
    (callback, app)
}

pub fn params() -> Params {
    serde_json::from_value(json!({
        "dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 96,
        "ffn_dim_multiplier": 1.3, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0,
        "use_scaled_rope": false, "seq_len": 8
    }))
    .unwrap()
}

pub fn init_request(url: &str, node_id: i64) -> Value {
    json!({
        "node_id": node_id, "node_count": 1, "block_hash": "0xblock", "block_height": 100,
        "public_key": "prover", "batch_size": 8, "r_target": R_TARGET, "fraud_threshold": 1e-7,
        "params": params(), "url": url
    })
}

/// Distances as any honest ML node computes them, for checking what arrived.
pub fn distances(public_key: &str, nonces: &[u64]) -> Vec<f64> {
    let p = params();
    let model = ProofModel::new(&p, "0xblock", tch::Device::Cpu, tch::Kind::Float).unwrap();
    let inputs: Vec<Vec<f32>> =
        nonces.iter().map(|&n| nonce_inputs("0xblock", public_key, n, p.seq_len, p.dim)).collect();
    let target = target("0xblock", p.vocab_size);
    model
        .last_logits(&inputs)
        .iter()
        .zip(nonces)
        .map(|(l, &n)| distance(l, &nonce_permutation("0xblock", public_key, n, p.vocab_size), &target))
        .collect()
}

impl Callback {
    /// The nonces of every generated batch received, checked against an honest ML node's: each
    /// once, and every proof among the nonces computed up to the last one sent (batches of 8
    /// from nonce 0, public key `prover`), none lost or invented.
    pub fn every_proof_delivered(&self) -> BTreeSet<u64> {
        let mut delivered = BTreeSet::new();
        for b in self.generated.lock().unwrap().iter() {
            for n in b["nonces"].as_array().unwrap() {
                assert!(delivered.insert(n.as_u64().unwrap()), "nonce {n} delivered twice");
            }
        }
        let Some(&last) = delivered.iter().max() else { return delivered };
        let computed: Vec<u64> = (0..(last / 8 + 1) * 8).collect();
        let expected: BTreeSet<u64> = computed
            .iter()
            .zip(distances("prover", &computed))
            .filter(|(_, d)| *d < R_TARGET)
            .map(|(n, _)| *n)
            .collect();
        assert_eq!(delivered, expected, "proofs lost or invented");
        delivered
    }
}
