//! `devnet`: a local stand-in for the host's network node (upstream's "dapi"), for the demo and
//! the tests. It is a test double of an external service, not a network node: it keeps ML-node
//! registrations in memory and answers the admin API as upstream does, byte for byte where it
//! matters (`{"error": ...}` bodies, `null` for nil lists, echo's content-type check).
//!
//! Two generations of network node are played ([`Generation`]): the 2025 launch one, whose
//! `POST /admin/v1/nodes` registers a node again (new broker number, state reset, a second
//! entry in its config file) and which has no `PUT`, and the 2026 mainline one, whose `POST`
//! and `PUT /admin/v1/nodes/:id` update in place. Each refuses as its code does (2025: 500
//! `error creating new node`; 2026: 400 on create, 500 on update).
//!
//! Served: the admin API's node registration (`/admin/v1/nodes` list, register, batch, update,
//! delete, enable, disable), with upstream's governance-model check; the ML callback server
//! (`/v1/poc-batches/generated|validated`, upstream's :9100) that records PoC v1 batches and
//! counts weights as the chain does (unique proofs per ML node), and PoC v2's
//! `/v2/poc-batches/{model}/generated|validated`; the public API's `/v1/epochs/latest` with a
//! phase tests set; [`ml_node_client`], the ML-node client as upstream's network node writes its
//! requests; [`round`], which drives registered ML nodes through a PoC v1 round with the 2025
//! network node's call sequence, and [`round_v2`], a PoC v2 round with the 2026 one's;
//! [`inference_validation`], the 2026 network node's rewriting of an executor's chat request,
//! the validator's replay of its answer and their comparison.

pub mod inference_validation;
pub mod ml_node_client;
pub mod round;
pub mod round_v2;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
pub use gonka_protocol::admin::Generation;
use gonka_protocol::admin::{
    AdminError, AdminState, InferenceNodeConfig, Node, NodeResponse, NodeState, NodeToggleResponse,
};
use gonka_protocol::network::{EpochPhase, EpochResponse, LatestEpoch};
use gonka_protocol::pow::{ProofBatch, ValidatedBatch};
use gonka_protocol::pow_v2::{GeneratedArtifactBatch, ValidatedResult};
use serde_json::json;

/// A refused admin call: the status and the words upstream answers with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub error: String,
}

impl Refusal {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self { status: status.as_u16(), error: error.into() }
    }
}

/// The network node's registrations.
#[derive(Debug)]
pub struct Devnet {
    /// Which network node this plays.
    pub generation: Generation,
    /// Models governance approved; registrations naming others are refused.
    pub governance_models: BTreeSet<String>,
    /// The broker's nodes by id (what `GET /admin/v1/nodes` lists).
    nodes: BTreeMap<String, (Node, AdminState)>,
    /// The network node's config file of nodes: a 2025 `POST` of a known id appends a second
    /// entry; a delete or a 2026 update rewrites it from the broker.
    config: Vec<InferenceNodeConfig>,
    /// The last broker number handed out (upstream's `curMaxNodesNum`: the first node gets 1).
    last_num: u64,
    /// The current epoch, stamped on enable/disable.
    pub epoch: u64,
    /// PoC batches ML nodes posted to the callback server, in arrival order.
    pub generated: Vec<ProofBatch>,
    /// Validation verdicts ML nodes posted.
    pub validated: Vec<ValidatedBatch>,
    /// PoC v2 artifact batches ML nodes posted, with the model their path named.
    pub generated_v2: Vec<(String, GeneratedArtifactBatch)>,
    /// PoC v2 validation verdicts, with the model their path named.
    pub validated_v2: Vec<(String, ValidatedResult)>,
    /// The epoch `/v1/epochs/latest` reports; tests (and the round driver) move it along.
    pub epoch_state: EpochResponse,
    /// Admin API writes received (registrations, updates, deletes, enables, disables), accepted
    /// or not: what a steady fleet should not cause.
    pub admin_writes: u64,
    /// Admin API requests received, reads included.
    pub admin_requests: u64,
    /// The `Authorization` header of the latest admin API request that had one.
    pub admin_authorization: Option<String>,
}

impl Devnet {
    /// A 2026 mainline network node.
    pub fn new(governance_models: impl IntoIterator<Item = String>) -> Self {
        Self::of(Generation::Mainline2026, governance_models)
    }

    pub fn of(generation: Generation, governance_models: impl IntoIterator<Item = String>) -> Self {
        Self {
            generation,
            governance_models: governance_models.into_iter().collect(),
            nodes: BTreeMap::new(),
            config: Vec::new(),
            last_num: 0,
            epoch: 1,
            generated: Vec::new(),
            validated: Vec::new(),
            generated_v2: Vec::new(),
            validated_v2: Vec::new(),
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
            admin_requests: 0,
            admin_authorization: None,
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

    /// Registered nodes, typed.
    pub fn nodes(&self) -> Vec<NodeResponse> {
        self.nodes
            .values()
            .map(|(node, admin)| NodeResponse {
                node: node.clone(),
                state: NodeState { admin_state: *admin, ..NodeState::default() },
            })
            .collect()
    }

    /// How many entries the network node's config file has for `id` (upstream's 2025 POST of
    /// a known id makes it two).
    pub fn config_entries(&self, id: &str) -> usize {
        self.config.iter().filter(|c| c.id == id).count()
    }

    /// `GET /admin/v1/nodes` as upstream's Go writes it: a nil `hardware` is `null`, statuses
    /// are names, and each generation has its own fields (2025: the node's `version`; 2026: the
    /// state's `ml_node_version` and `preserved_models`).
    pub fn listing(&self) -> serde_json::Value {
        let entries = self.nodes.values().map(|(node, admin)| {
            let c = &node.config;
            let models: serde_json::Map<String, serde_json::Value> =
                c.models.iter().map(|(m, a)| (m.clone(), json!({"args": a.args}))).collect();
            let mut n = json!({
                "host": c.host, "inference_segment": c.inference_segment, "inference_port": c.inference_port,
                "poc_segment": c.poc_segment, "poc_port": c.poc_port, "models": models, "id": c.id,
                "max_concurrent": c.max_concurrent, "node_num": node.node_num,
                "hardware": if c.hardware.is_empty() { json!(null) } else { json!(c.hardware) },
            });
            let mut state = json!({
                "intended_status": "UNKNOWN", "current_status": "UNKNOWN",
                "poc_intended_status": "IDLE", "poc_current_status": "IDLE",
                "lock_count": 0, "failure_reason": "", "status_timestamp": "2026-11-28T00:00:00Z",
                "admin_state": {"enabled": admin.enabled, "epoch": admin.epoch},
                "epoch_models": {}, "epoch_ml_nodes": {},
            });
            match self.generation {
                Generation::Launch2025 => n["version"] = json!(""),
                Generation::Mainline2026 => {
                    state["ml_node_version"] = json!("");
                    state["preserved_models"] = json!(null);
                }
            }
            json!({"node": n, "state": state})
        });
        serde_json::Value::Array(entries.collect())
    }

    /// `POST /admin/v1/nodes`, as the generation played does it.
    pub fn register(&mut self, config: InferenceNodeConfig) -> Result<Node, Refusal> {
        self.admin_writes += 1;
        match self.generation {
            Generation::Launch2025 => self.register_2025(config),
            Generation::Mainline2026 if self.nodes.contains_key(&config.id) => self.update_2026(config),
            Generation::Mainline2026 => self.create_2026(config),
        }
    }

    /// `PUT /admin/v1/nodes/:id`: 2026 only (2025 has no such route: 405).
    pub fn update(&mut self, config: InferenceNodeConfig) -> Result<Node, Refusal> {
        self.admin_writes += 1;
        match self.generation {
            Generation::Launch2025 => Err(Refusal::new(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed")),
            Generation::Mainline2026 if self.nodes.contains_key(&config.id) => self.update_2026(config),
            Generation::Mainline2026 => self.create_2026(config),
        }
    }

    /// 2025 `RegisterNode`: no field checks, every model must be approved (else a bare 500),
    /// and a known id is registered again.
    fn register_2025(&mut self, config: InferenceNodeConfig) -> Result<Node, Refusal> {
        if config.models.keys().any(|m| !self.governance_models.contains(m)) {
            return Err(Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, "error creating new node"));
        }
        let node = self.insert_new(config.clone());
        self.config.push(config);
        Ok(node)
    }

    /// 2026 `RegisterNode`: field checks, unapproved models dropped (none left: refused).
    fn create_2026(&mut self, mut config: InferenceNodeConfig) -> Result<Node, Refusal> {
        let refused = |why: String| Refusal::new(StatusCode::BAD_REQUEST, format!("failed to create node: {why}"));
        self.validate(&config, None).map_err(refused)?;
        config.models.retain(|m, _| self.governance_models.contains(m));
        if config.models.is_empty() {
            return Err(refused(format!("node {} has no governance-valid models", config.id)));
        }
        let node = self.insert_new(config.clone());
        self.config.push(config);
        Ok(node)
    }

    /// 2026 `UpdateNode`: field checks, every model approved, broker number and state kept.
    fn update_2026(&mut self, config: InferenceNodeConfig) -> Result<Node, Refusal> {
        let refused =
            |why: String| Refusal::new(StatusCode::INTERNAL_SERVER_ERROR, format!("failed to update node: {why}"));
        self.validate(&config, Some(&config.id)).map_err(refused)?;
        if let Some(m) = config.models.keys().find(|m| !self.governance_models.contains(*m)) {
            return Err(refused(format!("model {m} is not a valid governance model")));
        }
        let (node, _) = self.nodes.get_mut(&config.id).expect("checked by the caller");
        node.config = config;
        let node = node.clone();
        self.sync_config();
        Ok(node)
    }

    fn insert_new(&mut self, config: InferenceNodeConfig) -> Node {
        self.last_num += 1;
        let node = Node { config, node_num: self.last_num, version: None };
        let admin = AdminState { enabled: true, epoch: self.epoch };
        self.nodes.insert(node.config.id.clone(), (node.clone(), admin));
        node
    }

    /// Upstream's 2026 `validateInferenceNode`: required fields and unique host+port.
    fn validate(&self, c: &InferenceNodeConfig, except: Option<&str>) -> Result<(), String> {
        let mut errors = Vec::new();
        if c.id.trim().is_empty() {
            errors.push("node id is required and cannot be empty".to_string());
        }
        if c.host.trim().is_empty() {
            errors.push("host is required and cannot be empty".to_string());
        }
        if c.inference_port == 0 {
            errors.push(format!("inference_port must be between 1 and 65535, got {}", c.inference_port));
        }
        if c.poc_port == 0 {
            errors.push(format!("poc_port must be between 1 and 65535, got {}", c.poc_port));
        }
        if c.max_concurrent == 0 {
            errors.push(format!("max_concurrent must be greater than 0, got {}", c.max_concurrent));
        }
        if c.models.is_empty() {
            errors.push("at least one model must be specified".to_string());
        }
        let others = || self.nodes.iter().filter(|(id, _)| Some(id.as_str()) != except);
        if let Some((id, _)) =
            others().find(|(_, (n, _))| n.config.host == c.host && n.config.inference_port == c.inference_port)
        {
            errors.push(format!(
                "duplicate inference host+port combination: {}:{} (already used by node '{id}')",
                c.host, c.inference_port
            ));
        }
        if let Some((id, _)) = others().find(|(_, (n, _))| n.config.host == c.host && n.config.poc_port == c.poc_port) {
            errors.push(format!(
                "duplicate PoC host+port combination: {}:{} (already used by node '{id}')",
                c.host, c.poc_port
            ));
        }
        if errors.is_empty() { Ok(()) } else { Err(format!("validation failed: {}", errors.join("; "))) }
    }

    /// Upstream's `syncNodesWithConfig`: the config file becomes the broker's list.
    fn sync_config(&mut self) {
        self.config = self.nodes.values().map(|(n, _)| n.config.clone()).collect();
    }

    /// `DELETE /admin/v1/nodes/:id`; whether it was there.
    pub fn remove(&mut self, id: &str) -> bool {
        self.admin_writes += 1;
        let removed = self.nodes.remove(id).is_some();
        self.sync_config();
        removed
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
        .route("/v2/poc-batches/{model}/generated", post(generated_v2))
        .route("/v2/poc-batches/{model}/validated", post(validated_v2))
        .with_state(devnet)
}

/// The model of a v2 callback path: upstream escapes the model id twice
/// (`url.PathEscape(url.PathEscape(id))`), so after routing's one decoding it is decoded once
/// more.
fn callback_model(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// A PoC v2 callback (`T` its body), recorded by `keep` with the model its path names.
async fn record_v2<T: serde::de::DeserializeOwned>(
    devnet: &Shared,
    model: &str,
    headers: &HeaderMap,
    raw: &[u8],
    keep: impl FnOnce(&mut Devnet, String, T),
) -> Response {
    match bind::<T>(headers, raw) {
        Ok(body) => {
            keep(&mut devnet.lock().expect("devnet"), callback_model(model), body);
            StatusCode::OK.into_response()
        }
        Err(r) => refused(r),
    }
}

async fn generated_v2(
    State(d): State<Shared>,
    Path(model): Path<String>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    record_v2(&d, &model, &headers, &raw, |d, m, batch: GeneratedArtifactBatch| d.generated_v2.push((m, batch))).await
}

async fn validated_v2(
    State(d): State<Shared>,
    Path(model): Path<String>,
    headers: HeaderMap,
    raw: axum::body::Bytes,
) -> Response {
    record_v2(&d, &model, &headers, &raw, |d, m, result: ValidatedResult| d.validated_v2.push((m, result))).await
}

async fn generated(State(d): State<Shared>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    match bind::<ProofBatch>(&headers, &raw) {
        Ok(batch) if batch.nonces.len() != batch.dist.len() => {
            fail(StatusCode::BAD_REQUEST, "nonces and dist differ in length")
        }
        Ok(batch) => {
            d.lock().expect("devnet").generated.push(batch);
            StatusCode::OK.into_response()
        }
        Err(r) => refused(r),
    }
}

async fn validated(State(d): State<Shared>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    match bind::<ValidatedBatch>(&headers, &raw) {
        Ok(batch) => {
            d.lock().expect("devnet").validated.push(batch);
            StatusCode::OK.into_response()
        }
        Err(r) => refused(r),
    }
}

pub type Shared = Arc<Mutex<Devnet>>;

/// An error answer as upstream's `TransparentErrorHandler` writes it.
fn fail(status: StatusCode, error: impl Into<serde_json::Value>) -> Response {
    (status, Json(AdminError::new(error))).into_response()
}

fn refused(r: Refusal) -> Response {
    fail(StatusCode::from_u16(r.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), r.error)
}

/// echo's `Bind` of a JSON body: it wants `Content-Type: application/json` (else 415), reads
/// an empty body as zero values, and ignores unknown fields; a body that does not decode is a
/// 400.
fn bind<T: serde::de::DeserializeOwned>(headers: &HeaderMap, raw: &[u8]) -> Result<T, Refusal> {
    let raw: &[u8] = if raw.is_empty() { b"{}" } else { raw };
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json {
        return Err(Refusal::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "Unsupported Media Type"));
    }
    serde_json::from_slice(raw).map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, format!("invalid request body: {e}")))
}

/// The admin API (upstream serves it on :9200).
pub fn admin_router(devnet: Shared) -> Router {
    Router::new()
        .route("/admin/v1/nodes", get(list).post(register))
        .route("/admin/v1/nodes/batch", post(batch))
        .route("/admin/v1/nodes/{id}", axum::routing::put(update).delete(delete))
        .route("/admin/v1/nodes/{id}/enable", post(|s, p| toggle(s, p, true)))
        .route("/admin/v1/nodes/{id}/disable", post(|s, p| toggle(s, p, false)))
        .fallback(|| async { fail(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async { fail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed") })
        .layer(axum::middleware::from_fn_with_state(devnet.clone(), count_admin_request))
        .with_state(devnet)
}

/// Counts every admin request and keeps the credentials it carried.
async fn count_admin_request(
    State(d): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    {
        let mut devnet = d.lock().expect("devnet");
        devnet.admin_requests += 1;
        if let Some(auth) = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()) {
            devnet.admin_authorization = Some(auth.to_string());
        }
    }
    next.run(request).await
}

async fn list(State(d): State<Shared>) -> Json<serde_json::Value> {
    Json(d.lock().expect("devnet").listing())
}

async fn register(State(d): State<Shared>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    write_node(&d, &headers, &raw, Devnet::register)
}

/// `PUT /admin/v1/nodes/:id`: upstream reads the id from the body; 2025 has no such route.
async fn update(State(d): State<Shared>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    if d.lock().expect("devnet").generation == Generation::Launch2025 {
        return fail(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed");
    }
    write_node(&d, &headers, &raw, Devnet::update)
}

/// Binds a node config from the body and writes it with `write`; answers the node or the
/// refusal.
fn write_node(
    d: &Shared,
    headers: &HeaderMap,
    raw: &[u8],
    write: fn(&mut Devnet, InferenceNodeConfig) -> Result<Node, Refusal>,
) -> Response {
    match bind(headers, raw).and_then(|config| write(&mut d.lock().expect("devnet"), config)) {
        Ok(node) => Json(node.config).into_response(),
        Err(r) => refused(r),
    }
}

async fn batch(State(d): State<Shared>, headers: HeaderMap, raw: axum::body::Bytes) -> Response {
    let configs: Vec<InferenceNodeConfig> = match bind(&headers, &raw) {
        Ok(c) => c,
        Err(r) => return refused(r),
    };
    let mut devnet = d.lock().expect("devnet");
    let (mut nodes, mut errors) = (Vec::new(), Vec::new());
    for (i, c) in configs.into_iter().enumerate() {
        let id = c.id.clone();
        match devnet.register(c) {
            Ok(n) => nodes.push(n.config),
            Err(r) => errors.push(format!("node[{i}] (id: {id}): {}", r.error)),
        }
    }
    // 2025 skips failures silently (and answers `null` when none went through).
    if devnet.generation == Generation::Launch2025 {
        let nodes = if nodes.is_empty() { json!(null) } else { json!(nodes) };
        return (StatusCode::CREATED, Json(nodes)).into_response();
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
    Json(d.lock().expect("devnet").remove(&id)).into_response()
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
        json!({"host": format!("10.0.0.{}", id.len()), "inference_port": 5000, "poc_port": 8080, "id": id,
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

    fn devnet_app(generation: Generation) -> (Shared, Router) {
        let devnet = Arc::new(Mutex::new(Devnet::of(generation, ["a/ok".to_string()])));
        (devnet.clone(), admin_router(devnet))
    }

    #[tokio::test]
    async fn batch_answers_created_partial_or_bad_request_like_upstream() {
        let (_, app) = devnet_app(Generation::Mainline2026);
        let (s, v) =
            call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n1", "a/ok"), node("n22", "a/ok")])).await;
        assert_eq!((s, v.as_array().unwrap().len()), (StatusCode::CREATED, 2));
        let (s, v) =
            call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n333", "a/ok"), node("n4444", "b/no")])).await;
        assert_eq!(s, StatusCode::PARTIAL_CONTENT);
        assert_eq!(v["errors"][0].as_str().unwrap().split(':').next(), Some("node[1] (id"));
        let (s, v) = call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n55555", "b/no")])).await;
        assert_eq!((s, v["error"]["error"].as_str()), (StatusCode::BAD_REQUEST, Some("all nodes failed validation")));
        let (_, list) = call(&app, "GET", "/admin/v1/nodes", serde_json::Value::Null).await;
        assert_eq!(list.as_array().unwrap().len(), 3);

        // 2025 skips failures silently; nothing went through: `null`.
        let (_, app) = devnet_app(Generation::Launch2025);
        let (s, v) = call(&app, "POST", "/admin/v1/nodes/batch", json!([node("n1", "b/no")])).await;
        assert_eq!((s, v), (StatusCode::CREATED, serde_json::Value::Null));
    }

    #[tokio::test]
    async fn a_2025_network_node_registers_a_known_id_again() {
        let (devnet, app) = devnet_app(Generation::Launch2025);
        let (s, _) = call(&app, "POST", "/admin/v1/nodes", node("n1", "a/ok")).await;
        assert_eq!(s, StatusCode::OK);
        call(&app, "POST", "/admin/v1/nodes/n1/disable", json!(null)).await;
        let (s, _) = call(&app, "POST", "/admin/v1/nodes", node("n1", "a/ok")).await;
        assert_eq!(s, StatusCode::OK);
        let (_, list) = call(&app, "GET", "/admin/v1/nodes", serde_json::Value::Null).await;
        let entry = &list[0];
        assert_eq!(list.as_array().unwrap().len(), 1, "the broker keys nodes by id");
        assert_eq!(entry["node"]["node_num"], 2, "a new broker number");
        assert_eq!(entry["state"]["admin_state"]["enabled"], true, "its state reset");
        assert_eq!(devnet.lock().unwrap().config_entries("n1"), 2, "and a second entry in the config file");
        // 2025's list: the node's version, no ml_node_version; nil hardware is null.
        assert_eq!((&entry["node"]["version"], &entry["node"]["hardware"]), (&json!(""), &json!(null)));
        assert!(entry["state"].get("ml_node_version").is_none());
        // No PUT; a refused model is a bare 500; a delete rewrites the config file.
        let (s, v) = call(&app, "PUT", "/admin/v1/nodes/n1", node("n1", "a/ok")).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("Method Not Allowed")));
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", node("n2", "b/no")).await;
        assert_eq!((s, v["error"].as_str()), (StatusCode::INTERNAL_SERVER_ERROR, Some("error creating new node")));
        let (s, v) = call(&app, "DELETE", "/admin/v1/nodes/n1", json!(null)).await;
        assert_eq!((s, v), (StatusCode::OK, json!(true)));
        assert_eq!(devnet.lock().unwrap().config_entries("n1"), 0);
    }

    #[tokio::test]
    async fn a_2026_network_node_updates_in_place() {
        let (devnet, app) = devnet_app(Generation::Mainline2026);
        call(&app, "POST", "/admin/v1/nodes", node("n1", "a/ok")).await;
        call(&app, "POST", "/admin/v1/nodes/n1/disable", json!(null)).await;
        let mut moved = node("n1", "a/ok");
        moved["host"] = json!("10.0.0.99");
        let (s, _) = call(&app, "PUT", "/admin/v1/nodes/n1", moved.clone()).await;
        assert_eq!(s, StatusCode::OK);
        moved["poc_port"] = json!(8081);
        let (s, _) = call(&app, "POST", "/admin/v1/nodes", moved.clone()).await;
        assert_eq!(s, StatusCode::OK, "POST of a known id is an update too");
        let (_, list) = call(&app, "GET", "/admin/v1/nodes", serde_json::Value::Null).await;
        let entry = &list[0];
        assert_eq!((&entry["node"]["node_num"], &entry["node"]["host"]), (&json!(1), &json!("10.0.0.99")));
        assert_eq!(entry["state"]["admin_state"]["enabled"], false, "state kept");
        assert_eq!(entry["state"]["ml_node_version"], "");
        assert_eq!(devnet.lock().unwrap().config_entries("n1"), 1);
        // Refusals: create 400, update 500, each with its words.
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", node("n2", "b/no")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(v["error"], "failed to create node: node n2 has no governance-valid models");
        let (s, v) = call(&app, "PUT", "/admin/v1/nodes/n1", node("n1", "b/no")).await;
        assert_eq!(s, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(v["error"], "failed to update node: model b/no is not a valid governance model");
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
        // echo's Bind wants a JSON content type.
        let req = Request::post("/v1/poc-batches/generated").body(Body::from(batch(0, 10, &[8]).to_string())).unwrap();
        assert_eq!(app.clone().oneshot(req).await.unwrap().status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
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
        let (_, app) = devnet_app(Generation::Mainline2026);
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", json!({"id": 7})).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(v["error"].as_str().unwrap().starts_with("invalid request body"), "{v}");
        let mut empty = node("", "a/ok");
        empty["host"] = json!("");
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", empty).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            v["error"],
            "failed to create node: validation failed: node id is required and cannot be empty; host is required and cannot be empty"
        );
        call(&app, "POST", "/admin/v1/nodes", node("n1", "a/ok")).await;
        let (s, v) = call(&app, "POST", "/admin/v1/nodes", node("n2", "a/ok")).await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "n1 and n2 share a host and ports: {v}");
    }
}
