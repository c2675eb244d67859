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
//! convolution ([`KdaState`]), whatever its length. A decoded token steps the recurrence once;
//! a prompt (or its chunk) goes through it [`CHUNK`] tokens at a time in the chunked form
//! transformers and FLA prefill with (equal in exact arithmetic): a few matmuls per chunk
//! instead of a handful of kernels per token.

use tch::{Kind, Tensor};

use super::SelfAttention;
use crate::batch::{Batch, StepCache};
use crate::checkpoint::Loader;
use crate::error::LoadError;
use crate::kv_cache::LayerState;
use crate::layers::Linear;

/// Tokens the chunked form takes at once. transformers and FLA take 64; within a chunk the form
/// holds, per head, `CHUNK × CHUNK × head_dim` decayed keys, so its work per token grows with
/// the chunk while its steps per prompt shrink. On the CPU, chunks of 16 ran a
/// GLM-5.3-Flash-shaped PoC v2 forward 1.16× as fast as stepping token by token (its prefill
/// level within the spread), and chunks of 64 at about half the speed (docs/benchmarks.md). On a
/// GPU, where each kernel's launch costs more than its work here, fewer steps should count for
/// more; that is not measured yet.
pub const CHUNK: i64 = 16;

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

    /// What a forward through one such layer holds beyond the stack's rows, `(per token, once)`:
    /// per token the fused projection's output (q, k, v, β and the two gates' low-rank inputs),
    /// the convolution's output and its float32 copy, the float32 log-decays, the output gate
    /// and the float32 output and its norm; once, as the sequences take turns, a chunk's
    /// float32 decays per key (their exponent, then the keys as each token sees them) and the
    /// state with its update.
    pub fn forward_bytes(&self, kind: Kind) -> (u64, u64) {
        let (width, element) = (self.heads * self.head_dim, kind.elt_size_in_bytes() as i64);
        let projected = (3 * width + self.heads + 2 * self.head_dim) * element;
        let per_token = projected + 3 * width * (element + 4) + width * 4 + width * element + 2 * width * 4;
        let chunk = 3 * self.heads * CHUNK * CHUNK * self.head_dim * 4;
        let state = 2 * self.heads * self.head_dim * self.head_dim * 4;
        (per_token as u64, (chunk + state) as u64)
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
    /// The convolution's last `kernel - 1` inputs, `[1, channels, kernel - 1]` (zeros before the
    /// first token, as the convolution pads).
    conv: Tensor,
    /// `[heads, head_dim (keys), head_dim (values)]`, float32.
    recurrent: Tensor,
}

impl KdaState {
    fn empty(shape: &KdaShape, like: &Tensor) -> Self {
        let d = shape.head_dim;
        Self {
            conv: Tensor::zeros([1, shape.channels(), shape.conv_kernel - 1], (like.kind(), like.device())),
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

    /// `sequences` sequences of `len` new tokens each (`mixed` `[sequences × len, channels]`,
    /// `decay` and `beta` as [`Self::log_decay`] and β give them, rows sequence by sequence)
    /// through the convolution and the recurrence together, side by side as the heads of one.
    /// `conv` (`[sequences, channels, kernel - 1]`) holds the convolution's inputs before them;
    /// `state` (`[sequences × heads, head_dim, head_dim]`) the recurrent state, updated in
    /// place. Returns the outputs, `[sequences × len, heads, head_dim]` in `kind`, and the
    /// convolution's inputs to keep.
    fn run(
        &self,
        (mixed, decay, beta): (&Tensor, &Tensor, &Tensor),
        (sequences, len): (i64, i64),
        conv: &Tensor,
        state: &mut Tensor,
        kind: Kind,
    ) -> (Tensor, Tensor) {
        let KdaShape { heads, head_dim, conv_kernel, .. } = self.shape;
        let inputs = Tensor::cat(&[conv, &mixed.view([sequences, len, -1]).transpose(1, 2)], 2);
        let kept = inputs.narrow(2, len, conv_kernel - 1).copy();
        let convolved = inputs.conv1d(&self.conv, None::<Tensor>, [1], [0], [1], self.shape.channels()).silu();
        let qkv = convolved.transpose(1, 2).to_kind(Kind::Float).reshape([-1, 3, heads, head_dim]);
        // `[len, sequences × heads, …]`: the sequences' heads side by side, token by token.
        let wide =
            |t: &Tensor| t.view([sequences, len, heads, -1]).transpose(0, 1).reshape([len, sequences * heads, -1]);
        let q = l2_normalised(&qkv.select(1, 0)) * (head_dim as f64).powf(-0.5);
        let k = l2_normalised(&qkv.select(1, 1));
        let (q, k, v) = (wide(&q), wide(&k), wide(&qkv.select(1, 2)));
        let out = recurrence(&q, &k, &v, &wide(decay), &wide(beta).squeeze_dim(-1), state);
        let out = out.view([len, sequences, heads, head_dim]).transpose(0, 1).reshape([-1, heads, head_dim]);
        (out.to_kind(kind), kept)
    }
}

/// The delta rule over one sequence's new tokens, each after the last: q, k, v `[n, heads,
/// head_dim]` (q and k normalised, q scaled), `decay` the log-decays, `beta` `[n, heads]`,
/// all float32; `state` is updated in place (it is this layer's own: the cache's, or a
/// one-shot forward's). Returns the outputs, float32 `[n, heads, head_dim]`.
fn step_by_step(q: &Tensor, k: &Tensor, v: &Tensor, decay: &Tensor, beta: &Tensor, state: &mut Tensor) -> Tensor {
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

/// The delta rule over one sequence's new tokens `chunk` at a time, as [`step_by_step`]
/// takes and gives them: transformers' `chunk_kimi_delta_attention` (FLA's chunked form). Within
/// a chunk, with `G` the log-decays summed from its start and `T` the inverse of the unit lower
/// triangle of β-weighted, decayed key products (the delta rule's corrections among the chunk's
/// own tokens, solved at once), each token's value less what the state recalls for it is
/// `T·(β v) − T·(β k e^G)·S`; the outputs are what the state gives the decayed queries plus the
/// chunk's own decayed attention over those values, and the state moves to the chunk's end.
fn chunked(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    decay: &Tensor,
    beta: &Tensor,
    state: &mut Tensor,
    chunk: i64,
) -> Tensor {
    let n = q.size()[0];
    // Head-major: `[heads, n, …]`.
    let [q, k, v, decay] = [q, k, v, decay].map(|t| t.transpose(0, 1));
    let beta = beta.transpose(0, 1).unsqueeze(-1);
    let mut outputs = Vec::with_capacity(((n + chunk - 1) / chunk) as usize);
    for start in (0..n).step_by(chunk as usize) {
        let len = chunk.min(n - start);
        let part = |t: &Tensor| t.narrow(1, start, len);
        let (q, k, v, beta) = (part(&q), part(&k), part(&v), part(&beta));
        let cumulative = part(&decay).cumsum(1, Kind::Float);
        let device = q.device();
        // Token i's decay since token j, per key channel: e^(G_i − G_j) for j ≤ i, zero past i
        // (masked before the exponential, where the difference would overflow).
        let later = Tensor::ones([len, len], (Kind::Bool, device)).triu(1);
        let since = (cumulative.unsqueeze(2) - cumulative.unsqueeze(1))
            .masked_fill(&later.unsqueeze(-1), f64::NEG_INFINITY)
            .exp();
        // Key j as token i sees it, `[heads, i, j, head_dim]`: what both products below take.
        let seen = k.unsqueeze(1) * since;
        let k_beta = &k * &beta;
        let earlier = Tensor::ones([len, len], (Kind::Bool, device)).tril(-1);
        let corrections = seen.matmul(&k_beta.unsqueeze(-1)).squeeze_dim(-1) * earlier.to_kind(Kind::Float);
        let eye = Tensor::eye(len, (Kind::Float, device));
        let inverse = (corrections + &eye).linalg_solve_triangular(&eye, false, true, true);
        let values = inverse.matmul(&(&v * &beta));
        let keys_decayed = inverse.matmul(&(&k_beta * cumulative.exp()));
        // The chunk's own attention, token i over j ≤ i (`since` is zero past i).
        let within = seen.matmul(&q.unsqueeze(-1)).squeeze_dim(-1);
        let new_values = values - keys_decayed.matmul(state);
        outputs.push((&q * cumulative.exp()).matmul(state) + within.matmul(&new_values));
        let last = cumulative.narrow(1, len - 1, 1);
        *state *= last.exp().transpose(1, 2);
        *state += (&k * (&last - &cumulative).exp()).transpose(1, 2).matmul(&new_values);
    }
    Tensor::cat(&outputs, 1).transpose(0, 1)
}

/// The delta rule over one sequence's new tokens (or sequences side by side as heads): one
/// token (decoding) steps the recurrence, more go through it in chunks.
fn recurrence(q: &Tensor, k: &Tensor, v: &Tensor, decay: &Tensor, beta: &Tensor, state: &mut Tensor) -> Tensor {
    if q.size()[0] == 1 {
        step_by_step(q, k, v, decay, beta, state)
    } else {
        chunked(q, k, v, decay, beta, state, CHUNK)
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
        let parts = (&mixed, &decay, &beta);
        let out = match batch.uniform_fresh() {
            // Sequences of one length and no past (a PoC v2 batch, prompts admitted together):
            // through one convolution and one recurrence, from zeros.
            Some((sequences, len)) if sequences > 1 => {
                let held = self.shape.conv_kernel - 1;
                let conv = Tensor::zeros([sequences, self.shape.channels(), held], (kind, x.device()));
                let mut state = Tensor::zeros([sequences * heads, head_dim, head_dim], (Kind::Float, x.device()));
                let (out, kept) = self.run(parts, (sequences, len), &conv, &mut state, kind);
                for (s, cache) in caches.iter_mut().enumerate() {
                    if let Some(cache) = cache {
                        // Each its own copy: the batch's tensors are not held on to.
                        let own = cache.state(layer, || KdaState::empty(&self.shape, x));
                        own.recurrent = state.narrow(0, s as i64 * heads, heads).copy();
                        own.conv = kept.narrow(0, s as i64, 1).copy();
                    }
                }
                out
            }
            _ => {
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
                    let span_parts = (&rows(&mixed), &rows(&decay), &rows(&beta));
                    let (out, kept) = self.run(span_parts, (1, span.len), &state.conv, &mut state.recurrent, kind);
                    state.conv = kept;
                    outputs.push(out);
                }
                Tensor::cat(&outputs, 0)
            }
        };
        let out = out.to_kind(Kind::Float);
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

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;

    /// The chunked form gives what stepping token by token gives: the outputs and the state it
    /// leaves, from a state already holding something, whole chunks and a part one, chunks of 4,
    /// [`CHUNK`] and 64. Decays up to e^-3 a token, so a chunk of 64 spans decays past e^-100.
    #[test]
    fn the_chunked_form_is_the_step_by_step_recurrence() {
        tch::manual_seed(3);
        let cpu = (Kind::Float, Device::Cpu);
        let (heads, d) = (2, 8);
        let normalised = |t: Tensor| l2_normalised(&t);
        for n in [2, 4, 5, 13, 70] {
            let q = normalised(Tensor::randn([n, heads, d], cpu)) * (d as f64).powf(-0.5);
            let k = normalised(Tensor::randn([n, heads, d], cpu));
            let v = Tensor::randn([n, heads, d], cpu);
            let decay = Tensor::rand([n, heads, d], cpu) * -3.0;
            let beta = Tensor::rand([n, heads], cpu);
            let start = Tensor::randn([heads, d, d], cpu);
            let mut stepped = start.copy();
            let expected = step_by_step(&q, &k, &v, &decay, &beta, &mut stepped);
            for chunk in [4, CHUNK, 64] {
                let mut state = start.copy();
                let out = chunked(&q, &k, &v, &decay, &beta, &mut state, chunk);
                let error = |a: &Tensor, b: &Tensor| f64::try_from((a - b).abs().max()).unwrap();
                assert!(
                    error(&out, &expected) < 1e-4,
                    "n {n}, chunks of {chunk}: outputs off by {}",
                    error(&out, &expected)
                );
                assert!(
                    error(&state, &stepped) < 1e-4,
                    "n {n}, chunks of {chunk}: state off by {}",
                    error(&state, &stepped)
                );
            }
        }
    }
}
