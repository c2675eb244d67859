//! The daemon binary under test: one process per scenario, GPUs from the fake NVML library.
#![allow(dead_code)] // each test binary uses a different part

#[cfg(feature = "torch")]
pub mod poc_v1;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fake_nvml::Scenario;
use serde_json::Value;

pub struct Daemon {
    child: Child,
    pub port: u16,
    /// The monitoring port (`/metrics`, the probes).
    pub metrics_port: u16,
    scenario: tempfile::NamedTempFile,
    _config: Option<tempfile::NamedTempFile>,
}

impl Daemon {
    pub fn start(scenario: &Scenario) -> Self {
        Self::start_with(scenario, Some(Path::new(fake_nvml::LIBRARY)))
    }

    /// Runs under an operator-style `daemon.json`.
    pub fn start_configured(scenario: &Scenario, config: &Value) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config.to_string()).unwrap();
        Self::spawn(scenario, Some(Path::new(fake_nvml::LIBRARY)), Some(file))
    }

    /// Under `daemon.json` with extra environment.
    pub fn start_configured_with_env(scenario: &Scenario, config: &Value, env: &[(&str, &str)]) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), config.to_string()).unwrap();
        Self::spawn_as(scenario, Some(Path::new(fake_nvml::LIBRARY)), Some(file), true, env)
    }

    pub fn start_with(scenario: &Scenario, library: Option<&Path>) -> Self {
        Self::spawn(scenario, library, None)
    }

    /// As in production: no CPU compute, ready only with the GPUs `config` asks for.
    pub fn start_on_gpus_only(scenario: &Scenario, config: Option<&Value>) -> Self {
        let file = config.map(|c| {
            let file = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(file.path(), c.to_string()).unwrap();
            file
        });
        Self::spawn_as(scenario, Some(Path::new(fake_nvml::LIBRARY)), file, false, &[])
    }

    /// With extra environment (flags the daemon reads from it).
    pub fn start_with_env(scenario: &Scenario, env: &[(&str, &str)]) -> Self {
        Self::spawn_as(scenario, Some(Path::new(fake_nvml::LIBRARY)), None, true, env)
    }

    fn spawn(scenario: &Scenario, library: Option<&Path>, config: Option<tempfile::NamedTempFile>) -> Self {
        // The tests compute PoC on the CPU (no GPU here): the development setting.
        Self::spawn_as(scenario, library, config, true, &[])
    }

    fn spawn_as(
        scenario: &Scenario,
        library: Option<&Path>,
        config: Option<tempfile::NamedTempFile>,
        allow_cpu_compute: bool,
        env: &[(&str, &str)],
    ) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        scenario.write(file.path()).unwrap();
        // A port found free may be taken before the daemon binds it (another test's daemon, a
        // client's outgoing connection): the daemon then exits, and is started again on others.
        // Ready means this child listens on both ports, not merely that something answers there.
        for attempt in 1..=5 {
            let port = gonka_e2e::free_port().unwrap();
            let metrics_port = gonka_e2e::free_port().unwrap();
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_gonka-node-daemon"));
            cmd.env("GONKA_LISTEN", format!("127.0.0.1:{port}"))
                // Any free port: daemons of parallel tests must not meet on upstream's 5000.
                .env("GONKA_INFERENCE_LISTEN", "127.0.0.1:0")
                .env("GONKA_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
                .env(fake_nvml::CONFIG_ENV, file.path())
                .env("RUST_LOG", "warn")
                .env("GONKA_ALLOW_CPU_COMPUTE", allow_cpu_compute.to_string())
                // libgomp's waiting as the daemon decides it, whatever the tests' environment says.
                .env_remove("GOMP_SPINCOUNT")
                .env_remove("OMP_WAIT_POLICY")
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            match library {
                Some(lib) => cmd.env("GONKA_NVML_LIBRARY", lib),
                None => cmd.env_remove("GONKA_NVML_LIBRARY"),
            };
            if let Some(config) = &config {
                cmd.env("GONKA_DAEMON_CONFIG", config.path());
            }
            let mut child = cmd.spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            let exited = loop {
                if let Some(status) = child.try_wait().unwrap() {
                    break status;
                }
                // The monitoring port is plain HTTP whatever the API speaks (mutual TLS).
                if listens_on(child.id(), port)
                    && listens_on(child.id(), metrics_port)
                    && request_on(metrics_port, "GET", "/healthz", "").is_ok()
                {
                    return Self { child, port, metrics_port, scenario: file, _config: config };
                }
                assert!(Instant::now() < deadline, "daemon did not start listening");
                std::thread::sleep(Duration::from_millis(50));
            };
            eprintln!("daemon exited at start ({exited}), attempt {attempt} of 5; other ports");
        }
        panic!("the daemon exited at start five times");
    }

    /// Replaces the simulated machine while the daemon runs.
    pub fn change(&self, scenario: &Scenario) {
        // A different mtime even within the same clock tick: the file size changes or we wait.
        std::thread::sleep(Duration::from_millis(20));
        scenario.write(self.scenario.path()).unwrap();
    }

    pub fn try_request(&self, method: &str, path: &str) -> std::io::Result<(u16, String)> {
        self.send(method, path, "")
    }

    /// `GET path` on the monitoring port: status and body.
    pub fn monitoring(&self, path: &str) -> (u16, String) {
        request_on(self.metrics_port, "GET", path, "").unwrap()
    }

    /// `/metrics`, from the monitoring port.
    pub fn metrics(&self) -> String {
        self.monitoring("/metrics").1
    }

    /// One sample of `/metrics`: `name` with its labels as the text has them
    /// (`gonka_ml_node_x_total{reason="y"}`); `None` when absent.
    #[allow(dead_code)]
    pub fn metric(&self, name: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }

    /// A request with a JSON body; returns status and body.
    pub fn send(&self, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
        request_on(self.port, method, path, body)
    }

    pub fn json(&self, method: &str, path: &str) -> (u16, Value) {
        self.post_json(method, path, &Value::Null)
    }

    /// `method path` with `body` (none when null), answer parsed as JSON.
    pub fn post_json(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let text = if body.is_null() { String::new() } else { body.to_string() };
        let (status, body) = self.send(method, path, &text).unwrap();
        let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{method} {path}: {e}: {body:?}"));
        (status, value)
    }

    pub fn text(&self, path: &str) -> String {
        self.try_request("GET", path).unwrap().1
    }

    /// The environment the running daemon was started with (its last `exec`), from `/proc`.
    pub fn environment(&self) -> Vec<String> {
        let raw = std::fs::read(format!("/proc/{}/environ", self.child.id())).unwrap();
        raw.split(|&b| b == 0).filter(|v| !v.is_empty()).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
    }

    /// The daemon's resident memory, from `/proc`.
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        kib * 1024
    }

    /// SIGTERM, as the kubelet sends it; waits for the process to end and says how it ended.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        let sent = Command::new("kill").arg("-TERM").arg(self.child.id().to_string()).status().unwrap();
        assert!(sent.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the daemon did not exit within {within:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 request to `127.0.0.1:port` with a JSON body; returns status and body.
/// Whether process `pid` holds a listening TCP socket on `port` of loopback: the sockets of
/// `/proc/net/tcp{,6}` in state LISTEN on that port, by inode, among the process's descriptors.
pub fn listens_on(pid: u32, port: u16) -> bool {
    let inodes: std::collections::HashSet<String> = ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|path| std::fs::read_to_string(path).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let local_port = u16::from_str_radix(fields.get(1)?.rsplit(':').next()?, 16).ok()?;
                    (local_port == port && *fields.get(3)? == "0A").then(|| fields.get(9).map(|i| i.to_string()))?
                })
                .collect::<Vec<_>>()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return false };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).ok().is_some_and(|target| {
            let target = target.to_string_lossy();
            target
                .strip_prefix("socket:[")
                .and_then(|t| t.strip_suffix(']'))
                .is_some_and(|inode| inodes.contains(inode))
        })
    })
}

pub fn request_on(port: u16, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    Ok((status, body.to_string()))
}

pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within 60s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Registers an ML node with `devnet` as a 2026 network node's admin API takes it: on loopback,
/// its ML-node API on `poc_port`, its inference port, `model` with `args`.
pub fn register(
    devnet: &gonka_devnet::Shared,
    id: &str,
    poc_port: u16,
    inference_port: u16,
    model: &str,
    args: &[String],
) {
    let registration = gonka_protocol::admin::InferenceNodeConfig {
        host: "127.0.0.1".into(),
        inference_segment: String::new(),
        inference_port,
        poc_segment: String::new(),
        poc_port,
        models: [(model.to_string(), gonka_protocol::admin::ModelArgs { args: args.to_vec() })].into(),
        id: id.into(),
        max_concurrent: 500,
        hardware: vec![],
    };
    devnet.lock().unwrap().register(registration).unwrap();
}

/// A devnet playing a 2026 network node that approves `model`, its callback server on a free
/// loopback port served on `runtime`; returns it and the callback base (`mlCallbackUrl`).
pub fn start_devnet_2026(runtime: &tokio::runtime::Runtime, model: &str) -> (gonka_devnet::Shared, String) {
    let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let devnet = std::sync::Arc::new(std::sync::Mutex::new(gonka_devnet::Devnet::of(
        gonka_devnet::Generation::Mainline2026,
        [model.to_string()],
    )));
    let app = gonka_devnet::callback_router(devnet.clone());
    runtime.spawn(async move { axum::serve(listener, app).await.unwrap() });
    (devnet, base)
}

/// What a PoC v2 round over two honest ML nodes (`node-0`, `node-1`) gives: both delivered
/// artifacts, each validated by the other without a mismatch, each node's artifacts its own
/// share of the nonces (broker numbers 1 and 2 of 2: odd and even) under `model`'s name (the
/// callback path escaped twice, decoded by the devnet).
pub fn assert_honest_pair(results: &[gonka_devnet::round_v2::NodeResult], devnet: &gonka_devnet::Shared, model: &str) {
    assert_eq!(results.len(), 2);
    for r in results {
        // How many depends on the machine, so no count is asserted.
        assert!(r.artifacts > 0, "{r:?}");
        assert_eq!((r.n_mismatch, r.fraud_detected), (Some(0), Some(false)), "{r:?}");
    }
    assert_eq!(results[0].validated_by.as_deref(), Some("node-1"));
    assert_eq!(results[1].validated_by.as_deref(), Some("node-0"));
    let d = devnet.lock().unwrap();
    for (m, batch) in &d.generated_v2 {
        assert_eq!(m, model);
        assert!(batch.artifacts.iter().all(|a| a.nonce % 2 == batch.node_id % 2), "{batch:?}");
    }
}
