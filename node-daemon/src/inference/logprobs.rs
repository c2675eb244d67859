//! What the network's inference validation needs of a chat answer, as gonka's vLLM fork serves
//! it: each generated token's logprob and the top ones beside it, written the fork's way, and a
//! validator's replay of an executor's answer (`enforced_tokens`/`enforced_str`).
//!
//! The network node asks every answer for `logprobs` with `top_logprobs` 5 and a
//! `logprobs_mode`, and keeps the answer. A validator sends the same request with the
//! executor's tokens as `enforced_tokens`, and compares its logprobs with the executor's,
//! position by position (`decentralized-api` `CompareLogits`). Without logprobs an answer
//! cannot be validated at all.

use gonka_inference::sampling::{Choice, LogprobsMode};
use gonka_inference::tokenizer::ChatTokenizer;
use gonka_protocol::openai::{EnforcedTokens, TokenLogprob, TopLogprob};

/// vLLM's default `--max-logprobs`: the most `top_logprobs` a request may ask for.
pub const MAX_TOP_LOGPROBS: i64 = 20;
/// The fork's bound on a replay's tokens (`MAX_ENFORCED_TOKENS`).
pub const MAX_ENFORCED_TOKENS: usize = 32768;
/// The fork's bound on an enforced position's top tokens (`MAX_TOP_TOKENS_PER_POSITION`).
pub const MAX_TOP_TOKENS_PER_POSITION: usize = 64;
/// How vLLM writes minus infinity (and anything below it) in JSON.
const FLOOR: f64 = -9999.0;

/// How many top logprobs each position returns, from `logprobs` and `top_logprobs` as vLLM
/// checks them; `None` when logprobs are off.
pub fn top_count(logprobs: bool, top_logprobs: Option<i64>) -> Result<Option<usize>, String> {
    match top_logprobs {
        Some(n) if n < -1 => Err("`top_logprobs` must be a positive value or -1.".into()),
        Some(n) if n != 0 && !logprobs => Err("when using `top_logprobs`, `logprobs` must be set to true.".into()),
        // -1 asks for the whole vocabulary, which no vocabulary fits under the limit.
        Some(n) if n == -1 || n > MAX_TOP_LOGPROBS => Err(format!(
            "Requested sample logprobs of {}, which is greater than max allowed: {MAX_TOP_LOGPROBS}",
            if n == -1 { "the whole vocabulary".to_string() } else { n.to_string() }
        )),
        n if logprobs => Ok(Some(n.unwrap_or(0) as usize)),
        _ => Ok(None),
    }
}

/// The request's `logprobs_mode`; `raw_logits`/`processed_logits` (logits in place of
/// logprobs) are the fork's too but not served here.
pub fn mode(name: &str) -> Result<LogprobsMode, String> {
    match name {
        "raw_logprobs" => Ok(LogprobsMode::Raw),
        "processed_logprobs" => Ok(LogprobsMode::Processed),
        other => Err(format!(
            "logprobs_mode {other:?} is not served by the native engine (raw_logprobs, processed_logprobs)"
        )),
    }
}

/// A token's entry in an answer's logprobs, as the fork writes it: the id in decimal as the
/// token, its text's UTF-8 as `bytes`, logprobs at no less than -9999, and the top list as
/// vLLM orders it — the chosen token first, then the most likely others, `top` of them in all.
pub fn entry(choice: &Choice, top: usize, tokenizer: &ChatTokenizer) -> TokenLogprob {
    let logprobs = choice.logprobs.as_ref();
    let logprob = logprobs.map_or(f32::NEG_INFINITY, |l| l.logprob);
    let others = logprobs.into_iter().flat_map(|l| l.top.iter().copied()).filter(|&(id, _)| id != choice.token);
    let top_logprobs = std::iter::once((choice.token, logprob))
        .chain(others)
        .take(top)
        .map(|(id, logprob)| {
            let token = id.to_string();
            TopLogprob { bytes: Some(token.as_bytes().to_vec()), token, logprob: floor(logprob) }
        })
        .collect();
    let text = tokenizer.decode(&[choice.token], false).unwrap_or_default();
    TokenLogprob {
        token: choice.token.to_string(),
        logprob: floor(logprob),
        bytes: Some(text.into_bytes()),
        top_logprobs,
    }
}

fn floor(logprob: f32) -> f64 {
    f64::from(logprob).max(FLOOR)
}

/// A replay's token ids, as the fork reads them: `enforced_str` tokenised, or each enforced
/// token's id (its decimal; text otherwise, its first token), every id inside the vocabulary,
/// and the tokenizer's end-of-sequence id added unless the tokens end with it (an answer cut at
/// its length then stops there, one that ended stops at the same place). `None`: no replay.
pub fn enforced_ids(
    tokens: Option<&EnforcedTokens>,
    text: Option<&str>,
    tokenizer: &ChatTokenizer,
    vocab_size: i64,
) -> Result<Option<Vec<i64>>, String> {
    let mut ids = match (text, tokens) {
        (Some(text), _) if !text.is_empty() => tokenizer.encode(text, false).map_err(|e| e.to_string())?,
        (_, Some(enforced)) if !enforced.tokens.is_empty() => {
            if enforced.tokens.len() > MAX_ENFORCED_TOKENS {
                return Err(format!("enforced_tokens holds at most {MAX_ENFORCED_TOKENS} tokens"));
            }
            if enforced.tokens.iter().any(|t| t.top_tokens.len() > MAX_TOP_TOKENS_PER_POSITION) {
                return Err(format!("an enforced token lists at most {MAX_TOP_TOKENS_PER_POSITION} top tokens"));
            }
            let mut ids = Vec::with_capacity(enforced.tokens.len() + 1);
            for (position, token) in enforced.tokens.iter().enumerate() {
                let id = match token.token.parse::<i64>() {
                    Ok(id) => id,
                    Err(_) => {
                        tokenizer.encode(&token.token, false).ok().and_then(|t| t.first().copied()).ok_or_else(
                            || format!("invalid enforced token at position {position}: {:?}", token.token),
                        )?
                    }
                };
                ids.push(id);
            }
            ids
        }
        _ => return Ok(None),
    };
    if let Some((position, id)) = ids.iter().enumerate().find(|(_, id)| !(0..vocab_size).contains(*id)) {
        return Err(format!("invalid enforced token at position {position}: {id} not in [0, {vocab_size})"));
    }
    if let Some(eos) = tokenizer.eos_token_id()
        && ids.last() != Some(&eos)
    {
        ids.push(eos);
    }
    Ok(Some(ids))
}

/// The fork's guess at an executor's logprobs mode when a replay names none: processed
/// logprobs pad a position's top list, past the tokens the sampler kept, with the lowest ids
/// (at -9999), so more than a tenth of the top ids below 4 means processed. `None` with fewer
/// than 10 top ids to judge by.
pub fn detected_mode(tokens: &EnforcedTokens) -> Option<LogprobsMode> {
    let ids: Vec<i64> = tokens.tokens.iter().flat_map(|t| t.top_tokens.iter().filter_map(|t| t.parse().ok())).collect();
    if ids.len() < 10 {
        return None;
    }
    let low = ids.iter().filter(|&&id| id < 4).count();
    Some(if low as f64 / ids.len() as f64 > 0.10 { LogprobsMode::Processed } else { LogprobsMode::Raw })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gonka_inference::sampling::TokenLogprobs;
    use gonka_protocol::openai::EnforcedToken;

    #[test]
    fn top_logprobs_are_checked_as_vllm_checks_them() {
        assert_eq!(top_count(false, None), Ok(None));
        assert_eq!(top_count(true, None), Ok(Some(0)));
        assert_eq!(top_count(true, Some(5)), Ok(Some(5)));
        assert_eq!(top_count(true, Some(20)), Ok(Some(20)));
        assert_eq!(top_count(false, Some(0)), Ok(None));
        assert!(top_count(true, Some(21)).unwrap_err().contains("greater than max allowed: 20"));
        assert!(top_count(true, Some(-1)).unwrap_err().contains("greater than max allowed"));
        assert!(top_count(true, Some(-2)).unwrap_err().contains("positive value or -1"));
        assert!(top_count(false, Some(5)).unwrap_err().contains("`logprobs` must be set to true"));
        assert_eq!(mode("processed_logprobs"), Ok(LogprobsMode::Processed));
        assert!(mode("raw_logits").unwrap_err().contains("not served"));
    }

    fn enforced(tokens: &[(&str, &[&str])]) -> EnforcedTokens {
        EnforcedTokens {
            tokens: tokens
                .iter()
                .map(|(t, top)| EnforcedToken {
                    token: t.to_string(),
                    top_tokens: top.iter().map(|s| s.to_string()).collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn processed_executors_are_told_by_their_padded_top_lists() {
        // Ten positions: two of their top ids below 4 (a fifth) → processed; one → raw.
        let mut positions: Vec<(&str, &[&str])> = vec![("7", &["7"]); 8];
        positions.extend([("5", &["5", "0"][..]), ("6", &["6", "3"][..])]);
        assert_eq!(detected_mode(&enforced(&positions)), Some(LogprobsMode::Processed));
        positions[9] = ("6", &["6", "4"]);
        assert_eq!(detected_mode(&enforced(&positions)), Some(LogprobsMode::Raw));
        assert_eq!(detected_mode(&enforced(&positions[..5])), None);
    }

    #[test]
    fn the_chosen_token_leads_its_top_list() {
        let tokenizer = test_tokenizer();
        let choice = |token| Choice {
            token,
            logprobs: Some(TokenLogprobs { token, logprob: -2.5, top: vec![(4, -0.5), (9, -1.0), (token, -2.5)] }),
        };
        // Drawn third: first, then the two ahead of it.
        let e = entry(&choice(2), 3, &tokenizer);
        let ids: Vec<&str> = e.top_logprobs.iter().map(|t| t.token.as_str()).collect();
        assert_eq!((e.token.as_str(), e.logprob, ids), ("2", -2.5, vec!["2", "4", "9"]));
        assert_eq!(e.top_logprobs[1].bytes, Some(b"4".to_vec()));
        assert_eq!(e.bytes, Some(tokenizer.decode(&[2], false).unwrap().into_bytes()));
        // Outside the top ones: still first, the list cut to its length.
        let outside = Choice {
            token: 7,
            logprobs: Some(TokenLogprobs { token: 7, logprob: f32::NEG_INFINITY, top: vec![(4, -0.5), (9, -1.0)] }),
        };
        let e = entry(&outside, 2, &tokenizer);
        let ids: Vec<&str> = e.top_logprobs.iter().map(|t| t.token.as_str()).collect();
        assert_eq!((e.logprob, ids), (-9999.0, vec!["7", "4"]));
        assert!(entry(&outside, 0, &tokenizer).top_logprobs.is_empty());
    }

    #[test]
    fn a_replay_reads_ids_bounds_them_and_ends_with_end_of_sequence() {
        let tokenizer = test_tokenizer();
        let eos = tokenizer.eos_token_id().unwrap();
        let ids = enforced_ids(Some(&enforced(&[("5", &["5", "6"]), ("6", &[])])), None, &tokenizer, 100).unwrap();
        assert_eq!(ids, Some(vec![5, 6, eos]));
        let eos_text = eos.to_string();
        let ended = enforced(&[("5", &[]), (eos_text.as_str(), &[])]);
        assert_eq!(enforced_ids(Some(&ended), None, &tokenizer, 100).unwrap(), Some(vec![5, eos]));
        let err = enforced_ids(Some(&enforced(&[("5", &[]), ("100", &[])])), None, &tokenizer, 100).unwrap_err();
        assert_eq!(err, "invalid enforced token at position 1: 100 not in [0, 100)");
        assert!(enforced_ids(Some(&enforced(&[("-1", &[])])), None, &tokenizer, 100).is_err());
        // Text: tokenised (a token's text is read as its first token).
        let text = enforced_ids(None, Some("hello"), &tokenizer, 100).unwrap().unwrap();
        assert_eq!(text, [tokenizer.encode("hello", false).unwrap(), vec![eos]].concat());
        assert_eq!(enforced_ids(None, None, &tokenizer, 100), Ok(None));
        assert_eq!(enforced_ids(Some(&enforced(&[])), None, &tokenizer, 100), Ok(None));
        let many = EnforcedTokens { tokens: vec![enforced(&[("1", &[])]).tokens[0].clone(); MAX_ENFORCED_TOKENS + 1] };
        assert!(enforced_ids(Some(&many), None, &tokenizer, 100).unwrap_err().contains("at most 32768"));
    }

    /// A word-level tokenizer of a few words, "</s>" its end of sequence.
    fn test_tokenizer() -> ChatTokenizer {
        let dir = tempfile::tempdir().unwrap();
        let vocab: serde_json::Map<String, serde_json::Value> =
            ["<unk>", "</s>", "hello", "world", "a", "b", "c", "d", "e", "f"]
                .iter()
                .enumerate()
                .map(|(i, w)| (w.to_string(), serde_json::json!(i)))
                .collect();
        let tokenizer = serde_json::json!({
            "version": "1.0",
            "added_tokens": [{"id": 1, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), r#"{"eos_token": "</s>"}"#).unwrap();
        ChatTokenizer::load(dir.path()).unwrap()
    }
}
