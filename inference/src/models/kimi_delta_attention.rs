//! Kimi Delta Attention (KDA), the linear attention of GLM-5.3-Flash's `linear_attention`
//! layers (three in every four of the released model), read from transformers 5.23's
//! `Glm5NextTextLinearAttention` and its `recurrent_kimi_delta_attention` (FLA's fused recurrent
//! kernel restated), with the tensor names of the released checkpoint (transformers' conversion
//! mapping and vLLM 0.32's `glm5next/common/kda.py` read the same).
//!
//! A layer keeps no keys per token: each head carries a `[head_dim, head_dim]` float32 state
//! from token to token, which forgets per key channel (the forget gate, bounded below by
//! `linear_lower_bound` where the config sets one, else a softplus) and takes in each token's
//! value by the delta rule (what the state already recalls for the key is replaced, at the rate
//! β). Queries and keys are L2-normalised, and q, k and v first pass a causal depthwise
//! convolution of `linear_conv_kernel_dim` taps with SiLU. The output is RMS-normalised per head
//! and gated by a sigmoid of a low-rank projection of the input.
//!
//! So a sequence keeps, per layer, the recurrent state and the last `kernel - 1` inputs of the
//! convolution ([`KdaState`]), whatever its length. Every token runs through the recurrence one
//! at a time, prompts too (transformers prefills with the chunked form of the same recurrence,
//! equal in exact arithmetic; the chunked form is faster and is still to be written here).

use tch::{Kind, Tensor};

use super::SelfAttention;
use crate::batch::{Batch, StepCache};
use crate::checkpoint::Loader;
use crate::error::LoadError;
use crate::kv_cache::LayerState;
use crate::layers::Linear;

/// What a KDA layer is made of, from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KdaShape {
    pub hidden: i64,
    pub heads: i64,
    /// Keys', queries' and values' width per head.
    pub head_dim: i64,
    /// Taps of the causal convolution over q, k and v.
    pub conv_kernel: i64,
    /// The forget gate's lower bound (`lower_bound · sigmoid(…)`), or `None` for its softplus
    /// form (`-exp(A) · softplus(…)`).
    pub lower_bound: Option<f64>,
    pub norm_eps: f64,
}

impl KdaShape {
    /// q, k and v side by side: the convolution's channels.
    fn channels(&self) -> i64 {
        3 * self.heads * self.head_dim
    }

    /// The bytes a sequence's state takes in one such layer: the recurrent state in float32 and
    /// the convolution's last `kernel - 1` inputs in the model's dtype.
    pub fn state_bytes(&self, kind: Kind) -> u64 {
        let recurrent = self.heads * self.head_dim * self.head_dim * 4;
        let conv = self.channels() * (self.conv_kernel - 1) * kind.elt_size_in_bytes() as i64;
        (recurrent + conv) as u64
    }
}

/// One sequence's state in one KDA layer, kept by its cache between steps.
pub struct KdaState {
    /// The convolution's last `kernel - 1` inputs, `[channels, kernel - 1]` (zeros before the
    /// first token, as the convolution pads).
    conv: Tensor,
    /// `[heads, head_dim (keys), head_dim (values)]`, float32.
    recurrent: Tensor,
}

impl KdaState {
    fn empty(shape: &KdaShape, like: &Tensor) -> Self {
        let d = shape.head_dim;
        Self {
            conv: Tensor::zeros([shape.channels(), shape.conv_kernel - 1], (like.kind(), like.device())),
            recurrent: Tensor::zeros([shape.heads, d, d], (Kind::Float, like.device())),
        }
    }
}

impl LayerState for KdaState {
    fn bytes(&self) -> i64 {
        let bytes = |t: &Tensor| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        bytes(&self.conv) + bytes(&self.recurrent)
    }
}

pub struct KimiDeltaAttention {
    /// q, k, v, β, and the forget and output gates' first (low-rank) projections: one matmul,
    /// as vLLM fuses the same six.
    input: Linear,
    forget_b: Linear,
    /// float32 `[heads × head_dim]`, added to the forget gate before its bound.
    forget_bias: Tensor,
    /// float32 `[heads, 1]`: `exp(A_log)` scales the forget gate per head.
    forget_scale: Tensor,
    /// Depthwise, `[channels, 1, kernel]`.
    conv: Tensor,
    gate_b: Linear,
    /// float32 `[head_dim]`.
    output_norm: Tensor,
    o: Linear,
    shape: KdaShape,
}

impl KimiDeltaAttention {
    /// `w` at a layer's `self_attn`.
    pub fn load(w: &Loader, shape: KdaShape) -> Result<Self, LoadError> {
        let KdaShape { hidden, heads, head_dim, conv_kernel, .. } = shape;
        let width = heads * head_dim;
        let input = Linear::load_fused(
            &[
                (w.at("q_proj"), width),
                (w.at("k_proj"), width),
                (w.at("v_proj"), width),
                (w.at("b_proj"), heads),
                (w.at("f_a_proj"), head_dim),
                (w.at("g_a_proj"), head_dim),
            ],
            hidden,
            false,
        )?;
        let float = w.with_kind(Kind::Float);
        let convs = ["q_conv1d", "k_conv1d", "v_conv1d"]
            .iter()
            .map(|name| w.at(name).tensor("weight", &[width, 1, conv_kernel]))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            input,
            forget_b: Linear::load(&w.at("f_b_proj"), head_dim, width, false)?,
            forget_bias: float.tensor("dt_bias", &[width])?,
            forget_scale: float.tensor("A_log", &[heads])?.exp().unsqueeze(-1),
            conv: Tensor::cat(&convs, 0),
            gate_b: Linear::load(&w.at("g_b_proj"), head_dim, width, false)?,
            output_norm: float.at("o_norm").tensor("weight", &[head_dim])?,
            o: Linear::load(&w.at("o_proj"), width, hidden, false)?,
            shape,
        })
    }

    /// The forget gate's log-decay per key channel, float32 `[tokens, heads, head_dim]`, from
    /// its low-rank projection's output `f` (`[tokens, heads × head_dim]`).
    fn log_decay(&self, f: &Tensor) -> Tensor {
        let KdaShape { heads, head_dim, .. } = self.shape;
        let g = (f.to_kind(Kind::Float) + &self.forget_bias).view([-1, heads, head_dim]);
        match self.shape.lower_bound {
            Some(bound) => (g * &self.forget_scale).sigmoid() * bound,
            // transformers' softplus: the identity past 20.
            None => -(g.softplus() * &self.forget_scale),
        }
    }

    /// One sequence's new tokens through the convolution: `mixed` `[n, channels]` in, the
    /// convolved and activated `[n, channels]` out; `state` moves on past them.
    fn convolve(&self, mixed: &Tensor, state: &mut KdaState) -> Tensor {
        let n = mixed.size()[0];
        let held = self.shape.conv_kernel - 1;
        let inputs = Tensor::cat(&[&state.conv, &mixed.transpose(0, 1)], 1);
        state.conv = inputs.narrow(1, n, held).copy();
        let out = inputs.unsqueeze(0).conv1d(&self.conv, None::<Tensor>, [1], [0], [1], self.shape.channels());
        out.squeeze_dim(0).transpose(0, 1).silu()
    }

    /// The delta rule over one sequence's new tokens, each after the last: q, k, v `[n, heads,
    /// head_dim]` (q and k normalised, q scaled), `decay` the log-decays, `beta` `[n, heads]`,
    /// all float32; `state` is updated in place (it is this layer's own: the cache's, or a
    /// one-shot forward's). Returns the outputs, float32 `[n, heads, head_dim]`.
    fn recur(q: &Tensor, k: &Tensor, v: &Tensor, decay: &Tensor, beta: &Tensor, state: &mut Tensor) -> Tensor {
        let n = q.size()[0];
        let mut outputs = Vec::with_capacity(n as usize);
        for t in 0..n {
            let (k_t, v_t) = (k.get(t), v.get(t));
            // Forget per key channel, then replace what the state recalls for this key by the
            // value, at the rate β.
            *state *= decay.get(t).exp().unsqueeze(-1);
            let recalled = k_t.unsqueeze(1).bmm(state).squeeze_dim(1);
            let delta = (v_t - recalled) * beta.get(t).unsqueeze(-1);
            *state += k_t.unsqueeze(-1) * delta.unsqueeze(1);
            outputs.push(q.get(t).unsqueeze(1).bmm(state).squeeze_dim(1));
        }
        Tensor::stack(&outputs, 0)
    }
}

/// `x / sqrt(Σx² + 1e-6)` over the last dimension (FLA's, not `F.normalize`'s max).
fn l2_normalised(x: &Tensor) -> Tensor {
    x / (x.pow_tensor_scalar(2).sum_dim_intlist(-1, true, Kind::Float) + 1e-6).sqrt()
}

impl SelfAttention for KimiDeltaAttention {
    fn forward(
        &self,
        x: &Tensor,
        _: (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor {
        let KdaShape { heads, head_dim, .. } = self.shape;
        let (tokens, kind, width) = (x.size()[0], x.kind(), heads * head_dim);
        let projected = self.input.forward(x);
        let part = |start: i64, len: i64| projected.narrow(-1, start, len);
        let mixed = part(0, 3 * width);
        let beta = part(3 * width, heads).sigmoid().to_kind(Kind::Float);
        let decay = self.log_decay(&self.forget_b.forward(&part(3 * width + heads, head_dim)));
        let gate = self.gate_b.forward(&part(3 * width + heads + head_dim, head_dim));
        let scale = (head_dim as f64).powf(-0.5);

        let mut outputs = Vec::with_capacity(caches.len());
        for (span, cache) in batch.spans().iter().zip(caches.iter_mut()) {
            let rows = |t: &Tensor| t.narrow(0, span.start, span.len);
            let mut fresh;
            let state = match cache {
                Some(cache) => cache.state(layer, || KdaState::empty(&self.shape, x)),
                None => {
                    // A one-shot forward (a PoC nonce): nothing before it, nothing kept.
                    fresh = KdaState::empty(&self.shape, x);
                    &mut fresh
                }
            };
            let qkv = self.convolve(&rows(&mixed), state).to_kind(Kind::Float).view([span.len, 3, heads, head_dim]);
            let q = l2_normalised(&qkv.select(1, 0)) * scale;
            let k = l2_normalised(&qkv.select(1, 1));
            let out = Self::recur(&q, &k, &qkv.select(1, 2), &rows(&decay), &rows(&beta), &mut state.recurrent);
            outputs.push(out.to_kind(kind));
        }
        let out = Tensor::cat(&outputs, 0).to_kind(Kind::Float);
        // Per head: RMS-normalised in float32, scaled, gated by a sigmoid.
        let variance = out.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
        let normed = out * (variance + self.shape.norm_eps).rsqrt() * &self.output_norm;
        let gated = normed * gate.to_kind(Kind::Float).view([tokens, heads, head_dim]).sigmoid();
        self.o.forward(&gated.to_kind(kind).view([tokens, width]))
    }

    fn is_quantised(&self) -> bool {
        self.input.is_quantised() && self.o.is_quantised()
    }
}
