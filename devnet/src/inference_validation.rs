//! Inference validation as the 2026 network node does it (`decentralized-api`
//! `completionapi.ModifyRequestBodyWithLogprobsMode`, `validation.ExecuteValidation`,
//! `CompareLogits`): the executor's request is rewritten to ask for what validation reads, its
//! answer (whole or streamed) kept, and a validator's ML node replays the executor's tokens
//! (`enforced_tokens`); the two answers' logprobs are compared position by position. Pure
//! functions over JSON: the caller sends the requests.

use serde_json::{Map, Value, json};

/// The top logprobs the network node pins on every request (`ForcedTopLogprobs`).
pub const TOP_LOGPROBS: u64 = 5;
/// `calculations.DefaultMaxTokens`: the answer's length when the request names none.
pub const DEFAULT_MAX_TOKENS: u64 = 5000;
/// The chain's similarity threshold (0.9 for the live models).
pub const THRESHOLD: f64 = 0.9;

/// The executor's request: `body` (a user's chat request) with logprobs (top 5) pinned, one
/// token budget for `max_tokens` and `max_completion_tokens`, `min_tokens` clamped to it, `n`
/// 1 where given, special tokens kept, token ids returned, `seed` where the user set none,
/// usage on streams, and the chain's `logprobs_mode` where it has one.
pub fn executor_request(body: &Value, seed: i32, logprobs_mode: Option<&str>) -> Value {
    let mut request = body.as_object().cloned().unwrap_or_default();
    request.insert("logprobs".into(), json!(true));
    request.insert("top_logprobs".into(), json!(TOP_LOGPROBS));
    let number = |key: &str, request: &Map<String, Value>| request.get(key).and_then(Value::as_f64);
    let max_tokens = number("max_tokens", &request)
        .or_else(|| number("max_completion_tokens", &request))
        .map_or(DEFAULT_MAX_TOKENS, |m| m as u64);
    request.insert("max_tokens".into(), json!(max_tokens));
    request.insert("max_completion_tokens".into(), json!(max_tokens));
    match number("min_tokens", &request).map(|m| m as u64) {
        Some(min) if min > 0 => request.insert("min_tokens".into(), json!(min.min(max_tokens))),
        _ => request.remove("min_tokens"),
    };
    if request.contains_key("n") {
        request.insert("n".into(), json!(1));
    }
    request.insert("skip_special_tokens".into(), json!(false));
    request.insert("return_token_ids".into(), json!(true));
    request.entry("seed").or_insert(json!(seed));
    if request.get("stream") == Some(&json!(true)) {
        match request.get_mut("stream_options").and_then(Value::as_object_mut) {
            Some(options) => {
                options.insert("include_usage".into(), json!(true));
            }
            None => {
                request.insert("stream_options".into(), json!({"include_usage": true}));
            }
        }
    }
    if let Some(mode) = logprobs_mode {
        request.insert("logprobs_mode".into(), json!(mode));
    }
    Value::Object(request)
}

/// What the network node keeps of an answer: its logprobs, position by position (every
/// streamed event's concatenated), and its usage.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    pub logprobs: Vec<Value>,
    pub prompt_tokens: Option<u64>,
    pub completion_tokens: Option<u64>,
}

impl Answer {
    /// From an answer's body: one JSON object, or server-sent events (`data:` lines, `[DONE]`).
    pub fn read(body: &str) -> Result<Self, String> {
        let objects: Vec<Value> = if body.trim_start().starts_with('{') {
            vec![serde_json::from_str(body).map_err(|e| format!("the answer is not JSON: {e}"))?]
        } else {
            body.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .filter(|d| *d != "[DONE]")
                .map(|d| serde_json::from_str(d).map_err(|e| format!("an event is not JSON: {e}")))
                .collect::<Result<_, _>>()?
        };
        let mut answer = Answer { logprobs: Vec::new(), prompt_tokens: None, completion_tokens: None };
        for object in &objects {
            for choice in object["choices"].as_array().into_iter().flatten() {
                answer.logprobs.extend(choice["logprobs"]["content"].as_array().into_iter().flatten().cloned());
            }
            if let Some(usage) = object.get("usage").filter(|u| u.is_object()) {
                answer.prompt_tokens = usage["prompt_tokens"].as_u64();
                answer.completion_tokens = usage["completion_tokens"].as_u64();
            }
        }
        Ok(answer)
    }

    /// `EnforcedTokens.from_content`: each position's token and its top tokens.
    pub fn enforced_tokens(&self) -> Value {
        let tokens: Vec<Value> = self
            .logprobs
            .iter()
            .map(|p| {
                let top: Vec<Value> =
                    p["top_logprobs"].as_array().into_iter().flatten().map(|t| t["token"].clone()).collect();
                json!({"token": p["token"], "top_tokens": top})
            })
            .collect();
        json!({"tokens": tokens})
    }
}

/// The validator's request: the executor's request rebuilt from the user's `body`, with the
/// executor's tokens enforced, whole (not streamed).
pub fn validation_request(body: &Value, executor: &Answer, seed: i32, logprobs_mode: Option<&str>) -> Value {
    let mut request = executor_request(body, seed, logprobs_mode);
    let object = request.as_object_mut().expect("an object");
    object.insert("enforced_tokens".into(), executor.enforced_tokens());
    object.insert("stream".into(), json!(false));
    object.remove("stream_options");
    request
}

/// A validation's outcome.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// The logprobs compared: valid above [`THRESHOLD`].
    Similarity(f64),
    /// The validator's answer is shorter than the executor's.
    DifferentLength,
    /// A position's token differs.
    DifferentTokens,
    /// The executor claimed more than 3 tokens more than the replay used.
    InflatedTokens,
    /// Exactly one side has logprobs: the executor's answer cannot be checked.
    LogprobsMissing,
}

impl Verdict {
    pub fn is_valid(&self) -> bool {
        matches!(self, Verdict::Similarity(s) if *s > THRESHOLD)
    }
}

/// Judges the validator's replay against the executor's answer.
pub fn judge(executor: &Answer, validator: &Answer) -> Verdict {
    let inflated = |claimed: Option<u64>, replayed: Option<u64>| matches!((claimed, replayed), (Some(c), Some(r)) if c > r && c - r > 3);
    if inflated(executor.prompt_tokens, validator.prompt_tokens)
        || inflated(executor.completion_tokens, validator.completion_tokens)
    {
        return Verdict::InflatedTokens;
    }
    let (original, validation) = (&executor.logprobs, &validator.logprobs);
    if original.is_empty() != validation.is_empty() {
        return Verdict::LogprobsMissing;
    }
    if validation.len() < original.len() {
        return Verdict::DifferentLength;
    }
    if original.iter().zip(validation).any(|(o, v)| o["token"] != v["token"]) {
        return Verdict::DifferentTokens;
    }
    Verdict::Similarity(similarity(original, validation))
}

/// `customSimilarity`: per position, over the validator's top tokens, `|v − o| / (1e-6 + |v| +
/// |o|) / 2`, `o` the executor's logprob of the same token or, where it reported none, one
/// step below its two lowest (100 below its only one); summed over positions and divided by
/// `max(100, positions) × the executor's first top list's length`; 1 minus that, at least 0.
pub fn similarity(original: &[Value], validation: &[Value]) -> f64 {
    if original.is_empty() {
        return 1.0;
    }
    let logprob = |t: &Value| t["logprob"].as_f64().unwrap_or(f64::NAN);
    let mut distance = 0.0;
    for (o, v) in original.iter().zip(validation) {
        let reported: Vec<(&Value, f64)> =
            o["top_logprobs"].as_array().into_iter().flatten().map(|t| (&t["token"], logprob(t))).collect();
        let validated = v["top_logprobs"].as_array().map(Vec::as_slice).unwrap_or_default();
        if reported.is_empty() || validated.is_empty() {
            // Upstream: an error, and the similarity 0.
            return 0.0;
        }
        let mut sorted: Vec<f64> = reported.iter().map(|(_, l)| *l).collect();
        sorted.sort_by(f64::total_cmp);
        let (min1, min2) = if sorted.len() >= 2 { (sorted[0], sorted[1]) } else { (sorted[0], sorted[0] - 100.0) };
        let next = min1 - (min2 - min1);
        for t in validated {
            let value = logprob(t);
            let original = reported.iter().find(|(token, _)| **token == t["token"]).map_or(next, |(_, l)| *l);
            let denom = 1e-6 + value.abs() + original.abs();
            let term = (value - original).abs() / denom / 2.0;
            if !denom.is_nan() && denom != 0.0 && !term.is_nan() {
                distance += term;
            }
        }
    }
    let per_position = original[0]["top_logprobs"].as_array().map_or(0, Vec::len).max(1);
    let distance = distance / (original.len().max(100) * per_position) as f64;
    if !distance.is_finite() { 0.0 } else { (1.0 - distance).max(0.0) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_executor_request_pins_what_validation_reads() {
        let user = json!({"model": "m", "messages": [], "max_completion_tokens": 40, "min_tokens": 90, "n": 3,
                          "stream": true, "stream_options": {"include_usage": false}, "seed": 3,
                          "skip_special_tokens": true});
        let request = executor_request(&user, 77, Some("processed_logprobs"));
        assert_eq!(
            request,
            json!({"model": "m", "messages": [], "max_tokens": 40, "max_completion_tokens": 40, "min_tokens": 40,
                   "n": 1, "stream": true, "stream_options": {"include_usage": true}, "seed": 3,
                   "skip_special_tokens": false, "return_token_ids": true, "logprobs": true, "top_logprobs": 5,
                   "logprobs_mode": "processed_logprobs"})
        );
        // Nothing named: the default budget, the network node's seed, no n, no min_tokens.
        let request = executor_request(&json!({"messages": [], "min_tokens": 0}), 77, None);
        assert_eq!(
            request,
            json!({"messages": [], "max_tokens": 5000, "max_completion_tokens": 5000, "seed": 77,
                   "skip_special_tokens": false, "return_token_ids": true, "logprobs": true, "top_logprobs": 5})
        );
    }

    fn position(token: &str, top: &[(&str, f64)]) -> Value {
        let top: Vec<Value> = top.iter().map(|(t, l)| json!({"token": t, "logprob": l})).collect();
        json!({"token": token, "logprob": top[0]["logprob"], "top_logprobs": top})
    }

    #[test]
    fn similarity_is_upstreams_distance_by_hand() {
        // One position, the same two tokens: distance 0.
        let a = [position("1", &[("1", -0.5), ("2", -1.5)])];
        assert_eq!(similarity(&a, &a), 1.0);
        // The validator's second token unreported by the executor: its logprob is taken one
        // step below the executor's two (-1.5 - 1.0 = -2.5): |(-3) - (-2.5)| / (3 + 2.5) / 2 over
        // max(100, 1) positions × 2.
        let b = [position("1", &[("1", -0.5), ("3", -3.0)])];
        let expected = 1.0 - (0.5 / (1e-6 + 5.5) / 2.0) / 200.0;
        assert!((similarity(&a, &b) - expected).abs() < 1e-12, "{}", similarity(&a, &b));
        // Judged: tokens must agree, the replay may not be shorter, claims not inflated.
        let answer = |logprobs: Vec<Value>, completion| Answer {
            logprobs,
            prompt_tokens: Some(9),
            completion_tokens: Some(completion),
        };
        assert_eq!(judge(&answer(a.to_vec(), 1), &answer(a.to_vec(), 1)), Verdict::Similarity(1.0));
        let other = [position("2", &[("2", -0.5)])];
        assert_eq!(judge(&answer(a.to_vec(), 1), &answer(other.to_vec(), 1)), Verdict::DifferentTokens);
        assert_eq!(judge(&answer(a.to_vec(), 1), &answer(vec![], 1)), Verdict::LogprobsMissing);
        assert_eq!(judge(&answer(a.to_vec(), 8), &answer(a.to_vec(), 4)), Verdict::InflatedTokens);
        assert_eq!(
            judge(&answer([a.to_vec(), a.to_vec()].concat(), 2), &answer(a.to_vec(), 2)),
            Verdict::DifferentLength
        );
        assert!(!Verdict::Similarity(0.9).is_valid() && Verdict::Similarity(0.9001).is_valid());
    }

    #[test]
    fn answers_are_read_whole_or_streamed() {
        let whole = json!({"choices": [{"logprobs": {"content": [position("4", &[("4", -0.1)])]}}],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 1}});
        let answer = Answer::read(&whole.to_string()).unwrap();
        assert_eq!((answer.logprobs.len(), answer.prompt_tokens, answer.completion_tokens), (1, Some(3), Some(1)));
        let events = [
            json!({"choices": [{"delta": {"role": "assistant"}, "logprobs": null}]}),
            json!({"choices": [{"delta": {"content": "ab"}, "logprobs": {"content": [position("4", &[("4", -0.1)]), position("5", &[("5", -0.2)])]}}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        ];
        let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect::<String>() + "data: [DONE]\n\n";
        let streamed = Answer::read(&body).unwrap();
        assert_eq!(
            streamed.logprobs.iter().map(|p| p["token"].clone()).collect::<Vec<_>>(),
            vec![json!("4"), json!("5")]
        );
        assert_eq!(streamed.completion_tokens, Some(2));
        assert_eq!(
            streamed.enforced_tokens(),
            json!({"tokens": [{"token": "4", "top_tokens": ["4"]}, {"token": "5", "top_tokens": ["5"]}]})
        );
    }
}
