//! Proof of compute, v1 ("PoW 2.0"): the pieces that must match upstream bit for bit.
//!
//! - [`rng`]: numpy's random numbers, bit for bit;
//! - [`params`]: the proof model's shape, as the init request carries it;
//! - [`pipeline`]: a nonce's inputs, permutation, the target and the distance;
//! - `model` (feature `torch`): the random-initialised Llama on libtorch.
//!
//! Proof jobs (batching, the callback sender, validation) and the `/pow/*` endpoints build on
//! these.

pub mod groups;
#[cfg(feature = "torch")]
pub mod model;
pub mod params;
pub mod pipeline;
pub mod rng;
pub mod validation;

#[cfg(feature = "torch")]
pub mod bench;
#[cfg(feature = "torch")]
pub mod engine;
#[cfg(feature = "torch")]
pub mod routes;

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct PowSettings {
    /// How often pending batches are posted (upstream: 5 s).
    pub send_interval: Duration,
    /// Batches the sender keeps before generation has to wait.
    pub max_pending: usize,
    /// Total memory of each GPU by CUDA index (from NVML), for cutting GPU groups.
    pub gpu_vram_gb: Vec<f64>,
    /// Development only: compute on the CPU when CUDA has no GPU (else PoC is refused).
    pub allow_cpu: bool,
    /// The network node's callback base (`daemon.json` `mlCallbackUrl`): an init request's
    /// `url` must be under it, so no caller can send this ML node's proofs elsewhere. `None`
    /// (no `daemon.json`, development) takes any.
    pub callback_base: Option<String>,
    /// Nonces per forward pass (`daemon.json` `poc.batchSize`, the host's tuning for its GPUs,
    /// as upstream's ML node tunes its own); `None`: the network node's `batch_size`.
    pub batch_size: Option<usize>,
    /// PEM certificates trusted, besides the system's, for an `https` callback URL.
    pub ca_bundle: Option<String>,
    /// Mutual TLS with the network node: callbacks present this ML node's certificate and
    /// trust only the network node's (`ca_bundle` then plays no part).
    pub mtls: Option<std::sync::Arc<crate::mtls::Mtls>>,
}

impl Default for PowSettings {
    fn default() -> Self {
        Self {
            send_interval: Duration::from_secs(5),
            max_pending: 10_000,
            gpu_vram_gb: Vec::new(),
            allow_cpu: false,
            callback_base: None,
            batch_size: None,
            ca_bundle: None,
            mtls: None,
        }
    }
}

/// Whether `url` is `base` or a path below it: the same scheme, host and port, the base's path
/// segments first, no user info. Both are parsed as an HTTP client parses them, and `url` must
/// not need normalising to get there (no `.`/`..` segments, plain or percent-encoded, no
/// backslash): a client that resolves them (or, for the vLLM engine, the plugin's) would
/// otherwise post somewhere else than was checked (`base/../x`).
pub fn callback_allowed(url: &str, base: &str) -> bool {
    let (Ok(parsed), Ok(base)) = (url::Url::parse(url), url::Url::parse(base)) else {
        return false;
    };
    let raw_path = url.split(['?', '#']).next().unwrap_or_default();
    let dot_segment = raw_path.split('/').any(|segment| {
        let segment = segment.to_ascii_lowercase().replace("%2e", ".");
        segment == "." || segment == ".."
    });
    if dot_segment || url.contains('\\') || !parsed.username().is_empty() || parsed.password().is_some() {
        return false;
    }
    let segments = |u: &url::Url| -> Vec<String> {
        u.path_segments().map(|s| s.filter(|p| !p.is_empty()).map(str::to_string).collect()).unwrap_or_default()
    };
    let (theirs, ours) = (segments(&parsed), segments(&base));
    parsed.scheme() == base.scheme()
        && parsed.host_str() == base.host_str()
        && parsed.port_or_known_default() == base.port_or_known_default()
        && theirs.len() >= ours.len()
        && theirs[..ours.len()] == ours[..]
}

mod ziggurat_tables;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn callbacks_only_under_the_configured_base() {
        let base = "http://gonka-api.gonka.svc:9100/";
        assert!(callback_allowed("http://gonka-api.gonka.svc:9100/v1/poc-batches", base));
        assert!(callback_allowed("http://gonka-api.gonka.svc:9100", base));
        assert!(!callback_allowed("http://gonka-api.gonka.svc:91000/v1/poc-batches", base));
        assert!(!callback_allowed("http://gonka-api.gonka.svc:9100.evil.example/v1", base));
        assert!(!callback_allowed("http://attacker:9100/v1/poc-batches", base));
        assert!(!callback_allowed("https://gonka-api.gonka.svc:9100/v1/poc-batches", base));
        // Below a base with a path, and the paths a client would normalise away.
        let base = "http://api:9100/gonka";
        assert!(callback_allowed("http://api:9100/gonka/v2/poc-batches/Qwen%2FQwen3-8B", base));
        assert!(callback_allowed("http://api:9100/gonka/", base));
        assert!(!callback_allowed("http://api:9100/gonka2/x", base));
        assert!(!callback_allowed("http://api:9100/gonka/../admin/v1/nodes", base));
        assert!(!callback_allowed("http://api:9100/gonka/%2e%2e/admin", base));
        assert!(!callback_allowed("http://api:9100/gonka/%2E%2e/admin", base));
        assert!(!callback_allowed("http://api:9100/gonka/./x", base));
        assert!(!callback_allowed("http://api:9100/gonka\\..\\admin", base));
        assert!(!callback_allowed("http://user:pw@api:9100/gonka/x", base));
        assert!(!callback_allowed("http://api:9100@evil:80/gonka/x", base));
        assert!(!callback_allowed("not a url", base));
        // The same port spelt out or left to the scheme's default.
        assert!(callback_allowed("http://api:80/v1", "http://api/"));
    }
}
