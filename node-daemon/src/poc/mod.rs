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
}

impl Default for PowSettings {
    fn default() -> Self {
        Self { send_interval: Duration::from_secs(5), max_pending: 10_000, gpu_vram_gb: Vec::new(), allow_cpu: false }
    }
}

mod ziggurat_tables;
