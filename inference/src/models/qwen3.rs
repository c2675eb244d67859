//! Qwen3 dense: Qwen2's blocks with RMSNorm over each head's queries and keys before the
//! rotation, an explicit `head_dim`, and biases only when `attention_bias` says so
//! (transformers' `modeling_qwen3.py`).

use serde::Deserialize;
use tch::{Device, Kind};

use super::{BlockParts, StackShape, Transformer, assemble, qwen2};
use crate::checkpoint::Loader;
use crate::config::Architecture;
use crate::error::LoadError;
use crate::layers::{Attention, AttentionKind, Mlp, QkNorm};

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(flatten)]
    pub base: qwen2::Config,
    #[serde(default)]
    pub attention_bias: bool,
}

impl Config {
    pub fn attention_kind(&self) -> AttentionKind {
        AttentionKind {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            qk_norm: Some(QkNorm::PerHead { eps: self.base.rms_norm_eps }),
        }
    }
}

/// The stack's shape in `kind`, from the config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.base.stack_shape(Architecture::Qwen3, kind)
}

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let base = &config.base;
    let shape = shape(config, w.kind())?;
    assemble(shape, w, placed, |_, layer| -> Result<BlockParts, LoadError> {
        let attention =
            Attention::load(&layer.at("self_attn"), base.hidden_size, base.attention_shape(), config.attention_kind())?;
        let mlp = Mlp::load(&layer.at("mlp"), base.hidden_size, base.intermediate_size)?;
        Ok(BlockParts::new(attention, mlp))
    })
}
