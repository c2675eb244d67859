//! The engine against transformers: tiny random Qwen2 / Qwen3 / Qwen3-MoE checkpoints written
//! by `tests/reference/qwen_reference.py`, loaded here from disk; the logits of every prompt
//! position must match transformers' forward of the same weights, and greedy decoding (ours
//! through the KV cache, theirs recomputing the whole sequence) must match token for token.

mod common;

use std::path::Path;

use common::run_reference;
use gonka_inference::generate::greedy;
use gonka_inference::model::{fp8_widened_bytes, layer_bytes, weight_bytes};
use gonka_inference::placement;
use gonka_inference::{LoadOptions, Output, Step, StepInput, Transformer, load};
use serde_json::{Value, json};
use tch::{Kind, Tensor};

const PROMPT: [i64; 7] = [1, 5, 9, 200, 7, 64, 311];

fn to_tensor(rows: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(rows.clone()).unwrap();
    let flat: Vec<f32> = rows.iter().flatten().copied().collect();
    Tensor::from_slice(&flat).view([rows.len() as i64, -1])
}

/// Writes a tiny checkpoint into `dir` and returns what transformers makes of it.
fn reference_json(request: Value) -> Value {
    run_reference("qwen_reference.py", &request)
}

/// transformers' logits of the prompt and greedy tokens.
fn reference(request: Value) -> (Tensor, Vec<i64>) {
    let v = reference_json(request);
    (to_tensor(&v["logits"]), serde_json::from_value(v["greedy"].clone()).unwrap())
}

fn prompt_logits(model: &Transformer, prompt: &[i64]) -> Tensor {
    let _guard = tch::no_grad_guard();
    let mut steps = [Step { input: StepInput::Tokens(prompt.to_vec()), cache: None }];
    let hidden = model.forward(&mut steps, None, Output::All);
    model.logits(&hidden).to_kind(Kind::Float)
}

/// Largest difference relative to the reference's largest logit.
fn relative_error(ours: &Tensor, theirs: &Tensor) -> f64 {
    assert_eq!(ours.size(), theirs.size());
    let diff = (ours - theirs).abs().max().double_value(&[]);
    diff / theirs.abs().max().double_value(&[]).max(1.0)
}

fn check(arch: &str, extra: Value, tolerance: f64) -> (tempfile::TempDir, Transformer) {
    check_prompt(arch, &PROMPT, 10, extra, tolerance)
}

/// Ours against transformers on `prompt`: every position's logits, then `max_new` greedy tokens.
fn check_prompt(
    arch: &str,
    prompt: &[i64],
    max_new: usize,
    extra: Value,
    tolerance: f64,
) -> (tempfile::TempDir, Transformer) {
    let dir = tempfile::tempdir().unwrap();
    let mut request = json!({"arch": arch, "dir": dir.path(), "prompt": prompt, "max_new": max_new, "seed": 7});
    request.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (theirs, their_tokens) = reference(request);
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    let ours = prompt_logits(&model, prompt);
    let error = relative_error(&ours, &theirs);
    assert!(error < tolerance, "{arch}: logits differ from transformers' by {error:e} (tolerance {tolerance:e})");
    assert_eq!(greedy(&model, prompt, max_new, &[]), their_tokens, "{arch}: greedy tokens");
    (dir, model)
}

#[test]
fn qwen2_with_yarn_in_transformers_4_spelling_matches_transformers() {
    // Sharded (index.json), rope_theta + rope_scaling {"type": "yarn"} as Qwen2.5 ships.
    let (dir, model) = check("qwen2", json!({"shard_size": "100KB", "old_config_spelling": true}), 1e-5);
    assert!(dir.path().join("model.safetensors.index.json").is_file());
    assert_eq!(model.spec.layers, 3);
}

/// YaRN past the context it stretches (`original_max_position_embeddings` 64 in the tiny
/// Qwen2): a 100-token prompt and 20 greedy tokens, positions up to 119.
#[test]
fn qwen2_yarn_past_the_original_context_matches_transformers() {
    let prompt: Vec<i64> = (0..100).map(|i| (i * 37 + 11) % 320).collect();
    check_prompt("qwen2", &prompt, 20, json!({}), 1e-5);
}

#[test]
fn qwen3_tied_matches_transformers() {
    let (dir, _) = check("qwen3", json!({}), 1e-5);
    assert!(dir.path().join("model.safetensors").is_file());
}

#[test]
fn qwen3_moe_matches_transformers() {
    check("qwen3_moe", json!({"shard_size": "100KB"}), 1e-5);
}

/// Where libgomp's spinning is bounded (the daemon and the bench on the CPU) the engine's own
/// CPU kernels run on several threads: a fresh prompt's causal attention (`cpu_attention`, heads
/// of 32 values here) and a MoE's packed experts. The same comparisons with transformers there.
#[test]
fn with_libgomp_spin_bounded_the_cpu_kernels_match_transformers() {
    if !common::with_spin_bounded("with_libgomp_spin_bounded_the_cpu_kernels_match_transformers") {
        return;
    }
    assert!(gonka_inference::cpu_attention::supports(32), "the attention kernel takes these heads");
    // Long enough for threads of ours (`cpu_threads::threads_for`), and past a tile and a block.
    let prompt: Vec<i64> = (0..40).map(|i| (i * 37 + 3) % 300).collect();
    for arch in ["qwen3", "minimax_m2"] {
        check_prompt(arch, &prompt, 4, json!({}), 1e-5);
    }
}

/// MiniMax-M2 as transformers 5.23 writes and runs it: partial rotary, q/k norms over all
/// heads, the sigmoid router whose correction bias (non-zero here) picks the experts, Mixtral's
/// expert names under `block_sparse_moe`.
#[test]
fn minimax_m2_matches_transformers() {
    let (dir, model) = check("minimax_m2", json!({"shard_size": "100KB"}), 1e-5);
    assert_eq!((model.spec.head_dim, model.spec.layers), (32, 3));
    assert_eq!(fp8_widened_bytes(dir.path(), None).unwrap(), 0, "nothing to widen unquantised");
    // Placed by a plan over two CPU "devices" with room for a little over half the weights
    // each (the arithmetic a GPU placement runs): split, and the same logits.
    let bytes = layer_bytes(dir.path(), None).unwrap();
    let room = bytes.total() / 2 + bytes.layers[0];
    let runs = placement::plan(&bytes, 0, &[room, room]).unwrap().layers_per_device();
    assert!(runs.len() == 2 && runs.iter().all(|&n| n > 0) && runs.iter().sum::<usize>() == 3, "{runs:?}");
    let options = |runs: Vec<usize>| LoadOptions {
        devices: vec![tch::Device::Cpu, tch::Device::Cpu],
        layers_per_device: Some(runs),
        ..LoadOptions::default()
    };
    let placed = load(dir.path(), &options(runs)).unwrap();
    assert!(prompt_logits(&placed, &PROMPT).equal(&prompt_logits(&model, &PROMPT)));
    // Runs that do not cover the layers are refused, not guessed at.
    let refused = load(dir.path(), &options(vec![1, 1])).err().expect("two of three layers placed");
    assert!(
        refused.to_string().contains("a placement of 2 layers over 2 devices for a model of 3 layers"),
        "{refused}"
    );
}

/// DeepSeek-V4 on its sliding-window layers as transformers 5.23 writes and runs it (eager
/// attention: its sinks): hyper-connected streams, shared-KV attention with sinks, a window of 4
/// that the 7-token prompt and the 10 greedy tokens pass, the grouped output projection, the
/// hash-routed first layer and clamped SwiGLUs; decoding through the cache against
/// transformers' recompute of the whole sequence.
#[test]
fn deepseek_v4_sliding_layers_match_transformers() {
    let (_dir, model) = check("deepseek_v4", json!({"shard_size": "100KB"}), 1e-5);
    assert_eq!((model.spec.head_dim, model.spec.kv_heads, model.spec.layers), (64, 1, 3));
    // Two sequences in one step, one of them with a past in its cache (as the scheduler batches
    // a prompt with a decode): each token's ids reach its own hash-routed experts, each
    // sequence attends its own keys, and the logits are those of each alone.
    let _guard = tch::no_grad_guard();
    let other: Vec<i64> = (0..9).map(|i| (i * 53 + 17) % 320).collect();
    let mut cache = model.new_cache(32);
    let mut first = [Step { input: StepInput::Tokens(PROMPT[..5].to_vec()), cache: Some(&mut cache) }];
    let cached = model.logits(&model.forward(&mut first, None, Output::All));
    assert!(relative_error(&cached, &prompt_logits(&model, &PROMPT[..5])) < 1e-5, "a prompt kept in the cache");
    let mut both = [
        Step { input: StepInput::Tokens(other.clone()), cache: None },
        Step { input: StepInput::Tokens(PROMPT[5..].to_vec()), cache: Some(&mut cache) },
    ];
    let together = model.logits(&model.forward(&mut both, None, Output::All));
    let alone = Tensor::cat(&[prompt_logits(&model, &other), prompt_logits(&model, &PROMPT).narrow(0, 5, 2)], 0);
    assert!(relative_error(&together, &alone) < 1e-5, "batched with a cached sequence");
}

/// DeepSeek-V4's compressed layers as transformers 5.23 runs them: a sliding, a CSA (an entry
/// per 4 tokens, the indexer keeping 2 of up to 13) and an HCA layer (an entry per 8), rotating
/// with YaRN; a 40-token prompt, then 12 greedy tokens through the cache (windows closing while
/// decoding), and the prompt fed in three chunks that leave windows open between them.
#[test]
fn deepseek_v4_compressed_layers_match_transformers() {
    let prompt: Vec<i64> = (0..40).map(|i| (i * 37 + 11) % 320).collect();
    let (_dir, model) = check_prompt("deepseek_v4", &prompt, 12, json!({"compressed": true}), 1e-5);
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache(64);
    let chunked: Vec<Tensor> = [&prompt[..13], &prompt[13..30], &prompt[30..]]
        .iter()
        .map(|chunk| {
            let mut step = [Step { input: StepInput::Tokens(chunk.to_vec()), cache: Some(&mut cache) }];
            model.logits(&model.forward(&mut step, None, Output::All))
        })
        .collect();
    let error = relative_error(&Tensor::cat(&chunked, 0), &prompt_logits(&model, &prompt));
    assert!(error < 1e-5, "chunked prefill off by {error:e}");
    // What a sequence's cache holds, against what admission reserves for it: within the
    // reservation with windows left open (37 tokens), and for every 40 tokens more, exactly 10
    // CSA and 5 HCA entries (40 and 80 tokens close every window): the keys held stay the
    // window's 3 per layer, however long the sequence.
    let held = |n: usize| {
        let long: Vec<i64> = (0..n as i64).map(|i| (i * 53 + 7) % 320).collect();
        let mut cache = model.new_cache(n as i64);
        let mut step = [Step { input: StepInput::Tokens(long), cache: Some(&mut cache) }];
        let _ = model.forward(&mut step, None, Output::Last);
        cache.bytes() as u64
    };
    let spec = &model.spec;
    for n in [37, 40, 80] {
        assert!(
            held(n) <= spec.kv_bytes_for(n as u64),
            "{n} tokens: {} held, {} reserved",
            held(n),
            spec.kv_bytes_for(n as u64)
        );
    }
    assert_eq!(held(80) - held(40), spec.kv_bytes_for(80) - spec.kv_bytes_for(40));
    assert_eq!(spec.kv_bytes_for(80) - spec.kv_bytes_for(40), (10 * (64 + 32) + 5 * 64) * 4);
    // The window's keys: 3 a layer (the one key head kept once: it is the values too), 2 for a
    // sequence of 2 tokens.
    assert_eq!(spec.kv_bytes_for(2), 2 * 3 * 64 * 4 + spec.kv_bytes_for(0));
    assert_eq!(spec.kv_bytes_for(3), 3 * 3 * 64 * 4 + spec.kv_bytes_for(0));
    assert_eq!(spec.kv_bytes_for(4), spec.kv_bytes_for(3) + (64 + 32) * 4, "a CSA entry, no more keys");
}

/// Steps through the cache against `prompt` run whole (`model`'s logits at every position):
/// the prompt fed in chunks ending at `chunk_ends`; after its first `split` tokens were cached,
/// its rest one token a step (as decoding feeds it); and its rest batched beside a fresh
/// sequence of 19 tokens run without a cache.
fn check_cached_steps(model: &Transformer, prompt: &[i64], chunk_ends: &[usize], split: usize, what: &str) {
    let whole = prompt_logits(model, prompt);
    let mut cache = model.new_cache(64);
    let mut start = 0;
    let chunked: Vec<Tensor> = chunk_ends
        .iter()
        .chain([&prompt.len()])
        .map(|&end| {
            let chunk = prompt[std::mem::replace(&mut start, end)..end].to_vec();
            let mut step = [Step { input: StepInput::Tokens(chunk), cache: Some(&mut cache) }];
            model.logits(&model.forward(&mut step, None, Output::All))
        })
        .collect();
    let error = relative_error(&Tensor::cat(&chunked, 0), &whole);
    assert!(error < 1e-5, "{what}: chunked prefill off by {error:e}");
    let rest = (prompt.len() - split) as i64;
    let mut cache = model.new_cache(64);
    let mut first = [Step { input: StepInput::Tokens(prompt[..split].to_vec()), cache: Some(&mut cache) }];
    let _ = model.forward(&mut first, None, Output::Last);
    let stepped: Vec<Tensor> = prompt[split..]
        .iter()
        .map(|&token| {
            let mut step = [Step { input: StepInput::Tokens(vec![token]), cache: Some(&mut cache) }];
            model.logits(&model.forward(&mut step, None, Output::All))
        })
        .collect();
    let error = relative_error(&Tensor::cat(&stepped, 0), &whole.narrow(0, split as i64, rest));
    assert!(error < 1e-5, "{what}: a token a step off by {error:e}");
    let other: Vec<i64> = (0..19).map(|i| (i * 53 + 17) % 320).collect();
    let mut cache = model.new_cache(64);
    let mut first = [Step { input: StepInput::Tokens(prompt[..split].to_vec()), cache: Some(&mut cache) }];
    let _ = model.forward(&mut first, None, Output::Last);
    let mut both = [
        Step { input: StepInput::Tokens(other.clone()), cache: None },
        Step { input: StepInput::Tokens(prompt[split..].to_vec()), cache: Some(&mut cache) },
    ];
    let together = model.logits(&model.forward(&mut both, None, Output::All));
    let alone = Tensor::cat(&[prompt_logits(model, &other), whole.narrow(0, split as i64, rest)], 0);
    let error = relative_error(&together, &alone);
    assert!(error < 1e-5, "{what}: batched with a cached sequence, off by {error:e}");
}

/// GLM-5.3-Flash's language model as transformers 5.23 runs it, its indexed attention layers
/// (MLA without rotary, sparse over pools of 4 tokens, layers 1 and 3 reusing the choice before
/// them; a dense layer, then group-limited experts) in a multimodal checkpoint whose vision
/// tower is not loaded: a 30-token prompt (up to 7 complete pools, 2 picked per query), 10 greedy
/// tokens through the cache (pools closing while decoding), the prompt fed in chunks that split
/// pools, and batched beside a sequence with a past.
#[test]
fn glm5_next_indexed_layers_match_transformers() {
    let prompt: Vec<i64> = (0..30).map(|i| (i * 37 + 11) % 320).collect();
    let (dir, model) = check_prompt("glm5_next", &prompt, 10, json!({}), 1e-5);
    let _guard = tch::no_grad_guard();
    // Chunks that split pools; a fresh sequence beside one with a past, each choosing among its
    // own pools.
    check_cached_steps(&model, &prompt, &[6, 17], 21, "glm5_next");
    // The cache: a latent of 32 a token on every layer, the indexer's 2 × 32 beside it on the
    // two full layers; the budget counts the widest row on all four (an upper bound).
    let spec = &model.spec;
    assert_eq!(spec.kv_bytes_for(30), 30 * 4 * (32 + 64) * 4);
    let mut exact = model.new_cache(30);
    let _ = model.forward(
        &mut [Step { input: StepInput::Tokens(prompt.clone()), cache: Some(&mut exact) }],
        None,
        Output::Last,
    );
    assert_eq!(exact.bytes(), 30 * (4 * 32 + 2 * 64) * 4);
    // The vision tower's weights are not counted: the embedding alone outside the layers, and
    // the LM head with the final norm.
    let bytes = layer_bytes(dir.path(), None).unwrap();
    assert_eq!((bytes.embedding, bytes.head, bytes.layers.len()), (320 * 64 * 4, (320 * 64 + 64) * 4, 4));
}

/// GLM-5.3-Flash's linear layers (Kimi Delta Attention) among its indexed ones, as transformers
/// 5.23 runs them (prefilling with its chunked form, decoding with its recurrent one): six layers,
/// linear, indexed, linear, linear, indexed and a last indexed one reusing the choice of the one
/// before, with the released model's bounded forget gate and, second, the softplus one. A
/// 30-token prompt and 10 greedy tokens through the cache; the prompt fed in chunks (the
/// convolution's and the recurrence's state carried between them); batched beside a sequence
/// with a past; and the cache's bytes, a fixed state per linear layer and sequence.
#[test]
fn glm5_next_linear_layers_match_transformers() {
    let prompt: Vec<i64> = (0..30).map(|i| (i * 41 + 7) % 320).collect();
    for extra in [json!({"linear_layers": true}), json!({"linear_layers": true, "lower_bound": null})] {
        let (_dir, model) = check_prompt("glm5_next", &prompt, 10, extra.clone(), 1e-5);
        let _guard = tch::no_grad_guard();
        check_cached_steps(&model, &prompt, &[1, 3, 17], 21, &extra.to_string());
        let other: Vec<i64> = (0..19).map(|i| (i * 53 + 17) % 320).collect();
        // Two fresh prompts of one length in one step (the linear layers run them side by side
        // as heads of one), each keeping its state, then a token each: as each alone.
        let mut first_cache = model.new_cache(16);
        let mut second_cache = model.new_cache(16);
        let mut fresh = [
            Step { input: StepInput::Tokens(prompt[..12].to_vec()), cache: Some(&mut first_cache) },
            Step { input: StepInput::Tokens(other[..12].to_vec()), cache: Some(&mut second_cache) },
        ];
        let prompts = model.logits(&model.forward(&mut fresh, None, Output::All));
        let mut next = [
            Step { input: StepInput::Tokens(vec![prompt[12]]), cache: Some(&mut first_cache) },
            Step { input: StepInput::Tokens(vec![other[12]]), cache: Some(&mut second_cache) },
        ];
        let decoded = model.logits(&model.forward(&mut next, None, Output::All));
        let (a, b) = (prompt_logits(&model, &prompt[..13]), prompt_logits(&model, &other[..13]));
        let alone = Tensor::cat(&[a.narrow(0, 0, 12), b.narrow(0, 0, 12), a.narrow(0, 12, 1), b.narrow(0, 12, 1)], 0);
        let error = relative_error(&Tensor::cat(&[prompts, decoded], 0), &alone);
        assert!(error < 1e-5, "{extra}: fresh prompts side by side, then decoded, off by {error:e}");
        // The three indexed layers keep a latent of 32 a token, and the indexer's 2 × 32 on
        // their two full ones (the budget counts the widest on all three); each of the three
        // linear layers keeps, whatever the length, 2 heads' 32 × 32 float32 state and the
        // convolution's last 3 inputs of q, k and v (3 × 64 channels).
        let state = 3 * (2 * 32 * 32 + 3 * 3 * 64) * 4;
        let spec = &model.spec;
        assert_eq!(spec.kv_bytes_for(30), 30 * 3 * (32 + 64) * 4 + state);
        let mut exact = model.new_cache(30);
        let _ = model.forward(
            &mut [Step { input: StepInput::Tokens(prompt.clone()), cache: Some(&mut exact) }],
            None,
            Output::Last,
        );
        assert_eq!(exact.bytes() as u64, 30 * (3 * 32 + 2 * 64) * 4 + state);
    }
}

/// DeepSeek-V4 in its released tensor names (no `model.` prefix, `embed`, `hc_head_fn`…, an
/// `mtp.` module after the layers), which transformers reads through its conversion mapping:
/// the same logits, and the bytes sorted where loading puts them.
#[test]
fn deepseek_v4_in_the_released_tensor_names_matches_transformers() {
    let (dir, _) = check("deepseek_v4", json!({"released_spelling": true}), 1e-5);
    let released = layer_bytes(dir.path(), None).unwrap();
    let (theirs, _) = check("deepseek_v4", json!({}), 1e-5);
    let written = layer_bytes(theirs.path(), None).unwrap();
    assert!(released.layers.len() == 3 && released.layers.iter().all(|&b| b > 0), "{:?}", released.layers);
    // The same tensors whichever the spelling; the multi-token-prediction module left out.
    assert_eq!(
        (released.embedding, &released.layers, released.head),
        (written.embedding, &written.layers, written.head)
    );
    // Embedding: 320 × 64 float32; head: the LM head, the final norm and the streams' collapse.
    assert_eq!(released.embedding, 320 * 64 * 4);
    assert_eq!(released.head, (320 * 64 + 64 + 4 * 4 * 64 + 4 + 1) * 4);
}

/// The released checkpoints' config.json: `rope_theta` and `rotary_dim` at the top level (no
/// `rope_parameters`), and the router, q/k-norm and attention fields transformers ignores.
#[test]
fn minimax_m2_in_the_released_config_spelling_matches_transformers() {
    check("minimax_m2", json!({"released_spelling": true}), 1e-5);
}

/// The test model is one where each MiniMax-M2 difference shows: the same checkpoint run with
/// full rotary, or with the correction bias zeroed, or with each head's queries and keys
/// normalised apart, gives logits far outside the tolerance (transformers' own forward, changed
/// one way at a time).
#[test]
fn minimax_m2s_differences_each_change_the_test_models_logits() {
    let dir = tempfile::tempdir().unwrap();
    let v = reference_json(json!({"arch": "minimax_m2", "dir": dir.path(), "prompt": PROMPT, "ablations": true}));
    let reference = to_tensor(&v["logits"]);
    for ablation in ["full_rotary", "bias_zeroed", "qk_norm_per_head"] {
        let error = relative_error(&to_tensor(&v[ablation]), &reference);
        assert!(error > 1e-2, "{ablation}: only {error:e} from the reference");
    }
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    assert!(relative_error(&prompt_logits(&model, &PROMPT), &reference) < 1e-5);
}

/// FP8 checkpoints quantised in blocks, as DeepSeek's and MiniMax's releases are (here by a test
/// helper, in [16, 32] blocks so that several rows and columns of them, partial ones at the
/// edges, scale each projection): the projections stay FP8 on the device, and the forward is
/// transformers' on the dequantised weights.
#[test]
fn fp8_block_quantised_checkpoints_match_transformers_on_the_dequantised_weights() {
    for arch in ["qwen2", "qwen3", "qwen3_moe", "minimax_m2"] {
        let (dir, model) = check(arch, json!({"fp8_block": [16, 32]}), 1e-5);
        assert!(model.blocks.iter().all(|b| b.attention.is_quantised()), "{arch}: attention widened at load");
        // Counted as loaded: FP8 bytes for the projections, float32 (as stored) for the rest.
        let stored = weight_bytes(dir.path(), None).unwrap();
        // A layer's FP8 weights widened: twice the bytes in float32 as in bfloat16.
        let widened = fp8_widened_bytes(dir.path(), Some(Kind::Float)).unwrap();
        assert!(widened > 0 && widened == 2 * fp8_widened_bytes(dir.path(), Some(Kind::BFloat16)).unwrap(), "{arch}");
        assert_eq!(weight_bytes(dir.path(), Some(Kind::Float)).unwrap(), stored, "{arch}");
        assert!(weight_bytes(dir.path(), Some(Kind::Double)).unwrap() < 2 * stored, "{arch}: FP8 counted widened");
    }
}

/// GLM-5.3-Flash quantised as vLLM 0.32 reads its FP8 release: the MLPs (dense, shared and routed
/// experts) and the indexer's `wk` in e4m3 blocks, the linear layers' and MLA's projections
/// unquantised beside them in the same checkpoint. The same logits as transformers on the
/// dequantised weights; the attention kept as stored, the FP8 weights counted as FP8.
#[test]
fn glm5_next_quantised_as_released_matches_transformers_on_the_dequantised_weights() {
    let release = json!({"linear_layers": true, "release_quantised": true, "fp8_block": [16, 16]});
    let (dir, model) = check("glm5_next", release, 1e-5);
    assert!(model.blocks.iter().all(|b| !b.attention.is_quantised()), "the attention's projections as stored");
    let stored = weight_bytes(dir.path(), None).unwrap();
    assert!(fp8_widened_bytes(dir.path(), Some(Kind::Float)).unwrap() > 0, "no FP8 weight read");
    assert!(weight_bytes(dir.path(), Some(Kind::Double)).unwrap() < 2 * stored, "FP8 counted widened");
}

/// DeepSeek-V4 as it is released, by a test helper in its format: the routed experts MXFP4 (two
/// e2m1 codes a byte, a UE8M0 exponent per 32 columns), the other projections FP8 in [16, 16]
/// blocks with UE8M0 factors, every factor under `<name>.scale`, `expert_dtype: fp4`. The
/// weights stay quantised on the device, and the forward is transformers' on the weights that
/// transformers' own reader of the format (`Fp8Dequantize`) widens them to.
#[test]
fn deepseek_v4_as_released_matches_transformers_on_the_widened_weights() {
    let extra =
        json!({"compressed": true, "released_spelling": true, "release_quantised": true, "fp8_block": [16, 16]});
    let (dir, model) = check("deepseek_v4", extra, 1e-5);
    assert!(model.blocks.iter().all(|b| b.attention.is_quantised()), "attention widened at load");
    // Everything else is stored in float32, so counted as stored or as float32 the bytes agree.
    let stored = weight_bytes(dir.path(), None).unwrap();
    assert_eq!(weight_bytes(dir.path(), Some(Kind::Float)).unwrap(), stored);
    // The widest layer's quantised weights widened, by hand: the CSA layer's 8 experts of
    // 3 × 32 × 64 (MXFP4, stored as 3072 bytes each), and FP8 wq_a 48×64, wq_b 256×48, wkv and
    // the indexer's compressor's wkv and wgate 64×64 each, wo_a 32×128, wo_b 64×32, the shared
    // expert 3 × 32×64, the compressor's wkv and wgate 128×64 each, the indexer's wq_b 256×48.
    let weights = 8 * 6144 + 3072 + 12288 + 3 * 4096 + 4096 + 2048 + 6144 + 2 * 8192 + 12288;
    assert_eq!(fp8_widened_bytes(dir.path(), Some(Kind::Float)).unwrap(), weights * 4);
    assert_eq!(fp8_widened_bytes(dir.path(), Some(Kind::BFloat16)).unwrap(), weights * 2);
}

/// Quantisations the engine does not load are refused at load, named.
#[test]
fn other_quantisations_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    reference_json(json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1]}));
    let path = dir.path().join("config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (quantization, named) in [
        (json!({"quant_method": "awq", "bits": 4}), "quantised (awq)"),
        (json!({"quant_method": "fp8", "activation_scheme": "dynamic"}), "per-tensor scales"),
        (json!({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"}), "static"),
    ] {
        config["quantization_config"] = quantization;
        std::fs::write(&path, config.to_string()).unwrap();
        let err = load(dir.path(), &LoadOptions::default()).err().expect("refused").to_string();
        assert!(err.contains(named), "{err}");
    }
}

/// In bfloat16 neither forward is exact; ours must be as close to the float32 truth (the same
/// rounded weights in float32) as transformers' own bfloat16 forward is, and round as vLLM's
/// layout does.
#[test]
fn bfloat16_checkpoints_run_in_bfloat16_as_accurately_as_transformers() {
    for arch in ["qwen2", "qwen3", "qwen3_moe", "minimax_m2"] {
        let dir = tempfile::tempdir().unwrap();
        let v = reference_json(json!({"arch": arch, "dir": dir.path(), "prompt": PROMPT, "dtype": "bfloat16"}));
        let (theirs, truth) = (to_tensor(&v["logits"]), to_tensor(&v["logits_float32"]));
        let vllm_layout = to_tensor(&v["logits_vllm_layout"]);
        // dtype "auto": the checkpoint's own.
        let model = load(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(model.spec.kind, Kind::BFloat16);
        let ours = prompt_logits(&model, &PROMPT);
        let (our_error, their_error) = (relative_error(&ours, &truth), relative_error(&theirs, &truth));
        assert!(our_error <= 1.5 * their_error + 1e-3, "{arch}: ours {our_error:e}, transformers {their_error:e}");
        // The engine rounds as vLLM's layers do (the residual stream apart, added in float32),
        // not as transformers' do: the same layout on the same kernels agrees far more closely
        // than either does with float32 (bit for bit on the machine this was written on), and
        // transformers' layout does not (2e-2 apart for the tiny Qwen2). For the mixtures of
        // experts that includes vLLM's rounding of the experts' weighted outputs (the tiny
        // MiniMax-M2 was 1e-2 apart while the reference summed them unrounded, as transformers'
        // default grouped_mm does).
        let apart = relative_error(&ours, &vllm_layout);
        assert!(apart < 1e-3, "{arch}: bf16 logits {apart:e} apart from vLLM's layout");
        // And float32 on request runs the rounded weights as transformers' float32 does.
        let model = load(dir.path(), &LoadOptions { dtype: Some(Kind::Float), ..LoadOptions::default() }).unwrap();
        let error = relative_error(&prompt_logits(&model, &PROMPT), &truth);
        assert!(error < 1e-5, "{arch}: float32 of bf16 weights {error:e}");
    }
}

/// DeepSeek-V4 (a sliding, a CSA and an HCA layer) in bfloat16: as close to the float32 truth as
/// transformers' own bfloat16 forward (which keeps its norms, hyper-connections and position
/// biases in float32; the engine's norms round as the other architectures' do).
#[test]
fn deepseek_v4_in_bfloat16_is_as_accurate_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let prompt: Vec<i64> = (0..24).map(|i| (i * 37 + 11) % 320).collect();
    let v = reference_json(
        json!({"arch": "deepseek_v4", "dir": dir.path(), "prompt": prompt, "dtype": "bfloat16", "compressed": true}),
    );
    let (theirs, truth) = (to_tensor(&v["logits"]), to_tensor(&v["logits_float32"]));
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    assert_eq!(model.spec.kind, Kind::BFloat16);
    let ours = prompt_logits(&model, &prompt);
    let (our_error, their_error) = (relative_error(&ours, &truth), relative_error(&theirs, &truth));
    assert!(our_error <= 1.5 * their_error + 1e-3, "ours {our_error:e}, transformers {their_error:e}");
    let model = load(dir.path(), &LoadOptions { dtype: Some(Kind::Float), ..LoadOptions::default() }).unwrap();
    let error = relative_error(&prompt_logits(&model, &prompt), &truth);
    assert!(error < 1e-5, "float32 of bf16 weights {error:e}");
}

/// Each step's last logits decoding `prompt` through the cache, fed `tokens` one by one (theirs:
/// the steps line up however ours would pick), and the tokens ours would pick.
fn decode_logits(model: &Transformer, prompt: &[i64], tokens: &[i64]) -> (Tensor, Vec<i64>) {
    let _guard = tch::no_grad_guard();
    let mut cache = model.new_cache((prompt.len() + tokens.len()) as i64);
    let mut input = prompt.to_vec();
    let (mut logits, mut picked) = (Vec::new(), Vec::new());
    for step in 0..=tokens.len() {
        let hidden =
            model.forward(&mut [Step { input: StepInput::Tokens(input), cache: Some(&mut cache) }], None, Output::Last);
        let last = model.logits(&hidden).to_kind(Kind::Float);
        picked.push(last.argmax(-1, false).int64_value(&[0]));
        logits.push(last);
        input = tokens.get(step).map(|&t| vec![t]).unwrap_or_default();
    }
    picked.pop();
    (Tensor::cat(&logits, 0), picked)
}

/// `--kv-cache-dtype fp8`: the cache keeps keys and values in FP8 e4m3 (a quarter of a float32
/// cache's bytes), and decoding through it gives what transformers gives through a cache rounded
/// as vLLM writes one (saturated, scale 1); the model's own cache is measurably apart from that,
/// so the rounding is really applied.
#[test]
fn an_fp8_kv_cache_decodes_as_transformers_through_the_same_rounding() {
    for arch in ["qwen3", "minimax_m2"] {
        let dir = tempfile::tempdir().unwrap();
        let reference = reference_json(
            json!({"arch": arch, "dir": dir.path(), "prompt": PROMPT, "max_new": 6, "seed": 7, "kv_cache_dtype": "fp8"}),
        );
        let theirs = to_tensor(&reference["fp8_kv_logits"]);
        let their_tokens: Vec<i64> = serde_json::from_value(reference["fp8_kv_greedy"].clone()).unwrap();
        let fp8 = LoadOptions { kv_cache_dtype: Some(Kind::Float8e4m3fn), ..LoadOptions::default() };
        let model = load(dir.path(), &fp8).unwrap();
        let plain = load(dir.path(), &LoadOptions::default()).unwrap();
        assert_eq!(4 * model.spec.kv_bytes_per_token(), plain.spec.kv_bytes_per_token(), "{arch}");
        let (ours, our_tokens) = decode_logits(&model, &PROMPT, &their_tokens);
        assert_eq!(our_tokens, their_tokens, "{arch}: greedy tokens through the FP8 cache");
        let error = relative_error(&ours, &theirs);
        assert!(error < 1e-5, "{arch}: logits through the FP8 cache {error:e} from transformers'");
        let (unrounded, _) = decode_logits(&plain, &PROMPT, &their_tokens);
        let apart = relative_error(&unrounded, &theirs);
        assert!(apart > 1e-4, "{arch}: the model's own cache only {apart:e} from the FP8 one");
        // The prompt attends its keys as computed: its last logits are the unrounded ones.
        assert!(unrounded.get(0).allclose(&ours.get(0), 1e-6, 1e-6, false), "{arch}");
    }
    // A cache in neither the model's dtype nor FP8 is refused at load.
    let dir = tempfile::tempdir().unwrap();
    reference_json(json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1]}));
    let half = LoadOptions { kv_cache_dtype: Some(Kind::Half), ..LoadOptions::default() };
    let refused = load(dir.path(), &half).err().expect("a float16 cache for a float32 model");
    assert!(refused.to_string().contains("the cache keeps the model's dtype or FP8"), "{refused}");
}

/// A step over several sequences (fresh, with a past, one token) gives each the hidden state
/// it gets alone, through both attention paths.
#[test]
fn batched_steps_match_sequences_run_alone() {
    let dir = tempfile::tempdir().unwrap();
    reference_json(json!({"arch": "qwen3_moe", "dir": dir.path(), "prompt": [1]}));
    let model = load(dir.path(), &LoadOptions::default()).unwrap();
    let _guard = tch::no_grad_guard();
    let alone = |prefix: &[i64], new: &[i64]| -> Tensor {
        let mut cache = model.new_cache(64);
        if !prefix.is_empty() {
            let _ = model.forward(
                &mut [Step { input: StepInput::Tokens(prefix.to_vec()), cache: Some(&mut cache) }],
                None,
                Output::Last,
            );
        }
        model.forward(
            &mut [Step { input: StepInput::Tokens(new.to_vec()), cache: Some(&mut cache) }],
            None,
            Output::Last,
        )
    };
    let sequences: [(&[i64], &[i64]); 3] =
        [(&[], &[3, 4, 5, 6, 7]), (&[10, 11, 12, 13], &[14, 15, 16]), (&[20; 6], &[21])];
    let mut caches: Vec<_> = sequences.iter().map(|_| model.new_cache(64)).collect();
    for ((prefix, _), cache) in sequences.iter().zip(caches.iter_mut()) {
        if !prefix.is_empty() {
            let _ = model.forward(
                &mut [Step { input: StepInput::Tokens(prefix.to_vec()), cache: Some(cache) }],
                None,
                Output::Last,
            );
        }
    }
    let mut steps: Vec<Step> = sequences
        .iter()
        .zip(caches.iter_mut())
        .map(|((_, new), cache)| Step { input: StepInput::Tokens(new.to_vec()), cache: Some(cache) })
        .collect();
    let together = model.forward(&mut steps, None, Output::Last);
    for (i, (prefix, new)) in sequences.iter().enumerate() {
        let error = relative_error(&together.get(i as i64), &alone(prefix, new).get(0));
        assert!(error < 1e-5, "sequence {i}: {error:e}");
    }
    assert_eq!(caches.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![5, 7, 7]);

    // Equal fresh sequences take the batched kernel; without caches (a PoC batch) too.
    let mut fresh: Vec<Step> =
        (0..3).map(|i| Step { input: StepInput::Tokens(vec![i + 1, 2, 3, 4]), cache: None }).collect();
    let together = model.forward(&mut fresh, None, Output::Last);
    for i in 0..3 {
        let error = relative_error(&together.get(i), &alone(&[], &[i + 1, 2, 3, 4]).get(0));
        assert!(error < 1e-5, "fresh sequence {i}: {error:e}");
    }
}

#[test]
fn broken_checkpoints_are_named() {
    let dir = tempfile::tempdir().unwrap();
    reference_json(json!({"arch": "qwen3", "dir": dir.path(), "prompt": [1]}));
    let config_path = dir.path().join("config.json");
    let config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    let with = |edit: &dyn Fn(&mut Value)| -> String {
        let mut c = config.clone();
        edit(&mut c);
        std::fs::write(&config_path, c.to_string()).unwrap();
        match load(dir.path(), &LoadOptions::default()) {
            Ok(_) => "loaded".into(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(with(&|_| {}), "loaded");
    let err = with(&|c| c["model_type"] = json!("deepseek_v3"));
    assert!(err.contains("deepseek_v3") && err.contains("qwen3"), "{err}");
    let err = with(&|c| c["num_key_value_heads"] = json!(3));
    assert!(err.contains("num_key_value_heads"), "{err}");
    let err = with(&|c| c["hidden_size"] = json!(96));
    assert!(err.contains("embed_tokens.weight") && err.contains("96"), "{err}");
    let err = with(&|c| c["num_hidden_layers"] = json!(4));
    assert!(err.contains("model.layers.3."), "{err}");
    with(&|_| {});

    // A truncated shard.
    let weights = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 10]).unwrap();
    let err = load(dir.path(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("model.safetensors") && err.contains("bytes"), "{err}");
    std::fs::remove_file(&weights).unwrap();
    let err = load(dir.path(), &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("no model.safetensors"), "{err}");
    let err = load(Path::new("/nonexistent"), &LoadOptions::default()).err().unwrap().to_string();
    assert!(err.contains("/nonexistent/config.json"), "{err}");
}
