//! The PoC v1 proof model on libtorch: upstream's nano-Llama-3.1 `Transformer`
//! (`pow/models/llama31.py`), random-initialised from the block hash by upstream's pool scheme
//! (`pow/random_pool_optimized.py`), forwarded from input embeddings (`forward_embedding`).
//!
//! Every op mirrors upstream's, in the same order and dtypes (float32 for norms, softmax and
//! rotary embeddings; the model dtype elsewhere), so with the same libtorch kernels the logits
//! are the ones PyTorch computes.

use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use super::groups::layer_devices;
use super::params::{Params, ParamsError};
use super::rng::seeded;

/// Share of the model's parameter count drawn as the random pool (upstream's `pool_fraction`).
const POOL_FRACTION: f64 = 0.05;
const MIN_POOL: usize = 50_000;

struct Layer {
    /// Index into the model's devices.
    device: usize,
    wq: Tensor,
    wk: Tensor,
    wv: Tensor,
    wo: Tensor,
    w1: Tensor,
    w2: Tensor,
    w3: Tensor,
    attention_norm: Tensor,
    ffn_norm: Tensor,
}

/// A proof model for one block hash.
pub struct ProofModel {
    params: Params,
    kind: Kind,
    /// The devices the layers are spread over (one on CPU; a GPU group on GPUs).
    devices: Vec<Device>,
    layers: Vec<Layer>,
    /// Final norm and output head, on the last layer's device.
    norm: Tensor,
    output: Tensor,
    /// Per device: `[seq_len, head_dim / 2, 2]` cos/sin in the model dtype (upstream casts them so).
    freqs: Vec<Tensor>,
}

/// Upstream's per-parameter offset into the pool: the first 8 hex digits of
/// `sha256(f"{block_hash}_{name}")`.
pub fn name_hash(block_hash: &str, name: &str) -> u64 {
    let digest = Sha256::digest(format!("{block_hash}_{name}").as_bytes());
    u64::from(u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]))
}

/// The values of one parameter, cut from the pool as upstream does: a slice when it fits,
/// else the pool tiled to size and rotated left by the name hash.
pub fn parameter_values(pool: &[f32], size: usize, hash: u64) -> Vec<f32> {
    let n = pool.len();
    if size <= n {
        let start = (hash % (n - size + 1) as u64) as usize;
        return pool[start..start + size].to_vec();
    }
    let mut values: Vec<f32> = pool.iter().copied().cycle().take(size).collect();
    let shift = (hash % size as u64) as usize;
    values.rotate_left(shift);
    values
}

/// The random pool: `normal(0, 0.02)` draws from the block hash's generator, as float32.
pub fn pool(params: &Params, block_hash: &str) -> Vec<f32> {
    let size = MIN_POOL.max((params.parameter_count() as f64 * POOL_FRACTION) as usize);
    seeded(block_hash, 4).normal_vec(0.0, 0.02, size).into_iter().map(|x| x as f32).collect()
}

impl ProofModel {
    /// Builds the model of `block_hash` on `device` in `kind` (Float on CPU, Half on GPUs).
    pub fn new(params: &Params, block_hash: &str, device: Device, kind: Kind) -> Result<Self, ParamsError> {
        Self::sharded(params, block_hash, &[device], kind)
    }

    /// Builds the model with its layers spread over `devices` in balanced blocks (a GPU group
    /// whose GPUs hold one model together).
    pub fn sharded(params: &Params, block_hash: &str, devices: &[Device], kind: Kind) -> Result<Self, ParamsError> {
        params.validate()?;
        if devices.is_empty() {
            return Err(ParamsError("no device to place the model on".into()));
        }
        let placement = layer_devices(params.n_layers, devices.len());
        let last = *placement.last().unwrap_or(&0);
        let pool = pool(params, block_hash);
        let mut tensors = params.parameters().into_iter().map(|(name, shape)| {
            let size = shape.iter().product();
            let values = parameter_values(&pool, size, name_hash(block_hash, &name));
            let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
            (name, Tensor::from_slice(&values).view(shape.as_slice()).to_kind(kind))
        });
        let mut next = |expected: &str, device: usize| {
            let (name, t) = tensors.next().expect("parameter list");
            debug_assert!(name.ends_with(expected), "{name} vs {expected}");
            t.to_device(devices[device])
        };
        // Token embeddings are drawn (they shift nothing: each parameter has its own offset) but
        // PoC feeds embeddings directly, so they are not kept.
        let _ = next("tok_embeddings.weight", 0);
        let layers = placement
            .iter()
            .map(|&device| Layer {
                device,
                wq: next("wq.weight", device),
                wk: next("wk.weight", device),
                wv: next("wv.weight", device),
                wo: next("wo.weight", device),
                w1: next("w1.weight", device),
                w2: next("w2.weight", device),
                w3: next("w3.weight", device),
                attention_norm: next("attention_norm.weight", device),
                ffn_norm: next("ffn_norm.weight", device),
            })
            .collect();
        let norm = next("norm.weight", last);
        let output = next("output.weight", last);
        let cpu_freqs = rotary_frequencies(params).to_kind(kind);
        let freqs = devices.iter().map(|&d| cpu_freqs.to_device(d)).collect();
        Ok(Self { params: params.clone(), kind, devices: devices.to_vec(), layers, norm, output, freqs })
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Last-position logits (float32, `[batch, vocab]`) for input embeddings given as
    /// `batch` rows of `seq_len * dim` values.
    pub fn last_logits(&self, inputs: &[Vec<f32>]) -> Vec<Vec<f32>> {
        let p = &self.params;
        let flat: Vec<f32> = inputs.iter().flatten().copied().collect();
        let x = Tensor::from_slice(&flat)
            .view([inputs.len() as i64, p.seq_len as i64, p.dim as i64])
            .to_kind(self.kind)
            .to_device(self.devices[0]);
        let logits = tch::no_grad(|| self.forward(&x)).to_device(Device::Cpu).contiguous();
        let vocab = p.vocab_size;
        let mut out = vec![0f32; inputs.len() * vocab];
        logits.copy_data(&mut out, inputs.len() * vocab);
        out.chunks(vocab).map(<[f32]>::to_vec).collect()
    }

    /// `forward_embedding(h, start_pos=0)[:, -1, :]`; activations follow the layers' devices.
    fn forward(&self, x: &Tensor) -> Tensor {
        let seq = x.size()[1];
        let mask = Tensor::full([seq, seq], f64::NEG_INFINITY, (Kind::Float, Device::Cpu)).triu(1).to_kind(self.kind);
        let masks: Vec<Tensor> = self.devices.iter().map(|&d| mask.to_device(d)).collect();
        let mut h = x.shallow_clone();
        for layer in &self.layers {
            h = h.to_device(self.devices[layer.device]);
            let normed = rms_norm(&h, &layer.attention_norm, self.params.norm_eps);
            let attended = h.shallow_clone() + self.attention(layer, &normed, &masks[layer.device]);
            let ff = rms_norm(&attended, &layer.ffn_norm, self.params.norm_eps);
            let ff = ff.linear(&layer.w1, None::<Tensor>).silu() * ff.linear(&layer.w3, None::<Tensor>);
            h = &attended + ff.linear(&layer.w2, None::<Tensor>);
        }
        let h = rms_norm(&h, &self.norm, self.params.norm_eps);
        h.linear(&self.output, None::<Tensor>).to_kind(Kind::Float).select(1, seq - 1)
    }

    fn attention(&self, layer: &Layer, x: &Tensor, mask: &Tensor) -> Tensor {
        let freqs = &self.freqs[layer.device];
        let p = &self.params;
        let size = x.size();
        let (b, s) = (size[0], size[1]);
        let (heads, kv_heads, hd) = (p.n_heads as i64, p.kv_heads() as i64, p.head_dim() as i64);
        let q = x.linear(&layer.wq, None::<Tensor>).view([b, s, heads, hd]);
        let k = x.linear(&layer.wk, None::<Tensor>).view([b, s, kv_heads, hd]);
        let v = x.linear(&layer.wv, None::<Tensor>).view([b, s, kv_heads, hd]);
        let q = rotate(&q, freqs);
        let k = repeat_kv(&rotate(&k, freqs), heads / kv_heads);
        let v = repeat_kv(&v, heads / kv_heads);
        let (q, k, v) = (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2));
        let scores = q.matmul(&k.transpose(2, 3)) / (hd as f64).sqrt();
        let scores = (scores + mask).to_kind(Kind::Float).softmax(-1, None::<Kind>).to_kind(q.kind());
        let out = scores.matmul(&v).transpose(1, 2).contiguous().view([b, s, -1]);
        out.linear(&layer.wo, None::<Tensor>)
    }
}

/// Rotary embeddings on `[b, s, heads, head_dim]`, computed in float32 as upstream does.
fn rotate(x: &Tensor, freqs: &Tensor) -> Tensor {
    let size = x.size();
    let (b, s, heads, hd) = (size[0], size[1], size[2], size[3]);
    let xs = x.to_kind(Kind::Float).reshape([b, s, heads, hd / 2, 2]);
    let f = freqs.narrow(0, 0, s).view([1, s, 1, hd / 2, 2]);
    let (x0, x1) = (xs.select(-1, 0), xs.select(-1, 1));
    let (f0, f1) = (f.select(-1, 0), f.select(-1, 1));
    let rotated = Tensor::stack(&[&x0 * &f0 - &x1 * &f1, &x1 * &f0 + &x0 * &f1], -1);
    rotated.flatten(3, -1).to_kind(x.kind())
}

fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let xf = x.to_kind(Kind::Float);
    let normed = &xf * (xf.pow_tensor_scalar(2).mean_dim(-1, true, None::<Kind>) + eps).rsqrt();
    normed.to_kind(x.kind()) * weight
}

fn repeat_kv(x: &Tensor, n_rep: i64) -> Tensor {
    if n_rep == 1 {
        return x.shallow_clone();
    }
    let size = x.size();
    let (b, s, kv, hd) = (size[0], size[1], size[2], size[3]);
    x.unsqueeze(3).expand([b, s, kv, n_rep, hd], false).reshape([b, s, kv * n_rep, hd])
}

/// `precompute_freqs_cis(head_dim, seq_len, rope_theta, use_scaled_rope)` as `[seq, hd/2, 2]`.
fn rotary_frequencies(p: &Params) -> Tensor {
    let hd = p.head_dim() as i64;
    let exponents =
        Tensor::arange_start_step(0, hd, 2, (Kind::Int64, Device::Cpu)).narrow(0, 0, hd / 2).to_kind(Kind::Float)
            / hd as f64;
    let mut freqs = Tensor::pow_scalar(p.rope_theta, &exponents).reciprocal();
    if p.use_scaled_rope {
        freqs = scale_frequencies(&freqs);
    }
    let t = Tensor::arange(p.seq_len as i64, (Kind::Float, Device::Cpu));
    let angles = t.outer(&freqs);
    Tensor::polar(&angles.ones_like(), &angles).view_as_real()
}

/// Llama 3.1's RoPE scaling (`apply_scaling`), in double precision per frequency as upstream's
/// Python loop does.
fn scale_frequencies(freqs: &Tensor) -> Tensor {
    let (scale, low, high, old_context) = (8.0, 1.0, 4.0, 8192.0);
    let (low_wavelen, high_wavelen) = (old_context / low, old_context / high);
    let n = freqs.size()[0] as usize;
    let mut values = vec![0f32; n];
    freqs.copy_data(&mut values, n);
    let scaled: Vec<f32> = values
        .iter()
        .map(|&f| {
            let f = f64::from(f);
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let v = if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / scale
            } else {
                let smooth = (old_context / wavelen - low) / (high - low);
                (1.0 - smooth) * f / scale + smooth * f
            };
            v as f32
        })
        .collect();
    Tensor::from_slice(&scaled)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_slices_fit_and_large_parameters_tile_and_rotate() {
        let pool: Vec<f32> = (0..10).map(|i| i as f32).collect();
        assert_eq!(parameter_values(&pool, 3, 7), [7.0, 8.0, 9.0]); // 7 % (10 - 3 + 1) = 7
        assert_eq!(parameter_values(&pool, 3, 8), [0.0, 1.0, 2.0]);
        // 23 values: two full tiles and 3 more (0..9, 0..9, 0..2), rotated left by 5.
        let v = parameter_values(&pool, 23, 5);
        assert_eq!(&v[..6], &[5.0, 6.0, 7.0, 8.0, 9.0, 0.0]);
        assert_eq!(&v[13..], &[8.0, 9.0, 0.0, 1.0, 2.0, 0.0, 1.0, 2.0, 3.0, 4.0]);
    }

    #[test]
    fn name_hash_is_the_first_eight_hex_digits() {
        let digest = Sha256::digest(b"abc_norm.weight");
        let hex: String = digest.iter().take(4).map(|b| format!("{b:02x}")).collect();
        assert_eq!(name_hash("abc", "norm.weight"), u64::from_str_radix(&hex, 16).unwrap());
    }
}
