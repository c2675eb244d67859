"""Reference draws from numpy, for the bit-exactness tests of node-daemon's PoC RNG.

Seeds the way upstream's PoC v1 does (`get_extended_entropy` -> SeedSequence -> default_rng)
and prints JSON: float64 values as their IEEE-754 bit patterns, so nothing is lost in transit.
Usage: python numpy_vectors.py
"""
import hashlib
import json

import numpy as np
from numpy.random import SeedSequence, default_rng


def entropy(seed: str, num_hashes: int) -> np.ndarray:
    parts = [np.frombuffer(hashlib.sha256(f"{seed}_{i}".encode()).digest(), dtype=np.uint32) for i in range(num_hashes)]
    return np.concatenate(parts)


def rng(seed: str, num_hashes: int):
    return default_rng(SeedSequence(entropy(seed, num_hashes)))


def bits(a) -> list:
    return [int(x) for x in np.asarray(a, dtype=np.float64).view(np.uint64)]


out = {"numpy": np.__version__, "cases": []}
for seed, n in [("0xabc123", 4), ("deadbeef_pubkey_nonce7", 4), ("block_target", 1), ("", 1), ("x" * 100, 8)]:
    seq = SeedSequence(entropy(seed, n))
    case = {
        "seed": seed,
        "num_hashes": n,
        "pool": [int(x) for x in seq.pool],
        "state": [int(x) for x in seq.generate_state(4, np.uint64)],
        "raw": [int(x) for x in rng(seed, n).bit_generator.random_raw(8)],
        "standard_normal": bits(rng(seed, n).standard_normal(50000)),
        "normal_002": bits(rng(seed, n).normal(0.0, 0.02, 2000)),
        "permutation_8196": [int(x) for x in rng(seed, n).permutation(8196)],
        "permutation_100": [int(x) for x in rng(seed, n).permutation(100)],
    }
    g = rng(seed, n)
    y = g.standard_normal((1, 8196))
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    case["sphere_8196"] = bits(y[0])
    out["cases"].append(case)
# PoC v1 per-nonce pipeline, as pow.random + pow.compute.compute do it (numpy side only).
pipeline = []
for block_hash, public_key, nonce, seq_len, dim, vocab in [("0xabc", "pk1", 0, 4, 16, 64), ("blockhash", "pubkey", 12345, 8, 32, 8196)]:
    emb = rng(f"{block_hash}_{public_key}_nonce{nonce}", 4).standard_normal((1, seq_len, dim))
    # torch.tensor(float64 array, dtype=float16) converts through float32.
    inputs = emb.astype(np.float32).astype(np.float16).astype(np.float32)
    perm = rng(f"{block_hash}_{public_key}_nonce_{nonce}_permutations", 1).permutation(vocab)
    t = rng(f"{block_hash}_target", 1).standard_normal((1, vocab))
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    target = t[0]
    logits = rng(f"logits_{nonce}", 1).standard_normal((1, vocab)).astype(np.float32)
    outputs = logits[np.arange(1)[:, None], perm[None, :]]
    outputs = outputs / np.linalg.norm(outputs, axis=1, keepdims=True)
    dist = np.linalg.norm(outputs - target, axis=1)
    pipeline.append({
        "block_hash": block_hash, "public_key": public_key, "nonce": nonce, "seq_len": seq_len, "dim": dim, "vocab": vocab,
        "inputs": [int(x) for x in inputs.reshape(-1).view(np.uint32)],
        "permutation": [int(x) for x in perm],
        "target": bits(target),
        "logits": [int(x) for x in logits.reshape(-1).view(np.uint32)],
        "dist": bits(dist)[0],
    })
out["pipeline"] = pipeline
print(json.dumps(out))
