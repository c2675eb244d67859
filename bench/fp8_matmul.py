"""How an FP8 block-quantised projection (e4m3, a float32 factor per 128x128 block, as
MiniMax-M2.7 and DeepSeek release them) is best multiplied on this device: the figures #20
item 2 needs to choose (docs/gpu-kit.md, step fp8-matmul). Three ways, each timed on the same
weights and activations, alternated:

- `widen`: what the engine does today (`layers::widen_blocks`): the weight widened to float32,
  times its block's factor, rounded once to the activations' dtype, then a dense matmul. FP8
  bytes in memory, a widened copy per call.
- `scaled_mm`: libtorch's block-scaled FP8 matmul (`torch.nn.functional.scaled_mm`, DeepSeek's
  recipe: activations quantised on the fly per 1x128 group of each row, weights per 128x128
  block; Hopper only in libtorch 2.11). FP8 bytes and FP8 tensor cores; the activations lose
  precision to e4m3.
- `dense`: the same weights widened once, ahead of time (what FP8 must approach; twice the
  memory in bfloat16).

Each way's error against float32 on the dequantised weights is printed beside its time (the
largest absolute difference over the largest reference magnitude). A way the device refuses
is reported with libtorch's reason, not as a failure. One JSON line per shape, then a line
per shape for people; exits non-zero when widening (the engine's way) is off by 2% or more.

    python fp8_matmul.py '{"device": "cuda", "dtype": "bfloat16", "runs": 3}'

Shapes: MiniMax-M2.7's projections (hidden 3072; q/k/v fused 8192 = (48 + 2 x 8) heads x 128;
o 6144 -> 3072; an expert's gate and up fused 3072 -> 3072 and its down 1536 -> 3072) at 1, 64
and 8192 rows (a decode step, a batched decode, a PoC v2 batch of 8 x 1024), and 256 rows for
an expert (8192 tokens x top 8 / 256 experts). `"small": true` (the CPU check) takes one
shape of each kind at a few rows.
"""

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

# The tests' FP8 quantiser (beside this file in the GPU kit, under inference/ in the repository).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "inference", "tests", "reference"))
from qwen_reference import fp8_quantise_weight  # noqa: E402

BLOCK = 128
E4M3_MAX = 448.0

# (name, rows, out_dim, in_dim)
SHAPES = [
    ("qkv", 1, 8192, 3072),
    ("qkv", 64, 8192, 3072),
    ("qkv", 8192, 8192, 3072),
    ("o", 8192, 3072, 6144),
    ("expert_gate_up", 256, 3072, 3072),
    ("expert_down", 256, 3072, 1536),
]
SMALL = [("qkv", 4, 512, 256), ("expert_down", 16, 256, 384)]


def widen(q, scale, dtype):
    out_dim, in_dim = q.shape
    wide = q.float().view(out_dim // BLOCK, BLOCK, in_dim // BLOCK, BLOCK)
    wide.mul_(scale[:, None, :, None])
    return wide.view(out_dim, in_dim).to(dtype)


def by_widening(x, q, scale):
    return x @ widen(q, scale, x.dtype).t()


def by_scaled_mm(x, q, scale):
    """DeepSeek's recipe through libtorch: each row's groups of 128 in e4m3 with their own
    factor (column-major `[rows, in/128]`), the weight's block factors transposed; rows padded
    to a multiple of 4 and factor columns to a multiple of 4, as the kernel reads them."""
    rows, in_dim = x.shape
    pad_rows = -rows % 4
    xp = F.pad(x, (0, 0, 0, pad_rows)) if pad_rows else x
    groups = xp.float().view(xp.shape[0], in_dim // BLOCK, BLOCK)
    x_scale = (groups.abs().amax(dim=-1) / E4M3_MAX).clamp(min=1e-12)
    xq = (groups / x_scale[..., None]).view(xp.shape[0], in_dim).to(torch.float8_e4m3fn)
    s = scale
    pad_k = -s.shape[1] % 4
    if pad_k:
        s = F.pad(s, (0, pad_k))
    out = F.scaled_mm(
        xq, q.t(), x_scale.t().contiguous().t(), F.ScalingType.BlockWise1x128, s.t(),
        F.ScalingType.BlockWise128x128, output_dtype=x.dtype,
    )
    return out[:rows]


def timed(fn, sync, iters):
    fn()
    sync()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    sync()
    return (time.perf_counter() - started) / iters * 1e3


def main():
    request = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    device = request.get("device", "cuda")
    dtype = getattr(torch, request.get("dtype", "bfloat16"))
    runs = request.get("runs", 3)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    lines = []
    for name, rows, out_dim, in_dim in SMALL if request.get("small") else SHAPES:
        w = torch.randn(out_dim, in_dim, generator=gen) * in_dim**-0.5
        q, scale, _ = fp8_quantise_weight(w, (BLOCK, BLOCK))
        x = torch.randn(rows, in_dim, generator=gen)
        reference = x @ widen(q, scale, torch.float32).t()
        q, scale, x = q.to(device), scale.to(device), x.to(device=device, dtype=dtype)
        dense = widen(q, scale, dtype)
        ways = {
            "widen": lambda: by_widening(x, q, scale),
            "scaled_mm": lambda: by_scaled_mm(x, q, scale),
            "dense": lambda: x @ dense.t(),
        }
        line = {"shape": name, "rows": rows, "out": out_dim, "in": in_dim, "device": device, "dtype": str(dtype)}
        usable = {}
        for way, fn in ways.items():
            try:
                got = fn().float().cpu()
            except Exception as e:  # noqa: BLE001 (any refusal is reported, with its reason)
                line[way] = {"refused": str(e).splitlines()[0][:200]}
                continue
            error = float((got - reference).abs().max() / reference.abs().max())
            line[way] = {"error": error, "ms": []}
            usable[way] = fn
        # Large shapes take a few iterations, small ones many: each measurement ~0.1 s or more.
        iters = max(3, min(200, int(2e9 / max(1, rows * out_dim * in_dim) * 10)))
        for _ in range(runs):
            for way, fn in usable.items():
                line[way]["ms"].append(timed(fn, sync, iters))
        for way in usable:
            ms = line[way]["ms"]
            line[way]["median_ms"] = statistics.median(ms)
        print(json.dumps(line), flush=True)
        lines.append(line)
    for line in lines:
        ways = []
        for way in ("widen", "scaled_mm", "dense"):
            w = line[way]
            if "refused" in w:
                ways.append(f"{way} refused ({w['refused']})")
            else:
                ms = w["ms"]
                ways.append(f"{way} {w['median_ms']:.3f} ms ({min(ms):.3f}-{max(ms):.3f}), error {w['error']:.2g}")
        print(f"{line['shape']}, {line['rows']} rows, {line['in']} -> {line['out']}: " + "; ".join(ways))
    off = [line["shape"] for line in lines if line["widen"].get("error", 1.0) >= 0.02]
    if off:
        raise SystemExit(f"widening FP8 blocks is off on {off}")


if __name__ == "__main__":
    main()
