//! Choosing the next token from a row of logits, with OpenAI's knobs as vLLM reads them:
//! `temperature` 0 is greedy; otherwise softmax at that temperature, cut to the smallest set of
//! tokens whose probability reaches `top_p`, and drawn from a generator seeded per request
//! (`seed`) so a seeded request repeats. Until `min_tokens` are out, end-of-sequence and stop
//! token ids cannot be chosen (vLLM's min-tokens logits processor).
//!
//! Beside the token, its log-probability and those of the most likely tokens (OpenAI's
//! `logprobs`/`top_logprobs`): the network's inference validation rests on them. The executor
//! reports them, and a validator replays the executor's tokens (`enforced`, gonka's vLLM fork's
//! `enforced_tokens`) to compare its own distribution with them at every position. As in that
//! fork, they come from the raw logits (`raw_logprobs`, vLLM's default) or from the
//! distribution the token is drawn from (`processed_logprobs`: the min-tokens mask, and when
//! sampling the temperature and the `top_p` cut, the tokens cut at minus infinity).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Which distribution a token's logprobs are read from (vLLM's `logprobs_mode`; per request in
/// gonka's fork, which the network node sets from the chain's parameters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogprobsMode {
    /// The model's logits as they are (`raw_logprobs`).
    #[default]
    Raw,
    /// The logits the token is chosen from (`processed_logprobs`).
    Processed,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    pub temperature: f64,
    pub top_p: f64,
    pub seed: Option<u64>,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Tokens to generate at least: end-of-sequence, stop token ids and stop strings end
    /// nothing before.
    pub min_tokens: usize,
    /// Text that ends the generation (not included in the output).
    pub stop: Vec<String>,
    /// Token ids that end it besides the model's end-of-sequence ids.
    pub stop_token_ids: Vec<i64>,
    /// Keep going past end-of-sequence ids (benchmarks).
    pub ignore_eos: bool,
    /// Special tokens' text left out of the output (vLLM's default).
    pub skip_special_tokens: bool,
    /// Report each token's logprob and this many of the most likely tokens' (`None`: none).
    pub logprobs: Option<usize>,
    pub logprobs_mode: LogprobsMode,
    /// Tokens emitted in place of the drawn ones, in order (a validator's replay); the
    /// logprobs reported are still the model's own.
    pub enforced: Vec<i64>,
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
            min_tokens: 0,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: false,
            skip_special_tokens: true,
            logprobs: None,
            logprobs_mode: LogprobsMode::Raw,
            enforced: Vec::new(),
        }
    }
}

/// A chosen token's logprob and the most likely tokens', most likely first (ties: the lower id
/// first).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    pub token: i64,
    pub logprob: f32,
    pub top: Vec<(i64, f32)>,
}

/// The token chosen at a step, with its logprobs when they were asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    pub token: i64,
    pub logprobs: Option<TokenLogprobs>,
}

pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: ChaCha8Rng,
    min_tokens: usize,
    logprobs: Option<usize>,
    mode: LogprobsMode,
    enforced: Vec<i64>,
}

impl Sampler {
    pub fn new(params: &SamplingParams) -> Self {
        let rng = match params.seed {
            Some(seed) => ChaCha8Rng::seed_from_u64(seed),
            None => ChaCha8Rng::from_os_rng(),
        };
        Self {
            temperature: params.temperature,
            top_p: params.top_p,
            rng,
            min_tokens: params.min_tokens,
            logprobs: params.logprobs,
            mode: params.logprobs_mode,
            enforced: params.enforced.clone(),
        }
    }

    /// The next token id from `logits` (float32, the vocabulary's row).
    pub fn sample(&mut self, logits: &[f32]) -> i64 {
        match self.kept(logits) {
            None => argmax(logits),
            Some(kept) => self.draw(&kept),
        }
    }

    /// The token after `generated` tokens from `raw` (the model's logits), with its logprobs
    /// when asked for; `stops` are the ids that would end the generation (end-of-sequence ids
    /// unless ignored, stop token ids), impossible before `min_tokens`.
    pub fn choose(&mut self, raw: &[f32], generated: usize, stops: &[i64]) -> Choice {
        let masked;
        let logits = if generated < self.min_tokens && !stops.is_empty() {
            let mut row = raw.to_vec();
            for &id in stops {
                if let Some(logit) = usize::try_from(id).ok().and_then(|i| row.get_mut(i)) {
                    *logit = f32::NEG_INFINITY;
                }
            }
            masked = row;
            &masked[..]
        } else {
            raw
        };
        let kept = self.kept(logits);
        let drawn = match &kept {
            None => argmax(logits),
            Some(kept) => self.draw(kept),
        };
        let token = self.enforced.get(generated).copied().unwrap_or(drawn);
        let logprobs = self.logprobs.map(|n| {
            let logprobs = match (self.mode, &kept) {
                (LogprobsMode::Raw, _) => log_softmax(raw),
                (LogprobsMode::Processed, None) => log_softmax(logits),
                (LogprobsMode::Processed, Some(kept)) => {
                    // log_softmax of logits / temperature among the tokens kept, the rest cut;
                    // from the logits rather than ln(p), which underflows far in the tail.
                    let max = f64::from(logits.iter().copied().fold(f32::NEG_INFINITY, f32::max));
                    let norm = kept.iter().map(|(_, p)| p).sum::<f64>().ln();
                    let mut row = vec![f32::NEG_INFINITY; logits.len()];
                    for &(i, _) in kept {
                        row[i] = ((f64::from(logits[i]) - max) / self.temperature - norm) as f32;
                    }
                    row
                }
            };
            TokenLogprobs::read(&logprobs, token, n)
        });
        Choice { token, logprobs }
    }

    /// The tokens sampling may draw and their unnormalised probabilities (temperature, then the
    /// `top_p` cut); `None` when the choice is greedy (temperature 0, or logits that give no
    /// distribution).
    fn kept(&self, logits: &[f32]) -> Option<Vec<(usize, f64)>> {
        if self.temperature <= 0.0 {
            return None;
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(usize, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i, ((f64::from(l) - f64::from(max)) / self.temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        if !(total.is_finite() && total > 0.0) {
            return None;
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
        Some(probs)
    }

    fn draw(&mut self, kept: &[(usize, f64)]) -> i64 {
        let mass: f64 = kept.iter().map(|(_, p)| p).sum();
        let mut draw = self.rng.random::<f64>() * mass;
        for (i, p) in kept {
            draw -= p;
            if draw <= 0.0 {
                return *i as i64;
            }
        }
        kept.last().map_or(0, |(i, _)| *i as i64)
    }
}

impl TokenLogprobs {
    /// `token`'s entry of `logprobs` (a vocabulary row) and the `n` largest.
    fn read(logprobs: &[f32], token: i64, n: usize) -> Self {
        let logprob = usize::try_from(token).ok().and_then(|i| logprobs.get(i)).copied().unwrap_or(f32::NEG_INFINITY);
        let mut top: Vec<(i64, f32)> = Vec::with_capacity(n + 1);
        if n > 0 {
            for (i, &lp) in logprobs.iter().enumerate() {
                if top.len() == n && top[n - 1].1 >= lp {
                    continue;
                }
                // Ties keep the lower id first: it was seen first.
                let at = top.partition_point(|&(_, other)| other >= lp);
                top.insert(at, (i as i64, lp));
                top.truncate(n);
            }
        }
        Self { token, logprob, top }
    }
}

/// log_softmax of a row, in float64 and returned in float32 (minus infinity stays so).
pub fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return vec![f32::NEG_INFINITY; logits.len()];
    }
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum();
    let norm = max + sum.ln();
    logits.iter().map(|&l| (f64::from(l) - norm) as f32).collect()
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

    /// Logits whose probabilities are 1/8, 2/8 and 5/8 at temperature 1.
    const EIGHTHS: [f32; 3] = [0.0, std::f32::consts::LN_2, 1.609_438];

    fn params(temperature: f64, top_p: f64) -> SamplingParams {
        SamplingParams { temperature, top_p, seed: Some(5), logprobs: Some(2), ..SamplingParams::default() }
    }

    fn close(a: f32, b: f64) -> bool {
        (f64::from(a) - b).abs() < 1e-6
    }

    #[test]
    fn raw_logprobs_are_the_models_log_softmax_with_the_most_likely_first() {
        let choice = Sampler::new(&params(0.0, 1.0)).choose(&EIGHTHS, 0, &[]);
        assert_eq!(choice.token, 2);
        let lp = choice.logprobs.unwrap();
        assert!(close(lp.logprob, (5.0f64 / 8.0).ln()), "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert!(close(lp.top[1].1, (2.0f64 / 8.0).ln()), "{lp:?}");
        // None asked: none computed; zero asked: the token's own, no list.
        let plain = SamplingParams { logprobs: None, ..params(0.0, 1.0) };
        assert_eq!(Sampler::new(&plain).choose(&EIGHTHS, 0, &[]).logprobs, None);
        let zero = SamplingParams { logprobs: Some(0), ..params(0.0, 1.0) };
        assert_eq!(Sampler::new(&zero).choose(&EIGHTHS, 0, &[]).logprobs.unwrap().top, vec![]);
        // Ties: the lower id first.
        let tied = Sampler::new(&params(0.0, 1.0)).choose(&[1.0, 3.0, 3.0, 0.0], 0, &[]);
        assert_eq!(tied.logprobs.unwrap().top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
    }

    #[test]
    fn processed_logprobs_are_the_distribution_drawn_from() {
        let processed = |temperature, top_p| SamplingParams {
            logprobs_mode: LogprobsMode::Processed,
            ..params(temperature, top_p)
        };
        // Temperature 0.5 squares the odds: 1, 4, 25 out of 30.
        let lp = Sampler::new(&processed(0.5, 1.0)).choose(&EIGHTHS, 0, &[]).logprobs.unwrap();
        let of = |lp: &TokenLogprobs, id: i64| lp.top.iter().find(|t| t.0 == id).map(|t| t.1);
        assert!(close(of(&lp, 2).unwrap(), (25.0f64 / 30.0).ln()) && close(of(&lp, 1).unwrap(), (4.0f64 / 30.0).ln()));
        // top_p 0.6 keeps token 2 alone: it is certain, the rest cut (minus infinity).
        let choice = Sampler::new(&processed(1.0, 0.6)).choose(&EIGHTHS, 0, &[]);
        let lp = choice.logprobs.unwrap();
        assert_eq!((choice.token, lp.logprob), (2, 0.0));
        assert_eq!(lp.top[1].1, f32::NEG_INFINITY);
        // The raw ones of the same draw are the model's.
        let raw = Sampler::new(&params(1.0, 0.6)).choose(&EIGHTHS, 0, &[]).logprobs.unwrap();
        assert!(close(raw.logprob, (5.0f64 / 8.0).ln()), "{raw:?}");
    }

    #[test]
    fn min_tokens_hold_the_stop_ids_off_until_reached() {
        let processed = SamplingParams { min_tokens: 2, logprobs_mode: LogprobsMode::Processed, ..params(0.0, 1.0) };
        let mut sampler = Sampler::new(&processed);
        // Token 2 ends the generation: before two tokens are out, token 1 is the greedy choice
        // and token 2 is impossible in the processed distribution.
        let early = sampler.choose(&EIGHTHS, 1, &[2]);
        let lp = early.logprobs.unwrap();
        assert_eq!(early.token, 1);
        assert!(close(lp.logprob, (2.0f64 / 3.0).ln()), "{lp:?}");
        assert_eq!(lp.top.iter().find(|t| t.0 == 2), None);
        assert_eq!(sampler.choose(&EIGHTHS, 2, &[2]).token, 2);
        // Raw logprobs do not see the mask.
        let raw = SamplingParams { min_tokens: 2, ..params(0.0, 1.0) };
        let lp = Sampler::new(&raw).choose(&EIGHTHS, 0, &[2]).logprobs.unwrap();
        assert!(close(lp.logprob, (2.0f64 / 8.0).ln()) && lp.top[0].0 == 2, "{lp:?}");
    }

    #[test]
    fn enforced_tokens_replace_the_draw_but_not_the_distribution() {
        let replay = SamplingParams { enforced: vec![0, 1], ..params(0.0, 1.0) };
        let mut sampler = Sampler::new(&replay);
        let first = sampler.choose(&EIGHTHS, 0, &[]);
        let lp = first.logprobs.unwrap();
        assert_eq!(first.token, 0);
        assert!(close(lp.logprob, (1.0f64 / 8.0).ln()), "{lp:?}");
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
        assert_eq!(sampler.choose(&EIGHTHS, 1, &[]).token, 1);
        // Past the enforced tokens, the model's own choice again.
        assert_eq!(sampler.choose(&EIGHTHS, 2, &[]).token, 2);
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
