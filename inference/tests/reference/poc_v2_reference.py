"""PoC v2 artifacts restated in Python from upstream's algorithm (gonka-ai/vllm `vllm/poc/`:
`gpu_random.py`, `layer_hooks.py`, `poc_model_runner.py`), on a transformers forward of a model
directory with a forward hook on every decoder layer: the reference the engine's PoC v2 is
compared against.

    python poc_v2_reference.py '{"dir": "/tmp/m", "dtype": "float32", "block_hash": "…",
                                 "public_key": "…", "nonces": [0, 1], "seq_len": 16,
                                 "k_dim": 12, "stronger_rng": false}'

Prints JSON `[{"nonce", "vector" (float32 before the float16 encoding), "vector_b64"}]`.
"""

import base64
import hashlib
import json
import math
import sys

import numpy as np
import torch
import transformers

MASK = 0xFFFFFFFF


def seed_of(text):
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def murmur(keys, seed):
    """The 32-bit mix upstream applies to counters, on int64 tensors (values stay < 2^32 after
    each mask; products wrap in int64, which keeps their low 32 bits)."""
    k = keys.to(torch.int64) & MASK
    h = torch.full_like(k, seed & MASK) if isinstance(seed, int) else (seed & MASK).expand_as(k)
    k = (k * 0xCC9E2D51) & MASK
    k = ((k << 15) | (k >> 17)) & MASK
    k = (k * 0x1B873593) & MASK
    h = h ^ k
    h = ((h << 13) | (h >> 19)) & MASK
    h = (h * 5 + 0xE6546B64) & MASK
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & MASK
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & MASK
    return h ^ (h >> 16)


def normal_rows(seeds, n):
    """Box–Muller over murmur uniforms: per seed, counters 0..2*pairs, the first half radii,
    the second angles; cosines then sines."""
    pairs = (n + 1) // 2
    counters = torch.arange(2 * pairs, dtype=torch.int32).unsqueeze(0).expand(len(seeds), -1)
    u = murmur(counters, torch.tensor(seeds, dtype=torch.int64).unsqueeze(1)).to(torch.float32) / 4294967296.0
    u1 = torch.clamp(u[:, :pairs], min=1e-10)
    u2 = u[:, pairs:]
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return torch.cat([radius * torch.cos(2.0 * math.pi * u2), radius * torch.sin(2.0 * math.pi * u2)], dim=1)[:, :n]


def nonce_inputs(req, nonce, hidden, dtype):
    n = req["seq_len"] * hidden
    text = f"{req['block_hash']}_{req['public_key']}_nonce{nonce}"
    if req.get("stronger_rng"):
        digest = hashlib.sha256(text.encode()).digest()
        seg = (n + 7) // 8
        parts = []
        for k in range(8):
            if k * seg >= n:
                break
            word = int.from_bytes(digest[4 * k:4 * k + 4], "big")
            parts.append(normal_rows([word], min(seg, n - k * seg))[0])
        flat = torch.cat(parts)[:n]
    else:
        flat = normal_rows([seed_of(text)], n)[0]
    return flat.view(req["seq_len"], hidden).to(dtype)


def add_reflections(model, block_hash):
    """A Householder reflection of every decoder layer's output (forward hooks)."""
    hidden = model.config.hidden_size

    def reflection(i):
        v = normal_rows([seed_of(f"{block_hash}_layer_{i}_householder")], hidden)[0]
        v = v / v.norm()

        def hook(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            vv = v.to(x.dtype)
            y = x - 2 * (x * vv).sum(dim=-1, keepdim=True) * vv
            return (y,) + tuple(output[1:]) if isinstance(output, tuple) else y

        return hook

    for i, layer in enumerate(model.model.layers):
        layer.register_forward_hook(reflection(i))


def artifacts(model, req, nonces):
    """The artifacts of `nonces` on `model` (reflections added): the forward, then normalise,
    pick k_dim coordinates, the Haar chain and the float16 encoding. Returns the nonces kept,
    their float32 vectors and their base64 encodings."""
    hidden = model.config.hidden_size
    block_hash, public_key, k = req["block_hash"], req["public_key"], req.get("k_dim", 12)
    device = next(model.parameters()).device
    embeds = torch.stack([nonce_inputs(req, n, hidden, model.dtype) for n in nonces]).to(device)
    with torch.no_grad():
        # The decoder stack's output is after the final norm; the last position per nonce.
        last = model.model(inputs_embeds=embeds).last_hidden_state[:, -1, :].float().cpu()

    keep = ~torch.isnan(last).any(dim=-1)
    last = last[keep]
    nonces = [n for n, kept in zip(nonces, keep.tolist()) if kept]
    last = last / (last.norm(dim=-1, keepdim=True) + 1e-8)

    prefix = [f"{block_hash}_{public_key}_nonce_{n}" for n in nonces]
    scores = murmur(
        torch.arange(hidden, dtype=torch.int32).unsqueeze(0).expand(len(nonces), -1),
        torch.tensor([seed_of(f"{p}_pick_{k}") for p in prefix], dtype=torch.int64).unsqueeze(1),
    )
    _, picked = torch.topk(-scores, k=k, largest=True, sorted=False, dim=1)
    y = torch.gather(last, 1, picked)
    for j in range(k - 1):
        v = normal_rows([seed_of(f"{p}_haar_hh_{k}_{j}") for p in prefix], k)
        v = v / (v.norm(dim=-1, keepdim=True) + 1e-30)
        y = y - 2 * (y * v).sum(dim=-1, keepdim=True) * v
    y = y / (y.norm(dim=-1, keepdim=True) + 1e-8)

    halves = y.half().numpy()
    out = []
    for n, row, f32 in zip(nonces, halves, y.tolist()):
        if np.isnan(row).any():
            continue
        out.append({"nonce": n, "vector": f32, "vector_b64": base64.b64encode(row.astype("<f2").tobytes()).decode()})
    return out


def main():
    req = json.loads(sys.argv[1])
    dtype = getattr(torch, req.get("dtype", "float32"))
    model = transformers.AutoModelForCausalLM.from_pretrained(req["dir"], dtype=dtype).eval()
    add_reflections(model, req["block_hash"])
    json.dump(artifacts(model, req, req["nonces"]), sys.stdout)


if __name__ == "__main__":
    main()
