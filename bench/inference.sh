#!/usr/bin/env bash
# Inference benchmark: the engine (`gonka-inference-bench`) next to transformers on the same
# random Qwen3 (hidden 512, 8 layers, vocab 32000; float32 on this CPU), the same work on both
# sides (checked: equal last prefill logits and PoC v2 artifact), BENCH_RUNS (5) alternated
# runs each, median and range, written to docs/benchmarks.md with the machine and date. Not a
# test.
#
#   bench/inference.sh [prompt_tokens] [decode_tokens] [batch]     (default: 512 64 8)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
prompt=${1:-512}
decode=${2:-64}
batch=${3:-8}
py=$(scripts/pyenv.sh)
export LIBTORCH; LIBTORCH=$(scripts/pyenv.sh --libtorch)
model=.cache/bench-models/qwen3-bench
if [ ! -f "$model/config.json" ]; then
  mkdir -p "$model"
  "$py" bench/inference_reference.py "{\"make_model\": true, \"dir\": \"$model\"}"
fi
cargo build --release --locked -q -p gonka-inference --bin gonka-inference-bench
# Both sides on the same threads; runs alternate (ours, theirs, ...) so drift hits both alike.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$(nproc)}
runs=${BENCH_RUNS:-5}
request="{\"dir\": \"$model\", \"prompt\": $prompt, \"decode\": $decode, \"batch\": $batch, \"poc_seq_len\": 256, \"poc_batch\": 8, \"poc_nonces\": 32}"
results=$(mktemp)
for i in $(seq 1 "$runs"); do
  echo "bench: run $i/$runs: gonka-inference ..." >&2
  target/release/gonka-inference-bench "$model" --prompt "$prompt" --decode "$decode" --batch "$batch" \
    --poc-seq-len 256 --poc-batch 8 --poc-nonces 32 >>"$results"
  echo "bench: run $i/$runs: transformers ..." >&2
  "$py" bench/inference_reference.py "$request" >>"$results"
done

"$py" - "$results" <<'PY'
import datetime, json, os, platform, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ours = [r for r in runs if r["engine"].startswith("gonka-inference")]
theirs = [r for r in runs if not r["engine"].startswith("gonka-inference")]
# Equal work, checked before any figure: the same last prefill logits and the same PoC v2
# artifact for the warm-up nonce (float32 on this CPU; the artifact through float16).
for a, b in zip(ours, theirs):
    dl = max(abs(x - y) for x, y in zip(a["prefill_last_logits"], b["prefill_last_logits"]))
    da = max(abs(x - y) for x, y in zip(a["poc_warmup_artifact"], b["poc_warmup_artifact"]))
    assert dl < 1e-3 * max(1.0, max(abs(x) for x in b["prefill_last_logits"])), f"prefill logits differ by {dl}"
    assert da < 2e-3, f"PoC v2 artifacts differ by {da}"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
machine = f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.system()} {platform.release()}"
keys = ["prefill_tokens_per_second", "decode_tokens_per_second", "batch_decode_tokens_per_second", "poc_nonces_per_second"]
def stats(side, k):
    v = [r[k] for r in side]
    return statistics.median(v), min(v), max(v)
cell = lambda s: f"{s[0]:.1f} ({s[1]:.1f}–{s[2]:.1f})"
row = lambda side: f"| {side[0]['engine']} | {side[0]['device']} {side[0]['dtype']} | {side[0]['threads']} | " + " | ".join(cell(stats(side, k)) for k in keys) + " |"
verdicts = []
for k in keys:
    (mo, lo, ho), (mt, lt, ht) = stats(ours, k), stats(theirs, k)
    name = k.replace("_per_second", "").replace("_", " ")
    # A ratio is reported with its spread (worst and best pairing of the ranges); ranges that
    # overlap are parity.
    if lo <= ht and lt <= ho:
        verdicts.append(f"{name}: parity ({mo / mt:.2f}x, ranges overlap)")
    else:
        verdicts.append(f"{name} {mo / mt:.2f}x ({lo / ht:.2f}–{ho / lt:.2f}x)")
o = ours[0]
section = f"""
## Inference and PoC v2, {datetime.date.today().isoformat()}

Machine: {machine}. Model: random Qwen3, hidden {o['hidden']}, {o['layers']} layers, vocab 32000, tied embeddings (`bench/inference_reference.py`); prefill {o['prefill_tokens']} tokens (no cache kept, the last position's logits, both sides); decode after a 16-token prompt, 1 sequence and {o['batch']}; PoC v2 seq_len {o['poc_seq_len']}, batches of {o['poc_batch']}, the whole pipeline timed on both sides (forward with reflections, normalise, pick, Haar, encode). {len(ours)} runs per side, alternated, median (min–max); both sides agreed on the last prefill logits and the warm-up nonce's PoC v2 artifact before timing.

| engine | device | threads | prefill tok/s | decode tok/s | batch decode tok/s | PoC v2 nonces/s |
|---|---|---|---|---|---|---|
{row(ours)}
{row(theirs)}

Ours / transformers: {" · ".join(verdicts)}.
"""
path = "docs/benchmarks.md"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
open(path, "w").write(text + section)
print(section)
PY
rm -f "$results"
