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
print(json.dumps(out))
