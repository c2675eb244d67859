//! Mutual TLS with the network node as upstream runs it (gonka-ai/gonka `deploy/join/MTLS.md`):
//! certificates made with openssl the way `gen-mlnode-certs.sh` makes them (self-signed P-256
//! CAs with server and client use), and on the network node's side Go's crypto/tls set up as
//! its `internal/mtls` sets it up (`tests/mtls-peer`). The ML-node API and the inference port
//! take only the pinned network-node certificate; callbacks reach only it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use common::Daemon;
use fake_nvml::Scenario;

struct Pair {
    crt: PathBuf,
    key: PathBuf,
}

/// A pair as `gen-mlnode-certs.sh` makes one.
fn upstream_pair(dir: &Path, name: &str, sans: &str) -> Pair {
    let (crt, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
    let made = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "36500"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .args(["-subj", &format!("/CN=gonka-{name}")])
        .args(["-addext", &format!("subjectAltName={sans}")])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,digitalSignature,keyCertSign"])
        .args(["-addext", "extendedKeyUsage=serverAuth,clientAuth"])
        .stderr(Stdio::null())
        .status()
        .expect("openssl (the tests make upstream's certificates with it)");
    assert!(made.success(), "openssl req for {name}");
    Pair { crt, key }
}

/// The Go peer, built once per test binary.
fn go_peer() -> &'static Path {
    static BUILT: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &BUILT
        .get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let binary = dir.path().join("mtls-peer");
            let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mtls-peer");
            let built = Command::new("go")
                .current_dir(&source)
                .env("GOTOOLCHAIN", "local")
                .env("CGO_ENABLED", "0")
                .args(["build", "-o"])
                .arg(&binary)
                .arg("main.go")
                .status()
                .expect("go (the control plane's toolchain) builds the network node's side");
            assert!(built.success(), "go build tests/mtls-peer");
            (dir, binary)
        })
        .1
}

/// `method url` as the network node sends it, with `client`'s certificate (none: `None`),
/// trusting `root`: `STATUS <code>\n<body>` or `ERROR <why>`.
fn network_node(method: &str, url: &str, client: Option<&Pair>, root: &Path, body: Option<&str>) -> String {
    let mut cmd = Command::new(go_peer());
    cmd.args(["request", method, url]);
    match client {
        Some(p) => cmd.arg(&p.crt).arg(&p.key),
        None => cmd.args(["-", "-"]),
    };
    cmd.arg(root).args(body);
    String::from_utf8(cmd.output().unwrap().stdout).unwrap()
}

fn daemon_with(dapi: &Pair, mlnode: &Pair, config: Option<&serde_json::Value>, extra: &[(&str, &str)]) -> Daemon {
    let mut env = vec![
        ("MLNODE_MTLS_CLIENT_CERT", mlnode.crt.to_str().unwrap()),
        ("MLNODE_MTLS_CLIENT_KEY", mlnode.key.to_str().unwrap()),
        ("MLNODE_MTLS_SERVER_CA", dapi.crt.to_str().unwrap()),
        // The address the network node registered.
        ("POD_IP", "127.0.0.1"),
    ];
    env.extend_from_slice(extra);
    match config {
        Some(config) => Daemon::start_configured_with_env(&Scenario::hgx_h100(), config, &env),
        None => Daemon::start_with_env(&Scenario::hgx_h100(), &env),
    }
}

#[test]
fn the_ml_node_api_and_inference_port_take_only_the_pinned_network_node() {
    let dir = tempfile::tempdir().unwrap();
    let dapi = upstream_pair(dir.path(), "dapi", "DNS:api,DNS:localhost,IP:127.0.0.1");
    // The ML node's certificate names no address of this host: the network node's client
    // (which checks the host it dials against the certificate, as Go's does) gets through only
    // with the certificate the daemon issues itself under it for its pod IP.
    let mlnode = upstream_pair(dir.path(), "mlnode", "DNS:inference");
    let stranger = upstream_pair(dir.path(), "stranger", "DNS:api,DNS:localhost,IP:127.0.0.1");
    let inference_port = gonka_e2e::free_port().unwrap();
    let inference_listen = format!("127.0.0.1:{inference_port}");
    let d = daemon_with(&dapi, &mlnode, None, &[("GONKA_INFERENCE_LISTEN", &inference_listen)]);

    let state = format!("https://127.0.0.1:{}/api/v1/state", d.port);
    let answer = network_node("GET", &state, Some(&dapi), &mlnode.crt, None);
    assert!(answer.starts_with("STATUS 200\n") && answer.contains(r#""state":"STOPPED""#), "{answer}");
    let versioned = format!("https://127.0.0.1:{}/v3.0.8/api/v1/state", d.port);
    assert!(network_node("GET", &versioned, Some(&dapi), &mlnode.crt, None).starts_with("STATUS 200\n"));

    // Another certificate, or none, fails the handshake: no request is read.
    for (who, client) in [("a stranger's certificate", Some(&stranger)), ("no certificate", None)] {
        let refused =
            network_node("POST", &format!("https://127.0.0.1:{}/api/v1/stop", d.port), client, &mlnode.crt, None);
        assert!(refused.starts_with("ERROR "), "{who}: {refused}");
    }
    // Plain HTTP gets no answer from the API.
    assert!(!matches!(d.try_request("GET", "/api/v1/state"), Ok((200, _))));
    // The network node's client trusting another certificate than mlnode.crt refuses the
    // daemon (the daemon proves it holds mlnode.key, nothing else).
    let wrong_root = network_node("GET", &state, Some(&dapi), &stranger.crt, None);
    assert!(wrong_root.starts_with("ERROR "), "{wrong_root}");

    // The monitoring port stays plain: the kubelet and scrapers hold no certificate.
    assert_eq!(d.monitoring("/healthz").0, 200);
    assert!(d.metrics().contains("gonka_ml_node_gpus 8"));

    // The inference port (served with the PoC engine) is held to the same certificate.
    if cfg!(feature = "torch") {
        let health = format!("https://127.0.0.1:{inference_port}/health");
        let answer = network_node("GET", &health, Some(&dapi), &mlnode.crt, None);
        assert!(answer.starts_with("STATUS 503\n"), "no model up, but the TLS exchange is through: {answer}");
        let refused = network_node("GET", &health, Some(&stranger), &mlnode.crt, None);
        assert!(refused.starts_with("ERROR "), "{refused}");
    }
}

#[test]
fn a_mismatched_pair_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let dapi = upstream_pair(dir.path(), "dapi", "DNS:api");
    let mlnode = upstream_pair(dir.path(), "mlnode", "DNS:inference");
    let mixed = Pair { crt: mlnode.crt.clone(), key: dapi.key.clone() };
    let out = Command::new(env!("CARGO_BIN_EXE_gonka-node-daemon"))
        .env("GONKA_LISTEN", "127.0.0.1:0")
        .env("GONKA_METRICS_LISTEN", "127.0.0.1:0")
        .env("GONKA_INFERENCE_LISTEN", "127.0.0.1:0")
        .env("GONKA_NVML_LIBRARY", fake_nvml::LIBRARY)
        .env("MLNODE_MTLS_CLIENT_CERT", &mixed.crt)
        .env("MLNODE_MTLS_CLIENT_KEY", &mixed.key)
        .env("MLNODE_MTLS_SERVER_CA", &dapi.crt)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mutual TLS") && stderr.contains("not the key of"), "{stderr}");
    // Half a pair is refused by the flags.
    let half = Command::new(env!("CARGO_BIN_EXE_gonka-node-daemon"))
        .env("MLNODE_MTLS_CLIENT_CERT", &mlnode.crt)
        .env_remove("MLNODE_MTLS_CLIENT_KEY")
        .env_remove("MLNODE_MTLS_SERVER_CA")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!half.status.success());
    assert!(String::from_utf8_lossy(&half.stderr).contains("--mtls-key"), "{}", String::from_utf8_lossy(&half.stderr));
}

/// Callbacks need the PoC engine.
#[cfg(feature = "torch")]
mod callbacks {
    use std::io::BufRead;
    use std::process::Child;
    use std::sync::{Arc, Mutex};

    use super::*;
    use common::eventually;

    /// The network node's callback server, as upstream's in mTLS mode: its own certificate, and a
    /// client certificate required and verified against `client_root`.
    struct CallbackServer {
        child: Child,
        port: u16,
        requests: Arc<Mutex<Vec<String>>>,
    }

    impl CallbackServer {
        fn start(own: &Pair, client_root: &Path) -> Self {
            let mut child = Command::new(go_peer())
                .arg("serve")
                .arg(&own.crt)
                .arg(&own.key)
                .arg(client_root)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
            let first = lines.next().unwrap().unwrap();
            let port = first.strip_prefix("LISTENING ").unwrap_or_else(|| panic!("{first}")).parse().unwrap();
            let requests = Arc::new(Mutex::new(Vec::new()));
            let seen = requests.clone();
            std::thread::spawn(move || {
                for line in lines.map_while(Result::ok) {
                    seen.lock().unwrap().push(line);
                }
            });
            Self { child, port, requests }
        }

        fn requests(&self) -> Vec<String> {
            self.requests.lock().unwrap().clone()
        }
    }

    impl Drop for CallbackServer {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    /// Proofs reach the network node over mutual TLS, and only the pinned one.
    #[test]
    fn proofs_reach_only_the_pinned_network_node() {
        use serde_json::json;
        let dir = tempfile::tempdir().unwrap();
        let dapi = upstream_pair(dir.path(), "dapi", "DNS:api,DNS:localhost,IP:127.0.0.1");
        let mlnode = upstream_pair(dir.path(), "mlnode", "DNS:inference,DNS:localhost,IP:127.0.0.1");
        let stranger = upstream_pair(dir.path(), "stranger", "DNS:api,DNS:localhost,IP:127.0.0.1");
        let network = CallbackServer::start(&dapi, &mlnode.crt);
        // An impostor at another address the callback base also allows: it would take the proofs
        // if the daemon trusted any certificate.
        let impostor = CallbackServer::start(&stranger, &mlnode.crt);

        let run = |server: &CallbackServer| {
            let url = format!("https://127.0.0.1:{}", server.port);
            let config = json!({
                "gonkaNode": "gpu/test", "mlCallbackUrl": url, "pocPort": 8080, "inferencePort": 5000,
                "gpus": null, "models": [], "poc": {"batchSize": 8, "sendIntervalSeconds": 1, "maxPendingBatches": 1000}
            });
            let d = daemon_with(&dapi, &mlnode, Some(&config), &[]);
            let params = json!({"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 4, "vocab_size": 96,
                "ffn_dim_multiplier": 1.3, "multiple_of": 32, "norm_eps": 1e-5, "rope_theta": 10000.0,
                "use_scaled_rope": false, "seq_len": 8});
            let init = json!({"node_id": 0, "node_count": 1, "block_hash": "0xblock", "block_height": 100,
                "public_key": "prover", "batch_size": 8, "r_target": 10.0, "fraud_threshold": 1e-7,
                "params": params, "url": url});
            let started = network_node(
                "POST",
                &format!("https://127.0.0.1:{}/api/v1/pow/init/generate", d.port),
                Some(&dapi),
                &mlnode.crt,
                Some(&init.to_string()),
            );
            assert!(started.starts_with("STATUS 200\n"), "{started}");
            d
        };

        let d = run(&network);
        eventually("proofs reach the network node over mutual TLS", || {
            network.requests().iter().any(|r| r.starts_with("POST /generated ") && !r.ends_with(" 0"))
        });
        drop(d);

        let d = run(&impostor);
        let failures = || {
            d.metrics()
                .lines()
                .filter(|l| l.starts_with("gonka_ml_node_poc_send_failures_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        eventually("the impostor's certificate fails every delivery", || failures() >= 2.0);
        assert!(impostor.requests().is_empty(), "the impostor got {:?}", impostor.requests());
    }

    /// The vLLM plugin posts its callbacks in plain HTTP; under mutual TLS the daemon gives it a
    /// loopback relay that forwards them with the ML node's certificate, to the pinned network
    /// node only.
    #[test]
    fn the_vllm_plugin_s_callbacks_are_relayed_with_the_ml_node_s_certificate() {
        use gonka_node_daemon::inference::vllm::callback_relay::CallbackRelay;
        use gonka_node_daemon::mtls::{Mtls, MtlsFiles};
        let dir = tempfile::tempdir().unwrap();
        let dapi = upstream_pair(dir.path(), "dapi", "DNS:api,DNS:localhost,IP:127.0.0.1");
        let mlnode = upstream_pair(dir.path(), "mlnode", "DNS:inference");
        let stranger = upstream_pair(dir.path(), "stranger", "DNS:api,DNS:localhost,IP:127.0.0.1");
        let network = CallbackServer::start(&dapi, &mlnode.crt);
        let impostor = CallbackServer::start(&stranger, &mlnode.crt);
        let files = MtlsFiles { cert: mlnode.crt.clone(), key: mlnode.key.clone(), peer_cert: dapi.crt.clone() };
        let mtls = Mtls::load(&files, &[]).unwrap();
        let http = reqwest::Client::builder().tls_backend_preconfigured(mtls.client_config().unwrap()).build().unwrap();
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let relay = runtime.block_on(async { CallbackRelay::start([127, 0, 0, 1].into(), http) }).unwrap();

        let post = |relayed: &str, suffix: &str| {
            let rest = relayed.strip_prefix("http://127.0.0.1:").unwrap();
            let (port, path) = rest.split_once('/').unwrap();
            common::request_on(port.parse().unwrap(), "POST", &format!("/{path}{suffix}"), r#"{"artifacts":[]}"#)
                .unwrap()
        };
        let url = format!("https://127.0.0.1:{}/v2/poc-batches/Qwen/Qwen3-8B", network.port);
        let relayed = relay.register(&url);
        assert_eq!(relayed, relay.register(&format!("{url}/")), "one address per callback URL");
        assert_eq!(post(&relayed, "/generated").0, 200);
        eventually("the network node got the batch over mutual TLS", || {
            network.requests().iter().any(|r| r == "POST /v2/poc-batches/Qwen/Qwen3-8B/generated 16")
        });

        // An address the daemon did not hand out reaches nothing.
        let unknown = format!("{}/relay/000000000000000000000000", relayed.split("/relay/").next().unwrap());
        assert_eq!(post(&unknown, "/generated").0, 404);
        // A server without the pinned certificate gets nothing: the relay answers 502.
        let elsewhere = relay.register(&format!("https://127.0.0.1:{}/v2/poc-batches/m", impostor.port));
        assert_eq!(post(&elsewhere, "/generated").0, 502);
        assert!(impostor.requests().is_empty(), "{:?}", impostor.requests());
    }
}
