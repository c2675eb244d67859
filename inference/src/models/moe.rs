//! What the mixture-of-experts architectures share once their routers have chosen: each token's
//! `top_k` experts run and their outputs are summed with the router's weights. Routers differ
//! (Qwen3-MoE's softmax, MiniMax-M2's sigmoid with a correction bias) and live with their
//! architectures.

use tch::{Device, Kind, Tensor};

use crate::layers::Mlp;

/// `Σ_k weights[t, k] · experts[chosen[t, k]](x[t])` for every token `t` of `x` (`[tokens,
/// hidden]`); `chosen` int64 and `weights` are `[tokens, top_k]`. Rounded as vLLM's fused MoE
/// rounds: each expert's output scaled in the wider of its dtype and the weights' (float32
/// weights: in float32) and rounded to `x`'s dtype (its kernel's output cache), the `top_k` of
/// a token summed in float32 and rounded once (its `moe_sum`).
pub fn mix_experts(x: &Tensor, experts: &[Mlp], chosen: &Tensor, weights: &Tensor) -> Tensor {
    let top_k = chosen.size()[1];
    // Which (token, slot) pairs each expert serves, on the host: the experts run as dense
    // matmuls over just their tokens.
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
