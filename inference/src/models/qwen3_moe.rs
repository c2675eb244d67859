//! Qwen3 mixture of experts (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen3's attention; in the sparse
//! layers a router picks `num_experts_per_tok` of `num_experts` SwiGLU experts per token and
//! mixes their outputs by the softmaxed router scores (transformers' `modeling_qwen3_moe.py`).

use serde::Deserialize;
use tch::{Device, Kind, Tensor};

use super::moe::Experts;
use super::{BlockParts, FeedForward, StackShape, Transformer, assemble, qwen3};
use crate::checkpoint::Loader;
use crate::config::Architecture;
use crate::error::LoadError;
use crate::layers::{Attention, Linear, Mlp, QWEN_MLP};

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: qwen3::Config,
    /// transformers 5 writes `num_local_experts`; the released checkpoints say `num_experts`.
    #[serde(alias = "num_local_experts")]
    pub num_experts: i64,
    pub num_experts_per_tok: i64,
    pub moe_intermediate_size: i64,
    #[serde(default = "one")]
    pub decoder_sparse_step: usize,
    #[serde(default)]
    pub mlp_only_layers: Vec<usize>,
    #[serde(default)]
    pub norm_topk_prob: bool,
}

fn one() -> usize {
    1
}

impl Config {
    /// Whether layer `i` is a mixture of experts (else a dense MLP of `intermediate_size`).
    pub fn is_sparse(&self, i: usize) -> bool {
        !self.mlp_only_layers.contains(&i)
            && self.num_experts > 0
            && self.decoder_sparse_step > 0
            && (i + 1).is_multiple_of(self.decoder_sparse_step)
    }

    fn validate(&self) -> Result<(), LoadError> {
        if self.num_experts > 0 && !(1..=self.num_experts).contains(&self.num_experts_per_tok) {
            return Err(LoadError::InvalidConfig(format!(
                "num_experts_per_tok {} must be between 1 and num_experts {}",
                self.num_experts_per_tok, self.num_experts
            )));
        }
        if self.moe_intermediate_size <= 0 {
            return Err(LoadError::InvalidConfig("moe_intermediate_size must be positive".into()));
        }
        Ok(())
    }
}

pub struct SparseMoe {
    router: Linear,
    experts: Experts,
    top_k: i64,
    norm_topk_prob: bool,
}

impl SparseMoe {
    fn load(w: &Loader<'_>, config: &Config) -> Result<Self, LoadError> {
        let hidden = config.base.base.hidden_size;
        let router = Linear::load(&w.at("gate"), hidden, config.num_experts, false)?;
        let experts =
            Experts::load(&w.at("experts"), config.num_experts, hidden, config.moe_intermediate_size, QWEN_MLP)?;
        Ok(Self { router, experts, top_k: config.num_experts_per_tok, norm_topk_prob: config.norm_topk_prob })
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Tensor, _: Option<&Tensor>) -> Tensor {
        // Router scores softmaxed in float32, top-k, optionally renormalised, back to the model
        // dtype — transformers' `Qwen3MoeTopKRouter`.
        let probs = self.router.forward(x).softmax(-1, Kind::Float);
        let (mut weights, chosen) = probs.topk(self.top_k, -1, true, true);
        if self.norm_topk_prob {
            weights = &weights / weights.sum_dim_intlist(-1, true, Kind::Float);
        }
        self.experts.mix(x, &chosen, &weights.to_kind(x.kind()))
    }
}

/// The stack's shape in `kind`, from the config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.validate()?;
    let base = &config.base.base;
    let mut shape = base.stack_shape(Architecture::Qwen3Moe, kind)?;
    // A routed token goes through top-k experts (plus a router row), a dense layer's MLP once.
    shape.spec.intermediate_size =
        base.intermediate_size.max(config.num_experts_per_tok * config.moe_intermediate_size + config.num_experts);
    Ok(shape)
}

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let base = &config.base.base;
    let shape = shape(config, w.kind())?;
    assemble(shape, w, placed, |i, layer| -> Result<BlockParts, LoadError> {
        let attention = Attention::load(
            &layer.at("self_attn"),
            base.hidden_size,
            base.attention_shape(),
            config.base.attention_kind(),
        )?;
        let feed_forward: Box<dyn FeedForward> = if config.is_sparse(i) {
            Box::new(SparseMoe::load(&layer.at("mlp"), config)?)
        } else {
            Box::new(Mlp::load(&layer.at("mlp"), base.hidden_size, base.intermediate_size)?)
        };
        Ok(BlockParts { attention: Box::new(attention), feed_forward, hyper: None })
    })
}
