//! Causal self-attention in float32 on the CPU for sequences of one length with no past (a PoC
//! v2 batch, fresh prompts of one length), by a kernel of ours. libtorch's CPU flash attention
//! multiplies each block of queries by its keys through MKL's sgemm, which on AMD runs its
//! generic kernels: a PoC v2 batch of 8 × 256 tokens of the bench's Qwen3 spent ~9–10 ms a
//! layer there on two Zen 4 cores, ~10% of the forward (docs/cpu-compute.md).
//!
//! Here a sequence's keys are packed once per key head (panels of two SIMD vectors of keys,
//! input-major, as `packed_matmul` packs weights), and each tile of six query rows computes its
//! scores against the keys it may see, their softmax, and the weighted sum of the values, while
//! the scores are in cache: register tiles of rows × two vectors, fused multiply-adds summed in
//! input order. Query head `h` reads key head `h / (heads / kv_heads)`, as libtorch's
//! `enable_gqa`. Blocks of query rows are shared among threads of ours (`cpu_threads`); a row's
//! result does not depend on which thread computes it.

use pulp::{Arch, Simd, WithSimd};

use crate::cpu_threads;
use crate::packed_matmul::{Lanes, exp, rows_times_panel};

/// Query rows of one tile: twice that many vector accumulators, as in `packed_matmul`.
const TILE_ROWS: usize = 6;

/// Query rows of one sequence handed to a thread at a time.
const BLOCK_ROWS: usize = 4 * TILE_ROWS;

/// The longest sequence the kernel takes: a tile's scores (six rows of every key it sees, 96
/// KiB at this length) stay in cache while its values are summed. Longer ones take libtorch's
/// flash attention, which blocks over the keys.
pub const MAX_LEN: usize = 4096;

/// The attention's shape: `sequences` of `len` tokens each, token-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    pub sequences: usize,
    pub len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Where the heads of each token lie in a buffer: head `h` of token `t` is the `head_dim` values
/// from `t * stride + offset + h * head_dim`.
#[derive(Clone, Copy, Debug)]
pub struct Heads<'a> {
    pub data: &'a [f32],
    pub stride: usize,
    pub offset: usize,
}

impl<'a> Heads<'a> {
    /// `heads` heads of `head_dim` values a token, side by side, token after token.
    pub fn token_major(data: &'a [f32], heads: usize, head_dim: usize) -> Self {
        Self { data, stride: heads * head_dim, offset: 0 }
    }

    fn row(&self, token: usize, head: usize, head_dim: usize) -> &[f32] {
        &self.data[token * self.stride + self.offset + head * head_dim..][..head_dim]
    }
}

/// Whether the kernel takes heads of `head_dim` values on this CPU: whole pairs of its vectors
/// (64 and 128 on AVX-512 and AVX2 alike).
pub fn supports(head_dim: usize) -> bool {
    supports_on(Arch::new(), head_dim)
}

fn supports_on(arch: Arch, head_dim: usize) -> bool {
    head_dim > 0 && head_dim.is_multiple_of(2 * arch.dispatch(Lanes))
}

/// A causal attention's queries, keys and values, its shape and the scores' scale.
#[derive(Clone, Copy, Debug)]
pub struct Causal<'a> {
    pub q: Heads<'a>,
    pub k: Heads<'a>,
    pub v: Heads<'a>,
    pub shape: Shape,
    pub scale: f32,
}

impl Causal<'_> {
    /// `softmax(q kᵀ × scale) v` of every sequence and query head, each query seeing the keys of
    /// its own sequence up to its own position: row-major `[sequences × len, heads × head_dim]`
    /// (each token's heads side by side). `threads` of ours share the work
    /// ([`cpu_threads::share`]).
    pub fn attend(&self, threads: usize) -> Vec<f32> {
        causal_attention_on(Arch::new(), self, threads)
    }
}

/// [`Causal::attend`] on the instruction set `arch` (the tests run every one the CPU has).
fn causal_attention_on(arch: Arch, attention: &Causal<'_>, threads: usize) -> Vec<f32> {
    let Causal { q, k, v, shape, scale } = *attention;
    let Shape { sequences, len, heads, kv_heads, head_dim } = shape;
    assert!(supports_on(arch, head_dim), "head_dim {head_dim} is not whole pairs of this CPU's vectors");
    assert!(len <= MAX_LEN && kv_heads > 0 && heads % kv_heads == 0, "{shape:?}");
    let width = 2 * arch.dispatch(Lanes);
    let panels = len.div_ceil(width);
    let per_head = panels * width * head_dim;

    // Each sequence's keys of each key head: panel `p` holds keys `p × width ..` input-major
    // (`[head_dim, width]`), keys past the sequence zero.
    let mut keys = vec![0f32; sequences * kv_heads * per_head];
    let packing: Vec<(usize, &mut [f32])> = keys.chunks_exact_mut(per_head).enumerate().collect();
    cpu_threads::share(packing, threads, |(i, packed)| {
        let (sequence, kv_head) = (i / kv_heads, i % kv_heads);
        for j in 0..len {
            let key = k.row(sequence * len + j, kv_head, head_dim);
            let panel = &mut packed[(j / width) * head_dim * width..][..head_dim * width];
            for (c, &x) in key.iter().enumerate() {
                panel[c * width + j % width] = x;
            }
        }
    });

    let row_len = heads * head_dim;
    let mut out = vec![0f32; sequences * len * row_len];
    let mut blocks = Vec::with_capacity(sequences * len.div_ceil(BLOCK_ROWS));
    for (sequence, rows) in out.chunks_exact_mut(len * row_len).enumerate() {
        for (b, rows) in rows.chunks_mut(BLOCK_ROWS * row_len).enumerate() {
            blocks.push(Block { sequence, first: b * BLOCK_ROWS, out: rows });
        }
    }
    // The later rows see more keys: handed out first, so no thread is left with a long block
    // at the end.
    blocks.sort_by_key(|b| std::cmp::Reverse(b.first));
    let keys = &keys[..];
    let layout = Layout { shape, width, panels, per_head, scale };
    cpu_threads::share(blocks, threads, |block| arch.dispatch(BlockKernel { block, q, v, keys, layout }));
    out
}

/// What turns a token's query and key heads, as projected, into what attention reads: Qwen3's
/// RMSNorm of each head (`norm`: a weight of `head_dim` per head, queries' then keys', and the
/// epsilon), then the rotary embedding over the whole head (`cos` and `sin`, `head_dim` values
/// a token).
pub struct QkTransform<'a> {
    pub norm: Option<(&'a [f32], f32)>,
    pub cos: &'a [f32],
    pub sin: &'a [f32],
}

/// How a buffer holds each token's projections: rows of `stride` values, the first `qk_heads`
/// heads of `head_dim` values (queries then keys) to transform.
#[derive(Clone, Copy, Debug)]
pub struct QkvRows {
    pub stride: usize,
    pub qk_heads: usize,
    pub head_dim: usize,
}

impl QkTransform<'_> {
    /// This transform in place on the first `qk_heads` heads (queries then keys) of each token's
    /// row of `stride` values in `qkv`, as `layers` computes it with libtorch: each head normalised
    /// by the root of its mean square plus epsilon (`x × rsqrt(mean(x²) + eps)`, rounded, then
    /// times the weight), then `x × cos + rotate_half(x) × sin`, each product and the sum rounded
    /// in float32. Only the mean square's sum runs in another order (lane by lane, then across the
    /// lanes). `threads` of ours share the tokens. The heads are whole pairs of SIMD vectors
    /// ([`supports`]).
    pub fn apply(&self, qkv: &mut [f32], rows: QkvRows, threads: usize) {
        transform_on(Arch::new(), self, qkv, rows, threads);
    }
}

/// [`QkTransform::apply`] on the instruction set `arch`.
fn transform_on(arch: Arch, transform: &QkTransform<'_>, qkv: &mut [f32], rows: QkvRows, threads: usize) {
    let QkvRows { stride, qk_heads, head_dim } = rows;
    let tokens = qkv.len() / stride;
    assert!(supports_on(arch, head_dim), "head_dim {head_dim} is not whole pairs of this CPU's vectors");
    assert!(transform.cos.len() == tokens * head_dim && transform.sin.len() == tokens * head_dim, "a rotation a token");
    if let Some((weight, _)) = transform.norm {
        assert_eq!(weight.len(), qk_heads * head_dim, "a norm weight a head");
    }
    let pieces: Vec<(usize, &mut [f32])> =
        qkv.chunks_mut(TOKENS_A_PIECE * stride).enumerate().map(|(i, rows)| (i * TOKENS_A_PIECE, rows)).collect();
    cpu_threads::share(pieces, threads, |(first, rows)| {
        arch.dispatch(Transform { rows, first, stride, qk_heads, head_dim, transform });
    });
}

struct Transform<'a> {
    rows: &'a mut [f32],
    first: usize,
    stride: usize,
    qk_heads: usize,
    head_dim: usize,
    transform: &'a QkTransform<'a>,
}

impl WithSimd for Transform<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Transform { rows, first, stride, qk_heads, head_dim, transform } = self;
        // Vectors in half a head: the rotation pairs value `c` with `c + head_dim / 2`.
        let half = head_dim / 2 / (size_of::<S::f32s>() / size_of::<f32>());
        for (t, row) in rows.chunks_exact_mut(stride).enumerate() {
            let token = first + t;
            let (cos, _) = S::as_simd_f32s(&transform.cos[token * head_dim..][..head_dim]);
            let (sin, _) = S::as_simd_f32s(&transform.sin[token * head_dim..][..head_dim]);
            for (h, head) in row[..qk_heads * head_dim].chunks_exact_mut(head_dim).enumerate() {
                let (x, _) = S::as_mut_simd_f32s(head);
                if let Some((weight, eps)) = transform.norm {
                    let mut squares = simd.splat_f32s(0.0);
                    for v in x.iter() {
                        squares = simd.add_f32s(squares, simd.mul_f32s(*v, *v));
                    }
                    let mean = simd.reduce_sum_f32s(squares) / head_dim as f32;
                    let factor = simd.splat_f32s(1.0 / (mean + eps).sqrt());
                    let (weight, _) = S::as_simd_f32s(&weight[h * head_dim..][..head_dim]);
                    for (v, w) in x.iter_mut().zip(weight) {
                        *v = simd.mul_f32s(simd.mul_f32s(*v, factor), *w);
                    }
                }
                // `x cos + rotate_half(x) sin`, rotate_half(x) = [-x_high, x_low]: adding the
                // negated product is subtracting it, the same rounding.
                let (low, high) = x.split_at_mut(half);
                for i in 0..half {
                    let (a, b) = (low[i], high[i]);
                    low[i] = simd.sub_f32s(simd.mul_f32s(a, cos[i]), simd.mul_f32s(b, sin[i]));
                    high[i] = simd.add_f32s(simd.mul_f32s(b, cos[half + i]), simd.mul_f32s(a, sin[half + i]));
                }
            }
        }
    }
}

/// Tokens handed to a thread at a time by [`QkTransform::apply`].
const TOKENS_A_PIECE: usize = 64;

#[derive(Clone, Copy)]
struct Layout {
    shape: Shape,
    width: usize,
    panels: usize,
    per_head: usize,
    scale: f32,
}

/// Consecutive query rows of one sequence, from row `first`, and where their output goes.
struct Block<'a> {
    sequence: usize,
    first: usize,
    out: &'a mut [f32],
}

struct BlockKernel<'a> {
    block: Block<'a>,
    q: Heads<'a>,
    v: Heads<'a>,
    keys: &'a [f32],
    layout: Layout,
}

impl WithSimd for BlockKernel<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let BlockKernel { mut block, q, v, keys, layout } = self;
        let Shape { heads, kv_heads, head_dim, .. } = layout.shape;
        assert_eq!(layout.width, 2 * size_of::<S::f32s>() / size_of::<f32>(), "packed for this CPU's vectors");
        let rows = block.out.len() / (heads * head_dim);
        let mut scores = vec![0f32; TILE_ROWS * layout.panels * layout.width];
        for head in 0..heads {
            let kv_head = head / (heads / kv_heads);
            let keys = &keys[(block.sequence * kv_heads + kv_head) * layout.per_head..][..layout.per_head];
            let mut tile = Tile { block: &mut block, q, v, keys, scores: &mut scores, head, kv_head, layout };
            let mut row = 0;
            while row + TILE_ROWS <= rows {
                tile.run::<TILE_ROWS, S>(simd, row);
                row += TILE_ROWS;
            }
            while row + 2 <= rows {
                tile.run::<2, S>(simd, row);
                row += 2;
            }
            if row < rows {
                tile.run::<1, S>(simd, row);
            }
        }
    }
}

/// One query head of a block, its packed keys and a buffer for a tile's scores.
struct Tile<'a, 'b> {
    block: &'a mut Block<'b>,
    q: Heads<'a>,
    v: Heads<'a>,
    keys: &'a [f32],
    scores: &'a mut [f32],
    head: usize,
    kv_head: usize,
    layout: Layout,
}

impl Tile<'_, '_> {
    /// Query rows `row .. row + R` of the block: scores against every key up to the last row's
    /// position (a row's later keys then weigh zero), softmax, values.
    #[inline(always)]
    fn run<const R: usize, S: Simd>(&mut self, simd: S, row: usize) {
        let Layout { shape, width, panels, scale, .. } = self.layout;
        let (head_dim, len) = (shape.head_dim, shape.len);
        let base = self.block.sequence * len;
        let first = self.block.first + row;
        let last = first + R - 1;
        let used = last / width + 1;
        let stride = panels * width;
        let zero = simd.splat_f32s(0.0);

        // Scores: the tile's rows times each panel of keys it may see.
        let queries: [&[f32]; R] = std::array::from_fn(|i| self.q.row(base + first + i, self.head, head_dim));
        let (keys, _) = S::as_simd_f32s(self.keys);
        for (p, panel) in keys.chunks_exact(2 * head_dim).take(used).enumerate() {
            for (i, [low, high]) in rows_times_panel::<R, S>(simd, queries, panel).into_iter().enumerate() {
                let (out, _) = S::as_mut_simd_f32s(&mut self.scores[i * stride + p * width..][..width]);
                out[0] = low;
                out[1] = high;
            }
        }

        // Softmax of each row over the keys it sees (`first + i + 1` of them), the rest zero.
        let mut sums = [0f32; R];
        for (i, sum) in sums.iter_mut().enumerate() {
            let seen = first + i + 1;
            let row = &mut self.scores[i * stride..][..used * width];
            let factor = simd.splat_f32s(scale);
            for x in S::as_mut_simd_f32s(row).0 {
                *x = simd.mul_f32s(*x, factor);
            }
            row[seen..].fill(f32::NEG_INFINITY);
            let mut max = simd.splat_f32s(f32::NEG_INFINITY);
            for x in S::as_simd_f32s(row).0 {
                max = simd.max_f32s(max, *x);
            }
            let max = simd.splat_f32s(simd.reduce_max_f32s(max));
            for x in S::as_mut_simd_f32s(row).0 {
                *x = exp(simd, simd.sub_f32s(*x, max));
            }
            row[seen..].fill(0.0);
            let mut total = zero;
            for x in S::as_simd_f32s(row).0 {
                total = simd.add_f32s(total, *x);
            }
            *sum = simd.reduce_sum_f32s(total);
        }

        // The values weighed by the scores, two vectors of each head at a time, divided by the
        // rows' sums.
        let row_len = shape.heads * head_dim;
        for column in (0..head_dim).step_by(width) {
            let mut low = [zero; R];
            let mut high = [zero; R];
            for j in 0..=last {
                let value = &self.v.row(base + j, self.kv_head, head_dim)[column..][..width];
                let (value, _) = S::as_simd_f32s(value);
                let (v_low, v_high) = (value[0], value[1]);
                for i in 0..R {
                    let p = simd.splat_f32s(self.scores[i * stride + j]);
                    low[i] = simd.mul_add_f32s(p, v_low, low[i]);
                    high[i] = simd.mul_add_f32s(p, v_high, high[i]);
                }
            }
            for i in 0..R {
                let sum = simd.splat_f32s(sums[i]);
                let at = (row + i) * row_len + self.head * head_dim + column;
                let (out, _) = S::as_mut_simd_f32s(&mut self.block.out[at..][..width]);
                out[0] = simd.div_f32s(low[i], sum);
                out[1] = simd.div_f32s(high[i], sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packed_matmul::{arches, to_host as host};
    use tch::{Device, Kind, Tensor};

    /// libtorch's causal attention of the same sequences in float64, `[tokens, heads × head_dim]`.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, shape: Shape, scale: f64) -> Tensor {
        let Shape { sequences, len, heads, kv_heads, head_dim } = shape;
        let (s, l, d) = (sequences as i64, len as i64, head_dim as i64);
        let to_heads = |x: &Tensor, h: usize| x.to_kind(Kind::Double).view([s, l, h as i64, d]).transpose(1, 2);
        let group = (heads / kv_heads) as i64;
        let (q, k, v) = (
            to_heads(q, heads),
            to_heads(k, kv_heads).repeat_interleave_self_int(group, 1, None::<i64>),
            to_heads(v, kv_heads).repeat_interleave_self_int(group, 1, None::<i64>),
        );
        let mask = Tensor::ones([l, l], (Kind::Bool, Device::Cpu)).tril(0);
        let scores = (q.matmul(&k.transpose(2, 3)) * scale).masked_fill(&mask.logical_not(), f64::NEG_INFINITY);
        scores.softmax(-1, Kind::Double).matmul(&v).transpose(1, 2).reshape([s * l, heads as i64 * d])
    }

    fn ours(q: &Tensor, k: &Tensor, v: &Tensor, shape: Shape, scale: f64, threads: usize) -> Tensor {
        ours_on(Arch::new(), q, k, v, shape, scale, threads)
    }

    fn ours_on(arch: Arch, q: &Tensor, k: &Tensor, v: &Tensor, shape: Shape, scale: f64, threads: usize) -> Tensor {
        let (qh, kh, vh) = (host(q), host(k), host(v));
        let d = shape.head_dim;
        let attention = Causal {
            q: Heads::token_major(&qh, shape.heads, d),
            k: Heads::token_major(&kh, shape.kv_heads, d),
            v: Heads::token_major(&vh, shape.kv_heads, d),
            shape,
            scale: scale as f32,
        };
        let out = causal_attention_on(arch, &attention, threads);
        Tensor::from_slice(&out).view([(shape.sequences * shape.len) as i64, (shape.heads * shape.head_dim) as i64])
    }

    fn inputs(shape: Shape) -> (Tensor, Tensor, Tensor) {
        let tokens = (shape.sequences * shape.len) as i64;
        let cpu = (Kind::Float, Device::Cpu);
        let d = shape.head_dim as i64;
        (
            Tensor::randn([tokens, shape.heads as i64, d], cpu),
            Tensor::randn([tokens, shape.kv_heads as i64, d], cpu),
            Tensor::randn([tokens, shape.kv_heads as i64, d], cpu),
        )
    }

    /// Against float64 for lengths around the tile, block and key-panel sizes, one and several
    /// sequences, heads sharing key heads or not, 64 and 128 values a head, on every instruction
    /// set the CPU runs; the same bits on one thread and three.
    #[test]
    fn causal_attention_is_libtorchs_softmax_of_scaled_scores_times_values() {
        tch::manual_seed(11);
        for (sequences, len, heads, kv_heads, head_dim) in [
            (1, 1, 2, 2, 64),
            (1, 5, 4, 4, 64),
            (3, 6, 4, 2, 64),
            (2, 7, 8, 4, 64),
            (2, 24, 4, 1, 64),
            (1, 33, 2, 2, 128),
            (2, 50, 8, 2, 64),
            (1, 300, 4, 2, 64),
        ] {
            let shape = Shape { sequences, len, heads, kv_heads, head_dim };
            let (q, k, v) = inputs(shape);
            let scale = (head_dim as f64).powf(-0.5);
            let expected = reference(&q, &k, &v, shape, scale);
            for arch in arches() {
                let got = ours_on(arch, &q, &k, &v, shape, scale, 1);
                let error = (got.to_kind(Kind::Double) - &expected).abs().max().double_value(&[]);
                assert!(error < 2e-6, "{shape:?} on {arch:?}: off by {error}");
                let shared = ours_on(arch, &q, &k, &v, shape, scale, 3);
                assert!(shared.equal(&got), "{shape:?} on {arch:?}: threads changed the bits");
            }
        }
    }

    /// A query that saw a later key, a sequence that saw another's, or a query head reading the
    /// wrong key head gives other values: moving one such key or value moves nothing here, and
    /// moving one a query does see moves that query's output.
    #[test]
    fn each_query_sees_only_its_own_sequences_keys_up_to_itself_through_its_key_head() {
        tch::manual_seed(12);
        let shape = Shape { sequences: 2, len: 40, heads: 4, kv_heads: 2, head_dim: 64 };
        let (q, k, v) = inputs(shape);
        let scale = 0.125;
        let base = ours(&q, &k, &v, shape, scale, 2);
        // Key and value of token 30 of the first sequence, key head 1 (query heads 2 and 3).
        let moved = |x: &Tensor| {
            let x = x.copy();
            let _ = x.get(30).get(1).fill_(7.0);
            x
        };
        for (k2, v2) in [(moved(&k), v.shallow_clone()), (k.shallow_clone(), moved(&v))] {
            let other = ours(&q, &k2, &v2, shape, scale, 2);
            let changed = (&other - &base).abs().gt(0.0).view([80, 4, 64]).any_dim(2, false);
            for token in 0..80 {
                for head in 0..4 {
                    let sees = (30..40).contains(&token) && head >= 2;
                    assert_eq!(changed.int64_value(&[token, head]) != 0, sees, "token {token}, head {head}");
                }
            }
        }
    }

    /// The per-head norm and rotation against the same formulas in float64 (`x / sqrt(mean(x²) +
    /// eps) × w`, then `x cos + rotate_half(x) sin`), on the query and key heads of rows that
    /// also hold values, which stay as they were; without a norm, the rotation alone.
    #[test]
    fn queries_and_keys_are_normalised_per_head_then_rotated_and_values_left_alone() {
        tch::manual_seed(13);
        let (tokens, heads, kv_heads, d) = (70i64, 4i64, 2i64, 64i64);
        let cpu = (Kind::Float, Device::Cpu);
        let qkv = Tensor::randn([tokens, (heads + 2 * kv_heads) * d], cpu) * 3.0;
        let weight = Tensor::rand([heads + kv_heads, d], cpu) + 0.5;
        let angles = Tensor::rand([tokens, d / 2], cpu) * 6.0;
        let angles = Tensor::cat(&[&angles, &angles], 1);
        let (cos, sin) = (angles.cos(), angles.sin());
        let eps = 1e-6;
        for normalised in [true, false] {
            let mut ours = host(&qkv);
            let (w, c, s) = (host(&weight), host(&cos), host(&sin));
            let transform = QkTransform { norm: normalised.then_some((&w[..], eps as f32)), cos: &c, sin: &s };
            let stride = ((heads + 2 * kv_heads) * d) as usize;
            let rows = QkvRows { stride, qk_heads: (heads + kv_heads) as usize, head_dim: d as usize };
            transform.apply(&mut ours, rows, 2);
            let ours = Tensor::from_slice(&ours).view([tokens, heads + 2 * kv_heads, d]);
            // Every instruction set, against the widest's: the same arithmetic but the sums.
            for arch in arches() {
                let mut other = host(&qkv);
                transform_on(arch, &transform, &mut other, rows, 1);
                let error = (Tensor::from_slice(&other).view_as(&ours) - &ours).abs().max().double_value(&[]);
                assert!(error < 1e-5, "normalised {normalised} on {arch:?}: {error} from the default's");
            }

            let x = qkv.to_kind(Kind::Double).view([tokens, heads + 2 * kv_heads, d]);
            let qk = x.narrow(1, 0, heads + kv_heads);
            let qk = if normalised {
                let rms = (qk.square().mean_dim(-1, true, Kind::Double) + eps).sqrt();
                qk / rms * weight.to_kind(Kind::Double)
            } else {
                qk
            };
            let rotated = Tensor::cat(&[qk.narrow(2, d / 2, d / 2).neg(), qk.narrow(2, 0, d / 2)], 2);
            let expected =
                &qk * cos.to_kind(Kind::Double).unsqueeze(1) + rotated * sin.to_kind(Kind::Double).unsqueeze(1);
            let got = ours.narrow(1, 0, heads + kv_heads).to_kind(Kind::Double);
            let error = (&got - &expected).abs().max().double_value(&[]);
            assert!(error < 1e-5, "normalised {normalised}: off by {error}");
            assert!(
                ours.narrow(1, heads + kv_heads, kv_heads).equal(&qkv.view([tokens, heads + 2 * kv_heads, d]).narrow(
                    1,
                    heads + kv_heads,
                    kv_heads
                ))
            );
        }
    }
}
