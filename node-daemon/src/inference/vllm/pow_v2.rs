//! PoC v2 over vLLM instances, as upstream's ML node fans it out (`api/inference/pow_v2_routes.py`)
//! to the `gonka_poc` plugin's routes on each instance (`/api/v1/pow/*`):
//!
//! - `init/generate` goes to every healthy instance with `group_id` = its place among them and
//!   `n_groups` = their count (so their nonces never overlap); OK when one accepted;
//! - `stop` and `status` go to all of them (status aggregated: GENERATING, IDLE, MIXED,
//!   NO_BACKENDS);
//! - `generate` goes to one, round-robin; a queued answer's id becomes `<port>:<id>`, and
//!   `generate/<port>:<id>` is routed back to that instance (only ports of this ML node's own
//!   instances: the id is no way to reach anything else).
//!
//! The daemon's own checks come first, as for the native engine: the callback URL must be under
//! `mlCallbackUrl`, and the host's `poc.batchSize` replaces the request's. Under mutual TLS the
//! plugin is given the daemon's relay instead of the callback URL.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gonka_protocol::pow_v2::{GenerateRequest, InitGenerateRequest};
use serde_json::{Value, json};

use super::supervisor::{Instance, VllmServer};
use crate::http::{JsonBody, error};
use crate::inference::pow_v2::paths;

/// Upstream's per-call timeout towards an instance.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fan-out needs besides the instances.
#[derive(Clone)]
pub struct FanoutSettings {
    /// Callbacks must be under it (`daemon.json` `mlCallbackUrl`); `None`: any.
    pub callback_base: Option<String>,
    /// The host's batch size (`daemon.json` `poc.batchSize`), replacing the request's.
    pub batch_size: Option<usize>,
    pub http: reqwest::Client,
    /// The round's progress for the operator: its block height here, the nonces the plugin
    /// computed from the instances' status (the inference manager's watch).
    pub reporting: crate::node_state::Reporting,
    /// Under mutual TLS, where the plugin posts its callbacks instead (the daemon relays them
    /// with its certificate); `None`: straight to the network node.
    pub relay: Option<Arc<super::callback_relay::CallbackRelay>>,
}

#[derive(Clone)]
struct Fanout {
    server: Arc<VllmServer>,
    settings: FanoutSettings,
}

/// The PoC v2 routes of the ML-node API over `server`'s instances.
pub fn routes(server: Arc<VllmServer>, settings: FanoutSettings) -> Router {
    Router::new()
        .route(paths::INIT_GENERATE, post(init_generate))
        .route(paths::GENERATE, post(generate))
        .route(paths::GENERATE_RESULT, get(generate_result))
        .route(paths::STATUS, get(status))
        .route(paths::STOP, post(stop))
        .with_state(Fanout { server, settings })
}

fn no_backends() -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "No vLLM backends available")
}

/// One call to an instance's plugin: status and body (JSON when it is JSON, else the text).
async fn call(
    http: &reqwest::Client,
    instance: &Instance,
    path: &str,
    body: Option<&Value>,
) -> Result<(u16, Value), String> {
    let url = format!("{}{path}", instance.base_url());
    let request = match body {
        Some(b) => http.post(url).json(b),
        None => http.get(url),
    };
    let response = request.timeout(BACKEND_TIMEOUT).send().await.map_err(|e| e.to_string())?;
    let status = response.status().as_u16();
    let text = response.text().await.map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// POSTs `payload(i)` to `path` on each of `instances` at once: `{port, status: ok_status}` for
/// those that took it, `{port, error}` (their words) for the others, as upstream lists them.
async fn fan_out(
    http: &reqwest::Client,
    instances: &[Arc<Instance>],
    path: &str,
    ok_status: &str,
    payload: impl Fn(usize) -> Value,
) -> (Vec<Value>, Vec<Value>) {
    let calls = instances.iter().enumerate().map(|(i, instance)| {
        let body = payload(i);
        async move { (instance.port(), call(http, instance, path, Some(&body)).await) }
    });
    let (mut results, mut errors) = (Vec::new(), Vec::new());
    for (port, outcome) in futures::future::join_all(calls).await {
        match outcome {
            Ok((200, _)) => results.push(json!({"port": port, "status": ok_status})),
            Ok((_, body)) => errors.push(json!({"port": port, "error": as_text(&body)})),
            Err(e) => errors.push(json!({"port": port, "error": e})),
        }
    }
    (results, errors)
}

/// The text upstream relays for a failed call: the body as the instance sent it.
fn as_text(body: &Value) -> Value {
    match body {
        Value::String(_) => body.clone(),
        other => Value::String(other.to_string()),
    }
}

impl Fanout {
    /// The callback URL the plugin gets: the relay's under mutual TLS.
    fn callback_for_plugin(&self, url: Option<String>) -> Option<String> {
        match (&self.settings.relay, url) {
            (Some(relay), Some(url)) => Some(relay.register(&url)),
            (_, url) => url,
        }
    }

    /// The refusal of a callback URL outside `mlCallbackUrl`, if it is.
    fn callback_refusal(&self, url: Option<&str>) -> Option<Response> {
        let (url, base) = (url?, self.settings.callback_base.as_ref()?);
        (!crate::poc::callback_allowed(url, base)).then(|| {
            error(
                StatusCode::BAD_REQUEST,
                format!("callback URL {url} is not under this ML node's mlCallbackUrl {base}"),
            )
        })
    }
}

async fn init_generate(State(f): State<Fanout>, JsonBody(mut body): JsonBody<InitGenerateRequest>) -> Response {
    if let Some(refusal) = f.callback_refusal(body.url.as_deref()) {
        return refusal;
    }
    body.url = f.callback_for_plugin(body.url.take());
    if let Some(size) = f.settings.batch_size {
        body.batch_size = size;
    }
    let instances = f.server.healthy();
    if instances.is_empty() {
        return no_backends();
    }
    let n_groups = instances.len() as i64;
    let (results, errors) = fan_out(&f.settings.http, &instances, "/api/v1/pow/init/generate", "OK", |group| {
        let mut payload = body.clone();
        payload.group_id = group as i64;
        payload.n_groups = n_groups;
        serde_json::to_value(payload).expect("serialisable")
    })
    .await;
    if results.is_empty() {
        return (StatusCode::BAD_GATEWAY, Json(json!({"detail": {"errors": errors}}))).into_response();
    }
    // A new round: its nonces count from zero (every PoC v2 nonce is an artifact).
    f.server.reset_poc_counts();
    let height = body.block_height;
    f.settings.reporting.update_state(|s| {
        s.poc = crate::node_state::PocCounters { block_height: Some(height), ..Default::default() };
    });
    Json(json!({
        "status": "OK",
        "backends": results.len(),
        "n_groups": n_groups,
        "results": results,
        "errors": if errors.is_empty() { Value::Null } else { Value::Array(errors) },
    }))
    .into_response()
}

async fn stop(State(f): State<Fanout>) -> Response {
    let instances = f.server.healthy();
    if instances.is_empty() {
        return Json(json!({"status": "OK", "message": "No backends to stop"})).into_response();
    }
    // The round's final counts, before the plugin forgets them.
    futures::future::join_all(instances.iter().map(|i| super::supervisor::poll_poc_status(i, &f.settings.http))).await;
    let (results, errors) = fan_out(&f.settings.http, &instances, "/api/v1/pow/stop", "stopped", |_| json!({})).await;
    Json(json!({
        "status": "OK",
        "results": results,
        "errors": if errors.is_empty() { Value::Null } else { Value::Array(errors) },
    }))
    .into_response()
}

/// Upstream's aggregate of the instances' states.
pub fn aggregate(statuses: &[&str]) -> &'static str {
    if statuses.is_empty() {
        "NO_BACKENDS"
    } else if statuses.iter().all(|s| *s == "GENERATING") {
        "GENERATING"
    } else if statuses.contains(&"GENERATING") {
        "MIXED"
    } else if statuses.iter().all(|s| *s == "IDLE") {
        "IDLE"
    } else {
        "MIXED"
    }
}

async fn status(State(f): State<Fanout>) -> Response {
    let instances = f.server.healthy();
    if instances.is_empty() {
        return Json(json!({"status": "NO_BACKENDS", "backends": []})).into_response();
    }
    let calls = instances.iter().map(|instance| {
        let http = f.settings.http.clone();
        async move {
            let data = match call(&http, instance, "/api/v1/pow/status", None).await {
                Ok((200, Value::Object(map))) => Value::Object(map),
                Ok((_, body)) => json!({"status": "ERROR", "detail": as_text(&body)}),
                Err(e) => json!({"status": "ERROR", "detail": e}),
            };
            let mut entry = serde_json::Map::new();
            entry.insert("port".into(), json!(instance.port()));
            if let Value::Object(fields) = data {
                entry.extend(fields);
            }
            Value::Object(entry)
        }
    });
    let backends = futures::future::join_all(calls).await;
    let statuses: Vec<&str> =
        backends.iter().map(|b| b.get("status").and_then(Value::as_str).unwrap_or("UNKNOWN")).collect();
    Json(json!({"status": aggregate(&statuses), "backends": backends})).into_response()
}

async fn generate(State(f): State<Fanout>, JsonBody(mut body): JsonBody<GenerateRequest>) -> Response {
    if let Some(refusal) = f.callback_refusal(body.url.as_deref()) {
        return refusal;
    }
    body.url = f.callback_for_plugin(body.url.take());
    if let Some(size) = f.settings.batch_size {
        body.batch_size = size;
    }
    let Some(instance) = f.server.next_for_generate() else { return no_backends() };
    let payload = serde_json::to_value(&body).expect("serialisable");
    match call(&f.settings.http, &instance, "/api/v1/pow/generate", Some(&payload)).await {
        Ok((200, Value::Object(mut data))) => {
            if data.get("status").and_then(Value::as_str) == Some("queued")
                && let Some(id) = data.get("request_id").and_then(Value::as_str)
            {
                let composite = format!("{}:{id}", instance.port());
                data.insert("request_id".into(), Value::String(composite));
            }
            Json(Value::Object(data)).into_response()
        }
        Ok((200, other)) => error(StatusCode::BAD_GATEWAY, format!("the instance answered no JSON object: {other}")),
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, Json(json!({"detail": as_text(&body)}))).into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

async fn generate_result(State(f): State<Fanout>, uri: Uri) -> Response {
    // From the path itself: behind the native routes' seam, the outer route's parameters
    // travel with the request too.
    let request_id = uri.path().strip_prefix(paths::GENERATE_RESULT_PREFIX).unwrap_or_default().to_string();
    let Some((port, id)) = request_id.split_once(':') else {
        return error(StatusCode::BAD_REQUEST, "Invalid request_id format (expected port:uuid)");
    };
    let Ok(port) = port.parse::<u16>() else { return error(StatusCode::BAD_REQUEST, "Invalid port in request_id") };
    // Only this ML node's instances: the id names no other address.
    let Some(instance) = f.server.instance_on(port) else {
        return error(StatusCode::NOT_FOUND, "Request not found");
    };
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return error(StatusCode::NOT_FOUND, "Request not found");
    }
    match call(&f.settings.http, &instance, &format!("/api/v1/pow/generate/{id}"), None).await {
        Ok((200, Value::Object(mut data))) => {
            data.insert("request_id".into(), Value::String(request_id));
            Json(Value::Object(data)).into_response()
        }
        Ok((404, _)) => error(StatusCode::NOT_FOUND, "Request not found"),
        Ok((status, body)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (status, Json(json!({"detail": as_text(&body)}))).into_response()
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, e),
    }
}

#[cfg(test)]
mod tests {
    use super::aggregate;

    #[test]
    fn states_aggregate_as_upstreams() {
        assert_eq!(aggregate(&[]), "NO_BACKENDS");
        assert_eq!(aggregate(&["GENERATING", "GENERATING"]), "GENERATING");
        assert_eq!(aggregate(&["GENERATING", "IDLE"]), "MIXED");
        assert_eq!(aggregate(&["IDLE", "IDLE"]), "IDLE");
        assert_eq!(aggregate(&["IDLE", "ERROR"]), "MIXED");
        assert_eq!(aggregate(&["STOPPED"]), "MIXED");
    }
}
