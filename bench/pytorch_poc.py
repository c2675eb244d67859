"""PoC v1 nonces per second in PyTorch, the way upstream's ML node computes them, for comparison
with `gonka-node-daemon bench` on the same machine (bench/run.sh runs both).

Our restatement, not upstream's ML node (docs/benchmarks.md records the upstream commit it was
checked against and where the loop differs): a compact PyTorch re-statement of upstream's
nano-Llama forward from embeddings (pow/models/llama31.py), initialised from the block hash by
upstream's pool scheme; inputs, permutations, target and distances use numpy as upstream's
pow.random and pow.compute do; each batch prepared in turn on one thread (upstream prepares the
next in a thread pool while the GPU computes).
Only the nonce loop is timed. Prints one JSON line with the same keys as the Rust bench.

Usage: python pytorch_poc.py '<params json>' <batch_size> <nonces> <r_target>

On a GPU (`BENCH_DEVICE=cuda`, the GPU kit) the model runs in float16 there, as upstream's ML
node runs it and as `gonka-node-daemon bench` does on CUDA; numpy's side stays on the CPU.
"""
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

# Upstream's seeding and pool initialisation, shared with the tests' reference scripts.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "node-daemon", "tests", "reference"))
from upstream_poc import get_rng, pool_weights  # noqa: E402


DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
DTYPE = torch.float16 if DEVICE.type == "cuda" else torch.float32


def init_weights(p, block_hash):
    weights, total = pool_weights(p, block_hash)
    return {name: torch.from_numpy(w.copy()).to(DEVICE, DTYPE) for name, w in weights.items()}, total


def rms(x, weight, eps):
    return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * weight


def forward(p, w, freqs, x):
    b, s, dim = x.shape
    heads = p["n_heads"]
    kv = p.get("n_kv_heads") or heads
    hd = dim // heads
    mask = torch.triu(torch.full((s, s), float("-inf"), device=x.device), diagonal=1).type_as(x)
    f = freqs[:s].view(1, s, 1, hd // 2, 2)

    def rope(t):
        ts = t.float().reshape(*t.shape[:-1], -1, 2)
        return torch.stack([ts[..., 0] * f[..., 0] - ts[..., 1] * f[..., 1],
                            ts[..., 1] * f[..., 0] + ts[..., 0] * f[..., 1]], -1).flatten(3).type_as(t)

    h = x
    for i in range(p["n_layers"]):
        L = lambda n: w[f"layers.{i}.{n}"]
        xn = rms(h, L("attention_norm.weight"), p["norm_eps"])
        q = F.linear(xn, L("attention.wq.weight")).view(b, s, heads, hd)
        k = F.linear(xn, L("attention.wk.weight")).view(b, s, kv, hd)
        v = F.linear(xn, L("attention.wv.weight")).view(b, s, kv, hd)
        q, k = rope(q), rope(k)
        if heads != kv:
            k = k[:, :, :, None, :].expand(b, s, kv, heads // kv, hd).reshape(b, s, heads, hd)
            v = v[:, :, :, None, :].expand(b, s, kv, heads // kv, hd).reshape(b, s, heads, hd)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd) + mask
        scores = F.softmax(scores.float(), dim=-1).type_as(q)
        out = torch.matmul(scores, v).transpose(1, 2).contiguous().view(b, s, -1)
        h = h + F.linear(out, L("attention.wo.weight"))
        hn = rms(h, L("ffn_norm.weight"), p["norm_eps"])
        h = h + F.linear(F.silu(F.linear(hn, L("feed_forward.w1.weight"))) * F.linear(hn, L("feed_forward.w3.weight")),
                         L("feed_forward.w2.weight"))
    return F.linear(rms(h, w["norm.weight"], p["norm_eps"]), w["output.weight"]).float()[:, -1, :]


def main():
    p = json.loads(sys.argv[1])
    batch_size, nonces, r_target = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    bh, pk = "bench-block-hash", "bench-public-key"
    t0 = time.perf_counter()
    w, total = init_weights(p, bh)
    hd = p["dim"] // p["n_heads"]
    fr = 1.0 / (p["rope_theta"] ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    ang = torch.outer(torch.arange(p["seq_len"], dtype=torch.float32), fr)
    freqs = torch.view_as_real(torch.polar(torch.ones_like(ang), ang)).to(DEVICE)
    t = get_rng(f"{bh}_target", 1).standard_normal((1, p["vocab_size"]))
    target = (t / np.linalg.norm(t, axis=1, keepdims=True))[0]
    load = time.perf_counter() - t0

    start = time.perf_counter()
    proofs = 0
    with torch.no_grad():
        for first in range(0, nonces, batch_size):
            batch = list(range(first, min(first + batch_size, nonces)))
            emb = np.concatenate([get_rng(f"{bh}_{pk}_nonce{n}", 4).standard_normal((1, p["seq_len"], p["dim"])) for n in batch])
            x = torch.tensor(emb, dtype=torch.float16).to(DEVICE, DTYPE)
            logits = forward(p, w, freqs, x).cpu().numpy()
            perms = np.array([get_rng(f"{bh}_{pk}_nonce_{n}_permutations", 1).permutation(p["vocab_size"]) for n in batch])
            out = logits[np.arange(len(batch))[:, None], perms]
            out = out / np.linalg.norm(out, axis=1, keepdims=True)
            proofs += int((np.linalg.norm(out - target, axis=1) < r_target).sum())
    seconds = time.perf_counter() - start
    print(json.dumps({
        "engine": f"PyTorch {torch.__version__} + numpy {np.__version__}",
        "device": "Cuda(0)" if DEVICE.type == "cuda" else "Cpu", "dtype": "Half" if DTYPE == torch.float16 else "Float",
        "threads": torch.get_num_threads(),
        "kernels": {"mkl": torch.backends.mkl.is_available(), "mkldnn": torch.backends.mkldnn.is_available(),
                    "openmp": torch.backends.openmp.is_available()},
        "parameters": total, "batch_size": batch_size, "nonces": nonces,
        "model_load_seconds": load, "seconds": seconds, "nonces_per_second": nonces / seconds, "proofs": proofs,
    }))


if __name__ == "__main__":
    main()
