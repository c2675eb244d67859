//! The report hook, in process, as the operator's report stream will use it: the inventory is
//! there as soon as the daemon probed, the state follows PoC sessions, counters grow.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use gonka_node_daemon::node_state::Reporting;
use gonka_node_daemon::{Settings, run_with};
use gonka_protocol::ml_node::ServiceState;

fn settings() -> (Settings, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], gonka_e2e::free_port().unwrap()));
    // The fake library with no scenario file: NVML works, the node has no GPUs.
    let settings = Settings {
        config: None,
        listen: addr,
        nvml_library: Some(PathBuf::from(fake_nvml::LIBRARY)),
        pod: Default::default(),
        // No GPUs here: PoC runs on the CPU.
        allow_cpu_compute: true,
        shutdown_grace: std::time::Duration::from_secs(5),
        api_token: None,
        models_dir: None,
        model_mirror: None,
        models_min_free_gb: 10,
        inference_listen: Some("127.0.0.1:0".parse().unwrap()),
        inference_max_in_flight: 1024,
        inference_body_timeout: Duration::from_secs(30),
        metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
        vllm: None,
        mtls: None,
        lending_sample: Duration::from_secs(5),
        lending_adopt: gonka_node_daemon::lending::ADOPT_WINDOW,
    };
    (settings, addr)
}

async fn wait_for<T: Clone>(rx: &mut tokio::sync::watch::Receiver<T>, what: &str, check: impl Fn(&T) -> bool) -> T {
    tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|v| check(v)))
        .await
        .unwrap_or_else(|_| panic!("{what}: not within 60s"))
        .expect("daemon alive")
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_is_published_after_the_probe() {
    let reporting = Reporting::default();
    let mut inventory = reporting.inventory();
    let (settings, _) = settings();
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(run_with(settings, reporting.clone(), stop.clone().cancelled_owned()));

    let seen = wait_for(&mut inventory, "inventory", |i| i.driver.is_some()).await;
    assert_eq!(seen.driver.unwrap().driver_version, "550.54.15");
    assert_eq!((seen.devices.len(), seen.nvml_error), (0, None));
    assert_eq!(reporting.state().borrow().service, ServiceState::Stopped);
    stop.cancel();
    daemon.await.unwrap().unwrap();
}

#[cfg(feature = "torch")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_follows_the_poc_session_and_counts_nonces() {
    let reporting = Reporting::default();
    let mut state = reporting.state();
    let (settings, addr) = settings();
    let stop = tokio_util::sync::CancellationToken::new();
    let daemon = tokio::spawn(run_with(settings, reporting.clone(), stop.clone().cancelled_owned()));

    let init = serde_json::json!({
        "node_id": 0, "node_count": 1, "block_hash": "0xhook", "block_height": 1, "public_key": "pk",
        "batch_size": 4, "r_target": 1.41, "fraud_threshold": 1e-7, "url": "http://127.0.0.1:9",
        "params": {"dim": 32, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "vocab_size": 64, "multiple_of": 32, "seq_len": 4}
    });
    let post = |path: &'static str, body: String| async move {
        let response = post_http(addr, path, &body).await;
        assert!(response.starts_with("HTTP/1.1 200"), "{path}: {response}");
    };
    post("/api/v1/pow/init/generate", init.to_string()).await;
    let running = wait_for(&mut state, "nonces counted", |s| s.poc.nonces_computed >= 8).await;
    assert_eq!(running.service, ServiceState::Pow);
    post("/api/v1/pow/stop", String::new()).await;
    wait_for(&mut state, "stopped", |s| s.service == ServiceState::Stopped).await;
    stop.cancel();
    daemon.await.unwrap().unwrap();
}

/// A bare HTTP/1.1 POST.
#[cfg(feature = "torch")]
async fn post_http(addr: SocketAddr, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The daemon may still be binding its port.
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}
