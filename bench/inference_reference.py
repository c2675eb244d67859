"""The inference benchmark's other side: transformers on the same model directory, the same
work as `gonka-inference-bench` measured the same way: prefill (no cache kept, the last
position's logits only), decode tokens/s for one sequence and a batch, PoC v2 nonces/s through
the whole pipeline (forward with per-layer reflections, normalise, pick, Haar, encode: the
reference's). Also prints the last prefill logits and the warm-up nonce's artifact, which the
bench compares with the engine's before it reports anything. One JSON line.

    python inference_reference.py '{"dir": "...", "prompt": 512, "decode": 64, "batch": 8,
                                    "poc_seq_len": 256, "poc_batch": 8, "poc_nonces": 32}'

Also `make_model`: writes the benchmark's random checkpoint (`arch`: qwen3, qwen3_moe, minimax_m2, deepseek_v4). `device` and `dtype` in the
request (the GPU kit: `"cuda"`, `"bfloat16"`) run it there and in that precision.
"""

import json
import os
import sys
import time

import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "inference", "tests", "reference"))
import poc_v2_reference as poc  # noqa: E402


def make_model(directory, arch="qwen3"):
    """The benchmark's random checkpoint: Qwen3 (hidden 512, 8 layers, head_dim 64), or a mixture
    of experts of the same attention (32 experts of width 256, top 4 per token: the released
    models' shape scaled down): Qwen3-MoE, or MiniMax-M2 (partial rotary, sigmoid router with a
    correction bias)."""
    common = dict(
        vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
        head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    if arch == "qwen3":
        model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(intermediate_size=1536, **common))
    elif arch == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            intermediate_size=1536, num_experts=32, num_experts_per_tok=4, moe_intermediate_size=256,
            norm_topk_prob=True, **common,
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    elif arch == "deepseek_v4":
        # DeepSeek-V4-Flash's layout in small: its first two layers sliding-window only, then CSA
        # and HCA in turn (compressing 4 and 128 tokens an entry), a window of 128, the first two
        # layers' experts hash-routed, one key head (here 64 wide, of which 16 rotate, for 512
        # of which 64), four residual streams, top 4 of 32 experts of 256 plus a shared one.
        layer_types = ["sliding_attention"] * 2 + ["compressed_sparse_attention", "heavily_compressed_attention"] * 3
        config = transformers.DeepseekV4Config(
            vocab_size=32000, hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=1,
            head_dim=64, partial_rotary_factor=0.25, q_lora_rank=128, o_groups=2, o_lora_rank=64,
            sliding_window=128, hc_mult=4, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
            moe_intermediate_size=256, layer_types=layer_types,
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128},
            index_n_heads=8, index_head_dim=64, index_topk=64, mlp_layer_types=["hash_moe"] * 2 + ["moe"] * 6,
            max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
        )
        model = transformers.DeepseekV4ForCausalLM(config)
        with torch.no_grad():
            # Hash routes spread over the experts, as a release's table does (the default is zeros).
            for name, tensor in model.named_buffers():
                if name.endswith("tid2eid"):
                    tensor.copy_(torch.stack([torch.randperm(32)[:4] for _ in range(tensor.shape[0])]))
    elif arch == "minimax_m2":
        config = transformers.MiniMaxM2Config(
            intermediate_size=256, num_local_experts=32, num_experts_per_tok=4, rotary_dim=32, bos_token_id=1,
            eos_token_id=2, **common,
        )
        model = transformers.MiniMaxM2ForCausalLM(config)
        with torch.no_grad():
            # A correction bias that changes choices, as a trained one does (the default is zeros).
            for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith("e_score_correction_bias"):
                    tensor.uniform_(-0.05, 0.05)
    else:
        raise SystemExit(f"unknown arch {arch!r} (qwen3, qwen3_moe, minimax_m2, deepseek_v4)")
    model.save_pretrained(directory)
    if arch == "minimax_m2":
        # The released config's router spelling, which vLLM reads and transformers does not write.
        path = os.path.join(directory, "config.json")
        config = json.load(open(path))
        config.update(scoring_func="sigmoid", use_routing_bias=True)
        json.dump(config, open(path, "w"), indent=2)


def kernels():
    """Which of PyTorch's CPU kernels this build has (GEMMs: MKL; oneDNN; OpenMP threads)."""
    return {"mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
            "openmp": torch.backends.openmp.is_available()}


def tokens(n, vocab, seed):
    """The engine bench's token ids (its 64-bit LCG), so both sides read the same prompts."""
    mask, a, c = (1 << 64) - 1, 6364136223846793005, 1442695040888963407
    x = (seed * a + c) & mask
    out = []
    for _ in range(n):
        x = (x * a + c) & mask
        out.append((x >> 33) % vocab)
    return torch.tensor(out, dtype=torch.int64)


def main():
    req = json.loads(sys.argv[1])
    if req.get("make_model"):
        make_model(req["dir"], req.get("arch", "qwen3"))
        if req.get("fp8_block"):
            # Quantised as the FP8 releases are, by the tests' helper (its dequantised copy, a
            # subdirectory the engine does not read, is left unused).
            import qwen_reference

            qwen_reference.fp8_quantise(req["dir"], req["fp8_block"])
        return
    device = torch.device(req.get("device", "cpu"))
    dtype = getattr(torch, req["dtype"]) if req.get("dtype") else None
    started = time.perf_counter()
    # DeepSeek-V4 has eager attention only (SDPA takes no sinks).
    attention = "eager" if json.load(open(os.path.join(req["dir"], "config.json")))["model_type"] == "deepseek_v4" else "sdpa"
    model = transformers.AutoModelForCausalLM.from_pretrained(req["dir"], dtype=dtype, attn_implementation=attention).to(device).eval()
    load_seconds = time.perf_counter() - started
    vocab = model.config.vocab_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"engine": f"transformers {transformers.__version__}", "device": str(device), "dtype": str(model.dtype),
           "threads": torch.get_num_threads(), "load_seconds": load_seconds, "kernels": kernels()}
    with torch.no_grad():
        # Prefill as the engine does it: no cache kept, logits of the last position only.
        prompt = tokens(req["prompt"], vocab, 1).unsqueeze(0).to(device)
        model(prompt, use_cache=False, logits_to_keep=1)  # warmed on the measured shape, as every side
        sync()
        t = time.perf_counter()
        logits = model(prompt, use_cache=False, logits_to_keep=1).logits
        sync()
        out["prefill_tokens_per_second"] = req["prompt"] / (time.perf_counter() - t)
        out["prefill_last_logits"] = logits[0, -1, :8].float().cpu().tolist()
        out["prefill_next_token"] = int(logits[0, -1].argmax())

        def decode(batch):
            ids = torch.stack([tokens(16, vocab, 2 + s) for s in range(batch)]).to(device)
            # The prompt's forward happens before the clock: prefill, then timed decode steps.
            first = model(ids, use_cache=True)
            cache, nxt = first.past_key_values, first.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            t = time.perf_counter()
            for _ in range(req["decode"]):
                step = model(nxt, past_key_values=cache, use_cache=True)
                cache, nxt = step.past_key_values, step.logits[:, -1].argmax(-1, keepdim=True)
            sync()
            return time.perf_counter() - t

        out["decode_tokens_per_second"] = req["decode"] / decode(1)
        out["batch_decode_tokens_per_second"] = req["decode"] * req["batch"] / decode(req["batch"])

    # PoC v2, the whole of it as the engine times it: forward with the reflections, then
    # normalise, pick, Haar and encode (the reference's pipeline); one warm-up nonce first,
    # whose artifact is printed so the two sides can be compared before their figures are.
    poc.add_reflections(model, "bench-block")
    round_req = {"block_hash": "bench-block", "public_key": "bench-key", "seq_len": req["poc_seq_len"], "k_dim": 12}
    out["poc_warmup_artifact"] = poc.artifacts(model, round_req, [0])[0]["vector"]
    nonces = list(range(req["poc_nonces"]))
    sync()
    t = time.perf_counter()
    produced = []
    for i in range(0, len(nonces), req["poc_batch"]):
        produced += poc.artifacts(model, round_req, nonces[i:i + req["poc_batch"]])
    sync()
    out["poc_nonces_per_second"] = len(produced) / (time.perf_counter() - t)
    out["poc_artifacts"] = [{"nonce": a["nonce"], "vector": a["vector"], "vector_b64": a["vector_b64"]} for a in produced]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
