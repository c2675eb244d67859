//! DeepSeek-V4 (DeepSeek-V4-Flash, one of the network's models), read from transformers 5.23's
//! `modeling_deepseek_v4.py` and `configuration_deepseek_v4.py`. **A first slice**: the layers
//! whose attention is a sliding window alone (`sliding_attention`); the compressed layers
//! (`compressed_sparse_attention`, `heavily_compressed_attention`), which the released
//! checkpoints interleave with those, are refused at load by name, so the vLLM engine serves
//! DeepSeek-V4-Flash (docs/native-architectures.md says what remains).
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
//!   keys before it;
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
//! The KV cache keeps the one key head as both keys and values (twice the bytes it needs) and
//! every past token (the window is a mask): both are for a later slice, with the compressed
//! layers' caches. Float32 follows transformers exactly; bfloat16 rounds as the other
//! architectures here do, which for this model is not yet compared with a reference.

use serde::Deserialize;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use super::hyper_connections::{BlockHyperConnections, HyperConnection, HyperHead, HyperShape, unweighted_rms_norm};
use super::moe::Experts;
use super::{BlockParts, FeedForward, ModelSpec, SelfAttention, StackNames, StackShape, Transformer, assemble};
use crate::batch::{Batch, StepCache};
use crate::checkpoint::Loader;
use crate::config::{Architecture, Rope, RopeScaling};
use crate::error::LoadError;
use crate::layers::{Linear, MIXTRAL_EXPERT, Mlp, RmsNorm, Rotary, Weight};

/// The attention layers this slice runs.
const SLIDING: &str = "sliding_attention";
/// transformers' mapping of the released `compress_ratios` to layer types.
const COMPRESS_RATIO_TYPES: [(i64, &str); 3] =
    [(0, SLIDING), (4, "compressed_sparse_attention"), (128, "heavily_compressed_attention")];

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
    #[serde(default = "default_sinkhorn_iters")]
    pub hc_sinkhorn_iters: i64,
    #[serde(default = "default_hc_eps")]
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
fn default_sinkhorn_iters() -> i64 {
    20
}
fn default_hc_eps() -> f64 {
    1e-6
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

/// `Ok` where every layer of the DeepSeek-V4 `config` is one this engine runs (sliding-window
/// attention alone); else which are not, named.
pub fn check_layers(config: &Value) -> Result<(), LoadError> {
    let schedule: LayerSchedule =
        serde_json::from_value(config.clone()).map_err(|e| LoadError::InvalidConfig(e.to_string()))?;
    refuse_compressed(&schedule.resolve()?)
}

fn refuse_compressed(types: &[String]) -> Result<(), LoadError> {
    let compressed: Vec<String> =
        types.iter().enumerate().filter(|(_, t)| *t != SLIDING).map(|(i, t)| format!("{i} ({t})")).collect();
    if compressed.is_empty() {
        return Ok(());
    }
    let shown = compressed.iter().take(4).cloned().collect::<Vec<_>>().join(", ");
    let more = if compressed.len() > 4 { format!(" and {} more", compressed.len() - 4) } else { String::new() };
    Err(LoadError::InvalidConfig(format!(
        "deepseek_v4: compressed attention layers are not built in the native engine yet (layers {shown}{more}); \
         the vllm engine serves this model"
    )))
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

    /// What transformers leaves to a shape error, and what this slice does not run, named.
    fn validate(&self) -> Result<(), LoadError> {
        let invalid = |m: String| Err(LoadError::InvalidConfig(m));
        refuse_compressed(&self.layer_types()?)?;
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

/// DeepSeek-V4's attention on a sliding-window layer.
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
}

impl Attention {
    fn load(w: &Loader, c: &Config) -> Result<Self, LoadError> {
        let (heads, head_dim, hidden) = (c.num_attention_heads, c.head_dim, c.hidden_size);
        let per_group = heads * head_dim / c.o_groups;
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
        })
    }

    /// One sequence's new queries `[1, heads, n, head_dim]` over its keys (= values)
    /// `[1, 1, past + n, head_dim]`: each query sees the keys at its position and the
    /// `window - 1` before it, and its head's sink takes a share of the softmax that is dropped.
    fn attend(&self, q: &Tensor, keys: &Tensor, past: i64) -> Tensor {
        let (n, total) = (q.size()[2], keys.size()[2]);
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = q.matmul(&keys.transpose(-1, -2)) * scale;
        let device = q.device();
        let positions = Tensor::arange(n, (Kind::Int64, device)).unsqueeze(1) + past;
        let keys_at = Tensor::arange(total, (Kind::Int64, device)).unsqueeze(0);
        let behind = &positions - &keys_at;
        let hidden = behind.lt(0).logical_or(&behind.ge(self.window));
        let scores = scores.masked_fill(&hidden, f64::NEG_INFINITY);
        let sinks = self.sinks.to_kind(scores.kind()).view([1, self.heads, 1, 1]).expand([1, self.heads, n, 1], false);
        let probabilities = Tensor::cat(&[scores, sinks], -1).softmax(-1, q.kind());
        probabilities.narrow(-1, 0, total).matmul(keys)
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
        let q = self.q_b.forward(&self.q_a_norm.forward(&self.q_a.forward(x))).view([tokens, heads, head_dim]);
        let q = rotate_tail(&unweighted_rms_norm(&q, self.eps), cos, sin);
        let kv = rotate_tail(&self.kv_norm.forward(&self.kv.forward(x)).view([tokens, 1, head_dim]), cos, sin);
        // `[1, heads, tokens, head_dim]`, each sequence a narrow of its tokens.
        let heads_first = |t: &Tensor| t.transpose(0, 1).unsqueeze(0);
        let (q_all, kv_all) = (heads_first(&q), heads_first(&kv));
        let mut outputs = Vec::with_capacity(caches.len());
        for (span, cache) in batch.spans().iter().zip(caches.iter_mut()) {
            let (qs, kvs) = (q_all.narrow(2, span.start, span.len), kv_all.narrow(2, span.start, span.len));
            let keys = match cache {
                Some(cache) if span.past > 0 => cache.append(layer, &kvs, &kvs).0,
                Some(cache) => {
                    cache.keep(layer, &kvs, &kvs);
                    kvs
                }
                None => kvs,
            };
            outputs.push(self.attend(&qs, &keys, span.past));
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

    fn is_fp8(&self) -> bool {
        self.q_a.is_fp8()
            && self.q_b.is_fp8()
            && self.kv.is_fp8()
            && self.o_b.is_fp8()
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
        // The one key head is kept twice, as keys and as values (see the module's doc).
        kv_heads: 1,
        head_dim: config.head_dim,
        // A routed token goes through top-k experts, the shared one and a router row.
        intermediate_size: (config.num_experts_per_tok + 1) * config.moe_intermediate_size + config.n_routed_experts,
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
    let mut model = assemble(shape, w, placed, |i, layer| -> Result<BlockParts, LoadError> {
        Ok(BlockParts {
            attention: Box::new(Attention::load(&layer.at("attn"), config)?),
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
    /// or its default; every one but `sliding_attention` refused, named with its layer.
    #[test]
    fn only_sliding_window_layers_are_taken_and_the_others_are_named() {
        let sliding = json!({"num_hidden_layers": 2, "layer_types": ["sliding_attention", "sliding_attention"]});
        assert!(check_layers(&sliding).is_ok());
        let released = json!({"num_hidden_layers": 3, "compress_ratios": [0, 4, 128]});
        let err = check_layers(&released).unwrap_err().to_string();
        assert!(
            err.contains("(layers 1 (compressed_sparse_attention), 2 (heavily_compressed_attention));")
                && err.contains("vllm engine"),
            "{err}"
        );
        let schedule = |v: Value| serde_json::from_value::<LayerSchedule>(v).unwrap().resolve().unwrap();
        // transformers' default for 5 layers: HCA, HCA, then HCA and CSA in turn.
        assert_eq!(
            schedule(json!({"num_hidden_layers": 5})),
            [
                "heavily_compressed_attention",
                "heavily_compressed_attention",
                "heavily_compressed_attention",
                "compressed_sparse_attention",
                "heavily_compressed_attention"
            ]
        );
        // More types than layers: the first ones (transformers truncates); fewer: refused.
        assert_eq!(schedule(json!({"num_hidden_layers": 1, "compress_ratios": [0, 4]})), ["sliding_attention"]);
        let short = serde_json::from_value::<LayerSchedule>(json!({"num_hidden_layers": 3, "compress_ratios": [0]}));
        assert!(short.unwrap().resolve().is_err());
        let odd = check_layers(&json!({"num_hidden_layers": 1, "compress_ratios": [8]})).unwrap_err();
        assert!(odd.to_string().contains("compress_ratios: 8 is none of 0, 4 and 128"), "{odd}");
        // The full default (43 layers) names four and counts the rest.
        let err = check_layers(&json!({})).unwrap_err().to_string();
        assert!(err.contains("and 39 more"), "{err}");
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
