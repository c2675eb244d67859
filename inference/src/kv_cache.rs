//! Per-sequence key/value cache, kept apart from the model code (as mistral.rs does): the model
//! appends each layer's new keys and values and attends over the views this returns.
//!
//! Storage per layer is one `[1, kv_heads, capacity, head_dim]` buffer per keys and values on
//! the layer's device, grown by doubling, so decoding a token copies only that token — but never
//! past the tokens the sequence was admitted for, so what it holds stays within what the
//! scheduler reserved for it.
//!
//! The cache may keep keys and values in FP8 (vLLM's `--kv-cache-dtype fp8`, e4m3, or `fp8_e5m2`)
//! at half a bfloat16 cache's bytes: written saturated to the format's largest finite value with
//! scale 1 (vLLM's default without calibrated scales) and widened back to the model's dtype when
//! read.
//!
//! A layer whose queries see only a sliding window of keys keeps only that window
//! ([`SequenceCache::append_window`], DeepSeek-V4's, whose keys are its values too): a fixed
//! number of keys per sequence, not one per token.
//!
//! A layer may also keep state of its own per sequence ([`LayerState`]: DeepSeek-V4's
//! compressors keep the tokens of a window not yet closed and the entries emitted so far,
//! GLM-5.3-Flash's linear layers their recurrent state); the model defines it, the cache holds
//! it and counts its bytes.

use std::any::Any;

use tch::{Kind, Tensor};

/// What a layer keeps per sequence beside its keys and values.
pub trait LayerState: Any + Send {
    /// Bytes it holds on devices.
    fn bytes(&self) -> i64;
}

struct LayerKv {
    keys: Tensor,
    /// `None` where the keys are the values (DeepSeek-V4's shared-KV attention, kept by
    /// [`SequenceCache::append_window`]) or where one row per token makes both
    /// ([`SequenceCache::append_rows`]): one tensor kept.
    values: Option<Tensor>,
    capacity: i64,
}

pub struct SequenceCache {
    layers: Vec<Option<LayerKv>>,
    /// Tokens every layer holds.
    len: i64,
    /// Tokens it will ever hold (capacity grows up to this, no further).
    limit: i64,
    /// The dtype it keeps keys and values in, when not theirs.
    storage: Option<Kind>,
    /// Each layer's own state, where it keeps one.
    states: Vec<Option<Box<dyn LayerState>>>,
}

impl SequenceCache {
    /// A cache for at most `limit` tokens.
    pub fn new(layers: usize, limit: i64) -> Self {
        Self {
            layers: (0..layers).map(|_| None).collect(),
            len: 0,
            limit,
            storage: None,
            states: (0..layers).map(|_| None).collect(),
        }
    }

    /// The same, keeping keys and values in `kind` (FP8) and widening them when read.
    pub fn storing(mut self, kind: Kind) -> Self {
        self.storage = Some(kind);
        self
    }

    /// Tokens cached (the position the next token takes).
    pub fn len(&self) -> i64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held on devices, for admission decisions.
    pub fn bytes(&self) -> i64 {
        self.layers
            .iter()
            .flatten()
            .map(|l| {
                let values = l.values.as_ref().map_or(0, Tensor::numel);
                (l.keys.numel() + values) as i64 * l.keys.kind().elt_size_in_bytes() as i64
            })
            .sum::<i64>()
            + self.states.iter().flatten().map(|s| s.bytes()).sum::<i64>()
    }

    /// The state `layer` keeps for this sequence, made by `init` the first time it is asked for.
    /// A layer keeps one type of state (asking for another is a bug).
    pub fn state<T: LayerState>(&mut self, layer: usize, init: impl FnOnce() -> T) -> &mut T {
        let slot = self.states[layer].get_or_insert_with(|| Box::new(init()));
        let any: &mut dyn Any = slot.as_mut();
        any.downcast_mut::<T>().expect("a layer keeps one type of state")
    }

    /// Appends `keys`/`values` (`[1, kv_heads, n, head_dim]`) at position `len()` of `layer` and
    /// returns views of everything that layer holds, `[1, kv_heads, len() + n, head_dim]`, in
    /// the dtype of `keys` (widened from FP8 where the cache keeps FP8).
    /// The new length counts once every layer has appended: see [`Self::advance`]. Appending
    /// past the limit is a caller's bug (the scheduler stops a sequence at its limit).
    pub fn append(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
        self.store(layer, keys, Some(values));
        let (all_keys, all_values) = self.held(layer, keys.size()[2], keys.kind());
        (all_keys, all_values.expect("kept with values"))
    }

    /// [`Self::append`] without reading anything back: for attention that reads the new keys as
    /// computed (a prompt with no past), which need not widen the layer's cache.
    pub fn keep(&mut self, layer: usize, keys: &Tensor, values: &Tensor) {
        self.store(layer, keys, Some(values));
    }

    /// For a layer that keeps one row per token from which it makes its keys and values
    /// (GLM-5.3-Flash's multi-head latent attention keeps the latent, and its indexer's keys
    /// beside it): appends `rows` (`[1, 1, n, width]`) as [`Self::append`] appends keys, and
    /// returns every row the layer holds, `[1, 1, len() + n, width]`.
    pub fn append_rows(&mut self, layer: usize, rows: &Tensor) -> Tensor {
        self.store(layer, rows, None);
        self.held(layer, rows.size()[2], rows.kind()).0
    }

    /// For a layer whose keys are its values and whose queries see only the `window - 1` keys
    /// before their own (DeepSeek-V4's sliding window): the keys this step's queries may see
    /// (those held, then the new `[1, kv_heads, n, head_dim]`) and the position of the first;
    /// of these only the last `window - 1` are kept for the steps after, so a sequence holds a
    /// window of keys however long it grows. As [`Self::append`], a sequence with a past reads
    /// its new keys back through the cache's dtype (rounded where it keeps FP8); a prompt with
    /// none attends its keys as computed.
    pub fn append_window(&mut self, layer: usize, keys: &Tensor, window: i64) -> (Tensor, i64) {
        let n = keys.size()[2];
        assert!(self.len + n <= self.limit, "a sequence cache of {} tokens was asked for {}", self.limit, self.len + n);
        let kind = self.storage.unwrap_or(keys.kind());
        let held = self.layers[layer].as_ref().map(|l| l.keys.shallow_clone());
        let held_len = held.as_ref().map_or(0, |h| h.size()[2]);
        let all = match held {
            Some(held) if self.len > 0 => {
                let read = |t: &Tensor| if kind == keys.kind() { t.shallow_clone() } else { t.to_kind(keys.kind()) };
                let new = read(&stored(keys, kind).to_kind(kind));
                Tensor::cat(&[read(&held), new], 2)
            }
            _ => keys.shallow_clone(),
        };
        let total = all.size()[2];
        let kept = (window - 1).clamp(0, total);
        // A copy of its own: the step's tensors are not held on to.
        let tail = stored(&all.narrow(2, total - kept, kept), kind).to_kind(kind).copy();
        self.layers[layer] = Some(LayerKv { keys: tail, values: None, capacity: kept });
        (all, self.len - held_len)
    }

    /// What `layer` holds after `n` new tokens, in `kind`.
    fn held(&self, layer: usize, n: i64, kind: Kind) -> (Tensor, Option<Tensor>) {
        let needed = self.len + n;
        let l = self.layers[layer].as_ref().expect("kept above");
        let widen = |t: Tensor| if self.storage.is_some_and(|s| s != kind) { t.to_kind(kind) } else { t };
        (widen(l.keys.narrow(2, 0, needed)), l.values.as_ref().map(|v| widen(v.narrow(2, 0, needed))))
    }

    fn store(&mut self, layer: usize, keys: &Tensor, values: Option<&Tensor>) {
        let n = keys.size()[2];
        let needed = self.len + n;
        assert!(needed <= self.limit, "a sequence cache of {} tokens was asked for {needed}", self.limit);
        let slot = &mut self.layers[layer];
        let grow = slot.as_ref().is_none_or(|l| l.capacity < needed);
        if grow {
            let doubled = slot.as_ref().map_or(16, |l| l.capacity * 2);
            let capacity = needed.max(doubled.min(self.limit));
            let mut size = keys.size();
            size[2] = capacity;
            let kind = self.storage.unwrap_or(keys.kind());
            let len = self.len;
            let grown = |old: Option<&Tensor>| {
                let new = Tensor::zeros(&size, (kind, keys.device()));
                if let Some(old) = old {
                    new.narrow(2, 0, len).copy_(&old.narrow(2, 0, len));
                }
                new
            };
            let old = slot.as_ref();
            let new_keys = grown(old.map(|l| &l.keys));
            let new_values = values.map(|_| grown(old.and_then(|l| l.values.as_ref())));
            *slot = Some(LayerKv { keys: new_keys, values: new_values, capacity });
        }
        let l = slot.as_mut().expect("allocated above");
        l.keys.narrow(2, self.len, n).copy_(&stored(keys, l.keys.kind()));
        if let (Some(all), Some(values)) = (&l.values, values) {
            all.narrow(2, self.len, n).copy_(&stored(values, all.kind()));
        }
    }

    /// Counts `n` appended tokens, after every layer took them.
    pub fn advance(&mut self, n: i64) {
        self.len += n;
    }
}

/// `x` as the cache keeps it in `kind`: FP8 saturates at the format's largest finite value (as
/// vLLM's cache writes do) rather than turning NaN.
fn stored(x: &Tensor, kind: Kind) -> Tensor {
    // The write (`copy_`) converts to the cache's dtype itself; FP8 only needs clamping first.
    match kind {
        Kind::Float8e4m3fn if x.kind() != kind => x.clamp(-448.0, 448.0),
        Kind::Float8e5m2 if x.kind() != kind => x.clamp(-57344.0, 57344.0),
        _ => x.shallow_clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn appends_grow_and_keep_what_was_there() {
        let mut cache = SequenceCache::new(2, 100);
        let mut all = Vec::new();
        for step in 0..40i64 {
            let n = if step == 0 { 5 } else { 1 };
            let k = Tensor::randn([1, 2, n, 4], (Kind::Float, Device::Cpu));
            let v = &k * 2.0;
            all.push(k.shallow_clone());
            for layer in 0..2 {
                let (keys, values) = cache.append(layer, &k, &v);
                let expected = Tensor::cat(&all, 2);
                assert!(keys.allclose(&expected, 0.0, 0.0, false));
                assert!(values.allclose(&(expected * 2.0), 0.0, 0.0, false));
            }
            cache.advance(n);
        }
        assert_eq!(cache.len(), 44);
        // Two layers, keys and values, capacity 64 (16 → 32 → 64), 2×4 floats per position.
        assert_eq!(cache.bytes(), 2 * 2 * 64 * 8 * 4);
    }

    #[test]
    fn an_fp8_cache_keeps_half_the_bytes_and_gives_back_the_rounded_values() {
        let mut cache = SequenceCache::new(1, 32).storing(Kind::Float8e4m3fn);
        // Exact in e4m3: 0.5, 448; rounded: 0.3 (to 0.3125), 1000 (saturated to 448, not NaN).
        let k = Tensor::from_slice(&[0.5f32, 0.3, 1000.0, -1000.0]).view([1, 1, 1, 4]).to_kind(Kind::BFloat16);
        let (keys, values) = cache.append(0, &k, &(&k * 2.0));
        assert_eq!(keys.kind(), Kind::BFloat16);
        let read: Vec<f32> = keys.to_kind(Kind::Float).flatten(0, -1).try_into().unwrap();
        assert_eq!(read, vec![0.5, 0.3125, 448.0, -448.0]);
        let read: Vec<f32> = values.to_kind(Kind::Float).flatten(0, -1).try_into().unwrap();
        assert_eq!(read, vec![1.0, 0.625, 448.0, -448.0]);
        cache.advance(1);
        // Capacity 16, one head of 4, keys and values, a byte each: half a bfloat16 cache's.
        assert_eq!(cache.bytes(), 2 * 16 * 4);
        let mut plain = SequenceCache::new(1, 32);
        let _ = plain.append(0, &k, &k);
        assert_eq!(plain.bytes(), 2 * 2 * 16 * 4);
    }

    /// A sliding window's keys: each step sees the last `window - 1` keys before it and its own,
    /// with the position of the first; the cache keeps no more than that between steps; an FP8
    /// cache rounds what a sequence with a past reads, and a prompt's own keys stay as computed.
    #[test]
    fn a_window_of_keys_is_kept_and_read_with_its_position() {
        let window = 4;
        let mut cache = SequenceCache::new(1, 100);
        let mut all = Vec::new();
        // A prompt of 6, then a chunk of 2, then tokens one at a time.
        for n in [6i64, 2, 1, 1, 1] {
            let k = Tensor::randn([1, 1, n, 4], (Kind::Float, Device::Cpu));
            all.push(k.shallow_clone());
            let every = Tensor::cat(&all, 2);
            let (keys, first) = cache.append_window(0, &k, window);
            let past = cache.len();
            // The window before the step's first token, and the step's own.
            let expected_first = if past == 0 { 0 } else { (past - (window - 1)).max(0) };
            assert_eq!(first, expected_first, "after {past} tokens");
            let total = every.size()[2];
            assert!(keys.equal(&every.narrow(2, first, total - first)), "after {past} tokens");
            cache.advance(n);
            assert_eq!(cache.bytes(), (window - 1).min(total) * 4 * 4, "after {past} tokens");
        }
        assert_eq!(cache.len(), 11);

        let mut fp8 = SequenceCache::new(1, 8).storing(Kind::Float8e4m3fn);
        let prompt = Tensor::from_slice(&[0.3f32, 1000.0]).view([1, 1, 2, 1]);
        let (keys, _) = fp8.append_window(0, &prompt, window);
        assert!(keys.equal(&prompt), "a prompt's own keys as computed");
        fp8.advance(2);
        let next = Tensor::from_slice(&[0.3f32]).view([1, 1, 1, 1]);
        let (keys, first) = fp8.append_window(0, &next, window);
        let read: Vec<f32> = keys.flatten(0, -1).try_into().unwrap();
        assert_eq!((read, first), (vec![0.3125, 448.0, 0.3125], 0));
        assert_eq!(fp8.bytes(), 3, "three e4m3 keys of one element");
    }

    /// A layer's own state: made once, the same one given back, its bytes counted.
    #[test]
    fn a_layers_own_state_is_kept_and_counted() {
        struct Held(Tensor, usize);
        impl LayerState for Held {
            fn bytes(&self) -> i64 {
                self.0.numel() as i64 * 4
            }
        }
        let mut cache = SequenceCache::new(2, 8);
        let mut made = 0;
        for _ in 0..2 {
            let held = cache.state(1, || {
                made += 1;
                Held(Tensor::zeros([3, 5], (Kind::Float, Device::Cpu)), 0)
            });
            held.1 += 1;
        }
        assert_eq!((made, cache.state(1, || Held(Tensor::zeros([1], (Kind::Float, Device::Cpu)), 0)).1), (1, 2));
        assert_eq!(cache.bytes(), 3 * 5 * 4);
    }

    /// One row per token (a latent): grown by doubling like keys, no values kept beside it.
    #[test]
    fn rows_alone_are_kept_and_read_back() {
        let mut cache = SequenceCache::new(1, 100);
        let mut all = Vec::new();
        for n in [5i64, 1, 1, 12] {
            let rows = Tensor::randn([1, 1, n, 6], (Kind::Float, Device::Cpu));
            all.push(rows.shallow_clone());
            assert!(cache.append_rows(0, &rows).equal(&Tensor::cat(&all, 2)));
            cache.advance(n);
        }
        // 19 rows in a capacity of 32 (16 → 32), 6 floats each, and nothing for values.
        assert_eq!(cache.bytes(), 32 * 6 * 4);
    }

    #[test]
    fn capacity_stops_at_the_limit() {
        let mut cache = SequenceCache::new(1, 40);
        let k = Tensor::randn([1, 2, 1, 4], (Kind::Float, Device::Cpu));
        for _ in 0..40 {
            let _ = cache.append(0, &k, &k);
            cache.advance(1);
        }
        // 16 → 32 → 40 (not 64): the limit, two heads × 4 floats per position, keys and values.
        assert_eq!(cache.bytes(), 2 * 40 * 8 * 4);
        let past_limit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| cache.append(0, &k, &k)));
        assert!(past_limit.is_err(), "a 41st token must not fit a cache of 40");
    }
}
