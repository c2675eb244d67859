//! Decoding one sequence: prefill the prompt, then one token per step.

use tch::Kind;

use crate::batch::{Output, Step, StepInput};
use crate::models::Transformer;

/// Greedy decoding: the prompt's continuation of up to `max_new` tokens, stopping after any of
/// `stop` tokens (which is kept).
pub fn greedy(model: &Transformer, prompt: &[i64], max_new: usize, stop: &[i64]) -> Vec<i64> {
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache((prompt.len() + max_new) as i64);
    let mut input = prompt.to_vec();
    let mut out = Vec::with_capacity(max_new);
    while out.len() < max_new {
        let mut steps = [Step { input: StepInput::Tokens(std::mem::take(&mut input)), cache: Some(&mut cache) }];
        let hidden = model.forward(&mut steps, None, Output::Last);
        let next = model.logits(&hidden).to_kind(Kind::Float).argmax(-1, false).int64_value(&[0]);
        out.push(next);
        if stop.contains(&next) {
            break;
        }
        input = vec![next];
    }
    out
}
