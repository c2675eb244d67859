//! Choosing the next token from a row of logits, with OpenAI's knobs as vLLM reads them:
//! `temperature` 0 is greedy; otherwise softmax at that temperature, cut to the smallest set of
//! tokens whose probability reaches `top_p`, and drawn from a generator seeded per request
//! (`seed`) so a seeded request repeats.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Text that ends the generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end it besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<i64>,
    /// Keep going past end-of-sequence ids (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        // OpenAI's defaults (temperature 1, top_p 1); vLLM's max_tokens default is the context
        // left, which the engine applies.
        Self {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            max_tokens: usize::MAX,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
        }
    }
}

pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self { temperature: params.temperature, top_p: params.top_p, rng }
    }

    /// The next token id from `logits` (float32, the vocabulary's row).
    pub fn sample(&mut self, logits: &[f32]) -> i64 {
        if self.temperature <= 0.0 {
            return argmax(logits);
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((f64::from(l) - f64::from(max)) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        if !(total.is_finite() && total > 0.0) {
            return argmax(logits);
        }
        if self.top_p < 1.0 {
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let mut kept = 0.0;
            let mut cut = probs.len();
            for (n, (_, p)) in probs.iter().enumerate() {
                kept += p / total;
                if kept >= self.top_p {
                    cut = n + 1;
                    break;
                }
            }
            probs.truncate(cut);
        }
        let mass: f64 = probs.iter().map(|(_, p)| p).sum();
        let mut draw = self.rng.random::<f64>() * mass;
        for (i, p) in &probs {
            draw -= p;
            if draw <= 0.0 {
                return *i as i64;
            }
        }
        probs.last().map_or(0, |(i, _)| *i as i64)
    }
}

/// The first index of the largest logit (ties go to the lower id, as torch's argmax).
pub fn argmax(logits: &[f32]) -> i64 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(temperature: f64, top_p: f64, seed: u64) -> Sampler {
        Sampler::new(&SamplingParams { temperature, top_p, seed: Some(seed), ..SamplingParams::default() })
    }

    #[test]
    fn zero_temperature_is_greedy() {
        assert_eq!(sampler(0.0, 1.0, 1).sample(&[0.1, 3.0, 2.9, 3.0]), 1);
    }

    #[test]
    fn seeded_draws_repeat_and_follow_the_distribution() {
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()]; // probabilities 1/8, 2/8, 5/8
        let draws = |seed| {
            (0..4000).map({
                let mut s = sampler(1.0, 1.0, seed);
                move |_| s.sample(&logits)
            })
        };
        let a: Vec<i64> = draws(7).collect();
        assert_eq!(a, draws(7).collect::<Vec<_>>());
        assert_ne!(a, draws(8).collect::<Vec<_>>());
        let share = |t| a.iter().filter(|&&x| x == t).count() as f64 / a.len() as f64;
        assert!((share(0) - 0.125).abs() < 0.03 && (share(2) - 0.625).abs() < 0.03, "{} {}", share(0), share(2));
    }

    #[test]
    fn top_p_cuts_the_tail() {
        // 5/8 alone reaches top_p 0.6: only token 2 is ever drawn.
        let logits = [0.0f32, (2.0f32).ln(), (5.0f32).ln()];
        let mut s = sampler(1.0, 0.6, 3);
        assert!((0..500).all(|_| s.sample(&logits) == 2));
        // 0.7 needs the two largest.
        let mut s = sampler(1.0, 0.7, 3);
        let draws: Vec<i64> = (0..500).map(|_| s.sample(&logits)).collect();
        assert!(draws.contains(&1) && !draws.contains(&0));
    }
}
