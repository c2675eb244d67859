//! The decoder stack every architecture here shares (token embedding, pre-norm blocks of
//! attention and a feed-forward, final norm, LM head), one file per architecture that reads its
//! config and says which modules its blocks hold (`qwen2`, `qwen3`, `qwen3_moe`, `minimax_m2`,
//! `deepseek_v4`, `glm5_next`), what the mixtures of experts share once routed (`moe`), the
//! residual DeepSeek-V4 and GLM-5.3-Flash keep instead of one stream (`hyper_connections`),
//! DeepSeek-V4's compressed layers' long-range entries (`compressed_attention`) and
//! GLM-5.3-Flash's linear attention (`kimi_delta_attention`).

pub mod compressed_attention;
pub mod deepseek_v4;
pub mod glm5_next;
pub mod hyper_connections;
pub mod kimi_delta_attention;
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
use hyper_connections::{BlockHyperConnections, HyperHead};
use kimi_delta_attention::KdaShape;

/// A block's feed-forward: a dense SwiGLU MLP or a mixture of experts.
pub trait FeedForward: Send {
    /// `[tokens, hidden]` → `[tokens, hidden]`. `tokens` holds the step's token ids (int64
    /// `[tokens]`, on `x`'s device) where every sequence brought ids rather than embeddings:
    /// DeepSeek-V4's hash-routed layers choose experts by them.
    fn forward(&self, x: &Tensor, tokens: Option<&Tensor>) -> Tensor;
}

impl FeedForward for Mlp {
    fn forward(&self, x: &Tensor, _: Option<&Tensor>) -> Tensor {
        Mlp::forward(self, x)
    }
}

/// A block's self-attention: the grouped-query attention of the Qwen family and MiniMax-M2
/// ([`Attention`]), or DeepSeek-V4's.
pub trait SelfAttention: Send {
    /// `x` `[tokens, hidden]` → `[tokens, hidden]`, keys (and values) appended to the caches
    /// the steps bring; `cos`/`sin` as the model's [`Rotary`] makes them for the step's
    /// positions.
    fn forward(
        &self,
        x: &Tensor,
        cos_sin: (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor;

    /// Whether its projections' weights are FP8 on the device.
    fn is_quantised(&self) -> bool;
}

impl SelfAttention for Attention {
    fn forward(
        &self,
        x: &Tensor,
        cos_sin: (&Tensor, &Tensor),
        layer: usize,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
    ) -> Tensor {
        Attention::forward(self, x, cos_sin, layer, batch, caches)
    }

    fn is_quantised(&self) -> bool {
        Attention::is_quantised(self)
    }
}

pub struct Block {
    pub device: Device,
    pub input_norm: RmsNorm,
    pub attention: Box<dyn SelfAttention>,
    pub post_attention_norm: RmsNorm,
    pub feed_forward: Box<dyn FeedForward>,
    /// DeepSeek-V4's streams around the attention and the feed-forward; `None`: one residual
    /// stream.
    pub hyper: Option<BlockHyperConnections>,
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
    /// Whether the keys are the values (DeepSeek-V4's shared-KV attention): the cache keeps one
    /// tensor per layer, not two.
    pub kv_shared: bool,
    /// What compressed layers keep per sequence beside keys and values (DeepSeek-V4's), one
    /// per such layer.
    pub compressed: Vec<CompressedKv>,
    /// The layers that keep keys (and values) per token: all of them but GLM-5.3-Flash's
    /// linear ones.
    pub kv_layers: usize,
    /// GLM-5.3-Flash's linear layers' shape (the layers past `kv_layers`), for the state a
    /// sequence keeps in them and what their forward holds besides.
    pub linear_attention: Option<KdaShape>,
    /// Residual streams per token: 1, or DeepSeek-V4's hyper-connected `hc_mult`.
    pub residual_streams: i64,
    /// Where every layer's queries see only the `window - 1` keys before their own
    /// (DeepSeek-V4's sliding window): a sequence's cache keeps that many keys per layer, not
    /// one per token.
    pub kv_window: Option<i64>,
}

/// A compressed layer's state per sequence: an entry of `width` elements (in the model's dtype)
/// per `rate` tokens, and at most `held` elements more (the window still open and what the next
/// window needs of the last one), counted at four bytes each (their gates are float32).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompressedKv {
    pub width: i64,
    pub rate: i64,
    pub held: i64,
}

impl ModelSpec {
    fn element_bytes(&self) -> u64 {
        self.kind.elt_size_in_bytes() as u64
    }

    fn keys_and_values_per_token(&self) -> u64 {
        let tensors = if self.kv_shared { 1 } else { 2 };
        tensors
            * self.kv_layers as u64
            * (self.kv_heads * self.head_dim) as u64
            * self.kv_kind.elt_size_in_bytes() as u64
    }

    /// Bytes one token takes in the caches of every layer: its keys and values, and a share of
    /// each compressed layer's entries (rounded up). The KV cache's budget is counted in these;
    /// a sliding window's keys count as though every token's were kept (the budget is then an
    /// upper bound), while [`Self::kv_bytes_for`] counts what a sequence holds.
    pub fn kv_bytes_per_token(&self) -> u64 {
        let entries: i64 = self.compressed.iter().map(|c| (c.width + c.rate - 1) / c.rate).sum();
        self.keys_and_values_per_token() + entries as u64 * self.element_bytes()
    }

    /// The most bytes a sequence of `tokens` holds in its cache between steps: keys and values
    /// (at most a sliding window's), the entries of its closed windows, what compressed layers
    /// hold besides, and the state linear layers keep.
    pub fn kv_bytes_for(&self, tokens: u64) -> u64 {
        let kept = match self.kv_window {
            Some(window) => tokens.min(window.saturating_sub(1) as u64),
            None => tokens,
        };
        let compressed: u64 = self
            .compressed
            .iter()
            .map(|c| tokens / c.rate as u64 * c.width as u64 * self.element_bytes() + c.held as u64 * 4)
            .sum();
        kept * self.keys_and_values_per_token() + compressed + self.sequence_state_bytes()
    }

    /// Bytes a sequence's layers keep whatever its length: each linear layer's recurrent and
    /// convolution state (GLM-5.3-Flash's), counted once per sequence.
    pub fn sequence_state_bytes(&self) -> u64 {
        let linear = (self.layers - self.kv_layers) as u64;
        self.linear_attention.map_or(0, |shape| linear * shape.state_bytes(self.kind))
    }

    /// An upper estimate of the memory one forward takes beyond the weights and the KV cache:
    /// `tokens` rows through the widest layer (residual, norms, q/k/v, attention output, the
    /// feed-forward's gate, up and activation, kept for one layer at a time), attention scores
    /// in float32 for `attention_pairs` query-key pairs per head (the unfused path; fused
    /// kernels take less), and float32 logits for `sampled` rows, copied once.
    ///
    /// Hyper-connected streams add, per row, four copies of the streams while a block's output
    /// is spread over them (the streams in, the spread output, the mixed streams, their sum)
    /// and their float32 normed flattening that computes the mixing weights. Linear layers add
    /// their own rows and a chunk's temporaries ([`KdaShape::forward_bytes`]).
    pub fn forward_bytes(&self, tokens: u64, attention_pairs: u64, sampled: u64) -> u64 {
        let (linear_row, linear_chunk) = self.linear_attention.map_or((0, 0), |s| s.forward_bytes(self.kind));
        let row = 6 * self.hidden_size as u64
            + ((self.attention_heads + 2 * self.kv_heads) * self.head_dim) as u64
            + 3 * self.intermediate_size as u64;
        let streams = if self.residual_streams > 1 {
            (self.residual_streams * self.hidden_size) as u64 * (4 * self.element_bytes() + 4)
        } else {
            0
        };
        let scores = attention_pairs.saturating_mul(self.attention_heads as u64).saturating_mul(4);
        tokens
            .saturating_mul(row * self.element_bytes() + streams + linear_row)
            .saturating_add(linear_chunk)
            .saturating_add(scores)
            .saturating_add(sampled.saturating_mul(self.vocab_size as u64 * 8))
    }
}

/// Called with each layer's index and each of its two outputs (the feed-forward's output and the
/// residual stream, `[tokens, hidden]` each, as vLLM's layers return them), or its hyper-connected
/// streams once (`[tokens, streams, hidden]`); returns what the next layer takes in its place.
/// PoC v2's Householder reflections go here (upstream hooks vLLM's layers, reflecting both).
pub type LayerHook<'a> = &'a dyn Fn(usize, &Tensor) -> Tensor;

pub struct Transformer {
    pub spec: ModelSpec,
    pub embed_tokens: Tensor,
    pub blocks: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Linear,
    pub rotary: Rotary,
    /// Where the blocks keep hyper-connected streams: their final collapse.
    pub hyper_head: Option<HyperHead>,
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
    ///
    /// Where the blocks keep hyper-connected streams (DeepSeek-V4) the hook takes each layer's
    /// streams, `[tokens, streams, hidden]`, once (see [`Self::forward_streams`]).
    pub fn forward(&self, steps: &mut [Step<'_>], hook: Option<LayerHook<'_>>, output: Output) -> Tensor {
        assert!(!steps.is_empty() && steps.iter().all(|s| !s.input.is_empty()), "a step needs input");
        let device = self.first_device();
        let batch = Batch::new(steps);
        let inputs: Vec<Tensor> = steps
            .iter()
            .map(|s| match &s.input {
                StepInput::Tokens(ids) => {
                    Tensor::embedding(&self.embed_tokens, &Tensor::from_slice(ids).to_device(device), -1, false, false)
                }
                StepInput::Embeddings { embeddings, .. } => embeddings.to_device(device).to_kind(self.spec.kind),
            })
            .collect();
        let hidden = Tensor::cat(&inputs, 0);
        drop(inputs);
        // The step's token ids, in step order, where every sequence brought ids or routing ids
        // with its embeddings (only the hyper-connected stack's feed-forwards read them).
        let ids: Option<Vec<i64>> = self.hyper_head.as_ref().and_then(|_| {
            let ids: Option<Vec<&[i64]>> = steps
                .iter()
                .map(|s| match &s.input {
                    StepInput::Tokens(ids) => Some(ids.as_slice()),
                    StepInput::Embeddings { routing_ids, .. } => routing_ids.as_deref(),
                })
                .collect();
            ids.map(|ids| ids.concat())
        });
        let mut caches: Vec<StepCache<'_>> = steps.iter_mut().map(|s| s.cache.as_deref_mut()).collect();
        let hidden = match &self.hyper_head {
            None => self.forward_one_stream(hidden, &batch, &mut caches, hook, output),
            Some(head) => {
                let streams = self.forward_streams(hidden, ids.as_deref(), &batch, &mut caches, hook);
                let last = self.lm_head.device();
                let streams = streams.to_device(last);
                let streams = match output {
                    Output::Last => streams.index_select(0, &batch.last_rows(last)),
                    Output::All => streams,
                };
                self.norm.forward(&head.forward(&streams))
            }
        };
        for (cache, span) in caches.iter_mut().zip(batch.spans()) {
            if let Some(cache) = cache {
                cache.advance(span.len);
            }
        }
        hidden
    }

    /// The step's rotation for `block`'s device, made again only where the device changes.
    fn rotation_for<'r>(
        &self,
        rotation: &'r mut Option<(Device, Tensor, Tensor)>,
        batch: &Batch,
        device: Device,
    ) -> (&'r Tensor, &'r Tensor) {
        if rotation.as_ref().is_none_or(|(d, _, _)| *d != device) {
            let (cos, sin) = self.rotary.cos_sin(&batch.positions(device), self.spec.kind);
            *rotation = Some((device, cos, sin));
        }
        let (_, cos, sin) = rotation.as_ref().expect("set above");
        (cos, sin)
    }

    /// The blocks over one residual stream, then the final norm.
    fn forward_one_stream(
        &self,
        mut hidden: Tensor,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
        hook: Option<LayerHook<'_>>,
        output: Output,
    ) -> Tensor {
        // vLLM's layout (its Qwen2/Qwen3 decoder layers): each layer hands on the feed-forward's
        // output and the residual stream apart, and the next norm adds them in float32. In
        // float32 this is transformers' arithmetic; in bfloat16 it is vLLM's rounding, which
        // PoC v2's artifacts must follow to land where the network's validators' do.
        let mut residual: Option<Tensor> = None;
        let mut rotation: Option<(Device, Tensor, Tensor)> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            if hidden.device() != block.device {
                hidden = hidden.to_device(block.device);
                residual = residual.map(|r| r.to_device(block.device));
            }
            let (cos, sin) = self.rotation_for(&mut rotation, batch, block.device);
            let (normed, stream) = match residual.take() {
                None => (block.input_norm.forward(&hidden), hidden),
                Some(r) => block.input_norm.forward_add(&hidden, &r),
            };
            let attended = block.attention.forward(&normed, (cos, sin), i, batch, caches);
            drop(normed);
            let (normed, stream) = block.post_attention_norm.forward_add(&attended, &stream);
            drop(attended);
            hidden = block.feed_forward.forward(&normed, None);
            residual = Some(match hook {
                Some(hook) => {
                    hidden = hook(i, &hidden);
                    hook(i, &stream)
                }
                None => stream,
            });
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

    /// The blocks over hyper-connected streams (transformers' `DeepseekV4DecoderLayer`): the
    /// embedding copied into every stream, each attention and feed-forward fed the streams
    /// collapsed and its output spread back over them. `[tokens, streams, hidden]`.
    ///
    /// The hook takes each layer's output streams. vLLM's layer hands on the feed-forward's
    /// output and the streams before that output is spread over them (the next layer spreads
    /// and mixes), and upstream's PoC v2 hook reflects both; spreading and mixing combine the
    /// streams linearly, each stream whole, and a reflection acts within each stream, so
    /// reflecting the spread streams is the same map (tested against a restatement of vLLM's
    /// order).
    fn forward_streams(
        &self,
        hidden: Tensor,
        ids: Option<&[i64]>,
        batch: &Batch,
        caches: &mut [StepCache<'_>],
        hook: Option<LayerHook<'_>>,
    ) -> Tensor {
        let streams_count = self.blocks.first().and_then(|b| b.hyper.as_ref()).map_or(1, |h| h.streams());
        let mut streams = hidden.unsqueeze(1).expand([-1, streams_count, -1], false).contiguous();
        let mut rotation: Option<(Device, Tensor, Tensor)> = None;
        let mut tokens: Option<Tensor> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let hyper = block.hyper.as_ref().expect("every block of a hyper-connected model has its connections");
            streams = streams.to_device(block.device);
            if tokens.as_ref().is_none_or(|t| t.device() != block.device) {
                tokens = ids.map(|ids| Tensor::from_slice(ids).to_device(block.device));
            }
            let (cos, sin) = self.rotation_for(&mut rotation, batch, block.device);
            let collapsed = hyper.attention.collapse(&streams);
            let attended =
                block.attention.forward(&block.input_norm.forward(&collapsed.input), (cos, sin), i, batch, caches);
            streams = collapsed.expand(&attended, &streams);
            let collapsed = hyper.feed_forward.collapse(&streams);
            let normed = block.post_attention_norm.forward(&collapsed.input);
            let fed = block.feed_forward.forward(&normed, tokens.as_ref());
            streams = collapsed.expand(&fed, &streams);
            if let Some(hook) = hook {
                streams = hook(i, &streams);
            }
        }
        streams
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
    pub names: StackNames,
}

/// What a checkpoint calls the stack's own tensors.
#[derive(Debug, Clone, Copy)]
pub struct StackNames {
    /// Where the embedding, the layers (`{base}.layers.N`) and the final norm sit: `model`, or
    /// the checkpoint's root where empty.
    pub base: &'static str,
    /// The token embedding, under `base`.
    pub embed: &'static str,
    /// A layer's norms before its attention and before its feed-forward.
    pub norms: [&'static str; 2],
    /// The LM head, at the checkpoint's root.
    pub lm_head: &'static str,
}

/// Hugging Face's names (Qwen, Llama, MiniMax-M2).
pub const HF_STACK: StackNames = StackNames {
    base: "model",
    embed: "embed_tokens",
    norms: ["input_layernorm", "post_attention_layernorm"],
    lm_head: "lm_head",
};

impl StackNames {
    /// The loader of the stack's base under `w`, the checkpoint's root.
    pub fn base<'a>(&self, w: &Loader<'a>) -> Loader<'a> {
        if self.base.is_empty() { w.clone() } else { w.at(self.base) }
    }
}

/// A block's attention and feed-forward, as one architecture builds them.
pub struct BlockParts {
    pub attention: Box<dyn SelfAttention>,
    pub feed_forward: Box<dyn FeedForward>,
    pub hyper: Option<BlockHyperConnections>,
}

impl BlockParts {
    /// An attention and a feed-forward on one residual stream.
    pub fn new(attention: impl SelfAttention + 'static, feed_forward: impl FeedForward + 'static) -> Self {
        Self { attention: Box::new(attention), feed_forward: Box::new(feed_forward), hyper: None }
    }
}

/// Loads the shared stack from `w` (the checkpoint's root), layer `i` on `placed[i]` (the
/// embedding with the first, the final norm and LM head with the last); `block` builds layer
/// `i`'s attention and feed-forward from its loader.
pub fn assemble(
    shape: StackShape,
    w: &Loader<'_>,
    placed: &[Device],
    block: impl Fn(usize, &Loader<'_>) -> Result<BlockParts, LoadError>,
) -> Result<Transformer, LoadError> {
    let StackShape { spec, rms_norm_eps, tie_word_embeddings, rotary, names } = shape;
    if placed.len() != spec.layers {
        return Err(LoadError::InvalidConfig(format!(
            "{} layers placed on devices for a model of {}",
            placed.len(),
            spec.layers
        )));
    }
    let first = placed.first().copied().unwrap_or(w.device());
    let last = placed.last().copied().unwrap_or(w.device());
    let model = names.base(w);
    let embed_tokens =
        model.on(first).tensor(&format!("{}.weight", names.embed), &[spec.vocab_size, spec.hidden_size])?;
    let mut blocks = Vec::with_capacity(spec.layers);
    let [input_norm, post_attention_norm] = names.norms;
    for (i, device) in placed.iter().enumerate() {
        let layer = model.at("layers").at(i).on(*device);
        let BlockParts { attention, feed_forward, hyper } = block(i, &layer)?;
        blocks.push(Block {
            device: *device,
            input_norm: RmsNorm::load(&layer.at(input_norm), spec.hidden_size, rms_norm_eps)?,
            attention,
            post_attention_norm: RmsNorm::load(&layer.at(post_attention_norm), spec.hidden_size, rms_norm_eps)?,
            feed_forward,
            hyper,
        });
    }
    let norm = RmsNorm::load(&model.at("norm").on(last), spec.hidden_size, rms_norm_eps)?;
    // Tied checkpoints (Qwen3-0.6B) store no lm_head; some still carry one, which then wins.
    let lm_head = if tie_word_embeddings && !w.contains(&format!("{}.weight", names.lm_head)) {
        Linear::from_weight(embed_tokens.to_device(last))
    } else {
        Linear::load(&w.at(names.lm_head).on(last), spec.hidden_size, spec.vocab_size, false)?
    };
    Ok(Transformer { spec, embed_tokens, blocks, norm, lm_head, rotary, hyper_head: None })
}
