//! Client of the host's network node admin API (upstream dapi `:9200`): register, update,
//! enable, disable and remove ML nodes.
//!
//! Two generations of network node answer (see [`Generation`]), and only one of them updates a
//! node in place, so the client never sends a `POST` for a node the network node already lists
//! (on a 2025 one that registers it again: a new broker number and a second config entry). New
//! nodes are `POST`ed; changed ones are `PUT` (2026: an update that keeps the broker number; 2025
//! has no such route and answers 405, and nothing changes). See `registration.rs` for what is
//! done on a 2025 network node instead.

use std::time::Duration;

use gonka_crds::NetworkNodeSpec;
use gonka_protocol::admin::{InferenceNodeConfig, NodeResponse, error_message};
use gonka_protocol::network::EpochResponse;

/// Most of a network node's error body kept: its words reach events and status, which must stay
/// small whatever a network node (or a proxy in front of it) answers.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// `text` cut to [`MAX_MESSAGE_CHARS`], saying so.
fn bounded(text: String) -> String {
    match text.char_indices().nth(MAX_MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}… ({} bytes in all)", &text[..cut], text.len()),
        None => text,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkNodeError {
    #[error("network node unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("network node refused {what}: HTTP {status}: {message}")]
    Rejected { what: String, status: u16, message: String },
    #[error("network node URL {0}: only http:// and https:// are supported")]
    UnsupportedUrl(String),
    #[error("spec.networkNode.caBundle: {0}")]
    CaBundle(String),
}

impl NetworkNodeError {
    /// The network node did not answer for itself: down, or a proxy in front of it says it is
    /// (502, 503, 504) or overloaded (429). Any other answer, a 500 included (a 2025 network
    /// node refuses a model that way), is the network node's own word.
    pub fn is_outage(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Rejected { status, .. } => matches!(status, 429 | 502 | 503 | 504),
            Self::UnsupportedUrl(_) | Self::CaBundle(_) => false,
        }
    }

    /// The network node has no such route for this method (a 2025 one and `PUT`).
    pub fn is_method_not_allowed(&self) -> bool {
        matches!(self, Self::Rejected { status: 405, .. })
    }
}

/// The stable ML-node id of a GonkaNode's pod on a Kubernetes node:
/// `<gonka node>.<namespace>@<kubernetes node>` (a namespace has no dots, a node name no `@`,
/// so the id reads back unambiguously).
pub fn ml_node_id(namespace: &str, gonka_node: &str, kubernetes_node: &str) -> String {
    format!("{gonka_node}.{namespace}@{kubernetes_node}")
}

pub struct NetworkNode {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

/// reqwest's rustls takes the process-wide crypto provider: ring, installed once, before any
/// HTTP client of this process is built (without one, building a client panics).
pub fn install_crypto_provider() {
    // Err means one is installed already: fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl NetworkNode {
    /// `admin_url` as in `spec.networkNode.adminUrl`; `token` from the credentials Secret;
    /// `ca_bundle` (PEM) trusted besides the system's roots for https.
    pub fn new(admin_url: &str, token: Option<String>, ca_bundle: Option<&str>) -> Result<Self, NetworkNodeError> {
        if !(admin_url.starts_with("http://") || admin_url.starts_with("https://")) {
            return Err(NetworkNodeError::UnsupportedUrl(admin_url.into()));
        }
        install_crypto_provider();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(15));
        if let Some(pem) = ca_bundle {
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| NetworkNodeError::CaBundle(format!("not PEM certificates: {e}")))?;
            if certs.is_empty() {
                return Err(NetworkNodeError::CaBundle("no certificate in it".into()));
            }
            builder = builder.tls_certs_merge(certs);
        }
        let http = builder.build().map_err(|e| NetworkNodeError::CaBundle(e.to_string()))?;
        Ok(Self { base: admin_url.trim_end_matches('/').into(), http, token })
    }

    /// The admin API a GonkaNode's `spec.networkNode` names, with `token` from its credentials.
    pub fn of(spec: &NetworkNodeSpec, token: Option<String>) -> Result<Self, NetworkNodeError> {
        Self::new(&spec.admin_url, token, spec.ca_bundle.as_deref())
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, what: &str, request: reqwest::RequestBuilder) -> Result<reqwest::Response, NetworkNodeError> {
        let response = request
            .send()
            .await
            .map_err(|e| NetworkNodeError::Unreachable { url: self.base.clone(), reason: e.to_string() })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = bounded(error_message(&text));
        Err(NetworkNodeError::Rejected { what: what.into(), status: status.as_u16(), message })
    }

    /// `GET /admin/v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeResponse>, NetworkNodeError> {
        let response = self.send("listing nodes", self.request(reqwest::Method::GET, "/admin/v1/nodes")).await?;
        response.json().await.map_err(|e| NetworkNodeError::Rejected {
            what: "listing nodes".into(),
            status: 200,
            message: format!("unreadable answer: {e}"),
        })
    }

    /// `POST /admin/v1/nodes`: registers a node the network node does not list.
    pub async fn register(&self, config: &InferenceNodeConfig) -> Result<(), NetworkNodeError> {
        let what = format!("registering {}", config.id);
        self.send(&what, self.request(reqwest::Method::POST, "/admin/v1/nodes").json(config)).await.map(drop)
    }

    /// `PUT /admin/v1/nodes/:id`: updates a listed node in place (2026: its broker number and
    /// state stay); a 2025 network node answers 405 ([`NetworkNodeError::is_method_not_allowed`]).
    pub async fn update(&self, config: &InferenceNodeConfig) -> Result<(), NetworkNodeError> {
        let what = format!("updating {}", config.id);
        let path = format!("/admin/v1/nodes/{}", config.id);
        self.send(&what, self.request(reqwest::Method::PUT, &path).json(config)).await.map(drop)
    }

    /// `DELETE /admin/v1/nodes/:id`; removing an unknown node is not an error.
    pub async fn delete(&self, id: &str) -> Result<(), NetworkNodeError> {
        let what = format!("removing {id}");
        self.send(&what, self.request(reqwest::Method::DELETE, &format!("/admin/v1/nodes/{id}"))).await.map(drop)
    }

    /// `POST /admin/v1/nodes/:id/enable|disable`. Disabling takes effect at the next PoC: the
    /// node serves out the epoch, then gets no work (a graceful drain).
    pub async fn set_enabled(&self, id: &str, enabled: bool) -> Result<(), NetworkNodeError> {
        let verb = if enabled { "enable" } else { "disable" };
        let what = format!("{verb} {id}");
        self.send(&what, self.request(reqwest::Method::POST, &format!("/admin/v1/nodes/{id}/{verb}"))).await.map(drop)
    }
}

/// `GET <public_url>/v1/epochs/latest`: the epoch and its phase.
pub async fn latest_epoch(public_url: &str, ca_bundle: Option<&str>) -> Result<EpochResponse, NetworkNodeError> {
    let client = NetworkNode::new(public_url, None, ca_bundle)?;
    let response = client.send("reading the epoch", client.request(reqwest::Method::GET, "/v1/epochs/latest")).await?;
    response.json().await.map_err(|e| NetworkNodeError::Rejected {
        what: "reading the epoch".into(),
        status: 200,
        message: format!("unreadable answer: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_read_back() {
        let id = ml_node_id("gpu", "h100.v2", "node-7.dc1");
        assert_eq!(id, "h100.v2.gpu@node-7.dc1");
        let (left, node) = id.split_once('@').unwrap();
        let (gonka_node, namespace) = left.rsplit_once('.').unwrap();
        assert_eq!((gonka_node, namespace, node), ("h100.v2", "gpu", "node-7.dc1"));
    }

    #[test]
    fn long_answers_are_cut() {
        assert_eq!(bounded("short".into()), "short");
        let long = bounded("é".repeat(10_000));
        assert!(long.starts_with(&"é".repeat(MAX_MESSAGE_CHARS)) && long.ends_with("(20000 bytes in all)"), "{long}");
        assert!(long.chars().count() < MAX_MESSAGE_CHARS + 32);
    }

    #[test]
    fn outages_are_told_from_refusals() {
        let rejected = |status| NetworkNodeError::Rejected { what: "x".into(), status, message: String::new() };
        assert!(NetworkNodeError::Unreachable { url: "u".into(), reason: "r".into() }.is_outage());
        assert!(rejected(503).is_outage() && rejected(502).is_outage() && rejected(429).is_outage());
        assert!(!rejected(400).is_outage(), "a 2026 network node refuses a model with 400");
        assert!(!rejected(500).is_outage(), "a 2025 network node refuses a model with 500");
        assert!(NetworkNode::new("ftp://api:9200", None, None).is_err());
        assert!(matches!(
            NetworkNode::new("https://api:9200", None, Some("not a certificate")),
            Err(NetworkNodeError::CaBundle(_))
        ));
    }
}
