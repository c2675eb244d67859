//! The ML-node management API, as upstream's mlnode serves it to the network node: same paths,
//! JSON shapes and status codes, an optional `/vX.Y.Z` path prefix (the network node addresses
//! ML-node versions side by side that way), FastAPI-style `{"detail": ...}` errors.
//!
//! Served: state, stop, GPU devices and driver, health, readiness, versions, and (with the
//! `torch` feature) PoC v1's `/pow/*`. `/metrics` and the kubelet's probes are also on the
//! monitoring port ([`monitoring_router`]), which carries nothing else: a scraper or the kubelet
//! needs no access to this API (which may want a client certificate or a token). The managers' endpoints are guarded as upstream's are:
//! one manager at a time, 409 otherwise (`modes`). `/inference/up` answers that no inference is
//! served here; `/encrypted/identity` answers 503, upstream's "encryption disabled".
//!
//! Bodies are read as FastAPI reads them: JSON when the request says so or says nothing (the
//! 2025 network node sends no `Content-Type`), unknown fields ignored; an `Authorization`
//! header (the newest network node's `auth_token`) is accepted and not checked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gonka_protocol::ml_node::{
    GpuDevicesResponse, GpuInfo, HealthResponse, ManagerStatus, ManagersInfo, ReadinessResponse, ServiceState,
    StateResponse, StatusResponse, VersionsResponse,
};
use sha2::{Digest, Sha256};

use crate::gpu::GpuStatus;
use crate::http::error;
use crate::state::{AppState, MAX_IN_FLIGHT};

/// Upstream caches the health answer this long.
const HEALTH_CACHE: Duration = Duration::from_secs(5);
/// Largest request body (a validation sample of upstream's 200 nonces is a few KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;
/// Longest a request may take (none should come near it).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest `/inference/up` may take: it answers once the model is loaded (the network node
/// waits up to 15 minutes).
pub const MODEL_LOAD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// Longest a waited-for PoC v2 `generate` may take (a validation sample on a large model).
pub const POC_GENERATE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// The probes are answered whatever the load.
const UNLIMITED_PATHS: [&str; 4] = ["/healthz", "/readyz", "/livez", "/health"];

/// The router behind the version-prefix rewrite, ready for `axum::serve`.
pub type Service = axum::routing::IntoMakeService<tower::util::MapRequest<Router, RequestRewrite>>;
type RequestRewrite = fn(Request) -> Request;

/// The API, with the version-prefix rewrite in front of routing (a rewrite inside the router
/// would run after routing).
pub fn service(state: Arc<AppState>) -> Service {
    use tower::Layer;
    let rewrite: RequestRewrite = strip_version_prefix;
    let app = tower::util::MapRequestLayer::new(rewrite).layer(router(state));
    axum::ServiceExt::<Request>::into_make_service(app)
}

pub fn router(state: Arc<AppState>) -> Router {
    let managers = crate::modes::inference_routes();
    #[cfg(feature = "torch")]
    let managers = managers.merge(crate::poc::routes::routes()).merge(
        crate::inference::pow_v2::routes()
            .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::inference::pow_v2::engine_seam)),
    );
    let managers =
        managers.route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::modes::refuse_conflicts));
    #[cfg(feature = "torch")]
    let managers = managers.merge(crate::inference::model_cache::routes());
    Router::new()
        .merge(managers)
        .route("/api/v1/state", get(get_state))
        .route("/api/v1/stop", post(stop))
        .route("/api/v1/gpu/devices", get(gpu_devices))
        .route("/api/v1/gpu/driver", get(gpu_driver))
        .route("/api/v1/versions", get(versions))
        .route("/api/v1/inference/pow/versions", get(versions))
        .route(
            "/api/v1/encrypted/identity",
            get(|| async {
                error(StatusCode::SERVICE_UNAVAILABLE, "encrypted inference is not enabled on this ML node")
            }),
        )
        .route("/health", get(health))
        .route("/livez", get(health))
        .route("/readyz", get(readyz))
        .route("/healthz", get(|| async { "ok" }))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits))
        .with_state(state)
}

/// The monitoring port: `/metrics` and the kubelet's probes (`/healthz`, `/livez`, `/readyz`),
/// plain HTTP, no token, answered whatever the load (GPU readings cached, see
/// [`AppState::gpu_snapshot`]). The ML-node API's own `/health`, `/livez` and `/readyz` stay
/// where upstream's network node reads them.
pub fn monitoring_router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/livez", get(health))
        .route("/readyz", get(readyz))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "Not Found") })
        .with_state(state)
}

/// The bearer token when one is configured, then at most [`MAX_IN_FLIGHT`] requests at once and
/// [`REQUEST_TIMEOUT`] each, so no caller can tie the ML node up; the probes are exempt from
/// all three.
async fn limits(State(state): State<Arc<AppState>>, request: Request, next: axum::middleware::Next) -> Response {
    if UNLIMITED_PATHS.contains(&request.uri().path()) {
        return next.run(request).await;
    }
    if let Some(want) = &state.api_token_sha256 {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        // Digests are compared, so the comparison's time says nothing about the token.
        if given.as_ref() != Some(want) {
            return error(StatusCode::UNAUTHORIZED, "Not authenticated: this ML node wants its bearer token");
        }
    }
    let Ok(_permit) = state.in_flight.try_acquire() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_IN_FLIGHT} requests in flight already; try again"),
        );
    };
    let limit = match request.uri().path() {
        "/api/v1/inference/up" => MODEL_LOAD_TIMEOUT,
        "/api/v1/inference/pow/generate" => POC_GENERATE_TIMEOUT,
        _ => REQUEST_TIMEOUT,
    };
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, format!("no answer within {limit:?}")),
    }
}

/// `/v3.0.8/api/v1/state` → `/api/v1/state`.
fn strip_version_prefix(mut request: Request) -> Request {
    let path = request.uri().path();
    let Some(rest) = path.strip_prefix("/v") else { return request };
    let (version, tail) = rest.split_once('/').map_or((rest, ""), |(v, t)| (v, t));
    let is_version = version.split('.').count() == 3
        && version.split('.').all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    if !is_version {
        return request;
    }
    let new_path = format!("/{tail}");
    let path_and_query = match request.uri().query() {
        Some(q) => format!("{new_path}?{q}"),
        None => new_path,
    };
    let mut parts = request.uri().clone().into_parts();
    parts.path_and_query = path_and_query.parse().ok();
    if let Ok(uri) = Uri::from_parts(parts) {
        *request.uri_mut() = uri;
    }
    request
}

/// A fresh reading, for the GPU routes (they are under the in-flight limit).
async fn snapshot(state: &AppState) -> Vec<GpuStatus> {
    let probe = state.probe.clone();
    tokio::task::spawn_blocking(move || probe.snapshot()).await.unwrap_or_default()
}

/// `poc_status`, `inference_healthy` and `loaded_model` only in INFERENCE, as upstream: while
/// nothing serves yet (start-up, or every vLLM instance down) `NO_BACKENDS` and unhealthy.
async fn get_state(State(state): State<Arc<AppState>>) -> Json<StateResponse> {
    let service_state = state.service_state();
    #[cfg_attr(not(feature = "torch"), allow(unused_mut))]
    let mut answer = StateResponse {
        state: service_state,
        version: state.version.clone(),
        poc_status: None,
        inference_healthy: None,
        loaded_model: None,
        poc_validation_inference: false,
    };
    #[cfg(feature = "torch")]
    if service_state == ServiceState::Inference {
        use crate::inference::manager::Backend;
        let (poc_status, model) = match state.inference.backend() {
            Some(Backend::Native(served)) => {
                let generating = state.pow_v2.is_generating().await;
                (if generating { "GENERATING" } else { "IDLE" }, Some(served.name.clone()))
            }
            Some(Backend::Vllm(server)) if !server.healthy().is_empty() => {
                let reports: Vec<_> = server.healthy().iter().map(|i| i.report().poc_status).collect();
                (vllm_poc_status(&reports), Some(server.model.clone()))
            }
            _ => ("NO_BACKENDS", None),
        };
        answer.inference_healthy = Some(model.is_some());
        answer.poc_status = Some(poc_status.into());
        answer.loaded_model = model;
        answer.poc_validation_inference = true;
    }
    Json(answer)
}

/// Upstream's `/state` aggregate of the healthy instances' PoC states.
#[cfg(feature = "torch")]
fn vllm_poc_status(statuses: &[String]) -> &'static str {
    let active = |s: &String| s == "GENERATING" || s == "VALIDATING";
    if statuses.iter().all(|s| s == "GENERATING") {
        "GENERATING"
    } else if statuses.iter().all(|s| s == "VALIDATING") {
        "VALIDATING"
    } else if statuses.iter().any(active) {
        "MIXED"
    } else {
        "IDLE"
    }
}

/// With a model served, PoC validation runs alongside inference (the engine interleaves them);
/// the engine reports no vLLM version, being none.
async fn versions(State(state): State<Arc<AppState>>) -> Json<VersionsResponse> {
    #[cfg(feature = "torch")]
    let serving = state.inference.is_running();
    #[cfg(not(feature = "torch"))]
    let serving = false;
    Json(VersionsResponse { version: state.version.clone(), vllm_version: None, poc_validation_inference: serving })
}

/// Stops every manager: PoC v1, PoC v2 and the served model.
async fn stop(
    #[cfg_attr(not(feature = "torch"), allow(unused_variables))] State(state): State<Arc<AppState>>,
) -> Json<StatusResponse> {
    #[cfg(feature = "torch")]
    {
        state.pow.stop();
        state.pow_v2.stop().await;
        state.inference.down().await;
    }
    Json(StatusResponse::ok())
}

async fn gpu_devices(State(state): State<Arc<AppState>>) -> Json<GpuDevicesResponse> {
    let devices: Vec<_> = snapshot(&state).await.iter().map(GpuStatus::to_device).collect();
    Json(GpuDevicesResponse { count: devices.len(), devices })
}

async fn gpu_driver(State(state): State<Arc<AppState>>) -> Response {
    let probe = state.probe.clone();
    match tokio::task::spawn_blocking(move || probe.driver()).await {
        Ok(Ok(info)) => Json(info).into_response(),
        Ok(Err(e)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    let cached = state.health.lock().expect("health").clone().filter(|(at, _)| at.elapsed() < HEALTH_CACHE);
    let answer = match cached {
        Some((_, answer)) => answer,
        None => {
            let devices: Vec<_> = snapshot(&state).await.iter().map(GpuStatus::to_device).collect();
            let service_state = state.service_state();
            let manager = |mode| ManagerStatus { running: service_state == mode, healthy: true };
            // Upstream: healthy needs NVML up, and every running manager healthy.
            let healthy = state.probe.available();
            let answer = HealthResponse {
                status: if healthy { "healthy" } else { "unhealthy" }.into(),
                service_state,
                gpu: GpuInfo { available: state.probe.available(), count: devices.len(), devices },
                managers: ManagersInfo {
                    pow: manager(ServiceState::Pow),
                    inference: manager(ServiceState::Inference),
                    train: manager(ServiceState::Train),
                },
            };
            *state.health.lock().expect("health") = Some((Instant::now(), answer.clone()));
            answer
        }
    };
    let status = if answer.status == "healthy" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(answer)).into_response()
}

/// Ready once the GPUs the GonkaNode gives this ML node are there and fit to work (so a pod
/// without them is never registered), and, as upstream, not while inference runs unhealthy.
async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let available = state.gpu_snapshot().await.iter().filter(|g| g.to_device().is_available).count();
    let wanted = state.policy.expected_gpus;
    // The native engine's thread gone (a crash outside a step), or every vLLM instance down,
    // is upstream's "vLLM not alive"; one instance restarting still serves.
    #[cfg(feature = "torch")]
    let inference_unhealthy = state.inference.is_running() && !state.inference.is_healthy();
    #[cfg(not(feature = "torch"))]
    let inference_unhealthy = state.service_state() == ServiceState::Inference;
    let reason = if inference_unhealthy {
        Some("inference is not healthy".to_string())
    } else if available < wanted && !state.policy.allow_cpu_compute {
        Some(format!("{available} of the {wanted} GPUs this ML node needs are available"))
    } else {
        None
    };
    let status = if reason.is_none() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(ReadinessResponse { ready: reason.is_none(), reason })).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    state.metrics.observe(&state.gpu_snapshot().await);
    state.metrics.api_in_flight((MAX_IN_FLIGHT - state.in_flight.available_permits()) as i64);
    #[cfg(feature = "torch")]
    state.metrics.observe_vllm(&state.inference.vllm().map(|s| s.samples()).unwrap_or_default());
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.metrics.encode())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(p: &str) -> String {
        let req = Request::builder().uri(p).body(axum::body::Body::empty()).unwrap();
        strip_version_prefix(req).uri().to_string()
    }

    #[test]
    fn version_prefix_is_stripped_only_when_it_is_a_version() {
        assert_eq!(path("/v3.0.8/api/v1/state"), "/api/v1/state");
        assert_eq!(path("/v3.0.16/api/v1/gpu/devices?x=1"), "/api/v1/gpu/devices?x=1");
        assert_eq!(path("/api/v1/state"), "/api/v1/state");
        assert_eq!(path("/v1/models"), "/v1/models");
        assert_eq!(path("/v3.0/api"), "/v3.0/api");
        assert_eq!(path("/vx.y.z/api"), "/vx.y.z/api");
    }
}
