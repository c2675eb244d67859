//! Opportunistic mode through the daemon binary: the fake NVML library shows someone else's
//! process (or utilisation) on the GPUs, the daemon yields — refusing the managers with 503 and
//! saying so in `/metrics` — and takes work again once the GPUs stayed idle for the configured
//! time. A daemon without `opportunistic` never yields to the same process.

mod common;

use common::{Daemon, eventually};
use fake_nvml::{FakeProcess, Scenario};
use serde_json::{Value, json};

fn config(opportunistic: Option<Value>) -> Value {
    let mut config = json!({
        "gonkaNode": "gpu/lent", "mlCallbackUrl": "http://api:9100", "pocPort": 8080, "inferencePort": 5000,
        "gpus": 8, "models": [],
        "poc": {"batchSize": 32, "sendIntervalSeconds": 5, "maxPendingBatches": 100}
    });
    if let Some(o) = opportunistic {
        config["opportunistic"] = o;
    }
    config
}

/// Eight H100s with nothing on them: the shipped scenario's GPUs show utilisation.
fn idle_box() -> Scenario {
    let mut scenario = Scenario::hgx_h100();
    for gpu in &mut scenario.gpus {
        gpu.utilization = 0;
    }
    scenario
}

/// A manager's endpoint: refused while yielded, answered 200 otherwise (with or without the
/// engine there is nothing to take down).
fn down(d: &Daemon) -> (u16, Value) {
    d.json("POST", "/api/v1/inference/down")
}

#[test]
fn someone_elses_process_makes_it_yield_and_idle_gpus_bring_it_back() {
    let lent = Daemon::start_configured_with_env(
        &idle_box(),
        &config(Some(json!({"rejoinAfterIdleSeconds": 3, "busyUtilizationPercent": 10}))),
        &[("GONKA_LENDING_SAMPLE_SECONDS", "1")],
    );
    let own = Daemon::start_configured_with_env(&idle_box(), &config(None), &[("GONKA_LENDING_SAMPLE_SECONDS", "1")]);
    eventually("the lending watcher sampled idle GPUs", || lent.metric("gonka_ml_node_yielded") == Some(0.0));
    assert_eq!(down(&lent).0, 200);

    // An in-house job starts on GPU 3.
    let mut busy = idle_box();
    busy.processes.push(FakeProcess { gpu: 3, pid: 4242, used_mb: 30_000 });
    busy.gpus[3].utilization = 97;
    lent.change(&busy);
    own.change(&busy);
    eventually("the lent ML node yielded", || lent.metric("gonka_ml_node_yielded") == Some(1.0));
    assert_eq!(lent.metric("gonka_ml_node_yields_total"), Some(1.0));
    let (status, answer) = down(&lent);
    assert_eq!(status, 503, "{answer}");
    let detail = answer["detail"].as_str().unwrap();
    assert!(detail.contains("GPU 3: process 4242 is not this ML node's"), "{detail}");
    assert!(detail.contains("idle for 3 s"), "{detail}");
    // What is not a manager still answers: the network node can read the state, the kubelet
    // probes it.
    assert_eq!(lent.json("GET", "/api/v1/state").0, 200);
    assert_eq!(lent.monitoring("/readyz").0, 200);
    // Negative control: the same process on a GPU of a node that is not lent changes nothing
    // (its watcher does not run; the lent one has sampled it by now).
    assert_eq!(down(&own).0, 200);
    assert_eq!(own.metric("gonka_ml_node_yields_total"), Some(0.0));

    // The job ends: 3 s of idle GPUs later the ML node takes work again.
    lent.change(&idle_box());
    eventually("the lent ML node rejoined", || lent.metric("gonka_ml_node_yielded") == Some(0.0));
    assert_eq!(down(&lent).0, 200);
    assert_eq!(lent.metric("gonka_ml_node_yields_total"), Some(1.0));
}

#[test]
fn utilisation_it_did_not_cause_makes_it_yield_and_busy_gpus_keep_it_out() {
    let lent = Daemon::start_configured_with_env(
        &idle_box(),
        &config(Some(json!({"rejoinAfterIdleSeconds": 2, "busyUtilizationPercent": 20}))),
        &[("GONKA_LENDING_SAMPLE_SECONDS", "1")],
    );
    eventually("the lending watcher sampled idle GPUs", || lent.metric("gonka_ml_node_yielded") == Some(0.0));
    // Above the threshold (the boundary is the unit tests'): someone's work NVML cannot list,
    // in another container of a shared GPU.
    let mut busy = idle_box();
    busy.gpus[5].utilization = 21;
    lent.change(&busy);
    eventually("the lent ML node yielded", || lent.metric("gonka_ml_node_yielded") == Some(1.0));
    let (status, answer) = down(&lent);
    assert_eq!(status, 503);
    assert!(
        answer["detail"].as_str().unwrap().contains("GPU 5: 21% utilised while this ML node runs nothing on it"),
        "{answer}"
    );
    // Still busy: it stays out well past the idle time (5 samples at 1 s, 2 s to rejoin)...
    let started = std::time::Instant::now();
    eventually("five seconds passed", || started.elapsed() >= std::time::Duration::from_secs(5));
    assert_eq!(lent.metric("gonka_ml_node_yielded"), Some(1.0));
    // ...and comes back only once idle.
    lent.change(&idle_box());
    eventually("the lent ML node rejoined", || lent.metric("gonka_ml_node_yielded") == Some(0.0));
}

/// A yield mid-PoC hands back what it can: the pending proofs reach the network node (none lost,
/// none invented), the session stops, and a new one is refused until the GPUs are idle again.
/// Proofs would go out only every 300 s, so what arrives comes from the yield.
#[cfg(feature = "torch")]
#[test]
fn a_yield_mid_poc_delivers_every_pending_proof_and_stops() {
    use common::poc_v1::{init_request, start_callback};

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (callback, url) = start_callback(&runtime);
    let mut config = config(Some(json!({"rejoinAfterIdleSeconds": 3600, "busyUtilizationPercent": 10})));
    config["mlCallbackUrl"] = json!(url);
    config["poc"] = json!({"batchSize": 8, "sendIntervalSeconds": 300, "maxPendingBatches": 1000});
    // Processes appearing within 1 s of the session starting are its own.
    let d = Daemon::start_configured_with_env(
        &idle_box(),
        &config,
        &[("GONKA_LENDING_SAMPLE_SECONDS", "1"), ("GONKA_LENDING_ADOPT_SECONDS", "1")],
    );
    assert_eq!(d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0)).0, 200);
    let started = std::time::Instant::now();
    let valid = || d.metric("gonka_ml_node_poc_nonces_valid_total").unwrap_or(0.0);
    // A process that appears sooner would be taken for the session's own (the window, then a
    // sample to close it).
    eventually("proofs pending, the adoption window over", || {
        valid() >= 20.0 && started.elapsed() >= std::time::Duration::from_secs(3)
    });
    assert_eq!(d.json("GET", "/api/v1/state").1["state"], "POW");
    assert!(callback.generated.lock().unwrap().is_empty(), "nothing sent yet");

    let mut busy = idle_box();
    busy.processes.push(FakeProcess { gpu: 0, pid: 777, used_mb: 70_000 });
    d.change(&busy);
    eventually("PoC stopped by the yield", || d.json("GET", "/api/v1/state").1["state"] == "STOPPED");
    assert_eq!(d.metric("gonka_ml_node_yielded"), Some(1.0));
    let delivered = callback.every_proof_delivered();
    assert!(delivered.len() >= 20, "{} proofs delivered", delivered.len());
    let (status, answer) = d.post_json("POST", "/api/v1/pow/init/generate", &init_request(&url, 0));
    assert_eq!(status, 503, "{answer}");
    assert!(answer["detail"].as_str().unwrap().contains("GPU 0: process 777"), "{answer}");
}
