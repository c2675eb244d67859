//! The engine's speed on a model directory: prefill tokens/s, decode tokens/s (one sequence and
//! a batch), PoC v2 nonces/s; one JSON line. `bench/inference.sh` runs it next to transformers
//! on the same model and writes both to docs/benchmarks.md. Not a test.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use gonka_inference::poc_v2::{self, Hashing, Reflections, Round};
use gonka_inference::{LoadOptions, Output, Step, StepInput, load};
use serde_json::json;
use tch::{Device, Kind};

#[derive(Parser, Debug)]
struct Cli {
    model: PathBuf,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Tokens decoded per sequence.
    #[arg(long, default_value_t = 64)]
    decode: usize,
    /// Sequences decoded together in the batched measurement.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 256)]
    poc_seq_len: i64,
    #[arg(long, default_value_t = 8)]
    poc_batch: usize,
    #[arg(long, default_value_t = 32)]
    poc_nonces: usize,
    /// The sequence length of the PoC v2 inputs timed alone (host against device hashing);
    /// `--poc-seq-len` when absent.
    #[arg(long)]
    poc_inputs_seq_len: Option<i64>,
    /// Their hidden size (e.g. MiniMax-M2's 3072); the model's when absent.
    #[arg(long)]
    poc_inputs_hidden: Option<i64>,
    /// `cuda` to run on the first GPU.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The weights' dtype by upstream's names (`bfloat16`, `float16`, `float32`); the
    /// checkpoint's when absent.
    #[arg(long)]
    dtype: Option<String>,
}

/// Deterministic token ids below `vocab`.
fn tokens(n: usize, vocab: i64, seed: u64) -> Vec<i64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 33) % vocab as u64) as i64
        })
        .collect()
}

/// Decodes `steps` tokens for each of `prompts` together (greedy), returns seconds.
fn decode(model: &gonka_inference::Transformer, prompts: &[Vec<i64>], steps: usize) -> f64 {
    let mut caches: Vec<_> = prompts.iter().map(|p| model.new_cache((p.len() + steps + 1) as i64)).collect();
    let mut inputs: Vec<Vec<i64>> = prompts.to_vec();
    // The prompts are read before the clock starts: this measures decoding only.
    let mut first = true;
    let mut started = Instant::now();
    for _ in 0..=steps {
        let mut batch: Vec<Step<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(i, c)| Step { input: StepInput::Tokens(i.clone()), cache: Some(c) })
            .collect();
        let hidden = model.forward(&mut batch, None, Output::Last);
        let next = model.logits(&hidden).to_kind(Kind::Float).argmax(-1, false).to_device(Device::Cpu);
        let next = Vec::<i64>::try_from(next).expect("ids");
        inputs = next.into_iter().map(|t| vec![t]).collect();
        if first {
            started = Instant::now();
            first = false;
        }
    }
    started.elapsed().as_secs_f64()
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let device = if cli.device == "cuda" { Device::Cuda(0) } else { Device::Cpu };
    // Timed as the daemon computes on the CPU: with libgomp's spinning bounded (cpu_threads).
    if device == Device::Cpu {
        gonka_inference::cpu_threads::restart_with_bounded_spin()?;
    }
    let _guard = tch::no_grad_guard();
    let loading = Instant::now();
    let dtype = cli.dtype.as_deref().map(gonka_inference::config::parse_dtype).transpose()?;
    let model = load(&cli.model, &LoadOptions { dtype, devices: vec![device], ..LoadOptions::default() })?;
    // CUDA runs asynchronously: a measured region ends when the device has finished it.
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    let load_seconds = loading.elapsed().as_secs_f64();
    let vocab = model.spec.vocab_size;

    // Prefill: one warm-up, then the measured forward — no cache kept, the last position's
    // logits (what transformers computes with logits_to_keep=1, use_cache=False).
    let prompt = tokens(cli.prompt, vocab, 1);
    let prefill = |p: &[i64]| {
        let started = Instant::now();
        let mut steps = [Step { input: StepInput::Tokens(p.to_vec()), cache: None }];
        let hidden = model.forward(&mut steps, None, Output::Last);
        let logits = model.logits(&hidden);
        sync();
        (started.elapsed().as_secs_f64(), logits)
    };
    // Warmed on the measured shape, as vLLM's side warms each shape: the first forward of a
    // shape pays for its buffers' first touch (page faults), not the engine's steady state.
    let _ = prefill(&prompt);
    let (prefill_seconds, logits) = prefill(&prompt);
    let last_logits = Vec::<f32>::try_from(logits.get(0).narrow(0, 0, 8).to_kind(Kind::Float).to_device(Device::Cpu))?;
    let next_token = logits.get(0).argmax(-1, false).int64_value(&[]);

    let short = |seed| tokens(16, vocab, seed);
    let decode_one = decode(&model, &[short(2)], cli.decode);
    let batch_prompts: Vec<Vec<i64>> = (0..cli.batch as u64).map(|s| short(10 + s)).collect();
    let decode_batch = decode(&model, &batch_prompts, cli.decode);

    let block_hash = "bench-block";
    let round = Round { block_hash, public_key: "bench-key", seq_len: cli.poc_seq_len, k_dim: 12, stronger_rng: false };
    let reflections = Reflections::new(&model, block_hash);
    let warmup = poc_v2::compute(&model, &reflections, &round, &[0]);
    let warmup_artifact = warmup.first().and_then(|a| poc_v2::decode_vector(&a.vector_b64));
    let started = Instant::now();
    let nonces: Vec<i64> = (0..cli.poc_nonces as i64).collect();
    let mut artifacts = Vec::with_capacity(nonces.len());
    for chunk in nonces.chunks(cli.poc_batch) {
        artifacts.extend(poc_v2::compute(&model, &reflections, &round, chunk));
    }
    let poc_seconds = started.elapsed().as_secs_f64();

    // The forward alone, as the vLLM side's PoC v2 column runs it (vLLM's own PoC v2 is in
    // upstream's fork, not in its CPU build): batches of `poc_batch` sequences of `poc_seq_len`
    // tokens, the last position's logits; no inputs made, no reflections, no artifacts. The
    // pipeline above against vLLM's forward would charge ours for work vLLM's column leaves out.
    let poc_prompts: Vec<Vec<i64>> =
        (0..cli.poc_nonces as u64).map(|n| tokens(cli.poc_seq_len as usize, vocab, 100 + n)).collect();
    let poc_forward = |batch: &[Vec<i64>]| {
        let mut steps: Vec<Step<'_>> =
            batch.iter().map(|p| Step { input: StepInput::Tokens(p.clone()), cache: None }).collect();
        let logits = model.logits(&model.forward(&mut steps, None, Output::Last));
        sync();
        logits
    };
    let _ = poc_forward(&poc_prompts[..cli.poc_batch.min(poc_prompts.len())]);
    let started = Instant::now();
    for chunk in poc_prompts.chunks(cli.poc_batch) {
        let _ = poc_forward(chunk);
    }
    let poc_forward_seconds = started.elapsed().as_secs_f64();

    // One PoC v2 batch's input embeddings alone, their counters hashed on the host and on the
    // device, alternated: what the device's default saves per batch, and that both give the
    // same bits on this device.
    let inputs_round = Round { seq_len: cli.poc_inputs_seq_len.unwrap_or(cli.poc_seq_len), ..round.clone() };
    let inputs_hidden = cli.poc_inputs_hidden.unwrap_or(model.spec.hidden_size);
    let batch_nonces: Vec<i64> = (0..cli.poc_batch as i64).collect();
    let make_inputs = |hashing| {
        let started = Instant::now();
        let x = poc_v2::inputs_with(&inputs_round, &batch_nonces, inputs_hidden, model.spec.kind, device, hashing);
        sync();
        (started.elapsed().as_secs_f64() * 1e3, x)
    };
    let _ = (make_inputs(Hashing::Host), make_inputs(Hashing::Device));
    let (mut host_ms, mut device_ms, mut identical) = (Vec::new(), Vec::new(), true);
    for _ in 0..3 {
        let (ms, on_host) = make_inputs(Hashing::Host);
        host_ms.push(ms);
        let (ms, on_device) = make_inputs(Hashing::Device);
        device_ms.push(ms);
        identical &= on_host.equal(&on_device);
    }
    // Every timed nonce's unit vector in float32 and its float16 encoding, for the peer's to be
    // compared with (the GPU kit does).
    let encodings: Vec<_> =
        artifacts.iter().map(|a| json!({"nonce": a.nonce, "vector": a.vector, "vector_b64": a.vector_b64})).collect();

    println!(
        "{}",
        json!({
            "engine": "gonka-inference (tch)",
            "device": cli.device,
            "dtype": format!("{:?}", model.spec.kind),
            "threads": tch::get_num_threads(),
            // Which of libtorch's CPU kernels this build has (GEMMs: MKL; convolutions and
            // some fused ops: oneDNN), as the Python sides print theirs.
            "kernels": {"mkl": tch::utils::has_mkl(), "mkldnn": tch::utils::has_mkldnn(), "openmp": tch::utils::has_openmp()},
            "layers": model.spec.layers,
            "hidden": model.spec.hidden_size,
            "load_seconds": load_seconds,
            "prefill_tokens": cli.prompt,
            "prefill_tokens_per_second": cli.prompt as f64 / prefill_seconds,
            "prefill_last_logits": last_logits,
            "prefill_next_token": next_token,
            "poc_warmup_artifact": warmup_artifact,
            "decode_tokens_per_second": cli.decode as f64 / decode_one,
            "batch": cli.batch,
            "batch_decode_tokens_per_second": (cli.decode * cli.batch) as f64 / decode_batch,
            "poc_seq_len": cli.poc_seq_len,
            "poc_batch": cli.poc_batch,
            "poc_nonces_per_second": artifacts.len() as f64 / poc_seconds,
            "poc_forward_nonces_per_second": poc_prompts.len() as f64 / poc_forward_seconds,
            "poc_artifacts": encodings,
            "poc_inputs": {
                "seq_len": inputs_round.seq_len,
                "hidden": inputs_hidden,
                "batch": cli.poc_batch,
                "default": format!("{:?}", Hashing::for_device(device)),
                "host_ms": host_ms,
                "device_ms": device_ms,
                "identical": identical,
            },
        })
    );
    Ok(())
}
