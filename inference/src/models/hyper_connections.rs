//! Manifold-constrained hyper-connections (mHC), DeepSeek-V4's residual and GLM-5.3-Flash's, read
//! from transformers 5.23's `DeepseekV4HyperConnection` and `DeepseekV4HyperHead` (GLM's
//! connections are the same; its head is the streams' mean).
//!
//! The residual is `streams` parallel copies of the hidden state (`[tokens, streams, hidden]`).
//! Before each attention and each feed-forward the streams are collapsed into the block's input
//! by per-token weights (`pre`), and after it the block's output is spread back over them
//! (`post`) and added to the streams mixed among themselves (`comb`, a doubly-stochastic
//! `streams × streams` matrix per token, made so by Sinkhorn-Knopp rounds). All three come from
//! one small projection of the RMS-normalised, flattened streams. Everything here runs in
//! float32 (transformers keeps these modules in float32 whatever the model's dtype).

use tch::{Kind, Tensor};

use crate::checkpoint::Loader;
use crate::error::LoadError;

/// The shape and constants every hyper-connection of a model shares.
#[derive(Debug, Clone, Copy)]
pub struct HyperShape {
    /// Parallel residual streams (`hc_mult`).
    pub streams: i64,
    pub hidden: i64,
    /// Sinkhorn-Knopp rounds (`hc_sinkhorn_iters`), the first a column normalisation alone.
    pub sinkhorn_iters: i64,
    /// Added to `pre`, `comb` and the Sinkhorn sums (`hc_eps`).
    pub eps: f64,
    /// The flattened streams' RMSNorm (unweighted).
    pub norm_eps: f64,
}

impl HyperShape {
    /// transformers' `hc_sinkhorn_iters` where a config has none (DeepSeek-V4's and
    /// GLM-5.3-Flash's alike).
    pub fn default_sinkhorn_iters() -> i64 {
        20
    }

    /// transformers' `hc_eps` where a config has none (both models').
    pub fn default_eps() -> f64 {
        1e-6
    }
}

/// `x / rms(x)` over the last dimension, with no weight (transformers'
/// `DeepseekV4UnweightedRMSNorm`: the factor computed in float32, applied in `x`'s dtype).
pub fn unweighted_rms_norm(x: &Tensor, eps: f64) -> Tensor {
    let variance = x.to_kind(Kind::Float).square().mean_dim(-1, true, Kind::Float);
    x * (variance + eps).rsqrt().to_kind(x.kind())
}

/// The collapse-and-expand around one block (attention or feed-forward).
pub struct HyperConnection {
    /// `[(2 + streams) × streams, streams × hidden]`: rows for `pre`, `post`, then `comb`.
    projection: Tensor,
    /// `[(2 + streams) × streams]`.
    base: Tensor,
    /// `[3]`: `pre`'s, `post`'s and `comb`'s scales.
    scale: Tensor,
    shape: HyperShape,
}

/// What a hyper-connection hands its block, and what it needs back afterwards.
pub struct Collapsed {
    /// The block's input, `[tokens, hidden]` in the streams' dtype.
    pub input: Tensor,
    /// `[tokens, streams]`, float32.
    post: Tensor,
    /// `[tokens, streams, streams]`, float32.
    comb: Tensor,
}

impl HyperConnection {
    /// `{name}_fn`, `{name}_base`, `{name}_scale` under `w` (the released spelling,
    /// `hc_attn_fn`…), float32.
    pub fn load(w: &Loader, name: &str, shape: HyperShape) -> Result<Self, LoadError> {
        let w = w.with_kind(Kind::Float);
        let n = shape.streams;
        let rows = (2 + n) * n;
        Ok(Self {
            projection: w.tensor(&format!("{name}_fn"), &[rows, n * shape.hidden])?,
            base: w.tensor(&format!("{name}_base"), &[rows])?,
            scale: w.tensor(&format!("{name}_scale"), &[3])?,
            shape,
        })
    }

    /// The block's input from `streams` (`[tokens, streams, hidden]`), with the weights
    /// [`Collapsed::expand`] needs.
    pub fn collapse(&self, streams: &Tensor) -> Collapsed {
        let HyperShape { streams: n, sinkhorn_iters, eps, norm_eps, .. } = self.shape;
        let tokens = streams.size()[0];
        let mixes = mixes(streams, &self.projection, norm_eps);
        let part = |t: &Tensor, i: i64, len: i64| t.narrow(-1, i, len);
        let scale = |i: i64| self.scale.get(i);
        let pre = (part(&mixes, 0, n) * scale(0) + part(&self.base, 0, n)).sigmoid() + eps;
        let post = (part(&mixes, n, n) * scale(1) + part(&self.base, n, n)).sigmoid() * 2.0;
        let comb_logits =
            part(&mixes, 2 * n, n * n).view([tokens, n, n]) * scale(2) + part(&self.base, 2 * n, n * n).view([n, n]);
        let mut comb = comb_logits.softmax(-1, Kind::Float) + eps;
        // Sinkhorn-Knopp: columns, then rows and columns in turn, towards a doubly-stochastic
        // matrix (the streams' mix then neither grows nor shrinks their sum).
        comb = &comb / (comb.sum_dim_intlist(-2, true, Kind::Float) + eps);
        for _ in 1..sinkhorn_iters {
            comb = &comb / (comb.sum_dim_intlist(-1, true, Kind::Float) + eps);
            comb = &comb / (comb.sum_dim_intlist(-2, true, Kind::Float) + eps);
        }
        Collapsed { input: weighted_sum(&pre, streams), post, comb }
    }
}

impl Collapsed {
    /// The streams after the block: its `output` (`[tokens, hidden]`) spread by `post`, plus the
    /// streams before it mixed by `comb` (transposed: stream `k` takes `Σ_j comb[j, k] ·
    /// streams[j]`), in the streams' dtype.
    pub fn expand(&self, output: &Tensor, streams: &Tensor) -> Tensor {
        let kind = streams.kind();
        self.post.to_kind(kind).unsqueeze(-1) * output.unsqueeze(-2)
            + self.comb.to_kind(kind).transpose(-1, -2).matmul(streams)
    }
}

/// The hyper-connections of one decoder layer.
pub struct BlockHyperConnections {
    pub attention: HyperConnection,
    pub feed_forward: HyperConnection,
}

impl BlockHyperConnections {
    /// How many streams they keep.
    pub fn streams(&self) -> i64 {
        self.attention.shape.streams
    }
}

/// The final collapse of the streams into one hidden state, before the final norm.
pub enum HyperHead {
    /// DeepSeek-V4's: weighted per token, as a block's input is collapsed (`pre` alone).
    Weighted {
        /// `[streams, streams × hidden]`.
        projection: Tensor,
        base: Tensor,
        scale: Tensor,
        shape: HyperShape,
    },
    /// GLM-5.3-Flash's: the streams' plain mean (transformers' `Glm5NextTextHyperHead`).
    Mean,
}

impl HyperHead {
    /// `{stem}fn`, `{stem}base`, `{stem}scale` under `w` (the released `hc_head_fn`… at the
    /// root, or `hc_fn`… under `model.hc_head` as transformers 5.23 writes them), float32.
    pub fn load(w: &Loader, stem: &str, shape: HyperShape) -> Result<Self, LoadError> {
        let w = w.with_kind(Kind::Float);
        let n = shape.streams;
        Ok(Self::Weighted {
            projection: w.tensor(&format!("{stem}fn"), &[n, n * shape.hidden])?,
            base: w.tensor(&format!("{stem}base"), &[n])?,
            scale: w.tensor(&format!("{stem}scale"), &[1])?,
            shape,
        })
    }

    /// `[tokens, streams, hidden]` → `[tokens, hidden]` in the streams' dtype.
    pub fn forward(&self, streams: &Tensor) -> Tensor {
        match self {
            Self::Weighted { projection, base, scale, shape } => {
                let mixes = mixes(streams, projection, shape.norm_eps);
                let pre = (mixes * scale + base).sigmoid() + shape.eps;
                weighted_sum(&pre, streams)
            }
            Self::Mean => streams.mean_dim(1, false, streams.kind()),
        }
    }
}

/// The streams (`[tokens, streams, hidden]`) flattened per token, RMS-normalised without a
/// weight and projected (`[rows, streams × hidden]`), in float32: the weights' logits.
fn mixes(streams: &Tensor, projection: &Tensor, norm_eps: f64) -> Tensor {
    let flat = streams.view([streams.size()[0], -1]).to_kind(Kind::Float);
    unweighted_rms_norm(&flat, norm_eps).linear(projection, None::<Tensor>)
}

/// `Σ_s weights[t, s] · streams[t, s]`, summed in float32, in the streams' dtype.
fn weighted_sum(weights: &Tensor, streams: &Tensor) -> Tensor {
    (weights.unsqueeze(-1) * streams).sum_dim_intlist(1, false, Kind::Float).to_kind(streams.kind())
}
