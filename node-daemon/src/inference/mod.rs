//! Inference on the served model (feature `torch`): the manager that brings a model up on one
//! of two engines ([`manager`]), the model cache behind `/api/v1/models/*` ([`model_cache`]),
//! and for each engine the inference port and PoC v2: the native engine of `gonka-inference`
//! ([`openai`], its answers' logprobs and validation replays in [`logprobs`], the reasoning and
//! tool calls read out of them in [`answer_parsers`], [`pow_v2`]) or vLLM servers the daemon runs and fronts ([`vllm`]). Which one
//! answers is decided in one place per port: [`inference_port`] here, the PoC v2 routes'
//! seam in [`pow_v2::engine_seam`]. The port's bounds ([`port_bounds`]) stand in front of both.

pub mod answer_parsers;
pub mod conversation;
pub mod logprobs;
pub mod manager;
pub mod model_cache;
pub mod openai;
pub mod port_bounds;
pub mod pow_v2;
pub mod vllm;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;

use self::manager::InferenceManager;

/// The inference port: the native engine's OpenAI API, or, while vLLM serves (or comes up),
/// every request forwarded to its instances; both within `limits`.
/// Requests in flight and refusals are counted in `metrics`.
pub fn inference_port(
    manager: Arc<InferenceManager>,
    limits: port_bounds::PortLimits,
    metrics: crate::metrics::DaemonMetrics,
) -> Router {
    let seam = VllmSeam { manager: manager.clone(), http: vllm::proxy::client() };
    let bounds = port_bounds::PortBounds::new(limits).with_metrics(metrics);
    openai::router(manager, limits.max_body_bytes)
        .layer(axum::middleware::from_fn_with_state(seam, forward_to_vllm))
        .layer(axum::middleware::from_fn_with_state(bounds, port_bounds::bound))
}

#[derive(Clone)]
struct VllmSeam {
    manager: Arc<InferenceManager>,
    http: reqwest::Client,
}

async fn forward_to_vllm(State(seam): State<VllmSeam>, request: Request, next: Next) -> Response {
    match seam.manager.vllm() {
        Some(server) => vllm::proxy::forward(&server, &seam.http, request).await,
        None => next.run(request).await,
    }
}
