//! One forward step over several sequences: what each brings (tokens or input embeddings), its
//! cache, and where its tokens sit in the flattened `[tokens, hidden]` matrix.

use std::cell::RefCell;

use tch::{Device, Kind, Tensor};

use crate::kv_cache::SequenceCache;

/// A sequence's new input for one step.
pub enum StepInput {
    /// Token ids (a prompt, a prompt's chunk, or one decoded token).
    Tokens(Vec<i64>),
    /// Input embeddings `[tokens, hidden]` in the model dtype, bypassing the token embedding
    /// (PoC v2 feeds seeded normals this way).
    Embeddings {
        embeddings: Tensor,
        /// A token id per row for the layers that choose experts by token id (DeepSeek-V4's
        /// hash-routed ones), which embeddings alone do not give them: PoC v2's pseudo ids.
        routing_ids: Option<Vec<i64>>,
    },
}

impl StepInput {
    pub fn len(&self) -> i64 {
        match self {
            StepInput::Tokens(t) => t.len() as i64,
            StepInput::Embeddings { embeddings, .. } => embeddings.size()[0],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A sequence's cache for a step; `None` runs the step without keeping keys and values (a
/// one-shot forward such as a PoC nonce).
pub type StepCache<'a> = Option<&'a mut SequenceCache>;

pub struct Step<'a> {
    pub input: StepInput,
    pub cache: StepCache<'a>,
}

/// Which positions' final hidden states a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Each sequence's last new token (decoding, PoC).
    Last,
    /// Every new token (scoring a prompt, tests).
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// First row in the flattened batch.
    pub start: i64,
    /// New tokens.
    pub len: i64,
    /// Tokens already cached before this step.
    pub past: i64,
}

pub struct Batch {
    spans: Vec<Span>,
    /// What a layer hands on to later layers of the same step (a GLM-5.3-Flash indexer's choice
    /// of keys, per sequence, which the shared layer after it reuses): the step's own, so
    /// nothing of it outlives the step or reaches another.
    handed_on: RefCell<Option<Vec<Tensor>>>,
}

impl Batch {
    /// The layout of `steps`; an empty input is refused by the caller.
    pub fn new(steps: &[Step<'_>]) -> Self {
        let mut start = 0;
        let spans = steps
            .iter()
            .map(|s| {
                let span = Span { start, len: s.input.len(), past: s.cache.as_ref().map_or(0, |c| c.len()) };
                start += span.len;
                span
            })
            .collect();
        Self { spans, handed_on: RefCell::new(None) }
    }

    /// Leaves `value` for the layers after this one in the step (replacing what was left).
    pub fn hand_on(&self, value: Vec<Tensor>) {
        *self.handed_on.borrow_mut() = Some(value);
    }

    /// What an earlier layer of the step left, if any (taken: hand it on again to pass it further).
    pub fn take_handed_on(&self) -> Option<Vec<Tensor>> {
        self.handed_on.borrow_mut().take()
    }

    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    pub fn tokens(&self) -> i64 {
        self.spans.last().map_or(0, |s| s.start + s.len)
    }

    /// `(sequences, length)` when every sequence brings the same number of tokens and has no
    /// past: attention then runs as one batched kernel.
    pub fn uniform_fresh(&self) -> Option<(i64, i64)> {
        let first = self.spans.first()?;
        self.spans.iter().all(|s| s.past == 0 && s.len == first.len).then_some((self.spans.len() as i64, first.len))
    }

    /// Each new token's position in its sequence, int64 `[tokens]`.
    pub fn positions(&self, device: Device) -> Tensor {
        let positions: Vec<i64> = self.spans.iter().flat_map(|s| s.past..s.past + s.len).collect();
        Tensor::from_slice(&positions).to_device(device)
    }

    /// Rows of each sequence's last new token, int64 `[sequences]`.
    pub fn last_rows(&self, device: Device) -> Tensor {
        let rows: Vec<i64> = self.spans.iter().map(|s| s.start + s.len - 1).collect();
        Tensor::from_slice(&rows).to_kind(Kind::Int64).to_device(device)
    }
}
