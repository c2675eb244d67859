//! Client of the host's network node admin API (upstream dapi `:9200`): register, update,
//! enable, disable and remove ML nodes.
//!
//! Two generations of network node answer (see [`Generation`]), and only one of them updates a
//! node in place, so the client never sends a `POST` for a node the network node already lists
//! (on a 2025 one that registers it again: a new broker number and a second config entry). New
//! nodes are `POST`ed; changed ones are `PUT` (2026: an update that keeps the broker number; 2025
//! has no such route and answers 405, and nothing changes). See `registration.rs` for what is
//! done on a 2025 network node instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use gonka_crds::NetworkNodeSpec;
use gonka_protocol::admin::{InferenceNodeConfig, NodeResponse, error_message};
use gonka_protocol::network::EpochResponse;

/// Most of a network node's error body kept: its words reach events and status, which must stay
/// small whatever a network node (or a proxy in front of it) answers.
pub const MAX_MESSAGE_CHARS: usize = 512;

/// Most bytes of a network-node answer read (a node list of thousands of ML nodes fits many
/// times): a GonkaNode author picks the URL, and a larger body must not take the operator's
/// memory (every leader in turn) with it.
pub const MAX_ANSWER_BYTES: usize = 4 << 20;
/// Most bytes of an error answer read: only [`MAX_MESSAGE_CHARS`] of it are kept.
const MAX_ERROR_BYTES: usize = 64 << 10;

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
    #[error("network node URL {url}: {reason}")]
    UnsupportedUrl { url: String, reason: String },
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
            Self::UnsupportedUrl { .. } | Self::CaBundle(_) => false,
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

/// Addresses no network node lives at and the operator must never be sent to: link-local (the
/// cloud metadata services at 169.254.169.254 and fd00:ec2::254 among them), Alibaba's metadata
/// address, and the unspecified address. Loopback and private ranges stay allowed: a network
/// node in the cluster or beside it has such an address.
pub fn is_denied_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_link_local() || v4.is_unspecified() || v4 == Ipv4Addr::new(100, 100, 100, 200) || v4.is_broadcast()
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_denied_address(IpAddr::V4(v4)),
            None => {
                (v6.segments()[0] & 0xffc0) == 0xfe80
                    || v6.is_unspecified()
                    || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
            }
        },
    }
}

/// A base URL the operator may send requests to: `http`/`https` with a host, no user info
/// (credentials go in the Secret), no query or fragment (a path appended to it would become
/// their text, and the request would go where the URL's author chose), not a denied address.
fn check_base_url(url: &str) -> Result<reqwest::Url, NetworkNodeError> {
    let refuse = |reason: &str| NetworkNodeError::UnsupportedUrl { url: url.into(), reason: reason.into() };
    let parsed = reqwest::Url::parse(url).map_err(|e| refuse(&format!("not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(refuse("only http:// and https:// are supported"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(refuse("user info is not allowed (credentials go in credentialsSecretRef)"));
    }
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(refuse("a query or fragment is not allowed"));
    }
    let denied = match parsed.host() {
        None => return Err(refuse("no host")),
        Some(url::Host::Ipv4(v4)) => is_denied_address(IpAddr::V4(v4)),
        Some(url::Host::Ipv6(v6)) => is_denied_address(IpAddr::V6(v6)),
        Some(url::Host::Domain(name)) => {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            name == "metadata.google.internal" || name == "metadata"
        }
    };
    if denied {
        return Err(refuse("a link-local or cloud-metadata address is not a network node"));
    }
    Ok(parsed)
}

/// Name resolution that drops denied addresses ([`is_denied_address`]), so a host name that
/// resolves to the metadata service is refused like the address itself.
struct DenyingResolver;

impl reqwest::dns::Resolve for DenyingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        Box::pin(async move {
            let host = name.as_str().to_string();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = all.iter().copied().filter(|a| !is_denied_address(a.ip())).collect();
            if allowed.is_empty() && !all.is_empty() {
                let message = format!("{host} resolves only to link-local or cloud-metadata addresses");
                return Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, message).into());
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// Reads at most `limit` bytes of `response`'s body; `None` when it is longer.
async fn read_bounded(mut response: reqwest::Response, limit: usize) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > limit as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

impl NetworkNode {
    /// `admin_url` as in `spec.networkNode.adminUrl`; `token` from the credentials Secret;
    /// `ca_bundle` (PEM) trusted besides the system's roots for https.
    pub fn new(admin_url: &str, token: Option<String>, ca_bundle: Option<&str>) -> Result<Self, NetworkNodeError> {
        check_base_url(admin_url)?;
        install_crypto_provider();
        // No redirects: a redirect would take the request, verb, body and token where the
        // network node (or whoever answers for it) points, past every check above.
        let mut builder = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(std::sync::Arc::new(DenyingResolver));
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
        let text = match read_bounded(response, MAX_ERROR_BYTES).await {
            Ok(Some(body)) => String::from_utf8_lossy(&body).into_owned(),
            Ok(None) => format!("an error answer over {MAX_ERROR_BYTES} bytes"),
            Err(e) => format!("unreadable error answer: {e}"),
        };
        let message = if status.is_redirection() {
            "redirects are not followed: point the URL at the network node itself".to_string()
        } else {
            bounded(error_message(&text))
        };
        Err(NetworkNodeError::Rejected { what: what.into(), status: status.as_u16(), message })
    }

    /// The JSON answer of `response`, read up to [`MAX_ANSWER_BYTES`].
    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        response: reqwest::Response,
    ) -> Result<T, NetworkNodeError> {
        let unreadable =
            |message: String| NetworkNodeError::Rejected { what: what.into(), status: 200, message: bounded(message) };
        let body = read_bounded(response, MAX_ANSWER_BYTES)
            .await
            .map_err(|e| NetworkNodeError::Unreachable { url: self.base.clone(), reason: e.to_string() })?
            .ok_or_else(|| unreadable(format!("an answer over {MAX_ANSWER_BYTES} bytes")))?;
        serde_json::from_slice(&body).map_err(|e| unreadable(format!("unreadable answer: {e}")))
    }

    /// `GET /admin/v1/nodes`.
    pub async fn nodes(&self) -> Result<Vec<NodeResponse>, NetworkNodeError> {
        let response = self.send("listing nodes", self.request(reqwest::Method::GET, "/admin/v1/nodes")).await?;
        self.json("listing nodes", response).await
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
    client.json("reading the epoch", response).await
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
    fn only_plain_base_urls_to_allowed_addresses() {
        for url in [
            "http://gonka-api.gonka.svc:9200",
            "https://10.0.0.7:9200/prefix",
            "http://127.0.0.1:9200",
            "http://[fd00::7]:9000",
        ] {
            assert!(check_base_url(url).is_ok(), "{url}");
        }
        for (url, reason) in [
            ("http://api:9200/?", "a query or fragment"),
            ("http://api:9200/x#", "a query or fragment"),
            ("https://admin:secret@api:9200", "user info"),
            ("http://user@api:9200", "user info"),
            ("gopher://api:70", "only http:// and https://"),
            ("api:9200", "only http:// and https://"),
            ("http://169.254.169.254/latest", "link-local or cloud-metadata"),
            ("http://[fd00:ec2::254]/", "link-local or cloud-metadata"),
            ("http://[fe80::1]/", "link-local or cloud-metadata"),
            ("http://[::ffff:169.254.169.254]/", "link-local or cloud-metadata"),
            ("http://100.100.100.200/", "link-local or cloud-metadata"),
            ("http://metadata.google.internal./", "link-local or cloud-metadata"),
            ("http://0.0.0.0:9200", "link-local or cloud-metadata"),
        ] {
            let err = check_base_url(url).unwrap_err().to_string();
            assert!(err.contains(reason), "{url}: {err}");
        }
        assert!(!is_denied_address("10.96.0.10".parse().unwrap()));
        assert!(!is_denied_address("::1".parse().unwrap()));
    }

    #[test]
    fn outages_are_told_from_refusals() {
        let rejected = |status| NetworkNodeError::Rejected { what: "x".into(), status, message: String::new() };
        assert!(NetworkNodeError::Unreachable { url: "u".into(), reason: "r".into() }.is_outage());
        assert!(rejected(503).is_outage() && rejected(502).is_outage() && rejected(429).is_outage());
        assert!(!rejected(400).is_outage(), "a 2026 network node refuses a model with 400");
        assert!(!rejected(500).is_outage(), "a 2025 network node refuses a model with 500");
        assert!(NetworkNode::new("ftp://api:9200", None, None).is_err());
        assert!(!NetworkNodeError::UnsupportedUrl { url: "u".into(), reason: "r".into() }.is_outage());
        assert!(matches!(
            NetworkNode::new("https://api:9200", None, Some("not a certificate")),
            Err(NetworkNodeError::CaBundle(_))
        ));
    }
}
