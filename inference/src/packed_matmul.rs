//! Float32 matmuls on the CPU over weights packed once at load: a MoE layer's experts
//! (`models::moe`). libtorch's grouped matmul calls MKL's sgemm once per expert, and sgemm copies
//! the whole weight, cold from memory, into its packed layout on every call; with a few dozen rows
//! an expert that copy is most of the work (~83 GFLOP/s for a layer's experts on two Zen 4 cores,
//! docs/cpu-compute.md). Packed here once, each expert's weight is streamed once per call by a
//! register-tiled kernel: rows × two SIMD vectors of output columns, accumulated over the input
//! with fused multiply-adds, the same products summed in input order, each row picked from its
//! token (no gather) and a SwiGLU's gate/up finished while in cache ([`Epilogue`]). Its pieces
//! are shared among threads of ours where libgomp lets them run (`cpu_threads`; `models::moe`
//! says for which steps).
//!
//! SIMD through `pulp`, which picks AVX-512, AVX2+FMA or plain code at run time behind a safe
//! interface (the workspace forbids `unsafe`).

use pulp::{Arch, Simd, WithSimd};
use tch::{Device, Kind, Tensor};

use crate::cpu_threads;

/// Rows of one tile: twice that many vector accumulators (12 of AVX-512's 32 or AVX2's 16
/// registers), enough independent chains to keep both FMA pipes busy.
const TILE_ROWS: usize = 6;

/// The projections of every expert of a layer, `[experts, out, in]` float32, packed: for each
/// expert, panels of `width` output columns (the last padded with zeros), each panel input-major
/// (`[in, width]`), so a tile reads the weight in order.
pub struct PackedExperts {
    /// The SIMD level the panels were packed for (their width is two of its vectors).
    arch: Arch,
    panels: Vec<f32>,
    experts: usize,
    out: usize,
    input: usize,
    width: usize,
}

impl PackedExperts {
    /// `weights` `[experts, out, in]` float32 on the CPU.
    pub fn pack(weights: &Tensor) -> Self {
        Self::pack_on(Arch::new(), weights)
    }

    /// [`Self::pack`] for the instruction set `arch` (the tests run every one the CPU has).
    fn pack_on(arch: Arch, weights: &Tensor) -> Self {
        let [experts, out, input] = weights.size()[..] else { panic!("[experts, out, in] weights") };
        assert!(weights.kind() == Kind::Float && weights.device() == Device::Cpu, "float32 on the CPU");
        let (experts, out, input) = (experts as usize, out as usize, input as usize);
        let width = 2 * arch.dispatch(Lanes);
        let per_expert = out.div_ceil(width) * width * input;
        let dense = to_host(weights);
        let mut panels = vec![0f32; experts * per_expert];
        for (expert, packed) in dense.chunks_exact(out * input).zip(panels.chunks_exact_mut(per_expert)) {
            for (row, weights) in expert.chunks_exact(input).enumerate() {
                let (panel, column) = (row / width, row % width);
                let panel = &mut packed[panel * input * width..][..input * width];
                for (i, &w) in weights.iter().enumerate() {
                    panel[i * width + column] = w;
                }
            }
        }
        Self { arch, panels, experts, out, input, width }
    }

    pub fn experts(&self) -> usize {
        self.experts
    }

    /// Output columns as [`Self::grouped_matmul`] lays them out: `out` rounded up to whole
    /// panels (the columns past `out` are zero).
    pub fn padded(&self) -> usize {
        self.out.div_ceil(self.width) * self.width
    }

    /// The rows `rows` of `x` (row-major, each `x_stride` apart, their first `in` columns
    /// read), sorted by expert (`served[e]` of them for expert `e`), each times its expert's
    /// weight transposed: row-major `[rows.len(), padded]`, each row then finished by
    /// `epilogue`. Pieces of at most [`PIECE_ROWS`] rows of one expert are shared among
    /// `threads` ([`cpu_threads::share`]); each output row is the same whichever thread
    /// computes it.
    pub fn grouped_matmul(
        &self,
        x: &[f32],
        x_stride: usize,
        rows: &[usize],
        served: &[usize],
        threads: usize,
        epilogue: Epilogue,
    ) -> Vec<f32> {
        assert_eq!(served.len(), self.experts, "a count per expert");
        assert_eq!(served.iter().sum::<usize>(), rows.len(), "rows sorted by expert");
        assert!(x_stride >= self.input && rows.iter().all(|&r| r * x_stride + self.input <= x.len()), "rows of x");
        if let Epilogue::SwiGlu { intermediate } = epilogue {
            assert_eq!(2 * intermediate, self.out, "gate and up, side by side");
        }
        let padded = self.padded();
        let mut output = vec![0f32; rows.len() * padded];
        let shape = Shape { input: self.input, x_stride, padded, width: self.width };
        let per_expert = padded * self.input;
        let mut pieces = Vec::new();
        let (mut rest_rows, mut rest_out) = (rows, output.as_mut_slice());
        for (weights, &n) in self.panels.chunks_exact(per_expert).zip(served) {
            let (rows, more_rows) = rest_rows.split_at(n);
            let (out, more_out) = std::mem::take(&mut rest_out).split_at_mut(n * padded);
            (rest_rows, rest_out) = (more_rows, more_out);
            for (rows, out) in rows.chunks(PIECE_ROWS).zip(out.chunks_mut(PIECE_ROWS * padded)) {
                pieces.push(Piece { x, rows, out, weights });
            }
        }
        cpu_threads::share(pieces, threads, |piece| self.arch.dispatch(Kernel { piece, shape, epilogue }));
        output
    }
}

/// `x`'s values in float32, row-major, on the host: the one copy out of libtorch that the CPU
/// work of ours (this kernel's packing, a MoE's packed path, `cpu_attention`) reads.
pub(crate) fn to_host(x: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(x.to_kind(Kind::Float).contiguous().view([-1])).expect("a tensor on the CPU")
}

/// What becomes of each output row once multiplied, while it is still in cache.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Epilogue {
    /// Left as multiplied.
    None,
    /// A SwiGLU's gate and up side by side (`[gate | up]`, `intermediate` each): the first
    /// `intermediate` columns become `SiLU(gate) × up`, SiLU as libtorch writes it (`g / (1 +
    /// exp(-g))`, rounded, then times `up`), `exp` to within ~2 units in the last place (see
    /// [`exp`]).
    SwiGlu { intermediate: usize },
}

/// Rows of one expert handed to a thread at a time: four tiles, whose inputs (48 KB at 512
/// columns) stay in cache while the expert's panels stream past. Measured alone on two Zen 3
/// cores (32 experts of 512 × 512, 256 rows each): 12–48 rows ~170 GFLOP/s, 96 ~145, 256 ~123.
const PIECE_ROWS: usize = 4 * TILE_ROWS;

/// Some rows of one expert: the input they are picked from, which rows, where their output
/// goes, the expert's packed weight.
struct Piece<'a> {
    x: &'a [f32],
    rows: &'a [usize],
    out: &'a mut [f32],
    weights: &'a [f32],
}

#[derive(Clone, Copy)]
struct Shape {
    input: usize,
    x_stride: usize,
    padded: usize,
    width: usize,
}

/// Float32 lanes of one SIMD vector on this CPU.
pub(crate) struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;
    fn with_simd<S: Simd>(self, _: S) -> usize {
        size_of::<S::f32s>() / size_of::<f32>()
    }
}

struct Kernel<'a> {
    piece: Piece<'a>,
    shape: Shape,
    epilogue: Epilogue,
}

impl WithSimd for Kernel<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Kernel { mut piece, shape, epilogue } = self;
        assert_eq!(shape.width, 2 * size_of::<S::f32s>() / size_of::<f32>(), "packed for this CPU's vectors");
        let (weights, _) = S::as_simd_f32s(piece.weights);
        let panel_vectors = 2 * shape.input;
        let rows = piece.rows.len();
        for (panel, weights) in weights.chunks_exact(panel_vectors).enumerate() {
            let column = panel * shape.width;
            let mut row = 0;
            while row + TILE_ROWS <= rows {
                tile::<TILE_ROWS, S>(simd, &mut piece, weights, row, column, shape);
                row += TILE_ROWS;
            }
            while row + 2 <= rows {
                tile::<2, S>(simd, &mut piece, weights, row, column, shape);
                row += 2;
            }
            if row < rows {
                tile::<1, S>(simd, &mut piece, weights, row, column, shape);
            }
        }
        if let Epilogue::SwiGlu { intermediate } = epilogue {
            for row in piece.out.chunks_exact_mut(shape.padded) {
                let (gate, up) = row.split_at_mut(intermediate);
                swiglu(simd, gate, &up[..intermediate]);
            }
        }
    }
}

/// `gate[j] = SiLU(gate[j]) × up[j]`.
#[inline(always)]
fn swiglu<S: Simd>(simd: S, gate: &mut [f32], up: &[f32]) {
    let (gate_vectors, gate_tail) = S::as_mut_simd_f32s(gate);
    let (up_vectors, up_tail) = S::as_simd_f32s(up);
    for (g, &u) in gate_vectors.iter_mut().zip(up_vectors) {
        *g = silu_times(simd, *g, u);
    }
    if !gate_tail.is_empty() {
        let g = silu_times(simd, simd.partial_load_f32s(gate_tail), simd.partial_load_f32s(up_tail));
        simd.partial_store_f32s(gate_tail, g);
    }
}

/// `g / (1 + exp(-g))`, rounded, times `u`.
#[inline(always)]
fn silu_times<S: Simd>(simd: S, g: S::f32s, u: S::f32s) -> S::f32s {
    let one = simd.splat_f32s(1.0);
    let silu = simd.div_f32s(g, simd.add_f32s(one, exp(simd, simd.sub_f32s(simd.splat_f32s(0.0), g))));
    simd.mul_f32s(silu, u)
}

/// `e^y` in float32, within ~2 units in the last place of the rounded value for `y` in [-87,
/// 88] (clamped there: below, a sum with 1 no longer sees it; above, float32 soon overflows,
/// and SiLU's `g / (1 + e^-g)` for a gate below -88 is under 1e-36 either way): `y =
/// n ln 2 + r` with `n` an integer and |r| ≤ ln 2 / 2, `e^r` by its Taylor series to r⁷ (the
/// next term is below 6e-9 of it), times `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp<S: Simd>(simd: S, y: S::f32s) -> S::f32s {
    // 1.5 × 2^23: added to a float below 2^22 in magnitude, it rounds that float to an integer
    // `n` and leaves `0x4B40_0000 + n` in the sum's bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HIGH: f32 = 0.693_145_75;
    const LN2_LOW: f32 = 1.428_606_8e-6;
    let y = simd.min_f32s(simd.max_f32s(y, simd.splat_f32s(-87.0)), simd.splat_f32s(88.0));
    let shifted = simd.mul_add_f32s(y, simd.splat_f32s(std::f32::consts::LOG2_E), simd.splat_f32s(ROUND));
    let n = simd.sub_f32s(shifted, simd.splat_f32s(ROUND));
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_HIGH), y);
    let r = simd.mul_add_f32s(n, simd.splat_f32s(-LN2_LOW), r);
    let mut p = simd.splat_f32s(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = simd.mul_add_f32s(p, r, simd.splat_f32s(c));
    }
    // `n + 127` (in 1..=254 after the clamp) shifted into the exponent; the sum's higher bits
    // shift out.
    let biased = simd.add_u32s(simd.transmute_u32s_f32s(shifted), simd.splat_u32s(127));
    let two_to_n = simd.transmute_f32s_u32s(simd.wrapping_dyn_shl_u32s(biased, simd.splat_u32s(23)));
    simd.mul_f32s(p, two_to_n)
}

/// `R` rows from `row` times one panel: `R × 2` vectors of output.
#[inline(always)]
fn tile<const R: usize, S: Simd>(
    simd: S,
    piece: &mut Piece<'_>,
    panel: &[S::f32s],
    row: usize,
    column: usize,
    shape: Shape,
) {
    let input = shape.input;
    let rows: [&[f32]; R] = std::array::from_fn(|i| &piece.x[piece.rows[row + i] * shape.x_stride..][..input]);
    let products = rows_times_panel::<R, S>(simd, rows, &panel[..2 * input]);
    for (i, [low, high]) in products.into_iter().enumerate() {
        let (vectors, _) = S::as_mut_simd_f32s(&mut piece.out[(row + i) * shape.padded + column..][..shape.width]);
        vectors[0] = low;
        vectors[1] = high;
    }
}

/// `R` rows times one panel of two vectors of columns, input-major (input `k`'s two vectors at
/// `panel[2k]` and `panel[2k + 1]`): each row's products summed in input order with fused
/// multiply-adds, in `R × 2` vector accumulators (the register tile of this kernel and of
/// `cpu_attention`'s scores).
#[inline(always)]
pub(crate) fn rows_times_panel<const R: usize, S: Simd>(
    simd: S,
    rows: [&[f32]; R],
    panel: &[S::f32s],
) -> [[S::f32s; 2]; R] {
    let mut low = [simd.splat_f32s(0.0); R];
    let mut high = [simd.splat_f32s(0.0); R];
    for k in 0..panel.len() / 2 {
        let (w_low, w_high) = (panel[2 * k], panel[2 * k + 1]);
        for i in 0..R {
            let a = simd.splat_f32s(rows[i][k]);
            low[i] = simd.mul_add_f32s(a, w_low, low[i]);
            high[i] = simd.mul_add_f32s(a, w_high, high[i]);
        }
    }
    std::array::from_fn(|i| [low[i], high[i]])
}

/// Every instruction set this CPU runs (AVX-512, AVX2+FMA, plain code): each has its own vector
/// width, so its own tiles and panels, and the kernels' tests run them all.
#[cfg(test)]
pub(crate) fn arches() -> Vec<Arch> {
    let mut arches = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        use pulp::x86::{V3, V4};
        arches.extend(V4::try_new().map(Arch::V4));
        arches.extend(V3::try_new().map(Arch::V3));
    }
    arches.push(Arch::Scalar);
    arches
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows `rows` of `x`, `served[e]` of them times expert `e`'s weight transposed, as
    /// libtorch computes it one expert at a time, in float64.
    fn reference(x: &Tensor, rows: &[usize], weights: &Tensor, served: &[usize]) -> Tensor {
        let picked = x.index_select(0, &Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()));
        let mut start = 0;
        let mut parts = Vec::new();
        for (e, &n) in served.iter().enumerate() {
            let part = picked.narrow(0, start, n as i64).to_kind(Kind::Double);
            parts.push(part.matmul(&weights.get(e as i64).to_kind(Kind::Double).tr()));
            start += n as i64;
        }
        Tensor::cat(&parts, 0)
    }

    /// Ours, narrowed to the real output columns, as a tensor; `x`'s rows read from a wider
    /// buffer (5 columns more each) to check the stride.
    fn ours(packed: &PackedExperts, x: &Tensor, rows: &[usize], served: &[usize], threads: usize) -> Tensor {
        let wider =
            Tensor::cat(&[x.shallow_clone(), Tensor::full([x.size()[0], 5], f64::NAN, (Kind::Float, Device::Cpu))], 1);
        let host = Vec::<f32>::try_from(wider.contiguous().view([-1])).expect("float32");
        let out = packed.grouped_matmul(&host, packed.input + 5, rows, served, threads, Epilogue::None);
        let padded = packed.padded() as i64;
        Tensor::from_slice(&out).view([rows.len() as i64, padded]).narrow(1, 0, packed.out as i64)
    }

    #[test]
    fn packed_experts_multiply_the_picked_rows_as_the_grouped_matmul_does() {
        tch::manual_seed(3);
        // Outputs that fill panels and ones that leave the last panel part empty (40, 72);
        // experts with no rows, one row, an odd count, more than a tile and more than a piece
        // (PIECE_ROWS) of rows.
        for ((out, input), arch) in
            [(64, 48), (40, 36), (72, 8)].into_iter().flat_map(|s| arches().into_iter().map(move |a| (s, a)))
        {
            let weights = Tensor::randn([5, out, input], (Kind::Float, Device::Cpu));
            let packed = PackedExperts::pack_on(arch, &weights);
            assert_eq!(packed.padded() % packed.width, 0);
            for served in [[0usize, 1, 7, 13, 0], [2, 0, 0, 31, 1], [0, 0, 0, 0, 0]] {
                let rows: usize = served.iter().sum();
                // Picked out of order, some twice, from more rows than are picked.
                let x = Tensor::randn([rows as i64 + 3, input], (Kind::Float, Device::Cpu));
                let picks: Vec<usize> = (0..rows).map(|i| (i * 7 + 2) % (rows + 3)).collect();
                let expected = reference(&x, &picks, &weights, &served);
                let alone = ours(&packed, &x, &picks, &served, 1);
                assert_eq!(alone.size(), [rows as i64, out]);
                let error = if rows == 0 {
                    0.0
                } else {
                    (alone.to_kind(Kind::Double) - &expected).abs().max().double_value(&[])
                };
                assert!(error < 1e-4, "{out}×{input}, {served:?}: {error}");
                // Shared among threads: the same bits, whoever computed which piece.
                for threads in [2, 3] {
                    assert!(ours(&packed, &x, &picks, &served, threads).equal(&alone), "{threads} threads");
                }
            }
        }
    }

    #[test]
    fn a_wrongly_packed_weight_or_picked_row_gives_other_products() {
        tch::manual_seed(4);
        let weights = Tensor::randn([2, 40, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([9, 16], (Kind::Float, Device::Cpu));
        let (picks, served): (Vec<usize>, _) = ((0..9).collect(), [4, 5]);
        let error = |ours: Tensor| (ours.to_kind(Kind::Double) - reference(&x, &picks, &weights, &served)).abs().max();
        // The experts swapped: the kernel reads each expert's own panels.
        let swapped = PackedExperts::pack(&Tensor::stack(&[weights.get(1), weights.get(0)], 0));
        assert!(error(ours(&swapped, &x, &picks, &served, 1)).double_value(&[]) > 0.1);
        // Another row picked: the kernel reads the rows it is given.
        let packed = PackedExperts::pack(&weights);
        let mut other = picks.clone();
        other[6] = 0;
        assert!(error(ours(&packed, &x, &other, &served, 2)).double_value(&[]) > 0.1);
        assert!(error(ours(&packed, &x, &picks, &served, 2)).double_value(&[]) < 1e-4);
    }

    /// `e^y` in float64, rounded to float32.
    fn rounded_exp(y: f32) -> f32 {
        (y as f64).exp() as f32
    }

    struct Exp<'a>(&'a mut [f32]);

    impl WithSimd for Exp<'_> {
        type Output = ();
        fn with_simd<S: Simd>(self, simd: S) {
            let (vectors, tail) = S::as_mut_simd_f32s(self.0);
            for v in vectors {
                *v = exp(simd, *v);
            }
            let rest = exp(simd, simd.partial_load_f32s(tail));
            simd.partial_store_f32s(tail, rest);
        }
    }

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_units_in_the_last_place() {
        // Every step of 1/1024 over the range, and the clamps beyond it.
        let ys: Vec<f32> = (-87 * 1024..=88 * 1024).map(|i| i as f32 / 1024.0).collect();
        let mut ours = ys.clone();
        Arch::new().dispatch(Exp(&mut ours));
        let worst = ys.iter().zip(&ours).map(|(&y, &e)| ulps(e, rounded_exp(y))).max().expect("values");
        assert!(worst <= 2, "{worst} ulps");
        let mut clamped = vec![-200.0, -87.0, 88.0, 200.0, 0.0];
        Arch::new().dispatch(Exp(&mut clamped));
        assert_eq!(clamped[0], clamped[1]);
        assert_eq!(clamped[2], clamped[3]);
        assert_eq!(clamped[4], 1.0);
        assert!(clamped[3].is_finite() && clamped[3] > 1e38);
    }

    #[test]
    fn the_swiglu_epilogue_is_libtorchs_silu_times_up() {
        tch::manual_seed(5);
        // 20 columns of gate: two AVX2 vectors and a partial one (one and a partial on AVX-512);
        // gates from -100 to 100.
        let (experts, intermediate, input) = (3i64, 20i64, 24i64);
        let weights = Tensor::randn([experts, 2 * intermediate, input], (Kind::Float, Device::Cpu));
        let packed = PackedExperts::pack(&weights);
        let served = [5usize, 0, 9];
        let x = Tensor::randn([14, input], (Kind::Float, Device::Cpu)) * 4.0;
        let picks: Vec<usize> = (0..14).collect();
        let host = Vec::<f32>::try_from(x.contiguous().view([-1])).expect("float32");
        let epilogue = Epilogue::SwiGlu { intermediate: intermediate as usize };
        let out = packed.grouped_matmul(&host, input as usize, &picks, &served, 1, epilogue);
        let plain = packed.grouped_matmul(&host, input as usize, &picks, &served, 1, Epilogue::None);
        let padded = packed.padded() as i64;
        let plain = Tensor::from_slice(&plain).view([14, padded]);
        let (gate, up) = (plain.narrow(1, 0, intermediate), plain.narrow(1, intermediate, intermediate));
        assert!(f64::try_from(gate.abs().max()).expect("max") > 30.0, "gates far from zero");
        let expected = gate.silu() * &up;
        let ours = Tensor::from_slice(&out).view([14, padded]).narrow(1, 0, intermediate);
        // Within a millionth; below a gate of -88, where exp is clamped, SiLU is under 1e-36 in
        // magnitude on both sides.
        let excess = ((&ours - &expected).abs() - expected.abs() * 1e-6).max().double_value(&[]);
        assert!(excess <= 1e-30, "{excess}");
        // The up half is left as multiplied.
        assert!(Tensor::from_slice(&out).view([14, padded]).narrow(1, intermediate, intermediate).equal(&up));
    }
}
