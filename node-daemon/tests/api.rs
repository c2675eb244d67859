//! The daemon binary, answering the ML-node API over HTTP, with its GPUs simulated by the fake
//! `libnvidia-ml.so.1` (the real nvml-wrapper code path). One daemon process per scenario, so
//! each has its own fake GPUs.

mod common;

use std::path::Path;
use std::process::Command;

use common::{Daemon, eventually};
use fake_nvml::{GpuState, Scenario};
use serde_json::{Value, json};

#[test]
fn an_hgx_h100_box_answers_in_upstream_shapes() {
    let d = Daemon::start(&Scenario::hgx_h100());

    let (status, devices) = d.json("GET", "/api/v1/gpu/devices");
    assert_eq!(status, 200);
    assert_eq!(devices["count"], 8);
    assert_eq!(
        devices["devices"][0],
        json!({
            "index": 0, "name": "NVIDIA H100 80GB HBM3",
            "total_memory_mb": 81559, "free_memory_mb": 80535, "used_memory_mb": 1024,
            "utilization_percent": 37, "temperature_c": 41,
            "is_available": true, "error_message": null
        })
    );

    let (status, driver) = d.json("GET", "/api/v1/gpu/driver");
    assert_eq!(status, 200);
    assert_eq!(
        driver,
        json!({"driver_version": "550.54.15", "cuda_driver_version": "12.4", "nvml_version": "12.550.54.15"})
    );

    let (status, state) = d.json("GET", "/api/v1/state");
    assert_eq!(status, 200);
    assert_eq!(state["state"], "STOPPED");
    assert_eq!(state["version"], env!("CARGO_PKG_VERSION"));
    assert!(state.as_object().unwrap().contains_key("poc_status"), "upstream sends nulls: {state}");
    assert_eq!(d.json("POST", "/api/v1/stop"), (200, json!({"status": "OK"})));

    let (status, health) = d.json("GET", "/health");
    assert_eq!(status, 200);
    assert_eq!(health["status"], "healthy");
    assert_eq!(health["service_state"], "STOPPED");
    assert_eq!((health["gpu"]["available"].clone(), health["gpu"]["count"].clone()), (json!(true), json!(8)));
    assert_eq!(health["managers"]["pow"], json!({"running": false, "healthy": true}));
    assert_eq!(d.json("GET", "/livez").0, 200);
    assert_eq!(d.json("GET", "/readyz"), (200, json!({"ready": true})));

    // The network node may address a versioned ML node.
    let (status, prefixed) = d.json("GET", "/v3.0.8/api/v1/gpu/devices");
    assert_eq!((status, prefixed["count"].clone()), (200, json!(8)));

    // A model that cannot start: the network node is told so as upstream tells an engine
    // failure (not a 404, which reads as an old ML node) — with the engine (`torch`), 500 naming
    // why (no models directory here); without it, 200 `ERROR` saying no engine runs. A malformed
    // request still gets the field named.
    let up = json!({"model": "Qwen/Qwen3-0.6B", "dtype": "auto", "additional_args": ["--max-model-len", "4096"]});
    let (status, answer) = d.post_json("POST", "/api/v1/inference/up", &up);
    if cfg!(feature = "torch") {
        assert_eq!(status, 500, "{answer}");
        assert!(answer["detail"].as_str().unwrap().contains("Qwen/Qwen3-0.6B not found"), "{answer}");
    } else {
        assert_eq!((status, &answer["status"]), (200, &json!("ERROR")), "{answer}");
        assert!(answer["message"].as_str().unwrap().starts_with("cannot serve Qwen/Qwen3-0.6B"), "{answer}");
    }
    let (status, answer) = d.post_json("POST", "/api/v1/inference/up/async", &json!({"model": "m"}));
    assert_eq!(status, 422);
    assert!(answer["detail"].as_str().unwrap().contains("dtype"), "{answer}");
    assert_eq!(d.json("POST", "/api/v1/inference/down"), (200, json!({"status": "OK"})));

    // Errors are JSON, FastAPI-style.
    assert_eq!(d.json("GET", "/api/v1/nothing-here"), (404, json!({"detail": "Not Found"})));
    assert_eq!(d.json("GET", "/api/v1/stop"), (405, json!({"detail": "Method Not Allowed"})));

    let metrics = d.metrics();
    for line in [
        "gonka_ml_node_gpus 8",
        "gonka_ml_node_gpu_power_watts{gpu=\"0\",uuid=\"GPU-h100-0000\",model=\"NVIDIA H100 80GB HBM3\"} 350.0",
        "gonka_ml_node_gpu_temperature_celsius{gpu=\"7\",uuid=\"GPU-h100-0007\",model=\"NVIDIA H100 80GB HBM3\"} 41",
        "gonka_ml_node_gpu_memory_total_mebibytes{gpu=\"3\",uuid=\"GPU-h100-0003\",model=\"NVIDIA H100 80GB HBM3\"} 81559",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
}

#[test]
fn a_mixed_box_reports_each_model_and_skips_ecc_where_unsupported() {
    let d = Daemon::start(&Scenario::mixed());
    let (_, devices) = d.json("GET", "/api/v1/gpu/devices");
    let names: Vec<&str> = devices["devices"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["NVIDIA A100-SXM4-40GB", "NVIDIA A100-SXM4-40GB", "NVIDIA GeForce RTX 4090", "NVIDIA GeForce RTX 4090"]
    );
    assert_eq!(devices["devices"][2]["total_memory_mb"], 24564);
    let metrics = d.metrics();
    assert!(metrics.contains(
        "gonka_ml_node_gpu_ecc_corrected_errors{gpu=\"0\",uuid=\"GPU-a100-0000\",model=\"NVIDIA A100-SXM4-40GB\"} 0"
    ));
    assert!(!metrics.contains("gonka_ml_node_gpu_ecc_corrected_errors{gpu=\"2\""), "RTX 4090 has no ECC:\n{metrics}");
}

#[test]
fn ecc_errors_show_in_metrics() {
    let d = Daemon::start(&Scenario::ecc_errors());
    let metrics = d.metrics();
    assert!(metrics.contains("gonka_ml_node_gpu_ecc_uncorrected_errors{gpu=\"2\",uuid=\"GPU-h100-0002\",model=\"NVIDIA H100 80GB HBM3\"} 3"), "{metrics}");
    assert!(metrics.contains("gonka_ml_node_gpu_ecc_corrected_errors{gpu=\"2\",uuid=\"GPU-h100-0002\",model=\"NVIDIA H100 80GB HBM3\"} 1200"), "{metrics}");
}

#[test]
fn a_gpu_falling_off_the_bus_mid_run_is_reported_unavailable() {
    let mut scenario = Scenario::hgx_h100();
    let d = Daemon::start(&scenario);
    assert_eq!(d.json("GET", "/api/v1/gpu/devices").1["devices"][5]["is_available"], true);

    scenario.gpus[5].state = GpuState::Lost;
    d.change(&scenario);
    eventually("GPU 5 lost", || d.json("GET", "/api/v1/gpu/devices").1["devices"][5]["is_available"] == false);
    let (_, devices) = d.json("GET", "/api/v1/gpu/devices");
    let lost = &devices["devices"][5];
    assert_eq!(lost["name"], "Unknown");
    assert_eq!(lost["total_memory_mb"], Value::Null);
    assert!(lost["error_message"].as_str().is_some_and(|m| !m.is_empty()), "{lost}");
    assert_eq!(devices["devices"][4]["is_available"], true, "the others keep working");
    assert!(d.metrics().contains("gonka_ml_node_gpu_available{gpu=\"4\""));
}

#[test]
fn xid_events_are_classified_and_take_broken_gpus_out() {
    let mut scenario = Scenario::hgx_h100();
    let d = Daemon::start(&scenario);
    scenario.xids = vec![(1, 13), (3, 48), (6, 79)];
    d.change(&scenario);

    eventually("three XIDs counted", || d.metrics().matches("gonka_ml_node_gpu_xid_errors_total{").count() == 3);
    let metrics = d.metrics();
    for line in [
        "gonka_ml_node_gpu_xid_errors_total{gpu=\"1\",xid=\"13\",class=\"transient\"} 1",
        "gonka_ml_node_gpu_xid_errors_total{gpu=\"3\",xid=\"48\",class=\"needs_reset\"} 1",
        "gonka_ml_node_gpu_xid_errors_total{gpu=\"6\",xid=\"79\",class=\"fatal\"} 1",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let (_, devices) = d.json("GET", "/api/v1/gpu/devices");
    let available: Vec<bool> =
        devices["devices"].as_array().unwrap().iter().map(|g| g["is_available"].as_bool().unwrap()).collect();
    assert_eq!(available, [true, true, true, false, true, true, false, true]);
    assert_eq!(devices["devices"][3]["error_message"], "XID 48 (double-bit ECC error): needs_reset");
    assert_eq!(devices["devices"][6]["error_message"], "XID 79 (GPU has fallen off the bus): fatal");
}

#[test]
fn without_a_driver_there_are_no_gpus_and_health_says_so() {
    for (what, daemon) in [
        ("driver not loaded", Daemon::start(&Scenario::no_driver())),
        ("no library", Daemon::start_with(&Scenario::hgx_h100(), Some(Path::new("/nonexistent/libnvidia-ml.so.1")))),
    ] {
        assert_eq!(daemon.json("GET", "/api/v1/gpu/devices"), (200, json!({"devices": [], "count": 0})), "{what}");
        let (status, driver) = daemon.json("GET", "/api/v1/gpu/driver");
        assert_eq!(status, 503, "{what}");
        assert!(driver["detail"].as_str().unwrap().starts_with("NVML is not available"), "{what}: {driver}");
        let (status, health) = daemon.json("GET", "/health");
        assert_eq!(
            (status, health["status"].clone(), health["gpu"]["available"].clone()),
            (503, json!("unhealthy"), json!(false)),
            "{what}"
        );
        // The process itself is fine: kubelet's liveness probe must not restart it.
        assert_eq!(daemon.try_request("GET", "/healthz").unwrap().0, 200, "{what}");
    }
}

#[test]
fn a_broken_config_file_stops_the_daemon_with_the_reason() {
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), r#"{"gonkaNode": "gpu/h100", "surprise": 1}"#).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gonka-node-daemon"))
        .arg("--config")
        .arg(config.path())
        .env("GONKA_NVML_LIBRARY", fake_nvml::LIBRARY)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is not a valid daemon config") && stderr.contains("surprise"), "{stderr}");
}

#[test]
fn ready_only_with_the_gpus_the_gonka_node_gives_it() {
    let config = |gpus: Option<u32>| {
        json!({
            "gonkaNode": "gpu/h100", "mlCallbackUrl": "http://api:9100", "pocPort": 8080, "inferencePort": 5000,
            "gpus": gpus, "models": [], "poc": {"batchSize": 32, "sendIntervalSeconds": 5, "maxPendingBatches": 100}
        })
    };
    let mut scenario = Scenario::hgx_h100();
    let d = Daemon::start_on_gpus_only(&scenario, Some(&config(Some(8))));
    assert_eq!(d.json("GET", "/readyz"), (200, json!({"ready": true})));
    // One of its eight GPUs falls off the bus: not ready any more, and it says why.
    scenario.gpus[5].state = GpuState::Lost;
    d.change(&scenario);
    eventually("not ready with 7 of 8 GPUs", || d.json("GET", "/readyz").0 == 503);
    assert_eq!(
        d.json("GET", "/readyz").1,
        json!({"ready": false, "reason": "7 of the 8 GPUs this ML node needs are available"})
    );

    // No GPU at all (no driver): never ready, so never registered; without a config, one GPU
    // is the least it needs.
    let d = Daemon::start_on_gpus_only(&Scenario::no_driver(), None);
    assert_eq!(d.json("GET", "/readyz").1["reason"], "0 of the 1 GPUs this ML node needs are available");
    // The development setting (what the other tests run with) is ready on the CPU.
    assert_eq!(Daemon::start(&Scenario::no_driver()).json("GET", "/readyz"), (200, json!({"ready": true})));
}

#[test]
fn with_a_token_every_api_call_must_carry_it() {
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "node-config-auth-token\n").unwrap();
    let d = Daemon::start_with_env(&Scenario::hgx_h100(), &[("GONKA_API_TOKEN_FILE", token.path().to_str().unwrap())]);
    let (status, answer) = d.json("GET", "/api/v1/state");
    assert_eq!(status, 401, "{answer}");
    let call = |auth: &str| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        write!(
            stream,
            "GET /api/v1/gpu/devices HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response.split_whitespace().nth(1).unwrap().parse::<u16>().unwrap()
    };
    assert_eq!(call("Bearer node-config-auth-token"), 200);
    assert_eq!(call("Bearer someone-elses"), 401);
    // The kubelet's probes and the metrics scrape carry no token.
    assert_eq!(d.json("GET", "/readyz").0, 200);
    assert_eq!(d.try_request("GET", "/healthz").unwrap().0, 200);
}

#[test]
fn inference_is_asked_only_for_the_models_the_gonka_node_gives_it() {
    let config = json!({
        "gonkaNode": "gpu/h100", "mlCallbackUrl": "http://api:9100", "pocPort": 8080, "inferencePort": 5000,
        "gpus": 8, "models": [{"id": "Qwen/QwQ-32B", "args": []}],
        "poc": {"batchSize": 32, "sendIntervalSeconds": 5, "maxPendingBatches": 100}
    });
    let d = Daemon::start_configured(&Scenario::hgx_h100(), &config);
    let up = |model: &str| d.post_json("POST", "/api/v1/inference/up", &json!({"model": model, "dtype": "auto"}));
    let refused = "someone/else is not a model this ML node is configured for (Qwen/QwQ-32B)";
    let (status, answer) = up("someone/else");
    if cfg!(feature = "torch") {
        // Refused before anything loads (409, as upstream refuses a start it cannot make).
        assert_eq!((status, answer["detail"].as_str()), (409, Some(refused)));
        let (status, answer) = up("Qwen/QwQ-32B");
        assert_eq!(status, 500, "a configured model is looked for: {answer}");
    } else {
        assert_eq!(answer["message"], refused);
        assert!(up("Qwen/QwQ-32B").1["message"].as_str().unwrap().starts_with("cannot serve Qwen/QwQ-32B"));
    }
}

/// `/metrics` and `/readyz` sit outside the in-flight limit, so a flood of them must not be a
/// flood of NVML readings: the GPUs are read at most once a second, one reader at a time (each
/// reading counts one `nvmlDeviceGetCount_v2` in the fake library).
#[test]
fn a_flood_of_probes_and_scrapes_reads_the_gpus_about_once_a_second() {
    let counted = tempfile::NamedTempFile::new().unwrap();
    let count_file = counted.path().to_str().unwrap().to_string();
    let d = Daemon::start_with_env(&Scenario::hgx_h100(), &[("FAKE_NVML_COUNT_FILE", &count_file)]);
    let calls = || std::fs::read_to_string(&count_file).ok().and_then(|t| t.trim().parse::<u64>().ok()).unwrap_or(0);
    assert_eq!(d.json("GET", "/readyz").0, 200);
    let before = calls();
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for i in 0..16 {
            let d = &d;
            scope.spawn(move || {
                for _ in 0..8 {
                    let status = if i % 2 == 0 { d.monitoring("/metrics").0 } else { d.json("GET", "/readyz").0 };
                    assert_eq!(status, 200);
                }
            });
        }
    });
    let readings = calls() - before;
    let allowed = started.elapsed().as_secs() + 2;
    assert!(readings <= allowed, "128 requests read the GPUs {readings} times in {:?}", started.elapsed());
    // And the readings are still current: a GPU lost shows in the metrics after the TTL.
    let mut scenario = Scenario::hgx_h100();
    scenario.gpus[3].state = GpuState::Lost;
    d.change(&scenario);
    eventually("the lost GPU shows in the metrics", || {
        d.metrics().lines().any(|l| l.starts_with("gonka_ml_node_gpu_available{gpu=\"3\"") && l.ends_with(" 0"))
    });
}

/// The monitoring port carries `/metrics` and the kubelet's probes and nothing else, so a
/// scraper needs no access to the ML-node API; the API no longer serves `/metrics`, and keeps
/// the health routes upstream's network node reads.
#[test]
fn metrics_and_probes_are_on_their_own_port() {
    let d = Daemon::start(&Scenario::hgx_h100());
    let (status, metrics) = d.monitoring("/metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("gonka_ml_node_gpus 8"), "{metrics}");
    assert_eq!(d.monitoring("/healthz"), (200, "ok".to_string()));
    assert_eq!(d.monitoring("/readyz").0, 200);
    assert_eq!(d.monitoring("/livez").0, 200);
    for path in ["/api/v1/state", "/api/v1/gpu/devices", "/health", "/v3.0.8/api/v1/state"] {
        assert_eq!(d.monitoring(path).0, 404, "{path} on the monitoring port");
    }
    assert_eq!(d.json("GET", "/metrics"), (404, json!({"detail": "Not Found"})));
    for path in ["/health", "/livez", "/readyz", "/healthz", "/api/v1/state"] {
        assert_eq!(d.try_request("GET", path).unwrap().0, 200, "{path} on the ML-node API");
    }
    // A POST to the monitoring port changes nothing there.
    assert_eq!(common::request_on(d.metrics_port, "POST", "/api/v1/stop", "").unwrap().0, 404);
}

/// The test helper's readiness check tells whose socket a port is: this process's listener is
/// ours, not another process's (a daemon that lost its port to someone else is not ready).
#[test]
fn a_port_is_ours_only_when_our_process_listens_on_it() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    assert!(common::listens_on(std::process::id(), port));
    let mut other = Command::new("sleep").arg("30").spawn().unwrap();
    assert!(!common::listens_on(other.id(), port), "another process does not hold our socket");
    other.kill().unwrap();
    other.wait().unwrap();
    drop(listener);
    assert!(!common::listens_on(std::process::id(), port), "a closed listener is not listening");
}
