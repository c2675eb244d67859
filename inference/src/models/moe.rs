//! What the mixture-of-experts architectures share once their routers have chosen: each token's
//! `top_k` experts run and their outputs are summed with the router's weights. Routers differ
//! (Qwen3-MoE's softmax, MiniMax-M2's sigmoid with a correction bias) and live with their
//! architectures.
//!
//! The experts of a layer are stacked (`[experts, out, in]`) and routed on the device: the
//! (token, slot) assignments sorted by expert, the tokens gathered in that order, and each
//! projection one grouped matmul (libtorch's `_grouped_mm`, whose group boundaries are a device
//! tensor) — no copy to the host, so nothing waits for the GPU between layers. On CUDA (sm90 and
//! later) bfloat16 groups run as one CUTLASS grouped GEMM; elsewhere libtorch loops over the
//! groups in C++ with the same matmul as one expert at a time (MKL's, in float32 on the CPU,
//! where the host loop's few rows per expert go to oneDNN: see `layers::linear`). Float32
//! experts on the CPU are also packed at load for `packed_matmul`'s kernel, which multiplies
//! every step on libtorch's thread count where libgomp's idle workers sleep soon (what our
//! programs set up when they compute on the CPU: `cpu_threads`), else decode-sized steps alone,
//! routed, activated and mixed on the host ([`mix_packed`]). Shapes the grouped matmul refuses
//! (rows not a multiple of 16 bytes) keep one [`Mlp`] per expert, routed through the host
//! ([`mix_experts`]).

use tch::{Device, Kind, Tensor};

use crate::checkpoint::Loader;
use crate::cpu_threads;
use crate::error::LoadError;
use crate::layers::{Mlp, MlpNames, Weight, clamp_swiglu, widen_blocks, widen_mxfp4};
use crate::packed_matmul::{Epilogue, PackedExperts, to_host};

/// A layer's experts.
pub enum Experts {
    /// Stacked, routed on the device.
    Stacked {
        /// Gate and up, `[experts, 2 × intermediate, hidden]`: one part, or two (gate, up) for FP8
        /// blocks that do not line up at the seam.
        gate_up: Vec<Stacked>,
        /// `[experts, hidden, intermediate]`.
        down: Stacked,
        intermediate: i64,
        count: i64,
        /// Float32 on the CPU: gate/up and down packed once for [`PackedExperts`]' kernel,
        /// which multiplies decode-sized steps instead of the grouped matmul (see
        /// [`PACKED_MAX_ROWS_PER_EXPERT`]; a second copy of the experts' weights, in host memory).
        packed: Option<Box<[PackedExperts; 2]>>,
        /// DeepSeek-V4's `swiglu_limit` (see [`Mlp::with_swiglu_limit`]).
        limit: Option<f64>,
    },
    /// One MLP per expert, routed through the host.
    Each(Vec<Mlp>),
}

/// One projection of every expert of a layer, as the checkpoint stores it (see [`Weight`]).
pub enum Stacked {
    Dense(Tensor),
    /// FP8 `[experts, out, in]` with a float32 factor per block, `[experts, out/b0, in/b1]`.
    Fp8Block {
        weight: Tensor,
        scale_inv: Tensor,
        block: [i64; 2],
        kind: Kind,
    },
    /// MXFP4 codes `[experts, out, in/2]` and UE8M0 exponents `[experts, out, in/32]` (see
    /// [`Weight::Mxfp4`]).
    Mxfp4 {
        codes: Tensor,
        exponents: Tensor,
        kind: Kind,
    },
}

impl Stacked {
    /// Every expert's weights of one projection stacked; `None` if kinds of weight mix or
    /// their blocks differ.
    fn stack(weights: &[Weight]) -> Option<Self> {
        match weights.first()? {
            Weight::Dense(_) => {
                let dense: Option<Vec<&Tensor>> =
                    weights.iter().map(|w| if let Weight::Dense(t) = w { Some(t) } else { None }).collect();
                Some(Self::Dense(Tensor::stack(&dense?, 0)))
            }
            Weight::Fp8Block { block, kind, .. } => {
                let (mut fp8, mut scales) = (Vec::new(), Vec::new());
                for w in weights {
                    match w {
                        Weight::Fp8Block { weight, scale_inv, block: b, kind: k } if b == block && k == kind => {
                            fp8.push(weight.view_dtype(Kind::Uint8));
                            scales.push(scale_inv.shallow_clone());
                        }
                        _ => return None,
                    }
                }
                let weight = Tensor::stack(&fp8, 0).view_dtype(Kind::Float8e4m3fn);
                Some(Self::Fp8Block { weight, scale_inv: Tensor::stack(&scales, 0), block: *block, kind: *kind })
            }
            Weight::Mxfp4 { kind, .. } => {
                let (mut codes, mut exponents) = (Vec::new(), Vec::new());
                for w in weights {
                    match w {
                        Weight::Mxfp4 { codes: c, exponents: e, kind: k } if k == kind => {
                            codes.push(c.shallow_clone());
                            exponents.push(e.shallow_clone());
                        }
                        _ => return None,
                    }
                }
                Some(Self::Mxfp4 {
                    codes: Tensor::stack(&codes, 0),
                    exponents: Tensor::stack(&exponents, 0),
                    kind: *kind,
                })
            }
        }
    }

    /// Two projections of every expert as one, concatenated along their output rows: dense and
    /// MXFP4 ones (factored by rows) always, FP8 ones when the first's rows end on a block
    /// boundary.
    fn fuse(first: Self, second: Self) -> Vec<Self> {
        match (first, second) {
            (Self::Dense(a), Self::Dense(b)) => vec![Self::Dense(Tensor::cat(&[a, b], 1))],
            (
                Self::Fp8Block { weight: a, scale_inv: sa, block, kind },
                Self::Fp8Block { weight: b, scale_inv: sb, .. },
            ) if a.size()[1] % block[0] == 0 => {
                let weight = Tensor::cat(&[a.view_dtype(Kind::Uint8), b.view_dtype(Kind::Uint8)], 1)
                    .view_dtype(Kind::Float8e4m3fn);
                vec![Self::Fp8Block { weight, scale_inv: Tensor::cat(&[sa, sb], 1), block, kind }]
            }
            (Self::Mxfp4 { codes: a, exponents: ea, kind }, Self::Mxfp4 { codes: b, exponents: eb, .. }) => {
                vec![Self::Mxfp4 { codes: Tensor::cat(&[a, b], 1), exponents: Tensor::cat(&[ea, eb], 1), kind }]
            }
            (a, b) => vec![a, b],
        }
    }

    /// The weights of the experts `ids` (all, if `None`) in the model dtype, `[ids, out, in]`;
    /// FP8 blocks times their factors in float32, rounded once, as [`Weight::widened`] does,
    /// `chunk_elements` weights at a time (whole experts, at least one) into the result: a
    /// whole layer's float32 copy would take four times its FP8 bytes at once (MiniMax-M2.7:
    /// ~15 GB for one layer's experts, where their bfloat16 result takes 7).
    fn widened(&self, ids: Option<&Tensor>, chunk_elements: i64) -> Tensor {
        let pick = |t: &Tensor| match ids {
            Some(ids) => t.index_select(0, ids),
            None => t.shallow_clone(),
        };
        match self {
            Self::Dense(w) => pick(w),
            Self::Fp8Block { weight, scale_inv, block, kind } => {
                let weight = pick(&weight.view_dtype(Kind::Uint8)).view_dtype(Kind::Float8e4m3fn);
                let scale_inv = pick(scale_inv);
                let shape = [weight.size()[0], weight.size()[1], weight.size()[2]];
                widen_in_chunks(shape, *kind, weight.device(), chunk_elements, |start, n| {
                    widen_blocks(&weight.narrow(0, start, n), &scale_inv.narrow(0, start, n), *block, Kind::Float)
                })
            }
            Self::Mxfp4 { codes, exponents, kind } => {
                let (codes, exponents) = (pick(codes), pick(exponents));
                let shape = [codes.size()[0], codes.size()[1], 2 * codes.size()[2]];
                widen_in_chunks(shape, *kind, codes.device(), chunk_elements, |start, n| {
                    widen_mxfp4(&codes.narrow(0, start, n), &exponents.narrow(0, start, n), Kind::Float)
                })
            }
        }
    }

    fn is_quantised(&self) -> bool {
        !matches!(self, Self::Dense(_))
    }
}

/// `[experts, rows, columns]` in `kind`, whole experts `widen(start, n)`-ed at a time (in
/// float32, at most `chunk_elements` weights, at least one expert), each chunk rounded to `kind`
/// as it is copied into the result.
fn widen_in_chunks(
    [experts, rows, columns]: [i64; 3],
    kind: Kind,
    device: Device,
    chunk_elements: i64,
    widen: impl Fn(i64, i64) -> Tensor,
) -> Tensor {
    let out = Tensor::empty([experts, rows, columns], (kind, device));
    let step = (chunk_elements / (rows * columns).max(1)).max(1);
    for start in (0..experts).step_by(step as usize) {
        let n = step.min(experts - start);
        out.narrow(0, start, n).copy_(&widen(start, n));
    }
    out
}

impl Experts {
    /// `count` experts under `w` (`w.0`, `w.1`, …), each a SwiGLU of `intermediate` with
    /// projections named `names`.
    pub fn load(w: &Loader, count: i64, hidden: i64, intermediate: i64, names: MlpNames) -> Result<Self, LoadError> {
        let [gate_name, up_name, down_name] = names;
        let (mut gates, mut ups, mut downs) = (Vec::new(), Vec::new(), Vec::new());
        for e in 0..count {
            let expert = w.at(e);
            gates.push(Weight::load(&expert.at(gate_name), intermediate, hidden)?);
            ups.push(Weight::load(&expert.at(up_name), intermediate, hidden)?);
            downs.push(Weight::load(&expert.at(down_name), hidden, intermediate)?);
        }
        Ok(Self::from_weights(gates, ups, downs, w.kind()))
    }

    /// Experts of these projections (one of each per expert) in a model of dtype `kind`.
    pub fn from_weights(gates: Vec<Weight>, ups: Vec<Weight>, downs: Vec<Weight>, kind: Kind) -> Self {
        let (count, [intermediate, hidden]) = match gates.first() {
            Some(gate) => (gates.len() as i64, gate.shape()),
            None => return Self::Each(Vec::new()),
        };
        // The grouped matmul reads rows in steps of 16 bytes.
        let row_bytes = |n: i64| n * kind.elt_size_in_bytes() as i64 % 16 == 0;
        let stacked = if row_bytes(hidden) && row_bytes(intermediate) {
            match (Stacked::stack(&gates), Stacked::stack(&ups), Stacked::stack(&downs)) {
                (Some(gate), Some(up), Some(down)) => Some((Stacked::fuse(gate, up), down)),
                _ => None,
            }
        } else {
            None
        };
        match stacked {
            Some((gate_up, down)) => {
                let packed = match (gate_up.as_slice(), &down) {
                    ([Stacked::Dense(g)], Stacked::Dense(d))
                        if g.kind() == Kind::Float && g.device() == Device::Cpu && d.device() == Device::Cpu =>
                    {
                        Some(Box::new([PackedExperts::pack(g), PackedExperts::pack(d)]))
                    }
                    _ => None,
                };
                Self::Stacked { gate_up, down, intermediate, count, packed, limit: None }
            }
            None => {
                let mlps = gates.into_iter().zip(ups).zip(downs).map(|((g, u), d)| Mlp::from_weights(g, u, d));
                Self::Each(mlps.collect())
            }
        }
    }

    /// The same experts with their gates clamped to at most `limit` and their up projections to
    /// `[-limit, limit]` (DeepSeek-V4's `swiglu_limit`). The packed kernel's SwiGLU does not
    /// clamp, so stacked experts leave it for the grouped matmul.
    pub fn with_swiglu_limit(self, limit: f64) -> Self {
        match self {
            Self::Stacked { gate_up, down, intermediate, count, .. } => {
                Self::Stacked { gate_up, down, intermediate, count, packed: None, limit: Some(limit) }
            }
            Self::Each(mlps) => Self::Each(mlps.into_iter().map(|m| m.with_swiglu_limit(limit)).collect()),
        }
    }

    /// Whether any projection stays FP8 on the device.
    pub fn is_quantised(&self) -> bool {
        match self {
            Self::Stacked { gate_up, down, .. } => down.is_quantised() || gate_up.iter().any(Stacked::is_quantised),
            Self::Each(mlps) => mlps.iter().any(Mlp::is_quantised),
        }
    }

    /// `Σ_k weights[t, k] · experts[chosen[t, k]](x[t])` for every token `t` of `x` (`[tokens,
    /// hidden]`); `chosen` int64 and `weights` are `[tokens, top_k]`. Rounded as vLLM's fused
    /// MoE rounds: each expert's output scaled in the wider of its dtype and the weights'
    /// (float32 weights: in float32) and rounded to `x`'s dtype (its kernel's output cache), the
    /// `top_k` of a token summed in float32 and rounded once (its `moe_sum`).
    pub fn mix(&self, x: &Tensor, chosen: &Tensor, weights: &Tensor) -> Tensor {
        let (gate_up, down, intermediate, count, packed, limit) = match self {
            Self::Each(mlps) => return mix_experts(x, mlps, chosen, weights),
            Self::Stacked { gate_up, down, intermediate, count, packed, limit } => {
                (gate_up, down, *intermediate, *count, packed.as_deref(), *limit)
            }
        };
        if let Some(packed) = packed
            && x.kind() == Kind::Float
            && x.device() == Device::Cpu
        {
            let assignments = chosen.numel();
            let threads = cpu_threads::threads_for(assignments);
            if threads > 1 || assignments as i64 <= PACKED_MAX_ROWS_PER_EXPERT * count {
                return mix_packed(packed, intermediate, x, chosen, weights, threads);
            }
        }
        let top_k = chosen.size()[1];
        let flat = chosen.flatten(0, -1);
        // Assignments in expert order (stable: within an expert, in token order, the order the
        // host loop adds them in), the token each one reads, and how many each expert serves.
        let order = flat.argsort_stable(true, 0, false);
        let tokens = order.divide_scalar_mode(top_k, "floor");
        let served = Tensor::zeros([count], (Kind::Int64, x.device())).scatter_add(0, &flat, &flat.ones_like());
        let xs = x.index_select(0, &tokens);
        let expert_out = grouped_experts(gate_up, down, intermediate, count, limit, &xs, served);
        let slot_weights = weights.flatten(0, -1).index_select(0, &order).unsqueeze(-1);
        let scaled = (expert_out * slot_weights).to_kind(x.kind());
        let out = Tensor::zeros(x.size(), (Kind::Float, x.device()));
        out.index_add(0, &tokens, &scaled.to_kind(Kind::Float)).to_kind(x.kind())
    }
}

/// Each expert's SwiGLU over its rows of `xs` (sorted by expert, `served[e]` rows for expert
/// `e`) as libtorch's grouped matmuls, clamped by `limit` where given.
fn grouped_experts(
    gate_up: &[Stacked],
    down: &Stacked,
    intermediate: i64,
    count: i64,
    limit: Option<f64>,
    xs: &Tensor,
    served: Tensor,
) -> Tensor {
    // Quantised experts (FP8, MXFP4) are widened for the matmul: when the assignments are
    // fewer than the experts (decoding), only the experts in use are, gathered first in
    // ascending order (the order the assignments are sorted in) and padded to the assignments'
    // count, a bound known without asking the device, with unused ones that serve no rows.
    let assignments = xs.size()[0];
    let quantised = down.is_quantised() || gate_up.iter().any(Stacked::is_quantised);
    let (ids, served) = if quantised && assignments < count {
        let ids = served.eq(0).to_kind(Kind::Uint8).argsort_stable(true, 0, false).narrow(0, 0, assignments);
        let served = served.index_select(0, &ids);
        (Some(ids), served)
    } else {
        (None, served)
    };
    let ends = served.cumsum(0, Kind::Int);
    let grouped = |input: &Tensor, weight: &Stacked| {
        let widened = weight.widened(ids.as_ref(), WIDEN_CHUNK_ELEMENTS);
        input.internal_grouped_mm(&widened.transpose(1, 2), Some(&ends), None, None::<Kind>)
    };
    // One part (dense, or FP8 whose blocks line up at the seam) is used as it comes: `cat`
    // of a single tensor would still copy it (16 MB per layer for a PoC v2 batch of 2048
    // rows on the bench model).
    let gate_up = match gate_up {
        [part] => grouped(xs, part),
        parts => Tensor::cat(&parts.iter().map(|part| grouped(xs, part)).collect::<Vec<_>>(), -1),
    };
    if let Some(limit) = limit {
        clamp_swiglu(&gate_up, intermediate, limit);
    }
    let mut gate = gate_up.narrow(-1, 0, intermediate);
    let up = gate_up.narrow(-1, intermediate, intermediate);
    // In place on this call's own `gate_up`, as the dense MLP does (`layers::Mlp::forward`).
    let _ = gate.silu_();
    grouped(&(gate * up), down)
}

/// [`Experts::mix`] for float32 on the CPU with the experts packed ([`PackedExperts`]): the
/// same routing, matmuls and weighted sum, on the host in Rust, so a layer's tokens are copied
/// out of libtorch once and their mix back once (libtorch's gather, the kernel's input and
/// output and the weighted scatter each copied ~16 MB per layer for a PoC v2 batch of 2048
/// tokens on the bench's model). Each expert's output times its weight is rounded to float32
/// and a token's are added to zero in expert order, as `mix`'s `index_add` does.
fn mix_packed(
    packed: &[PackedExperts; 2],
    intermediate: i64,
    x: &Tensor,
    chosen: &Tensor,
    weights: &Tensor,
    threads: usize,
) -> Tensor {
    let [gate_up, down] = packed;
    let (tokens, hidden) = (x.size()[0] as usize, x.size()[1] as usize);
    let top_k = chosen.size()[1] as usize;
    let xs = to_host(x);
    let slot_weights = to_host(weights);
    let chosen = Vec::<i64>::try_from(chosen.contiguous().view([-1])).expect("int64 experts");
    // Assignments (token × top_k + slot) in expert order, stable: a counting sort.
    let mut served = vec![0usize; gate_up.experts()];
    for &e in &chosen {
        served[e as usize] += 1;
    }
    let mut next: Vec<usize> = served.iter().scan(0, |start, &n| Some(std::mem::replace(start, *start + n))).collect();
    let mut sorted = vec![0usize; chosen.len()];
    let mut position = vec![0usize; chosen.len()];
    for (assignment, &e) in chosen.iter().enumerate() {
        sorted[next[e as usize]] = assignment;
        position[assignment] = next[e as usize];
        next[e as usize] += 1;
    }
    let rows: Vec<usize> = sorted.iter().map(|a| a / top_k).collect();
    // SiLU(gate) × up over each piece of rows as it is multiplied, in the gate's columns.
    let epilogue = Epilogue::SwiGlu { intermediate: intermediate as usize };
    let activated = gate_up.grouped_matmul(&xs, hidden, &rows, &served, threads, epilogue);
    let in_order: Vec<usize> = (0..rows.len()).collect();
    let expert_out = down.grouped_matmul(&activated, gate_up.padded(), &in_order, &served, threads, Epilogue::None);
    let padded = down.padded();
    let mut out = vec![0f32; tokens * hidden];
    let per_piece = MIX_TOKENS_PER_PIECE * hidden;
    let pieces: Vec<_> = out.chunks_mut(per_piece).enumerate().collect();
    cpu_threads::share(pieces, threads, |(piece, out)| {
        let mut slots = vec![0usize; top_k];
        for (i, mixed) in out.chunks_exact_mut(hidden).enumerate() {
            let token = piece * MIX_TOKENS_PER_PIECE + i;
            slots.copy_from_slice(&position[token * top_k..][..top_k]);
            slots.sort_unstable();
            for &p in &slots {
                let weight = slot_weights[sorted[p]];
                for (sum, &value) in mixed.iter_mut().zip(&expert_out[p * padded..][..hidden]) {
                    *sum += value * weight;
                }
            }
        }
    });
    Tensor::from_slice(&out).view([tokens as i64, hidden as i64]).to_kind(x.kind())
}

/// Tokens whose mix one thread adds up at a time.
const MIX_TOKENS_PER_PIECE: usize = 64;

/// The most (token, expert) assignments per expert, on average, that float32 experts on the CPU
/// multiply with the packed kernel on the calling thread alone where libtorch's OpenMP workers
/// spin for milliseconds after each op (an operator's `GOMP_SPINCOUNT` above
/// `cpu_threads::SPIN_BOUND`, or a program that did not bound it); above it, libtorch's grouped
/// matmul on every thread is faster. Where libgomp's workers sleep soon (the daemon and the
/// bench bound them on the CPU: `cpu_threads`) the kernel runs on libtorch's thread count at
/// every size. Measured on the bench's random Qwen3-MoE (32 experts, top 4; two Zen 4 cores,
/// 2026-12-06): prefill of 64 tokens (8 an expert) 1.35x as fast on the kernel, 128 (16) 1.15x,
/// 256 (32) 0.93x; decoding one sequence 1.45x, eight 2.0x (docs/benchmarks.md).
const PACKED_MAX_ROWS_PER_EXPERT: i64 = 16;

/// FP8 experts widened per step at most this many weights at a time (64M: 0.25 GB of float32
/// in flight where the blocks tile the weights, twice that with partial edge blocks).
const WIDEN_CHUNK_ELEMENTS: i64 = 1 << 26;

/// [`Experts::mix`] one expert at a time: which (token, slot) pairs each expert serves is read
/// on the host, and each expert runs as a dense matmul over just its tokens.
pub fn mix_experts(x: &Tensor, experts: &[Mlp], chosen: &Tensor, weights: &Tensor) -> Tensor {
    let top_k = chosen.size()[1];
    let chosen_host = Vec::<i64>::try_from(chosen.to_device(Device::Cpu).flatten(0, -1)).expect("int64 indices");
    let mut served: Vec<Vec<i64>> = vec![Vec::new(); experts.len()];
    for (pair, &expert) in chosen_host.iter().enumerate() {
        served[expert as usize].push(pair as i64);
    }
    let mut out = x.zeros_like().to_kind(Kind::Float);
    let flat_weights = weights.flatten(0, -1);
    for (expert, pairs) in experts.iter().zip(&served) {
        if pairs.is_empty() {
            continue;
        }
        let pairs = Tensor::from_slice(pairs).to_device(x.device());
        let tokens = pairs.divide_scalar_mode(top_k, "floor");
        let expert_out = expert.forward(&x.index_select(0, &tokens));
        let scaled = (expert_out * flat_weights.index_select(0, &pairs).unsqueeze(-1)).to_kind(x.kind());
        out = out.index_add(0, &tokens, &scaled.to_kind(Kind::Float));
    }
    out.to_kind(x.kind())
}

#[cfg(test)]
mod tests {
    use super::*;

    const HIDDEN: i64 = 64;

    /// How test experts are stored.
    #[derive(Clone, Copy)]
    enum Format {
        Dense,
        Fp8([i64; 2]),
        Mxfp4,
    }

    /// Random projections of `count` experts: dense in `kind`, FP8 in `block`s with random
    /// factors, or MXFP4 with random codes and exponents.
    fn projections(count: i64, out: i64, input: i64, kind: Kind, format: Format) -> Vec<Weight> {
        (0..count)
            .map(|_| {
                let dense = Tensor::randn([out, input], (Kind::Float, Device::Cpu)) * 0.2;
                match format {
                    Format::Dense => Weight::Dense(dense.to_kind(kind)),
                    // Factors of 2^-9 to 2^-6: weights of the dense ones' magnitude (e2m1's
                    // largest, 6, times 2^-6 is about 0.1).
                    Format::Mxfp4 => Weight::Mxfp4 {
                        codes: Tensor::randint(256, [out, input / 2], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8),
                        exponents: Tensor::randint_low(118, 122, [out, input / 32], (Kind::Int64, Device::Cpu))
                            .to_kind(Kind::Uint8),
                        kind,
                    },
                    Format::Fp8(block) => {
                        let blocks = [(out + block[0] - 1) / block[0], (input + block[1] - 1) / block[1]];
                        Weight::Fp8Block {
                            weight: (dense * 4.0).to_kind(Kind::Float8e4m3fn),
                            scale_inv: Tensor::rand(blocks, (Kind::Float, Device::Cpu)) * 0.5 + 0.05,
                            block,
                            kind,
                        }
                    }
                }
            })
            .collect()
    }

    fn copy(weights: &[Weight]) -> Vec<Weight> {
        weights
            .iter()
            .map(|w| match w {
                Weight::Dense(t) => Weight::Dense(t.copy()),
                Weight::Fp8Block { weight, scale_inv, block, kind } => {
                    Weight::Fp8Block { weight: weight.copy(), scale_inv: scale_inv.copy(), block: *block, kind: *kind }
                }
                Weight::Mxfp4 { codes, exponents, kind } => {
                    Weight::Mxfp4 { codes: codes.copy(), exponents: exponents.copy(), kind: *kind }
                }
            })
            .collect()
    }

    /// The same experts stacked and one by one.
    fn both(count: i64, intermediate: i64, kind: Kind, format: Format) -> (Experts, Experts) {
        let gates = projections(count, intermediate, HIDDEN, kind, format);
        let ups = projections(count, intermediate, HIDDEN, kind, format);
        let downs = projections(count, HIDDEN, intermediate, kind, format);
        let each: Vec<Mlp> = gates
            .iter()
            .zip(&ups)
            .zip(&downs)
            .map(|((g, u), d)| {
                let [g, u, d] = [g, u, d].map(|w| copy(std::slice::from_ref(w)).remove(0));
                Mlp::from_weights(g, u, d)
            })
            .collect();
        (Experts::from_weights(gates, ups, downs, kind), Experts::Each(each))
    }

    /// Routing as a router would give it: `top_k` distinct experts per token, out of `pool`.
    fn routing(tokens: i64, top_k: i64, pool: &[i64], weights_kind: Kind) -> (Tensor, Tensor) {
        let pool = Tensor::from_slice(pool);
        let picks: Vec<Tensor> = (0..tokens)
            .map(|_| {
                pool.index_select(0, &Tensor::randperm(pool.size()[0], (Kind::Int64, Device::Cpu)).narrow(0, 0, top_k))
            })
            .collect();
        let chosen = Tensor::stack(&picks, 0);
        let weights = Tensor::rand([tokens, top_k], (Kind::Float, Device::Cpu)).to_kind(weights_kind);
        (chosen, weights)
    }

    fn assert_same(stacked: &Experts, each: &Experts, kind: Kind, tokens: i64, pool: &[i64]) {
        let x = (Tensor::randn([tokens, HIDDEN], (Kind::Float, Device::Cpu))).to_kind(kind);
        for weights_kind in [kind, Kind::Float] {
            let (chosen, weights) = routing(tokens, 2, pool, weights_kind);
            let a = stacked.mix(&x, &chosen, &weights);
            let b = each.mix(&x, &chosen, &weights);
            assert_eq!(a.kind(), kind);
            // In float32 the host loop's experts multiply through `layers::linear`, which sends
            // a few rows to oneDNN, where the grouped matmul runs MKL: the same within float32
            // rounding (a token given another expert's output or weight is off by ~1). In
            // bfloat16 both run the same kernel: to the bit.
            let same = match kind {
                Kind::Float => a.allclose(&b, 1e-5, 1e-5, false),
                _ => a.equal(&b),
            };
            assert!(
                same,
                "{kind:?}, {tokens} tokens, weights {weights_kind:?}: max difference {}",
                (a.to_kind(Kind::Float) - b.to_kind(Kind::Float)).abs().max()
            );
        }
    }

    #[test]
    fn stacked_experts_routed_on_the_device_equal_the_host_loop() {
        tch::manual_seed(7);
        let all: Vec<i64> = (0..8).collect();
        for kind in [Kind::Float, Kind::BFloat16] {
            let (stacked, each) = both(8, 32, kind, Format::Dense);
            assert!(
                matches!(&stacked, Experts::Stacked { gate_up, .. } if gate_up.len() == 1),
                "dense: one fused part"
            );
            // Prefill-sized (every expert used), and with experts that no token chose. Float32
            // has its experts packed: up to 16 assignments an expert (all but the 200 tokens
            // here) go through the packed kernel, more through the grouped matmul.
            assert!(matches!(&stacked, Experts::Stacked { packed, .. } if packed.is_some() == (kind == Kind::Float)));
            assert_same(&stacked, &each, kind, 200, &all);
            assert_same(&stacked, &each, kind, 40, &all);
            assert_same(&stacked, &each, kind, 40, &[1, 4, 6]);
            assert_same(&stacked, &each, kind, 1, &all);
        }
    }

    #[test]
    fn packed_experts_on_any_thread_count_equal_the_host_loop() {
        tch::manual_seed(9);
        let all: Vec<i64> = (0..8).collect();
        // Intermediate 40: the SwiGLU's gate ends inside a SIMD vector.
        let (stacked, each) = both(8, 40, Kind::Float, Format::Dense);
        let Experts::Stacked { packed: Some(packed), intermediate, .. } = &stacked else { panic!("packed") };
        // 300 tokens of top-2 out of 8: 75 rows an expert, more than a piece of rows
        // (`packed_matmul`) and above PACKED_MAX_ROWS_PER_EXPERT; one token; experts unused.
        for (tokens, pool) in [(300, &all[..]), (1, &all[..]), (40, &[1, 4, 6][..])] {
            let x = Tensor::randn([tokens, HIDDEN], (Kind::Float, Device::Cpu));
            let (chosen, weights) = routing(tokens, 2, pool, Kind::Float);
            let expected = each.mix(&x, &chosen, &weights);
            let alone = mix_packed(packed, *intermediate, &x, &chosen, &weights, 1);
            let error = (&alone - &expected).abs().max().double_value(&[]);
            assert!(error < 1e-5, "{tokens} tokens: {error}");
            // Shared among threads: the same bits.
            for threads in [2, 3] {
                assert!(mix_packed(packed, *intermediate, &x, &chosen, &weights, threads).equal(&alone));
            }
            // A negative control: another token's routing gives another mix.
            if tokens > 1 {
                let shuffled = chosen.roll([1], [0]);
                let other = mix_packed(packed, *intermediate, &x, &shuffled, &weights, 2);
                assert!((&other - &expected).abs().max().double_value(&[]) > 1e-2);
            }
        }
    }

    #[test]
    fn fp8_experts_widen_only_the_chosen_ones_while_decoding_and_equal_the_host_loop() {
        tch::manual_seed(11);
        let all: Vec<i64> = (0..8).collect();
        for kind in [Kind::Float, Kind::BFloat16] {
            // Blocks that line up at the gate/up seam (one part), and ones that do not (two).
            for (block, parts) in [([16, 32], 1), ([24, 32], 2)] {
                let (stacked, each) = both(8, 32, kind, Format::Fp8(block));
                assert!(stacked.is_quantised() && each.is_quantised());
                assert!(
                    matches!(&stacked, Experts::Stacked { gate_up, .. } if gate_up.len() == parts),
                    "{block:?}: {parts} parts"
                );
                // Fewer assignments than experts (1 and 3 tokens of top-2 out of 8): the used
                // experts are gathered; at 40 tokens all are widened.
                for tokens in [1, 3, 40] {
                    assert_same(&stacked, &each, kind, tokens, &all);
                    assert_same(&stacked, &each, kind, tokens, &[0, 5, 7]);
                }
            }
        }
    }

    /// MXFP4 experts (DeepSeek-V4's) stack into one gate/up part, widen only the chosen ones
    /// while decoding, in chunks to the same bits, and mix as the host loop over each expert
    /// widened alone does.
    #[test]
    fn mxfp4_experts_stack_widen_and_equal_the_host_loop() {
        tch::manual_seed(17);
        let all: Vec<i64> = (0..8).collect();
        for kind in [Kind::Float, Kind::BFloat16] {
            let (stacked, each) = both(8, 32, kind, Format::Mxfp4);
            assert!(stacked.is_quantised() && each.is_quantised());
            let Experts::Stacked { gate_up, down, .. } = &stacked else { panic!("stacked") };
            assert!(matches!(gate_up.as_slice(), [Stacked::Mxfp4 { .. }]), "gate and up fused");
            for tokens in [1, 3, 40] {
                assert_same(&stacked, &each, kind, tokens, &all);
                assert_same(&stacked, &each, kind, tokens, &[0, 5, 7]);
            }
            let whole = down.widened(None, i64::MAX);
            assert!(down.widened(None, HIDDEN * 32).equal(&whole), "one expert a chunk");
            let ids = Tensor::from_slice(&[6i64, 0, 3]);
            assert!(down.widened(Some(&ids), HIDDEN * 32).equal(&whole.index_select(0, &ids)));
        }
    }

    #[test]
    fn fp8_experts_widen_in_chunks_to_the_same_bits() {
        tch::manual_seed(13);
        for kind in [Kind::Float, Kind::BFloat16] {
            // Seven experts (an odd count), blocks with a partial edge.
            let (stacked, _) = both(7, 32, kind, Format::Fp8([24, 32]));
            let Experts::Stacked { gate_up, down, .. } = &stacked else { panic!("stacked") };
            for part in gate_up.iter().chain([down]) {
                let whole = part.widened(None, i64::MAX);
                assert_eq!(whole.size()[0], 7);
                let [_, rows, columns] = whole.size()[..] else { panic!("3-d") };
                // One expert at a time, two, three (a short last chunk), and a gathered few.
                for experts_per_chunk in [1, 2, 3] {
                    let chunked = part.widened(None, experts_per_chunk * rows * columns);
                    assert!(chunked.equal(&whole), "{kind:?}, {experts_per_chunk} per chunk");
                }
                let ids = Tensor::from_slice(&[6i64, 0, 3]);
                let gathered = part.widened(Some(&ids), rows * columns);
                assert!(gathered.equal(&whole.index_select(0, &ids)), "{kind:?}: gathered");
            }
        }
    }

    #[test]
    fn rows_the_grouped_matmul_cannot_read_keep_one_mlp_per_expert() {
        // 34 float32 columns are 136 bytes, 20 bfloat16 ones 40: not steps of 16 bytes.
        for (kind, intermediate) in [(Kind::Float, 34), (Kind::BFloat16, 20)] {
            let (experts, _) = both(4, intermediate, kind, Format::Dense);
            assert!(matches!(experts, Experts::Each(ref mlps) if mlps.len() == 4), "{kind:?} × {intermediate}");
        }
        let (experts, _) = both(4, 40, Kind::Float, Format::Dense);
        assert!(matches!(experts, Experts::Stacked { count: 4, intermediate: 40, .. }));
    }
}
