//! PoC v1 through the daemon binary, as the network node drives it: init, generate while the
//! callback server is down and then up (no proof lost), validate honest and fabricated
//! batches, stop; plus upstream's error answers.
#![cfg(feature = "torch")]

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use common::poc_v1::{R_TARGET, callback_app, distances, init_request, start_callback};
use common::{Daemon, eventually};
use fake_nvml::Scenario;
use serde_json::{Value, json};

/// A daemon configured as the operator configures one, with `callback` as the network node's
/// callback base (init requests may name only URLs under it).
fn daemon(callback: &str) -> Daemon {
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": callback, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    Daemon::start_configured(&Scenario::hgx_h100(), &config)
}

fn metric(d: &Daemon, name: &str) -> f64 {
    d.metric(name).unwrap_or(0.0)
}

#[test]
fn generation_survives_a_callback_outage_without_losing_a_proof() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, url) = start_callback(&runtime);
    let d = daemon(&url);
    callback.down.store(true, Ordering::SeqCst);

    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0));
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], "OK");
    // As upstream, the phase shows at once; the model may still be loading.
    assert_eq!(d.json("GET", "/api/v1/pow/status").1["status"], "GENERATING");
    eventually("model loaded", || {
        d.json("GET", "/api/v1/pow/status").1 == json!({"status": "GENERATING", "is_model_initialized": true})
    });
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "POW");
    eventually("health shows the PoC manager running", || {
        d.json("GET", "/health").1["managers"]["pow"] == json!({"running": true, "healthy": true})
    });
    // One manager at a time: the inference manager is refused while PoC runs, as upstream does.
    let up = json!({"model": "Qwen/Qwen3-0.6B", "dtype": "auto"});
    let conflict =
        json!({"detail": "Cannot run INFERENCE because MLNode is currently in POW mode. Please stop POW first."});
    assert_eq!(d.post_json("POST", "/api/v1/inference/up", &up), (409, conflict.clone()));
    assert_eq!(d.json("POST", "/api/v1/inference/down"), (409, conflict));
    assert_eq!(d.json("GET", "/api/v1/pow/status").0, 200, "the running manager's own endpoints are not refused");

    eventually("sends fail while the callback is down", || {
        metric(&d, "gonka_ml_node_poc_send_failures_total{kind=\"generated\"}") >= 2.0
    });
    assert!(callback.generated.lock().unwrap().is_empty());
    assert!(metric(&d, "gonka_ml_node_poc_pending_batches") >= 1.0);

    callback.down.store(false, Ordering::SeqCst);
    eventually("proofs delivered after the outage", || {
        callback.generated.lock().unwrap().iter().map(|b| b["nonces"].as_array().unwrap().len()).sum::<usize>() >= 40
    });
    assert_eq!(d.json("POST", "/api/v1/pow/stop").1["status"], "OK");
    assert_eq!(d.json("GET", "/api/v1/pow/status").1, json!({"status": "NOT_LOADED"}));
    // Stopped: no conflict any more (the start fails for want of a models directory: 500).
    assert_eq!(d.post_json("POST", "/api/v1/inference/up", &up).0, 500);

    let batches = callback.generated.lock().unwrap().clone();
    let mut delivered = BTreeSet::new();
    for b in &batches {
        assert_eq!(
            (b["block_hash"].as_str(), b["public_key"].as_str(), b["node_id"].as_i64()),
            (Some("0xblock"), Some("prover"), Some(0))
        );
        for (n, dist) in b["nonces"].as_array().unwrap().iter().zip(b["dist"].as_array().unwrap()) {
            assert!(dist.as_f64().unwrap() < R_TARGET);
            assert!(delivered.insert(n.as_u64().unwrap()), "nonce {n} delivered twice");
        }
    }
    // Every proof among the nonces computed so far arrived: the valid ones of whole batches of 8.
    let last = *delivered.iter().max().unwrap();
    let computed: Vec<u64> = (0..(last / 8 + 1) * 8).collect();
    let expected: BTreeSet<u64> =
        computed.iter().zip(distances("prover", &computed)).filter(|(_, d)| *d < R_TARGET).map(|(n, _)| *n).collect();
    assert_eq!(delivered, expected, "proofs lost or invented");
    assert!(metric(&d, "gonka_ml_node_poc_nonces_computed_total") >= computed.len() as f64);
}

#[test]
fn sigterm_mid_poc_delivers_every_pending_proof() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, url) = start_callback(&runtime);
    // Proofs would go out every 300 s: whatever arrives comes from the shutdown.
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": url, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 300, "maxPendingBatches": 1000}
    });
    let mut d = Daemon::start_configured(&Scenario::hgx_h100(), &config);
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    eventually("proofs pending", || metric(&d, "gonka_ml_node_poc_nonces_valid_total") >= 20.0);
    assert!(callback.generated.lock().unwrap().is_empty(), "nothing sent yet");

    let exit = d.terminate(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}");
    let delivered = callback.every_proof_delivered();
    assert!(delivered.len() >= 20, "{} proofs delivered", delivered.len());
}

/// A request held open (here a validation batch whose body never finishes arriving, held to the
/// 30 s request timeout) does not keep the pending proofs from the network node: they go out
/// while the server drains, and the daemon exits within its grace period (5 s here).
#[test]
fn sigterm_delivers_the_proofs_while_a_request_is_held_open() {
    use std::io::Write as _;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, url) = start_callback(&runtime);
    let config = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": url, "pocPort": 8080, "inferencePort": 5000,
        "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 300, "maxPendingBatches": 1000}
    });
    let mut d =
        Daemon::start_configured_with_env(&Scenario::hgx_h100(), &config, &[("GONKA_SHUTDOWN_GRACE_SECONDS", "5")]);
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    eventually("proofs pending", || metric(&d, "gonka_ml_node_poc_nonces_valid_total") >= 8.0);
    let mut held = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    let head = "POST /api/v1/pow/validate HTTP/1.1\r\nHost: ml-node\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\":";
    held.write_all(head.as_bytes()).unwrap();
    eventually("the request in flight", || metric(&d, "gonka_ml_node_api_requests_in_flight") >= 1.0);

    let started = std::time::Instant::now();
    let exit = d.terminate(Duration::from_secs(25));
    assert!(exit.success(), "{exit:?}");
    assert!(started.elapsed() < Duration::from_secs(20), "exited after {:?}", started.elapsed());
    assert!(!callback.generated.lock().unwrap().is_empty(), "the pending proofs were not delivered");
    drop(held);
}

#[test]
fn proofs_reach_an_https_callback_whose_ca_the_gonka_node_names() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, app) = callback_app();
    let (base, ca) = runtime.block_on(gonka_devnet::tls::serve_https(app)).unwrap();
    let config = |ca: Option<&str>| {
        json!({
            "gonkaNode": "gpu/test", "mlCallbackUrl": base, "caBundle": ca, "pocPort": 8080, "inferencePort": 5000,
            "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
        })
    };
    let d = Daemon::start_configured(&Scenario::hgx_h100(), &config(Some(&ca)));
    let url = format!("{base}/v1/poc-batches");
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    eventually("proofs over https", || !callback.generated.lock().unwrap().is_empty());
    d.json("POST", "/api/v1/pow/stop");

    // Without the CA the callback's certificate is not trusted: sends fail, proofs wait.
    let (callback, app) = callback_app();
    let (base, _) = runtime.block_on(gonka_devnet::tls::serve_https(app)).unwrap();
    let untrusting = json!({
        "gonkaNode": "gpu/test", "mlCallbackUrl": base, "pocPort": 8080, "inferencePort": 5000, "gpus": null,
        "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
    });
    let d = Daemon::start_configured(&Scenario::hgx_h100(), &untrusting);
    let url = format!("{base}/v1/poc-batches");
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    eventually("sends fail", || metric(&d, "gonka_ml_node_poc_send_failures_total{kind=\"generated\"}") >= 1.0);
    assert!(callback.generated.lock().unwrap().is_empty());
}

#[test]
fn validation_recomputes_and_catches_fabricated_proofs() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, url) = start_callback(&runtime);
    let d = daemon(&url);
    let (status, _) = d.post_json("POST", "/api/v1/pow/init/validate", &init_request(&url, 1));
    assert_eq!(status, 200);

    // An honest prover's proofs among nonces 0..64, and a forger claiming misses as proofs.
    let nonces: Vec<u64> = (0..64).collect();
    let dist = distances("alice", &nonces);
    let (proofs, misses): (Vec<_>, Vec<_>) = nonces.iter().zip(&dist).partition(|(_, d)| **d < R_TARGET);
    assert!(proofs.len() >= 5 && misses.len() >= 5, "r_target splits the nonces");
    let honest = json!({"public_key": "alice", "block_hash": "0xblock", "block_height": 100, "node_id": 4,
        "nonces": proofs.iter().map(|(n, _)| **n).collect::<Vec<_>>(), "dist": proofs.iter().map(|(_, d)| **d).collect::<Vec<_>>()});
    let forged = json!({"public_key": "alice", "block_hash": "0xblock", "block_height": 100, "node_id": 5,
        "nonces": misses.iter().take(5).map(|(n, _)| **n).collect::<Vec<_>>(), "dist": [1.0, 1.0, 1.0, 1.0, 1.0]});
    assert_eq!(d.post_json("POST", "/api/v1/pow/validate", &honest), (200, Value::Null));
    assert_eq!(d.post_json("POST", "/api/v1/pow/validate", &forged), (200, Value::Null));

    eventually("two verdicts delivered", || callback.validated.lock().unwrap().len() == 2);
    let verdicts = callback.validated.lock().unwrap().clone();
    let by_node = |id: i64| verdicts.iter().find(|v| v["node_id"] == id).unwrap().clone();
    let (h, f) = (by_node(4), by_node(5));
    assert_eq!((h["n_invalid"].as_i64(), h["fraud_detected"].as_bool()), (Some(0), Some(false)), "{h}");
    assert_eq!(h["probability_honest"], 1.0);
    assert_eq!((f["n_invalid"].as_i64(), f["fraud_detected"].as_bool()), (Some(5), Some(true)), "{f}");
    assert_eq!(f["received_dist"], json!([1.0, 1.0, 1.0, 1.0, 1.0]));
    assert_eq!((f["r_target"].as_f64(), f["fraud_threshold"].as_f64()), (Some(R_TARGET), Some(1e-7)));

    // A claim that is not even a proof is taken (upstream answers 200 to any batch) and judged:
    // a miss.
    let bad = json!({"public_key": "alice", "block_hash": "0xblock", "block_height": 100, "node_id": 6, "nonces": [1], "dist": [1.9]});
    let (status, answer) = d.post_json("POST", "/api/v1/pow/validate", &bad);
    assert_eq!((status, answer), (200, json!(null)));
    let validated_of = |id: i64| callback.validated.lock().unwrap().iter().find(|v| v["node_id"] == id).cloned();
    eventually("the bogus claim judged", || validated_of(6).is_some());
    assert_eq!(validated_of(6).unwrap()["n_invalid"], 1);
}

#[test]
fn without_a_gpu_poc_is_refused_unless_cpu_compute_is_allowed() {
    // The fake NVML shows GPUs, but CUDA has none here: production refuses to prove on a CPU.
    let d = Daemon::start_on_gpus_only(&Scenario::hgx_h100(), None);
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request("http://127.0.0.1:9", 0));
    assert_eq!(status, 503, "{answer}");
    assert!(answer["detail"].as_str().unwrap().starts_with("no GPU"), "{answer}");
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED", "no session started");
}

#[test]
fn pow_endpoints_answer_like_upstream() {
    let d = daemon("http://127.0.0.1:9");
    assert_eq!(d.json("GET", "/api/v1/pow/status"), (200, json!({"status": "NOT_LOADED"})));
    assert_eq!(d.json("POST", "/api/v1/pow/stop").1, json!({"status": "OK", "pow_status": "PoW is not running"}));
    assert_eq!(d.json("POST", "/api/v1/pow/phase/generate").0, 400);
    assert_eq!(d.json("POST", "/api/v1/pow/phase/generate").1, json!({"detail": "PoW is not running"}));

    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request("http://127.0.0.1:9", -1));
    assert_eq!((status, answer), (400, json!({"detail": "Node ID and node count must be set"})));

    // Proofs go only to the network node the operator configured, whoever asks.
    let elsewhere = init_request("http://127.0.0.1:99/v1/poc-batches", 0);
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &elsewhere);
    assert_eq!(status, 403, "{answer}");
    assert_eq!(
        answer["detail"],
        "callback URL http://127.0.0.1:99/v1/poc-batches is not under this ML node's mlCallbackUrl http://127.0.0.1:9"
    );

    let mut missing = init_request("http://127.0.0.1:9", 0);
    missing.as_object_mut().unwrap().remove("block_hash");
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init", &missing);
    assert_eq!(status, 422);
    assert!(answer["detail"].as_str().unwrap().contains("block_hash"), "{answer}");

    let (status, answer) = d.send("POST", "/api/v1/pow/init", "{not json").unwrap();
    assert_eq!(status, 422, "{answer}");

    let mut bad_params = init_request("http://127.0.0.1:9", 0);
    bad_params["params"]["n_heads"] = json!(5);
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init", &bad_params);
    assert_eq!(
        (status, answer["detail"].as_str().unwrap()),
        (400, "invalid PoC params: dim must be a multiple of n_heads")
    );

    // Init without a phase loads the model and idles; the network node may use a version prefix.
    let (status, answer) = d.post_json("POST", "/v3.0.8/api/v1/pow/init", &init_request("http://127.0.0.1:9", 0));
    assert_eq!(status, 200, "{answer}");
    eventually("model loaded", || {
        d.json("GET", "/api/v1/pow/status").1 == json!({"status": "IDLE", "is_model_initialized": true})
    });
    assert_eq!(d.json("POST", "/api/v1/stop").1, json!({"status": "OK"}));
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "STOPPED");
}

#[test]
fn proofs_reach_the_network_node_and_count_as_weight() {
    // The devnet's callback server stands in for the network node's :9100.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::new(Vec::new())));
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let url = format!("http://{}/v1/poc-batches", listener.local_addr().unwrap());
    let app = gonka_devnet::callback_router(devnet.clone());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });

    let d = daemon(&url);
    let mut request = init_request(&url, 3);
    request["node_count"] = json!(4);
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &request).0, 200);
    eventually("weight counted", || devnet.lock().unwrap().weights(100).get(&3).copied().unwrap_or(0) >= 10);
    d.json("POST", "/api/v1/pow/stop");

    let devnet = devnet.lock().unwrap();
    let weights = devnet.weights(100);
    assert_eq!(weights.keys().copied().collect::<Vec<_>>(), [3], "only this ML node posted");
    // Node 3 of 4 proves nonces 3, 7, 11, ...: its own share, none twice.
    let nonces: Vec<i64> = devnet.generated.iter().flat_map(|b| b.nonces.clone()).collect();
    assert!(nonces.iter().all(|n| n % 4 == 3), "{nonces:?}");
    assert_eq!(weights[&3], nonces.len());
}

/// Proofs go to the checked callback URL and nowhere else: a URL that climbs out of the
/// configured base (`base/../x`, plain or percent-encoded) is refused at init, and a callback
/// server answering with a redirect is not followed (the sends count as failures, the proofs
/// wait, the redirect's target hears nothing).
#[test]
fn callbacks_stay_under_the_base_and_redirects_are_not_followed() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (elsewhere, app) = callback_app();
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let target = format!("http://{}", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    let redirect = Router::new().fallback(move |uri: axum::http::Uri| {
        let location = format!("{target}{uri}");
        async move { (StatusCode::PERMANENT_REDIRECT, [(axum::http::header::LOCATION, location)]) }
    });
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}/gonka", listener.local_addr().unwrap());
    runtime.spawn(async move { axum::serve(listener, redirect).await.unwrap() });

    let d = daemon(&base);
    for escape in [format!("{base}/../v1/poc-batches"), format!("{base}/%2E%2e/v1/poc-batches")] {
        let (status, body) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&escape, 0));
        assert_eq!(status, 403, "{escape}: {body}");
    }
    let url = format!("{base}/v1/poc-batches");
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    eventually("sends fail on the redirect", || {
        metric(&d, "gonka_ml_node_poc_send_failures_total{kind=\"generated\"}") >= 2.0
    });
    assert!(elsewhere.generated.lock().unwrap().is_empty(), "the redirect was followed");
}
