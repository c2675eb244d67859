//! GLM-5.3-Flash's language model (`glm5_next`, one of the network's models), read from
//! transformers 5.23's `modeling_glm5_next.py` and `configuration_glm5_next.py`: its indexed
//! attention layers (`indexed_attention`) here, its linear ones (`linear_attention`, three of
//! every four in the released model) in [`super::kimi_delta_attention`]
//! (docs/native-architectures.md says what remains).
//!
//! What differs from the other architectures here:
//! - **multi-head latent attention without rotary** (DeepSeek-V3.2's MLA with `qk_rope_head_dim`
//!   0, "NoPE"): queries through a low-rank pair (`q_a_proj` → RMSNorm → `q_b_proj`), keys and
//!   values made per head from one latent per token (`kv_a_proj_with_mqa` → RMSNorm →
//!   `kv_b_proj`), which is all the KV cache keeps;
//! - **DeepSeek sparse attention over pools of tokens**: an indexer scores pools of
//!   `index_kpool` consecutive tokens (each pool's key a learned softmax-weighted average of its
//!   tokens' keys) and each query attends the tokens of its best `index_topk / index_kpool`
//!   complete pools it can see, and those of its own pool not yet complete (the "tail");
//!   layers marked `shared` attend what the indexed layer just before them chose, without an
//!   indexer of their own;
//! - **linear attention** (Kimi Delta Attention) in the other layers: a recurrent state per
//!   sequence instead of keys per token;
//! - the hyper-connected residual streams of DeepSeek-V4 ([`super::hyper_connections`]), whose
//!   final collapse here is their plain mean;
//! - **experts** scored by a sigmoid, chosen by score plus a correction bias within the best
//!   `topk_group` of `n_group` groups (a group ranked by its two best), weights renormalised and
//!   scaled by `routed_scaling_factor`, a shared expert beside them, the first layers dense, and
//!   every SwiGLU (dense, shared and routed) clamped by `swiglu_limit`;
//! - a multimodal checkpoint: the language model under `model.language_model.` and its config
//!   under `text_config` ([`crate::config::text_config`]); the vision tower is not loaded.
//!
//! The KV cache keeps, per token and indexed layer, the latent and, on full indexer layers, the
//! indexer's key and pool-gate scores beside it (one row,
//! [`crate::kv_cache::SequenceCache::append_rows`]), and per sequence and linear layer its
//! state ([`super::kimi_delta_attention::KdaState`]).
//! Float32 follows transformers; bfloat16 rounds as the other architectures here do, which for
//! this model is not compared with a reference.

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::hyper_connections::{BlockHyperConnections, HyperConnection, HyperHead, HyperShape};
use super::kimi_delta_attention::{KdaShape, KimiDeltaAttention};
use super::moe::Experts;
use super::{BlockParts, FeedForward, ModelSpec, SelfAttention, StackNames, StackShape, Transformer, assemble};
use crate::batch::{Batch, StepCache};
use crate::checkpoint::Loader;
use crate::config::{Architecture, Rope, RopeScaling};
use crate::error::LoadError;
use crate::layers::{Linear, Mlp, QWEN_MLP, RmsNorm, Rotary, Weight};

/// The attention layer types.
const INDEXED: &str = "indexed_attention";
const LINEAR: &str = "linear_attention";

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub moe_intermediate_size: i64,
    pub num_hidden_layers: usize,
    pub num_attention_heads: i64,
    #[serde(default)]
    pub num_key_value_heads: Option<i64>,
    #[serde(default = "one")]
    pub n_shared_experts: i64,
    pub n_routed_experts: i64,
    #[serde(default = "default_scaling")]
    pub routed_scaling_factor: f64,
    pub kv_lora_rank: i64,
    pub q_lora_rank: i64,
    #[serde(default)]
    pub qk_rope_head_dim: i64,
    pub v_head_dim: i64,
    pub qk_nope_head_dim: i64,
    #[serde(default = "one")]
    pub n_group: i64,
    #[serde(default = "one")]
    pub topk_group: i64,
    pub num_experts_per_tok: i64,
    #[serde(default = "yes")]
    pub norm_topk_prob: bool,
    #[serde(default)]
    pub hidden_act: Option<String>,
    pub max_position_embeddings: i64,
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub mlp_layer_types: Option<Vec<String>>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "default_index_topk")]
    pub index_topk: i64,
    #[serde(default = "default_index_head_dim")]
    pub index_head_dim: i64,
    #[serde(default = "default_index_heads")]
    pub index_n_heads: i64,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    #[serde(flatten)]
    pub indexer_schedule: IndexerSchedule,
    #[serde(default = "default_swiglu_limit")]
    pub swiglu_limit: f64,
    #[serde(default = "default_hc_mult")]
    pub hc_mult: i64,
    #[serde(default = "HyperShape::default_eps")]
    pub hc_eps: f64,
    #[serde(default = "HyperShape::default_sinkhorn_iters")]
    pub hc_sinkhorn_iters: i64,
    #[serde(default = "default_kpool")]
    pub index_kpool: i64,
    #[serde(default = "yes")]
    pub index_kpool_always_select_tail: bool,
    #[serde(default = "default_linear_head_dim")]
    pub linear_head_dim: i64,
    #[serde(default = "default_linear_heads")]
    pub linear_num_heads: i64,
    #[serde(default = "default_conv_kernel")]
    pub linear_conv_kernel_dim: i64,
    /// `null` for the softplus forget gate; absent, transformers' default bound.
    #[serde(default = "default_lower_bound")]
    pub linear_lower_bound: Option<f64>,
    /// The released config's spelling of the four fields above, which transformers reads over
    /// them.
    #[serde(default)]
    pub linear_attn_config: Option<LinearAttnConfig>,
}

/// `linear_attn_config`: each field present replaces the flat one.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct LinearAttnConfig {
    #[serde(default)]
    pub head_dim: Option<i64>,
    #[serde(default)]
    pub num_heads: Option<i64>,
    #[serde(default)]
    pub short_conv_kernel_size: Option<i64>,
    /// Absent: the flat field; `null`: unbounded, unless `safe_gate` (the default) asks for
    /// transformers' bound of -5.
    #[serde(default, deserialize_with = "present")]
    pub gate_lower_bound: Option<Option<f64>>,
    #[serde(default)]
    pub safe_gate: Option<bool>,
}

/// A field that is present, `null` or not, as `Some` (serde reads a present `null` as `None`).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// Which indexed layers run their own indexer (`full`) and which reuse the last full layer's
/// choice (`shared`), in each spelling transformers reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct IndexerSchedule {
    #[serde(default)]
    pub indexer_types: Option<Vec<String>>,
    /// `"FSSF…"`, or a list of `full`/`shared`.
    #[serde(default)]
    pub index_topk_pattern: Option<Value>,
    #[serde(default)]
    pub index_topk_freq: Option<i64>,
    #[serde(default)]
    pub index_skip_topk_offset: Option<i64>,
}

fn one() -> i64 {
    1
}
fn yes() -> bool {
    true
}
fn default_scaling() -> f64 {
    2.5
}
fn default_index_topk() -> i64 {
    2048
}
fn default_index_head_dim() -> i64 {
    128
}
fn default_index_heads() -> i64 {
    32
}
fn default_swiglu_limit() -> f64 {
    10.0
}
fn default_hc_mult() -> i64 {
    4
}
fn default_kpool() -> i64 {
    16
}
fn default_linear_head_dim() -> i64 {
    128
}
fn default_linear_heads() -> i64 {
    64
}
fn default_conv_kernel() -> i64 {
    4
}
fn default_lower_bound() -> Option<f64> {
    Some(-5.0)
}

/// The fields that say which attention each layer has, read alone (a config the engine cannot
/// run is told apart before anything else is parsed).
#[derive(Debug, Clone, Deserialize)]
struct LayerSchedule {
    #[serde(default = "default_layers")]
    num_hidden_layers: usize,
    #[serde(default)]
    layer_types: Option<Vec<String>>,
}

/// transformers' default layer count (GLM-5.3-Flash's).
fn default_layers() -> usize {
    45
}

impl LayerSchedule {
    /// Each layer's attention type, as transformers resolves it: `layer_types` (`full_attention`
    /// read as `indexed_attention`), else its default (linear layers, every fourth indexed).
    fn resolve(&self) -> Result<Vec<String>, LoadError> {
        let n = self.num_hidden_layers;
        let types: Vec<String> = match &self.layer_types {
            Some(types) => {
                types.iter().map(|t| if t == "full_attention" { INDEXED.to_string() } else { t.clone() }).collect()
            }
            None => (0..n).map(|i| if i % 4 != 3 { LINEAR } else { INDEXED }.to_string()).collect(),
        };
        if types.len() < n {
            return Err(LoadError::InvalidConfig(format!("{} layer types for {n} layers", types.len())));
        }
        if let Some((i, t)) = types[..n].iter().enumerate().find(|(_, t)| ![INDEXED, LINEAR].contains(&t.as_str())) {
            return Err(LoadError::InvalidConfig(format!("layer {i}'s type {t:?} is none of {INDEXED} and {LINEAR}")));
        }
        Ok(types[..n].to_vec())
    }
}

/// `Ok` where this engine runs the `glm5_next` `config` (the checkpoint's, whose
/// [`crate::config::text_config`] is taken here): layer types it knows, unquantised or in FP8
/// blocks; else why not.
pub fn check_native(config: &Value) -> Result<(), LoadError> {
    let text = crate::config::text_config(config);
    let schedule: LayerSchedule =
        serde_json::from_value(text.clone()).map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
    schedule.resolve()?;
    crate::config::fp8_block(&text).map(|_| ())
}

impl IndexerSchedule {
    /// Each layer's indexer mode as transformers resolves it: `indexer_types`, else the
    /// `index_topk_pattern` (`F` full, `S` shared), else every layer past the offset's
    /// `freq`-th from it full (defaults: all full).
    fn resolve(&self, n: usize) -> Result<Vec<String>, LoadError> {
        let modes: Vec<String> = if let Some(types) = &self.indexer_types {
            types.clone()
        } else if let Some(pattern) = &self.index_topk_pattern {
            match pattern {
                Value::String(s) => s
                    .chars()
                    .map(|c| match c {
                        'F' => Ok("full".to_string()),
                        'S' => Ok("shared".to_string()),
                        other => {
                            Err(LoadError::InvalidConfig(format!("index_topk_pattern: {other:?} is neither F nor S")))
                        }
                    })
                    .collect::<Result<_, _>>()?,
                Value::Array(items) => items.iter().map(|v| v.as_str().unwrap_or_default().to_string()).collect(),
                other => return Err(LoadError::InvalidConfig(format!("index_topk_pattern {other} is not a pattern"))),
            }
        } else {
            let freq = self.index_topk_freq.unwrap_or(1).max(1);
            let offset = self.index_skip_topk_offset.unwrap_or(2);
            (0..n as i64)
                .map(|i| if (i - offset + 1).max(0) % freq == 0 { "full" } else { "shared" }.to_string())
                .collect()
        };
        if modes.len() < n {
            return Err(LoadError::InvalidConfig(format!("{} indexer types for {n} layers", modes.len())));
        }
        if let Some((i, m)) = modes[..n].iter().enumerate().find(|(_, m)| !matches!(m.as_str(), "full" | "shared")) {
            return Err(LoadError::InvalidConfig(format!("layer {i}'s indexer type {m:?} is neither full nor shared")));
        }
        Ok(modes[..n].to_vec())
    }
}

impl Config {
    /// Each layer's attention type (see [`LayerSchedule::resolve`]).
    pub fn layer_types(&self) -> Result<Vec<String>, LoadError> {
        LayerSchedule { num_hidden_layers: self.num_hidden_layers, layer_types: self.layer_types.clone() }.resolve()
    }

    /// Whether each layer runs its own indexer (`true`) or reuses the last full layer's choice.
    fn full_indexers(&self) -> Result<Vec<bool>, LoadError> {
        Ok(self.indexer_schedule.resolve(self.num_hidden_layers)?.iter().map(|m| m == "full").collect())
    }

    /// Whether layer `i`'s feed-forward is a mixture of experts (transformers' default: all but
    /// the first three).
    fn sparse(&self, i: usize) -> bool {
        match &self.mlp_layer_types {
            Some(types) => types.get(i).is_some_and(|t| t == "sparse"),
            None => i >= 3,
        }
    }

    /// A query's (and a key's) width per head.
    fn qk_head_dim(&self) -> i64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// What transformers checks, and what it leaves to a shape error, named.
    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        let types = self.layer_types()?;
        let full = self.full_indexers()?;
        // transformers hands a shared layer the choice of the layer just before it, and only an
        // indexed layer with its own indexer hands one on (a linear or shared layer hands on
        // nothing, and transformers fails there).
        let hands_on = |i: usize| types[i] == INDEXED && full[i];
        if let Some(i) = (0..types.len()).find(|&i| types[i] == INDEXED && !full[i] && (i == 0 || !hands_on(i - 1))) {
            return invalid(format!(
                "layer {i} shares the top-k of the layer before it, which is not an {INDEXED} layer with its own \
                 indexer"
            ));
        }
        if types.iter().any(|t| t == LINEAR) {
            let kda = self.kda_shape();
            if kda.heads < 1 || kda.head_dim < 1 || kda.conv_kernel < 1 {
                return invalid(format!(
                    "linear_num_heads {}, linear_head_dim {} and linear_conv_kernel_dim {} must be positive",
                    kda.heads, kda.head_dim, kda.conv_kernel
                ));
            }
        }
        if self.num_key_value_heads.is_some_and(|kv| kv != self.num_attention_heads) {
            return invalid(format!(
                "num_key_value_heads {:?} must equal num_attention_heads {}",
                self.num_key_value_heads, self.num_attention_heads
            ));
        }
        if self.qk_rope_head_dim != 0 {
            return invalid(format!(
                "qk_rope_head_dim {}: GLM-5.3-Flash's indexed attention has no rotary (transformers refuses it too)",
                self.qk_rope_head_dim
            ));
        }
        if self.index_kpool < 1 || self.index_topk < self.index_kpool || self.index_topk % self.index_kpool != 0 {
            return invalid(format!(
                "index_topk {} must be a positive multiple of index_kpool {}",
                self.index_topk, self.index_kpool
            ));
        }
        if self.index_n_heads < 1 || self.index_head_dim < 1 {
            return invalid("index_n_heads and index_head_dim must be positive".into());
        }
        let (experts, groups) = (self.n_routed_experts, self.n_group);
        if groups < 1 || experts % groups != 0 || experts / groups < 2 {
            return invalid(format!(
                "n_group {groups} must divide n_routed_experts {experts} into groups of at least two (a group is ranked \
                 by its two best)"
            ));
        }
        if !(1..=groups).contains(&self.topk_group) {
            return invalid(format!("topk_group {} must be between 1 and n_group {groups}", self.topk_group));
        }
        if !(1..=self.topk_group * experts / groups).contains(&self.num_experts_per_tok) {
            return invalid(format!(
                "num_experts_per_tok {} must be between 1 and the experts of topk_group groups ({})",
                self.num_experts_per_tok,
                self.topk_group * experts / groups
            ));
        }
        if self.hc_mult < 1 || self.hc_sinkhorn_iters < 1 {
            return invalid("hc_mult and hc_sinkhorn_iters must be at least 1".into());
        }
        if let Some(act) = self.hidden_act.as_deref().filter(|a| *a != "silu") {
            return invalid(format!("hidden_act {act:?}: GLM-5.3-Flash's MLPs are SwiGLU (silu)"));
        }
        if self.attention_bias {
            return invalid("attention_bias: the native engine loads GLM-5.3-Flash's projections without bias".into());
        }
        Ok(())
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

    /// The linear layers' shape, `linear_attn_config` read over the flat fields as
    /// transformers reads it.
    fn kda_shape(&self) -> KdaShape {
        let nested = self.linear_attn_config.clone().unwrap_or_default();
        let mut lower_bound = nested.gate_lower_bound.unwrap_or(self.linear_lower_bound);
        if self.linear_attn_config.is_some() && nested.safe_gate.unwrap_or(true) && lower_bound.is_none() {
            lower_bound = Some(-5.0);
        }
        KdaShape {
            hidden: self.hidden_size,
            heads: nested.num_heads.unwrap_or(self.linear_num_heads),
            head_dim: nested.head_dim.unwrap_or(self.linear_head_dim),
            conv_kernel: nested.short_conv_kernel_size.unwrap_or(self.linear_conv_kernel_dim),
            lower_bound,
            norm_eps: self.rms_norm_eps,
        }
    }

    /// The elements one token keeps per layer in the KV cache: the latent, and on full indexer
    /// layers the indexer's key and pool-gate scores.
    fn cache_row(&self, full_indexer: bool) -> i64 {
        self.kv_lora_rank + if full_indexer { 2 * self.index_head_dim } else { 0 }
    }
}

/// The DSA indexer of one layer: its own queries (from the attention's query latent) and keys,
/// the keys pooled `kpool` tokens at a time.
struct Indexer {
    q_b: Linear,
    k: Linear,
    /// LayerNorm over the key, with weight and bias.
    k_norm: (Tensor, Tensor),
    /// Per-head weights of the scores, from the hidden state.
    head_weights: Linear,
    /// `[kpool, head_dim]`: added to the gate scores by position within the pool.
    pool_position: Tensor,
    /// `[head_dim, hidden]`: each token's gate scores, per channel.
    pool_gate: Tensor,
    heads: i64,
    head_dim: i64,
    top_k: i64,
    kpool: i64,
    tail: bool,
}

impl Indexer {
    fn load(w: &Loader, c: &Config) -> Result<Self, LoadError> {
        let (heads, d) = (c.index_n_heads, c.index_head_dim);
        Ok(Self {
            q_b: Linear::load(&w.at("wq_b"), c.q_lora_rank, heads * d, false)?,
            k: Linear::load(&w.at("wk"), c.hidden_size, d, false)?,
            k_norm: (w.tensor("k_norm.weight", &[d])?, w.tensor("k_norm.bias", &[d])?),
            head_weights: Linear::load(&w.at("weights_proj"), c.hidden_size, heads, false)?,
            pool_position: w.tensor("index_kpool_compress_ape", &[c.index_kpool, d])?,
            pool_gate: w.tensor("index_kpool_compress_gate", &[d, c.hidden_size])?,
            heads,
            head_dim: d,
            top_k: c.index_topk,
            kpool: c.index_kpool,
            tail: c.index_kpool_always_select_tail,
        })
    }

    /// Each token's key and pool-gate scores, `[tokens, 2 × head_dim]`: what the cache keeps.
    fn keys(&self, x: &Tensor) -> Tensor {
        let d = self.head_dim;
        let (weight, bias) = &self.k_norm;
        let k = self.k.forward(x).layer_norm([d], Some(weight), Some(bias), 1e-6, false);
        let gate = x.linear(&self.pool_gate, None::<Tensor>);
        Tensor::cat(&[k, gate], -1)
    }

    /// Which keys each of one sequence's new tokens attends, bool `[n, keys]`: `x` and
    /// `q_residual` its new rows, `keys` every token's indexer keys so far (`[keys, 2 ×
    /// head_dim]`, the new ones last), the first new token at position `past`.
    fn choose(&self, x: &Tensor, q_residual: &Tensor, keys: &Tensor, past: i64) -> Tensor {
        let (n, total, d, kpool) = (x.size()[0], keys.size()[0], self.head_dim, self.kpool);
        let device = x.device();
        let positions = Tensor::arange(n, (Kind::Int64, device)) + past;
        let mut chosen = Tensor::zeros([n, total], (Kind::Bool, device));
        // Only complete pools are candidates; the pool still filling is the tail's.
        let pools = total / kpool;
        if pools > 0 {
            let pooled = keys.narrow(0, 0, pools * kpool).reshape([pools, kpool, 2 * d]);
            let (k, gate) = (pooled.narrow(-1, 0, d), pooled.narrow(-1, d, d));
            // A learned average of each pool's keys: softmax over the pool's positions, per
            // channel, in float32, applied in the keys' dtype.
            let share = (gate.to_kind(Kind::Float) + self.pool_position.to_kind(Kind::Float).unsqueeze(0))
                .softmax(1, Kind::Float)
                .to_kind(k.kind());
            let pool_keys = (share * &k).sum_dim_intlist(1, false, k.kind());
            let q = self.q_b.forward(q_residual).view([n, self.heads, d]).to_kind(Kind::Float);
            let scores = (q.matmul(&pool_keys.to_kind(Kind::Float).transpose(0, 1)) * (d as f64).powf(-0.5)).relu();
            let weights = self.head_weights.forward(x).to_kind(Kind::Float) * (self.heads as f64).powf(-0.5);
            let index = weights.unsqueeze(1).bmm(&scores).squeeze_dim(1);
            // A pool is a candidate once its last token is visible to the query.
            let pool_end = Tensor::arange(pools, (Kind::Int64, device)) * kpool + (kpool - 1);
            let candidate = pool_end.unsqueeze(0).le_tensor(&positions.unsqueeze(1));
            let index = index.masked_fill(&candidate.logical_not(), f32::MIN as f64);
            let picks = (self.top_k / kpool).min(pools);
            let best = index.topk(picks, -1, true, true).1;
            let picked =
                Tensor::zeros([n, pools], (Kind::Bool, device)).scatter(1, &best, &candidate.gather(1, &best, false));
            let per_token = picked.repeat_interleave_self_int(kpool, 1, None::<i64>);
            chosen.narrow(1, 0, pools * kpool).copy_(&per_token);
        }
        if self.tail {
            // The query's own pool, not yet complete: its tokens up to the query's.
            let tail_start = (&positions + 1) - (&positions + 1).remainder(kpool);
            let key_at = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
            let tail =
                key_at.ge_tensor(&tail_start.unsqueeze(1)).logical_and(&key_at.le_tensor(&positions.unsqueeze(1)));
            chosen = chosen.logical_or(&tail);
        }
        chosen
    }
}

/// How an indexed layer knows which keys its queries attend: per sequence, which of its keys
/// each new token attends (bool `[new tokens, keys]`).
enum Selection {
    /// Its own indexer.
    Full(Indexer),
    /// The choice the layer before handed on ([`Batch::hand_on`]).
    Shared,
}

/// GLM-5.3-Flash's indexed attention (MLA without rotary, sparse by the indexer's choice).
pub struct Attention {
    q_a: Linear,
    q_a_norm: RmsNorm,
    q_b: Linear,
    kv_a: Linear,
    kv_a_norm: RmsNorm,
    /// `[heads × (nope + v), kv_lora_rank]`: the latent to each head's key and value.
    kv_b: Linear,
    o: Linear,
    heads: i64,
    qk_dim: i64,
    v_dim: i64,
    latent: i64,
    selection: Selection,
    /// Whether the next layer is a shared one, which takes this one's choice.
    hands_on: bool,
    /// The most keys a query is given: its pools' tokens (`index_topk`) and its own pool's
    /// tail (up to `index_kpool - 1` before it, itself included).
    most_chosen: i64,
}

impl Attention {
    fn load(w: &Loader, c: &Config, full_indexer: bool, hands_on: bool) -> Result<Self, LoadError> {
        let (heads, hidden) = (c.num_attention_heads, c.hidden_size);
        let selection =
            if full_indexer { Selection::Full(Indexer::load(&w.at("indexer"), c)?) } else { Selection::Shared };
        Ok(Self {
            q_a: Linear::load(&w.at("q_a_proj"), hidden, c.q_lora_rank, false)?,
            q_a_norm: RmsNorm::load(&w.at("q_a_layernorm"), c.q_lora_rank, c.rms_norm_eps)?,
            q_b: Linear::load(&w.at("q_b_proj"), c.q_lora_rank, heads * c.qk_head_dim(), false)?,
            kv_a: Linear::load(&w.at("kv_a_proj_with_mqa"), hidden, c.kv_lora_rank, false)?,
            kv_a_norm: RmsNorm::load(&w.at("kv_a_layernorm"), c.kv_lora_rank, c.rms_norm_eps)?,
            kv_b: Linear::load(&w.at("kv_b_proj"), c.kv_lora_rank, heads * (c.qk_nope_head_dim + c.v_head_dim), false)?,
            o: Linear::load(&w.at("o_proj"), heads * c.v_head_dim, hidden, false)?,
            heads,
            qk_dim: c.qk_head_dim(),
            v_dim: c.v_head_dim,
            latent: c.kv_lora_rank,
            selection,
            hands_on,
            most_chosen: c.index_topk + if c.index_kpool_always_select_tail { c.index_kpool - 1 } else { 0 },
        })
    }

    /// One sequence's new queries `[heads, n, qk_dim]` over the keys and values its latents make
    /// (`[keys, latent]`), each query only on the keys `chosen` for it (`[n, keys]`).
    ///
    /// A few queries over many keys (decoding) take the keys' projection into the queries and
    /// the values' into the output instead (MLA's absorption, as vLLM decodes), and attend only
    /// the latents chosen for them, gathered (at most [`Self::most_chosen`] a query, picked
    /// without reading the choice back to the host): a step's attention then costs the same
    /// however long the sequence. More queries (a prompt) expand the latents, which is then the
    /// cheaper.
    fn attend(&self, q: &Tensor, latents: &Tensor, chosen: &Tensor) -> Tensor {
        let (n, keys_count) = (q.size()[1], latents.size()[0]);
        let scale = (self.qk_dim as f64).powf(-0.5);
        let attended = |scores: Tensor, values: &Tensor| {
            let scores = scores.masked_fill(&chosen.logical_not().unsqueeze(0), f64::NEG_INFINITY);
            scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(values)
        };
        if 4 * n < keys_count {
            let w = self.kv_b.widened_weight().view([self.heads, self.qk_dim + self.v_dim, self.latent]);
            let (to_key, to_value) = (w.narrow(1, 0, self.qk_dim), w.narrow(1, self.qk_dim, self.v_dim));
            // Each query's chosen keys first (ones before zeros), `[n, width]`, and their latents.
            let width = self.most_chosen.min(keys_count);
            let (flags, picked) = chosen.to_kind(Kind::Float).topk(width, -1, true, false);
            let gathered = latents.index_select(0, &picked.flatten(0, -1)).view([n, width, self.latent]);
            // `[n, heads, …]`: each query against its own gathered latents.
            let q_latent = q.matmul(&to_key).transpose(0, 1);
            let scores = q_latent.matmul(&gathered.transpose(1, 2)) * scale;
            let scores = scores.masked_fill(&flags.eq(0.0).unsqueeze(1), f64::NEG_INFINITY);
            let context = scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(&gathered).transpose(0, 1);
            return context.matmul(&to_value.transpose(1, 2));
        }
        let kv = self.kv_b.forward(latents).view([keys_count, self.heads, self.qk_dim + self.v_dim]).transpose(0, 1);
        let (k, v) = (kv.narrow(-1, 0, self.qk_dim), kv.narrow(-1, self.qk_dim, self.v_dim));
        attended(q.matmul(&k.transpose(-1, -2)) * scale, &v)
    }
}

impl SelfAttention for Attention {
    fn forward(
        &self,
        x: &Tensor,
        _: (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor {
        let tokens = x.size()[0];
        let q_residual = self.q_a_norm.forward(&self.q_a.forward(x));
        let q = self.q_b.forward(&q_residual).view([tokens, self.heads, self.qk_dim]).transpose(0, 1);
        let latent = self.kv_a_norm.forward(&self.kv_a.forward(x));
        // What the cache keeps of each token: the latent, then the indexer's keys.
        let (rows, indexer) = match &self.selection {
            Selection::Full(indexer) => (Tensor::cat(&[&latent, &indexer.keys(x)], -1), Some(indexer)),
            Selection::Shared => (latent, None),
        };
        let handed_on = match indexer {
            Some(_) => Vec::new(),
            None => batch.take_handed_on().expect("the layer before hands on (validated)"),
        };
        let mut choices = Vec::with_capacity(caches.len());
        let mut outputs = Vec::with_capacity(caches.len());
        for (s, (span, cache)) in batch.spans().iter().zip(caches.iter_mut()).enumerate() {
            let new_rows = rows.narrow(0, span.start, span.len);
            let all_rows = match cache {
                Some(cache) => {
                    cache.append_rows(layer, &new_rows.unsqueeze(0).unsqueeze(0)).squeeze_dim(0).squeeze_dim(0)
                }
                None => new_rows,
            };
            let chosen = match indexer {
                Some(indexer) => {
                    let part = |t: &Tensor| t.narrow(0, span.start, span.len);
                    indexer.choose(
                        &part(x),
                        &part(&q_residual),
                        &all_rows.narrow(-1, self.latent, 2 * indexer.head_dim),
                        span.past,
                    )
                }
                // From the layer before, which may sit on another GPU.
                None => handed_on[s].to_device(x.device()),
            };
            let latents = all_rows.narrow(-1, 0, self.latent);
            outputs.push(self.attend(&q.narrow(1, span.start, span.len), &latents, &chosen));
            if self.hands_on {
                choices.push(chosen);
            }
        }
        if self.hands_on {
            batch.hand_on(choices);
        }
        let out = Tensor::cat(&outputs, 1).transpose(0, 1).reshape([tokens, self.heads * self.v_dim]);
        self.o.forward(&out)
    }

    fn is_quantised(&self) -> bool {
        self.q_a.is_quantised() && self.q_b.is_quantised() && self.kv_b.is_quantised() && self.o.is_quantised()
    }
}

/// GLM-5.3-Flash's mixture of experts: group-limited sigmoid routing, one shared expert.
pub struct SparseMoe {
    /// `[experts, hidden]`, float32.
    router: Linear,
    /// Added to the scores for the choice only (float32, zeros where the checkpoint has none).
    correction_bias: Tensor,
    experts: Experts,
    shared: Mlp,
    top_k: i64,
    groups: i64,
    top_groups: i64,
    renormalise: bool,
    scaling: f64,
}

impl SparseMoe {
    fn load(w: &Loader, c: &Config) -> Result<Self, LoadError> {
        let (hidden, count, width) = (c.hidden_size, c.n_routed_experts, c.moe_intermediate_size);
        let float = w.with_kind(Kind::Float);
        let bias = "gate.e_score_correction_bias";
        let correction_bias = if w.contains(bias) {
            float.tensor(bias, &[count])?
        } else {
            Tensor::zeros([count], (Kind::Float, w.device()))
        };
        let shared_width = width * c.n_shared_experts;
        let shared = w.at("shared_experts");
        let [gate, up, down] = QWEN_MLP;
        let shared = Mlp::from_weights(
            Weight::load(&shared.at(gate), shared_width, hidden)?,
            Weight::load(&shared.at(up), shared_width, hidden)?,
            Weight::load(&shared.at(down), hidden, shared_width)?,
        );
        Ok(Self {
            router: Linear::load(&float.at("gate"), hidden, count, false)?,
            correction_bias,
            experts: Experts::load(&w.at("experts"), count, hidden, width, QWEN_MLP)?.with_swiglu_limit(c.swiglu_limit),
            shared: shared.with_swiglu_limit(c.swiglu_limit),
            top_k: c.num_experts_per_tok,
            groups: c.n_group,
            top_groups: c.topk_group,
            renormalise: c.norm_topk_prob,
            scaling: c.routed_scaling_factor,
        })
    }

    /// Each token's experts and their weights, `[tokens, top_k]` each (int64, float32).
    fn route(&self, x: &Tensor) -> (Tensor, Tensor) {
        let scores = self.router.forward(&x.to_kind(Kind::Float)).sigmoid();
        let for_choice = &scores + &self.correction_bias;
        let tokens = for_choice.size()[0];
        // Groups ranked by the sum of their two best; only the best `top_groups` stay eligible.
        let grouped = for_choice.view([tokens, self.groups, -1]);
        let group_scores = grouped.topk(2, -1, true, true).0.sum_dim_intlist(-1, false, Kind::Float);
        let best_groups = group_scores.topk(self.top_groups, -1, true, false).1;
        let eligible = Tensor::zeros([tokens, self.groups], (Kind::Bool, x.device()))
            .scatter_value(1, &best_groups, 1)
            .unsqueeze(-1)
            .expand_as(&grouped)
            .reshape([tokens, -1]);
        let chosen =
            for_choice.masked_fill(&eligible.logical_not(), f64::NEG_INFINITY).topk(self.top_k, -1, true, true).1;
        let mut weights = scores.gather(-1, &chosen, false);
        if self.renormalise {
            weights = &weights / (weights.sum_dim_intlist(-1, true, Kind::Float) + 1e-20);
        }
        (chosen, weights * self.scaling)
    }
}

impl FeedForward for SparseMoe {
    fn forward(&self, x: &Tensor, _: Option<&Tensor>) -> Tensor {
        let (chosen, weights) = self.route(x);
        self.experts.mix(x, &chosen, &weights) + self.shared.forward(x)
    }
}

/// The stack's shape in `kind`, from the (text) config alone.
pub fn shape(config: &Config, kind: Kind) -> Result<StackShape, LoadError> {
    config.validate()?;
    let full = config.full_indexers()?;
    let types = config.layer_types()?;
    let indexed: Vec<usize> = (0..types.len()).filter(|&i| types[i] == INDEXED).collect();
    let widest = indexed.iter().map(|&i| config.cache_row(full[i])).max().unwrap_or(config.kv_lora_rank);
    let spec = ModelSpec {
        architecture: Architecture::Glm5Next,
        hidden_size: config.hidden_size,
        vocab_size: config.vocab_size,
        layers: config.num_hidden_layers,
        max_position_embeddings: config.max_position_embeddings,
        kind,
        kv_kind: kind,
        attention_heads: config.num_attention_heads,
        // One row per token and indexed layer (the latent, and the indexer's keys on full
        // layers), counted at its widest: the budget is an upper bound where some layers share.
        kv_heads: 1,
        kv_shared: true,
        head_dim: widest,
        // A routed token goes through top-k experts, the shared one and a router row; the
        // dense layers' MLP may be wider.
        intermediate_size: config.intermediate_size.max(
            (config.num_experts_per_tok + config.n_shared_experts) * config.moe_intermediate_size
                + config.n_routed_experts,
        ),
        compressed: Vec::new(),
        kv_window: None,
        residual_streams: config.hc_mult,
        kv_layers: indexed.len(),
        linear_attention: (indexed.len() < types.len()).then(|| config.kda_shape()),
    };
    Ok(StackShape {
        spec,
        rms_norm_eps: config.rms_norm_eps,
        tie_word_embeddings: config.tie_word_embeddings,
        // No rotary anywhere: the stack's is never applied.
        rotary: Rotary::new(&Rope { theta: 10000.0, scaling: RopeScaling::Default }, 2),
        names: MULTIMODAL_STACK,
    })
}

/// Where transformers writes the language model of a multimodal checkpoint.
const MULTIMODAL_STACK: StackNames = StackNames {
    base: "model.language_model",
    embed: "embed_tokens",
    norms: ["input_layernorm", "post_attention_layernorm"],
    lm_head: "lm_head",
};

/// A text-only checkpoint's names.
const TEXT_STACK: StackNames = StackNames { base: "model", ..MULTIMODAL_STACK };

pub fn load(config: &Config, w: &Loader<'_>, placed: &[Device]) -> Result<Transformer, LoadError> {
    let mut shape = shape(config, w.kind())?;
    if !w.contains("model.language_model.embed_tokens.weight") {
        shape.names = TEXT_STACK;
    }
    let hyper = config.hyper_shape();
    let full = config.full_indexers()?;
    let types = config.layer_types()?;
    let mut model = assemble(shape, w, placed, |i, layer| -> Result<BlockParts, LoadError> {
        let at = layer.at("self_attn");
        let attention: Box<dyn SelfAttention> = if types[i] == LINEAR {
            Box::new(KimiDeltaAttention::load(&at, config.kda_shape())?)
        } else {
            // The next layer shares this one's choice (validated: only after a full layer).
            let hands_on = types.get(i + 1).is_some_and(|t| t == INDEXED) && !full[i + 1];
            Box::new(Attention::load(&at, config, full[i], hands_on)?)
        };
        let feed_forward: Box<dyn FeedForward> = if config.sparse(i) {
            Box::new(SparseMoe::load(&layer.at("mlp"), config)?)
        } else {
            Box::new(
                Mlp::load(&layer.at("mlp"), config.hidden_size, config.intermediate_size)?
                    .with_swiglu_limit(config.swiglu_limit),
            )
        };
        Ok(BlockParts {
            attention,
            feed_forward,
            hyper: Some(BlockHyperConnections {
                attention: HyperConnection::load(layer, "hc_attn", hyper)?,
                feed_forward: HyperConnection::load(layer, "hc_ffn", hyper)?,
            }),
        })
    })?;
    model.hyper_head = Some(HyperHead::Mean);
    Ok(model)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Layer and indexer schedules as transformers resolves them; a layer type neither of ours
    /// and quantisations the engine does not load refused, named.
    #[test]
    fn schedules_resolve_as_transformers_does() {
        let layers = |v: Value| serde_json::from_value::<LayerSchedule>(v).unwrap().resolve().unwrap();
        // transformers' default: every fourth layer indexed.
        assert_eq!(layers(json!({"num_hidden_layers": 5})), [LINEAR, LINEAR, LINEAR, INDEXED, LINEAR]);
        assert_eq!(layers(json!({"num_hidden_layers": 2, "layer_types": ["full_attention", INDEXED]})), [INDEXED; 2]);
        let indexers = |v: Value, n| serde_json::from_value::<IndexerSchedule>(v).unwrap().resolve(n).unwrap();
        assert_eq!(indexers(json!({}), 3), ["full"; 3]);
        assert_eq!(indexers(json!({"index_topk_pattern": "FSF"}), 3), ["full", "shared", "full"]);
        // freq 2 from offset 2: layers 0 and 1 full, then shared and full in turn.
        assert_eq!(indexers(json!({"index_topk_freq": 2}), 5), ["full", "full", "shared", "full", "shared"]);
        assert_eq!(indexers(json!({"indexer_types": ["full", "shared"]}), 2), ["full", "shared"]);
        let bad = serde_json::from_value::<IndexerSchedule>(json!({"index_topk_pattern": "FX"})).unwrap().resolve(2);
        assert!(bad.unwrap_err().to_string().contains("'X' is neither F nor S"));

        // GLM-5.3-Flash's own schedule (linear layers and indexed ones) runs, read under
        // text_config; a type of neither kind does not.
        let released = json!({"model_type": "glm5_next", "text_config": {"num_hidden_layers": 4}});
        assert!(check_native(&released).is_ok());
        let sliding = json!({"model_type": "glm5_next", "text_config": {"num_hidden_layers": 2,
            "layer_types": [INDEXED, "sliding_attention"]}});
        let err = check_native(&sliding).unwrap_err().to_string();
        assert!(err.contains("layer 1's type \"sliding_attention\" is none of"), "{err}");
        let awq = json!({"model_type": "glm5_next", "quantization_config": {"quant_method": "awq"},
            "text_config": {"num_hidden_layers": 1, "layer_types": [INDEXED]}});
        assert!(check_native(&awq).unwrap_err().to_string().contains("quantised (awq)"));
    }

    fn tiny() -> Config {
        serde_json::from_value(tiny_json()).unwrap()
    }

    /// What transformers leaves to a shape error or a failure mid-forward is refused at load.
    #[test]
    fn configs_the_forward_cannot_run_are_refused_at_load() {
        assert!(tiny().validate().is_ok());
        let refused = |change: Value, says: &str| {
            let mut v = tiny_json();
            for (k, val) in change.as_object().unwrap() {
                v[k] = val.clone();
            }
            let c: Config = serde_json::from_value(v).unwrap();
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(says), "{change}: {err}");
        };
        refused(json!({"index_topk_pattern": "SF"}), "layer 0 shares");
        // transformers hands a shared layer the choice of the layer just before it only.
        refused(
            json!({"num_hidden_layers": 3, "layer_types": [INDEXED, INDEXED, INDEXED], "index_topk_pattern": "FSS"}),
            "layer 2 shares",
        );
        refused(json!({"layer_types": [LINEAR, INDEXED], "index_topk_pattern": "FS"}), "layer 1 shares");
        refused(
            json!({"num_hidden_layers": 3, "layer_types": [INDEXED, LINEAR, INDEXED], "index_topk_pattern": "FFS"}),
            "layer 2 shares",
        );
        refused(json!({"index_topk": 6}), "a positive multiple of index_kpool 4");
        refused(json!({"index_topk": 2}), "a positive multiple of index_kpool 4");
        refused(json!({"n_group": 8}), "groups of at least two");
        refused(json!({"topk_group": 5}), "topk_group 5 must be between 1 and n_group 4");
        refused(json!({"topk_group": 1, "num_experts_per_tok": 3}), "experts of topk_group groups (2)");
        refused(json!({"qk_rope_head_dim": 16}), "no rotary");
        refused(json!({"num_key_value_heads": 1}), "must equal num_attention_heads 4");
        refused(json!({"layer_types": [INDEXED, LINEAR], "linear_num_heads": 0}), "must be positive");
        refused(
            json!({"layer_types": [INDEXED, LINEAR], "linear_attn_config": {"short_conv_kernel_size": 0}}),
            "linear_conv_kernel_dim 0",
        );
    }

    /// The linear layers' shape from the flat fields, or from the released spelling
    /// (`linear_attn_config`) over them, as transformers reads it.
    #[test]
    fn the_linear_layers_shape_reads_either_spelling() {
        let read = |change: Value| {
            let mut v = tiny_json();
            for (k, val) in change.as_object().unwrap() {
                v[k] = val.clone();
            }
            serde_json::from_value::<Config>(v).unwrap().kda_shape()
        };
        let defaults = read(json!({}));
        assert_eq!((defaults.heads, defaults.head_dim, defaults.conv_kernel), (64, 128, 4));
        assert_eq!(defaults.lower_bound, Some(-5.0));
        assert_eq!(read(json!({"linear_lower_bound": null})).lower_bound, None);
        let nested = read(json!({"linear_num_heads": 8, "linear_attn_config": {"head_dim": 16, "num_heads": 2,
            "short_conv_kernel_size": 3, "gate_lower_bound": -3.0}}));
        assert_eq!((nested.heads, nested.head_dim, nested.conv_kernel, nested.lower_bound), (2, 16, 3, Some(-3.0)));
        // Unbounded only where safe_gate is off; otherwise transformers' bound of -5.
        let nested = |inner: Value| read(json!({"linear_attn_config": inner})).lower_bound;
        assert_eq!(nested(json!({"gate_lower_bound": null, "safe_gate": false})), None);
        assert_eq!(nested(json!({"gate_lower_bound": null})), Some(-5.0));
        assert_eq!(nested(json!({})), Some(-5.0));
        assert_eq!(read(json!({"linear_lower_bound": -2.0, "linear_attn_config": {}})).lower_bound, Some(-2.0));
    }

    fn tiny_json() -> Value {
        json!({
            "vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
            "num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": 48, "kv_lora_rank": 32,
            "qk_nope_head_dim": 32, "v_head_dim": 24, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "n_group": 4, "topk_group": 2, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
            "layer_types": [INDEXED, INDEXED], "index_topk_pattern": "FS", "index_topk": 8, "index_kpool": 4,
            "index_n_heads": 2, "index_head_dim": 8})
    }

    /// Group-limited routing by hand: 8 experts in 4 groups of 2, the best 2 groups eligible.
    /// Expert 0 scores highest alone, but its group's pair sums below two others', so it is not
    /// chosen; the weights are the sigmoid scores without the bias, renormalised and scaled.
    #[test]
    fn experts_are_chosen_within_the_best_groups() {
        let cpu = (Kind::Float, Device::Cpu);
        // The router maps a one-hot input to these logits; the bias shifts the choice only.
        let logits = [3.0f32, -3.0, 1.0, 1.0, 0.5, 0.6, -1.0, -1.0];
        let router = Tensor::from_slice(&logits).view([8, 1]);
        let moe = SparseMoe {
            router: Linear::from_weight(router),
            correction_bias: Tensor::from_slice(&[0.0f32, 0.0, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0]),
            experts: Experts::Each(Vec::new()),
            shared: Mlp::from_weights(
                Weight::Dense(Tensor::zeros([1, 1], cpu)),
                Weight::Dense(Tensor::zeros([1, 1], cpu)),
                Weight::Dense(Tensor::zeros([1, 1], cpu)),
            ),
            top_k: 2,
            groups: 4,
            top_groups: 2,
            renormalise: true,
            scaling: 2.5,
        };
        let (chosen, weights) = moe.route(&Tensor::ones([1, 1], cpu));
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        // Group sums (with the bias): g0 σ(3)+σ(-3) = 1.0, g1 2σ(1) = 1.46, g2 σ(.5)+σ(.6)+.3 =
        // 1.57, g3 0.54: g1 and g2 stay; the best two of them by score plus bias are expert 5
        // (σ(.6)+.3 = .95) and one of 2 and 3 (σ(1) = .73, tied), not 0.
        let picked: Vec<i64> = Vec::try_from(chosen.view([-1])).unwrap();
        let order: Vec<f64> = Vec::try_from(weights.view([-1]).to_kind(Kind::Double)).unwrap();
        assert_eq!(picked[0], 5);
        assert!(picked[1] == 2 || picked[1] == 3, "{picked:?}");
        let (a, b) = (sigmoid(0.6), sigmoid(1.0));
        assert!((order[0] - 2.5 * a / (a + b)).abs() < 1e-6 && (order[1] - 2.5 * b / (a + b)).abs() < 1e-6);
    }

    /// The indexer's choice by hand on a sequence of 10 with pools of 4: the pools' scores are
    /// made to favour pool 1 over pool 0, one pool picked per query (top-k 4), and each query
    /// also sees its own incomplete pool up to itself.
    #[test]
    fn each_query_sees_its_best_complete_pool_and_its_own_tail() {
        let cpu = (Kind::Float, Device::Cpu);
        let d = 2;
        // One head; the query is the q residual itself (wq_b the identity); the head's weight 1.
        let indexer = Indexer {
            q_b: Linear::from_weight(Tensor::eye(d, cpu)),
            k: Linear::from_weight(Tensor::eye(d, cpu)),
            k_norm: (Tensor::ones([d], cpu), Tensor::zeros([d], cpu)),
            head_weights: Linear::from_weight(Tensor::ones([1, d], cpu)),
            pool_position: Tensor::zeros([4, d], cpu),
            pool_gate: Tensor::zeros([d, d], cpu),
            heads: 1,
            head_dim: d,
            top_k: 4,
            kpool: 4,
            tail: true,
        };
        // Keys after the LayerNorm of 2 channels are ±1: tokens 0-3 (pool 0) (-1, 1), tokens
        // 4-7 (pool 1) (1, -1), tokens 8-9 (the tail) either.
        let x = Tensor::from_slice(&[
            0.0f32, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0,
        ])
        .view([10, d]);
        let keys = indexer.keys(&x);
        // Queries (1, -1): pool 1 scores relu(2)/√2, pool 0 relu(-2) = 0.
        let q = Tensor::from_slice(&[1.0f32, -1.0]).view([1, d]).expand([10, d], false).contiguous();
        let chosen = indexer.choose(&x, &q, &keys, 0);
        let row = |i: i64| -> Vec<i64> {
            let r: Vec<bool> = Vec::try_from(chosen.get(i)).unwrap();
            r.iter().enumerate().filter(|(_, b)| **b).map(|(j, _)| j as i64).collect()
        };
        // Before any pool completes: the tail alone.
        assert_eq!(row(0), [0]);
        assert_eq!(row(2), [0, 1, 2]);
        // Token 3 completes pool 0, the only candidate: picked; its tail is empty.
        assert_eq!(row(3), [0, 1, 2, 3]);
        // Tokens 4-6: pool 0 (still the only complete one) and their own tail.
        assert_eq!(row(5), [0, 1, 2, 3, 4, 5]);
        // Token 7 completes pool 1, which outscores pool 0: pool 1 alone.
        assert_eq!(row(7), [4, 5, 6, 7]);
        // Tokens 8-9: pool 1 and their tail.
        assert_eq!(row(9), [4, 5, 6, 7, 8, 9]);
        // Without the tail, token 9 sees pool 1 only; a chunk starting at 8 chooses the same.
        let no_tail = Indexer { tail: false, ..indexer };
        let chunk = no_tail.choose(&x.narrow(0, 8, 2), &q.narrow(0, 8, 2), &keys, 8);
        let r: Vec<bool> = Vec::try_from(chunk.get(1)).unwrap();
        assert_eq!(r.iter().enumerate().filter(|(_, b)| **b).map(|(j, _)| j).collect::<Vec<_>>(), [4, 5, 6, 7]);
    }

    /// The cache budget counts the widest row (a full indexer layer's) for every indexed layer,
    /// and a linear layer's state once per sequence.
    #[test]
    fn a_tokens_cache_row_is_the_latent_and_the_indexers_keys() {
        let spec = shape(&tiny(), Kind::BFloat16).unwrap().spec;
        // 32 latent + 2 × 8 indexer elements, 2 layers, 2 bytes.
        assert_eq!(spec.kv_bytes_per_token(), (32 + 16) * 2 * 2);
        assert_eq!(spec.residual_streams, 4);
        assert_eq!(spec.kv_bytes_for(10), 10 * (32 + 16) * 2 * 2);

        let mut v = tiny_json();
        v["layer_types"] = json!([LINEAR, INDEXED]);
        v["index_topk_pattern"] = json!("FF");
        v["linear_attn_config"] = json!({"num_heads": 2, "head_dim": 16, "short_conv_kernel_size": 4});
        let spec = shape(&serde_json::from_value(v).unwrap(), Kind::BFloat16).unwrap().spec;
        assert_eq!(spec.kv_bytes_per_token(), (32 + 16) * 2);
        // 2 heads of a 16 × 16 float32 state, 3 inputs of q, k and v (3 × 32 channels) in bfloat16.
        assert_eq!(spec.sequence_state_bytes(), 2 * 16 * 16 * 4 + 3 * 96 * 2);
        assert_eq!(spec.kv_bytes_for(10), 10 * (32 + 16) * 2 + spec.sequence_state_bytes());

        // A forward's activations gain the linear layers' rows and one chunk's temporaries: per
        // token (width 32, bfloat16) the projection's 3 × 32 + 2 + 2 × 16 = 130 elements of 2
        // bytes, 3 × 32 convolved in 2 + 4 bytes, 32 float32 decays, a 32-wide gate of 2 bytes
        // and 2 × 32 float32 outputs: 260 + 576 + 128 + 64 + 256 = 1284 bytes; once, three
        // 2 × 16 × 16 × 16 float32 chunk tensors and two states of 2 × 16 × 16.
        let without = ModelSpec { linear_attention: None, ..spec.clone() };
        assert_eq!(
            spec.forward_bytes(10, 100, 1) - without.forward_bytes(10, 100, 1),
            10 * 1284 + 3 * 8192 * 4 + 2 * 512 * 4
        );
    }
}
