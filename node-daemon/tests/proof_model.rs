//! The libtorch proof model against a numpy re-statement of upstream's computation
//! (`tests/reference/llama_forward.py`): same pool weights, same forward, same distances.
#![cfg(feature = "torch")]

use std::path::PathBuf;
use std::process::Command;

use gonka_node_daemon::poc::model::ProofModel;
use gonka_node_daemon::poc::params::Params;
use gonka_node_daemon::poc::pipeline::{distance, nonce_inputs, nonce_permutation, target};
use serde_json::{Value, json};
use tch::{Device, Kind};

fn reference(request: &Value) -> Value {
    let py = std::env::var_os("GONKA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/pyenv/bin/python"));
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/llama_forward.py");
    let out =
        Command::new(&py).arg(script).arg(request.to_string()).output().unwrap_or_else(|e| {
            panic!("cannot run {} ({e}): `make pyenv` installs the project's Python", py.display())
        });
    assert!(out.status.success(), "llama_forward.py: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn tiny(kv_heads: usize, scaled: bool) -> Params {
    Params {
        dim: 64,
        n_layers: 2,
        n_heads: 4,
        n_kv_heads: kv_heads,
        vocab_size: 96,
        ffn_dim_multiplier: Some(1.3),
        multiple_of: 32,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        use_scaled_rope: scaled,
        seq_len: 8,
    }
}

/// How close a model's logits (relative to the largest reference logit) and distances must be.
struct Tolerance {
    logit: f64,
    distance: f64,
}

/// Runs `kind`'s model of `block_hash` on `nonces` and compares it with the numpy reference;
/// returns our logits.
fn check_against_reference(
    params: &Params,
    block_hash: &str,
    nonces: &[u64],
    kind: Kind,
    tolerance: Tolerance,
) -> Vec<Vec<f32>> {
    let pk = "pubkey";
    let model = ProofModel::new(params, block_hash, Device::Cpu, kind).unwrap();
    let inputs: Vec<Vec<f32>> =
        nonces.iter().map(|&n| nonce_inputs(block_hash, pk, n, params.seq_len, params.dim)).collect();
    let logits = model.last_logits(&inputs);
    let theirs = reference(&json!({"block_hash": block_hash, "public_key": pk, "nonces": nonces, "params": params}));
    let target = target(block_hash, params.vocab_size);
    for (i, &nonce) in nonces.iter().enumerate() {
        let reference_logits: Vec<f64> =
            theirs["logits"][i].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let scale = reference_logits.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (j, (ours, theirs)) in logits[i].iter().zip(&reference_logits).enumerate() {
            assert!(
                (f64::from(*ours) - theirs).abs() <= tolerance.logit * scale,
                "{block_hash} {kind:?} nonce {nonce} logit {j}: {ours} vs {theirs}"
            );
        }
        let perm = nonce_permutation(block_hash, pk, nonce, params.vocab_size);
        let ours = distance(&logits[i], &perm, &target);
        let theirs = theirs["dist"][i].as_f64().unwrap();
        assert!(
            (ours - theirs).abs() < tolerance.distance,
            "{block_hash} {kind:?} nonce {nonce}: distance {ours} vs {theirs}"
        );
    }
    logits
}

#[test]
fn fp32_logits_and_distances_match_the_reference() {
    // Plain, grouped-query attention (2 KV heads for 4), Llama 3.1's scaled RoPE, and a model
    // whose FFN matrices (448 x 128) outgrow the 50 000-value pool, so they are tiled and rotated.
    let wide = Params { dim: 128, n_layers: 1, ..tiny(4, false) };
    for (params, block_hash) in [
        (tiny(4, false), "0xblockhash"),
        (tiny(2, false), "another-block"),
        (tiny(4, true), "scaled-block"),
        (wide, "wide-block"),
    ] {
        let tolerance = Tolerance { logit: 1e-4, distance: 1e-5 };
        check_against_reference(&params, block_hash, &[0, 1, 7, 12345], Kind::Float, tolerance);
    }
}

#[test]
fn fp16_logits_stay_within_half_precision_of_the_reference() {
    // GPUs run the proof model in float16 (upstream's `.half()`). libtorch's CPU kernels take the
    // same dtype path, so the casts and the float32 islands (norms, softmax, RoPE) are checked here
    // without a GPU; only the CUDA kernels themselves differ.
    for params in [tiny(4, false), tiny(2, true)] {
        let nonces = [0, 3, 99];
        let tolerance = Tolerance { logit: 5e-3, distance: 2e-3 };
        let half = check_against_reference(&params, "half-block", &nonces, Kind::Half, tolerance);
        let tolerance = Tolerance { logit: 1e-4, distance: 1e-5 };
        let float = check_against_reference(&params, "half-block", &nonces, Kind::Float, tolerance);
        assert_ne!(half, float, "the model runs in the dtype it was built with");
    }
}

#[test]
fn different_blocks_make_different_models() {
    let p = tiny(4, false);
    let inputs = vec![nonce_inputs("h", "pk", 0, p.seq_len, p.dim)];
    let a = ProofModel::new(&p, "block-a", Device::Cpu, Kind::Float).unwrap().last_logits(&inputs);
    let b = ProofModel::new(&p, "block-b", Device::Cpu, Kind::Float).unwrap().last_logits(&inputs);
    let again = ProofModel::new(&p, "block-a", Device::Cpu, Kind::Float).unwrap().last_logits(&inputs);
    assert_ne!(a, b);
    assert_eq!(a, again, "a model is a pure function of the block hash");
}

#[test]
fn a_model_sharded_over_a_device_group_computes_the_same_logits() {
    // Two CPU "devices" exercise the placement and the hand-over between them.
    let p = Params { n_layers: 3, ..tiny(4, false) };
    let inputs = vec![nonce_inputs("h", "pk", 5, p.seq_len, p.dim), nonce_inputs("h", "pk", 6, p.seq_len, p.dim)];
    let whole = ProofModel::new(&p, "block", Device::Cpu, Kind::Float).unwrap().last_logits(&inputs);
    let sharded =
        ProofModel::sharded(&p, "block", &[Device::Cpu, Device::Cpu], Kind::Float).unwrap().last_logits(&inputs);
    assert_eq!(whole, sharded);
    assert!(ProofModel::sharded(&p, "block", &[], Kind::Float).is_err());
}
