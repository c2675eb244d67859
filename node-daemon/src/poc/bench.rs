//! `gonka-node-daemon bench`: PoC v1 nonces per second on this machine, through the same code
//! path as a proof job (inputs, forward pass, permutation, distance).

use std::time::Instant;

use serde::Serialize;

use super::model::ProofModel;
use super::params::Params;
use super::pipeline::{distance, nonce_inputs, nonce_permutation, target};

#[derive(Serialize, Debug)]
pub struct BenchResult {
    pub engine: &'static str,
    pub device: String,
    pub dtype: String,
    pub threads: i32,
    /// Which of libtorch's CPU kernels this build has.
    pub kernels: Kernels,
    /// The model shape, so another engine can run the same model.
    pub params: Params,
    pub parameters: usize,
    pub batch_size: usize,
    pub nonces: usize,
    pub model_load_seconds: f64,
    pub seconds: f64,
    pub nonces_per_second: f64,
    pub proofs: usize,
}

/// libtorch's CPU kernels: GEMMs through MKL, oneDNN (`mkldnn`), OpenMP threads.
#[derive(Serialize, Debug)]
pub struct Kernels {
    pub mkl: bool,
    pub mkldnn: bool,
    pub openmp: bool,
}

/// Computes `nonces` nonces in batches of `batch_size` and times them (model build excluded).
pub fn run(params: &Params, batch_size: usize, nonces: usize, r_target: f64) -> anyhow::Result<BenchResult> {
    let (device, kind) = if tch::Cuda::is_available() {
        (tch::Device::Cuda(0), tch::Kind::Half)
    } else {
        (tch::Device::Cpu, tch::Kind::Float)
    };
    let (hash, pk) = ("bench-block-hash", "bench-public-key");
    let load = Instant::now();
    let model = ProofModel::new(params, hash, device, kind).map_err(|e| anyhow::anyhow!(e))?;
    let target = target(hash, params.vocab_size);
    let model_load_seconds = load.elapsed().as_secs_f64();

    let start = Instant::now();
    let mut proofs = 0;
    let all: Vec<u64> = (0..nonces as u64).collect();
    for chunk in all.chunks(batch_size.max(1)) {
        let inputs: Vec<Vec<f32>> =
            chunk.iter().map(|&n| nonce_inputs(hash, pk, n, params.seq_len, params.dim)).collect();
        let logits = model.last_logits(&inputs);
        for (l, &n) in logits.iter().zip(chunk) {
            if distance(l, &nonce_permutation(hash, pk, n, params.vocab_size), &target) < r_target {
                proofs += 1;
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    Ok(BenchResult {
        engine: "gonka-node-daemon (Rust, tch)",
        device: format!("{device:?}"),
        dtype: format!("{kind:?}"),
        threads: tch::get_num_threads(),
        kernels: Kernels {
            mkl: tch::utils::has_mkl(),
            mkldnn: tch::utils::has_mkldnn(),
            openmp: tch::utils::has_openmp(),
        },
        params: params.clone(),
        parameters: params.parameter_count(),
        batch_size,
        nonces,
        model_load_seconds,
        seconds,
        nonces_per_second: nonces as f64 / seconds,
        proofs,
    })
}
