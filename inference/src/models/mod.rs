//! The decoder stack the Qwen family and MiniMax-M2 share (token embedding, pre-norm blocks of
//! attention and a feed-forward, final norm, LM head), one file per architecture that reads its
//! config and says which modules its blocks hold (`qwen2`, `qwen3`, `qwen3_moe`, `minimax_m2`),
//! and what the mixtures of experts share once routed (`moe`).

pub mod minimax_m2;
pub mod moe;
pub mod qwen2;
pub mod qwen3;
pub mod qwen3_moe;

use tch::{Device, Kind, Tensor};

use crate::batch::{Batch, Output, Step, StepCache, StepInput};
use crate::checkpoint::Loader;
use crate::config::Architecture;
use crate::error::LoadError;
use crate::kv_cache::SequenceCache;
use crate::layers::{Attention, Linear, Mlp, RmsNorm, Rotary};

/// A block's feed-forward: a dense SwiGLU MLP or a mixture of experts.
pub trait FeedForward: Send {
    /// `[tokens, hidden]` → `[tokens, hidden]`.
    fn forward(&self, x: &Tensor) -> Tensor;
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor) -> Tensor {
        Mlp::forward(self, x)
    }
}

pub struct Block {
    pub device: Device,
    pub input_norm: RmsNorm,
    pub attention: Attention,
    pub post_attention_norm: RmsNorm,
    pub feed_forward: Box<dyn FeedForward>,
}

/// Shapes a caller needs (the server, the PoC runner, tests).
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    pub architecture: Architecture,
    pub hidden_size: i64,
    pub vocab_size: i64,
    pub layers: usize,
    pub max_position_embeddings: i64,
    /// The dtype the weights run in.
    pub kind: Kind,
    /// The dtype the KV cache keeps keys and values in: `kind`, or FP8 (`--kv-cache-dtype`).
    pub kv_kind: Kind,
    pub attention_heads: i64,
    pub kv_heads: i64,
    pub head_dim: i64,
    /// The feed-forward's width per token (a dense MLP's, or one expert's times the experts
    /// a token is routed to).
    pub intermediate_size: i64,
}

impl ModelSpec {
    fn element_bytes(&self) -> u64 {
        self.kind.elt_size_in_bytes() as u64
    }

    /// Bytes one token's keys and values take in the caches of every layer.
    pub fn kv_bytes_per_token(&self) -> u64 {
        2 * self.layers as u64 * (self.kv_heads * self.head_dim) as u64 * self.kv_kind.elt_size_in_bytes() as u64
    }

    /// An upper estimate of the memory one forward takes beyond the weights and the KV cache:
    /// `tokens` rows through the widest layer (residual, norms, q/k/v, attention output, the
    /// feed-forward's gate, up and activation, kept for one layer at a time), attention scores
    /// in float32 for `attention_pairs` query-key pairs per head (the unfused path; fused
    /// kernels take less), and float32 logits for `sampled` rows, copied once.
    pub fn forward_bytes(&self, tokens: u64, attention_pairs: u64, sampled: u64) -> u64 {
        let row = 6 * self.hidden_size as u64
            + ((self.attention_heads + 2 * self.kv_heads) * self.head_dim) as u64
            + 3 * self.intermediate_size as u64;
        let scores = attention_pairs.saturating_mul(self.attention_heads as u64).saturating_mul(4);
        tokens
            .saturating_mul(row * self.element_bytes())
            .saturating_add(scores)
            .saturating_add(sampled.saturating_mul(self.vocab_size as u64 * 8))
    }
}

/// Called with each layer's index and each of its two outputs (the feed-forward's output and the
/// residual stream, `[tokens, hidden]` each, as vLLM's layers return them); returns what the next
/// layer takes in its place. PoC v2's Householder reflections go here (upstream hooks vLLM's
/// layers, reflecting both).
pub type LayerHook<'a> = &'a dyn Fn(usize, &Tensor) -> Tensor;

pub struct Transformer {
    pub spec: ModelSpec,
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rotary: Rotary,
}

impl Transformer {
    /// A KV cache for a sequence of at most `tokens` tokens.
    pub fn new_cache(&self, tokens: i64) -> SequenceCache {
        let cache = SequenceCache::new(self.blocks.len(), tokens);
        if self.spec.kv_kind == self.spec.kind { cache } else { cache.storing(self.spec.kv_kind) }
    }

    fn first_device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// One step over several sequences: their new tokens go through every layer (keys and values
    /// appended to the caches they bring), and the final-norm hidden states come back in the
    /// model dtype on the last device — `[sequences, hidden]` for [`Output::Last`],
    /// `[tokens, hidden]` (in step order) for [`Output::All`].
    pub fn forward(&self, steps: &mut [Step<'_>], hook: Option<LayerHook<'_>>, output: Output) -> Tensor {
        assert!(!steps.is_empty() && steps.iter().all(|s| !s.input.is_empty()), "a step needs input");
        let kind = self.spec.kind;
        let device = self.first_device();
        let batch = Batch::new(steps);
        let inputs: Vec<Tensor> = steps
            .iter()
            .map(|s| match &s.input {
                StepInput::Tokens(ids) => {
                    Tensor::embedding(&self.embed_tokens, &Tensor::from_slice(ids).to_device(device), -1, false, false)
                }
                StepInput::Embeddings(e) => e.to_device(device).to_kind(kind),
            })
            .collect();
        // vLLM's layout (its Qwen2/Qwen3 decoder layers): each layer hands on the feed-forward's
        // output and the residual stream apart, and the next norm adds them in float32. In
        // float32 this is transformers' arithmetic; in bfloat16 it is vLLM's rounding, which
        // PoC v2's artifacts must follow to land where the network's validators' do.
        let mut hidden = Tensor::cat(&inputs, 0);
        drop(inputs);
        let mut residual: Option<Tensor> = None;
        let mut caches: Vec<StepCache<'_>> = steps.iter_mut().map(|s| s.cache.as_deref_mut()).collect();
        let mut rotation: Option<(Device, Tensor, Tensor)> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            if hidden.device() != block.device {
                hidden = hidden.to_device(block.device);
                residual = residual.map(|r| r.to_device(block.device));
            }
            if rotation.as_ref().is_none_or(|(d, _, _)| *d != block.device) {
                let (cos, sin) = self.rotary.cos_sin(&batch.positions(block.device), kind);
                rotation = Some((block.device, cos, sin));
            }
            let (_, cos, sin) = rotation.as_ref().expect("set above");
            let (normed, stream) = match residual.take() {
                None => (block.input_norm.forward(&hidden), hidden),
                Some(r) => block.input_norm.forward_add(&hidden, &r),
            };
            let attended = block.attention.forward(&normed, (cos, sin), i, &batch, &mut caches);
            drop(normed);
            let (normed, stream) = block.post_attention_norm.forward_add(&attended, &stream);
            drop(attended);
            hidden = block.feed_forward.forward(&normed);
            residual = Some(match hook {
                Some(hook) => {
                    hidden = hook(i, &hidden);
                    hook(i, &stream)
                }
                None => stream,
            });
        }
        for (cache, span) in caches.iter_mut().zip(batch.spans()) {
            if let Some(cache) = cache {
                cache.advance(span.len);
            }
        }
        let last = self.lm_head.device();
        let residual = residual.expect("a model has layers").to_device(last);
        let hidden = hidden.to_device(last);
        let (hidden, residual) = match output {
            Output::Last => {
                let rows = batch.last_rows(last);
                (hidden.index_select(0, &rows), residual.index_select(0, &rows))
            }
            Output::All => (hidden, residual),
        };
        self.norm.forward_add(&hidden, &residual).0
    }

    /// Logits of final hidden states, `[rows, vocab]` in the model dtype.
    pub fn logits(&self, hidden: &Tensor) -> Tensor {
        self.lm_head.forward(hidden)
    }
}

/// The parts every architecture's config names, for [`assemble`].
pub struct StackShape {
    pub spec: ModelSpec,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub rotary: Rotary,
}

/// A block's attention and feed-forward, as one architecture builds them.
pub type BlockParts = (Attention, Box<dyn FeedForward>);

/// Loads the shared stack from `w` (the checkpoint's root), layer `i` on `placed[i]` (the
/// embedding with the first, the final norm and LM head with the last); `block` builds layer
/// `i`'s attention and feed-forward from its loader.
pub fn assemble(
    shape: StackShape,
    w: &Loader<'_>,
    placed: &[Device],
    block: impl Fn(usize, &Loader<'_>) -> Result<BlockParts, LoadError>,
) -> Result<Transformer, LoadError> {
    let StackShape { spec, rms_norm_eps, tie_word_embeddings, rotary } = shape;
    if placed.len() != spec.layers {
        return Err(LoadError::InvalidConfig(format!(
            "{} layers placed on devices for a model of {}",
            placed.len(),
            spec.layers
        )));
    }
    let first = placed.first().copied().unwrap_or(w.device());
    let last = placed.last().copied().unwrap_or(w.device());
    let model = w.at("model");
    let embed_tokens = model.on(first).tensor("embed_tokens.weight", &[spec.vocab_size, spec.hidden_size])?;
    let mut blocks = Vec::with_capacity(spec.layers);
    for (i, device) in placed.iter().enumerate() {
        let layer = model.at("layers").at(i).on(*device);
        let (attention, feed_forward) = block(i, &layer)?;
        blocks.push(Block {
            device: *device,
            input_norm: RmsNorm::load(&layer.at("input_layernorm"), spec.hidden_size, rms_norm_eps)?,
            attention,
            post_attention_norm: RmsNorm::load(&layer.at("post_attention_layernorm"), spec.hidden_size, rms_norm_eps)?,
            feed_forward,
        });
    }
    let norm = RmsNorm::load(&model.at("norm").on(last), spec.hidden_size, rms_norm_eps)?;
    // Tied checkpoints (Qwen3-0.6B) store no lm_head; some still carry one, which then wins.
    let lm_head = if tie_word_embeddings && !w.contains("lm_head.weight") {
        Linear::from_weight(embed_tokens.to_device(last))
    } else {
        Linear::load(&w.at("lm_head").on(last), spec.hidden_size, spec.vocab_size, false)?
    };
    Ok(Transformer { spec, embed_tokens, blocks, norm, lm_head, rotary })
}
