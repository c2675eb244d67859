//! Everything about one nonce except the forward pass, exactly as upstream's `pow.random` and
//! `pow.compute.compute` do it: the input embeddings, the output permutation, the shared
//! target vector, and the distance that decides whether a nonce is a proof.

use half::f16;

use super::rng::{pairwise_sum, seeded, uniform_on_sphere};

/// The `[seq_len, dim]` input embeddings of `nonce`, row-major. Upstream draws float64 normals
/// and hands them to torch as float16 (`get_inputs`' default dtype); torch converts through
/// float32, so do we. Returned as f32 holding those f16 values.
pub fn nonce_inputs(block_hash: &str, public_key: &str, nonce: u64, seq_len: usize, dim: usize) -> Vec<f32> {
    seeded(&format!("{block_hash}_{public_key}_nonce{nonce}"), 4)
        .standard_normal_vec(seq_len * dim)
        .into_iter()
        .map(|x| f16::from_f32(x as f32).to_f32())
        .collect()
}

/// The permutation applied to `nonce`'s output logits.
pub fn nonce_permutation(block_hash: &str, public_key: &str, nonce: u64, vocab_size: usize) -> Vec<usize> {
    seeded(&format!("{block_hash}_{public_key}_nonce_{nonce}_permutations"), 1).permutation(vocab_size)
}

/// The round's target: a uniform unit vector in R^vocab, shared by every nonce of a block.
pub fn target(block_hash: &str, vocab_size: usize) -> Vec<f64> {
    uniform_on_sphere(&mut seeded(&format!("{block_hash}_target"), 1), vocab_size)
}

/// Distance of a nonce's last-position logits (float32) to the target: permute, L2-normalise
/// in float32, then the float64 norm of the difference — numpy's dtypes at every step.
pub fn distance(logits: &[f32], permutation: &[usize], target: &[f64]) -> f64 {
    let permuted: Vec<f32> = permutation.iter().map(|&j| logits[j]).collect();
    let squares: Vec<f32> = permuted.iter().map(|x| x * x).collect();
    let norm = pairwise_sum(&squares).sqrt();
    let diff: Vec<f64> = permuted.iter().zip(target).map(|(&x, &t)| f64::from(x / norm) - t).map(|d| d * d).collect();
    pairwise_sum(&diff).sqrt()
}

/// Upstream's nonce order for one ML node and GPU group: `node_id + group_id * n_nodes +
/// x * n_groups * n_nodes` for x = 0, 1, 2, ... — disjoint across nodes and groups.
pub fn nonces(node_id: u64, n_nodes: u64, group_id: u64, n_groups: u64) -> impl Iterator<Item = u64> {
    let stride = n_groups.max(1) * n_nodes.max(1);
    (0u64..).map(move |x| node_id + group_id * n_nodes + x * stride)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_iterators_partition_the_nonces() {
        let (n_nodes, n_groups) = (3, 2);
        let mut seen: Vec<u64> = (0..n_nodes)
            .flat_map(|node| (0..n_groups).flat_map(move |g| nonces(node, n_nodes, g, n_groups).take(10)))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..60).collect::<Vec<_>>());
        assert_eq!(nonces(1, 3, 1, 2).take(3).collect::<Vec<_>>(), [4, 10, 16]);
    }

    #[test]
    fn logits_pointing_at_the_target_are_at_distance_zero() {
        let target = target("hash", 16);
        let perm = nonce_permutation("hash", "pk", 0, 16);
        // Logits such that logits[perm[j]] = 3 * target[j].
        let mut logits = vec![0f32; 16];
        for (j, &p) in perm.iter().enumerate() {
            logits[p] = 3.0 * target[j] as f32;
        }
        assert!(distance(&logits, &perm, &target) < 1e-6);
        let opposite: Vec<f32> = logits.iter().map(|x| -x).collect();
        assert!((distance(&opposite, &perm, &target) - 2.0).abs() < 1e-6);
    }

    #[test]
    fn inputs_are_half_precision_values() {
        let x = nonce_inputs("hash", "pk", 7, 2, 8);
        assert_eq!(x.len(), 16);
        assert!(x.iter().all(|v| f16::from_f32(*v).to_f32() == *v));
    }
}
