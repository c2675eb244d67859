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
        }
    }
}

/// Whether `url` is `base` or a path below it (same scheme, host and port).
pub fn callback_allowed(url: &str, base: &str) -> bool {
    let base = base.trim_end_matches('/');
    url.strip_prefix(base).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
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
    }
}
