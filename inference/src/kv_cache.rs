//! Per-sequence key/value cache, kept apart from the model code (as mistral.rs does): the model
//! appends each layer's new keys and values and attends over the views this returns.
//!
//! Storage per layer is one `[1, kv_heads, capacity, head_dim]` buffer per keys and values on
//! the layer's device, grown by doubling, so decoding a token copies only that token — but never
//! past the tokens the sequence was admitted for, so what it holds stays within what the
//! scheduler reserved for it.

use tch::Tensor;

struct LayerKv {
    keys: Tensor,
    values: Tensor,
    capacity: i64,
}

pub struct SequenceCache {
    layers: Vec<Option<LayerKv>>,
    /// Tokens every layer holds.
    len: i64,
    /// Tokens it will ever hold (capacity grows up to this, no further).
    limit: i64,
}

impl SequenceCache {
    /// A cache for at most `limit` tokens.
    pub fn new(layers: usize, limit: i64) -> Self {
        Self { layers: (0..layers).map(|_| None).collect(), len: 0, limit }
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
            .map(|l| (l.keys.numel() + l.values.numel()) as i64 * l.keys.kind().elt_size_in_bytes() as i64)
            .sum()
    }

    /// Appends `keys`/`values` (`[1, kv_heads, n, head_dim]`) at position `len()` of `layer` and
    /// returns views of everything that layer holds, `[1, kv_heads, len() + n, head_dim]`.
    /// The new length counts once every layer has appended: see [`Self::advance`]. Appending
    /// past the limit is a caller's bug (the scheduler stops a sequence at its limit).
    pub fn append(&mut self, layer: usize, keys: &Tensor, values: &Tensor) -> (Tensor, Tensor) {
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
            let new_keys = Tensor::zeros(&size, (keys.kind(), keys.device()));
            let new_values = Tensor::zeros(&size, (values.kind(), values.device()));
            if let Some(old) = slot.as_ref() {
                new_keys.narrow(2, 0, self.len).copy_(&old.keys.narrow(2, 0, self.len));
                new_values.narrow(2, 0, self.len).copy_(&old.values.narrow(2, 0, self.len));
            }
            *slot = Some(LayerKv { keys: new_keys, values: new_values, capacity });
        }
        let l = slot.as_mut().expect("allocated above");
        l.keys.narrow(2, self.len, n).copy_(keys);
        l.values.narrow(2, self.len, n).copy_(values);
        (l.keys.narrow(2, 0, needed), l.values.narrow(2, 0, needed))
    }

    /// Counts `n` appended tokens, after every layer took them.
    pub fn advance(&mut self, n: i64) {
        self.len += n;
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
