//! DeepSeek-V4's long-range attention entries, read from transformers 5.23's
//! `DeepseekV4HCACompressor`, `DeepseekV4CSACompressor`, `DeepseekV4Indexer` and their cache
//! layers: what its compressed layers attend beside their sliding window.
//!
//! A compressor turns every closed window of `rate` tokens into one entry of `head_dim`: the
//! tokens' projections (`wkv`) averaged under a softmax of their gates (`wgate`, plus a learned
//! bias per position in the window, `ape`), RMS-normalised and rotated at the window's first
//! position. HCA's windows (128 tokens in the release) do not overlap. CSA's (4 tokens) do: each
//! token projects two series, and entry `w` pools window `w - 1`'s first series with window
//! `w`'s second, over `2 × rate` slots. A query sees the entries of the windows closed at or
//! before its own position; under CSA only the `index_topk` of those its lightning indexer (a
//! compressor of its own at `index_head_dim`, queries from the layer's query residual, and a
//! ReLU score weighted per indexer head) scores highest.
//!
//! Per sequence a compressor keeps ([`CompressorState`]) the tokens of the window still open,
//! the entries so far and, overlapping, the last closed window's first series; without a cache
//! (a one-shot forward) the windows of the new tokens alone are compressed and the rest dropped,
//! as transformers does.

use tch::{Kind, Tensor};

use super::deepseek_v4::rotate_tail;
use crate::checkpoint::Loader;
use crate::error::LoadError;
use crate::kv_cache::LayerState;
use crate::layers::{Linear, RmsNorm, Rotary};

/// One compressor: HCA's, CSA's, or CSA's indexer's.
pub struct Compressor {
    /// `hidden → series × head_dim`.
    kv: Linear,
    gate: Linear,
    /// `[rate, series × head_dim]`, added to the gates.
    position_bias: Tensor,
    norm: RmsNorm,
    rate: i64,
    head_dim: i64,
    /// CSA's two series (windows of `2 × rate` slots, stride `rate`); HCA's one.
    overlapping: bool,
}

/// A compressor's state for one sequence.
#[derive(Default)]
pub struct CompressorState {
    /// Projections (`[tokens, series × head_dim]`) and gates of the window still open.
    open_kv: Option<Tensor>,
    open_gate: Option<Tensor>,
    /// `[entries, head_dim]`.
    entries: Option<Tensor>,
    emitted: i64,
    /// Overlapping: the last closed window's first series and its gates, `[rate, head_dim]`.
    last_first_series: Option<(Tensor, Tensor)>,
}

impl CompressorState {
    fn bytes(&self) -> i64 {
        let tensors = [&self.open_kv, &self.open_gate, &self.entries];
        let held = tensors.into_iter().flatten().chain(self.last_first_series.iter().flat_map(|(a, b)| [a, b]));
        held.map(|t| t.numel() as i64 * t.kind().elt_size_in_bytes() as i64).sum()
    }
}

impl Compressor {
    /// `wkv`, `wgate`, `ape` and `norm` under `w`.
    pub fn load(
        w: &Loader,
        hidden: i64,
        head_dim: i64,
        rate: i64,
        overlapping: bool,
        eps: f64,
    ) -> Result<Self, LoadError> {
        let width = if overlapping { 2 * head_dim } else { head_dim };
        Ok(Self {
            kv: Linear::load(&w.at("wkv"), hidden, width, false)?,
            gate: Linear::load(&w.at("wgate"), hidden, width, false)?,
            position_bias: w.with_kind(Kind::Float).tensor("ape", &[rate, width])?,
            norm: RmsNorm::load(&w.at("norm"), head_dim, eps)?,
            rate,
            head_dim,
            overlapping,
        })
    }

    /// The entries of one sequence after its new rows of hidden states `x` (`[tokens, hidden]`):
    /// with a `state`, the windows they close appended to what it holds, and all of it
    /// returned; without, the windows of `x` alone (its first token at position 0). `[entries,
    /// head_dim]`, each rotated by `rotary` at its window's first position.
    pub fn entries(&self, x: &Tensor, state: Option<&mut CompressorState>, rotary: &Rotary) -> Tensor {
        let (rate, d) = (self.rate, self.head_dim);
        let (mut kv, mut gate) = (self.kv.forward(x), self.gate.forward(x));
        let first_position = state.as_ref().map_or(0, |s| s.emitted * rate);
        if let Some(s) = &state
            && let (Some(open_kv), Some(open_gate)) = (&s.open_kv, &s.open_gate)
        {
            kv = Tensor::cat(&[open_kv, &kv], 0);
            gate = Tensor::cat(&[open_gate, &gate], 0);
        }
        let rows = kv.size()[0];
        let windows = rows / rate;
        let closed = windows * rate;
        let new_entries = (windows > 0).then(|| {
            let width = kv.size()[1];
            let kv_w = kv.narrow(0, 0, closed).view([windows, rate, width]);
            let gate_w = gate.narrow(0, 0, closed).view([windows, rate, width]) + &self.position_bias;
            let (slots_kv, slots_gate, last) = if self.overlapping {
                let prior = state.as_ref().and_then(|s| s.last_first_series.as_ref());
                let slots = overlapped(&kv_w, &gate_w, d, prior);
                let last = (kv_w.get(windows - 1).narrow(-1, 0, d), gate_w.get(windows - 1).narrow(-1, 0, d));
                (slots.0, slots.1, Some(last))
            } else {
                (kv_w, gate_w, None)
            };
            let weights = slots_gate.softmax(1, Kind::Float).to_kind(slots_kv.kind());
            let pooled = self.norm.forward(&(slots_kv * weights).sum_dim_intlist(1, false, x.kind()));
            let positions = Tensor::arange(windows, (Kind::Int64, x.device())) * rate + first_position;
            let (cos, sin) = rotary.cos_sin(&positions, x.kind());
            (rotate_tail(&pooled.unsqueeze(1), &cos, &sin).squeeze_dim(1), last)
        });
        let none = || Tensor::zeros([0, d], (x.kind(), x.device()));
        let Some(state) = state else {
            return new_entries.map_or_else(none, |(e, _)| e);
        };
        state.open_kv = Some(kv.narrow(0, closed, rows - closed));
        state.open_gate = Some(gate.narrow(0, closed, rows - closed));
        if let Some((entries, last)) = new_entries {
            if let Some(last) = last {
                state.last_first_series = Some(last);
            }
            state.emitted += windows;
            state.entries = Some(match state.entries.take() {
                Some(old) => Tensor::cat(&[old, entries], 0),
                None => entries,
            });
        }
        state.entries.as_ref().map_or_else(none, Tensor::shallow_clone)
    }
}

/// CSA's slots: window `w`'s `2 × rate` slots hold window `w - 1`'s first series, then window
/// `w`'s second; window 0's first half is the previous call's last window (`prior`), or empty
/// slots (zero values, gates of −∞: no weight) at a sequence's start.
fn overlapped(kv: &Tensor, gate: &Tensor, d: i64, prior: Option<&(Tensor, Tensor)>) -> (Tensor, Tensor) {
    let size = kv.size();
    let (windows, rate) = (size[0], size[1]);
    let first = |t: &Tensor| t.narrow(-1, 0, d);
    let second = |t: &Tensor| t.narrow(-1, d, d);
    let (empty_kv, empty_gate) = match prior {
        Some((prior_kv, prior_gate)) => {
            (prior_kv.to_kind(kv.kind()).unsqueeze(0), prior_gate.to_kind(gate.kind()).unsqueeze(0))
        }
        None => (
            Tensor::zeros([1, rate, d], (kv.kind(), kv.device())),
            Tensor::full([1, rate, d], f64::NEG_INFINITY, (gate.kind(), gate.device())),
        ),
    };
    let earlier = |t: &Tensor, start: Tensor| Tensor::cat(&[start, first(t).narrow(0, 0, windows - 1)], 0);
    let slots_kv = Tensor::cat(&[earlier(kv, empty_kv), second(kv)], 1);
    let slots_gate = Tensor::cat(&[earlier(gate, empty_gate), second(gate)], 1);
    (slots_kv, slots_gate)
}

/// CSA's lightning indexer: which of the entries each query attends.
pub struct Indexer {
    compressor: Compressor,
    /// The layer's query residual (`q_lora_rank`) → `heads × head_dim`.
    q_b: Linear,
    /// `hidden → heads`: each indexer head's weight per token.
    weights: Linear,
    heads: i64,
    head_dim: i64,
    top_k: i64,
}

impl Indexer {
    /// `wq_b`, `weights_proj` and `compressor` under `w`.
    pub fn load(w: &Loader, shape: IndexerShape, eps: f64) -> Result<Self, LoadError> {
        let IndexerShape { hidden, q_lora_rank, heads, head_dim, rate, top_k } = shape;
        Ok(Self {
            compressor: Compressor::load(&w.at("compressor"), hidden, head_dim, rate, true, eps)?,
            q_b: Linear::load(&w.at("wq_b"), q_lora_rank, heads * head_dim, false)?,
            weights: Linear::load(&w.at("weights_proj"), hidden, heads, false)?,
            heads,
            head_dim,
            top_k,
        })
    }

    /// For one sequence's new rows (`x` `[tokens, hidden]`, `q_residual` `[tokens, q_lora_rank]`,
    /// at `positions`), which of the `entries` closed so far each attends: `[tokens, entries]`,
    /// true for the `top_k` best-scored of those whose window closed at or before the query.
    pub fn visible(
        &self,
        x: &Tensor,
        q_residual: &Tensor,
        positions: &Tensor,
        state: Option<&mut CompressorState>,
        rotary: &Rotary,
    ) -> Tensor {
        let keys = self.compressor.entries(x, state, rotary).to_kind(Kind::Float);
        let tokens = x.size()[0];
        let count = keys.size()[0];
        let closed = closed_windows(positions, self.compressor.rate);
        if count == 0 {
            return Tensor::zeros([tokens, 0], (Kind::Bool, x.device()));
        }
        let (cos, sin) = rotary.cos_sin(positions, x.kind());
        let q = rotate_tail(&self.q_b.forward(q_residual).view([tokens, self.heads, self.head_dim]), &cos, &sin);
        let scores = q.to_kind(Kind::Float).matmul(&keys.transpose(0, 1)).relu() * (self.head_dim as f64).powf(-0.5);
        let weights = self.weights.forward(x).to_kind(Kind::Float) * (self.heads as f64).powf(-0.5);
        let index_scores = (scores * weights.unsqueeze(-1)).sum_dim_intlist(1, false, Kind::Float);
        let entry = Tensor::arange(count, (Kind::Int64, x.device())).unsqueeze(0);
        let future = entry.ge_tensor(&closed.unsqueeze(1));
        let index_scores = index_scores.masked_fill(&future, f64::NEG_INFINITY);
        let (_, picked) = index_scores.topk(self.top_k.min(count), -1, true, true);
        // Picks past the closed windows (a query with fewer than top_k to choose from) see
        // nothing: they go to a spare column that is then dropped.
        let picked = picked.where_self(&picked.lt_tensor(&closed.unsqueeze(1)), &picked.full_like(count));
        Tensor::zeros([tokens, count + 1], (Kind::Bool, x.device())).scatter_value(1, &picked, 1).narrow(1, 0, count)
    }
}

/// The sizes an [`Indexer`] is loaded with.
#[derive(Debug, Clone, Copy)]
pub struct IndexerShape {
    pub hidden: i64,
    pub q_lora_rank: i64,
    pub heads: i64,
    pub head_dim: i64,
    pub rate: i64,
    pub top_k: i64,
}

/// How many windows of `rate` have closed by each position (a query at position `p` sees
/// entries `0..(p + 1) / rate`).
pub fn closed_windows(positions: &Tensor, rate: i64) -> Tensor {
    (positions + 1).divide_scalar_mode(rate, "floor")
}

/// A compressed layer's state for one sequence: its compressor's and, under CSA, its indexer's.
#[derive(Default)]
pub struct CompressedLayerState {
    pub compressor: CompressorState,
    pub indexer: CompressorState,
}

impl LayerState for CompressedLayerState {
    fn bytes(&self) -> i64 {
        self.compressor.bytes() + self.indexer.bytes()
    }
}

#[cfg(test)]
mod tests {
    use tch::Device;

    use super::*;
    use crate::config::{Rope, RopeScaling};

    fn compressor(overlapping: bool, rate: i64) -> Compressor {
        let cpu = (Kind::Float, Device::Cpu);
        let (hidden, d) = (12, 8);
        let width = if overlapping { 2 * d } else { d };
        Compressor {
            kv: Linear::from_weight(Tensor::randn([width, hidden], cpu)),
            gate: Linear::from_weight(Tensor::randn([width, hidden], cpu)),
            position_bias: Tensor::randn([rate, width], cpu),
            norm: RmsNorm::new(Tensor::rand([d], cpu) + 0.5, 1e-6),
            rate,
            head_dim: d,
            overlapping,
        }
    }

    /// The entries of a sequence fed in pieces (windows left open between them, one token at a
    /// time) are those of the whole fed at once, overlapping or not.
    #[test]
    fn entries_fed_in_pieces_are_those_of_the_whole() {
        tch::manual_seed(9);
        let rotary = Rotary::new(&Rope { theta: 10_000.0, scaling: RopeScaling::Default }, 4).interleaved();
        for (overlapping, rate) in [(true, 4), (false, 8), (false, 3)] {
            let c = compressor(overlapping, rate);
            let x = Tensor::randn([30, 12], (Kind::Float, Device::Cpu));
            let whole = c.entries(&x, None, &rotary);
            assert_eq!(whole.size(), [30 / rate, 8]);
            for pieces in [vec![13, 17], vec![1; 30], vec![4, 4, 22]] {
                let mut state = CompressorState::default();
                let mut start = 0;
                let mut last = Tensor::zeros([0, 8], (Kind::Float, Device::Cpu));
                for n in pieces.iter() {
                    last = c.entries(&x.narrow(0, start, *n), Some(&mut state), &rotary);
                    start += n;
                }
                let error = (&last - &whole).abs().max().double_value(&[]);
                assert!(error < 1e-5, "overlapping {overlapping}, rate {rate}, pieces {pieces:?}: off by {error}");
            }
        }
    }

    /// An indexer's choices for a sequence fed in pieces are those for the whole fed at once.
    #[test]
    fn an_indexers_choices_fed_in_pieces_are_those_of_the_whole() {
        tch::manual_seed(10);
        let cpu = (Kind::Float, Device::Cpu);
        let rotary = Rotary::new(&Rope { theta: 10_000.0, scaling: RopeScaling::Default }, 4).interleaved();
        // Eight heads: with few, an entry often scores exactly 0 (every head's ReLU at 0), and
        // which of two such ties top-k keeps depends on how many columns it looks at.
        let indexer = Indexer {
            compressor: compressor(true, 4),
            q_b: Linear::from_weight(Tensor::randn([8 * 8, 6], cpu)),
            weights: Linear::from_weight(Tensor::randn([8, 12], cpu)),
            heads: 8,
            head_dim: 8,
            top_k: 2,
        };
        let x = Tensor::randn([30, 12], cpu);
        let q_residual = Tensor::randn([30, 6], cpu);
        let positions = Tensor::arange(30, (Kind::Int64, Device::Cpu));
        let whole = indexer.visible(&x, &q_residual, &positions, None, &rotary);
        assert_eq!(whole.size(), [30, 7]);
        let seen: Vec<i64> = whole.sum_dim_intlist(1, false, Kind::Int64).try_into().unwrap();
        let expected: Vec<i64> = (0..30).map(|p| ((p + 1) / 4).min(2)).collect();
        assert_eq!(seen, expected, "the best 2 of the closed windows, or all while fewer");
        for pieces in [vec![13, 17], vec![1; 30]] {
            let mut state = CompressorState::default();
            let mut start = 0;
            for n in pieces.iter() {
                let rows = |t: &Tensor| t.narrow(0, start, *n);
                let got = indexer.visible(&rows(&x), &rows(&q_residual), &rows(&positions), Some(&mut state), &rotary);
                let columns = got.size()[1];
                assert!(got.equal(&rows(&whole).narrow(1, 0, columns)), "pieces {pieces:?} at {start}");
                start += n;
            }
        }
    }
}
