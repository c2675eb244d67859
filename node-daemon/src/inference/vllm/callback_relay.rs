//! The vLLM plugin's PoC v2 callbacks under mutual TLS: the plugin inside vLLM posts its
//! artifacts itself, in plain HTTP, and a network node in mutual-TLS mode takes callbacks only
//! from the ML node's certificate. As upstream's ML node does, the daemon hands the plugin a
//! loopback address of its own instead of the network node's, and forwards what arrives there
//! with its certificate ([`crate::mtls`]).
//!
//! A relay address names a callback URL the daemon checked (under `mlCallbackUrl`) by an id;
//! nothing else can be reached through it.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use sha2::{Digest, Sha256};

/// Callback URLs remembered (a round's and its validations'; older ones are forgotten).
const REMEMBERED: usize = 64;
/// Largest callback body relayed (a batch of artifacts is far smaller).
const MAX_BODY_BYTES: usize = 64 << 20;
/// Longest the network node's answer may take.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(60);

pub struct CallbackRelay {
    /// `http://<loopback>:<port>`.
    base: String,
    targets: Mutex<VecDeque<(String, String)>>,
    /// The callback client: the ML node's certificate, the pinned network node.
    http: reqwest::Client,
}

impl CallbackRelay {
    /// Serves the relay on `host` (a loopback address: only this pod's processes reach it).
    pub fn start(host: IpAddr, http: reqwest::Client) -> std::io::Result<Arc<Self>> {
        let listener = std::net::TcpListener::bind(SocketAddr::new(host, 0))?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let relay = Arc::new(Self { base: format!("http://{address}"), targets: Mutex::new(VecDeque::new()), http });
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let app = Router::new()
            .route("/relay/{id}/{*rest}", post(forward))
            .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
            .with_state(relay.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "the callback relay stopped");
            }
        });
        tracing::info!(%address, "vLLM callbacks relayed over mutual TLS");
        Ok(relay)
    }

    /// The address the plugin posts to instead of `url` (already checked against
    /// `mlCallbackUrl`): the plugin appends `/generated` or `/validated` to it.
    pub fn register(&self, url: &str) -> String {
        let url = url.trim_end_matches('/');
        let id = hex::encode(&Sha256::digest(url.as_bytes())[..12]);
        let mut targets = self.targets.lock().expect("relay targets");
        if !targets.iter().any(|(known, _)| *known == id) {
            if targets.len() == REMEMBERED {
                targets.pop_front();
            }
            targets.push_back((id.clone(), url.to_string()));
        }
        format!("{}/relay/{id}", self.base)
    }

    fn target(&self, id: &str) -> Option<String> {
        self.targets.lock().expect("relay targets").iter().find(|(known, _)| known == id).map(|(_, url)| url.clone())
    }
}

async fn forward(
    State(relay): State<Arc<CallbackRelay>>,
    Path((id, rest)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(url) = relay.target(&id) else {
        return (StatusCode::NOT_FOUND, "no callback URL under this id").into_response();
    };
    let mut request = relay.http.post(format!("{url}/{rest}")).timeout(FORWARD_TIMEOUT).body(body);
    if let Some(kind) = headers.get(header::CONTENT_TYPE) {
        request = request.header(header::CONTENT_TYPE, kind);
    }
    match request.send().await {
        Ok(answer) => {
            let status = StatusCode::from_u16(answer.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
            // The network node's answer is short ("OK", an error); more is not relayed.
            let text: String = answer.text().await.unwrap_or_default().chars().take(4096).collect();
            (status, text).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "relaying a vLLM callback failed");
            (StatusCode::BAD_GATEWAY, format!("the network node could not be reached: {e}")).into_response()
        }
    }
}
