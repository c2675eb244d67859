//! Float32 matmuls on the CPU over weights packed once at load: a MoE layer's experts
//! (`models::moe`). libtorch's grouped matmul calls MKL's sgemm once per expert, and sgemm copies
//! the whole weight, cold from memory, into its packed layout on every call; with a few dozen rows
//! an expert that copy is most of the work (~83 GFLOP/s for a layer's experts on two Zen 4 cores,
//! docs/cpu-compute.md). Packed here once, each expert's weight is streamed once per call by a
//! register-tiled kernel: rows × two SIMD vectors of output columns, accumulated over the input
//! with fused multiply-adds, the same products summed in input order. It runs on the calling
//! thread (`models::moe` says why and for which steps).
//!
//! SIMD through `pulp`, which picks AVX-512, AVX2+FMA or plain code at run time behind a safe
//! interface (the workspace forbids `unsafe`).

use pulp::{Arch, Simd, WithSimd};
use tch::{Device, Kind, Tensor};

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
        let [experts, out, input] = weights.size()[..] else { panic!("[experts, out, in] weights") };
        assert!(weights.kind() == Kind::Float && weights.device() == Device::Cpu, "float32 on the CPU");
        let (experts, out, input) = (experts as usize, out as usize, input as usize);
        let arch = Arch::new();
        let width = 2 * arch.dispatch(Lanes);
        let per_expert = out.div_ceil(width) * width * input;
        let dense = Vec::<f32>::try_from(weights.contiguous().view([-1])).expect("float32 weights");
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

    /// `x` `[rows, in]` float32, its rows sorted by expert (`served[e]` rows for expert `e`),
    /// times each expert's weight transposed: `[rows, out]`, on the calling thread.
    pub fn grouped_matmul(&self, x: &Tensor, served: &[i64]) -> Tensor {
        assert_eq!(served.len(), self.experts, "a count per expert");
        let rows: usize = served.iter().map(|&n| n as usize).sum();
        assert_eq!(x.size(), [rows as i64, self.input as i64], "rows sorted by expert");
        let padded = self.out.div_ceil(self.width) * self.width;
        let input = Vec::<f32>::try_from(x.to_kind(Kind::Float).contiguous().view([-1])).expect("float32 rows");
        let mut output = vec![0f32; rows * padded];
        let shape = Shape { input: self.input, padded, width: self.width };
        let per_expert = padded * self.input;
        // Each expert's rows of the input and of the output, in order.
        let (mut rest_in, mut rest_out) = (input.as_slice(), output.as_mut_slice());
        for (weights, &n) in self.panels.chunks_exact(per_expert).zip(served) {
            let n = n as usize;
            let (x, more_in) = rest_in.split_at(n * self.input);
            let (out, more_out) = std::mem::take(&mut rest_out).split_at_mut(n * padded);
            (rest_in, rest_out) = (more_in, more_out);
            if n > 0 {
                self.arch.dispatch(Kernel { piece: Piece { x, out, weights }, shape });
            }
        }
        let out = Tensor::from_slice(&output).view([rows as i64, padded as i64]);
        if padded == self.out { out } else { out.narrow(1, 0, self.out as i64) }
    }
}

/// One expert's rows: its input, where its output goes, its packed weight.
struct Piece<'a> {
    x: &'a [f32],
    out: &'a mut [f32],
    weights: &'a [f32],
}

#[derive(Clone, Copy)]
struct Shape {
    input: usize,
    padded: usize,
    width: usize,
}

/// Float32 lanes of one SIMD vector on this CPU.
struct Lanes;

impl WithSimd for Lanes {
    type Output = usize;
    fn with_simd<S: Simd>(self, _: S) -> usize {
        size_of::<S::f32s>() / size_of::<f32>()
    }
}

struct Kernel<'a> {
    piece: Piece<'a>,
    shape: Shape,
}

impl WithSimd for Kernel<'_> {
    type Output = ();
    #[inline(always)]
    fn with_simd<S: Simd>(self, simd: S) {
        let Kernel { piece, shape } = self;
        assert_eq!(shape.width, 2 * size_of::<S::f32s>() / size_of::<f32>(), "packed for this CPU's vectors");
        let (weights, _) = S::as_simd_f32s(piece.weights);
        let panel_vectors = 2 * shape.input;
        let rows = piece.x.len() / shape.input;
        for (panel, weights) in weights.chunks_exact(panel_vectors).enumerate() {
            let column = panel * shape.width;
            let mut row = 0;
            while row + TILE_ROWS <= rows {
                tile::<TILE_ROWS, S>(simd, piece.x, piece.out, weights, row, column, shape);
                row += TILE_ROWS;
            }
            while row + 2 <= rows {
                tile::<2, S>(simd, piece.x, piece.out, weights, row, column, shape);
                row += 2;
            }
            if row < rows {
                tile::<1, S>(simd, piece.x, piece.out, weights, row, column, shape);
            }
        }
    }
}

/// `R` rows from `row` times one panel: `R × 2` vectors of output.
#[inline(always)]
fn tile<const R: usize, S: Simd>(
    simd: S,
    x: &[f32],
    out: &mut [f32],
    panel: &[S::f32s],
    row: usize,
    column: usize,
    shape: Shape,
) {
    let input = shape.input;
    let panel = &panel[..2 * input];
    let rows: [&[f32]; R] = std::array::from_fn(|i| &x[(row + i) * input..][..input]);
    let mut low = [simd.splat_f32s(0.0); R];
    let mut high = [simd.splat_f32s(0.0); R];
    for k in 0..input {
        let (w_low, w_high) = (panel[2 * k], panel[2 * k + 1]);
        for i in 0..R {
            let a = simd.splat_f32s(rows[i][k]);
            low[i] = simd.mul_add_f32s(a, w_low, low[i]);
            high[i] = simd.mul_add_f32s(a, w_high, high[i]);
        }
    }
    for i in 0..R {
        let (vectors, _) = S::as_mut_simd_f32s(&mut out[(row + i) * shape.padded + column..][..shape.width]);
        vectors[0] = low[i];
        vectors[1] = high[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The grouped matmul as libtorch computes it, one expert at a time, in float64.
    fn reference(x: &Tensor, weights: &Tensor, served: &[i64]) -> Tensor {
        let mut start = 0;
        let mut parts = Vec::new();
        for (e, &n) in served.iter().enumerate() {
            parts.push(
                x.narrow(0, start, n).to_kind(Kind::Double).matmul(&weights.get(e as i64).to_kind(Kind::Double).tr()),
            );
            start += n;
        }
        Tensor::cat(&parts, 0)
    }

    #[test]
    fn packed_experts_multiply_as_the_grouped_matmul_does() {
        tch::manual_seed(3);
        // Outputs that fill panels and ones that leave the last panel part empty (40, 72);
        // experts with no rows, one row, an odd count and more than a tile.
        for (out, input) in [(64, 48), (40, 36), (72, 8)] {
            let weights = Tensor::randn([5, out, input], (Kind::Float, Device::Cpu));
            let packed = PackedExperts::pack(&weights);
            for served in [[0i64, 1, 7, 13, 0], [2, 0, 0, 0, 1], [0, 0, 0, 0, 0]] {
                let rows: i64 = served.iter().sum();
                let x = Tensor::randn([rows, input], (Kind::Float, Device::Cpu));
                let expected = reference(&x, &weights, &served);
                let ours = packed.grouped_matmul(&x, &served);
                assert_eq!(ours.size(), [rows, out]);
                let error = if rows == 0 {
                    0.0
                } else {
                    (ours.to_kind(Kind::Double) - &expected).abs().max().double_value(&[])
                };
                assert!(error < 1e-4, "{out}×{input}, {served:?}: {error}");
            }
        }
    }

    #[test]
    fn a_wrongly_packed_weight_gives_other_products() {
        tch::manual_seed(4);
        let weights = Tensor::randn([2, 40, 16], (Kind::Float, Device::Cpu));
        let x = Tensor::randn([9, 16], (Kind::Float, Device::Cpu));
        let served = [4, 5];
        // The experts swapped: the kernel reads each expert's own panels.
        let swapped = PackedExperts::pack(&Tensor::stack(&[weights.get(1), weights.get(0)], 0));
        let error = (swapped.grouped_matmul(&x, &served).to_kind(Kind::Double) - reference(&x, &weights, &served))
            .abs()
            .max()
            .double_value(&[]);
        assert!(error > 0.1, "{error}");
    }
}
