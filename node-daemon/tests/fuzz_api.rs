//! Property test over the ML-node API's request bodies: whatever bytes arrive, on any endpoint,
//! with or without a JSON content type, the daemon answers with a status that names the caller's
//! mistake (or a refusal), never a server error or a panic, and its memory stays bounded.

use std::path::Path;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gonka_node_daemon::api::router;
use gonka_node_daemon::gpu::GpuProbe;
use gonka_node_daemon::metrics::DaemonMetrics;
use gonka_node_daemon::node_state::Reporting;
use gonka_node_daemon::poc::PowSettings;
use gonka_node_daemon::state::{AppState, Policy};
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

const POSTS: [&str; 9] = [
    "/api/v1/pow/init",
    "/api/v1/pow/init/generate",
    "/api/v1/pow/init/validate",
    "/api/v1/pow/validate",
    "/api/v1/pow/phase/generate",
    "/api/v1/inference/up",
    "/api/v1/inference/up/async",
    "/api/v1/stop",
    "/v3.0.8/api/v1/pow/stop",
];

/// The answers a caller's input may get: success, its mistake, a conflict, a refusal.
const ALLOWED: [u16; 9] = [200, 400, 404, 405, 409, 413, 415, 422, 503];

fn state() -> Arc<AppState> {
    // No NVML and no CPU compute: nothing a request asks for gets allocated.
    let probe = GpuProbe::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1")));
    let policy = Policy { expected_gpus: 1, ..Policy::default() };
    AppState::new(
        probe,
        DaemonMetrics::default(),
        "0.0.0-test",
        PowSettings::default(),
        Reporting::default(),
        policy,
        Default::default(),
    )
    .unwrap()
}

fn status(runtime: &tokio::runtime::Runtime, app: &axum::Router, path: &str, body: Vec<u8>, json: bool) -> StatusCode {
    let mut request = Request::post(path);
    if json {
        request = request.header("content-type", "application/json");
    }
    let response = runtime.block_on(app.clone().oneshot(request.body(Body::from(body)).unwrap())).unwrap();
    response.status()
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        ".{0,40}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,12}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn valid_init() -> Value {
    json!({
        "block_hash": "0xblock", "block_height": 100, "public_key": "prover", "batch_size": 8, "r_target": 1.41,
        "fraud_threshold": 1e-7, "node_id": 0, "node_count": 1, "url": "http://127.0.0.1:9/v1/poc-batches",
        "params": {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 96, "seq_len": 8}
    })
}

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap().split_whitespace().next().unwrap();
    kib.parse::<u64>().unwrap() * 1024
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_on_any_endpoint(path in prop::sample::select(POSTS.to_vec()),
                                 body in prop::collection::vec(any::<u8>(), 0..4096),
                                 json in any::<bool>()) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let status = status(&runtime, &router(state()), path, body, json).as_u16();
        prop_assert!(ALLOWED.contains(&status), "{path}: {status}");
    }

    #[test]
    fn a_valid_request_with_one_field_swapped(path in prop::sample::select(POSTS[..4].to_vec()),
                                              field in prop::sample::select(vec![
                                                  "block_hash", "block_height", "batch_size", "r_target", "node_id",
                                                  "node_count", "url", "params", "nonces", "dist"]),
                                              in_params in any::<bool>(),
                                              value in json_value()) {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let mut request = valid_init();
        request["nonces"] = json!([1, 2]);
        request["dist"] = json!([1.0, 1.2]);
        if in_params {
            request["params"][field] = value;
        } else {
            request[field] = value;
        }
        let body = serde_json::to_vec(&request).unwrap();
        let status = status(&runtime, &router(state()), path, body, true).as_u16();
        prop_assert!(ALLOWED.contains(&status), "{path} {request}: {status}");
    }
}

#[test]
fn memory_stays_bounded_over_many_requests() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let app = router(state());
    let send = |body: Vec<u8>| status(&runtime, &app, "/api/v1/pow/init/generate", body, true);
    for _ in 0..50 {
        send(serde_json::to_vec(&valid_init()).unwrap());
    }
    let before = rss_bytes();
    for i in 0..2000 {
        let mut request = valid_init();
        request["params"]["dim"] = json!(64 << (i % 12));
        request["batch_size"] = json!(i);
        let status = send(serde_json::to_vec(&request).unwrap()).as_u16();
        assert!(ALLOWED.contains(&status), "{status}");
    }
    let grown = rss_bytes().saturating_sub(before);
    assert!(grown < 32 << 20, "grew by {} MiB over 2000 requests", grown >> 20);
}
