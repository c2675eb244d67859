//! MiniMax-M2 (MiniMax-M2, M2.5, M2.7: the network's most widely run model), read from
//! transformers' `modeling_minimax_m2.py` (5.23) and vLLM's `minimax_m2.py` (0.32).
//!
//! Qwen3-MoE's neighbour. What differs:
//! - **partial rotary**: only the first `rotary_dim` (64 of `head_dim` 128 in the release) of
//!   each head rotate; the rest pass unrotated;
//! - **q/k RMSNorm over all heads at once**: one weight of `heads * head_dim` for the queries,
//!   `kv_heads * head_dim` for the keys (`qk_norm_type: per_layer`), applied before the heads
//!   are split;
//! - **a sigmoid router**: experts are chosen by `sigmoid(logits) + e_score_correction_bias`,
//!   but weighted by the sigmoid scores alone, renormalised over the top k;
//! - every layer is a mixture of experts (no dense layer, no shared expert), each expert a
//!   SwiGLU of `intermediate_size` stored as Mixtral's `w1` (gate), `w3` (up), `w2` (down)
//!   under `block_sparse_moe`;
//! - multi-token-prediction modules (`num_mtp_modules` layers after the last) serve speculative
//!   decoding; inference here, like vLLM's, does not load them.
//!
//! Where the two references differ (only below float32): vLLM keeps the router's weight and the
//! correction bias in float32 and computes the router's logits in float32; transformers casts
//! the router's input to the weight's dtype (the model's). The engine follows vLLM, whose
//! rounding PoC v2's validators share, and its decoder layout (the residual stream summed in
//! float32 by the next norm, as for every architecture here). Both scale each expert's output
//! by its float32 routing weight before rounding to the model's dtype; so does the engine.

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::moe::Experts;
use super::{BlockParts, FeedForward, StackShape, Transformer, assemble, qwen2};
use crate::checkpoint::Loader;
use crate::config::Architecture;
use crate::error::LoadError;
use crate::layers::{Attention, AttentionKind, Linear, MIXTRAL_EXPERT, QkNorm, Rotary};

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// The shared fields; `intermediate_size` is each expert's width.
    #[serde(flatten)]
    pub base: qwen2::Config,
    #[serde(alias = "num_experts")]
    pub num_local_experts: i64,
    pub num_experts_per_tok: i64,
    /// The rotated width of each head, as the released checkpoints say it (transformers 5
    /// also writes `rope_parameters.partial_rotary_factor`, which wins when both are given).
    #[serde(default)]
    pub rotary_dim: Option<i64>,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    #[serde(default)]
    pub scoring_func: Option<String>,
    #[serde(default)]
    pub use_qk_norm: Option<bool>,
    #[serde(default)]
    pub qk_norm_type: Option<String>,
    #[serde(default)]
    pub shared_intermediate_size: Option<i64>,
    /// MiniMax-Text-01's marker of lightning-attention layers (0); MiniMax-M2's are all full
    /// softmax attention (1).
    #[serde(default)]
    pub attn_type_list: Option<Vec<i64>>,
}

impl Config {
    /// The rotated width of each head: `head_dim × partial_rotary_factor` (transformers'
    /// `int(...)`), the factor from `rope_parameters`, the config's top level, or `rotary_dim`.
    pub fn rotary_dim(&self) -> Result<i64, LoadError> {
        let head_dim = self.base.head_dim();
        let from_rope = self
            .base
            .rope
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("partial_rotary_factor"))
            .and_then(|v| v.as_f64());
        let factor = from_rope
            .or(self.partial_rotary_factor)
            .or(self.rotary_dim.map(|d| d as f64 / head_dim as f64))
            .unwrap_or(1.0);
        let dim = (head_dim as f64 * factor) as i64;
        if dim <= 0 || dim > head_dim || dim % 2 != 0 {
            return Err(LoadError::InvalidConfig(format!(
                "the rotary width {dim} (head_dim {head_dim} × partial_rotary_factor {factor}) must be even and \
                 between 2 and head_dim"
            )));
        }
        Ok(dim)
    }

    /// What the checks of transformers and vLLM leave to a shape error, and the variants of the
    /// MiniMax family this file does not implement, named.
    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        if !(1..=self.num_local_experts).contains(&self.num_experts_per_tok) {
            return invalid(format!(
                "num_experts_per_tok {} must be between 1 and num_local_experts {}",
                self.num_experts_per_tok, self.num_local_experts
            ));
        }
        if let Some(func) = self.scoring_func.as_deref().filter(|f| *f != "sigmoid") {
            return invalid(format!("scoring_func {func:?} is not supported (MiniMax-M2's router is sigmoid)"));
        }
        if self.use_qk_norm == Some(false) {
            return invalid("use_qk_norm false is not supported (MiniMax-M2 normalises queries and keys)".into());
        }
        if let Some(kind) = self.qk_norm_type.as_deref().filter(|t| *t != "per_layer") {
            return invalid(format!("qk_norm_type {kind:?} is not supported (per_layer: over all heads at once)"));
        }
        if self.shared_intermediate_size.is_some_and(|s| s > 0) {
            return invalid("a shared expert (shared_intermediate_size > 0) is not supported".into());
        }
        if self.attn_type_list.as_ref().is_some_and(|l| l.iter().any(|t| *t != 1)) {
            return invalid("lightning-attention layers (attn_type_list 0, MiniMax-Text-01) are not supported".into());
        }
        self.rotary_dim().map(|_| ())
    }
}

/// MiniMax-M2's mixture of experts: the sigmoid router with its correction bias, then the
/// chosen experts.
pub struct SparseMoe {
    /// `[experts, hidden]`, float32 (vLLM's `GateLinear` keeps it so).
    router: Linear,
    /// Added to the scores only to choose; float32, zeros where the checkpoint has none.
    correction_bias: Tensor,
    experts: Experts,
    top_k: i64,
}

impl SparseMoe {
    fn load(w: &Loader<'_>, config: &Config) -> Result<Self, LoadError> {
        let hidden = config.base.hidden_size;
        let experts = config.num_local_experts;
        let float = w.with_kind(Kind::Float);
        let router = Linear::load(&float.at("gate"), hidden, experts, false)?;
        let correction_bias = if w.contains("e_score_correction_bias") {
            float.tensor("e_score_correction_bias", &[experts])?
        } else {
            Tensor::zeros([experts], (Kind::Float, w.device()))
        };
        let experts = Experts::load(&w.at("experts"), experts, hidden, config.base.intermediate_size, MIXTRAL_EXPERT)?;
        Ok(Self { router, correction_bias, experts, top_k: config.num_experts_per_tok })
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Tensor, _: Option<&Tensor>) -> Tensor {
        let scores = self.router.forward(&x.to_kind(Kind::Float)).sigmoid();
        let (_, chosen) = (&scores + &self.correction_bias).topk(self.top_k, -1, true, true);
        let weights = scores.gather(-1, &chosen, false);
        let weights = &weights / weights.sum_dim_intlist(-1, true, Kind::Float);
        self.experts.mix(x, &chosen, &weights)
    }
}

/// The stack's shape in `kind`, from the config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.validate()?;
    let base = &config.base;
    let mut shape = base.stack_shape(Architecture::MiniMaxM2, kind)?;
    let rope = base.rope.resolve(base.max_position_embeddings as usize)?;
    shape.rotary = Rotary::new(&rope, config.rotary_dim()?);
    // A routed token goes through top-k experts plus a router row.
    shape.spec.intermediate_size = config.num_experts_per_tok * base.intermediate_size + config.num_local_experts;
    Ok(shape)
}

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let base = &config.base;
    let shape = shape(config, w.kind())?;
    let kind =
        AttentionKind { qkv_bias: false, o_bias: false, qk_norm: Some(QkNorm::AllHeads { eps: base.rms_norm_eps }) };
    assemble(shape, w, placed, |_, layer| -> Result<BlockParts, LoadError> {
        let attention = Attention::load(&layer.at("self_attn"), base.hidden_size, base.attention_shape(), kind)?;
        Ok(BlockParts::new(attention, SparseMoe::load(&layer.at("block_sparse_moe"), config)?))
    })
}
