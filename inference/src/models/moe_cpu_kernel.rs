//! A layer's float32 experts for a few tokens on the CPU, in a kernel of our own.
//!
//! Decoding a batch, each expert serves one token or a few: the work is reading the chosen
//! experts' weights, and libtorch reads them more than once. Its grouped matmul is a loop of
//! MKL sgemms, each first copying its expert's weight into a packed layout; every other
//! arrangement of libtorch's ops tried (the host loop, oneDNN per expert, a padded `bmm`,
//! gathering the weights first) also copies or reorders them: 27–32 ms a step for the bench's
//! Qwen3-MoE experts at 8 sequences on two cores, where vLLM's CPU build, a fused C++ kernel
//! over prepacked weights, decodes the whole step in ~20. Here each row of a chosen expert's
//! weights is read once, straight from the stacked tensors, and multiplied with every token the
//! expert serves while it is in the cache (the same experts: ~13 ms a step).
//!
//! It runs on the calling thread. A pool of our own beside libtorch's was slower: libtorch's
//! OpenMP threads spin for a while after each op (libgomp's default), so another thread on
//! their cores gets half of one (measured on the bench model, 2 cores: 8 sequences decode 1.2x
//! faster on the calling thread alone than on two pool threads, one sequence 1.1x). On many
//! cores the kernel would want to run inside libtorch's OpenMP team, which Rust cannot join
//! through tch; that is unmeasured.
//!
//! Sums are in float32 like libtorch's, in another order: the same within float32 rounding,
//! not to the bit.

use tch::{Device, Kind, Tensor};

/// The most tokens [`mix`] takes. Measured in the engine on the bench's Qwen3-MoE (32 experts
/// of width 256, hidden 512, top 4; 2 cores, 2026-12-05), this kernel against the grouped
/// matmul: decoding 8 sequences 1.8x as fast, 16 1.7x, 32 1.2x; a prompt of 16 tokens 0.92x
/// and of 32 0.68x (a prompt's tokens crowd onto a few experts, 26–32 of 32 tokens on one in
/// the deeper layers, and each then serves enough tokens that MKL's matmul, which keeps a block
/// of the weight in registers across many rows, is faster than reading a row per token here).
pub const MAX_TOKENS: i64 = 16;

/// Whether [`mix`] takes these: float32 on the CPU, the stacked weights contiguous, at most
/// [`MAX_TOKENS`] tokens.
pub fn takes(x: &Tensor, gate_up: &Tensor, down: &Tensor) -> bool {
    let float_cpu = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
    x.dim() == 2
        && (1..=MAX_TOKENS).contains(&x.size()[0])
        && float_cpu(x)
        && [gate_up, down].iter().all(|w| float_cpu(w) && w.dim() == 3 && w.is_contiguous())
}

/// `Σ_k weights[t, k] · expert[chosen[t, k]](x[t])` for each token `t` of `x` (`[tokens,
/// hidden]`, float32 on the CPU), the experts' SwiGLUs stacked as `gate_up` (`[experts, 2 ×
/// intermediate, hidden]`, gate rows then up rows) and `down` (`[experts, hidden,
/// intermediate]`); `chosen` int64 and `weights` `[tokens, top_k]`, summed in expert order.
/// Callers check [`takes`], and give weights nothing writes (a layer's, after loading): the
/// kernel reads them in place.
pub(super) fn mix(x: &Tensor, gate_up: &Tensor, down: &Tensor, chosen: &Tensor, weights: &Tensor) -> Tensor {
    let (tokens, hidden) = (x.size()[0] as usize, x.size()[1] as usize);
    let (experts, intermediate) = (gate_up.size()[0] as usize, gate_up.size()[1] as usize / 2);
    let xs = Vec::<f32>::try_from(x.contiguous().view(-1)).expect("float32 input");
    let top_k = chosen.size()[1] as usize;
    let chosen = Vec::<i64>::try_from(chosen.contiguous().view(-1)).expect("int64 experts");
    let weights = Vec::<f32>::try_from(weights.to_kind(Kind::Float).contiguous().view(-1)).expect("float32 weights");

    // The (token, weight) pairs each expert serves, in token order.
    let mut served: Vec<Vec<(usize, f32)>> = vec![Vec::new(); experts];
    for (pair, &expert) in chosen.iter().enumerate() {
        served[expert as usize].push((pair / top_k, weights[pair]));
    }
    let (gate_up, down) = (floats(gate_up), floats(down));
    let mut out = vec![0f32; tokens * hidden];
    // One expert's gate and up rows times its tokens (`[2 × intermediate, its tokens]`), their
    // SwiGLU (`[its tokens, intermediate]`), its down rows times those (`[hidden, its tokens]`).
    let (mut gate_up_out, mut activated, mut down_out) = (Vec::new(), Vec::new(), Vec::new());
    for (expert, pairs) in served.iter().enumerate().filter(|(_, pairs)| !pairs.is_empty()) {
        let n = pairs.len();
        let inputs: Vec<&[f32]> = pairs.iter().map(|&(t, _)| &xs[t * hidden..(t + 1) * hidden]).collect();
        let rows = 2 * intermediate;
        gate_up_out.resize(rows * n, 0.0);
        rows_times_inputs(&gate_up[expert * rows * hidden..(expert + 1) * rows * hidden], &inputs, &mut gate_up_out);

        activated.resize(n * intermediate, 0.0);
        for (j, row) in activated.chunks_exact_mut(intermediate).enumerate() {
            for (i, a) in row.iter_mut().enumerate() {
                let (gate, up) = (gate_up_out[i * n + j], gate_up_out[(intermediate + i) * n + j]);
                *a = gate / (1.0 + (-gate).exp()) * up;
            }
        }

        let inputs: Vec<&[f32]> = activated.chunks_exact(intermediate).collect();
        down_out.resize(hidden * n, 0.0);
        let expert_down = &down[expert * hidden * intermediate..(expert + 1) * hidden * intermediate];
        rows_times_inputs(expert_down, &inputs, &mut down_out);

        for (j, &(t, weight)) in pairs.iter().enumerate() {
            for (h, o) in out[t * hidden..(t + 1) * hidden].iter_mut().enumerate() {
                *o += weight * down_out[h * n + j];
            }
        }
    }
    Tensor::from_slice(&out).view([tokens as i64, hidden as i64])
}

/// Each row of `weights` (rows as long as the inputs) times every one of `inputs`, into `out`
/// (`[rows, inputs]`): a row is read from memory once, then from the cache for the rest.
fn rows_times_inputs(weights: &[f32], inputs: &[&[f32]], out: &mut [f32]) {
    let columns = inputs[0].len();
    for (row, row_out) in weights.chunks_exact(columns).zip(out.chunks_exact_mut(inputs.len())) {
        for (o, input) in row_out.iter_mut().zip(inputs) {
            *o = dot(row, input);
        }
    }
}

/// A float32 dot product in 16 running sums (vectorised by the compiler; summed in their
/// order, not libtorch's).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut sums = [0f32; 16];
    let (a_chunks, b_chunks) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in a_chunks.zip(b_chunks) {
        for i in 0..16 {
            sums[i] += x[i] * y[i];
        }
    }
    sums.iter().sum::<f32>() + tail
}

/// A contiguous float32 CPU tensor's elements, borrowed.
#[allow(unsafe_code)]
fn floats(t: &Tensor) -> &[f32] {
    assert!(t.device() == Device::Cpu && t.kind() == Kind::Float && t.is_contiguous());
    let len = t.numel();
    if len == 0 {
        return &[];
    }
    // SAFETY: a contiguous float32 CPU tensor holds `len` initialised, aligned f32s from
    // `data_ptr`, and `t` keeps its storage alive for the borrow. The only tensors given here
    // are a layer's stacked expert weights, which nothing writes after loading, so no write
    // races the read.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

    /// The same sum in float64 from libtorch's ops, one (token, slot) at a time.
    fn reference(x: &Tensor, gate_up: &Tensor, down: &Tensor, chosen: &Tensor, weights: &Tensor) -> Tensor {
        let [x, gate_up, down, weights] = [x, gate_up, down, weights].map(|t| t.to_kind(Kind::Double));
        let intermediate = gate_up.size()[1] / 2;
        let out = x.zeros_like();
        for t in 0..x.size()[0] {
            for k in 0..chosen.size()[1] {
                let e = chosen.int64_value(&[t, k]);
                let h = gate_up.get(e).matmul(&x.get(t));
                let act = h.narrow(0, 0, intermediate).silu() * h.narrow(0, intermediate, intermediate);
                let y = down.get(e).matmul(&act) * weights.double_value(&[t, k]);
                out.get(t).copy_(&(out.get(t) + y));
            }
        }
        out
    }

    #[test]
    fn few_tokens_experts_equal_the_float64_sum() {
        tch::manual_seed(3);
        // Hidden 40 and intermediate 24: rows that are not multiples of the 16 running sums.
        let (experts, hidden, intermediate) = (6, 40, 24);
        let gate_up = Tensor::randn([experts, 2 * intermediate, hidden], CPU) * 0.3;
        let down = Tensor::randn([experts, hidden, intermediate], CPU) * 0.3;
        for (tokens, chosen) in [
            (1, vec![4, 1]),
            // Experts 0, 3 and 5 serve nobody; expert 2 serves every token.
            (3, vec![2, 4, 1, 2, 2, 1]),
            (MAX_TOKENS, (0..MAX_TOKENS).flat_map(|t| [t % experts, (t + 1) % experts]).collect()),
        ] {
            let x = Tensor::randn([tokens, hidden], CPU);
            let chosen = Tensor::from_slice(&chosen).view([tokens, 2]);
            for weights in [Tensor::rand([tokens, 2], CPU), Tensor::rand([tokens, 2], CPU).to_kind(Kind::BFloat16)] {
                assert!(takes(&x, &gate_up, &down));
                let got = mix(&x, &gate_up, &down, &chosen, &weights);
                assert_eq!((got.size(), got.kind()), (vec![tokens, hidden], Kind::Float));
                let expected = reference(&x, &gate_up, &down, &chosen, &weights);
                let error = (got.to_kind(Kind::Double) - &expected).abs().max().double_value(&[]);
                assert!(error < 1e-5, "{tokens} tokens: off by {error}");
            }
        }
    }

    #[test]
    fn takes_few_float32_tokens_on_contiguous_weights_only() {
        let (gate_up, down) = (Tensor::zeros([4, 32, 16], CPU), Tensor::zeros([4, 16, 16], CPU));
        let x = |tokens| Tensor::zeros([tokens, 16], CPU);
        assert!(takes(&x(1), &gate_up, &down));
        assert!(takes(&x(MAX_TOKENS), &gate_up, &down));
        assert!(!takes(&x(MAX_TOKENS + 1), &gate_up, &down), "more tokens than the kernel's bound");
        assert!(!takes(&x(4).to_kind(Kind::BFloat16), &gate_up, &down), "bfloat16 input");
        assert!(!takes(&x(4), &gate_up.to_kind(Kind::BFloat16), &down), "bfloat16 weights");
        assert!(!takes(&x(4), &gate_up, &down.transpose(1, 2)), "weights not contiguous");
    }
}
