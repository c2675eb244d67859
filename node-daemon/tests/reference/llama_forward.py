"""A numpy re-statement of upstream's PoC v1 proof computation, as an independent reference for
the daemon's libtorch model: pool initialisation (pow/random_pool_optimized.py), the nano-Llama
forward from embeddings (pow/models/llama31.py, forward_embedding), and the per-nonce distance
(pow/compute/compute.py). Forward math in float64; inputs, pool and logits in upstream's dtypes.

Usage: python llama_forward.py '<json: {block_hash, public_key, nonces, params}>'
Prints JSON {logits: [[...]], dist: [...]}.
"""
import json
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from upstream_poc import get_rng, pool_weights  # noqa: E402


def init_weights(p, block_hash):
    weights, _ = pool_weights(p, block_hash)
    return {name: w.astype(np.float64) for name, w in weights.items()}


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def forward(p, w, x):
    dim, heads = p["dim"], p["n_heads"]
    kv = p.get("n_kv_heads") or heads
    hd, seq = dim // heads, x.shape[1]
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, hd, 2)[: hd // 2] / hd))
    if p.get("use_scaled_rope"):
        # Llama 3.1's apply_scaling.
        scaled = []
        for f in freqs:
            wavelen = 2 * math.pi / f
            if wavelen < 8192 / 4:
                scaled.append(f)
            elif wavelen > 8192 / 1:
                scaled.append(f / 8)
            else:
                smooth = (8192 / wavelen - 1) / (4 - 1)
                scaled.append((1 - smooth) * f / 8 + smooth * f)
        freqs = np.array(scaled)
    ang = np.outer(np.arange(seq), freqs)
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(t):
        a, b = t[..., 0::2], t[..., 1::2]
        c, s = cos[None, :, None, :], sin[None, :, None, :]
        out = np.empty_like(t)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = b * c + a * s
        return out

    mask = np.triu(np.full((seq, seq), -np.inf), 1)
    h = x
    for i in range(p["n_layers"]):
        L = lambda n: w[f"layers.{i}.{n}"]
        xn = rms_norm(h, L("attention_norm.weight"), p["norm_eps"])
        q = (xn @ L("attention.wq.weight").T).reshape(x.shape[0], seq, heads, hd)
        k = (xn @ L("attention.wk.weight").T).reshape(x.shape[0], seq, kv, hd)
        v = (xn @ L("attention.wv.weight").T).reshape(x.shape[0], seq, kv, hd)
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, heads // kv, axis=2), np.repeat(v, heads // kv, axis=2)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd) + mask
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        att = (scores @ v).transpose(0, 2, 1, 3).reshape(x.shape[0], seq, dim)
        h = h + att @ L("attention.wo.weight").T
        hn = rms_norm(h, L("ffn_norm.weight"), p["norm_eps"])
        a = hn @ L("feed_forward.w1.weight").T
        h = h + ((a / (1 + np.exp(-a))) * (hn @ L("feed_forward.w3.weight").T)) @ L("feed_forward.w2.weight").T
    h = rms_norm(h, w["norm.weight"], p["norm_eps"])
    return (h @ w["output.weight"].T)[:, -1, :].astype(np.float32)


req = json.loads(sys.argv[1])
p, bh, pk = req["params"], req["block_hash"], req["public_key"]
w = init_weights(p, bh)
inputs = np.concatenate([
    get_rng(f"{bh}_{pk}_nonce{n}", 4).standard_normal((1, p["seq_len"], p["dim"])) for n in req["nonces"]
]).astype(np.float32).astype(np.float16).astype(np.float64)
logits = forward(p, w, inputs)
perms = np.array([get_rng(f"{bh}_{pk}_nonce_{n}_permutations", 1).permutation(p["vocab_size"]) for n in req["nonces"]])
t = get_rng(f"{bh}_target", 1).standard_normal((1, p["vocab_size"]))
t /= np.linalg.norm(t, axis=1, keepdims=True)
out = logits[np.arange(len(req["nonces"]))[:, None], perms]
out = out / np.linalg.norm(out, axis=1, keepdims=True)
dist = np.linalg.norm(out - t[0], axis=1)
print(json.dumps({"logits": logits.tolist(), "dist": dist.tolist()}))
