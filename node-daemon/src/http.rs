//! What every route of the ML-node API reads and answers with: JSON bodies read as FastAPI
//! reads them, and FastAPI's `{"detail": ...}` errors. Below every route module (none of them
//! imports the router).

use axum::Json;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use gonka_protocol::ml_node::ErrorResponse;

/// A JSON request body read as FastAPI reads one: parsed as JSON when `Content-Type` is absent,
/// `application/json` or `application/*+json`; anything else, an empty body or JSON that does
/// not fit the schema is a 422 `{"detail": ...}` naming the problem.
pub struct JsonBody<T>(pub T);

impl<T, S> axum::extract::FromRequest<S> for JsonBody<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let unprocessable = |detail: String| error(StatusCode::UNPROCESSABLE_ENTITY, detail);
        let json = req.headers().get(header::CONTENT_TYPE).map(|v| is_json_media_type(v.to_str().unwrap_or("")));
        // A body over the limit is a 413 naming it.
        let body = axum::body::Bytes::from_request(req, state).await.map_err(|e| error(e.status(), e.body_text()))?;
        if body.is_empty() {
            return Err(unprocessable("body: Field required".into()));
        }
        if json == Some(false) {
            return Err(unprocessable("body: Input should be a valid JSON object (Content-Type is not JSON)".into()));
        }
        serde_json::from_slice(&body).map(Self).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => unprocessable(format!("body: {e}")),
            _ => unprocessable(format!("body: JSON decode error: {e}")),
        })
    }
}

/// `application/json`, `application/*+json`, with any parameters (FastAPI's rule).
fn is_json_media_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence.strip_prefix("application/").is_some_and(|sub| sub == "json" || sub.ends_with("+json"))
}

pub fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, Json(ErrorResponse { detail: detail.into() })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_media_types_are_fastapis() {
        for yes in ["application/json", "application/json; charset=utf-8", "Application/JSON", "application/ld+json"] {
            assert!(is_json_media_type(yes), "{yes}");
        }
        for no in ["text/plain", "application/x-www-form-urlencoded", "json", ""] {
            assert!(!is_json_media_type(no), "{no}");
        }
    }
}
