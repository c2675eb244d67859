//! The model cache, as upstream's ML node manages it (`api/models/`, 2026): models keyed by
//! `{hf_repo, hf_commit}` in a Hugging Face cache under the models directory
//! (`models--org--name/snapshots/<commit>/`, `refs/main`), with `status`, `download`, `list`,
//! `space` and `DELETE`.
//!
//! Downloads come from a configured hub mirror (`--model-mirror`: the Hugging Face hub or any
//! server with its `api/models/{repo}/revision/{rev}` and `{repo}/resolve/{commit}/{file}`
//! paths); without one the node is offline, and `download` answers `IGNORED` as upstream's
//! does under `HF_HUB_OFFLINE`. Files are written beside their final name and renamed when
//! complete and checked (the size and, for weights, the sha256 the hub lists), so a model is
//! `DOWNLOADED` only once whole; at most three downloads at a time; a download stops rather
//! than fill the models volume (a reserve of free space is kept); errors name files by their
//! path in the repository, never the mirror's URL (it may carry credentials).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::http::{JsonBody, error};
use crate::state::AppState;

/// Upstream's limit on concurrent downloads.
const MAX_DOWNLOADS: usize = 3;
/// Failed downloads remembered (by task id, which callers choose).
const MAX_FAILURES: usize = 256;
/// Longest failure text kept.
const MAX_FAILURE_CHARS: usize = 512;
/// How often, in bytes written, the free space is looked at again.
const FREE_SPACE_CHECK_EVERY: u64 = 64 << 20;

/// `{hf_repo, hf_commit}`; no commit means the latest (`refs/main`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash)]
pub struct Model {
    pub hf_repo: String,
    #[serde(default)]
    pub hf_commit: Option<String>,
}

impl Model {
    /// Upstream's task id: `repo:commit`, or `repo:latest`.
    fn task_id(&self) -> String {
        format!("{}:{}", self.hf_repo, self.hf_commit.as_deref().unwrap_or("latest"))
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Downloaded,
    Downloading,
    NotFound,
    Partial,
    Ignored,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Progress {
    pub start_time: f64,
    pub elapsed_seconds: f64,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct StatusResponse {
    pub model: Model,
    pub status: Status,
    pub progress: Option<Progress>,
    pub error_message: Option<String>,
}

struct Download {
    started: Instant,
    start_time: f64,
    cancel: CancellationToken,
}

#[derive(Default)]
struct Tasks {
    running: HashMap<String, Download>,
    /// The last failure per task id, reported until the next attempt.
    failed: HashMap<String, String>,
}

pub struct ModelCache {
    root: Option<PathBuf>,
    mirror: Option<String>,
    /// Free space a download leaves on the models volume.
    min_free_bytes: u64,
    http: reqwest::Client,
    tasks: Mutex<Tasks>,
}

/// Whether a snapshot directory holds a whole model: its config and every weight file its
/// index names (or the single `model.safetensors`).
fn complete(dir: &Path) -> bool {
    if !dir.join("config.json").is_file() {
        return false;
    }
    let index = dir.join("model.safetensors.index.json");
    match std::fs::read(&index).ok().and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok()) {
        Some(index) => index["weight_map"]
            .as_object()
            .is_some_and(|m| !m.is_empty() && m.values().filter_map(|f| f.as_str()).all(|f| dir.join(f).is_file())),
        None => dir.join("model.safetensors").is_file(),
    }
}

fn repo_dir(root: &Path, repo: &str) -> PathBuf {
    root.join(format!("models--{}", repo.replace('/', "--")))
}

/// Repository names as the hub has them: `org/name`, no path tricks.
fn valid_repo(repo: &str) -> bool {
    let parts: Vec<&str> = repo.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && *p != "."
                && *p != ".."
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        })
}

fn valid_commit(commit: &str) -> bool {
    !commit.is_empty() && commit.len() <= 64 && commit.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn unix_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[derive(Deserialize)]
struct RevisionInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(Deserialize)]
struct Sibling {
    rfilename: String,
    /// With `?blobs=true`, the file's size.
    #[serde(default)]
    size: Option<u64>,
    /// With `?blobs=true`, a Git LFS file's (the weights') digest and size.
    #[serde(default)]
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    sha256: String,
    size: u64,
}

/// Bytes available to unprivileged writers on the filesystem holding `path`.
fn free_bytes(path: &Path) -> Result<u64, String> {
    let stat = rustix::fs::statvfs(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
}

impl ModelCache {
    pub fn new(root: Option<PathBuf>, mirror: Option<String>, min_free_bytes: u64) -> anyhow::Result<Arc<Self>> {
        // Weights take minutes: no limit on the whole transfer, only on connecting and on
        // silence.
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(10))
            .read_timeout(std::time::Duration::from_secs(60))
            .build()?;
        Ok(Arc::new(Self {
            root,
            mirror: mirror.map(|m| m.trim_end_matches('/').to_string()),
            min_free_bytes,
            http,
            tasks: Mutex::default(),
        }))
    }

    /// The snapshot `model` names: its commit, else what `refs/main` says; the plain
    /// `<root>/<org>/<name>` layout counts for the latest.
    fn snapshot(&self, model: &Model) -> Option<PathBuf> {
        let root = self.root.as_ref()?;
        let repo = repo_dir(root, &model.hf_repo);
        match &model.hf_commit {
            Some(commit) => Some(repo.join("snapshots").join(commit)),
            None => {
                let plain = root.join(&model.hf_repo);
                if complete(&plain) {
                    return Some(plain);
                }
                let main = std::fs::read_to_string(repo.join("refs/main")).ok()?;
                Some(repo.join("snapshots").join(main.trim()))
            }
        }
    }

    pub fn status(&self, model: &Model) -> StatusResponse {
        let tasks = self.tasks.lock().expect("tasks");
        let answer =
            |status, progress, error_message| StatusResponse { model: model.clone(), status, progress, error_message };
        if let Some(d) = tasks.running.get(&model.task_id()) {
            let progress = Progress { start_time: d.start_time, elapsed_seconds: d.started.elapsed().as_secs_f64() };
            return answer(Status::Downloading, Some(progress), None);
        }
        let failure = tasks.failed.get(&model.task_id()).cloned();
        drop(tasks);
        if self.snapshot(model).is_some_and(|s| complete(&s)) {
            return answer(Status::Downloaded, None, None);
        }
        let traces = self.root.as_ref().is_some_and(|r| repo_dir(r, &model.hf_repo).exists());
        answer(if traces { Status::Partial } else { Status::NotFound }, None, failure)
    }

    /// Starts downloading `model`; its task id and the status it is in.
    pub fn download(self: &Arc<Self>, model: Model) -> Result<(String, Status), (StatusCode, String)> {
        let task_id = model.task_id();
        let Some(mirror) = self.mirror.clone() else {
            tracing::info!(repo = %model.hf_repo, "no model mirror configured (offline): download ignored");
            return Ok((format!("{task_id}:offline"), Status::Ignored));
        };
        let Some(root) = self.root.clone() else {
            return Err((StatusCode::BAD_REQUEST, "this ML node has no models directory (--models-dir)".into()));
        };
        let current = self.status(&model).status;
        if current == Status::Downloaded {
            return Ok((task_id, current));
        }
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.tasks.lock().expect("tasks");
            if tasks.running.contains_key(&task_id) {
                return Err((StatusCode::CONFLICT, format!("Model {task_id} is already downloading")));
            }
            if tasks.running.len() >= MAX_DOWNLOADS {
                return Err((
                    StatusCode::TOO_MANY_REQUESTS,
                    format!("Maximum concurrent downloads ({MAX_DOWNLOADS}) reached"),
                ));
            }
            tasks.failed.remove(&task_id);
            tasks.running.insert(
                task_id.clone(),
                Download { started: Instant::now(), start_time: unix_now(), cancel: cancel.clone() },
            );
        }
        let cache = self.clone();
        let id = task_id.clone();
        tokio::spawn(async move {
            let outcome = tokio::select! {
                r = cache.fetch(&mirror, &root, &model) => r,
                _ = cancel.cancelled() => Err("cancelled".to_string()),
            };
            let mut tasks = cache.tasks.lock().expect("tasks");
            tasks.running.remove(&id);
            match outcome {
                Ok(()) => tracing::info!(task = %id, "model downloaded"),
                Err(e) => {
                    tracing::warn!(task = %id, error = %e, "model download failed");
                    if tasks.failed.len() >= MAX_FAILURES
                        && let Some(old) = tasks.failed.keys().next().cloned()
                    {
                        tasks.failed.remove(&old);
                    }
                    tasks.failed.insert(id, e.chars().take(MAX_FAILURE_CHARS).collect());
                }
            }
        });
        Ok((task_id, Status::Downloading))
    }

    async fn fetch(&self, mirror: &str, root: &Path, model: &Model) -> Result<(), String> {
        let revision = model.hf_commit.as_deref().unwrap_or("main");
        // What errors say: paths in the repository, not the mirror's URL (it may carry
        // credentials) — reqwest's own errors are stripped of it too.
        let info_path = format!("api/models/{}/revision/{revision}", model.hf_repo);
        let info_url = format!("{mirror}/{info_path}?blobs=true");
        let response =
            self.http.get(&info_url).send().await.map_err(|e| format!("{info_path}: {}", e.without_url()))?;
        if !response.status().is_success() {
            return Err(format!("{info_path} answered {}", response.status()));
        }
        let info: RevisionInfo = response.json().await.map_err(|e| format!("{info_path}: {}", e.without_url()))?;
        if !valid_commit(&info.sha) {
            return Err(format!("{info_path}: {:?} is not a commit", info.sha));
        }
        let repo = repo_dir(root, &model.hf_repo);
        let snapshot = repo.join("snapshots").join(&info.sha);
        for sibling in &info.siblings {
            let name = Path::new(&sibling.rfilename);
            // File names come from the mirror: keep them inside the snapshot.
            if name.is_absolute() || name.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
                return Err(format!("{info_path}: unsafe file name {:?}", sibling.rfilename));
            }
            let target = snapshot.join(name);
            if target.is_file() {
                continue;
            }
            let file_path = format!("{}/resolve/{}/{}", model.hf_repo, info.sha, sibling.rfilename);
            let url = format!("{mirror}/{file_path}");
            let mut response =
                self.http.get(&url).send().await.map_err(|e| format!("{file_path}: {}", e.without_url()))?;
            if !response.status().is_success() {
                return Err(format!("{file_path} answered {}", response.status()));
            }
            let expected_size = sibling.lfs.as_ref().map(|l| l.size).or(sibling.size);
            let parent = target.parent().expect("inside the snapshot");
            tokio::fs::create_dir_all(parent).await.map_err(|e| format!("{}: {e}", parent.display()))?;
            let room = |needed: u64| match free_bytes(parent) {
                Ok(free) if free < needed.saturating_add(self.min_free_bytes) => Err(format!(
                    "{file_path}: the models volume has {} MiB free and keeps {} MiB free: not downloaded",
                    free >> 20,
                    self.min_free_bytes >> 20
                )),
                _ => Ok(()),
            };
            room(expected_size.or(response.content_length()).unwrap_or(0))?;
            let partial = target.with_extension("incomplete");
            let mut file =
                tokio::fs::File::create(&partial).await.map_err(|e| format!("{}: {e}", partial.display()))?;
            let (mut written, mut checked, mut digest) = (0u64, 0u64, sha2::Sha256::default());
            let outcome: Result<(), String> = async {
                while let Some(chunk) =
                    response.chunk().await.map_err(|e| format!("{file_path}: {}", e.without_url()))?
                {
                    sha2::Digest::update(&mut digest, &chunk);
                    written += chunk.len() as u64;
                    if expected_size.is_some_and(|size| written > size) {
                        return Err(format!(
                            "{file_path}: more than the {} bytes the hub lists",
                            expected_size.unwrap_or(0)
                        ));
                    }
                    if written - checked >= FREE_SPACE_CHECK_EVERY {
                        checked = written;
                        room(0)?;
                    }
                    tokio::io::AsyncWriteExt::write_all(&mut file, &chunk)
                        .await
                        .map_err(|e| format!("{}: {e}", partial.display()))?;
                }
                tokio::io::AsyncWriteExt::flush(&mut file).await.map_err(|e| e.to_string())?;
                if let Some(size) = expected_size
                    && written != size
                {
                    return Err(format!("{file_path}: {written} bytes, the hub lists {size}"));
                }
                if let Some(lfs) = &sibling.lfs {
                    let got = hex::encode(sha2::Digest::finalize(digest));
                    if !got.eq_ignore_ascii_case(&lfs.sha256) {
                        return Err(format!("{file_path}: sha256 {got}, the hub lists {}", lfs.sha256));
                    }
                }
                Ok(())
            }
            .await;
            if let Err(e) = outcome {
                // Nothing half-written or wrong stays behind.
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
            tokio::fs::rename(&partial, &target).await.map_err(|e| format!("{}: {e}", target.display()))?;
        }
        if model.hf_commit.is_none() {
            tokio::fs::create_dir_all(repo.join("refs")).await.map_err(|e| e.to_string())?;
            tokio::fs::write(repo.join("refs/main"), &info.sha).await.map_err(|e| e.to_string())?;
        }
        if !complete(&snapshot) {
            return Err(format!("{} at {} is not a complete model (config and weights)", model.hf_repo, info.sha));
        }
        Ok(())
    }

    /// Cancels a download, or deletes a snapshot (with a commit) or every snapshot.
    pub fn delete(&self, model: &Model) -> Result<&'static str, String> {
        if let Some(d) = self.tasks.lock().expect("tasks").running.remove(&model.task_id()) {
            d.cancel.cancel();
            return Ok("cancelled");
        }
        let root = self.root.as_ref().ok_or_else(|| format!("Model {} not found", model.task_id()))?;
        let repo = repo_dir(root, &model.hf_repo);
        let target = match &model.hf_commit {
            Some(commit) => repo.join("snapshots").join(commit),
            None => repo,
        };
        if !target.exists() {
            return Err(format!("Model {} not found", model.task_id()));
        }
        std::fs::remove_dir_all(&target).map_err(|e| format!("{}: {e}", target.display()))?;
        Ok("deleted")
    }

    /// Every snapshot in the cache with its status.
    pub fn list(&self) -> Vec<(Model, Status)> {
        let Some(root) = &self.root else { return Vec::new() };
        let mut out = Vec::new();
        for entry in std::fs::read_dir(root).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(repo) = name.strip_prefix("models--").and_then(|r| r.split_once("--")) else { continue };
            let hf_repo = format!("{}/{}", repo.0, repo.1);
            for snapshot in std::fs::read_dir(entry.path().join("snapshots")).into_iter().flatten().flatten() {
                let commit = snapshot.file_name().to_string_lossy().into_owned();
                let status = if complete(&snapshot.path()) { Status::Downloaded } else { Status::Partial };
                out.push((Model { hf_repo: hf_repo.clone(), hf_commit: Some(commit) }, status));
            }
        }
        out.sort_by(|a, b| (&a.0.hf_repo, &a.0.hf_commit).cmp(&(&b.0.hf_repo, &b.0.hf_commit)));
        out
    }

    /// `(cache bytes, available bytes, path)`.
    pub fn space(&self) -> Result<(u64, u64, PathBuf), String> {
        let root = self.root.clone().ok_or("this ML node has no models directory (--models-dir)")?;
        fn size(path: &Path) -> u64 {
            match std::fs::symlink_metadata(path) {
                Ok(m) if m.is_dir() => {
                    std::fs::read_dir(path).into_iter().flatten().flatten().map(|e| size(&e.path())).sum()
                }
                Ok(m) => m.len(),
                Err(_) => 0,
            }
        }
        Ok((size(&root), free_bytes(&root)?, root))
    }
}

/// Why `model` is not one the cache takes (answered 422), if it is not.
fn check(model: &Model) -> Option<Response> {
    if !valid_repo(&model.hf_repo) {
        return Some(error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("hf_repo {:?} is not an org/name repository", model.hf_repo),
        ));
    }
    if model.hf_commit.as_deref().is_some_and(|c| !valid_commit(c)) {
        return Some(error(StatusCode::UNPROCESSABLE_ENTITY, "hf_commit must be a commit hash (letters and digits)"));
    }
    None
}

pub fn routes() -> Router<Arc<AppState>> {
    async fn status(State(state): State<Arc<AppState>>, JsonBody(model): JsonBody<Model>) -> Response {
        if let Some(refusal) = check(&model) {
            return refusal;
        }
        let cache = state.model_cache.clone();
        match tokio::task::spawn_blocking(move || cache.status(&model)).await {
            Ok(s) => Json(s).into_response(),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("Error checking model status: {e}")),
        }
    }

    async fn download(State(state): State<Arc<AppState>>, JsonBody(model): JsonBody<Model>) -> Response {
        if let Some(refusal) = check(&model) {
            return refusal;
        }
        match state.model_cache.download(model.clone()) {
            Ok((task_id, status)) => {
                (StatusCode::ACCEPTED, Json(serde_json::json!({"task_id": task_id, "status": status, "model": model})))
                    .into_response()
            }
            Err((code, detail)) => error(code, detail),
        }
    }

    async fn remove(State(state): State<Arc<AppState>>, JsonBody(model): JsonBody<Model>) -> Response {
        if let Some(refusal) = check(&model) {
            return refusal;
        }
        match state.model_cache.delete(&model) {
            Ok(done) => Json(serde_json::json!({"status": done, "model": model})).into_response(),
            Err(e) => error(StatusCode::NOT_FOUND, e),
        }
    }

    async fn list(State(state): State<Arc<AppState>>) -> Response {
        let cache = state.model_cache.clone();
        let models = tokio::task::spawn_blocking(move || cache.list()).await.unwrap_or_default();
        let models: Vec<_> =
            models.into_iter().map(|(model, status)| serde_json::json!({"model": model, "status": status})).collect();
        Json(serde_json::json!({"models": models})).into_response()
    }

    async fn space(State(state): State<Arc<AppState>>) -> Response {
        let cache = state.model_cache.clone();
        match tokio::task::spawn_blocking(move || cache.space()).await {
            Ok(Ok((cache_bytes, available, path))) => {
                let gb = |b: u64| (b as f64 / 1e9 * 100.0).round() / 100.0;
                Json(serde_json::json!({"cache_size_gb": gb(cache_bytes), "available_gb": gb(available), "cache_path": path}))
                    .into_response()
            }
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("Error getting disk space: {e}")),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    Router::new()
        .route("/api/v1/models/status", post(status))
        .route("/api/v1/models/download", post(download))
        .route("/api/v1/models", delete(remove))
        .route("/api/v1/models/list", get(list))
        .route("/api/v1/models/space", get(space))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_and_commits_are_checked() {
        assert!(valid_repo("Qwen/Qwen3-0.6B") && valid_repo("moonshotai/Kimi-K2.6"));
        for bad in ["Qwen", "Qwen/../x", "a/b/c", "../etc", "Qwen/Qwen 3", "/Qwen"] {
            assert!(!valid_repo(bad), "{bad}");
        }
        assert!(valid_commit("9b5c2f1e0d"));
        assert!(!valid_commit("../main") && !valid_commit(""));
    }

    #[test]
    fn snapshots_are_complete_only_with_every_weight_file() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert!(!complete(d));
        std::fs::write(d.join("config.json"), "{}").unwrap();
        assert!(!complete(d));
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(d.join("model-00001-of-00002.safetensors"), "x").unwrap();
        assert!(!complete(d));
        std::fs::write(d.join("model-00002-of-00002.safetensors"), "x").unwrap();
        assert!(complete(d));
    }
}
