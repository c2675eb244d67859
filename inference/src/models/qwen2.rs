//! Qwen2 (Qwen2, Qwen2.5, QwQ): pre-norm blocks of grouped-query attention with biased q/k/v
//! projections and a SwiGLU MLP (transformers' `modeling_qwen2.py`).

use serde::Deserialize;
use tch::{Device, Kind};

use super::{BlockParts, HF_STACK, StackShape, Transformer, assemble};
use crate::checkpoint::Loader;
use crate::config::{Architecture, RopeFields};
use crate::error::LoadError;
use crate::layers::{Attention, AttentionKind, AttentionShape, Mlp, Rotary};

/// `config.json` of a Qwen2 checkpoint (and the fields Qwen3 shares).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    /// Defaults to `num_attention_heads` (no grouping).
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    /// Defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<i64>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default = "silu")]
    pub hidden_act: String,
    #[serde(flatten)]
    pub rope: RopeFields,
}

fn silu() -> String {
    "silu".into()
}

impl Config {
    pub fn kv_heads(&self) -> i64 {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> i64 {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn attention_shape(&self) -> AttentionShape {
        AttentionShape { heads: self.num_attention_heads, kv_heads: self.kv_heads(), head_dim: self.head_dim() }
    }

    /// The checks transformers leaves to a shape error deep in the forward.
    pub fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.kv_heads()),
            ("head_dim", self.head_dim()),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value <= 0 {
                return invalid(format!("{name} must be positive, is {value}"));
            }
        }
        if self.num_hidden_layers == 0 {
            return invalid("num_hidden_layers must be positive".into());
        }
        if self.num_attention_heads % self.kv_heads() != 0 {
            return invalid(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if self.head_dim() % 2 != 0 {
            return invalid(format!("head_dim {} must be even for rotary embeddings", self.head_dim()));
        }
        if self.hidden_act != "silu" {
            return invalid(format!("hidden_act {:?} is not supported (silu)", self.hidden_act));
        }
        if self.use_sliding_window {
            return invalid("use_sliding_window is not supported".into());
        }
        Ok(())
    }

    pub fn stack_shape(&self, architecture: Architecture, kind: Kind) -> Result<StackShape, LoadError> {
        self.validate()?;
        let rope = self.rope.resolve(self.max_position_embeddings as usize)?;
        Ok(StackShape {
            spec: super::ModelSpec {
                architecture,
                hidden_size: self.hidden_size,
                vocab_size: self.vocab_size,
                layers: self.num_hidden_layers,
                max_position_embeddings: self.max_position_embeddings,
                kind,
                kv_kind: kind,
                attention_heads: self.num_attention_heads,
                kv_heads: self.kv_heads(),
                head_dim: self.head_dim(),
                intermediate_size: self.intermediate_size,
                kv_shared: false,
                compressed: Vec::new(),
                residual_streams: 1,
                kv_window: None,
                kv_layers: self.num_hidden_layers,
                linear_attention: None,
            },
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            rotary: Rotary::new(&rope, self.head_dim()),
            names: HF_STACK,
        })
    }
}

/// The stack's shape in `kind`, from the config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.stack_shape(Architecture::Qwen2, kind)
}

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let shape = shape(config, w.kind())?;
    // Qwen2 always biases q/k/v and never the output projection.
    let kind = AttentionKind { qkv_bias: true, o_bias: false, qk_norm: None };
    assemble(shape, w, placed, |_, layer| -> Result<BlockParts, LoadError> {
        let attention = Attention::load(&layer.at("self_attn"), config.hidden_size, config.attention_shape(), kind)?;
        let mlp = Mlp::load(&layer.at("mlp"), config.hidden_size, config.intermediate_size)?;
        Ok(BlockParts::new(attention, mlp))
    })
}
