//! PoC v1's random numbers against numpy itself: every draw must be bit-identical, or proofs
//! from this daemon would not validate on upstream ML nodes (and vice versa).
//!
//! The reference comes from `tests/reference/numpy_vectors.py`, run with the project's Python
//! (`GONKA_PYTHON`, else `.cache/pyenv/bin/python`, which `make pyenv` / `make test` installs).

use std::path::PathBuf;
use std::process::Command;

use gonka_node_daemon::poc::pipeline::{distance, nonce_inputs, nonce_permutation, target};
use gonka_node_daemon::poc::rng::{Pcg64, SeedSequence, extended_entropy, seeded, uniform_on_sphere};
use serde_json::Value;

fn python() -> PathBuf {
    std::env::var_os("GONKA_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/pyenv/bin/python"))
}

fn reference() -> Value {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/reference/numpy_vectors.py");
    let py = python();
    let out = Command::new(&py).arg(&script).output().unwrap_or_else(|e| {
        panic!(
            "cannot run {} ({e}): run `make pyenv` (or `make test`) to install the project's Python with numpy",
            py.display()
        )
    });
    assert!(out.status.success(), "numpy_vectors.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("reference JSON")
}

fn u64s(v: &Value) -> Vec<u64> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

fn first_mismatch(ours: &[u64], theirs: &[u64]) -> Option<usize> {
    assert_eq!(ours.len(), theirs.len());
    ours.iter().zip(theirs).position(|(a, b)| a != b)
}

#[test]
fn draws_match_numpy_bit_for_bit() {
    let reference = reference();
    let cases = reference["cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let seed = case["seed"].as_str().unwrap();
        let n = case["num_hashes"].as_u64().unwrap() as usize;
        let what = |part: &str| format!("seed {seed:?} x{n}: {part} (numpy {})", reference["numpy"]);

        let seq = SeedSequence::new(&extended_entropy(seed, n));
        assert_eq!(seq.generate_state_u64(4), u64s(&case["state"]), "{}", what("SeedSequence.generate_state"));

        let mut bits = Pcg64::from_seed_sequence(&seq);
        let raw: Vec<u64> = (0..8).map(|_| bits.next_u64()).collect();
        assert_eq!(raw, u64s(&case["raw"]), "{}", what("PCG64 random_raw"));

        let normals: Vec<u64> = seeded(seed, n).standard_normal_vec(50_000).iter().map(|x| x.to_bits()).collect();
        let theirs = u64s(&case["standard_normal"]);
        if let Some(i) = first_mismatch(&normals, &theirs) {
            panic!(
                "{}: draw {i} is {} here, {} in numpy",
                what("standard_normal"),
                f64::from_bits(normals[i]),
                f64::from_bits(theirs[i])
            );
        }

        let weights: Vec<u64> = seeded(seed, n).normal_vec(0.0, 0.02, 2000).iter().map(|x| x.to_bits()).collect();
        assert_eq!(first_mismatch(&weights, &u64s(&case["normal_002"])), None, "{}", what("normal(0, 0.02)"));

        for (key, size) in [("permutation_8196", 8196), ("permutation_100", 100)] {
            let ours: Vec<u64> = seeded(seed, n).permutation(size).into_iter().map(|x| x as u64).collect();
            assert_eq!(first_mismatch(&ours, &u64s(&case[key])), None, "{}", what(key));
        }

        let sphere: Vec<u64> = uniform_on_sphere(&mut seeded(seed, n), 8196).iter().map(|x| x.to_bits()).collect();
        assert_eq!(first_mismatch(&sphere, &u64s(&case["sphere_8196"])), None, "{}", what("uniform on the sphere"));
    }
}

#[test]
fn nonce_pipeline_matches_upstreams_numpy_steps() {
    let reference = reference();
    for case in reference["pipeline"].as_array().unwrap() {
        let (hash, pk) = (case["block_hash"].as_str().unwrap(), case["public_key"].as_str().unwrap());
        let nonce = case["nonce"].as_u64().unwrap();
        let size = |k: &str| case[k].as_u64().unwrap() as usize;
        let inputs: Vec<u64> = nonce_inputs(hash, pk, nonce, size("seq_len"), size("dim"))
            .iter()
            .map(|x| u64::from(x.to_bits()))
            .collect();
        assert_eq!(first_mismatch(&inputs, &u64s(&case["inputs"])), None, "inputs of nonce {nonce}");
        let perm = nonce_permutation(hash, pk, nonce, size("vocab"));
        assert_eq!(perm.iter().map(|&x| x as u64).collect::<Vec<_>>(), u64s(&case["permutation"]), "permutation");
        let target = target(hash, size("vocab"));
        assert_eq!(target.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), u64s(&case["target"]), "target");
        let logits: Vec<f32> = u64s(&case["logits"]).iter().map(|&b| f32::from_bits(b as u32)).collect();
        let dist = distance(&logits, &perm, &target);
        assert_eq!(
            dist.to_bits(),
            case["dist"].as_u64().unwrap(),
            "distance {dist} vs {}",
            f64::from_bits(case["dist"].as_u64().unwrap())
        );
    }
}
