//! `devnet`: a local stand-in for the host's network node (upstream's "dapi"), for the demo and
//! the tests. It is a test double of an external service, not a network node: it keeps ML-node
//! registrations in memory and answers the admin API in upstream's JSON shapes.
//!
//! Served now: the admin API's node registration (`/admin/v1/nodes` list, upsert, batch,
//! delete, enable, disable), with upstream's governance-model check; and the ML callback server
//! (`/v1/poc-batches/generated|validated`, upstream's :9100) that records PoC v1 batches and
//! counts weights as the chain does (unique proofs per ML node); and the public API's
//! `/v1/epochs/latest` with a phase tests set; and [`round`], which drives registered ML nodes
//! through a PoC v1 round (generate, sample, cross-validate, weigh).

pub mod round;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gonka_protocol::admin::{AdminState, InferenceNodeConfig, Node, NodeResponse, NodeState, NodeToggleResponse};
use gonka_protocol::network::{EpochPhase, EpochResponse, LatestEpoch};
use gonka_protocol::pow::{ProofBatch, ValidatedBatch};
use serde_json::json;

/// The network node's registrations.
#[derive(Debug)]
pub struct Devnet {
    /// Models governance approved; registrations naming others are refused (upstream: 400).
    pub governance_models: BTreeSet<String>,
    nodes: BTreeMap<String, (Node, AdminState)>,
    next_num: u64,
    /// The current epoch, stamped on enable/disable.
    pub epoch: u64,
    /// PoC batches ML nodes posted to the callback server, in arrival order.
    pub generated: Vec<ProofBatch>,
    /// Validation verdicts ML nodes posted.
    pub validated: Vec<ValidatedBatch>,
    /// The epoch `/v1/epochs/latest` reports; tests (and the round driver) move it along.
    pub epoch_state: EpochResponse,
    /// Admin API writes received (upserts, deletes, enables, disables), accepted or not: what a
    /// steady fleet should not cause.
    pub admin_writes: u64,
}

impl Devnet {
    pub fn new(governance_models: impl IntoIterator<Item = String>) -> Self {
        Self {
            governance_models: governance_models.into_iter().collect(),
            nodes: BTreeMap::new(),
            next_num: 0,
            epoch: 1,
            generated: Vec::new(),
            validated: Vec::new(),
            epoch_state: EpochResponse {
                block_height: 1,
                latest_epoch: LatestEpoch { index: 1, poc_start_block_height: 0 },
                phase: EpochPhase::Inference,
                epoch_stages: json!({}),
                next_epoch_stages: json!({}),
                epoch_params: json!({}),
                is_confirmation_poc_active: false,
            },
            admin_writes: 0,
        }
    }

    /// Moves the epoch to `phase` (a new epoch starts at `PoCGenerate`).
    pub fn set_phase(&mut self, phase: EpochPhase) {
        if phase == EpochPhase::PocGenerate && self.epoch_state.phase != EpochPhase::PocGenerate {
            self.epoch += 1;
            self.epoch_state.latest_epoch =
                LatestEpoch { index: self.epoch, poc_start_block_height: self.epoch_state.block_height };
        }
        self.epoch_state.phase = phase;
        self.epoch_state.block_height += 1;
    }

    /// PoC weight per ML node (`node_id`) for the round at `block_height`: its unique proven
    /// nonces, as the chain counts them (duplicates, e.g. from a retried post, count once).
    pub fn weights(&self, block_height: i64) -> BTreeMap<i64, usize> {
        let mut proofs: BTreeMap<i64, BTreeSet<i64>> = BTreeMap::new();
        for b in self.generated.iter().filter(|b| b.block_height == block_height) {
            proofs.entry(b.node_id).or_default().extend(&b.nonces);
        }
        proofs.into_iter().map(|(node, nonces)| (node, nonces.len())).collect()
    }

    /// Registered nodes, as `GET /admin/v1/nodes` answers.
    pub fn nodes(&self) -> Vec<NodeResponse> {
        self.nodes
            .values()
            .map(|(node, admin)| NodeResponse {
                node: node.clone(),
                state: NodeState { admin_state: *admin, ..NodeState::default() },
            })
            .collect()
    }

    /// Upserts a node; returns whether it was new.
    pub fn upsert(&mut self, config: InferenceNodeConfig) -> Result<(Node, bool), String> {
        self.admin_writes += 1;
        validate(&config)?;
        if let Some(model) = config.models.keys().find(|m| !self.governance_models.contains(*m)) {
            return Err(format!(
                "failed to create node: one or more models are not valid governance models ({model} is not)"
            ));
        }
        match self.nodes.get_mut(&config.id) {
            Some((node, _)) => {
                node.config = config;
                Ok((node.clone(), false))
            }
            None => {
                let node = Node { config, node_num: self.next_num };
                self.next_num += 1;
                let admin = AdminState { enabled: true, epoch: self.epoch };
                self.nodes.insert(node.config.id.clone(), (node.clone(), admin));
                Ok((node, true))
            }
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Node> {
        self.admin_writes += 1;
        self.nodes.remove(id).map(|(n, _)| n)
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> bool {
        self.admin_writes += 1;
        match self.nodes.get_mut(id) {
            Some((_, admin)) => {
                *admin = AdminState { enabled, epoch: self.epoch };
                true
            }
            None => false,
        }
    }
}

/// The public API's epoch endpoint (upstream :9000 `/v1/epochs/latest`).
pub fn public_router(devnet: Shared) -> Router {
    Router::new()
        .route(
            "/v1/epochs/latest",
            get(|State(d): State<Shared>| async move { Json(d.lock().expect("devnet").epoch_state.clone()) }),
        )
        .with_state(devnet)
}

/// The ML callback server (upstream :9100): ML nodes post PoC batches here. Both the current
/// paths and upstream's old `/mlnode` alias are served.
pub fn callback_router(devnet: Shared) -> Router {
    Router::new()
        .route("/v1/poc-batches/generated", post(generated))
        .route("/v1/poc-batches/validated", post(validated))
        .route("/mlnode/v1/poc-batches/generated", post(generated))
        .route("/mlnode/v1/poc-batches/validated", post(validated))
        .with_state(devnet)
}

async fn generated(State(d): State<Shared>, raw: axum::body::Bytes) -> Response {
    match body::<ProofBatch>(&raw) {
        Ok(batch) if batch.nonces.len() != batch.dist.len() => {
            fail(StatusCode::BAD_REQUEST, "nonces and dist differ in length")
        }
        Ok(batch) => {
            d.lock().expect("devnet").generated.push(batch);
            StatusCode::OK.into_response()
        }
        Err(e) => fail(StatusCode::BAD_REQUEST, e),
    }
}

async fn validated(State(d): State<Shared>, raw: axum::body::Bytes) -> Response {
    match body::<ValidatedBatch>(&raw) {
        Ok(batch) => {
            d.lock().expect("devnet").validated.push(batch);
            StatusCode::OK.into_response()
        }
        Err(e) => fail(StatusCode::BAD_REQUEST, e),
    }
}

/// Upstream's basic node validation.
fn validate(c: &InferenceNodeConfig) -> Result<(), String> {
    let mut errors = Vec::new();
    if c.id.trim().is_empty() {
        errors.push("node id is required and cannot be empty");
    }
    if c.host.trim().is_empty() {
        errors.push("host is required and cannot be empty");
    }
    if c.inference_port == 0 || c.poc_port == 0 {
        errors.push("inference_port and poc_port must be set");
    }
    if c.models.is_empty() {
        errors.push("at least one model is required");
    }
    if errors.is_empty() { Ok(()) } else { Err(errors.join("; ")) }
}

pub type Shared = Arc<Mutex<Devnet>>;

fn fail(status: StatusCode, message: impl Into<serde_json::Value>) -> Response {
    (status, Json(json!({ "message": message.into() }))).into_response()
}

/// The admin API (upstream serves it on :9200).
pub fn admin_router(devnet: Shared) -> Router {
    Router::new()
        .route("/admin/v1/nodes", get(list).post(upsert))
        .route("/admin/v1/nodes/batch", post(batch))
        .route("/admin/v1/nodes/{id}", axum::routing::put(upsert_by_id).delete(delete))
        .route("/admin/v1/nodes/{id}/enable", post(|s, p| toggle(s, p, true)))
        .route("/admin/v1/nodes/{id}/disable", post(|s, p| toggle(s, p, false)))
        .with_state(devnet)
}

async fn list(State(d): State<Shared>) -> Json<Vec<NodeResponse>> {
    Json(d.lock().expect("devnet").nodes())
}

/// Parses a request body; the error is upstream's 400 message.
fn body<T: serde::de::DeserializeOwned>(raw: &[u8]) -> Result<T, String> {
    serde_json::from_slice(raw).map_err(|e| format!("invalid request body: {e}"))
}

async fn upsert(State(d): State<Shared>, raw: axum::body::Bytes) -> Response {
    let config: InferenceNodeConfig = match body(&raw) {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e),
    };
    match d.lock().expect("devnet").upsert(config) {
        Ok((node, _)) => Json(node.config).into_response(),
        Err(e) => fail(StatusCode::BAD_REQUEST, e),
    }
}

async fn upsert_by_id(state: State<Shared>, Path(id): Path<String>, raw: axum::body::Bytes) -> Response {
    match body::<InferenceNodeConfig>(&raw) {
        Ok(c) if c.id != id => fail(StatusCode::BAD_REQUEST, "node id in the path and the body differ"),
        Ok(_) => upsert(state, raw).await,
        Err(e) => fail(StatusCode::BAD_REQUEST, e),
    }
}

async fn batch(State(d): State<Shared>, raw: axum::body::Bytes) -> Response {
    let configs: Vec<InferenceNodeConfig> = match body(&raw) {
        Ok(c) => c,
        Err(e) => return fail(StatusCode::BAD_REQUEST, e),
    };
    let mut devnet = d.lock().expect("devnet");
    let (mut nodes, mut errors) = (Vec::new(), Vec::new());
    for (i, c) in configs.into_iter().enumerate() {
        let id = c.id.clone();
        match devnet.upsert(c) {
            Ok((n, _)) => nodes.push(n.config),
            Err(e) => errors.push(format!("node[{i}] (id: {id}): {e}")),
        }
    }
    match (nodes.is_empty(), errors.is_empty()) {
        (_, true) => (StatusCode::CREATED, Json(nodes)).into_response(),
        (true, false) => {
            fail(StatusCode::BAD_REQUEST, json!({"error": "all nodes failed validation", "errors": errors}))
        }
        (false, false) => {
            (StatusCode::PARTIAL_CONTENT, Json(json!({"nodes": nodes, "errors": errors}))).into_response()
        }
    }
}

async fn delete(State(d): State<Shared>, Path(id): Path<String>) -> Response {
    // Upstream answers 200 whether or not the node existed.
    let removed = d.lock().expect("devnet").remove(&id).is_some();
    Json(removed).into_response()
}

async fn toggle(State(d): State<Shared>, Path(id): Path<String>, enabled: bool) -> Response {
    if !d.lock().expect("devnet").set_enabled(&id, enabled) {
        return fail(StatusCode::NOT_FOUND, format!("node not found: {id}"));
    }
    let word = if enabled { "enabled" } else { "disabled" };
    Json(NodeToggleResponse { message: format!("node {word} successfully"), node_id: id }).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn node(id: &str, model: &str) -> serde_json::Value {
        json!({"host": "10.0.0.1", "inference_port": 5000, "poc_port": 8080, "id": id,
               "models": {model: {"args": []}}, "max_concurrent": 10, "hardware": []})
    }

    async fn call(app: &Router, method: &str, path: &str, body: serde_json::Value) -> (StatusCode, serde_json::Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
        (status, serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null))
    }

    fn app() -> Router {
        admin_router(Arc::new(Mutex::new(Devnet::new(["a/ok".to_string()]))))
    }

    #[tokio::test]
    async fn batch_answers_created_partial_or_bad_request_like_upstream() {
        let app = app();
        let (s, v) = call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n1", "a/ok"), node("n2", "a/ok")])).await;
        assert_eq!((s, v.as_array().unwrap().len()), (StatusCode::CREATED, 2));
        let (s, v) = call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n3", "a/ok"), node("n4", "b/no")])).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert_eq!(v["errors"][0].as_str().unwrap().split(':').next(), Some("node[1] (id"));
        let (s, v) = call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n5", "b/no")])).await;
        assert_eq!((s, v["message"]["error"].as_str()), (StatusCode::BAD_REQUEST, Some("all nodes failed validation")));
        let (_, list) = call(&app, "GET", "/admin/v1/nodes", serde_json::Value::Null).await;
        assert_eq!(list.as_array().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn callback_records_batches_and_counts_unique_proofs_as_weight() {
        let devnet = Arc::new(Mutex::new(Devnet::new(Vec::new())));
        let app = callback_router(devnet.clone());
        let batch = |node: i64, height: i64, nonces: &[i64]| {
            json!({"public_key": "pk", "block_hash": "h", "block_height": height, "node_id": node,
                   "nonces": nonces, "dist": vec![1.2; nonces.len()]})
        };
        for (path, b) in [
            ("/v1/poc-batches/generated", batch(0, 10, &[0, 2, 4])),
            ("/v1/poc-batches/generated", batch(0, 10, &[4, 6])), // 4 again: a retried post
            ("/mlnode/v1/poc-batches/generated", batch(1, 10, &[1])),
            ("/v1/poc-batches/generated", batch(1, 9, &[3, 5])), // an older round
        ] {
            assert_eq!(call(&app, "POST", path, b).await.0, StatusCode::OK);
        }
        assert_eq!(devnet.lock().unwrap().weights(10), BTreeMap::from([(0, 4), (1, 1)]));
        let (s, _) = call(&app, "POST", "/v1/poc-batches/generated", json!({"nonces": [1]})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let mut uneven = batch(0, 10, &[1, 2]);
        uneven["dist"] = json!([1.0]);
        assert_eq!(call(&app, "POST", "/v1/poc-batches/generated", uneven).await.0, StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn epochs_endpoint_reports_the_phase_tests_set() {
        let devnet = Arc::new(Mutex::new(Devnet::new(Vec::new())));
        let app = public_router(devnet.clone());
        let (s, v) = call(&app, "GET", "/v1/epochs/latest", serde_json::Value::Null).await;
        assert_eq!(
            (s, v["phase"].as_str(), v["latest_epoch"]["index"].as_u64()),
            (StatusCode::OK, Some("Inference"), Some(1))
        );
        devnet.lock().unwrap().set_phase(EpochPhase::PocGenerate);
        let (_, v) = call(&app, "GET", "/v1/epochs/latest", serde_json::Value::Null).await;
        let e: EpochResponse = serde_json::from_value(v).unwrap();
        assert_eq!((e.phase, e.latest_epoch.index), (EpochPhase::PocGenerate, 2));
        assert!(e.poc_window());
    }

    #[tokio::test]
    async fn malformed_registrations_are_refused_with_reasons() {
        let app = app();
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", json!({"id": "x"})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["message"].as_str().unwrap().starts_with("invalid request body"), "{v}");
        let mut empty = node("", "a/ok");
        empty["host"] = json!("");
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", empty).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["message"], "node id is required and cannot be empty; host is required and cannot be empty");
        let (s, _) = call(&app, "PUT", "/admin/v1/nodes/other", node("n1", "a/ok")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, v) = call(&app, "PUT", "/admin/v1/nodes/n1", node("n1", "a/ok")).await;
        assert_eq!((s, v["id"].as_str()), (StatusCode::OK, Some("n1")));
    }
}
