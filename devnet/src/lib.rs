//! `devnet`: a local stand-in for the host's network node (upstream's "dapi"), for the demo and
//! the tests. It is a test double of an external service, not a network node: it keeps ML-node
//! registrations in memory and answers the admin API in upstream's JSON shapes.
//!
//! Served now: the admin API's node registration (`/admin/v1/nodes` list, upsert, batch,
//! delete, enable, disable), with upstream's governance-model check. The ML callback server,
//! the epochs endpoint and the PoC round driver join it with network registration.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use gonka_protocol::admin::{AdminState, InferenceNodeConfig, Node, NodeResponse, NodeState, NodeToggleResponse};
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
}

impl Devnet {
    pub fn new(governance_models: impl IntoIterator<Item = String>) -> Self {
        Self {
            governance_models: governance_models.into_iter().collect(),
            nodes: BTreeMap::new(),
            next_num: 0,
            epoch: 1,
        }
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
        self.nodes.remove(id).map(|(n, _)| n)
    }

    pub fn set_enabled(&mut self, id: &str, enabled: bool) -> bool {
        match self.nodes.get_mut(id) {
            Some((_, admin)) => {
                *admin = AdminState { enabled, epoch: self.epoch };
                true
            }
            None => false,
        }
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
