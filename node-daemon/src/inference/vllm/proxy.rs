//! The inference port in front of vLLM (upstream's `api/proxy.py`): every request goes to the
//! healthy instance with the fewest requests in flight, its answer comes back as it is made —
//! status, headers and body, server-sent events passed through chunk by chunk, unbuffered.
//! The inference port's bounds stand in front ([`crate::inference::port_bounds`]: requests in
//! flight, bodies read whole within a size and a time); here, a connect timeout and an
//! idle-read timeout towards vLLM.

use std::time::Duration;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use super::supervisor::VllmServer;

/// A response that sends nothing for this long is cut (upstream's read timeout, 900 s).
pub const IDLE_READ_TIMEOUT: Duration = Duration::from_secs(900);
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Upstream's answer when no instance is healthy (plain text, as its proxy sends it).
pub fn no_backend() -> Response {
    (StatusCode::SERVICE_UNAVAILABLE, "No vLLM backend available").into_response()
}

/// Headers that belong to one connection, not to the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::CONTENT_LENGTH,
        header::HOST,
        header::TE,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
}

/// The client the proxy and the supervisor talk to vLLM with: no system proxy, bounded connect
/// and idle reads.
pub fn client() -> reqwest::Client {
    // reqwest's rustls takes the process-wide crypto provider: ring (Err: installed already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(IDLE_READ_TIMEOUT)
        .build()
        .expect("an HTTP client without TLS settings builds")
}

/// Forwards `request` (its body read whole by the port's bounds) to the least-loaded healthy
/// instance of `server`.
pub async fn forward(server: &VllmServer, http: &reqwest::Client, request: Request) -> Response {
    let Some(instance) = server.least_loaded() else { return no_backend() };
    let lease = instance.lease();
    let (parts, body) = request.into_parts();
    // Already in memory: the port's bounds read it within their limits.
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return (StatusCode::BAD_REQUEST, format!("reading the request body: {e}")).into_response(),
    };
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let url = format!("{}{path}", instance.base_url());
    let mut outgoing = http.request(parts.method, url).body(body);
    for (name, value) in &parts.headers {
        if !hop_by_hop(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let upstream = match outgoing.send().await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(port = instance.port(), error = %e, "forwarding to vLLM failed");
            return (StatusCode::BAD_GATEWAY, "vLLM connection failed").into_response();
        }
    };
    let mut response = Response::builder().status(upstream.status().as_u16());
    for (name, value) in upstream.headers() {
        if !hop_by_hop(name) {
            response = response.header(name, value);
        }
    }
    // The instance's lease lives as long as the body streams.
    let body = upstream.bytes_stream().map(move |chunk| {
        let _held = &lease;
        chunk
    });
    response.body(Body::from_stream(body)).unwrap_or_else(|e| {
        (StatusCode::BAD_GATEWAY, format!("vLLM sent an answer that cannot be relayed: {e}")).into_response()
    })
}
