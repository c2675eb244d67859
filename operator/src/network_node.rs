//! Client of the host's network node admin API (upstream dapi `:9200`): register, update,
//! enable, disable and remove ML nodes. Upserts are idempotent by node id, so retrying after a
//! timeout never registers a node twice.

use std::time::Duration;

use gonka_protocol::admin::{InferenceNodeConfig, NodeResponse};
use gonka_protocol::network::EpochResponse;

#[derive(Debug, thiserror::Error)]
pub enum NetworkNodeError {
    #[error("network node unreachable at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("network node refused {what}: HTTP {status}: {message}")]
    Rejected { what: String, status: u16, message: String },
    #[error("network node admin URL {0}: only http:// is supported (the admin API is in-cluster plain HTTP)")]
    UnsupportedUrl(String),
}

impl NetworkNodeError {
    /// Worth retrying with backoff: the network node is down or overloaded, not refusing.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Unreachable { .. } => true,
            Self::Rejected { status, .. } => *status >= 500 || *status == 429,
            Self::UnsupportedUrl(_) => false,
        }
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

impl NetworkNode {
    /// `admin_url` as in `spec.networkNode.adminUrl`; `token` from the credentials Secret.
    pub fn new(admin_url: &str, token: Option<String>) -> Result<Self, NetworkNodeError> {
        if !admin_url.starts_with("http://") {
            return Err(NetworkNodeError::UnsupportedUrl(admin_url.into()));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| NetworkNodeError::Unreachable { url: admin_url.into(), reason: e.to_string() })?;
        Ok(Self { base: admin_url.trim_end_matches('/').into(), http, token })
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
        // echo answers {"message": ...}; keep the message, else the raw body.
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("message").map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_string)))
            .unwrap_or(text);
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

    /// `POST /admin/v1/nodes`: registers or updates the node with `config.id`.
    pub async fn upsert(&self, config: &InferenceNodeConfig) -> Result<(), NetworkNodeError> {
        let what = format!("registering {}", config.id);
        self.send(&what, self.request(reqwest::Method::POST, "/admin/v1/nodes").json(config)).await.map(drop)
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
pub async fn latest_epoch(public_url: &str) -> Result<EpochResponse, NetworkNodeError> {
    let client = NetworkNode::new(public_url, None)?;
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
    fn only_outages_are_retried() {
        let rejected = |status| NetworkNodeError::Rejected { what: "x".into(), status, message: String::new() };
        assert!(NetworkNodeError::Unreachable { url: "u".into(), reason: "r".into() }.is_retryable());
        assert!(rejected(503).is_retryable());
        assert!(!rejected(400).is_retryable(), "a model governance refuses stays refused");
        assert!(NetworkNode::new("https://api:9200", None).is_err());
    }
}
