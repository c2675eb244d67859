//! One manager at a time, as upstream's `check_service_conflicts`: a request to a manager's
//! endpoints (`/api/v1/pow/...`, `/api/v1/inference/...`) while another manager runs is refused
//! with 409, naming both. `/state`, `/stop`, GPU and health endpoints are never refused.
//! While an opportunistic ML node has yielded its GPUs ([`crate::lending`]) every manager is
//! refused with 503, naming why and when it rejoins.
//!
//! The inference manager's endpoints (`/inference/up`, `/up/async`, `/up/status`, `/down`) are
//! here, guarded like the others. With the `torch` feature they bring a model up in the
//! engine (upstream 2026's answers: 409 while starting or running, 500 naming why a start
//! failed); without it they answer as an upstream ML node whose engine cannot start (200,
//! `{"status": "ERROR", "message": ...}`), never a 404 that reads as an old ML node.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::post;
#[cfg(not(feature = "torch"))]
use gonka_protocol::ml_node::InferenceUpResponse;
use gonka_protocol::ml_node::{InferenceUpRequest, ServiceState, StatusResponse};

use crate::http::{JsonBody, error};
use crate::state::AppState;

const API_PREFIX: &str = "/api/v1";

/// The manager a path belongs to: its first segment after `/api/v1`, upper-cased, as upstream
/// names it (`/api/v1/pow/init` → `POW`).
pub fn requested_service(path: &str) -> String {
    path.strip_prefix(API_PREFIX).unwrap_or(path).trim_start_matches('/').split('/').next().unwrap_or("").to_uppercase()
}

/// `None` when `requested` may run in `current` mode, else upstream's refusal.
pub fn conflict(current: ServiceState, requested: &str) -> Option<String> {
    if current == ServiceState::Stopped {
        return None;
    }
    let current = current.as_str();
    (current != requested).then(|| {
        format!("Cannot run {requested} because MLNode is currently in {current} mode. Please stop {current} first.")
    })
}

/// Route layer for the managers' routers (it runs only for routes that matched, as FastAPI's
/// router dependencies do: an unknown path stays a 404).
pub async fn refuse_conflicts(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let yielded = state.reporting.state().borrow().yielded.clone();
    if let Some(y) = yielded {
        return error(StatusCode::SERVICE_UNAVAILABLE, yielded_detail(&y));
    }
    let requested = requested_service(request.uri().path());
    match conflict(state.service_state(), &requested) {
        Some(detail) => error(StatusCode::CONFLICT, detail),
        None => next.run(request).await,
    }
}

/// Why an opportunistic ML node takes no work now.
pub fn yielded_detail(y: &crate::node_state::Yielded) -> String {
    let idle = match y.idle_since {
        Some(_) => "they are idle now",
        None => "they are busy now",
    };
    format!(
        "this ML node has yielded its GPUs to other work ({}); it takes work again once they have been idle for {} s ({idle})",
        y.reason,
        y.rejoin_after_idle.as_secs()
    )
}

/// Upstream's inference manager endpoints (`api/inference/routes.py`), on the engine.
#[cfg(feature = "torch")]
pub fn inference_routes() -> Router<Arc<AppState>> {
    use axum::Json;
    use axum::response::IntoResponse;
    use axum::routing::get;

    async fn start(
        state: &Arc<AppState>,
        request: InferenceUpRequest,
    ) -> Result<tokio::task::JoinHandle<Result<(), String>>, Response> {
        let configured = &state.policy.models;
        if !configured.is_empty() && !configured.contains(&request.model) {
            return Err(error(
                StatusCode::CONFLICT,
                format!("{} is not a model this ML node is configured for ({})", request.model, configured.join(", ")),
            ));
        }
        let gpus = state.gpu_offer().await;
        state.inference.start(request, gpus).map_err(|e| error(StatusCode::CONFLICT, e.to_string()))
    }

    async fn up(State(state): State<Arc<AppState>>, JsonBody(request): JsonBody<InferenceUpRequest>) -> Response {
        let task = match start(&state, request).await {
            Ok(t) => t,
            Err(r) => return r,
        };
        match task.await {
            Ok(Ok(())) => Json(StatusResponse::ok()).into_response(),
            Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }

    async fn up_async(State(state): State<Arc<AppState>>, JsonBody(request): JsonBody<InferenceUpRequest>) -> Response {
        match start(&state, request).await {
            Ok(_) => {
                Json(serde_json::json!({"status": "starting", "message": "Inference startup initiated in background"}))
                    .into_response()
            }
            Err(r) => r,
        }
    }

    async fn down(State(state): State<Arc<AppState>>) -> Json<StatusResponse> {
        state.pow_v2.stop().await;
        state.inference.down().await;
        Json(StatusResponse::ok())
    }

    Router::new()
        .route("/api/v1/inference/up", post(up))
        .route("/api/v1/inference/up/async", post(up_async))
        .route(
            "/api/v1/inference/up/status",
            get(|State(state): State<Arc<AppState>>| async move { Json(state.inference.startup_status()) }),
        )
        .route("/api/v1/inference/down", post(down))
        .route("/api/v1/inference/instances", get(instances))
}

/// This daemon's own: which engine serves, and for vLLM each instance (port, GPUs, phase,
/// process, restarts, last error, queue), for an SRE and the tests.
#[cfg(feature = "torch")]
async fn instances(State(state): State<Arc<AppState>>) -> axum::Json<serde_json::Value> {
    use crate::inference::manager::Backend;
    let (engine, model, instances) = match (state.inference.backend(), state.inference.vllm()) {
        (Some(Backend::Native(served)), _) => ("native", Some(served.name.clone()), Vec::new()),
        (_, Some(server)) => ("vllm", Some(server.model.clone()), server.reports()),
        _ => ("none", None, Vec::new()),
    };
    axum::Json(serde_json::json!({"engine": engine, "model": model, "instances": instances}))
}

/// Upstream's inference manager endpoints (`api/inference/routes.py`), as an ML node answers
/// whose engine cannot start.
#[cfg(not(feature = "torch"))]
pub fn inference_routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/inference/up", post(inference_up))
        .route("/api/v1/inference/up/async", post(inference_up))
        .route("/api/v1/inference/down", post(|| async { axum::Json(StatusResponse::ok()) }))
}

#[cfg(not(feature = "torch"))]
async fn inference_up(
    State(state): State<Arc<AppState>>,
    JsonBody(request): JsonBody<InferenceUpRequest>,
) -> axum::Json<InferenceUpResponse> {
    let configured = &state.policy.models;
    let message = if !configured.is_empty() && !configured.contains(&request.model) {
        format!("{} is not a model this ML node is configured for ({})", request.model, configured.join(", "))
    } else {
        tracing::warn!(model = %request.model, "the network node asked for inference, which this ML node does not serve");
        format!(
            "cannot serve {}: gonka-node-daemon proves compute (PoC v1) and runs no inference engine",
            request.model
        )
    };
    axum::Json(InferenceUpResponse { status: "ERROR".into(), message: Some(message) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manager_is_the_first_path_segment() {
        assert_eq!(requested_service("/api/v1/pow/init/generate"), "POW");
        assert_eq!(requested_service("/api/v1/inference/up"), "INFERENCE");
        assert_eq!(requested_service("/api/v1/train/start"), "TRAIN");
    }

    #[test]
    fn only_another_running_manager_conflicts() {
        assert_eq!(conflict(ServiceState::Stopped, "INFERENCE"), None);
        assert_eq!(conflict(ServiceState::Pow, "POW"), None);
        assert_eq!(
            conflict(ServiceState::Pow, "INFERENCE").as_deref(),
            Some("Cannot run INFERENCE because MLNode is currently in POW mode. Please stop POW first.")
        );
        assert!(conflict(ServiceState::Inference, "POW").unwrap().contains("currently in INFERENCE mode"));
    }
}
