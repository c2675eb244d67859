"""The inference benchmark's other side: transformers on the same model directory, the same
measurements as `gonka-inference-bench` (prefill tokens/s, decode tokens/s for one sequence
and a batch, PoC v2 nonces/s through a forward with per-layer reflection hooks). One JSON line.

    python inference_reference.py '{"dir": "...", "prompt": 512, "decode": 64, "batch": 8,
                                    "poc_seq_len": 256, "poc_batch": 8, "poc_nonces": 32}'

Also `make_model`: writes the benchmark's random Qwen3 checkpoint. `device` and `dtype` in the
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


def make_model(directory):
    config = transformers.Qwen3Config(
        vocab_size=32000, hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=4, head_dim=64, max_position_embeddings=4096, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(config).save_pretrained(directory)


def tokens(n, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g)


def main():
    req = json.loads(sys.argv[1])
    if req.get("make_model"):
        make_model(req["dir"])
        return
    device = torch.device(req.get("device", "cpu"))
    dtype = getattr(torch, req["dtype"]) if req.get("dtype") else None
    started = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(req["dir"], dtype=dtype).to(device).eval()
    load_seconds = time.perf_counter() - started
    vocab = model.config.vocab_size
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out = {"engine": f"transformers {transformers.__version__}", "device": str(device), "dtype": str(model.dtype),
           "threads": torch.get_num_threads(), "load_seconds": load_seconds}
    with torch.no_grad():
        prompt = tokens(req["prompt"], vocab, 1).unsqueeze(0).to(device)
        model(prompt[:, :16])
        sync()
        t = time.perf_counter()
        model(prompt)
        sync()
        out["prefill_tokens_per_second"] = req["prompt"] / (time.perf_counter() - t)

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

    # PoC v2 through the restatement's hooked forward.
    hidden = model.config.hidden_size
    block_hash, public_key = "bench-block", "bench-key"
    for i, layer in enumerate(model.model.layers):
        v = poc.normal_rows([poc.seed_of(f"{block_hash}_layer_{i}_householder")], hidden)[0]
        v = (v / v.norm()).to(device, model.dtype)

        def hook(module, args, output, v=v):
            x = output[0] if isinstance(output, tuple) else output
            y = x - 2 * (x * v).sum(dim=-1, keepdim=True) * v
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

        layer.register_forward_hook(hook)
    round_req = {"block_hash": block_hash, "public_key": public_key, "seq_len": req["poc_seq_len"]}
    nonces = list(range(req["poc_nonces"]))
    with torch.no_grad():
        sync()
        t = time.perf_counter()
        for i in range(0, len(nonces), req["poc_batch"]):
            chunk = nonces[i:i + req["poc_batch"]]
            embeds = torch.stack([poc.nonce_inputs(round_req, n, hidden, torch.float32) for n in chunk])
            model.model(inputs_embeds=embeds.to(device, model.dtype)).last_hidden_state[:, -1, :]
        sync()
        out["poc_nonces_per_second"] = len(nonces) / (time.perf_counter() - t)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
