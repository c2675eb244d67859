//! The continuous-batching engine on a tiny Qwen3 with its tokenizer: concurrent requests with
//! chunked prefill give what each gives alone (and greedy decoding gives, which matches
//! transformers: tests/reference.rs), stop strings, max tokens and seeds behave as OpenAI's
//! API says, an abandoned request leaves the rest alone, and PoC batches wait for chat.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::run_reference;
use gonka_inference::engine::{Engine, EngineError, EngineOptions, Event, FinishReason, Generation, PocBatch};
use gonka_inference::generate::greedy;
use gonka_inference::poc_v2::{self, Reflections, Round};
use gonka_inference::sampling::{Choice, SamplingParams};
use gonka_inference::tokenizer::ChatTokenizer;
use gonka_inference::{LoadOptions, load};
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;

struct Fixture {
    _dir: tempfile::TempDir,
    dir: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    run_reference("qwen_reference.py", &json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1], "tokenizer": true}));
    Fixture { dir: dir.path().to_path_buf(), _dir: dir }
}

fn start(f: &Fixture, options: EngineOptions) -> Engine {
    let model = load(&f.dir, &LoadOptions::default()).unwrap();
    Engine::start(model, Arc::new(ChatTokenizer::load(&f.dir).unwrap()), options)
}

/// Everything a request produced: its text, how it ended, and its token counts.
async fn collect(mut events: UnboundedReceiver<Event>) -> (String, FinishReason, usize, usize) {
    let mut text = String::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("engine answers")
    {
        match event {
            Event::Token(_) => {}
            Event::Text(piece) => text.push_str(&piece),
            Event::Finished { reason, prompt_tokens, completion_tokens } => {
                return (text, reason, prompt_tokens, completion_tokens);
            }
            Event::Failed(e) => panic!("failed: {e}"),
        }
    }
    panic!("events ended without Finished")
}

fn greedy_params(max_tokens: usize) -> SamplingParams {
    SamplingParams { temperature: 0.0, max_tokens, ignore_eos: true, ..SamplingParams::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_requests_with_chunked_prefill_decode_as_they_would_alone() {
    let f = fixture();
    let tokenizer = ChatTokenizer::load(&f.dir).unwrap();
    let model = load(&f.dir, &LoadOptions::default()).unwrap();
    let prompts = ["Hello, world!", "The quick brown fox jumps over the lazy dog. Kubernetes operators", "café 🚀"];
    let expected: Vec<String> = prompts
        .iter()
        .map(|p| {
            let ids = greedy(&model, &tokenizer.encode(p, false).unwrap(), 12, &[]);
            tokenizer.decode(&ids, true).unwrap()
        })
        .collect();
    // Prompt chunks of at most 5 tokens, all three in flight together.
    let engine = start(&f, EngineOptions { max_step_tokens: 5, ..EngineOptions::default() });
    let receivers: Vec<_> = prompts
        .iter()
        .map(|p| {
            engine
                .generate(Generation { prompt: tokenizer.encode(p, false).unwrap(), params: greedy_params(12) })
                .unwrap()
        })
        .collect();
    for (i, events) in receivers.into_iter().enumerate() {
        let (text, reason, prompt_tokens, completion_tokens) = collect(events).await;
        assert_eq!(text, expected[i], "prompt {i}");
        assert_eq!((reason, completion_tokens), (FinishReason::Length, 12));
        assert_eq!(prompt_tokens, tokenizer.encode(prompts[i], false).unwrap().len());
    }
}

/// DeepSeek-V4 (a sliding, a CSA and an HCA layer) through the scheduler: concurrent chats with
/// chunked prefill, each sequence's token ids reaching its hash-routed experts and its
/// compressors' state kept across chunks and steps, decode as each would alone; a PoC v2 batch
/// queued behind them gives what the direct computation gives.
#[tokio::test(flavor = "multi_thread")]
async fn deepseek_v4_chats_concurrently_and_runs_poc_v2() {
    let dir = tempfile::tempdir().unwrap();
    run_reference(
        "qwen_reference.py",
        &json!({"arch": "deepseek_v4", "dir": dir.path(), "prompt": [1], "tokenizer": true, "compressed": true}),
    );
    let tokenizer = ChatTokenizer::load(dir.path()).unwrap();
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    let prompts = ["Hello, world!", "The quick brown fox jumps over the lazy dog."];
    let encoded: Vec<Vec<i64>> = prompts.iter().map(|p| tokenizer.encode(p, false).unwrap()).collect();
    let expected: Vec<Vec<i64>> = encoded.iter().map(|ids| greedy(&model, ids, 10, &[])).collect();
    let round = Round { block_hash: "abc", public_key: "pk", seq_len: 12, k_dim: 12, stronger_rng: false };
    let direct = poc_v2::compute(&model, &Reflections::new(&model, "abc"), &round, &[1, 2]);
    let engine =
        Engine::start(model, Arc::new(tokenizer), EngineOptions { max_step_tokens: 5, ..EngineOptions::default() });
    let receivers: Vec<_> = encoded
        .iter()
        .map(|ids| engine.generate(Generation { prompt: ids.clone(), params: greedy_params(10) }).unwrap())
        .collect();
    // A PoC v2 batch queued behind the chats (its artifacts against tests/poc_v2.rs' reference).
    let batch = PocBatch {
        block_hash: "abc".into(),
        public_key: "pk".into(),
        seq_len: 12,
        k_dim: 12,
        stronger_rng: false,
        nonces: vec![1, 2],
    };
    let poc = engine.poc(batch).unwrap();
    for (i, events) in receivers.into_iter().enumerate() {
        let (text, reason, _, completion_tokens) = collect(events).await;
        assert_eq!(text, engine.tokenizer().decode(&expected[i], true).unwrap(), "prompt {i}");
        assert_eq!((reason, completion_tokens), (FinishReason::Length, 10));
    }
    let artifacts = tokio::time::timeout(Duration::from_secs(60), poc).await.unwrap().unwrap().unwrap();
    assert_eq!(artifacts.len(), 2);
    assert_eq!(artifacts, direct);
}

/// GLM-5.3-Flash's linear and indexed layers through the scheduler: three chats with prompt
/// chunks of at most 5 tokens in flight together (pools of 4 split across chunks, the shared
/// layer taking each step's choice from the full layer before it, each linear layer's state
/// carried per sequence from chunk to chunk, sequences of different pasts in one step) decode
/// as each would alone (which tests/reference.rs matches with transformers).
#[tokio::test(flavor = "multi_thread")]
async fn glm5_next_chats_concurrently_with_chunked_prefill() {
    let dir = tempfile::tempdir().unwrap();
    run_reference(
        "qwen_reference.py",
        &json!({"arch": "glm5_next", "dir": dir.path(), "prompt": [1], "tokenizer": true, "linear_layers": true}),
    );
    let tokenizer = ChatTokenizer::load(dir.path()).unwrap();
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    let prompts = ["Hello, world!", "The quick brown fox jumps over the lazy dog. Kubernetes operators", "café 🚀"];
    let encoded: Vec<Vec<i64>> = prompts.iter().map(|p| tokenizer.encode(p, false).unwrap()).collect();
    let expected: Vec<Vec<i64>> = encoded.iter().map(|ids| greedy(&model, ids, 12, &[])).collect();
    let engine =
        Engine::start(model, Arc::new(tokenizer), EngineOptions { max_step_tokens: 5, ..EngineOptions::default() });
    let receivers: Vec<_> = encoded
        .iter()
        .map(|ids| engine.generate(Generation { prompt: ids.clone(), params: greedy_params(12) }).unwrap())
        .collect();
    for (i, events) in receivers.into_iter().enumerate() {
        let (text, reason, _, completion_tokens) = collect(events).await;
        assert_eq!(text, engine.tokenizer().decode(&expected[i], true).unwrap(), "prompt {i}");
        assert_eq!((reason, completion_tokens), (FinishReason::Length, 12));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stop_strings_max_tokens_and_seeds() {
    let f = fixture();
    let engine = start(&f, EngineOptions::default());
    let prompt = engine.tokenizer().encode("Proof of compute", false).unwrap();
    let run = |params: SamplingParams| {
        let events = engine.generate(Generation { prompt: prompt.clone(), params }).unwrap();
        collect(events)
    };
    let (full, _, _, _) = run(greedy_params(16)).await;
    assert!(full.chars().count() > 4, "{full:?}");
    // Stop at a piece of the greedy text: the text before it, finish "stop", never the stop
    // string itself (held back while it might be forming).
    let cut = full.char_indices().nth(3).unwrap().0;
    let stop: String = full[cut..].chars().take(2).collect();
    let (text, reason, _, _) = run(SamplingParams { stop: vec![stop.clone()], ..greedy_params(16) }).await;
    assert_eq!(reason, FinishReason::Stop);
    assert_eq!(text, full[..full.find(&stop).unwrap()]);
    // max_tokens.
    let (_, reason, _, completion) = run(greedy_params(3)).await;
    assert_eq!((reason, completion), (FinishReason::Length, 3));
    // A seed repeats a sampled completion; another seed (almost surely) differs.
    let sampled = |seed| SamplingParams { temperature: 1.0, top_p: 0.95, seed: Some(seed), ..greedy_params(16) };
    let (a, _, _, _) = run(sampled(42)).await;
    let (b, _, _, _) = run(sampled(42)).await;
    let (c, _, _, _) = run(sampled(43)).await;
    assert_eq!(a, b);
    assert_ne!(a, c);
    // A stop token id ends the generation where it is sampled, its text not sent: the third
    // greedy token as the stop id gives the first two tokens' text.
    let model = load(&f.dir, &LoadOptions::default()).unwrap();
    let ids = greedy(&model, &prompt, 3, &[]);
    let (text, reason, _, completion) = run(SamplingParams { stop_token_ids: vec![ids[2]], ..greedy_params(16) }).await;
    let first_two = engine.tokenizer().decode(&ids[..2], true).unwrap();
    assert!(!ids[..2].contains(&ids[2]), "the stop id first appears third: {ids:?}");
    assert_eq!((text.as_str(), reason, completion), (first_two.as_str(), FinishReason::Stop, 3));

    // Refusals name the problem.
    assert_eq!(
        engine.generate(Generation { prompt: vec![], params: greedy_params(1) }).unwrap_err(),
        EngineError::EmptyPrompt
    );
    let long = vec![1; engine.max_model_len() as usize];
    assert!(matches!(
        engine.generate(Generation { prompt: long, params: greedy_params(1) }).unwrap_err(),
        EngineError::PromptTooLong { .. }
    ));
    assert_eq!(
        engine.generate(Generation { prompt: vec![1, 100_000], params: greedy_params(1) }).unwrap_err(),
        EngineError::TokenOutOfRange(100_000)
    );
}

/// Every token a request chose, with its logprobs, and how it ended.
async fn collect_choices(mut events: UnboundedReceiver<Event>) -> (Vec<Choice>, FinishReason) {
    let mut choices = Vec::new();
    while let Some(event) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await.expect("engine answers")
    {
        match event {
            Event::Token(choice) => choices.push(choice),
            Event::Finished { reason, .. } => return (choices, reason),
            Event::Failed(e) => panic!("failed: {e}"),
            Event::Text(_) => {}
        }
    }
    panic!("events ended without Finished")
}

/// log_softmax of a row of transformers' logits, in float64.
fn log_softmax(row: &[f64]) -> Vec<f64> {
    let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let norm = max + row.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
    row.iter().map(|l| l - norm).collect()
}

/// The logprobs a sampled answer reports are transformers' log_softmax at each position of the
/// sequence it made (the token's and the five most likely), and a replay of those tokens
/// (a validator's, at another temperature and seed) chooses them again and reports the same;
/// a replayed token the model would not have chosen is still emitted, at its own logprob.
#[tokio::test(flavor = "multi_thread")]
async fn logprobs_are_transformers_and_a_replay_reports_them_again() {
    let f = fixture();
    let tokenizer = ChatTokenizer::load(&f.dir).unwrap();
    let prompt = tokenizer.encode("Hello, world! How are you today?", false).unwrap();
    let engine = start(&f, EngineOptions::default());
    let sampled = SamplingParams {
        temperature: 1.0,
        seed: Some(3),
        max_tokens: 8,
        ignore_eos: true,
        logprobs: Some(5),
        ..SamplingParams::default()
    };
    let generate = |params: SamplingParams| engine.generate(Generation { prompt: prompt.clone(), params }).unwrap();
    let (executed, reason) = collect_choices(generate(sampled.clone())).await;
    assert_eq!((executed.len(), reason), (8, FinishReason::Length));
    let tokens: Vec<i64> = executed.iter().map(|c| c.token).collect();

    // transformers on the whole sequence: the logits before each generated token.
    let other = tempfile::tempdir().unwrap();
    let sequence = [prompt.clone(), tokens.clone()].concat();
    let reference = run_reference(
        "qwen_reference.py",
        &json!({"arch": "qwen3", "dir": other.path(), "prompt": sequence, "tokenizer": true}),
    );
    let logits: Vec<Vec<f64>> = serde_json::from_value(reference["logits"].clone()).unwrap();
    let mut drawn_below_the_top = 0;
    for (i, choice) in executed.iter().enumerate() {
        let expected = log_softmax(&logits[prompt.len() - 1 + i]);
        let lp = choice.logprobs.as_ref().unwrap();
        assert!((f64::from(lp.logprob) - expected[choice.token as usize]).abs() < 1e-4, "position {i}");
        let mut order: Vec<usize> = (0..expected.len()).collect();
        order.sort_by(|&a, &b| expected[b].total_cmp(&expected[a]));
        let top: Vec<i64> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(top, order[..5].iter().map(|&t| t as i64).collect::<Vec<_>>(), "position {i}");
        for &(id, logprob) in &lp.top {
            assert!((f64::from(logprob) - expected[id as usize]).abs() < 1e-4, "position {i}, token {id}");
        }
        drawn_below_the_top += usize::from(top[0] != choice.token);
    }
    // Sampling at temperature 1 drew something other than the argmax at least once, so the
    // token's own logprob was read where it is not the largest.
    assert!(drawn_below_the_top > 0, "{tokens:?}");

    // The validator's replay: the same tokens and logprobs, whatever its temperature and seed.
    // Its tokens are prefilled at once (then in chunks of 5, a prompt's boundary inside one),
    // where the executor decoded them one by one: the same numbers to float32's rounding.
    let same = |a: &[Choice], b: &[Choice]| {
        assert_eq!(a.iter().map(|c| c.token).collect::<Vec<_>>(), b.iter().map(|c| c.token).collect::<Vec<_>>());
        for (a, b) in a.iter().zip(b) {
            let (a, b) = (a.logprobs.as_ref().unwrap(), b.logprobs.as_ref().unwrap());
            assert!((a.logprob - b.logprob).abs() < 1e-5, "{a:?} {b:?}");
            assert_eq!(a.top.iter().map(|t| t.0).collect::<Vec<_>>(), b.top.iter().map(|t| t.0).collect::<Vec<_>>());
            assert!(a.top.iter().zip(&b.top).all(|(x, y)| (x.1 - y.1).abs() < 1e-5), "{a:?} {b:?}");
        }
    };
    let replay = SamplingParams { temperature: 0.3, seed: Some(99), enforced: tokens.clone(), ..sampled.clone() };
    let (replayed, _) = collect_choices(generate(replay.clone())).await;
    same(&replayed, &executed);
    let chunked = start(&f, EngineOptions { max_step_tokens: 5, ..EngineOptions::default() });
    let events = chunked.generate(Generation { prompt: prompt.clone(), params: replay.clone() }).unwrap();
    same(&collect_choices(events).await.0, &executed);
    // And at most 3 positions' logits a step.
    let bounded = start(&f, EngineOptions { max_replay_rows: 3, ..EngineOptions::default() });
    let events = bounded.generate(Generation { prompt: prompt.clone(), params: replay.clone() }).unwrap();
    same(&collect_choices(events).await.0, &executed);
    // A replay shorter than max_tokens goes on from its last token as a generation does.
    let half = SamplingParams { enforced: tokens[..4].to_vec(), temperature: 0.0, ..sampled.clone() };
    let (went_on, _) = collect_choices(generate(half)).await;
    let greedy_after =
        greedy(&load(&f.dir, &LoadOptions::default()).unwrap(), &[&prompt[..], &tokens[..4]].concat(), 4, &[]);
    assert_eq!(went_on.iter().map(|c| c.token).collect::<Vec<_>>(), [&tokens[..4], &greedy_after[..]].concat());

    // A replayed token the model ranks low is emitted all the same, at its own logprob; the
    // positions after it see it in their past.
    let mut corrupted = tokens.clone();
    let least =
        (0..logits[0].len()).min_by(|&a, &b| logits[prompt.len() + 1][a].total_cmp(&logits[prompt.len() + 1][b]));
    corrupted[2] = least.unwrap() as i64;
    let (replayed, _) = collect_choices(generate(SamplingParams { enforced: corrupted.clone(), ..sampled })).await;
    assert_eq!(replayed.iter().map(|c| c.token).collect::<Vec<_>>(), corrupted);
    let at = |i: usize| f64::from(replayed[i].logprobs.as_ref().unwrap().logprob);
    let expected = log_softmax(&logits[prompt.len() + 1]);
    assert!((at(2) - expected[corrupted[2] as usize]).abs() < 1e-4);
    same(&replayed[..2], &executed[..2]);
    assert!((at(3) - f64::from(executed[3].logprobs.as_ref().unwrap().logprob)).abs() > 1e-3);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_request_leaves_the_others_alone() {
    let f = fixture();
    let engine = start(&f, EngineOptions::default());
    let prompt = engine.tokenizer().encode("Hello", false).unwrap();
    let abandoned = engine.generate(Generation { prompt: prompt.clone(), params: greedy_params(200) }).unwrap();
    let kept = engine.generate(Generation { prompt: prompt.clone(), params: greedy_params(20) }).unwrap();
    drop(abandoned);
    let (_, reason, _, completion) = collect(kept).await;
    assert_eq!((reason, completion), (FinishReason::Length, 20));
    // Nothing is left counted: the load reads idle.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while engine.load().running() + engine.load().waiting() + engine.load().poc_waiting() > 0 {
        assert!(std::time::Instant::now() < deadline, "the engine's load never read idle");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn poc_batches_wait_for_chat_and_match_the_direct_computation() {
    let f = fixture();
    let engine = start(&f, EngineOptions::default());
    let prompt = engine.tokenizer().encode("Hello", false).unwrap();
    let mut chat = engine.generate(Generation { prompt, params: greedy_params(60) }).unwrap();
    let batch = PocBatch {
        block_hash: "abc".into(),
        public_key: "pk".into(),
        seq_len: 8,
        k_dim: 12,
        stronger_rng: false,
        nonces: vec![1, 2, 3],
    };
    let mut poc = engine.poc(batch).unwrap();
    // While chat still decodes the batch is not done: whenever it is, chat's Finished was sent
    // before it (one engine thread) and is already in chat's channel.
    let mut early = None;
    let completion = loop {
        let event = tokio::time::timeout(Duration::from_secs(60), chat.recv()).await.unwrap().unwrap();
        if let Event::Finished { completion_tokens, .. } = event {
            break completion_tokens;
        }
        if let Ok(result) = poc.try_recv() {
            let mut queued = Vec::new();
            while let Ok(e) = chat.try_recv() {
                queued.push(e);
            }
            early = Some(result);
            break queued
                .iter()
                .find_map(|e| match e {
                    Event::Finished { completion_tokens, .. } => Some(*completion_tokens),
                    _ => None,
                })
                .expect("the PoC batch ran while chat still decoded");
        }
    };
    assert_eq!(completion, 60);
    let artifacts = match early {
        Some(result) => result,
        None => poc.await.unwrap(),
    }
    .unwrap();
    // What the engine computed is what poc_v2 computes on the same model.
    let model = load(&f.dir, &LoadOptions::default()).unwrap();
    let round = Round { block_hash: "abc", public_key: "pk", seq_len: 8, k_dim: 12, stronger_rng: false };
    let direct = poc_v2::compute(&model, &Reflections::new(&model, "abc"), &round, &[1, 2, 3]);
    assert_eq!(artifacts, direct);
    // Shapes the model cannot take are refused before queueing.
    let too_long = PocBatch {
        block_hash: "abc".into(),
        public_key: "pk".into(),
        seq_len: 100_000,
        k_dim: 12,
        stronger_rng: false,
        nonces: vec![1],
    };
    assert!(matches!(engine.poc(too_long), Err(EngineError::PocShape { .. })));
}

/// With a KV-cache budget for one sequence's prompt and max_tokens, a second waits for the
/// first to finish (and then decodes as it would alone); one that could never fit is refused.
#[tokio::test(flavor = "multi_thread")]
async fn sequences_are_admitted_within_the_kv_cache_budget() {
    let f = fixture();
    let probe = start(&f, EngineOptions::default());
    let per_token = probe.spec().kv_bytes_per_token();
    let tokenizer = ChatTokenizer::load(&f.dir).unwrap();
    let (a_prompt, b_prompt) =
        (tokenizer.encode("Hello, world!", false).unwrap(), tokenizer.encode("café 🚀", false).unwrap());
    let (a_tokens, b_tokens) = (a_prompt.len() + 30, b_prompt.len() + 10);
    let alone =
        collect(probe.generate(Generation { prompt: b_prompt.clone(), params: greedy_params(10) }).unwrap()).await;
    drop(probe);

    // Room for the larger of the two, not for both.
    let budget = a_tokens.max(b_tokens) as u64 * per_token;
    assert!(budget < (a_tokens + b_tokens) as u64 * per_token);
    let engine = start(&f, EngineOptions { kv_cache_bytes: Some(budget), ..EngineOptions::default() });
    let mut a = engine.generate(Generation { prompt: a_prompt.clone(), params: greedy_params(30) }).unwrap();
    let b = engine.generate(Generation { prompt: b_prompt, params: greedy_params(10) }).unwrap();
    // Whenever B has produced anything, A's Finished was sent before it (one engine thread):
    // it is already in A's channel.
    let mut a_finished = false;
    while !a_finished {
        let event = tokio::time::timeout(Duration::from_secs(60), a.recv()).await.unwrap().unwrap();
        a_finished = matches!(event, Event::Finished { .. });
        if !a_finished && !b.is_empty() {
            let mut queued = Vec::new();
            while let Ok(e) = a.try_recv() {
                queued.push(e);
            }
            assert!(
                queued.iter().any(|e| matches!(e, Event::Finished { .. })),
                "B ran while A still decoded, beyond the KV-cache budget"
            );
            a_finished = true;
        }
    }
    assert_eq!(collect(b).await, alone, "B, admitted late, decodes as it does alone");
    assert!(engine.load().kv_reserved() <= budget);

    // One sequence larger than the whole budget is refused, naming both sizes.
    let refused = engine.generate(Generation { prompt: a_prompt.clone(), params: greedy_params(100) });
    let tokens = (a_prompt.len() + 100) as i64;
    assert_eq!(
        refused.unwrap_err(),
        EngineError::KvCacheTooSmall { tokens, needed: tokens as u64 * per_token, budget }
    );
}

/// The per-token size admission counts is what a cache really holds: a sequence cache of five
/// tokens, filled by a five-token prompt, takes five times it.
#[test]
fn the_kv_bytes_admission_counts_are_the_bytes_a_cache_holds() {
    let f = fixture();
    let model = load(&f.dir, &LoadOptions::default()).unwrap();
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(5);
    let mut step = [gonka_inference::batch::Step {
        input: gonka_inference::batch::StepInput::Tokens(vec![1, 2, 3, 4, 5]),
        cache: Some(&mut cache),
    }];
    let _ = model.forward(&mut step, None, gonka_inference::batch::Output::Last);
    assert_eq!(cache.len(), 5);
    assert!(model.spec.kv_bytes_per_token() > 0);
    assert_eq!(cache.bytes() as u64, 5 * model.spec.kv_bytes_per_token());
}
