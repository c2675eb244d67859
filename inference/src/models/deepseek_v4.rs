//! DeepSeek-V4 (DeepSeek-V4-Flash, one of the network's models), read from transformers 5.23's
//! `modeling_deepseek_v4.py` and `configuration_deepseek_v4.py`: every layer type
//! (`sliding_attention`, and the compressed `compressed_sparse_attention` and
//! `heavily_compressed_attention`, [`super::compressed_attention`]), unquantised or as released
//! (FP8 blocks, MXFP4 routed experts). Under `engine: auto` a released checkpoint still goes to
//! vLLM where the ML node has it (docs/native-architectures.md says what remains).
//!
//! What differs from the other architectures here:
//! - **hyper-connected residual streams** (`hc_mult` of them, [`super::hyper_connections`]),
//!   collapsed into each attention's and feed-forward's input and expanded after, and collapsed
//!   once more before the final norm;
//! - **shared-KV multi-query attention**: one key head, which is also the value head
//!   (`wkv` → RMSNorm), queries through a low-rank pair (`wq_a` → RMSNorm → `wq_b`) and an
//!   unweighted RMSNorm per head;
//! - **interleaved partial rotary on each head's last dimensions** (`[nope | rope]`), applied
//!   again to the attention's output with the angle negated (the values carry the keys'
//!   rotation, being the keys);
//! - **a learned sink per head**: one more logit in each query's softmax, whose share is
//!   dropped;
//! - **a sliding window** on every layer: a query sees its own and the `sliding_window - 1`
//!   keys before it; on compressed layers also entries that each pool a window of past tokens
//!   (all of those closed under HCA, the lightning indexer's `index_topk` under CSA), in the
//!   same softmax, and the layer rotates with the "compress" rotary (YaRN, its own theta)
//!   rather than the sliding layers' plain one;
//! - **a grouped low-rank output projection**: the heads in `o_groups` groups, each projected
//!   apart to `o_lora_rank` (`wo_a`, one matmul per group), then mixed (`wo_b`);
//! - **experts** scored by `sqrt(softplus(logits))` (or softmax, sigmoid), chosen by score plus
//!   a correction bias, or on the first `num_hash_layers` layers by a frozen token → experts
//!   table (`tid2eid`, hence the token ids reaching the feed-forward), weights renormalised and
//!   scaled by `routed_scaling_factor`, a shared expert beside them, and every SwiGLU's gate and
//!   up clamped by `swiglu_limit`;
//! - the released names (`layers.N.attn.wq_a`, `layers.N.ffn.experts.E.w1`, `layers.N.hc_attn_fn`,
//!   `embed.weight`, `hc_head_fn`, `head.weight`…, the names transformers' conversion mapping
//!   reads), and the spelling transformers 5.23 writes, which keeps `model.embed_tokens` and
//!   `model.hc_head.hc_fn` under a `model.` prefix and the layers' released names.
//!
//! The KV cache keeps the one key head once (it is the values too), and only the window's
//! `sliding_window - 1` past keys ([`crate::kv_cache::SequenceCache::append_window`]); a
//! compressed layer's compressors keep their own state per sequence beside it. Float32 follows transformers exactly; bfloat16 rounds as the
//! other architectures here do, which for this model is not yet compared with a reference.

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::compressed_attention::{CompressedLayerState, Compressor, Indexer, IndexerShape, closed_windows};
use super::hyper_connections::{BlockHyperConnections, HyperConnection, HyperHead, HyperShape, unweighted_rms_norm};
use super::moe::Experts;
use super::{
    BlockParts, CompressedKv, FeedForward, ModelSpec, SelfAttention, StackNames, StackShape, Transformer, assemble,
};
use crate::batch::{Batch, StepCache};
use crate::checkpoint::Loader;
use crate::config::{Architecture, Rope, RopeFields, RopeScaling};
use crate::error::LoadError;
use crate::layers::{Linear, MIXTRAL_EXPERT, Mlp, RmsNorm, Rotary, Weight};

/// The attention layer types.
const SLIDING: &str = "sliding_attention";
const CSA: &str = "compressed_sparse_attention";
const HCA: &str = "heavily_compressed_attention";
/// transformers' mapping of the released `compress_ratios` to layer types.
const COMPRESS_RATIO_TYPES: [(i64, &str); 3] = [(0, SLIDING), (4, CSA), (128, HCA)];

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    #[serde(default = "one")]
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub q_lora_rank: i64,
    pub o_groups: i64,
    pub o_lora_rank: i64,
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// The released spelling of the rotated width.
    #[serde(default)]
    pub qk_rope_head_dim: Option<i64>,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// transformers 5's `{"main": {...}, "compress": {...}}`; the sliding layers use `main`.
    #[serde(default)]
    pub rope_parameters: Option<Value>,
    pub sliding_window: i64,
    pub hc_mult: i64,
    #[serde(default = "HyperShape::default_sinkhorn_iters")]
    pub hc_sinkhorn_iters: i64,
    #[serde(default = "HyperShape::default_eps")]
    pub hc_eps: f64,
    pub n_routed_experts: i64,
    #[serde(default = "one")]
    pub n_shared_experts: i64,
    pub num_experts_per_tok: i64,
    pub moe_intermediate_size: i64,
    #[serde(default = "default_scoring")]
    pub scoring_func: String,
    #[serde(default = "default_scaling")]
    pub routed_scaling_factor: f64,
    #[serde(default = "default_swiglu_limit")]
    pub swiglu_limit: f64,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// The released spelling of `layer_types` (0 sliding, 4 CSA, 128 HCA per layer).
    #[serde(default)]
    pub compress_ratios: Option<Vec<i64>>,
    #[serde(default)]
    pub mlp_layer_types: Option<Vec<String>>,
    /// The released spelling of `mlp_layer_types`: this many hash-routed layers first.
    #[serde(default)]
    pub num_hash_layers: Option<usize>,
    /// Tokens per compressed entry by layer type (transformers' spelling).
    #[serde(default)]
    pub compress_rates: Option<std::collections::HashMap<String, i64>>,
    /// The released spellings of `compress_rates`.
    #[serde(default)]
    pub compress_rate_csa: Option<i64>,
    #[serde(default)]
    pub compress_rate_hca: Option<i64>,
    /// The compressed layers' rotary base.
    #[serde(default = "default_compress_rope_theta")]
    pub compress_rope_theta: f64,
    /// The released spelling of the compressed layers' YaRN (transformers 5 folds it into
    /// `rope_parameters.compress`).
    #[serde(default)]
    pub rope_scaling: Option<Value>,
    #[serde(default = "default_index_heads")]
    pub index_n_heads: i64,
    #[serde(default = "default_index_head_dim")]
    pub index_head_dim: i64,
    #[serde(default = "default_index_topk")]
    pub index_topk: i64,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: i64,
    #[serde(default)]
    pub hidden_act: Option<String>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

fn one() -> i64 {
    1
}
fn default_rope_theta() -> f64 {
    10000.0
}
fn default_scoring() -> String {
    "sqrtsoftplus".into()
}
fn default_scaling() -> f64 {
    1.5
}
fn default_swiglu_limit() -> f64 {
    10.0
}
fn default_compress_rope_theta() -> f64 {
    160_000.0
}
fn default_index_heads() -> i64 {
    64
}
fn default_index_head_dim() -> i64 {
    128
}
fn default_index_topk() -> i64 {
    512
}

/// How a router turns logits into scores.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Scoring {
    SqrtSoftplus,
    Softmax,
    Sigmoid,
}

/// The fields that say which attention each layer has, read alone (a config the engine cannot
/// run is told apart before anything else is parsed).
#[derive(Debug, Clone, Deserialize)]
struct LayerSchedule {
    #[serde(default = "default_layers")]
    num_hidden_layers: usize,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
    #[serde(default)]
    compress_ratios: Option<Vec<i64>>,
}

/// transformers' default layer count (DeepSeek-V4-Flash's).
fn default_layers() -> usize {
    43
}

/// `Ok` where this engine runs the DeepSeek-V4 `config`: its layers of known types, its
/// weights unquantised or quantised as the releases are (FP8 blocks, the routed experts in
/// FP8 or MXFP4 by `expert_dtype`); else why not.
pub fn check_native(config: &Value) -> Result<(), LoadError> {
    let schedule: LayerSchedule =
        serde_json::from_value(config.clone()).map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
    schedule.resolve()?;
    crate::config::fp8_block(config)?;
    // Where the release puts it (the top level), or where transformers moves it to.
    let expert_dtype = config
        .get("expert_dtype")
        .or_else(|| config.get("quantization_config").and_then(|q| q.get("expert_dtype")))
        .filter(|d| !d.is_null());
    if let Some(dtype) = expert_dtype
        && !matches!(dtype.as_str(), Some("fp4" | "fp8"))
    {
        return Err(LoadError::Quantization(format!(
            "deepseek_v4: expert_dtype {dtype} (the native engine loads fp4 and fp8 experts)"
        )));
    }
    Ok(())
}

impl LayerSchedule {
    /// Each layer's attention type, as transformers resolves it: `layer_types`, else the
    /// released `compress_ratios`, else its default (compressed layers throughout).
    fn resolve(&self) -> Result<Vec<String>, LoadError> {
        let n = self.num_hidden_layers;
        let types: Vec<String> = match (&self.layer_types, &self.compress_ratios) {
            (Some(types), _) => types.clone(),
            (None, Some(ratios)) => ratios
                .iter()
                .map(|r| {
                    COMPRESS_RATIO_TYPES.iter().find(|(ratio, _)| ratio == r).map(|(_, t)| t.to_string()).ok_or_else(
                        || LoadError::InvalidConfig(format!("compress_ratios: {r} is none of 0, 4 and 128")),
                    )
                })
                .collect::<Result<_, _>>()?,
            // transformers' default: two HCA layers, then CSA and HCA in turn.
            (None, None) => {
                (0..n)
                    .map(|i| {
                        if i >= 2 && i % 2 == 1 {
                            "compressed_sparse_attention"
                        } else {
                            "heavily_compressed_attention"
                        }
                    })
                    .map(String::from)
                    .collect()
            }
        };
        if types.len() < n {
            return Err(LoadError::InvalidConfig(format!("{} layer types for {n} layers", types.len())));
        }
        if let Some((i, t)) = types[..n].iter().enumerate().find(|(_, t)| ![SLIDING, CSA, HCA].contains(&t.as_str())) {
            return Err(LoadError::InvalidConfig(format!(
                "layer {i}'s type {t:?} is none of {SLIDING}, {CSA} and {HCA}"
            )));
        }
        Ok(types[..n].to_vec())
    }
}

impl Config {
    /// Each layer's attention type (see [`LayerSchedule::resolve`]).
    pub fn layer_types(&self) -> Result<Vec<String>, LoadError> {
        LayerSchedule {
            num_hidden_layers: self.num_hidden_layers,
            layer_types: self.layer_types.clone(),
            compress_ratios: self.compress_ratios.clone(),
        }
        .resolve()
    }

    /// Whether layer `i`'s experts are chosen by token id.
    fn hash_routed(&self, i: usize) -> bool {
        match &self.mlp_layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "hash_moe"),
            None => i < self.num_hash_layers.unwrap_or(3),
        }
    }

    /// The rotated width of each head (its last dimensions).
    pub fn rope_dim(&self) -> Result<i64, LoadError> {
        let from_main = self.main_rope().and_then(|m| m.get("partial_rotary_factor")).and_then(Value::as_f64);
        let factor = from_main
            .or(self.partial_rotary_factor)
            .or(self.qk_rope_head_dim.map(|d| d as f64 / self.head_dim as f64))
            .unwrap_or(64.0 / 512.0);
        let dim = (self.head_dim as f64 * factor) as i64;
        if dim <= 0 || dim > self.head_dim || dim % 2 != 0 {
            return Err(LoadError::InvalidConfig(format!(
                "the rotary width {dim} (head_dim {} × partial_rotary_factor {factor}) must be even and between 2 \
                 and head_dim",
                self.head_dim
            )));
        }
        Ok(dim)
    }

    fn main_rope(&self) -> Option<&Value> {
        self.rope_parameters.as_ref().and_then(|p| p.get("main"))
    }

    /// Tokens per entry of a compressed layer type: `compress_rates`, the released
    /// `compress_rate_*`, or transformers' defaults (4 and 128).
    fn compress_rate(&self, layer_type: &str) -> i64 {
        let legacy = if layer_type == CSA { self.compress_rate_csa } else { self.compress_rate_hca };
        self.compress_rates
            .as_ref()
            .and_then(|r| r.get(layer_type).copied())
            .or(legacy)
            .unwrap_or(if layer_type == CSA { 4 } else { 128 })
    }

    /// The compressed layers' rotary, as transformers 5.23 resolves it: `rope_parameters.compress`
    /// where the config has it, else the top-level rope settings (`rope_scaling` in the released
    /// spelling) with `compress_rope_theta` and, under YaRN, no scaling of cos/sin
    /// (`attention_factor` 1: the reference implementation applies none).
    fn compress_rope(&self) -> Result<Rope, LoadError> {
        let max = self.max_position_embeddings as usize;
        if let Some(compress) = self.rope_parameters.as_ref().and_then(|p| p.get("compress")) {
            let fields = RopeFields { rope_theta: None, rope_scaling: None, rope_parameters: Some(compress.clone()) };
            return fields.resolve(max);
        }
        let mut params = match self.rope_parameters.as_ref().or(self.rope_scaling.as_ref()) {
            Some(Value::Object(p)) => p.clone(),
            _ => Default::default(),
        };
        params.insert("rope_theta".into(), self.compress_rope_theta.into());
        let yarn = ["rope_type", "type"].iter().any(|k| params.get(*k).and_then(Value::as_str) == Some("yarn"));
        if yarn && !params.contains_key("attention_factor") {
            params.insert("attention_factor".into(), 1.0.into());
        }
        RopeFields { rope_theta: None, rope_scaling: None, rope_parameters: Some(Value::Object(params)) }.resolve(max)
    }

    /// The sliding layers' rotary: plain (transformers gives YaRN to the compressed layers only).
    fn rope(&self) -> Result<Rope, LoadError> {
        let main = self.main_rope();
        if let Some(kind) = main.and_then(|m| m.get("rope_type")).and_then(Value::as_str).filter(|t| *t != "default") {
            return Err(LoadError::InvalidConfig(format!(
                "rope_parameters.main.rope_type {kind:?}: the sliding layers' rotary is plain (default)"
            )));
        }
        let theta = main.and_then(|m| m.get("rope_theta")).and_then(Value::as_f64).unwrap_or(self.rope_theta);
        Ok(Rope { theta, scaling: RopeScaling::Default })
    }

    fn scoring(&self) -> Result<Scoring, LoadError> {
        match self.scoring_func.as_str() {
            "sqrtsoftplus" => Ok(Scoring::SqrtSoftplus),
            "softmax" => Ok(Scoring::Softmax),
            "sigmoid" => Ok(Scoring::Sigmoid),
            other => Err(LoadError::InvalidConfig(format!(
                "scoring_func {other:?} is none of sqrtsoftplus, softmax and sigmoid"
            ))),
        }
    }

    /// What transformers leaves to a shape error, named.
    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        let types = self.layer_types()?;
        for kind in [CSA, HCA].iter().filter(|k| types.iter().any(|t| t == *k)) {
            if self.compress_rate(kind) < 1 {
                return invalid(format!("{kind}'s compress rate must be at least 1"));
            }
        }
        if types.iter().any(|t| t == CSA) && (self.index_n_heads < 1 || self.index_topk < 1 || self.index_head_dim < 2)
        {
            return invalid("index_n_heads, index_topk and index_head_dim must be positive".into());
        }
        if types.iter().any(|t| t == CSA) && self.index_head_dim < self.rope_dim()? {
            return invalid(format!(
                "index_head_dim {} is narrower than the rotated width {}",
                self.index_head_dim,
                self.rope_dim()?
            ));
        }
        if types.iter().any(|t| t != SLIDING) {
            self.compress_rope()?;
        }
        if self.num_key_value_heads != 1 {
            return invalid(format!(
                "num_key_value_heads {}: DeepSeek-V4's attention has one key-and-value head",
                self.num_key_value_heads
            ));
        }
        if self.o_groups <= 0 || self.num_attention_heads % self.o_groups != 0 {
            return invalid(format!(
                "o_groups {} must divide num_attention_heads {}",
                self.o_groups, self.num_attention_heads
            ));
        }
        if !(1..=self.n_routed_experts).contains(&self.num_experts_per_tok) {
            return invalid(format!(
                "num_experts_per_tok {} must be between 1 and n_routed_experts {}",
                self.num_experts_per_tok, self.n_routed_experts
            ));
        }
        if self.n_shared_experts != 1 {
            return invalid(format!("n_shared_experts {}: one shared expert is supported", self.n_shared_experts));
        }
        if self.hc_mult < 1 || self.hc_sinkhorn_iters < 1 || self.sliding_window < 1 {
            return invalid("hc_mult, hc_sinkhorn_iters and sliding_window must be at least 1".into());
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return invalid(format!("hidden_act {act:?}: DeepSeek-V4's experts are SwiGLU (silu)"));
        }
        if self.attention_bias || self.mlp_bias {
            return invalid("attention_bias or mlp_bias: DeepSeek-V4's projections have no bias".into());
        }
        self.scoring()?;
        self.rope_dim().map(|_| ())
    }

    /// What each compressed layer keeps per sequence (see `compressed_attention`): entries of
    /// `head_dim` (and under CSA the indexer's of `index_head_dim`) per window; the open window's
    /// projections and gates (two series each under CSA) and CSA's last window's first series
    /// with its gates.
    fn compressed_kv(&self) -> Result<Vec<CompressedKv>, LoadError> {
        let (d, index) = (self.head_dim, self.index_head_dim);
        Ok(self
            .layer_types()?
            .iter()
            .filter(|t| *t != SLIDING)
            .map(|t| {
                let rate = self.compress_rate(t);
                if t == CSA {
                    let held = |d: i64| (rate - 1) * 4 * d + rate * 2 * d;
                    CompressedKv { width: d + index, rate, held: held(d) + held(index) }
                } else {
                    CompressedKv { width: d, rate, held: (rate - 1) * 2 * d }
                }
            })
            .collect())
    }

    fn hyper_shape(&self) -> HyperShape {
        HyperShape {
            streams: self.hc_mult,
            hidden: self.hidden_size,
            sinkhorn_iters: self.hc_sinkhorn_iters,
            eps: self.hc_eps,
            norm_eps: self.rms_norm_eps,
        }
    }
}

/// A compressed layer's long-range part: its rotary (the "compress" one, which its queries and
/// keys take too), its compressor and, under CSA, its indexer.
struct Compression {
    rotary: Rotary,
    compressor: Compressor,
    indexer: Option<Indexer>,
    rate: i64,
}

impl Compression {
    /// One sequence's entries after its new rows, and which of them each row's query sees
    /// (`[tokens, entries]`).
    fn long_range(
        &self,
        x: &Tensor,
        q_residual: &Tensor,
        positions: &Tensor,
        state: Option<&mut CompressedLayerState>,
    ) -> (Tensor, Tensor) {
        let (compressor, indexer) = match state {
            Some(s) => (Some(&mut s.compressor), Some(&mut s.indexer)),
            None => (None, None),
        };
        let entries = self.compressor.entries(x, compressor, &self.rotary);
        let visible = match &self.indexer {
            Some(index) => index.visible(x, q_residual, positions, indexer, &self.rotary),
            None => {
                let entry = Tensor::arange(entries.size()[0], (Kind::Int64, x.device())).unsqueeze(0);
                entry.lt_tensor(&closed_windows(positions, self.rate).unsqueeze(1))
            }
        };
        (entries, visible)
    }
}

/// DeepSeek-V4's attention.
pub struct Attention {
    q_a: Linear,
    q_a_norm: RmsNorm,
    q_b: Linear,
    /// The one key head, which is the value head too.
    kv: Linear,
    kv_norm: RmsNorm,
    /// `[o_groups × o_lora_rank, heads × head_dim / o_groups]`: each group's own projection.
    o_a: Weight,
    o_b: Linear,
    /// `[heads]`, float32.
    sinks: Tensor,
    heads: i64,
    head_dim: i64,
    groups: i64,
    o_lora_rank: i64,
    window: i64,
    eps: f64,
    /// Compressed layers' long-range part; `None` on sliding-window layers.
    compression: Option<Compression>,
}

impl Attention {
    fn load(w: &Loader, c: &Config, layer_type: &str) -> Result<Self, LoadError> {
        let (heads, head_dim, hidden) = (c.num_attention_heads, c.head_dim, c.hidden_size);
        let per_group = heads * head_dim / c.o_groups;
        let compression = if layer_type == SLIDING {
            None
        } else {
            let rate = c.compress_rate(layer_type);
            let eps = c.rms_norm_eps;
            let indexer = if layer_type == CSA {
                let shape = IndexerShape {
                    hidden,
                    q_lora_rank: c.q_lora_rank,
                    heads: c.index_n_heads,
                    head_dim: c.index_head_dim,
                    rate,
                    top_k: c.index_topk,
                };
                Some(Indexer::load(&w.at("indexer"), shape, eps)?)
            } else {
                None
            };
            Some(Compression {
                rotary: Rotary::new(&c.compress_rope()?, c.rope_dim()?).interleaved(),
                compressor: Compressor::load(&w.at("compressor"), hidden, head_dim, rate, layer_type == CSA, eps)?,
                indexer,
                rate,
            })
        };
        Ok(Self {
            q_a: Linear::load(&w.at("wq_a"), hidden, c.q_lora_rank, false)?,
            q_a_norm: RmsNorm::load(&w.at("q_norm"), c.q_lora_rank, c.rms_norm_eps)?,
            q_b: Linear::load(&w.at("wq_b"), c.q_lora_rank, heads * head_dim, false)?,
            kv: Linear::load(&w.at("wkv"), hidden, head_dim, false)?,
            kv_norm: RmsNorm::load(&w.at("norm"), head_dim, c.rms_norm_eps)?,
            o_a: Weight::load(&w.at("wo_a"), c.o_groups * c.o_lora_rank, per_group)?,
            o_b: Linear::load(&w.at("wo_b"), c.o_groups * c.o_lora_rank, hidden, false)?,
            sinks: w.with_kind(Kind::Float).tensor("attn_sink", &[heads])?,
            heads,
            head_dim,
            groups: c.o_groups,
            o_lora_rank: c.o_lora_rank,
            window: c.sliding_window,
            eps: c.rms_norm_eps,
            compression,
        })
    }

    /// One sequence's new queries `[1, heads, n, head_dim]` (the first at position `past`) over
    /// its keys (= values) `[1, 1, k, head_dim]` (the first at position `first_key`) and, on a
    /// compressed layer, its long-range entries (`[entries, head_dim]`, and which each query
    /// sees, `[n, entries]`): each query sees the keys at its position and the `window - 1`
    /// before it, the entries it is shown, and its head's sink takes a share of the softmax that
    /// is dropped.
    fn attend(
        &self,
        q: &Tensor,
        keys: &Tensor,
        (past, first_key): (i64, i64),
        long_range: Option<(Tensor, Tensor)>,
    ) -> Tensor {
        let n = q.size()[2];
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q.matmul(&keys.transpose(-1, -2)) * scale;
        let device = q.device();
        let positions = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(1) + past;
        let keys_at = Tensor::arange(keys.size()[2], (Kind::Int64, device)).unsqueeze(0) + first_key;
        let behind = &positions - &keys_at;
        let hidden = behind.lt(0).logical_or(&behind.ge(self.window));
        let scores = scores.masked_fill(&hidden, f64::NEG_INFINITY);
        let (scores, values) = match long_range {
            None => (scores, keys.shallow_clone()),
            Some((entries, visible)) => {
                let entries = entries.view([1, 1, -1, self.head_dim]);
                let far = q.matmul(&entries.transpose(-1, -2)) * scale;
                let far = far.masked_fill(&visible.logical_not(), f64::NEG_INFINITY);
                (Tensor::cat(&[scores, far], -1), Tensor::cat(&[keys, &entries], 2))
            }
        };
        let total = values.size()[2];
        let sinks = self.sinks.to_kind(scores.kind()).view([1, self.heads, 1, 1]).expand([1, self.heads, n, 1], false);
        let probabilities = Tensor::cat(&[scores, sinks], -1).softmax(-1, q.kind());
        probabilities.narrow(-1, 0, total).matmul(&values)
    }
}

/// transformers' `apply_rotary_pos_emb` for DeepSeek-V4: the last `cos.size(-1)` dimensions of
/// each head of `x` (`[tokens, heads, head_dim]`) rotated in neighbouring pairs (`(x0, x1)` →
/// `(x0 cos − x1 sin, x1 cos + x0 sin)`), computed in float32; the dimensions before them pass.
pub fn rotate_tail(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let rope_dim = cos.size()[cos.dim() - 1];
    let head_dim = x.size()[x.dim() - 1];
    let rope = x.narrow(-1, head_dim - rope_dim, rope_dim);
    let pairs = rope.unflatten(-1, [rope_dim / 2, 2]);
    let swapped = Tensor::stack(&[pairs.select(-1, 1).neg(), pairs.select(-1, 0)], -1).flatten(-2, -1);
    let float = |t: &Tensor| t.to_kind(Kind::Float);
    let rotated = (float(&rope) * float(cos) + float(&swapped) * float(sin)).to_kind(x.kind());
    Tensor::cat(&[x.narrow(-1, 0, head_dim - rope_dim), rotated], -1)
}

impl SelfAttention for Attention {
    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor {
        let (heads, head_dim) = (self.heads, self.head_dim);
        let tokens = x.size()[0];
        // A compressed layer rotates with its own ("compress") rotary.
        let own = self.compression.as_ref().map(|c| c.rotary.cos_sin(&batch.positions(x.device()), x.kind()));
        let (cos, sin) = own.as_ref().map_or((cos, sin), |(c, s)| (c, s));
        let q_residual = self.q_a_norm.forward(&self.q_a.forward(x));
        let q = self.q_b.forward(&q_residual).view([tokens, heads, head_dim]);
        let q = rotate_tail(&unweighted_rms_norm(&q, self.eps), cos, sin);
        let kv = rotate_tail(&self.kv_norm.forward(&self.kv.forward(x)).view([tokens, 1, head_dim]), cos, sin);
        // `[1, heads, tokens, head_dim]`, each sequence a narrow of its tokens.
        let heads_first = |t: &Tensor| t.transpose(0, 1).unsqueeze(0);
        let (q_all, kv_all) = (heads_first(&q), heads_first(&kv));
        let mut outputs = Vec::with_capacity(caches.len());
        for (span, cache) in batch.spans().iter().zip(caches.iter_mut()) {
            let (qs, kvs) = (q_all.narrow(2, span.start, span.len), kv_all.narrow(2, span.start, span.len));
            // The cache keeps only the window's keys: the ones before it are never seen again.
            let (keys, first_key) = match cache {
                Some(cache) => cache.append_window(layer, &kvs, self.window),
                None => (kvs, span.past),
            };
            let long_range = self.compression.as_ref().map(|c| {
                let rows = |t: &Tensor| t.narrow(0, span.start, span.len);
                let positions = Tensor::arange(span.len, (Kind::Int64, x.device())) + span.past;
                let state = cache.as_deref_mut().map(|c| c.state(layer, CompressedLayerState::default));
                c.long_range(&rows(x), &rows(&q_residual), &positions, state)
            });
            outputs.push(self.attend(&qs, &keys, (span.past, first_key), long_range));
        }
        let out = Tensor::cat(&outputs, 2).squeeze_dim(0).transpose(0, 1);
        // The values are the rotated keys: rotating the output back by its query's angle leaves
        // each value's contribution a function of the distance alone.
        let out = rotate_tail(&out, cos, &sin.neg());
        let groups = out.reshape([tokens, self.groups, -1]).transpose(0, 1);
        let o_a = self.o_a.widened().view([self.groups, self.o_lora_rank, -1]).transpose(1, 2);
        let projected = groups.bmm(&o_a).transpose(0, 1).reshape([tokens, self.groups * self.o_lora_rank]);
        self.o_b.forward(&projected)
    }

    fn is_quantised(&self) -> bool {
        // (Compressors and indexers are not counted: the release keeps them in bfloat16.)
        self.q_a.is_quantised()
            && self.q_b.is_quantised()
            && self.kv.is_quantised()
            && self.o_b.is_quantised()
            && matches!(self.o_a, Weight::Fp8Block { .. })
    }
}

/// DeepSeek-V4's mixture of experts: routed experts and one shared expert.
pub struct SparseMoe {
    /// `[experts, hidden]`, float32.
    router: Linear,
    scoring: Scoring,
    /// How experts are chosen: by score plus this bias (float32, zeros where the checkpoint has
    /// none), or by the token's row of a frozen table (`[vocab, top_k]`, int64).
    choice: Choice,
    experts: Experts,
    shared: Mlp,
    top_k: i64,
    scaling: f64,
}

enum Choice {
    Scored { correction_bias: Tensor },
    Hashed { experts_of_token: Tensor },
}

impl SparseMoe {
    fn load(w: &Loader, c: &Config, layer: usize) -> Result<Self, LoadError> {
        let (hidden, count, width) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size);
        let float = w.with_kind(Kind::Float);
        let router = Linear::load(&float.at("gate"), hidden, count, false)?;
        let choice = if c.hash_routed(layer) {
            let table = w.with_kind(Kind::Int64).tensor("gate.tid2eid", &[c.vocab_size, c.num_experts_per_tok])?;
            let out_of_range = table.lt(0).logical_or(&table.ge(count)).any().int64_value(&[]) != 0;
            if out_of_range {
                return Err(LoadError::InvalidConfig(format!(
                    "{}: an expert outside 0..{count}",
                    w.name("gate.tid2eid")
                )));
            }
            Choice::Hashed { experts_of_token: table }
        } else if w.contains("gate.bias") {
            Choice::Scored { correction_bias: float.tensor("gate.bias", &[count])? }
        } else {
            Choice::Scored { correction_bias: Tensor::zeros([count], (Kind::Float, w.device())) }
        };
        let experts = Experts::load(&w.at("experts"), count, hidden, width, MIXTRAL_EXPERT)?;
        let shared = w.at("shared_experts");
        let [gate, up, down] = MIXTRAL_EXPERT;
        let shared = Mlp::from_weights(
            Weight::load(&shared.at(gate), width, hidden)?,
            Weight::load(&shared.at(up), width, hidden)?,
            Weight::load(&shared.at(down), hidden, width)?,
        );
        Ok(Self {
            router,
            scoring: c.scoring()?,
            choice,
            experts: experts.with_swiglu_limit(c.swiglu_limit),
            shared: shared.with_swiglu_limit(c.swiglu_limit),
            top_k: c.num_experts_per_tok,
            scaling: c.routed_scaling_factor,
        })
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Tensor, tokens: Option<&Tensor>) -> Tensor {
        let logits = self.router.forward(&x.to_kind(Kind::Float));
        let scores = match self.scoring {
            Scoring::SqrtSoftplus => logits.softplus().sqrt(),
            Scoring::Softmax => logits.softmax(-1, Kind::Float),
            Scoring::Sigmoid => logits.sigmoid(),
        };
        let chosen = match &self.choice {
            Choice::Scored { correction_bias } => (&scores + correction_bias).topk(self.top_k, -1, true, true).1,
            Choice::Hashed { experts_of_token } => {
                let tokens = tokens.expect("DeepSeek-V4's hash-routed layers choose experts by token id: a step of input embeddings cannot pass them");
                experts_of_token.index_select(0, tokens)
            }
        };
        let weights = scores.gather(-1, &chosen, false);
        let weights = &weights / (weights.sum_dim_intlist(-1, true, Kind::Float) + 1e-20) * self.scaling;
        self.experts.mix(x, &chosen, &weights) + self.shared.forward(x)
    }
}

/// The stack's shape in `kind`, from the config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.validate()?;
    let spec = ModelSpec {
        architecture: Architecture::DeepseekV4,
        hidden_size: config.hidden_size,
        vocab_size: config.vocab_size,
        layers: config.num_hidden_layers,
        max_position_embeddings: config.max_position_embeddings,
        kind,
        kv_kind: kind,
        attention_heads: config.num_attention_heads,
        // One key head, which is the value head too: kept once.
        kv_heads: 1,
        kv_shared: true,
        head_dim: config.head_dim,
        // A routed token goes through top-k experts, the shared one and a router row.
        intermediate_size: (config.num_experts_per_tok + 1) * config.moe_intermediate_size + config.n_routed_experts,
        compressed: config.compressed_kv()?,
        kv_window: Some(config.sliding_window),
        residual_streams: config.hc_mult,
        kv_layers: config.num_hidden_layers,
        linear_attention: None,
    };
    Ok(StackShape {
        spec,
        rms_norm_eps: config.rms_norm_eps,
        tie_word_embeddings: config.tie_word_embeddings,
        rotary: Rotary::new(&config.rope()?, config.rope_dim()?).interleaved(),
        names: TRANSFORMERS_STACK,
    })
}

/// The names transformers 5.23 writes a DeepSeek-V4 checkpoint in.
const TRANSFORMERS_STACK: StackNames =
    StackNames { base: "model", embed: "embed_tokens", norms: ["attn_norm", "ffn_norm"], lm_head: "head" };

/// The names of the released checkpoints: no `model.` prefix, `embed` for the embedding.
const RELEASED_STACK: StackNames = StackNames { base: "", embed: "embed", ..TRANSFORMERS_STACK };

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let mut shape = shape(config, w.kind())?;
    let released = w.contains("embed.weight");
    if released {
        shape.names = RELEASED_STACK;
    }
    let names = shape.names;
    let hyper = config.hyper_shape();
    let layer_types = config.layer_types()?;
    let mut model = assemble(shape, w, placed, |i, layer| -> Result<BlockParts, LoadError> {
        Ok(BlockParts {
            attention: Box::new(Attention::load(&layer.at("attn"), config, &layer_types[i])?),
            feed_forward: Box::new(SparseMoe::load(&layer.at("ffn"), config, i)?),
            hyper: Some(BlockHyperConnections {
                attention: HyperConnection::load(layer, "hc_attn", hyper)?,
                feed_forward: HyperConnection::load(layer, "hc_ffn", hyper)?,
            }),
        })
    })?;
    let last = placed.last().copied().unwrap_or(w.device());
    let head = if released {
        HyperHead::load(&w.on(last), "hc_head_", hyper)?
    } else {
        HyperHead::load(&names.base(w).at("hc_head").on(last), "hc_", hyper)?
    };
    model.hyper_head = Some(head);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Layer types as transformers resolves them: given, from the released `compress_ratios`,
    /// or its default; unknown types and quantised checkpoints refused, named.
    #[test]
    fn layer_schedules_resolve_as_transformers_does_and_quantised_checkpoints_are_refused() {
        let schedule = |v: Value| serde_json::from_value::<LayerSchedule>(v).unwrap().resolve().unwrap();
        assert_eq!(schedule(json!({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128]})), [SLIDING, CSA, HCA]);
        assert!(check_native(&json!({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128]})).is_ok());
        // transformers' default for 5 layers: HCA, HCA, then HCA and CSA in turn.
        assert_eq!(schedule(json!({"num_hidden_layers": 5})), [HCA, HCA, HCA, CSA, HCA]);
        // More types than layers: the first ones (transformers truncates); fewer: refused.
        assert_eq!(schedule(json!({"num_hidden_layers": 1, "compress_ratios": [0, 4]})), [SLIDING]);
        let short = serde_json::from_value::<LayerSchedule>(json!({"num_hidden_layers": 3, "compress_ratios": [0]}));
        assert!(short.unwrap().resolve().is_err());
        let odd = check_native(&json!({"num_hidden_layers": 1, "compress_ratios": [8]})).unwrap_err();
        assert!(odd.to_string().contains("compress_ratios: 8 is none of 0, 4 and 128"), "{odd}");
        let unknown = check_native(&json!({"num_hidden_layers": 2, "layer_types": [SLIDING, "full_attention"]}));
        assert!(unknown.unwrap_err().to_string().contains("layer 1's type \"full_attention\""));
        // The release's quantisation loads; others are refused, named.
        let released = json!({"num_hidden_layers": 1, "compress_ratios": [4], "expert_dtype": "fp4",
            "quantization_config": {"quant_method": "fp8", "scale_fmt": "ue8m0", "weight_block_size": [128, 128]}});
        assert!(check_native(&released).is_ok());
        let base = json!({"num_hidden_layers": 1, "compress_ratios": [4],
            "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp8"}});
        assert!(check_native(&base).is_ok());
        let mut odd_experts = released.clone();
        odd_experts["expert_dtype"] = json!("int4");
        let err = check_native(&odd_experts).unwrap_err().to_string();
        assert!(err.contains("expert_dtype \"int4\""), "{err}");
        let awq =
            json!({"num_hidden_layers": 1, "compress_ratios": [4], "quantization_config": {"quant_method": "awq"}});
        assert!(check_native(&awq).unwrap_err().to_string().contains("quantised (awq)"));
    }

    /// A forward's memory estimate counts the hyper-connected streams: by hand for a small
    /// bfloat16 config (hidden 64, 4 streams, 4 heads of 64 and one key head, 2 of 8 experts of
    /// 32 plus a shared one), 16 rows of one PoC nonce.
    #[test]
    fn forward_bytes_count_the_streams() {
        let config: Config = serde_json::from_value(json!({
            "vocab_size": 320, "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "head_dim": 64, "q_lora_rank": 48, "o_groups": 2, "o_lora_rank": 16, "sliding_window": 4,
            "hc_mult": 4, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "compress_ratios": [0]}))
        .unwrap();
        let spec = shape(&config, Kind::BFloat16).unwrap().spec;
        assert_eq!(spec.residual_streams, 4);
        // A row: 6·64 + (4 + 2·1)·64 + 3·((2 + 1)·32 + 8) = 1080 elements of 2 bytes, and the
        // streams 4·64 four times in bfloat16 and once in float32: 256·(8 + 4) = 3072 bytes.
        let row = 1080 * 2 + 3072;
        // 16·16 query-key pairs × 4 heads × 4 bytes; one row of float32 logits, 320 × 8 bytes.
        assert_eq!(spec.forward_bytes(16, 256, 1), 16 * row + 256 * 4 * 4 + 320 * 8);
        // One stream adds nothing.
        let one = ModelSpec { residual_streams: 1, ..spec.clone() };
        assert_eq!(one.forward_bytes(16, 256, 1), 16 * 1080 * 2 + 256 * 4 * 4 + 320 * 8);
    }

    /// The rotation on each head's last dimensions, in neighbouring pairs, against the pairs
    /// rotated one by one; the leading dimensions untouched, and the negated angle undoing it.
    #[test]
    fn the_tail_of_each_head_rotates_in_neighbouring_pairs() {
        tch::manual_seed(11);
        let cpu = (Kind::Float, Device::Cpu);
        let (tokens, heads, head_dim, rope_dim) = (3, 2, 10, 4);
        let x = Tensor::randn([tokens, heads, head_dim], cpu);
        let angles = Tensor::randn([tokens, 1, rope_dim / 2], cpu);
        let (cos, sin) = (
            angles.cos().repeat_interleave_self_int(2, -1, None::<i64>),
            angles.sin().repeat_interleave_self_int(2, -1, None::<i64>),
        );
        let rotated = rotate_tail(&x, &cos, &sin);
        assert!(rotated.narrow(-1, 0, head_dim - rope_dim).equal(&x.narrow(-1, 0, head_dim - rope_dim)));
        for t in 0..tokens {
            for h in 0..heads {
                for p in 0..rope_dim / 2 {
                    let a = angles.double_value(&[t, 0, p]);
                    let i = head_dim - rope_dim + 2 * p;
                    let (x0, x1) = (x.double_value(&[t, h, i]), x.double_value(&[t, h, i + 1]));
                    let expected = [x0 * a.cos() - x1 * a.sin(), x1 * a.cos() + x0 * a.sin()];
                    for (k, e) in expected.iter().enumerate() {
                        let got = rotated.double_value(&[t, h, i + k as i64]);
                        assert!((got - e).abs() < 1e-5, "token {t} head {h} pair {p}: {got} vs {e}");
                    }
                }
            }
        }
        let back = rotate_tail(&rotated, &cos, &sin.neg());
        assert!((back - &x).abs().max().double_value(&[]) < 1e-5);
    }
}
