//! Where a model's layers go across an ML node's GPUs: contiguous runs of decoder layers (the
//! embedding with the first, the final norm and LM head with the last), each GPU's run sized by
//! the bytes the checkpoint's headers give its layers, so that every GPU's share of weights and
//! of the KV cache fits what it has free. Every token keeps keys and values on every layer, so a
//! GPU holding `n` layers needs `n` layers' worth of cache per token: the split is the one that
//! leaves the most tokens of cache on the tightest GPU (a MiniMax-M2.7 in FP8 on two H200s: 31
//! layers each, the embedding on one and the LM head on the other). Pure arithmetic, tested on
//! the released model's shapes without a GPU; `model::layer_bytes` reads the sizes, the ML node
//! plans with each GPU's free memory and loads with the plan's runs.

use std::fmt;
use std::ops::Range;

use tch::Device;

/// The bytes of a model's weights as loading places them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerBytes {
    /// With the first layer: the token embedding (and any tensor outside the layers).
    pub embedding: u64,
    /// Each decoder layer's.
    pub layers: Vec<u64>,
    /// With the last layer: the final norm and the LM head.
    pub head: u64,
    /// The LM head is the embedding (tied, no `lm_head` stored): it costs nothing where the last
    /// layer shares the first's GPU, and a copy of the embedding where it does not.
    pub tied: bool,
}

impl LayerBytes {
    /// All of them, as one device holds them.
    pub fn total(&self) -> u64 {
        self.embedding + self.layers.iter().sum::<u64>() + self.head
    }
}

/// One device's part of a [`Placement`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// Its decoder layers (empty: it holds none).
    pub layers: Range<usize>,
    /// The weights it holds.
    pub weight_bytes: u64,
    /// What it had for weights and cache.
    pub usable: u64,
}

/// Contiguous runs of layers over the devices, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub shares: Vec<Share>,
    /// Tokens of KV cache (on every layer) that fit beside the weights on every device.
    pub kv_tokens: u64,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlacementError {
    #[error("no device to place the model on")]
    NoDevices,
    #[error("the model has no decoder layers to place")]
    NoLayers,
    #[error(
        "the weights ({weights}) do not fit the devices' usable memory ({usable}) in contiguous runs of layers \
         (the largest layer: {largest_layer})",
        weights = gib(*weights),
        usable = .usable.iter().map(|u| gib(*u)).collect::<Vec<_>>().join(" + "),
        largest_layer = gib(*largest_layer)
    )]
    DoesNotFit { weights: u64, usable: Vec<u64>, largest_layer: u64 },
    #[error("a placement of {placed} layers over {runs} devices for a model of {layers} layers on {devices} devices")]
    Runs { placed: usize, runs: usize, layers: usize, devices: usize },
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
}

/// Places `bytes` on devices with `usable` bytes each for weights and cache (free memory less
/// the engine's margin and a forward's activations), a token's keys and values taking
/// `kv_bytes_per_layer` on each layer: the split that fits the most tokens of cache.
pub fn plan(bytes: &LayerBytes, kv_bytes_per_layer: u64, usable: &[u64]) -> Result<Placement, PlacementError> {
    if usable.is_empty() {
        return Err(PlacementError::NoDevices);
    }
    if bytes.layers.is_empty() {
        return Err(PlacementError::NoLayers);
    }
    let does_not_fit = || PlacementError::DoesNotFit {
        weights: bytes.total(),
        usable: usable.to_vec(),
        largest_layer: bytes.layers.iter().copied().max().unwrap_or(0),
    };
    let mut best = pack(bytes, kv_bytes_per_layer, usable, 0).ok_or_else(does_not_fit)?;
    if kv_bytes_per_layer == 0 {
        return Ok(Placement { shares: best, kv_tokens: u64::MAX });
    }
    // More tokens only ever need more room, so the most that fit is found by bisection between
    // none (they fit) and all the memory there is as cache on every layer (too many).
    let layers = bytes.layers.len() as u64;
    let (mut fits, mut too_many) = (0u64, usable.iter().sum::<u64>() / kv_bytes_per_layer / layers + 1);
    while too_many - fits > 1 {
        let tokens = fits + (too_many - fits) / 2;
        match pack(bytes, kv_bytes_per_layer, usable, tokens) {
            Some(shares) => (fits, best) = (tokens, shares),
            None => too_many = tokens,
        }
    }
    Ok(Placement { shares: best, kv_tokens: fits })
}

/// Layers in order, each device taking as many as fit with `tokens` of cache on each before the
/// next device starts (for contiguous runs in a fixed order, filling each device first fits
/// whenever any split does); `None` when the layers outlast the devices.
fn pack(bytes: &LayerBytes, kv_bytes_per_layer: u64, usable: &[u64], tokens: u64) -> Option<Vec<Share>> {
    let cache = tokens.checked_mul(kv_bytes_per_layer)?;
    let count = bytes.layers.len();
    let mut shares = Vec::with_capacity(usable.len());
    let mut next = 0;
    for &room in usable {
        let start = next;
        let (mut weights, mut used) = (0u64, 0u64);
        while next < count {
            let mut layer = bytes.layers[next];
            if next == 0 {
                layer = layer.checked_add(bytes.embedding)?;
            }
            if next == count - 1 {
                // A tied head is a copy of the embedding unless this device holds it already.
                let copy = if bytes.tied && start != 0 { bytes.embedding } else { 0 };
                layer = layer.checked_add(bytes.head)?.checked_add(copy)?;
            }
            let need = used.checked_add(layer)?.checked_add(cache)?;
            if need > room {
                break;
            }
            (weights, used, next) = (weights + layer, need, next + 1);
        }
        shares.push(Share { layers: start..next, weight_bytes: weights, usable: room });
    }
    (next == count).then_some(shares)
}

/// Which device each of `layers` layers runs on: contiguous runs, device `d` taking the next
/// `runs[d]` (a [`Placement`]'s, which must cover the layers exactly), or as even as they divide
/// without a plan (the CPU, a checkpoint whose sizes were not read).
pub fn layer_devices(layers: usize, devices: &[Device], runs: Option<&[usize]>) -> Result<Vec<Device>, PlacementError> {
    let Some(runs) = runs else {
        let n = devices.len().max(1);
        return Ok((0..layers).map(|i| devices.get(i * n / layers.max(1)).copied().unwrap_or(Device::Cpu)).collect());
    };
    let placed = runs.iter().sum::<usize>();
    if runs.len() != devices.len() || placed != layers {
        return Err(PlacementError::Runs { placed, runs: runs.len(), layers, devices: devices.len() });
    }
    Ok(devices.iter().zip(runs).flat_map(|(device, &run)| std::iter::repeat_n(*device, run)).collect())
}

impl Placement {
    /// How many layers each device takes, in order (what [`crate::LoadOptions`] takes).
    pub fn layers_per_device(&self) -> Vec<usize> {
        self.shares.iter().map(|share| share.layers.len()).collect()
    }
}

impl fmt::Display for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (d, share) in self.shares.iter().enumerate() {
            let layers = match (share.layers.start, share.layers.end) {
                (a, b) if a == b => "no layers".to_string(),
                (a, b) if b - a == 1 => format!("layer {a}"),
                (a, b) => format!("layers {a}-{} ({})", b - 1, b - a),
            };
            writeln!(
                f,
                "device {d}: {layers}, {} of weights of {} usable",
                gib(share.weight_bytes),
                gib(share.usable)
            )?;
        }
        write!(f, "KV cache: {} tokens on every layer", self.kv_tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FP8 weights in 128×128 blocks: a byte per weight and a float32 scale per block.
    fn fp8(out: u64, inp: u64) -> u64 {
        out * inp + out.div_ceil(128) * inp.div_ceil(128) * 4
    }

    /// MiniMax-M2.7 as its checkpoint stores it (config.json of the release): hidden 3072, 62
    /// layers, 48 query heads and 8 key/value heads of 128, 256 experts of width 1536, vocab
    /// 200064, FP8 in 128×128 blocks, norms, router and embeddings in bfloat16, head untied.
    fn minimax_m2_7() -> (LayerBytes, u64) {
        let (hidden, heads, kv_heads, head_dim, experts, width, vocab) = (3072, 48, 8, 128, 256, 1536, 200_064);
        let attention = fp8(heads * head_dim, hidden)
            + 2 * fp8(kv_heads * head_dim, hidden)
            + fp8(hidden, heads * head_dim)
            + 2 * (heads + kv_heads) * head_dim;
        let experts_bytes = experts * (2 * fp8(width, hidden) + fp8(hidden, width));
        let router = 2 * experts * hidden + 4 * experts;
        let layer = attention + experts_bytes + router + 2 * 2 * hidden;
        let bytes = LayerBytes {
            embedding: 2 * vocab * hidden,
            layers: vec![layer; 62],
            head: 2 * vocab * hidden + 2 * hidden,
            tied: false,
        };
        // A token's keys and values on one layer, in bfloat16.
        (bytes, 2 * kv_heads * head_dim * 2)
    }

    /// What an H200 leaves for weights and cache: NVML's 143,771 MiB free at vLLM's 0.92, less
    /// 8.4 GB of working memory (a step's activations and one layer's FP8 experts widened to
    /// bfloat16, 7.4 GB of it).
    const H200: u64 = (143_771 * 1024 * 1024) * 92 / 100 - 8_400_000_000;

    #[test]
    fn minimax_m2_7_splits_in_halves_over_two_h200s() {
        let (bytes, kv) = minimax_m2_7();
        // About 3.67 GB a layer, 230 GB in all: more than one H200 holds.
        assert!((3_660_000_000..3_680_000_000).contains(&bytes.layers[0]), "{}", bytes.layers[0]);
        assert!(matches!(plan(&bytes, kv, &[H200]), Err(PlacementError::DoesNotFit { .. })));

        let placement = plan(&bytes, kv, &[H200, H200]).unwrap();
        assert_eq!(placement.layers_per_device(), vec![31, 31]);
        assert_eq!(placement.shares[0].layers, 0..31);
        assert_eq!(placement.shares[1].layers, 31..62);
        let layer = bytes.layers[0];
        assert_eq!(placement.shares[0].weight_bytes, 31 * layer + bytes.embedding);
        assert_eq!(placement.shares[1].weight_bytes, 31 * layer + bytes.head);
        // The cache: what the fuller device leaves, 31 layers of it per token.
        let tokens = |weights: u64| (H200 - weights) / (31 * kv);
        let expected = tokens(placement.shares[0].weight_bytes).min(tokens(placement.shares[1].weight_bytes));
        assert_eq!(placement.kv_tokens, expected);
        // About 120,000 tokens in bfloat16: less than one sequence of governance's 180,000.
        assert!((119_000..121_000).contains(&placement.kv_tokens), "{}", placement.kv_tokens);
        // In FP8 (governance's --kv-cache-dtype fp8) twice as many: its --max-model-len 180000 fits.
        let fp8 = plan(&bytes, kv / 2, &[H200, H200]).unwrap();
        assert_eq!(fp8.kv_tokens, tokens(placement.shares[0].weight_bytes.max(placement.shares[1].weight_bytes)) * 2);
        assert!(fp8.kv_tokens >= 180_000);
        // One token more does not fit either split of the layers.
        assert!(pack(&bytes, kv, &[H200, H200], expected + 1).is_none());
        assert!(pack(&bytes, kv, &[H200, H200], expected).is_some());
    }

    #[test]
    fn a_smaller_device_takes_fewer_layers() {
        let (bytes, kv) = minimax_m2_7();
        let h100 = (81_559 * 1024 * 1024) * 92 / 100 - 8_400_000_000;
        let placement = plan(&bytes, kv, &[h100, H200, H200]).unwrap();
        let runs = placement.layers_per_device();
        assert_eq!(runs.iter().sum::<usize>(), 62);
        assert!(runs[0] < runs[1], "{runs:?}");
        for share in &placement.shares {
            let cache = placement.kv_tokens * kv * share.layers.len() as u64;
            assert!(share.weight_bytes + cache <= share.usable, "{share:?}");
        }
        assert!(placement.kv_tokens > plan(&bytes, kv, &[H200, H200]).unwrap().kv_tokens);
    }

    #[test]
    fn the_tightest_fit_and_one_byte_less() {
        let bytes = LayerBytes { embedding: 10, layers: vec![100, 100, 100], head: 20, tied: false };
        let exact = plan(&bytes, 1, &[bytes.total()]).unwrap();
        assert_eq!(exact.kv_tokens, 0);
        assert_eq!(exact.layers_per_device(), vec![3]);
        assert_eq!(
            plan(&bytes, 1, &[bytes.total() - 1]),
            Err(PlacementError::DoesNotFit { weights: 330, usable: vec![329], largest_layer: 100 })
        );
        // 30 bytes over: 10 tokens of cache on each of 3 layers.
        assert_eq!(plan(&bytes, 1, &[bytes.total() + 30]).unwrap().kv_tokens, 10);
        assert_eq!(plan(&bytes, 1, &[bytes.total() + 29]).unwrap().kv_tokens, 9);
        // Without a cache to size, what fits is unbounded.
        assert_eq!(plan(&bytes, 0, &[bytes.total()]).unwrap().kv_tokens, u64::MAX);
    }

    #[test]
    fn a_tied_head_costs_a_copy_only_away_from_the_embedding() {
        let bytes = LayerBytes { embedding: 50, layers: vec![100; 4], head: 1, tied: true };
        let one = plan(&bytes, 0, &[451]).unwrap();
        assert_eq!(one.shares[0].weight_bytes, 451);
        // Split, the last device holds the embedding's copy as its LM head.
        let two = plan(&bytes, 0, &[250, 251]).unwrap();
        assert_eq!(two.layers_per_device(), vec![2, 2]);
        assert_eq!(two.shares[1].weight_bytes, 200 + 1 + 50);
        assert!(plan(&bytes, 0, &[250, 250]).is_err());
    }

    #[test]
    fn a_device_too_small_for_a_layer_is_passed_over() {
        let bytes = LayerBytes { embedding: 0, layers: vec![100; 4], head: 0, tied: false };
        let placement = plan(&bytes, 0, &[200, 50, 200]).unwrap();
        assert_eq!(placement.shares.iter().map(|s| s.layers.clone()).collect::<Vec<_>>(), vec![0..2, 2..2, 2..4]);
        assert_eq!(plan(&bytes, 0, &[]), Err(PlacementError::NoDevices));
        let none = LayerBytes { layers: vec![], ..bytes };
        assert_eq!(plan(&none, 0, &[100]), Err(PlacementError::NoLayers));
    }

    #[test]
    fn layers_go_in_contiguous_runs_even_or_as_planned() {
        let gpus = [Device::Cuda(0), Device::Cuda(1), Device::Cuda(2)];
        let even = layer_devices(8, &gpus, None).unwrap();
        assert_eq!(even.iter().filter(|d| **d == Device::Cuda(0)).count(), 3);
        assert_eq!(even.iter().filter(|d| **d == Device::Cuda(2)).count(), 2);
        assert!(
            even.windows(2)
                .all(|w| w[0] == w[1] || gpus.iter().position(|g| *g == w[0]) < gpus.iter().position(|g| *g == w[1]))
        );
        assert_eq!(layer_devices(4, &[Device::Cpu], None).unwrap(), vec![Device::Cpu; 4]);
        let (a, c) = (Device::Cuda(0), Device::Cuda(2));
        assert_eq!(layer_devices(5, &gpus, Some(&[3, 0, 2])).unwrap(), vec![a, a, a, c, c]);
        assert_eq!(
            layer_devices(5, &gpus, Some(&[3, 0, 1])),
            Err(PlacementError::Runs { placed: 4, runs: 3, layers: 5, devices: 3 })
        );
        assert!(layer_devices(5, &gpus, Some(&[3, 2])).is_err());
    }

    #[test]
    fn the_plan_reads_as_it_is_logged() {
        let bytes = LayerBytes { embedding: 1 << 30, layers: vec![1 << 31; 3], head: 1 << 30, tied: false };
        let placement = plan(&bytes, 1 << 20, &[6 << 30, 5 << 30]).unwrap();
        assert_eq!(
            placement.to_string(),
            "device 0: layers 0-1 (2), 5.0 GiB of weights of 6.0 GiB usable\n\
             device 1: layer 2, 3.0 GiB of weights of 5.0 GiB usable\n\
             KV cache: 512 tokens on every layer"
        );
        let error = plan(&bytes, 0, &[2 << 30, 2 << 30]).unwrap_err().to_string();
        assert_eq!(
            error,
            "the weights (8.0 GiB) do not fit the devices' usable memory (2.0 GiB + 2.0 GiB) in contiguous \
             runs of layers (the largest layer: 2.0 GiB)"
        );
    }
}
