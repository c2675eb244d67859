//! GPU groups (upstream `pow/compute/gpu_group.py`): the node's GPUs are cut, in index order,
//! into groups just large enough to hold one proof model; each group runs its own model replica
//! and its own nonce stream (`group_id`, `n_groups` in the nonce iterator).

use super::params::Params;

/// VRAM one group needs for the model (upstream: 10 GB for the testnet params, 38 GB else).
pub fn min_group_vram_gb(params: &Params) -> f64 {
    let testnet = Params {
        dim: 1024,
        n_layers: 32,
        n_heads: 32,
        n_kv_heads: 32,
        vocab_size: 8196,
        ffn_dim_multiplier: Some(10.0),
        multiple_of: 2048,
        norm_eps: 1e-5,
        rope_theta: 10000.0,
        use_scaled_rope: false,
        seq_len: 128,
    };
    if *params == testnet { 10.0 } else { 38.0 }
}

/// Upstream's greedy grouping: from the first free GPU, take the smallest of 1, 2, 4, 8
/// consecutive GPUs whose VRAM adds up to `min_gb`; a GPU that starts no such group is left
/// out. `vram_gb[i]` is GPU i's total memory.
pub fn gpu_groups(vram_gb: &[f64], min_gb: f64) -> Vec<Vec<usize>> {
    let mut groups = Vec::new();
    let mut start = 0;
    while start < vram_gb.len() {
        let left = vram_gb.len() - start;
        let size = [1, 2, 4, 8]
            .into_iter()
            .filter(|&n| n <= left)
            .find(|&n| vram_gb[start..start + n].iter().sum::<f64>() >= min_gb);
        match size {
            Some(n) => {
                groups.push((start..start + n).collect());
                start += n;
            }
            None => start += 1,
        }
    }
    groups
}

/// Which of a group's devices holds each layer: contiguous, balanced blocks (the final norm
/// and output head go with the last layer).
pub fn layer_devices(n_layers: usize, n_devices: usize) -> Vec<usize> {
    (0..n_layers).map(|i| i * n_devices.max(1) / n_layers.max(1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_upstreams_greedy_rule() {
        // An HGX H100 box: every GPU holds the mainnet model alone.
        assert_eq!(gpu_groups(&[79.6; 8], 38.0), (0..8).map(|i| vec![i]).collect::<Vec<_>>());
        // 24 GB cards pair up.
        assert_eq!(gpu_groups(&[24.0; 8], 38.0), vec![vec![0, 1], vec![2, 3], vec![4, 5], vec![6, 7]]);
        // 12 GB cards need four; the two left over make no group.
        assert_eq!(gpu_groups(&[12.0; 6], 38.0), vec![vec![0, 1, 2, 3]]);
        // Mixed: a big GPU alone, then two small ones together, a lone small one is dropped.
        assert_eq!(gpu_groups(&[80.0, 24.0, 24.0, 24.0], 38.0), vec![vec![0], vec![1, 2]]);
        assert!(gpu_groups(&[8.0], 38.0).is_empty());
        assert!(gpu_groups(&[], 38.0).is_empty());
    }

    #[test]
    fn testnet_params_need_less() {
        let testnet: Params = serde_json::from_value(serde_json::json!({
            "dim": 1024, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "vocab_size": 8196,
            "ffn_dim_multiplier": 10.0, "multiple_of": 2048, "norm_eps": 1e-5, "rope_theta": 10000.0, "seq_len": 128
        }))
        .unwrap();
        assert_eq!(min_group_vram_gb(&testnet), 10.0);
        assert_eq!(min_group_vram_gb(&Params::mainnet()), 38.0);
    }

    #[test]
    fn layers_spread_in_balanced_blocks() {
        assert_eq!(layer_devices(4, 1), [0, 0, 0, 0]);
        assert_eq!(layer_devices(8, 2), [0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(layer_devices(5, 2), [0, 0, 0, 1, 1]);
        assert_eq!(layer_devices(64, 4).iter().filter(|&&d| d == 3).count(), 16);
    }
}
