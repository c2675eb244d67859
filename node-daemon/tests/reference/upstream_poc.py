"""Upstream's PoC v1 setup, restated in numpy once for the reference scripts (tests and bench):
the seeded generator (pow/random.py `get_rng`), the model's parameter names and shapes
(pow/models/llama31.py `Transformer.named_parameters()`), and the pool initialisation
(pow/random_pool_optimized.py `initialize_model_with_pool`, pool_fraction 0.05).
"""
import hashlib

import numpy as np
from numpy.random import SeedSequence, default_rng


def get_rng(seed: str, num_hashes: int):
    entropy = np.concatenate(
        [np.frombuffer(hashlib.sha256(f"{seed}_{i}".encode()).digest(), dtype=np.uint32) for i in range(num_hashes)]
    )
    return default_rng(SeedSequence(entropy))


def ffn_hidden(p) -> int:
    hidden = int(2 * (4 * p["dim"]) / 3)
    if p.get("ffn_dim_multiplier") is not None:
        hidden = int(p["ffn_dim_multiplier"] * hidden)
    m = p["multiple_of"]
    return m * ((hidden + m - 1) // m)


def named_shapes(p):
    dim, heads = p["dim"], p["n_heads"]
    kv = p.get("n_kv_heads") or heads
    hd, hid = dim // heads, ffn_hidden(p)
    out = [("tok_embeddings.weight", (p["vocab_size"], dim))]
    for i in range(p["n_layers"]):
        out += [
            (f"layers.{i}.attention.wq.weight", (heads * hd, dim)),
            (f"layers.{i}.attention.wk.weight", (kv * hd, dim)),
            (f"layers.{i}.attention.wv.weight", (kv * hd, dim)),
            (f"layers.{i}.attention.wo.weight", (dim, heads * hd)),
            (f"layers.{i}.feed_forward.w1.weight", (hid, dim)),
            (f"layers.{i}.feed_forward.w2.weight", (dim, hid)),
            (f"layers.{i}.feed_forward.w3.weight", (hid, dim)),
            (f"layers.{i}.attention_norm.weight", (dim,)),
            (f"layers.{i}.ffn_norm.weight", (dim,)),
        ]
    return out + [("norm.weight", (dim,)), ("output.weight", (p["vocab_size"], dim))]


def pool_weights(p, block_hash: str):
    """{name: float32 array} and the parameter count."""
    shapes = named_shapes(p)
    total = sum(int(np.prod(s)) for _, s in shapes)
    pool_size = max(50000, int(total * 0.05))
    pool = get_rng(block_hash, 4).normal(0.0, 0.02, size=pool_size).astype(np.float32)
    weights = {}
    for name, shape in shapes:
        size = int(np.prod(shape))
        h = int(hashlib.sha256(f"{block_hash}_{name}".encode()).hexdigest()[:8], 16)
        if size <= pool_size:
            start = h % (pool_size - size + 1)
            values = pool[start:start + size]
        else:
            full, rem = divmod(size, pool_size)
            values = np.concatenate([np.tile(pool, full), pool[:rem]])
            shift = h % size
            values = np.concatenate([values[shift:], values[:shift]])
        weights[name] = values.reshape(shape)
    return weights, total
