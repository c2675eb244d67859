//! The model cache through the daemon binary, as the network node drives it
//! (`/api/v1/models/status|download|list|space`, `DELETE /api/v1/models`): a tiny Qwen3
//! downloaded from a local hub mirror into a Hugging Face cache layout, with progress while it
//! downloads, a duplicate refused, then served by `/inference/up` from there and deleted;
//! offline nodes ignore downloads as upstream's do; a failing mirror is reported.
#![cfg(feature = "torch")]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::get;
use common::{Daemon, eventually};
use fake_nvml::Scenario;
use serde_json::{Value, json};

const REPO: &str = "Qwen/Tiny-Qwen3";
const COMMIT: &str = "0a1b2c3d4e5f";

struct Mirror {
    dir: PathBuf,
    /// Closed until the test lets file downloads through.
    gate: tokio::sync::Semaphore,
    /// Serves weights with a byte flipped (the listed sha256 stays the true one).
    corrupt: bool,
}

async fn revision(
    State(m): State<Arc<Mirror>>,
    UrlPath((org, name, _rev)): UrlPath<(String, String, String)>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if format!("{org}/{name}") != REPO {
        return StatusCode::NOT_FOUND.into_response();
    }
    // As the hub lists them with `?blobs=true`: sizes, and the weights' LFS digests.
    let siblings: Vec<Value> = std::fs::read_dir(&m.dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(e.path()).unwrap();
            let mut sibling = json!({"rfilename": name, "size": bytes.len()});
            if name.ends_with(".safetensors") {
                use sha2::Digest;
                let sha256 = hex::encode(sha2::Sha256::digest(&bytes));
                sibling["lfs"] = json!({"sha256": sha256, "size": bytes.len(), "pointerSize": 134});
            }
            sibling
        })
        .collect();
    axum::Json(json!({"sha": COMMIT, "siblings": siblings})).into_response()
}

async fn resolve(
    State(m): State<Arc<Mirror>>,
    UrlPath((_org, _name, _sha, file)): UrlPath<(String, String, String, String)>,
) -> Vec<u8> {
    let _permit = m.gate.acquire().await.unwrap();
    let mut bytes = std::fs::read(m.dir.join(&file)).unwrap();
    if m.corrupt && file.ends_with(".safetensors") {
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
    }
    bytes
}

/// A mirror of the tiny model on a free port; its URL.
async fn serve_mirror(mirror: Arc<Mirror>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/api/models/{org}/{name}/revision/{rev}", get(revision))
        .route("/{org}/{name}/resolve/{sha}/{*file}", get(resolve))
        .with_state(mirror);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn tiny_model(dir: &Path) {
    gonka_e2e::write_tiny_qwen(dir, "qwen3", json!({"shard_size": "100KB"})).unwrap();
}

fn model(commit: Option<&str>) -> Value {
    json!({"hf_repo": REPO, "hf_commit": commit})
}

#[tokio::test(flavor = "multi_thread")]
async fn a_model_downloads_from_the_mirror_serves_and_is_deleted() {
    let source = tempfile::tempdir().unwrap();
    tiny_model(source.path());
    let mirror =
        Arc::new(Mirror { dir: source.path().to_path_buf(), gate: tokio::sync::Semaphore::new(0), corrupt: false });
    let url = serve_mirror(mirror.clone()).await;

    let cache = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        &Scenario::hgx_h100(),
        &[("GONKA_MODELS_DIR", cache.path().to_str().unwrap()), ("GONKA_MODEL_MIRROR", &url)],
    );
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "NOT_FOUND");
    assert_eq!(d.json("GET", "/api/v1/models/list").1, json!({"models": []}));

    let (status, started) = d.post_json("POST", "/api/v1/models/download", &model(None));
    assert_eq!(
        (status, started["status"].as_str(), started["task_id"].as_str()),
        (202, Some("DOWNLOADING"), Some("Qwen/Tiny-Qwen3:latest"))
    );
    let progress = d.post_json("POST", "/api/v1/models/status", &model(None)).1;
    assert_eq!(progress["status"], "DOWNLOADING");
    assert!(progress["progress"]["elapsed_seconds"].as_f64().unwrap() >= 0.0);
    assert!(progress["progress"]["start_time"].as_f64().unwrap() > 1.7e9);
    let (status, _) = d.post_json("POST", "/api/v1/models/download", &model(None));
    assert_eq!(status, 409, "a second download of the same model");

    mirror.gate.add_permits(1000);
    eventually("the download completes", || {
        d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"] == "DOWNLOADED"
    });
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(Some(COMMIT))).1["status"], "DOWNLOADED");
    let snapshot = cache.path().join("models--Qwen--Tiny-Qwen3/snapshots").join(COMMIT);
    assert!(snapshot.join("model.safetensors.index.json").is_file());
    // Every file of the source, byte for byte, and nothing else.
    let files = |root: &Path| {
        let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
            .collect();
        out.sort();
        out
    };
    let (downloaded, source_files) = (files(&snapshot), files(source.path()));
    assert!(source_files.len() > 3, "shards, index, config, tokenizer");
    assert_eq!(
        downloaded.iter().map(|(n, _)| n).collect::<Vec<_>>(),
        source_files.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );
    for ((name, ours), (_, theirs)) in downloaded.iter().zip(&source_files) {
        assert!(ours == theirs, "{name}: the downloaded bytes differ from the mirror's");
    }
    assert_eq!(std::fs::read_to_string(cache.path().join("models--Qwen--Tiny-Qwen3/refs/main")).unwrap(), COMMIT);
    assert_eq!(
        d.json("GET", "/api/v1/models/list").1,
        json!({"models": [{"model": {"hf_repo": REPO, "hf_commit": COMMIT}, "status": "DOWNLOADED"}]})
    );
    let space = d.json("GET", "/api/v1/models/space").1;
    assert_eq!(space["cache_path"], json!(cache.path()));
    assert!(space["available_gb"].as_f64().unwrap() > 0.0);
    // Downloading what is there is answered with its status.
    assert_eq!(d.post_json("POST", "/api/v1/models/download", &model(None)).1["status"], "DOWNLOADED");

    // Served from the cache layout.
    let (status, body) = d.post_json("POST", "/api/v1/inference/up", &json!({"model": REPO, "dtype": "auto"}));
    assert_eq!(status, 200, "{body}");
    d.post_json("POST", "/api/v1/inference/down", &Value::Null);

    // A half-deleted snapshot is PARTIAL; deleting it all leaves nothing.
    let shard = std::fs::read_dir(&snapshot)
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("model-0"))
        .unwrap();
    std::fs::remove_file(shard.path()).unwrap();
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "PARTIAL");
    assert_eq!(
        d.post_json("DELETE", "/api/v1/models", &model(None)),
        (200, json!({"status": "deleted", "model": model(None)}))
    );
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "NOT_FOUND");
    assert_eq!(d.post_json("DELETE", "/api/v1/models", &model(None)).0, 404);

    // A repository the mirror does not have: the failure is reported with the status.
    let missing = json!({"hf_repo": "Qwen/Missing", "hf_commit": null});
    assert_eq!(d.post_json("POST", "/api/v1/models/download", &missing).0, 202);
    eventually("the failed download is reported", || {
        d.post_json("POST", "/api/v1/models/status", &missing).1["error_message"]
            .as_str()
            .is_some_and(|e| e.contains("404"))
    });
    // Names that are not repositories are refused.
    assert_eq!(d.post_json("POST", "/api/v1/models/download", &json!({"hf_repo": "../etc"})).0, 422);
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &json!({"hf_repo": REPO, "hf_commit": "../x"})).0, 422);
}

/// What the hub lists is checked (a corrupt weight file is not kept), the models volume keeps
/// its reserve, and failures name repository paths, never the mirror's URL with its
/// credentials.
#[tokio::test(flavor = "multi_thread")]
async fn downloads_are_checked_bounded_and_never_echo_the_mirror() {
    let source = tempfile::tempdir().unwrap();
    tiny_model(source.path());
    let gate = || tokio::sync::Semaphore::new(1000);
    let corrupt = Arc::new(Mirror { dir: source.path().to_path_buf(), gate: gate(), corrupt: true });
    let url = serve_mirror(corrupt).await.replace("http://", "http://mirror-user:s3cret-token@");
    let cache = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(
        &Scenario::hgx_h100(),
        &[("GONKA_MODELS_DIR", cache.path().to_str().unwrap()), ("GONKA_MODEL_MIRROR", &url)],
    );
    assert_eq!(d.post_json("POST", "/api/v1/models/download", &model(None)).0, 202);
    let mut failure = String::new();
    eventually("the corrupt weights are refused", || {
        failure = d.post_json("POST", "/api/v1/models/status", &model(None)).1["error_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        failure.contains("sha256")
    });
    assert!(failure.contains("Qwen/Tiny-Qwen3/resolve/"), "names the file by its repository path: {failure}");
    assert!(!failure.contains("s3cret") && !failure.contains("127.0.0.1"), "the mirror is not echoed: {failure}");
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "PARTIAL");
    let snapshot = cache.path().join("models--Qwen--Tiny-Qwen3/snapshots").join(COMMIT);
    let weights: Vec<String> = std::fs::read_dir(&snapshot)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".json") && (n.contains("safetensors") || n.ends_with(".incomplete")))
        .collect();
    assert!(weights.is_empty(), "no corrupt or partial weights stay: {weights:?}");
    // An unreachable mirror: reqwest's own error text is stripped of the URL.
    let unreachable = "http://mirror-user:s3cret-token@127.0.0.1:9";
    let d2 = Daemon::start_with_env(
        &Scenario::hgx_h100(),
        &[("GONKA_MODELS_DIR", cache.path().to_str().unwrap()), ("GONKA_MODEL_MIRROR", unreachable)],
    );
    let other = json!({"hf_repo": "Qwen/Other", "hf_commit": null});
    assert_eq!(d2.post_json("POST", "/api/v1/models/download", &other).0, 202);
    eventually("the unreachable mirror is reported", || {
        failure = d2.post_json("POST", "/api/v1/models/status", &other).1["error_message"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        !failure.is_empty()
    });
    assert!(failure.starts_with("api/models/Qwen/Other/revision/main"), "{failure}");
    assert!(!failure.contains("s3cret") && !failure.contains("127.0.0.1"), "{failure}");

    // The models volume keeps its reserve: a download that would eat into it stops first.
    let honest = Arc::new(Mirror { dir: source.path().to_path_buf(), gate: gate(), corrupt: false });
    let url = serve_mirror(honest).await;
    let full = tempfile::tempdir().unwrap();
    let d3 = Daemon::start_with_env(
        &Scenario::hgx_h100(),
        &[
            ("GONKA_MODELS_DIR", full.path().to_str().unwrap()),
            ("GONKA_MODEL_MIRROR", &url),
            // More than any disk here has.
            ("GONKA_MODELS_MIN_FREE_GB", "1000000000"),
        ],
    );
    assert_eq!(d3.post_json("POST", "/api/v1/models/download", &model(None)).0, 202);
    eventually("refused for the reserve", || {
        d3.post_json("POST", "/api/v1/models/status", &model(None)).1["error_message"]
            .as_str()
            .is_some_and(|e| e.contains("keeps") && e.contains("free"))
    });
    assert_ne!(d3.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "DOWNLOADED");
}

#[test]
fn an_offline_node_ignores_downloads_as_upstream_does() {
    let cache = tempfile::tempdir().unwrap();
    let d = Daemon::start_with_env(&Scenario::hgx_h100(), &[("GONKA_MODELS_DIR", cache.path().to_str().unwrap())]);
    let (status, answer) = d.post_json("POST", "/api/v1/models/download", &model(None));
    assert_eq!(
        (status, answer),
        (202, json!({"task_id": "Qwen/Tiny-Qwen3:latest:offline", "status": "IGNORED", "model": model(None)}))
    );
    assert_eq!(d.post_json("POST", "/api/v1/models/status", &model(None)).1["status"], "NOT_FOUND");
}
