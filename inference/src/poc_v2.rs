//! PoC v2 on the served model, as upstream's vLLM fork computes it (`vllm/poc/gpu_random.py`,
//! `layer_hooks.py`, `poc_model_runner.py` `execute_poc_forward`):
//!
//! 1. per nonce, input embeddings `[seq_len, hidden]` of seeded normals (murmur3 counter hash →
//!    uniform → Box–Muller, float32, cast to the model dtype), seed
//!    `"{block_hash}_{public_key}_nonce{nonce}"` (or, with `poc_stronger_rng`, 8 segments seeded
//!    by the 8 words of that string's SHA-256);
//! 2. a causal forward from position 0 in vLLM's layout, with a Householder reflection
//!    `x - 2(v·x)v` of both of each layer's outputs (the feed-forward's and the residual
//!    stream; DeepSeek-V4's hyper-connected streams each), `v` seeded
//!    `"{block_hash}_layer_{i}_householder"` (none on GLM-5.3-Flash, whose layers upstream's
//!    hooks do not find: [`reflects_layers`]). DeepSeek-V4 alone also takes token ids, which its
//!    hash-routed layers choose experts by: per nonce, the counters `0..seq_len` hashed under
//!    `"…_nonce{nonce}_input_ids"`, modulo the vocabulary (upstream's
//!    `derive_pseudo_input_ids`);
//! 3. the last position's final-norm hidden state in float32, NaN rows dropped, normalised;
//! 4. `k` coordinates: the `k` smallest murmur3 scores of `0..hidden` under
//!    `"…_nonce_{nonce}_pick_{k}"`, taken with libtorch's 1-D `topk(-scores, sorted=False)` per
//!    nonce on the model's device (the order is that kernel's, and the artifact depends on it);
//! 5. `k - 1` Householder reflections seeded `"…_nonce_{nonce}_haar_hh_{k}_{j}"`, normalised;
//! 6. the vector as float16 little-endian, base64.
//!
//! The hashes are exact integer arithmetic: the inputs' counters are hashed where [`Hashing`]
//! says (on a GPU, on the device, as upstream does; on the CPU, in a host loop), the rest on the
//! host; every floating-point step runs as libtorch ops on the model's device, as upstream's do.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::batch::{Output, Step, StepInput};
use crate::config::Architecture;
use crate::models::{LayerHook, Transformer};

/// The first 32 bits of `sha256(seed)`, big-endian (upstream's `int(hexdigest[:8], 16)`).
pub fn seed_from_string(seed: &str) -> u32 {
    let digest = Sha256::digest(seed.as_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

/// Murmur3's 32-bit mix of one 4-byte key (upstream hashes counters `0..n` under a seed).
pub fn murmur3_32(key: u32, seed: u32) -> u32 {
    let mut k = key.wrapping_mul(0xCC9E_2D51);
    k = k.rotate_left(15);
    k = k.wrapping_mul(0x1B87_3593);
    let mut h = seed ^ k;
    h = h.rotate_left(13);
    h = h.wrapping_mul(5).wrapping_add(0xE654_6B64);
    h ^= h >> 16;
    h = h.wrapping_mul(0x85EB_CA6B);
    h ^= h >> 13;
    h = h.wrapping_mul(0xC2B2_AE35);
    h ^ (h >> 16)
}

/// Where the seeded normals' murmur3 counters are hashed. Both give the same bits: the hash is
/// integer arithmetic and the int→float32 conversion rounds to nearest on every device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hashing {
    /// A tight loop on the host, then a copy to the device: on the CPU, faster than two dozen
    /// passes of int64 tensor ops over the counters.
    Host,
    /// int64 tensor ops on the device (upstream's `_murmur3_32` formulation). On a GPU the host
    /// loop would be serial work before every PoC v2 batch (a batch of 8 nonces at MiniMax-M2's
    /// shapes, 1024 × 3072, is 25M counters, ~30 ms on one core) and 100 MB over the bus.
    Device,
}

impl Hashing {
    /// The faster for `device`.
    pub fn for_device(device: Device) -> Self {
        if device == Device::Cpu { Self::Host } else { Self::Device }
    }
}

const LOW_32_BITS: i64 = 0xFFFF_FFFF;

/// [`murmur3_32`] of int64 `keys` (values below 2^32) under `seed`, as tensor ops on the keys'
/// device, int64 below 2^32. A product of two 32-bit values wraps in 64 bits and its low 32 bits
/// are what 32-bit wrapping multiplication keeps: each step masks to them.
pub fn murmur3_32_tensor(keys: &Tensor, seed: u32) -> Tensor {
    let rotate_left = |x: &Tensor, r: i64| {
        x.bitwise_left_shift_tensor_scalar(r)
            .bitwise_or_tensor(&x.bitwise_right_shift_tensor_scalar(32 - r))
            .bitwise_and(LOW_32_BITS)
    };
    let k = (keys * 0xCC9E_2D51i64).bitwise_and(LOW_32_BITS);
    let k = (rotate_left(&k, 15) * 0x1B87_3593i64).bitwise_and(LOW_32_BITS);
    let h = rotate_left(&k.bitwise_xor(i64::from(seed)), 13);
    let h = (h * 5i64 + 0xE654_6B64i64).bitwise_and(LOW_32_BITS);
    let h = h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(16));
    let h = (h * 0x85EB_CA6Bi64).bitwise_and(LOW_32_BITS);
    let h = h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(13));
    let h = (h * 0xC2B2_AE35i64).bitwise_and(LOW_32_BITS);
    h.bitwise_xor_tensor(&h.bitwise_right_shift_tensor_scalar(16))
}

/// `murmur3(i, seed) / 2^32` for `i` in `0..n`, one row per seed, float32 `[seeds, n]` on
/// `device` (the int→float conversion rounds to nearest, as torch's does; the division by a power
/// of two is exact).
fn uniforms(seeds: &[u32], n: i64, device: Device, hashing: Hashing) -> Tensor {
    match hashing {
        Hashing::Host => {
            let flat: Vec<f32> = seeds
                .iter()
                .flat_map(|&s| (0..n as u32).map(move |i| murmur3_32(i, s) as f32 / 4_294_967_296.0))
                .collect();
            Tensor::from_slice(&flat).view([seeds.len() as i64, n]).to_device(device)
        }
        Hashing::Device => {
            let keys = Tensor::arange(n, (Kind::Int64, device));
            let rows: Vec<Tensor> = seeds.iter().map(|&s| murmur3_32_tensor(&keys, s)).collect();
            Tensor::stack(&rows, 0).to_kind(Kind::Float) / 4_294_967_296.0
        }
    }
}

/// Box–Muller on rows of uniforms `[rows, 2 * pairs]`: the first half drives the radius, the
/// second the angle; cosines then sines, cut to `n` columns.
fn box_muller(u: &Tensor, n: i64) -> Tensor {
    let pairs = u.size()[1] / 2;
    let u1 = u.narrow(1, 0, pairs).clamp_min(1e-10);
    let u2 = u.narrow(1, pairs, pairs);
    let radius = (u1.log() * -2.0).sqrt();
    let angle = u2 * (2.0 * std::f64::consts::PI);
    Tensor::cat(&[&radius * angle.cos(), radius * angle.sin()], 1).narrow(1, 0, n)
}

/// Seeded normals, float32 `[seeds, n]`, one row per seed (upstream's `_normal` /
/// `_batched_normal`).
pub fn normals(seeds: &[u32], n: i64, device: Device) -> Tensor {
    normals_with(seeds, n, device, Hashing::for_device(device))
}

fn normals_with(seeds: &[u32], n: i64, device: Device, hashing: Hashing) -> Tensor {
    let pairs = (n + 1) / 2;
    box_muller(&uniforms(seeds, 2 * pairs, device, hashing), n)
}

/// The input embeddings of `nonces`, `[nonces, seq_len, hidden]` in `kind`.
pub fn inputs(round: &Round<'_>, nonces: &[i64], hidden: i64, kind: Kind, device: Device) -> Tensor {
    inputs_with(round, nonces, hidden, kind, device, Hashing::for_device(device))
}

/// [`inputs`] with the counters hashed where `hashing` says (for tests and the bench: the
/// result is the same bits either way).
pub fn inputs_with(
    round: &Round<'_>,
    nonces: &[i64],
    hidden: i64,
    kind: Kind,
    device: Device,
    hashing: Hashing,
) -> Tensor {
    let n = round.seq_len * hidden;
    let rows: Vec<Tensor> = nonces
        .iter()
        .map(|nonce| {
            let seed = format!("{}_{}_nonce{nonce}", round.block_hash, round.public_key);
            let flat = if round.stronger_rng {
                // 8 segments of ceil(n/8), each seeded by one big-endian word of the SHA-256.
                let digest = Sha256::digest(seed.as_bytes());
                let segment = (n + 7) / 8;
                let parts: Vec<Tensor> = digest
                    .chunks(4)
                    .enumerate()
                    .filter(|(k, _)| (*k as i64) * segment < n)
                    .map(|(k, word)| {
                        let s = u32::from_be_bytes([word[0], word[1], word[2], word[3]]);
                        normals_with(&[s], segment.min(n - k as i64 * segment), device, hashing).squeeze_dim(0)
                    })
                    .collect();
                Tensor::cat(&parts, 0)
            } else {
                normals_with(&[seed_from_string(&seed)], n, device, hashing).squeeze_dim(0)
            };
            flat.view([round.seq_len, hidden]).to_kind(kind)
        })
        .collect();
    Tensor::stack(&rows, 0)
}

/// PoC v2's token ids for `nonce` on a model whose layers route by token id (upstream's
/// `derive_pseudo_input_ids`, which its runner calls for `deepseek_v4` only): counter `t` of
/// `0..seq_len` hashed under `"{block_hash}_{public_key}_nonce{nonce}_input_ids"`, modulo
/// `vocab`.
pub fn pseudo_input_ids(round: &Round<'_>, nonce: i64, vocab: i64) -> Vec<i64> {
    let seed = seed_from_string(&format!("{}_{}_nonce{nonce}_input_ids", round.block_hash, round.public_key));
    (0..round.seq_len as u32).map(|t| i64::from(murmur3_32(t, seed)) % vocab).collect()
}

/// Layer `i`'s reflection vector, unit float32 `[hidden]`.
pub fn householder_vector(block_hash: &str, layer: usize, hidden: i64, device: Device) -> Tensor {
    let v =
        normals(&[seed_from_string(&format!("{block_hash}_layer_{layer}_householder"))], hidden, device).squeeze_dim(0);
    &v / v.norm()
}

/// `x - 2 (v·x) v` over the last dimension, in `x`'s dtype.
///
/// In bfloat16 and float16 with upstream's ops (`x - 2 * (x * v).sum(-1, keepdim=True) * v`),
/// whose every intermediate is rounded to that dtype: that rounding is part of the artifact. In
/// float32 (`[rows, hidden]`) as BLAS's matrix-vector product and rank-1 update, the same sums
/// in another order: a PoC v2 batch of 2048 rows of 512 reflects in 0.15 ms where the three
/// elementwise passes take 2.6 (two reflections per layer: ~6% of the bench's PoC v2 on 2 cores).
pub fn reflect(x: &Tensor, v: &Tensor) -> Tensor {
    let v = v.to_kind(x.kind());
    if x.kind() == Kind::Float {
        // Rows of any leading shape (DeepSeek-V4's `[tokens, streams, hidden]`) as one matrix.
        let rows = x.reshape([-1, v.size()[0]]);
        return rows.addr(&(rows.mv(&v) * -2.0), &v).view(x.size().as_slice());
    }
    let dot = (x * &v).sum_dim_intlist(-1, true, x.kind());
    x - dot * 2.0 * v
}

/// What a PoC v2 round fixes: the chain's block, the participant, the sequence length, `k`.
#[derive(Debug, Clone)]
pub struct Round<'a> {
    pub block_hash: &'a str,
    pub public_key: &'a str,
    pub seq_len: i64,
    pub k_dim: i64,
    pub stronger_rng: bool,
}

/// One nonce's artifact: its `k`-vector (float32 before the float16 encoding, for
/// comparisons) and upstream's encoding of it.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    pub nonce: i64,
    pub vector: Vec<f32>,
    pub vector_b64: String,
}

/// The round's per-layer reflection vectors, made once per block hash (upstream caches its
/// hooks the same way).
pub struct Reflections {
    block_hash: String,
    /// Per layer, on that layer's device.
    vectors: Vec<Tensor>,
}

impl Reflections {
    pub fn new(model: &Transformer, block_hash: &str) -> Self {
        let vectors = model
            .blocks
            .iter()
            .enumerate()
            .map(|(i, b)| householder_vector(block_hash, i, model.spec.hidden_size, b.device))
            .collect();
        Self { block_hash: block_hash.to_string(), vectors }
    }

    pub fn block_hash(&self) -> &str {
        &self.block_hash
    }

    /// Each layer's vector, on that layer's device.
    pub fn vectors(&self) -> &[Tensor] {
        &self.vectors
    }
}

/// Per-row murmur3 scores of `0..dim` under each seed, int64 `[rows, dim]`.
fn scores(seeds: &[u32], dim: i64, device: Device) -> Tensor {
    let flat: Vec<i64> =
        seeds.iter().flat_map(|&s| (0..dim as u32).map(move |i| i64::from(murmur3_32(i, s)))).collect();
    Tensor::from_slice(&flat).view([seeds.len() as i64, dim]).to_device(device)
}

/// Steps 3–6 from the last hidden states `[nonces, hidden]` (any dtype) of `nonces`.
pub fn artifacts(round: &Round<'_>, nonces: &[i64], last_hidden: &Tensor) -> Vec<Artifact> {
    let device = last_hidden.device();
    let hidden = last_hidden.to_kind(Kind::Float);
    // NaN rows (a GPU fault) are dropped, not reported.
    let finite: Vec<bool> =
        Vec::<bool>::try_from(hidden.isnan().any_dim(-1, false).logical_not().to_device(Device::Cpu))
            .expect("bool rows");
    let kept: Vec<i64> = nonces.iter().zip(&finite).filter(|(_, f)| **f).map(|(n, _)| *n).collect();
    if kept.is_empty() {
        return Vec::new();
    }
    let rows: Vec<i64> = finite.iter().enumerate().filter(|(_, f)| **f).map(|(i, _)| i as i64).collect();
    let hidden = hidden.index_select(0, &Tensor::from_slice(&rows).to_device(device));
    let hidden = &hidden / (hidden.norm_scalaropt_dim(2, [-1i64].as_slice(), true) + 1e-8);
    let dim = hidden.size()[1];
    let k = round.k_dim;
    let prefix = |nonce: i64| format!("{}_{}_nonce_{nonce}", round.block_hash, round.public_key);
    let pick_seeds: Vec<u32> = kept.iter().map(|n| seed_from_string(&format!("{}_pick_{k}", prefix(*n)))).collect();
    // One 1-D `topk` per nonce, as upstream's `random_pick_indices` loops: an unsorted topk's
    // order is the kernel's, and a batched one over rows may order its picks otherwise.
    let scores = scores(&pick_seeds, dim, device).neg();
    let picked =
        Tensor::stack(&(0..kept.len() as i64).map(|i| scores.get(i).topk(k, 0, true, false).1).collect::<Vec<_>>(), 0);
    let mut y = hidden.gather(1, &picked, false);
    for j in 0..k - 1 {
        let seeds: Vec<u32> =
            kept.iter().map(|n| seed_from_string(&format!("{}_haar_hh_{k}_{j}", prefix(*n)))).collect();
        let v = normals(&seeds, k, device);
        let v = &v / v.norm_scalaropt_dim(2, [-1i64].as_slice(), true);
        let dot = (&y * &v).sum_dim_intlist(-1, true, Kind::Float);
        y = &y - dot * 2.0 * v;
    }
    let y = &y / (y.norm_scalaropt_dim(2, [-1i64].as_slice(), true) + 1e-8);
    // float32 → float16 rounds to nearest even on every device, as `half::f16::from_f32` does.
    let floats = Vec::<f32>::try_from(y.to_device(Device::Cpu).flatten(0, -1)).expect("float vectors");
    let halves: Vec<half::f16> = floats.iter().map(|f| half::f16::from_f32(*f)).collect();
    kept.iter()
        .enumerate()
        .filter_map(|(i, &nonce)| {
            let row = &halves[i * k as usize..(i + 1) * k as usize];
            // Upstream drops rows that turn NaN in float16 too.
            if row.iter().any(|h| h.is_nan()) {
                return None;
            }
            let bytes: Vec<u8> = row.iter().flat_map(|h| h.to_le_bytes()).collect();
            Some(Artifact {
                nonce,
                vector: floats[i * k as usize..(i + 1) * k as usize].to_vec(),
                vector_b64: STANDARD.encode(bytes),
            })
        })
        .collect()
}

/// The artifacts of `nonces` on `model`: one batched forward (every nonce a fresh sequence of
/// `seq_len` input embeddings, no KV cache kept) with the round's reflections after each layer
/// where upstream's hooks find the layers ([`reflects_layers`]).
pub fn compute(model: &Transformer, reflections: &Reflections, round: &Round<'_>, nonces: &[i64]) -> Vec<Artifact> {
    assert_eq!(reflections.block_hash, round.block_hash, "reflections of another block");
    let _guard = tch::no_grad_guard();
    let hidden = model.spec.hidden_size;
    let device = model.blocks.first().map_or(Device::Cpu, |b| b.device);
    let embeds = inputs(round, nonces, hidden, model.spec.kind, device);
    // Gated by architecture as upstream's runner gates by `model_type`: every other model runs
    // on the embeddings alone.
    let routes_by_token = model.spec.architecture == Architecture::DeepseekV4;
    let mut steps: Vec<Step<'_>> = nonces
        .iter()
        .enumerate()
        .map(|(i, &nonce)| Step {
            input: StepInput::Embeddings {
                embeddings: embeds.get(i as i64),
                routing_ids: routes_by_token.then(|| pseudo_input_ids(round, nonce, model.spec.vocab_size)),
            },
            cache: None,
        })
        .collect();
    let hook = |layer: usize, x: &Tensor| reflect(x, &reflections.vectors[layer]);
    let hook: Option<LayerHook<'_>> = reflects_layers(model.spec.architecture).then_some(&hook);
    let last = model.forward(&mut steps, hook, Output::Last);
    artifacts(round, nonces, &last)
}

/// Whether upstream's per-round reflections reach `architecture`'s layers. Its
/// `LayerHouseholderHook._find_layers` looks for the decoder layers at `model.model.layers`,
/// `model.transformer.h` or `model.layers` of vLLM's model; vLLM's GLM-5.3-Flash
/// (`Glm5NextForConditionalGeneration`, 0.32) keeps them at `language_model.model.layers`, so
/// none is found and its PoC forward runs unreflected. Every other architecture here is found
/// at `model.model.layers`.
pub fn reflects_layers(architecture: Architecture) -> bool {
    architecture != Architecture::Glm5Next
}

/// Decodes an artifact's base64 float16 little-endian vector; `None` when it is not one.
pub fn decode_vector(b64: &str) -> Option<Vec<f32>> {
    let bytes = STANDARD.decode(b64).ok()?;
    if bytes.len() % 2 != 0 {
        return None;
    }
    Some(bytes.chunks(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn murmur3_is_upstreams_mix() {
        // Upstream's `_murmur3_32` is Murmur3's block mix and finaliser without the length
        // XOR, so the published test vectors don't apply; these are its int64 formulation
        // evaluated with Python integers.
        assert_eq!(murmur3_32(0, 0), 0xFF19_274A);
        assert_eq!(murmur3_32(1, 0), 0x87BE_548A);
        assert_eq!(murmur3_32(12345, 0xBA78_16BF), 0xFADC_7D73);
        assert_eq!(murmur3_32(u32::MAX, u32::MAX), 0x27F3_175F);
    }

    #[test]
    fn the_tensor_mix_is_the_host_mix_bit_for_bit() {
        // Keys where the masks and wrapping matter: 0, the top bit, the largest, and a spread.
        let mut keys: Vec<u32> = vec![0, 1, 12345, 0x7FFF_FFFF, 0x8000_0000, u32::MAX - 1, u32::MAX];
        keys.extend((0..4096u32).map(|i| i.wrapping_mul(0x9E37_79B9)));
        let tensor = Tensor::from_slice(&keys.iter().map(|&k| i64::from(k)).collect::<Vec<_>>());
        for seed in [0, 1, 0xBA78_16BF, 0x8000_0000, u32::MAX] {
            let hashed = Vec::<i64>::try_from(murmur3_32_tensor(&tensor, seed)).unwrap();
            let expected: Vec<i64> = keys.iter().map(|&k| i64::from(murmur3_32(k, seed))).collect();
            assert_eq!(hashed, expected, "seed {seed:#x}");
        }
        let vectors = Tensor::from_slice(&[0i64, 1, i64::from(u32::MAX)]);
        assert_eq!(Vec::<i64>::try_from(murmur3_32_tensor(&vectors, 0)).unwrap()[..2], [0xFF19_274A, 0x87BE_548A]);
        assert_eq!(Vec::<i64>::try_from(murmur3_32_tensor(&vectors, u32::MAX)).unwrap()[2], 0x27F3_175F);
    }

    #[test]
    fn inputs_hashed_on_the_device_are_the_host_inputs_bit_for_bit() {
        // The device path run on the CPU: its int64 ops and int→float rounding are the CUDA
        // kernels' too. Odd sizes, both RNG layouts (the stronger one's last segment is short).
        for stronger_rng in [false, true] {
            let round = Round { block_hash: "blk", public_key: "pk", seq_len: 37, k_dim: 12, stronger_rng };
            let host = inputs_with(&round, &[0, 9, 1 << 40], 91, Kind::Float, Device::Cpu, Hashing::Host);
            let device = inputs_with(&round, &[0, 9, 1 << 40], 91, Kind::Float, Device::Cpu, Hashing::Device);
            assert_eq!(host.size(), [3, 37, 91]);
            let (host, device) = (
                Vec::<f32>::try_from(host.flatten(0, -1)).unwrap(),
                Vec::<f32>::try_from(device.flatten(0, -1)).unwrap(),
            );
            assert!(host.iter().zip(&device).all(|(a, b)| a.to_bits() == b.to_bits()), "stronger_rng {stronger_rng}");
        }
        assert_eq!(Hashing::for_device(Device::Cpu), Hashing::Host);
        assert_eq!(Hashing::for_device(Device::Cuda(0)), Hashing::Device);
    }

    #[test]
    fn pseudo_input_ids_are_upstreams_frozen_vectors() {
        // gonka-vllm-plugins' `test_pseudo_ids_reference_vectors`, which "an independent
        // implementation must reproduce before DeepSeek-V4 network activation".
        let round = Round {
            block_hash: "poc_ids_convention_v1_block",
            public_key: "poc_ids_convention_v1_pubkey",
            seq_len: 16,
            k_dim: 12,
            stronger_rng: false,
        };
        let vocab = 163_840;
        assert_eq!(
            seed_from_string("poc_ids_convention_v1_block_poc_ids_convention_v1_pubkey_nonce0_input_ids"),
            2_980_507_924
        );
        assert_eq!(
            pseudo_input_ids(&round, 0, vocab),
            [
                119046, 160019, 98337, 39450, 94909, 163782, 59011, 57361, 156377, 36469, 139643, 43988, 50299, 147011,
                12130, 86013
            ]
        );
        assert_eq!(
            pseudo_input_ids(&round, 1, vocab),
            [
                137719, 146475, 40370, 95731, 105609, 72910, 88608, 153625, 112488, 156080, 83284, 17839, 70977, 48769,
                15417, 65900
            ]
        );
        let ids = pseudo_input_ids(&Round { seq_len: 256, ..round }, 0, vocab);
        let (sum, min, max) = (ids.iter().sum::<i64>(), *ids.iter().min().unwrap(), *ids.iter().max().unwrap());
        assert_eq!((sum, min, max), (20_594_062, 181, 163_834));
    }

    #[test]
    fn seeds_are_the_first_word_of_sha256() {
        // sha256("abc") = ba7816bf…
        assert_eq!(seed_from_string("abc"), 0xBA78_16BF);
    }

    #[test]
    fn float32_reflections_are_upstreams_formula_and_lower_precisions_its_ops() {
        let v = householder_vector("hash", 5, 512, Device::Cpu);
        let x = Tensor::randn([300, 512], (Kind::Float, Device::Cpu)) * 3.0;
        // Float32 against the formula in float64: within float32's rounding of 512-term sums.
        let exact = {
            let (x, v) = (x.to_kind(Kind::Double), v.to_kind(Kind::Double));
            &x - (&x * &v).sum_dim_intlist(-1, true, Kind::Double) * 2.0 * &v
        };
        let ours = reflect(&x, &v);
        assert_eq!(ours.kind(), Kind::Float);
        let error = (ours.to_kind(Kind::Double) - &exact).abs().max().double_value(&[]);
        assert!(error < 1e-5, "{error}");
        // A wrong sign or factor is far off.
        let wrong = x.addr(&(x.mv(&v) * -1.0), &v);
        assert!((wrong.to_kind(Kind::Double) - &exact).abs().max().double_value(&[]) > 0.1);
        // Rows under more leading dimensions (hyper-connected streams) each reflected alike.
        let streams = x.view([75, 4, 512]);
        assert!(reflect(&streams, &v).view([300, 512]).equal(&ours));
        // Bfloat16 rounds as upstream's elementwise ops do, to the bit.
        for kind in [Kind::BFloat16, Kind::Half] {
            let (x, v16) = (x.to_kind(kind), v.to_kind(kind));
            let theirs = &x - (&x * &v16).sum_dim_intlist(-1, true, kind) * 2.0 * &v16;
            assert!(reflect(&x, &v).equal(&theirs), "{kind:?}");
        }
    }

    #[test]
    fn reflections_are_involutions_and_keep_norms() {
        let v = householder_vector("hash", 3, 64, Device::Cpu);
        assert!((v.norm().double_value(&[]) - 1.0).abs() < 1e-6);
        let x = Tensor::randn([5, 64], (Kind::Float, Device::Cpu));
        let twice = reflect(&reflect(&x, &v), &v);
        assert!(twice.allclose(&x, 1e-5, 1e-5, false));
        let norms = reflect(&x, &v).norm_scalaropt_dim(2, [-1i64].as_slice(), false);
        assert!(norms.allclose(&x.norm_scalaropt_dim(2, [-1i64].as_slice(), false), 1e-5, 1e-5, false));
    }

    #[test]
    fn normals_look_normal_and_stronger_rng_differs() {
        let z = normals(&[42], 200_000, Device::Cpu);
        let (mean, std) = (z.mean(Kind::Float).double_value(&[]), z.std(true).double_value(&[]));
        assert!(mean.abs() < 0.01 && (std - 1.0).abs() < 0.01, "{mean} {std}");
        let round = Round { block_hash: "h", public_key: "pk", seq_len: 4, k_dim: 12, stronger_rng: false };
        let plain = inputs(&round, &[7], 16, Kind::Float, Device::Cpu);
        let strong = inputs(&Round { stronger_rng: true, ..round.clone() }, &[7], 16, Kind::Float, Device::Cpu);
        assert_eq!(plain.size(), [1, 4, 16]);
        assert!(!plain.allclose(&strong, 1e-3, 1e-3, false));
    }

    #[test]
    fn vectors_round_trip_through_base64() {
        let v: Vec<f32> = vec![0.5, -0.25, 1.0];
        let bytes: Vec<u8> = v.iter().flat_map(|f| half::f16::from_f32(*f).to_le_bytes()).collect();
        assert_eq!(decode_vector(&STANDARD.encode(bytes)).unwrap(), v);
        assert_eq!(decode_vector("not base64!"), None);
        assert_eq!(decode_vector(&STANDARD.encode([1u8, 2, 3])), None);
    }
}
