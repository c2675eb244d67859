//! The PoC v1 endpoints (upstream `pow/service/routes.py`), under `/api/v1`.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gonka_protocol::pow::{InitRequest, PowResponse, ProofBatch};
use serde_json::json;

use super::engine::{Phase, PowError};
use crate::http::{JsonBody, error};
use crate::state::AppState;

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/pow/init", post(|s, b| init(s, b, Phase::Idle)))
        .route("/api/v1/pow/init/generate", post(|s, b| init(s, b, Phase::Generate)))
        .route("/api/v1/pow/init/validate", post(|s, b| init(s, b, Phase::Validate)))
        .route("/api/v1/pow/phase/generate", post(|s| phase(s, Phase::Generate)))
        .route("/api/v1/pow/phase/validate", post(|s| phase(s, Phase::Validate)))
        .route("/api/v1/pow/validate", post(validate))
        .route("/api/v1/pow/status", get(|State(s): State<Arc<AppState>>| async move { axum::Json(s.pow.status()) }))
        .route("/api/v1/pow/stop", post(stop))
}

fn failure(e: PowError) -> Response {
    let status = match e {
        PowError::NodeUnset
        | PowError::NotRunning
        | PowError::Params(_)
        | PowError::TooLarge { .. }
        | PowError::BatchSize(_) => StatusCode::BAD_REQUEST,
        PowError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
        PowError::CallbackNotAllowed { .. } => StatusCode::FORBIDDEN,
        PowError::ValidationBatch(_) => StatusCode::PAYLOAD_TOO_LARGE,
        PowError::NoGpu | PowError::ValidationBusy => StatusCode::SERVICE_UNAVAILABLE,
    };
    error(status, e.to_string())
}

async fn init(State(s): State<Arc<AppState>>, JsonBody(request): JsonBody<InitRequest>, phase: Phase) -> Response {
    match s.pow.init(request, phase) {
        Ok(pow_status) => axum::Json(PowResponse { status: "OK".into(), pow_status }).into_response(),
        Err(e) => failure(e),
    }
}

async fn phase(State(s): State<Arc<AppState>>, phase: Phase) -> Response {
    match s.pow.set_phase(phase) {
        Ok(pow_status) => axum::Json(PowResponse { status: "OK".into(), pow_status }).into_response(),
        Err(e) => failure(e),
    }
}

async fn validate(State(s): State<Arc<AppState>>, JsonBody(batch): JsonBody<ProofBatch>) -> Response {
    match s.pow.validate(batch) {
        // Upstream answers 200 with an empty (null) body.
        Ok(()) => axum::Json(serde_json::Value::Null).into_response(),
        Err(e) => failure(e),
    }
}

async fn stop(State(s): State<Arc<AppState>>) -> Response {
    if !s.pow.is_running() {
        return axum::Json(json!({"status": "OK", "pow_status": "PoW is not running"})).into_response();
    }
    s.pow.stop();
    axum::Json(json!({"status": "OK", "pow_status": s.pow.status()})).into_response()
}
