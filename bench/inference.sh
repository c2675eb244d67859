#!/usr/bin/env bash
# Inference benchmark: the engine (`gonka-inference-bench`) next to transformers on the same
# random Qwen3 (hidden 512, 8 layers, vocab 32000; float32 on this CPU), one run, written to
# docs/benchmarks.md with the machine and date. Not a test.
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
request="{\"dir\": \"$model\", \"prompt\": $prompt, \"decode\": $decode, \"batch\": $batch, \"poc_seq_len\": 256, \"poc_batch\": 8, \"poc_nonces\": 32}"
echo "bench: gonka-inference ..." >&2
ours=$(target/release/gonka-inference-bench "$model" --prompt "$prompt" --decode "$decode" --batch "$batch" \
  --poc-seq-len 256 --poc-batch 8 --poc-nonces 32)
echo "bench: transformers ..." >&2
theirs=$("$py" bench/inference_reference.py "$request")

python3 - "$ours" "$theirs" <<'PY'
import datetime, json, os, platform, sys
ours, theirs = json.loads(sys.argv[1]), json.loads(sys.argv[2])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
machine = f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.system()} {platform.release()}"
keys = ["prefill_tokens_per_second", "decode_tokens_per_second", "batch_decode_tokens_per_second", "poc_nonces_per_second"]
row = lambda r: f"| {r['engine']} | {r['device']} {r['dtype']} | {r['threads']} | " + " | ".join(f"{r[k]:.1f}" for k in keys) + " |"
ratios = " · ".join(f"{k.replace('_per_second', '').replace('_', ' ')} {ours[k] / theirs[k]:.2f}x" for k in keys)
section = f"""
## Inference and PoC v2, {datetime.date.today().isoformat()}

Machine: {machine}. Model: random Qwen3, hidden {ours['hidden']}, {ours['layers']} layers, vocab 32000, tied embeddings (`bench/inference_reference.py`); prefill {ours['prefill_tokens']} tokens; decode after a 16-token prompt, 1 sequence and {ours['batch']}; PoC v2 seq_len {ours['poc_seq_len']}, batches of {ours['poc_batch']}.

| engine | device | threads | prefill tok/s | decode tok/s | batch decode tok/s | PoC v2 nonces/s |
|---|---|---|---|---|---|---|
{row(ours)}
{row(theirs)}

Ours / transformers: {ratios}.
"""
path = "docs/benchmarks.md"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
open(path, "w").write(text + section)
print(section)
PY
