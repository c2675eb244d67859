//! The building blocks the Qwen architectures share: linear layers, RMSNorm, rotary embeddings,
//! the SwiGLU MLP and causal attention over a batch of sequences.
//!
//! Every op follows transformers' in order and dtype (RMSNorm and rotary frequencies in float32,
//! cast back to the model dtype; softmax inside libtorch's scaled-dot-product attention), so a
//! forward here and one there run the same kernels on the same values. On the CPU in float32 two
//! places sum in another order, within float32's rounding of transformers' values: matmuls on
//! oneDNN (see [`linear`]) and the attention of fresh sequences on a kernel of ours
//! (`cpu_attention`).
//!
//! Tokens are flattened: a step over several sequences is one `[tokens, hidden]` matrix for every
//! projection and MLP (batched matmuls), and only attention looks at sequence boundaries.

use tch::{Device, Kind, Tensor};

use crate::batch::{Batch, StepCache};
use crate::checkpoint::{Dtype, Loader};
use crate::config::{Rope, RopeScaling};
use crate::cpu_attention::{self, Heads};
use crate::cpu_threads;
use crate::error::LoadError;
use crate::packed_matmul::to_host as host;

/// A linear layer; its weight as the checkpoint stores it (see [`Weight`]).
pub struct Linear {
    /// Output slices applied to the same input, their outputs concatenated: one weight (dense
    /// projections loaded together are fused into one at load) or, for FP8 ones, one per
    /// projection (their scaling blocks need not line up across the seam).
    parts: Vec<Weight>,
    bias: Option<Tensor>,
}

/// A linear layer's weight.
pub enum Weight {
    /// In the model dtype.
    Dense(Tensor),
    /// FP8 (e4m3) as stored, with a float32 factor per `block` of `[rows, columns]`
    /// (`weight_scale_inv`, DeepSeek's and MiniMax's block format; DeepSeek-V4's `scale`, a
    /// power of two stored as its UE8M0 exponent): the bytes on the device stay FP8 and are
    /// widened to `kind` only for the matmul of one forward.
    Fp8Block { weight: Tensor, scale_inv: Tensor, block: [i64; 2], kind: Kind },
    /// MXFP4 (DeepSeek-V4's routed experts): e2m1 codes two a byte, uint8 `[rows, columns /
    /// 2]` (the even column's code in the low nibble), and a power of two per 32 columns, its
    /// UE8M0 exponent, uint8 `[rows, columns / 32]`; kept so, widened like FP8 blocks.
    Mxfp4 { codes: Tensor, exponents: Tensor, kind: Kind },
}

/// Columns per MXFP4 factor.
pub const MXFP4_GROUP: i64 = 32;

impl Weight {
    /// `weight` under `w`, `[out_dim, in_dim]`, as stored: dense, FP8 where its block factors
    /// (`weight_scale_inv`, or `scale`) sit beside it, MXFP4 where FP4 codes do.
    pub fn load(w: &Loader, out_dim: i64, in_dim: i64) -> Result<Self, LoadError> {
        let name = w.name("weight");
        let Some(factors) = ["weight_scale_inv", "scale"].into_iter().find(|f| w.contains(f)) else {
            return Ok(Self::Dense(w.tensor("weight", &[out_dim, in_dim])?));
        };
        if matches!(w.dtype("weight"), Some(Dtype::I8 | Dtype::U8 | Dtype::F4)) {
            if in_dim % MXFP4_GROUP != 0 || in_dim % 2 != 0 {
                return Err(LoadError::InvalidConfig(format!(
                    "{name}: MXFP4 takes a factor per {MXFP4_GROUP} columns, and it has {in_dim}"
                )));
            }
            if w.dtype(factors) != Some(Dtype::F8_E8M0) {
                return Err(LoadError::TensorDtype {
                    name: w.name(factors),
                    dtype: format!("{:?} for MXFP4 factors (UE8M0 expected)", w.dtype(factors)),
                });
            }
            let codes = w.fp4("weight", out_dim, in_dim)?;
            let exponents = w.stored(factors, &[out_dim, in_dim / MXFP4_GROUP])?;
            return Ok(Self::Mxfp4 { codes, exponents, kind: w.kind() });
        }
        let block = w.fp8_block().ok_or_else(|| {
            LoadError::InvalidConfig(format!(
                "{name} is scaled ({factors}) but config.json's quantization_config gives no weight_block_size"
            ))
        })?;
        let weight = w.stored("weight", &[out_dim, in_dim])?;
        if weight.kind() != Kind::Float8e4m3fn {
            return Err(LoadError::TensorDtype { name, dtype: format!("{:?} beside a {factors}", weight.kind()) });
        }
        let blocks = [(out_dim + block[0] - 1) / block[0], (in_dim + block[1] - 1) / block[1]];
        // UE8M0 factors become their powers of two here (small: one per block).
        let scale_inv = w.with_kind(Kind::Float).tensor(factors, &blocks)?;
        Ok(Self::Fp8Block { weight, scale_inv, block, kind: w.kind() })
    }

    /// The weight in the model dtype: FP8 blocks or MXFP4 codes times their factors (in
    /// float32, as the checkpoint's writer scaled them), then rounded once.
    pub fn widened(&self) -> Tensor {
        match self {
            Self::Dense(w) => w.shallow_clone(),
            Self::Fp8Block { weight, scale_inv, block, kind } => widen_blocks(weight, scale_inv, *block, *kind),
            Self::Mxfp4 { codes, exponents, kind } => widen_mxfp4(codes, exponents, *kind),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Self::Dense(w) | Self::Fp8Block { weight: w, .. } | Self::Mxfp4 { codes: w, .. } => w.device(),
        }
    }

    /// `[out_dim, in_dim]`.
    pub fn shape(&self) -> [i64; 2] {
        match self {
            Self::Dense(w) | Self::Fp8Block { weight: w, .. } => [w.size()[0], w.size()[1]],
            Self::Mxfp4 { codes, .. } => [codes.size()[0], 2 * codes.size()[1]],
        }
    }

    /// Whether it stays quantised (FP8, MXFP4) on the device.
    pub fn is_quantised(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }
}

/// E2M1's value of each code (`[codes]`, integers 0–15): the top bit the sign, then two
/// exponent bits and one of mantissa, exponent 0 subnormal (0 or 0.5), else
/// `2^(exponent - 1) · (1 + mantissa / 2)`: 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives.
fn e2m1_values(codes: &Tensor) -> Tensor {
    let bits =
        |shift: i64, mask: i64| codes.bitwise_right_shift_tensor_scalar(shift).bitwise_and(mask).to_kind(Kind::Float);
    let (sign, exponent, mantissa) = (bits(3, 1), bits(1, 3), bits(0, 1));
    let normal = (&exponent - 1.0).exp2() * (&mantissa * 0.5 + 1.0);
    let magnitude = normal.where_self(&exponent.gt(0), &(mantissa * 0.5));
    magnitude * (sign * -2.0 + 1.0)
}

/// MXFP4 weights `[..., rows, columns]` from their codes `[..., rows, columns / 2]` and UE8M0
/// exponents `[..., rows, columns / 32]`, in float32 (each code's value times its group's
/// power of two: exact), rounded once to `kind`. Each byte is looked up once in a table of the
/// 256 bytes' two values, made on the codes' device (nothing is copied in from the host).
pub fn widen_mxfp4(codes: &Tensor, exponents: &Tensor, kind: Kind) -> Tensor {
    let size = codes.size();
    let d = size.len();
    let columns = 2 * size[d - 1];
    let bytes = Tensor::arange(256, (Kind::Int, codes.device()));
    // The even column's code is the low nibble.
    let pairs = Tensor::stack(
        &[e2m1_values(&bytes.bitwise_and(0xF)), e2m1_values(&bytes.bitwise_right_shift_tensor_scalar(4))],
        -1,
    );
    let mut grouped = [&size[..d - 1], &[columns / MXFP4_GROUP, MXFP4_GROUP][..]].concat();
    let values = pairs.index_select(0, &codes.flatten(0, -1).to_kind(Kind::Int)).view(grouped.as_slice());
    let factors = crate::checkpoint::e8m0_factors(exponents).unsqueeze(-1);
    grouped.truncate(d - 1);
    grouped.push(columns);
    (values * factors).view(grouped.as_slice()).to_kind(kind)
}

/// FP8 weights `[..., rows, columns]` times their float32 factors `[..., rows/b0, columns/b1]`
/// (one per `block` of `[b0, b1]`, partial at the edges), in float32, rounded once to `kind`.
/// Where the blocks tile the weight, each factor multiplies its block by broadcasting, in place
/// on the widened copy: nothing as large as the weight is made but that float32 copy (and the
/// result, in a narrower `kind`). Partial edge blocks take the factors expanded to the weight's
/// shape first. Either way each weight is `f32(w) * factor`, rounded once: the same bits.
pub fn widen_blocks(weight: &Tensor, scale_inv: &Tensor, block: [i64; 2], kind: Kind) -> Tensor {
    let size = weight.size();
    let d = size.len();
    let (rows, columns) = (size[d - 2], size[d - 1]);
    let lead = &size[..d - 2];
    let mut wide = weight.to_kind(Kind::Float);
    if rows % block[0] == 0 && columns % block[1] == 0 {
        let blocks = [rows / block[0], block[0], columns / block[1], block[1]];
        let factors = [rows / block[0], 1, columns / block[1], 1];
        let _ =
            wide.view(&[lead, &blocks[..]].concat()[..]).g_mul_(&scale_inv.view(&[lead, &factors[..]].concat()[..]));
    } else {
        let factors = scale_inv
            .repeat_interleave_self_int(block[0], d as i64 - 2, None::<i64>)
            .narrow(d as i64 - 2, 0, rows)
            .repeat_interleave_self_int(block[1], d as i64 - 1, None::<i64>)
            .narrow(d as i64 - 1, 0, columns);
        let _ = wide.g_mul_(&factors);
    }
    wide.to_kind(kind)
}

impl Linear {
    pub fn load(w: &Loader, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self, LoadError> {
        let weight = Weight::load(w, out_dim, in_dim)?;
        let bias = if bias { Some(w.tensor("bias", &[out_dim])?) } else { None };
        Ok(Self { parts: vec![weight], bias })
    }

    /// Several projections of the same input as one layer (q/k/v, an MLP's gate and up): dense
    /// weights (and biases) stacked along the output dimension into one matmul.
    pub fn load_fused(parts: &[(Loader, i64)], in_dim: i64, bias: bool) -> Result<Self, LoadError> {
        let weights = parts.iter().map(|(w, out)| Weight::load(w, *out, in_dim)).collect::<Result<Vec<_>, _>>()?;
        let bias = if bias {
            let biases = parts.iter().map(|(w, out)| w.tensor("bias", &[*out])).collect::<Result<Vec<_>, _>>()?;
            Some(Tensor::cat(&biases, 0))
        } else {
            None
        };
        Ok(Self { bias, ..Self::from_weights(weights) })
    }

    pub fn from_weight(weight: Tensor) -> Self {
        Self { parts: vec![Weight::Dense(weight)], bias: None }
    }

    /// Output slices of one input without a bias: fused into one matmul when all are dense.
    pub fn from_weights(weights: Vec<Weight>) -> Self {
        let parts = if weights.iter().all(|w| matches!(w, Weight::Dense(_))) {
            let dense: Vec<Tensor> = weights.iter().map(Weight::widened).collect();
            vec![Weight::Dense(Tensor::cat(&dense, 0))]
        } else {
            weights
        };
        Self { parts, bias: None }
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.parts.as_slice() {
            [one] => linear(x, &one.widened(), self.bias.as_ref()),
            parts => {
                let outputs: Vec<Tensor> = parts.iter().map(|p| linear(x, &p.widened(), None)).collect();
                let out = Tensor::cat(&outputs, -1);
                match &self.bias {
                    Some(bias) => out + bias,
                    None => out,
                }
            }
        }
    }

    pub fn device(&self) -> Device {
        self.parts[0].device()
    }

    /// Its whole weight `[out, in]` in the model dtype (FP8 and MXFP4 parts widened), for a
    /// caller that multiplies by it otherwise than `x · weightᵀ`.
    pub fn widened_weight(&self) -> Tensor {
        match self.parts.as_slice() {
            [one] => one.widened(),
            parts => Tensor::cat(&parts.iter().map(Weight::widened).collect::<Vec<_>>(), 0),
        }
    }

    /// Whether any of its weights stays quantised (FP8, MXFP4) on the device.
    pub fn is_quantised(&self) -> bool {
        self.parts.iter().any(Weight::is_quantised)
    }
}

/// `x · weightᵀ + bias` for `x` `[rows, in]` and `weight` `[out, in]`: libtorch's `linear`,
/// except for up to [`ONEDNN_MAX_ROWS`] rows in float32 on the CPU, which run through oneDNN
/// (`mkldnn_linear`, the library vLLM's CPU build runs its linear layers on). libtorch's own
/// float32 `linear` calls MKL's sgemm, which copies the whole weight into its packed layout on
/// every call: for a few rows that copy is most of the work (profiling an 8-sequence decode,
/// `mkl_blas_def_sgemm_scopy_right16_bdz` took 38% of the samples, the multiply itself 8%), and
/// its single-row path is slow on a wide weight (a 32000-token LM head: 5.4 ms against oneDNN's
/// 1.8 on two cores). With more rows the copy is shared by enough of them that MKL is as fast or
/// faster (see the limit). GPUs, bfloat16 and a libtorch without oneDNN keep `linear`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Tensor {
    let rows = if x.dim() == 2 { x.size()[0] } else { 0 };
    if !(1..=onednn_max_rows()).contains(&rows) || weight.kind() != Kind::Float || !on_onednn(x) {
        return x.linear(weight, bias);
    }
    x.contiguous().to_mkldnn().mkldnn_linear(&weight.contiguous(), bias).to_dense(None, false)
}

/// The most rows [`linear`] sends to oneDNN where MKL runs its own AVX-512 kernels (Intel) or
/// the CPU has none (AVX2: Zen 3 and older). Measured in the engine on the benchmark's random
/// Qwen3 (hidden 512, 8 layers, vocab 32000; 2 cores, 2026-12-05), each matmul on oneDNN
/// against MKL: one sequence decodes 1.6x as fast, 8 together 1.45x, 32 together 1.35x, a
/// 128-token prompt and a PoC v2 batch of 128 rows 1.2x; at 256 rows it is mixed (a prompt 1.1x,
/// a PoC v2 batch 0.94x), at 512 and 2048 MKL is 2-9% faster. A MoE's expert groups stay on
/// libtorch's grouped matmul: their weights are small, and oneDNN one expert at a time gained
/// nothing in decoding and lost ~7% in a prefill.
pub const ONEDNN_MAX_ROWS: i64 = 128;

/// The most rows [`linear`] sends to oneDNN on this CPU ([`onednn_max_rows_for`], asked once).
fn onednn_max_rows() -> i64 {
    static MAX: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *MAX.get_or_init(|| {
        let vendor = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| cpu_vendor(&info));
        #[cfg(target_arch = "x86_64")]
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        let avx512 = false;
        onednn_max_rows_for(vendor.as_deref(), avx512)
    })
}

/// Every row goes to oneDNN on a CPU with AVX-512 that is not Intel's: MKL runs its generic
/// kernels there (`mkl_blas_def_sgemm_*` in a profile on AMD EPYC, `mkl_blas_avx512_sgemm_*` on
/// an Intel Xeon), while oneDNN uses AVX-512. On two Zen 4 cores (2026-12-06, the dense bench
/// model, four alternated rounds) a 512-token prefill ran ~1.25x as fast and a PoC v2 forward
/// of 2048 rows ~1.08x with every matmul on oneDNN. Elsewhere [`ONEDNN_MAX_ROWS`].
pub fn onednn_max_rows_for(vendor: Option<&str>, avx512: bool) -> i64 {
    match vendor {
        Some(vendor) if avx512 && vendor != "GenuineIntel" => i64::MAX,
        _ => ONEDNN_MAX_ROWS,
    }
}

/// The CPU's vendor (`GenuineIntel`, `AuthenticAMD`, ...) from `/proc/cpuinfo`'s text.
fn cpu_vendor(cpuinfo: &str) -> Option<String> {
    cpuinfo.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key.trim() == "vendor_id").then(|| value.trim().to_string())
    })
}

/// Whether `x` is where [`linear`] may use oneDNN: float32 on the CPU, and this libtorch has it
/// (asked once).
fn on_onednn(x: &Tensor) -> bool {
    static ONEDNN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    x.device() == Device::Cpu && x.kind() == Kind::Float && *ONEDNN.get_or_init(tch::utils::has_mkldnn)
}

pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Loader, dim: i64, eps: f64) -> Result<Self, LoadError> {
        Ok(Self { weight: w.tensor("weight", &[dim])?, eps })
    }

    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// transformers' `Qwen2RMSNorm` (and vLLM's `rms_norm`): normalise in float32, back to the
    /// input dtype, then scale.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        self.scale(x.to_kind(Kind::Float), x.kind())
    }

    /// vLLM's fused add-RMSNorm: `x + residual` summed in float32 becomes the new residual (in
    /// the input dtype) and is normalised as it is, unrounded. Returns `(normed, residual)`.
    pub fn forward_add(&self, x: &Tensor, residual: &Tensor) -> (Tensor, Tensor) {
        let kind = x.kind();
        let sum = x.to_kind(Kind::Float) + residual.to_kind(Kind::Float);
        let residual = sum.to_kind(kind);
        (self.scale(sum, kind), residual)
    }

    fn scale(&self, x32: Tensor, kind: Kind) -> Tensor {
        let variance = x32.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        // `normed` is this call's own tensor, so the weight multiplies it in place (the same
        // products as `weight * normed`; one activation-sized buffer less per norm).
        let mut normed = (x32 * (variance + self.eps).rsqrt()).to_kind(kind);
        normed *= &self.weight;
        normed
    }
}

/// Rotary position embeddings: `inv_freq` in float32 as transformers computes it per rope type.
pub struct Rotary {
    inv_freq: Tensor,
    /// YaRN's scale on cos/sin (1 otherwise).
    attention_scaling: f64,
    /// Each frequency on a pair of neighbouring dimensions (DeepSeek-V4's interleaved rotary)
    /// rather than on dimensions `i` and `i + half` (the Qwen family's, MiniMax-M2's).
    interleaved: bool,
}

impl Rotary {
    pub fn new(rope: &Rope, head_dim: i64) -> Self {
        let float = (Kind::Float, Device::Cpu);
        let exponents = Tensor::arange_start_step(0, head_dim, 2, float) / head_dim as f64;
        let pos_freqs = Tensor::pow_scalar(rope.theta, &exponents);
        let (inv_freq, attention_scaling) = match &rope.scaling {
            RopeScaling::Default => (pos_freqs.reciprocal(), 1.0),
            RopeScaling::Linear { factor } => (pos_freqs.reciprocal() / *factor, 1.0),
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings,
                beta_fast,
                beta_slow,
                attention_factor,
                mscale,
                mscale_all_dim,
                truncate,
            } => {
                let get_mscale = |scale: f64, m: f64| if scale <= 1.0 { 1.0 } else { 0.1 * m * scale.ln() + 1.0 };
                let attention = attention_factor.unwrap_or(match (mscale, mscale_all_dim) {
                    (Some(m), Some(a)) if *m != 0.0 && *a != 0.0 => get_mscale(*factor, *m) / get_mscale(*factor, *a),
                    _ => get_mscale(*factor, 1.0),
                });
                let dim = head_dim as f64;
                let correction_dim = |rotations: f64| {
                    dim * (original_max_position_embeddings / (rotations * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * rope.theta.ln())
                };
                let (mut low, mut high) = (correction_dim(*beta_fast), correction_dim(*beta_slow));
                if *truncate {
                    (low, high) = (low.floor(), high.ceil());
                }
                let (low, mut high) = (low.max(0.0), high.min(dim - 1.0));
                if low == high {
                    high += 0.001;
                }
                let ramp = ((Tensor::arange(head_dim / 2, float) - low) / (high - low)).clamp(0.0, 1.0);
                let extrapolation_factor = 1.0 - ramp;
                let extrapolation = pos_freqs.reciprocal();
                let interpolation = (pos_freqs * *factor).reciprocal();
                let inv = &interpolation * (1.0 - &extrapolation_factor) + &extrapolation * &extrapolation_factor;
                (inv, attention)
            }
        };
        Self { inv_freq: inv_freq.to_kind(Kind::Float), attention_scaling, interleaved: false }
    }

    /// The same frequencies laid out for an interleaved rotation: `cos_sin` then gives
    /// frequency `i` at dimensions `2i` and `2i + 1`.
    pub fn interleaved(self) -> Self {
        Self { interleaved: true, ..self }
    }

    /// `(cos, sin)` for `positions` (int64 `[tokens]`), `[tokens, 1, head_dim]` in `kind`.
    pub fn cos_sin(&self, positions: &Tensor, kind: Kind) -> (Tensor, Tensor) {
        let device = positions.device();
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.to_device(device);
        let emb = if self.interleaved {
            freqs.repeat_interleave_self_int(2, -1, None::<i64>)
        } else {
            Tensor::cat(&[&freqs, &freqs], -1)
        };
        let (mut cos, mut sin) = (emb.cos(), emb.sin());
        if self.attention_scaling != 1.0 {
            cos *= self.attention_scaling;
            sin *= self.attention_scaling;
        }
        (cos.to_kind(kind).unsqueeze(1), sin.to_kind(kind).unsqueeze(1))
    }
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

/// `x * cos + rotate_half(x) * sin` on `[tokens, heads, head_dim]`. Where `cos` is narrower
/// than a head (partial rotary: MiniMax-M2's `rotary_dim` 64 of `head_dim` 128), only the first
/// dimensions of each head rotate and the rest pass as they are, as transformers'
/// `apply_rotary_pos_emb` splits them.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let rotary = cos.size()[cos.dim() - 1];
    let head_dim = x.size()[x.dim() - 1];
    if rotary == head_dim {
        return x * cos + rotate_half(x) * sin;
    }
    let rotated = x.narrow(-1, 0, rotary);
    let rotated = &rotated * cos + rotate_half(&rotated) * sin;
    Tensor::cat(&[rotated, x.narrow(-1, rotary, head_dim - rotary)], -1)
}

/// SwiGLU: `down(silu(gate(x)) * up(x))`, gate and up as one matmul.
pub struct Mlp {
    gate_up: Linear,
    down: Linear,
    intermediate: i64,
    /// DeepSeek-V4's `swiglu_limit`: the gate clamped above, the up projection on both sides,
    /// before they meet.
    limit: Option<f64>,
}

/// The names of an MLP's gate, up and down projections in a checkpoint.
pub type MlpNames = [&'static str; 3];

/// Qwen's (and Llama's) names.
pub const QWEN_MLP: MlpNames = ["gate_proj", "up_proj", "down_proj"];

/// Mixtral's experts' names, which MiniMax-M2's checkpoints keep: `w1` gate, `w3` up, `w2` down.
pub const MIXTRAL_EXPERT: MlpNames = ["w1", "w3", "w2"];

impl Mlp {
    pub fn load(w: &Loader, hidden: i64, intermediate: i64) -> Result<Self, LoadError> {
        let [gate, up, down] = QWEN_MLP;
        Ok(Self {
            gate_up: Linear::load_fused(&[(w.at(gate), intermediate), (w.at(up), intermediate)], hidden, false)?,
            down: Linear::load(&w.at(down), intermediate, hidden, false)?,
            intermediate,
            limit: None,
        })
    }

    /// The same MLP with its gate clamped to at most `limit` and its up projection to
    /// `[-limit, limit]` (DeepSeek-V4's `swiglu_limit`).
    pub fn with_swiglu_limit(self, limit: f64) -> Self {
        Self { limit: Some(limit), ..self }
    }

    /// An MLP of these projections (`gate` and `up` `[intermediate, hidden]`, `down` the other
    /// way round).
    pub fn from_weights(gate: Weight, up: Weight, down: Weight) -> Self {
        let intermediate = gate.shape()[0];
        Self {
            gate_up: Linear::from_weights(vec![gate, up]),
            down: Linear::from_weights(vec![down]),
            intermediate,
            limit: None,
        }
    }

    /// Whether any of its weights stays quantised on the device.
    pub fn is_quantised(&self) -> bool {
        self.gate_up.is_quantised() || self.down.is_quantised()
    }

    pub fn forward(&self, x: &Tensor) -> Tensor {
        let gate_up = self.gate_up.forward(x);
        if let Some(limit) = self.limit {
            clamp_swiglu(&gate_up, self.intermediate, limit);
        }
        let mut gate = gate_up.narrow(-1, 0, self.intermediate);
        let up = gate_up.narrow(-1, self.intermediate, self.intermediate);
        // SiLU in place on the gate's half of this call's own `gate_up` (the same values as
        // `gate.silu()`, without a buffer as large as the half: at a PoC v2 batch of 2048 rows
        // that is 12 MiB written and read once less per layer); the product is contiguous, as
        // the down projection takes it.
        let _ = gate.silu_();
        self.down.forward(&(gate * up))
    }
}

/// DeepSeek-V4's `swiglu_limit` on a gate/up product `[rows, 2 × intermediate]` (gate first), in
/// place: the gate clamped to at most `limit`, the up half to `[-limit, limit]`.
pub fn clamp_swiglu(gate_up: &Tensor, intermediate: i64, limit: f64) {
    let _ = gate_up.narrow(-1, 0, intermediate).clamp_max_(limit);
    let _ = gate_up.narrow(-1, intermediate, intermediate).clamp_(-limit, limit);
}

/// Shapes of one attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
}

/// Grouped-query self-attention with rotary positions: Qwen2's (biased q/k/v projections),
/// Qwen3's (RMSNorm over each head's queries and keys before the rotation) and MiniMax-M2's
/// (RMSNorm over all heads' queries, and all heads' keys, at once).
pub struct Attention {
    qkv: Linear,
    o: Linear,
    qk_norm: QkNorms,
    shape: AttentionShape,
}

/// The norms of a layer's queries and keys, as loaded.
enum QkNorms {
    None,
    /// Qwen3's, per head: one norm over the queries' and keys' heads together (`[heads +
    /// kv_heads, head_dim]`, the query weight on the query heads and the key weight on the
    /// others), each head's values normalised apart as with two, in one pass.
    PerHead(RmsNorm),
    /// MiniMax-M2's, over all query heads at once and all key heads at once.
    AllHeads(RmsNorm, RmsNorm),
}

/// Where queries and keys are RMS-normalised before the rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QkNorm {
    /// Each head's `head_dim` values apart, one weight of `head_dim` shared by the heads (Qwen3).
    PerHead { eps: f64 },
    /// A token's queries (`heads * head_dim`) as one vector, and its keys as another, each with
    /// a weight as wide (MiniMax-M2's `qk_norm_type: per_layer`).
    AllHeads { eps: f64 },
}

/// What distinguishes one architecture's attention from another's.
#[derive(Debug, Clone, Copy)]
pub struct AttentionKind {
    /// Biases on q/k/v (Qwen2 always; Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Qwen3 `attention_bias`).
    pub o_bias: bool,
    /// RMSNorm of queries and keys (Qwen3, MiniMax-M2).
    pub qk_norm: Option<QkNorm>,
}

impl Attention {
    pub fn load(w: &Loader, hidden: i64, shape: AttentionShape, kind: AttentionKind) -> Result<Self, LoadError> {
        let AttentionShape { heads, kv_heads, head_dim } = shape;
        let qkv = Linear::load_fused(
            &[
                (w.at("q_proj"), heads * head_dim),
                (w.at("k_proj"), kv_heads * head_dim),
                (w.at("v_proj"), kv_heads * head_dim),
            ],
            hidden,
            kind.qkv_bias,
        )?;
        let o = Linear::load(&w.at("o_proj"), heads * head_dim, hidden, kind.o_bias)?;
        let qk_norm = match kind.qk_norm {
            Some(QkNorm::PerHead { eps }) => {
                let q_norm = RmsNorm::load(&w.at("q_norm"), head_dim, eps)?;
                let k_norm = RmsNorm::load(&w.at("k_norm"), head_dim, eps)?;
                let weight = Tensor::cat(
                    &[
                        q_norm.weight.expand([heads, head_dim], false),
                        k_norm.weight.expand([kv_heads, head_dim], false),
                    ],
                    0,
                );
                QkNorms::PerHead(RmsNorm { weight, eps })
            }
            Some(QkNorm::AllHeads { eps }) => QkNorms::AllHeads(
                RmsNorm::load(&w.at("q_norm"), heads * head_dim, eps)?,
                RmsNorm::load(&w.at("k_norm"), kv_heads * head_dim, eps)?,
            ),
            None => QkNorms::None,
        };
        Ok(Self { qkv, o, qk_norm, shape })
    }

    /// Whether its projections' weights are FP8 on the device.
    pub fn is_quantised(&self) -> bool {
        self.qkv.is_quantised() && self.o.is_quantised()
    }

    /// `x` `[tokens, hidden]` → `[tokens, hidden]`.
    pub fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor {
        let AttentionShape { heads, kv_heads, head_dim } = self.shape;
        let tokens = x.size()[0];
        let qkv = self.qkv.forward(x);
        if caches.iter().all(Option::is_none)
            && let Some(attended) = self.forward_on_cpu_kernel(&qkv, (cos, sin), batch)
        {
            return self.o.forward(&attended);
        }
        let v = qkv.narrow(-1, (heads + kv_heads) * head_dim, kv_heads * head_dim).view([tokens, kv_heads, head_dim]);
        // Queries and keys sit side by side in `qkv`: where their norms allow, they are
        // normalised and rotated as one `[tokens, heads + kv_heads, head_dim]` tensor (the
        // same values as apart, in half the ops; a decode step's ops are much of its time).
        let qk = || qkv.narrow(-1, 0, (heads + kv_heads) * head_dim).view([tokens, heads + kv_heads, head_dim]);
        let rotate_apart = |qk: Tensor| {
            let qk = apply_rotary(&qk, cos, sin);
            (qk.narrow(1, 0, heads), qk.narrow(1, heads, kv_heads))
        };
        let (q, k) = match &self.qk_norm {
            QkNorms::None => rotate_apart(qk()),
            QkNorms::PerHead(qk_norm) => rotate_apart(qk_norm.forward(&qk())),
            QkNorms::AllHeads(q_norm, k_norm) => {
                let q = q_norm.forward(&qkv.narrow(-1, 0, heads * head_dim)).view([tokens, heads, head_dim]);
                let k = k_norm.forward(&qkv.narrow(-1, heads * head_dim, kv_heads * head_dim));
                (apply_rotary(&q, cos, sin), apply_rotary(&k.view([tokens, kv_heads, head_dim]), cos, sin))
            }
        };
        let out = attention(&q, &k, &v, self.shape, layer, batch, caches);
        self.o.forward(&out)
    }

    /// A PoC v2 batch (fresh sequences of one length that keep no cache) in float32 on the CPU,
    /// where [`cpu_attention`] applies and the queries and keys take Qwen3's per-head norms or
    /// none, rotated over the whole head: the projections are copied out of libtorch once, and
    /// normalised, rotated and attended there (`cpu_attention::QkTransform::apply`, the
    /// same arithmetic as the ops of [`Self::forward`] but the norms' sums) before the output
    /// comes back once. `[tokens, heads × head_dim]`; `None` where it does not apply.
    fn forward_on_cpu_kernel(&self, qkv: &Tensor, (cos, sin): (&Tensor, &Tensor), batch: &Batch) -> Option<Tensor> {
        let AttentionShape { heads, kv_heads, head_dim } = self.shape;
        let (sequences, len) = batch.uniform_fresh()?;
        let norm = match &self.qk_norm {
            QkNorms::None => None,
            QkNorms::PerHead(norm) => Some(norm),
            QkNorms::AllHeads(..) => return None,
        };
        if cos.size().last() != Some(&head_dim) || cos.kind() != Kind::Float {
            return None;
        }
        let threads = cpu_attention_threads(qkv, head_dim, sequences, len)?;
        let mut projected = host(qkv);
        let (cos, sin) = (host(cos), host(sin));
        let weight = norm.map(|n| host(&n.weight));
        let transform = cpu_attention::QkTransform {
            norm: weight.as_deref().zip(norm.map(|n| n.eps as f32)),
            cos: &cos,
            sin: &sin,
        };
        let (d, stride) = (head_dim as usize, ((heads + 2 * kv_heads) * head_dim) as usize);
        let qk_heads = (heads + kv_heads) as usize;
        transform.apply(&mut projected, cpu_attention::QkvRows { stride, qk_heads, head_dim: d }, threads);
        let at = |offset: i64| Heads { data: &projected, stride, offset: (offset * head_dim) as usize };
        let attention = cpu_attention::Causal {
            q: at(0),
            k: at(heads),
            v: at(heads + kv_heads),
            shape: kernel_shape(self.shape, sequences, len),
            scale: (head_dim as f64).powf(-0.5) as f32,
        };
        let out = attention.attend(threads);
        Some(Tensor::from_slice(&out).view([sequences * len, heads * head_dim]))
    }
}

/// Causal attention of a batch's new tokens over each sequence's past and present.
///
/// `q` is `[tokens, heads, head_dim]`, `k`/`v` `[tokens, kv_heads, head_dim]`, already rotated;
/// the result is `[tokens, heads * head_dim]`. Keys and values are appended to the sequences'
/// caches where they have one. Sequences of equal length with no past (a PoC batch, a batch of
/// fresh prompts of one length) run as one batched kernel; the rest one by one.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttentionShape,
    layer: usize,
    batch: &Batch,
    caches: &mut [StepCache<'_>],
) -> Tensor {
    let AttentionShape { heads, kv_heads, head_dim } = shape;
    let scale = (head_dim as f64).powf(-0.5);
    let gqa = heads != kv_heads;
    if let Some((sequences, len)) = batch.uniform_fresh() {
        // [B*T, h, d] -> [B, h, T, d]
        let to_heads = |x: &Tensor, h: i64| x.view([sequences, len, h, head_dim]).transpose(1, 2);
        let (qb, kb, vb) = (to_heads(q, heads), to_heads(k, kv_heads), to_heads(v, kv_heads));
        for (i, cache) in caches.iter_mut().enumerate() {
            if let Some(cache) = cache {
                let i = i as i64;
                // Batched attention reads the fresh keys directly; the cache only keeps them.
                cache.keep(layer, &kb.narrow(0, i, 1), &vb.narrow(0, i, 1));
            }
        }
        if let Some(out) = attention_on_cpu_kernel(q, k, v, shape, sequences, len, scale) {
            return out;
        }
        let out = Tensor::scaled_dot_product_attention(&qb, &kb, &vb, None::<Tensor>, 0.0, len > 1, scale, gqa);
        return out.transpose(1, 2).reshape([sequences * len, heads * head_dim]);
    }
    // Heads first once for the whole step, `[1, heads, tokens, head_dim]`, each sequence a
    // narrow of its tokens: a decode step runs this loop for every sequence, so what it costs
    // is ops per sequence.
    let heads_first = |x: &Tensor| x.transpose(0, 1).unsqueeze(0);
    let (q_all, k_all, v_all) = (heads_first(q), heads_first(k), heads_first(v));
    let mut outputs = Vec::with_capacity(caches.len());
    for (span, cache) in batch.spans().iter().zip(caches.iter_mut()) {
        let (qs, ks, vs) = [&q_all, &k_all, &v_all].map(|x| x.narrow(2, span.start, span.len)).into();
        // A prompt with no past attends its keys as computed, as the batched path does; with a
        // past, whatever the cache holds (FP8-rounded where it keeps FP8), its own new keys too.
        let (keys, values) = match cache {
            Some(cache) if span.past > 0 => cache.append(layer, &ks, &vs),
            Some(cache) => {
                cache.keep(layer, &ks, &vs);
                (ks, vs)
            }
            None => (ks, vs),
        };
        let out = if span.past == 0 || span.len == 1 {
            // No past: plain causal; one new token: it sees everything.
            Tensor::scaled_dot_product_attention(&qs, &keys, &values, None::<Tensor>, 0.0, span.len > 1, scale, gqa)
        } else {
            // New tokens after a past: token i sees positions 0..=past+i.
            let device = q.device();
            let rows = Tensor::arange(span.len, (Kind::Int64, device)).unsqueeze(1) + span.past;
            let cols = Tensor::arange(span.past + span.len, (Kind::Int64, device)).unsqueeze(0);
            let mask = cols.le_tensor(&rows);
            Tensor::scaled_dot_product_attention(&qs, &keys, &values, Some(mask), 0.0, false, scale, gqa)
        };
        outputs.push(out);
    }
    Tensor::cat(&outputs, 2).squeeze_dim(0).transpose(0, 1).reshape([batch.tokens(), heads * head_dim])
}

/// The threads [`cpu_attention`] runs on for `sequences` fresh sequences of `len` tokens of
/// `x`'s device and dtype, where it applies: float32 on the CPU, heads of whole pairs of the
/// CPU's vectors, sequences up to its length, and as many threads of ours as libtorch would use
/// (where libgomp's workers spin unbounded, threads of ours would share the cores with them:
/// libtorch's kernel runs instead, `None`).
fn cpu_attention_threads(x: &Tensor, head_dim: i64, sequences: i64, len: i64) -> Option<usize> {
    let applies = x.device() == Device::Cpu
        && x.kind() == Kind::Float
        && len as usize <= cpu_attention::MAX_LEN
        && cpu_attention::supports(head_dim as usize);
    let threads = cpu_threads::threads_for((sequences * len) as usize);
    (applies && threads >= tch::get_num_threads().max(1) as usize).then_some(threads)
}

fn kernel_shape(shape: AttentionShape, sequences: i64, len: i64) -> cpu_attention::Shape {
    cpu_attention::Shape {
        sequences: sequences as usize,
        len: len as usize,
        heads: shape.heads as usize,
        kv_heads: shape.kv_heads as usize,
        head_dim: shape.head_dim as usize,
    }
}

/// The causal attention of `sequences` fresh sequences of `len` tokens by [`cpu_attention`]
/// where it applies ([`cpu_attention_threads`]), `[sequences × len, heads × head_dim]` as the
/// batched path returns it.
fn attention_on_cpu_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    shape: AttentionShape,
    sequences: i64,
    len: i64,
    scale: f64,
) -> Option<Tensor> {
    let AttentionShape { heads, kv_heads, head_dim } = shape;
    let threads = cpu_attention_threads(q, head_dim, sequences, len)?;
    let (q, k, v) = (host(q), host(k), host(v));
    let d = head_dim as usize;
    let attention = cpu_attention::Causal {
        q: Heads::token_major(&q, heads as usize, d),
        k: Heads::token_major(&k, kv_heads as usize, d),
        v: Heads::token_major(&v, kv_heads as usize, d),
        shape: kernel_shape(shape, sequences, len),
        scale: scale as f32,
    };
    let out = attention.attend(threads);
    Some(Tensor::from_slice(&out).view([sequences * len, heads * head_dim]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Widening FP8 blocks against each weight times the factor of the block it falls in, picked
    /// by index (`factor[i / b0, j / b1]`): blocks that tile the weight (the broadcast path),
    /// partial edge blocks, a leading experts dimension, into float32 and bfloat16.
    /// E2M1's values by code, as the OCP microscaling spec tabulates them (and transformers'
    /// `_FP4_E2M1_LUT`).
    const E2M1: [f32; 16] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0];

    /// MXFP4 codes widen to each code's e2m1 value times its group's power of two, the even
    /// column from the low nibble; over stacked experts too.
    #[test]
    fn mxfp4_codes_widen_to_their_values_times_their_groups_factor() {
        // Row 0: codes 0..16 then 15..0 repeated over 64 columns; row 1: all 0x3 (1.5) / 0xB (-1.5).
        let row0: Vec<u8> = (0..32u8).map(|i| (i % 16) | ((15 - i % 16) << 4)).collect();
        let row1 = vec![0x3 | (0xB << 4); 32];
        let codes = Tensor::from_slice(&[row0.clone(), row1].concat()).view([2, 32]);
        // Factors 2^(e - 127): row 0 ×1 then ×4, row 1 ×0.5 then ×2^-3.
        let exponents = Tensor::from_slice(&[127u8, 129, 126, 124]).view([2, 2]);
        let wide = widen_mxfp4(&codes, &exponents, Kind::Float);
        assert_eq!(wide.size(), [2, 64]);
        let values = Vec::<f32>::try_from(wide.flatten(0, -1)).unwrap();
        for (column, &value) in values[..64].iter().enumerate() {
            let byte = row0[column / 2];
            let code = if column % 2 == 0 { byte & 0xF } else { byte >> 4 };
            let factor = if column < 32 { 1.0 } else { 4.0 };
            assert_eq!(value, E2M1[code as usize] * factor, "row 0 column {column}");
        }
        assert!(values[64..96].iter().enumerate().all(|(c, &v)| v == if c % 2 == 0 { 0.75 } else { -0.75 }));
        assert!(values[96..].iter().enumerate().all(|(c, &v)| v == if c % 2 == 0 { 0.1875 } else { -0.1875 }));
        // Stacked: each expert as alone; and rounded once to the dtype asked for.
        let stacked = widen_mxfp4(
            &Tensor::stack(&[&codes, &codes.flip([0])], 0),
            &Tensor::stack(&[&exponents, &exponents.flip([0])], 0),
            Kind::Float,
        );
        assert!(stacked.get(0).equal(&wide) && stacked.get(1).equal(&wide.flip([0])));
        assert!(widen_mxfp4(&codes, &exponents, Kind::BFloat16).equal(&wide.to_kind(Kind::BFloat16)));
    }

    #[test]
    fn fp8_blocks_widen_to_each_weight_times_its_blocks_factor() {
        tch::manual_seed(5);
        let cpu = (Kind::Float, Device::Cpu);
        for (lead, rows, columns, block) in [
            (vec![], 256, 384, [128, 128]),
            (vec![], 200, 300, [128, 128]),
            (vec![3], 64, 96, [32, 48]),
            (vec![2], 40, 50, [16, 32]),
        ] {
            let size = [lead.clone(), vec![rows, columns]].concat();
            let weight = (Tensor::randn(&size, cpu) * 100.0).to_kind(Kind::Float8e4m3fn);
            let blocks = [(rows + block[0] - 1) / block[0], (columns + block[1] - 1) / block[1]];
            let scale_inv = Tensor::rand([lead.clone(), blocks.to_vec()].concat(), cpu) + 0.01;
            let d = size.len() as i64;
            let row_block = Tensor::arange(rows, (Kind::Int64, Device::Cpu)).divide_scalar_mode(block[0], "floor");
            let column_block =
                Tensor::arange(columns, (Kind::Int64, Device::Cpu)).divide_scalar_mode(block[1], "floor");
            let factors = scale_inv.index_select(d - 2, &row_block).index_select(d - 1, &column_block);
            let expected = weight.to_kind(Kind::Float) * factors;
            for kind in [Kind::Float, Kind::BFloat16] {
                let got = widen_blocks(&weight, &scale_inv, block, kind);
                assert_eq!(got.kind(), kind);
                assert!(got.equal(&expected.to_kind(kind)), "{size:?} in {block:?} blocks, {kind:?}");
            }
        }
    }

    #[test]
    fn every_row_goes_to_onednn_only_on_a_non_intel_cpu_with_avx512() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n";
        assert_eq!(cpu_vendor(info).as_deref(), Some("AuthenticAMD"));
        assert_eq!(cpu_vendor("processor\t: 0\n"), None);
        assert_eq!(onednn_max_rows_for(Some("AuthenticAMD"), true), i64::MAX);
        assert_eq!(onednn_max_rows_for(Some("AuthenticAMD"), false), ONEDNN_MAX_ROWS);
        assert_eq!(onednn_max_rows_for(Some("GenuineIntel"), true), ONEDNN_MAX_ROWS);
        assert_eq!(onednn_max_rows_for(None, true), ONEDNN_MAX_ROWS);
    }

    /// `linear` against the same product in float64, on both sides of the rows it sends to
    /// oneDNN, with and without a bias, and on an input that is a transposed view.
    #[test]
    fn linear_multiplies_as_libtorch_does_on_either_side_of_the_onednn_limit() {
        tch::manual_seed(3);
        let cpu = (Kind::Float, Device::Cpu);
        let weight = Tensor::randn([96, 64], cpu);
        let bias = Tensor::randn([96], cpu);
        for rows in [1, 7, ONEDNN_MAX_ROWS, ONEDNN_MAX_ROWS + 1, 300] {
            let x = Tensor::randn([64, rows], cpu).transpose(0, 1);
            for bias in [None, Some(&bias)] {
                let got = linear(&x, &weight, bias);
                assert_eq!(got.size(), [rows, 96]);
                let mut expected = x.to_kind(Kind::Double).matmul(&weight.to_kind(Kind::Double).transpose(0, 1));
                if let Some(b) = bias {
                    expected += b.to_kind(Kind::Double);
                }
                let error = (got.to_kind(Kind::Double) - &expected).abs().max().double_value(&[]);
                assert!(error < 1e-4, "{rows} rows, bias {}: off by {error}", bias.is_some());
            }
        }
        // Where oneDNN is not used (bfloat16), exactly libtorch's linear.
        let (x, w) = (Tensor::randn([4, 64], cpu).to_kind(Kind::BFloat16), weight.to_kind(Kind::BFloat16));
        assert!(linear(&x, &w, None).equal(&x.linear(&w, None::<Tensor>)));
    }
}
