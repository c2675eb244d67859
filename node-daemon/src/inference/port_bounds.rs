//! The inference port's bounds, in front of both engines (the native one and the vLLM
//! instances the daemon fronts): requests in flight at most (429 past it, the permit held until
//! the answer's last byte, streams included), a body at most `max_body_bytes` that must arrive
//! within `body_timeout` (408 otherwise: a slow client holds no slot for long), and all bodies
//! being read or handled together at most `body_budget_bytes` (429), so the port's memory is
//! bounded whatever the number of clients. `/health` and `/v1/models`, the network node's
//! checks that this ML node serves, are answered past the bounds: they hold nothing.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes, HttpBody};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::Response;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::openai::openai_error;
use crate::metrics::DaemonMetrics;

/// How much the inference port takes at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortLimits {
    /// Requests in flight (a streamed answer counts until it ends).
    pub max_in_flight: usize,
    /// One request's body (long prompts, many messages, tool definitions).
    pub max_body_bytes: usize,
    /// All bodies held at once: a body reserves its `Content-Length` (or `max_body_bytes` when
    /// it has none) until its request is answered.
    pub body_budget_bytes: usize,
    /// A body must have arrived this long after the headers.
    pub body_timeout: Duration,
}

/// One request's body at most (a 200k-token prompt is about a megabyte of text).
pub const MAX_BODY_BYTES: usize = 16 << 20;

impl Default for PortLimits {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            max_body_bytes: MAX_BODY_BYTES,
            body_budget_bytes: 256 << 20,
            body_timeout: Duration::from_secs(30),
        }
    }
}

/// The shared state of [`bound`].
#[derive(Clone)]
pub struct PortBounds {
    limits: PortLimits,
    in_flight: Arc<Semaphore>,
    /// In KiB.
    body_budget: Arc<Semaphore>,
    /// Where requests in flight and refusals are counted (`/metrics`).
    metrics: Option<DaemonMetrics>,
}

/// Why the port refused a request (the `reason` label of `inference_requests_refused`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Every slot taken (429).
    InFlight,
    /// The bodies held at once at their budget (429).
    BodyBudget,
    /// Longer than a body may be (413).
    BodyTooLarge,
    /// Not arrived in time (408).
    BodyTimeout,
    /// Broken off or malformed (400).
    BodyUnreadable,
}

impl Refusal {
    pub const ALL: [Refusal; 5] =
        [Self::InFlight, Self::BodyBudget, Self::BodyTooLarge, Self::BodyTimeout, Self::BodyUnreadable];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::InFlight => "in_flight",
            Self::BodyBudget => "body_budget",
            Self::BodyTooLarge => "body_too_large",
            Self::BodyTimeout => "body_timeout",
            Self::BodyUnreadable => "body_unreadable",
        }
    }
}

fn kib(bytes: usize) -> u32 {
    bytes.div_ceil(1024).min(u32::MAX as usize) as u32
}

impl PortBounds {
    pub fn new(limits: PortLimits) -> Self {
        Self {
            limits,
            in_flight: Arc::new(Semaphore::new(limits.max_in_flight)),
            body_budget: Arc::new(Semaphore::new(kib(limits.body_budget_bytes) as usize)),
            metrics: None,
        }
    }

    /// Counts requests in flight and refusals in `metrics`.
    pub fn with_metrics(mut self, metrics: DaemonMetrics) -> Self {
        metrics.inference_in_flight(0);
        self.metrics = Some(metrics);
        self
    }

    fn refused(&self, refusal: Refusal, response: Response) -> Response {
        if let Some(m) = &self.metrics {
            m.inference_refused(refusal.as_str());
        }
        response
    }

    fn count_in_flight(&self) {
        if let Some(m) = &self.metrics {
            m.inference_in_flight(self.in_flight() as i64);
        }
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.limits.max_in_flight - self.in_flight.available_permits()
    }
}

fn unbounded(request: &Request) -> bool {
    request.method() == axum::http::Method::GET && matches!(request.uri().path(), "/health" | "/v1/models")
}

/// The middleware: admits a request within the bounds, reads its body, and holds its slot
/// while the answer is sent.
pub async fn bound(State(bounds): State<PortBounds>, request: Request, next: Next) -> Response {
    if unbounded(&request) {
        return next.run(request).await;
    }
    let limits = bounds.limits;
    let Ok(permit) = bounds.in_flight.clone().try_acquire_owned() else {
        let message = format!("{} requests are in flight on this ML node already; try again", limits.max_in_flight);
        return bounds.refused(Refusal::InFlight, openai_error(StatusCode::TOO_MANY_REQUESTS, message));
    };
    let slot = Slot { permit: Some(permit), bounds: bounds.clone() };
    bounds.count_in_flight();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|l| l > limits.max_body_bytes) {
        return bounds.refused(Refusal::BodyTooLarge, body_refused(BodyRefusal::OverLimit(limits.max_body_bytes)));
    }
    let reserve = declared.unwrap_or(limits.max_body_bytes);
    let Ok(budget) = bounds.body_budget.clone().try_acquire_many_owned(kib(reserve)) else {
        let message =
            format!("the request bodies this ML node holds take {} bytes already; try again", limits.body_budget_bytes);
        return bounds.refused(Refusal::BodyBudget, openai_error(StatusCode::TOO_MANY_REQUESTS, message));
    };
    let (parts, body) = request.into_parts();
    let body = match tokio::time::timeout(limits.body_timeout, axum::body::to_bytes(body, reserve)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(error)) if over_limit(&error) => {
            return bounds.refused(Refusal::BodyTooLarge, body_refused(BodyRefusal::OverLimit(reserve)));
        }
        Ok(Err(error)) => return bounds.refused(Refusal::BodyUnreadable, body_refused(BodyRefusal::Unreadable(error))),
        Err(_) => {
            let message = format!("the request body did not arrive within {} s", limits.body_timeout.as_secs());
            return bounds.refused(Refusal::BodyTimeout, openai_error(StatusCode::REQUEST_TIMEOUT, message));
        }
    };
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    drop(budget);
    let (parts, body) = response.into_parts();
    Response::from_parts(parts, Body::new(Held { body, _slot: slot }))
}

/// Why a request's body was not taken.
#[derive(Debug)]
enum BodyRefusal {
    /// Longer than the port takes (declared so, or found so while reading a body without a
    /// length): 413.
    OverLimit(usize),
    /// The body broke off or was malformed (chunked encoding, a reset connection): 400.
    Unreadable(axum::Error),
}

fn body_refused(refusal: BodyRefusal) -> Response {
    match refusal {
        BodyRefusal::OverLimit(limit) => {
            openai_error(StatusCode::PAYLOAD_TOO_LARGE, format!("request bodies are limited to {limit} bytes"))
        }
        BodyRefusal::Unreadable(error) => {
            openai_error(StatusCode::BAD_REQUEST, format!("the request body could not be read: {error}"))
        }
    }
}

/// Whether reading a body failed on its length limit (not on the body itself).
fn over_limit(error: &axum::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cause = e.source();
    }
    false
}

/// A request's place among those in flight; given back (and counted) when dropped.
struct Slot {
    permit: Option<OwnedSemaphorePermit>,
    bounds: PortBounds,
}

impl Drop for Slot {
    fn drop(&mut self) {
        drop(self.permit.take());
        self.bounds.count_in_flight();
    }
}

/// An answer's body holding its request's slot until it is sent or dropped (a client gone).
struct Held {
    body: Body,
    _slot: Slot,
}

impl HttpBody for Held {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::routing::{get, post};
    use tower::ServiceExt;

    fn app(limits: PortLimits) -> (Router, PortBounds) {
        let bounds = PortBounds::new(limits).with_metrics(DaemonMetrics::default());
        let router = Router::new()
            .route("/v1/completions", post(|body: Bytes| async move { format!("{} bytes", body.len()) }))
            .route("/health", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn_with_state(bounds.clone(), bound));
        (router, bounds)
    }

    fn post_body(body: Body, length: Option<usize>) -> Request {
        let mut builder = Request::post("/v1/completions");
        if let Some(length) = length {
            builder = builder.header(header::CONTENT_LENGTH, length);
        }
        builder.body(body).unwrap()
    }

    async fn answer(response: Response) -> (StatusCode, String) {
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    fn limits() -> PortLimits {
        PortLimits {
            max_in_flight: 2,
            max_body_bytes: 4096,
            body_budget_bytes: 6 * 1024,
            body_timeout: Duration::from_millis(200),
        }
    }

    #[tokio::test]
    async fn a_streamed_answer_holds_its_slot_until_it_ends_and_health_is_never_refused() {
        let (router, bounds) = app(limits());
        let first = router.clone().oneshot(post_body(Body::from("a"), Some(1))).await.unwrap();
        let second = router.clone().oneshot(post_body(Body::from("bb"), Some(2))).await.unwrap();
        // Both answers are still unread: both slots are taken.
        assert_eq!(bounds.in_flight(), 2);
        assert_eq!(metric(&bounds, "gonka_ml_node_inference_requests_in_flight"), Some(2.0));
        let (status, text) = answer(router.clone().oneshot(post_body(Body::from("c"), Some(1))).await.unwrap()).await;
        assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
        assert!(text.contains("2 requests are in flight"), "{text}");
        assert_eq!(refusals(&bounds)[0], ("in_flight", 1.0));
        let health = router.clone().oneshot(Request::get("/health").body(Body::empty()).unwrap()).await.unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        assert_eq!(answer(first).await, (StatusCode::OK, "1 bytes".into()));
        drop(second);
        assert_eq!(bounds.in_flight(), 0, "a read answer and a dropped one both give their slot back");
        assert_eq!(metric(&bounds, "gonka_ml_node_inference_requests_in_flight"), Some(0.0));
        let (status, _) = answer(router.oneshot(post_body(Body::from("c"), Some(1))).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
    }

    /// `metric` (a line's name and labels) in the metrics' text.
    fn metric(bounds: &PortBounds, name: &str) -> Option<f64> {
        let text = bounds.metrics.as_ref().unwrap().encode();
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    }

    fn refusals(bounds: &PortBounds) -> Vec<(&'static str, f64)> {
        Refusal::ALL
            .iter()
            .map(|r| {
                let name = format!("gonka_ml_node_inference_requests_refused_total{{reason=\"{}\"}}", r.as_str());
                (r.as_str(), metric(bounds, &name).unwrap_or(0.0))
            })
            .collect()
    }

    #[tokio::test]
    async fn bodies_are_bounded_in_size_in_total_and_in_time() {
        let (router, bounds) = app(limits());
        // Declared too large: refused before reading.
        let (status, text) = answer(router.clone().oneshot(post_body(Body::empty(), Some(4097))).await.unwrap()).await;
        assert_eq!((status, text.contains("limited to 4096 bytes")), (StatusCode::PAYLOAD_TOO_LARGE, true), "{text}");
        // Undeclared and too large: refused while reading.
        let big = Body::from_stream(futures::stream::iter([Ok::<_, std::io::Error>(Bytes::from(vec![b'x'; 5000]))]));
        let (status, text) = answer(router.clone().oneshot(post_body(big, None)).await.unwrap()).await;
        assert_eq!((status, text.contains("limited to 4096 bytes")), (StatusCode::PAYLOAD_TOO_LARGE, true), "{text}");
        // A body that breaks off (the client's connection reset): a bad request, not "too large".
        let broken = Body::from_stream(futures::stream::iter([
            Ok(Bytes::from_static(b"{\"prompt\":")),
            Err(std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset")),
        ]));
        let (status, text) = answer(router.clone().oneshot(post_body(broken, None)).await.unwrap()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{text}");
        assert!(text.contains("could not be read") && text.contains("connection reset"), "{text}");
        // At the limit: served.
        let (status, text) =
            answer(router.clone().oneshot(post_body(Body::from(vec![b'x'; 4096]), Some(4096))).await.unwrap()).await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, "4096 bytes"));

        // A body that never comes: 408 after the timeout, and its reservation is given back.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stalled = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (status, text) = answer(router.clone().oneshot(post_body(stalled, Some(4000))).await.unwrap()).await;
        assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{text}");
        drop(tx);

        // The budget (6 KiB): a stalled 4000-byte body holds 4 KiB of it, so another 4000 bytes
        // are refused while a 1000-byte one still fits.
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
        let stalled = Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
        let held = tokio::spawn(router.clone().oneshot(post_body(stalled, Some(4000))));
        // Waits for the stalled request to have taken its reservation.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let refused = loop {
            let r = router.clone().oneshot(post_body(Body::from(vec![b'y'; 4000]), Some(4000))).await.unwrap();
            if r.status() == StatusCode::TOO_MANY_REQUESTS {
                break answer(r).await.1;
            }
            assert!(tokio::time::Instant::now() < deadline, "the stalled body never held its reservation");
            tokio::task::yield_now().await;
        };
        assert!(refused.contains("bodies this ML node holds"), "{refused}");
        let (status, _) =
            answer(router.clone().oneshot(post_body(Body::from(vec![b'z'; 1000]), Some(1000))).await.unwrap()).await;
        assert_eq!(status, StatusCode::OK);
        tx.send(Ok(Bytes::from(vec![b'x'; 4000]))).await.unwrap();
        drop(tx);
        assert_eq!(answer(held.await.unwrap().unwrap()).await, (StatusCode::OK, "4000 bytes".into()));

        // Each refusal counted under its reason; nothing in flight once all is answered.
        assert_eq!(
            refusals(&bounds),
            [
                ("in_flight", 0.0),
                ("body_budget", 1.0),
                ("body_too_large", 2.0),
                ("body_timeout", 1.0),
                ("body_unreadable", 1.0)
            ]
        );
        assert_eq!(metric(&bounds, "gonka_ml_node_inference_requests_in_flight"), Some(0.0));
    }
}
