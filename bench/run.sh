#!/usr/bin/env bash
# PoC v1 benchmark: `gonka-node-daemon bench` next to the same computation in PyTorch, on this
# machine, written to docs/benchmarks.md (machine, date, both rates, ratio). Not a test.
#
#   bench/run.sh [preset-or-params-json] [batch_size] [nonces]      (default: small 16 256)
#
# PyTorch needs its full wheel (with the CUDA libraries `import torch` loads even on a CPU):
# installed once into .cache/bench-venv (~4 GB). The daemon uses the lean libtorch of
# scripts/pyenv.sh.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
preset=${1:-small}
batch=${2:-16}
nonces=${3:-256}
r_target=1.4013564660458173

venv=.cache/bench-venv
if ! "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
  echo "bench: installing PyTorch 2.13.0 (full wheel set) into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet torch==2.13.0 numpy==2.3.5
fi

export LIBTORCH; LIBTORCH=$(scripts/pyenv.sh --libtorch)
cargo build --release --locked -q -p gonka-node-daemon --features torch
daemon=target/release/gonka-node-daemon

echo "bench: Rust (tch) ..." >&2
rust=$("$daemon" bench --params "$preset" --batch-size "$batch" --nonces "$nonces" --r-target "$r_target")
# The same model shape for PyTorch: the params the daemon resolved.
params_json=$(printf '%s' "$rust" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["params"]))')
echo "bench: PyTorch ..." >&2
py=$("$venv/bin/python" bench/pytorch_poc.py "$params_json" "$batch" "$nonces" "$r_target")

python3 - "$rust" "$py" "$params_json" <<'PY'
import datetime, json, os, platform, subprocess, sys
rust, py, params = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
machine = f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.system()} {platform.release()}"
ratio = rust["nonces_per_second"] / py["nonces_per_second"]
assert rust["proofs"] == py["proofs"], f"the two engines disagree on proofs: {rust['proofs']} vs {py['proofs']}"
row = lambda r: f"| {r['engine']} | {r['device']} {r['dtype']} | {r['threads']} | {r['nonces_per_second']:.1f} | {r['seconds']:.2f} | {r['model_load_seconds']:.2f} | {r['proofs']} |"
section = f"""
## PoC v1 nonces per second, {datetime.date.today().isoformat()}

Machine: {machine}. Model params: `{params}` ({rust['parameters']:,} parameters), batch size {rust['batch_size']}, {rust['nonces']} nonces, r_target 1.4013564660458173.

| engine | device | threads | nonces/s | nonce loop s | model build s | proofs |
|---|---|---|---|---|---|---|
{row(rust)}
{row(py)}

Ratio (Rust / PyTorch): **{ratio:.2f}x**. Both found the same {rust['proofs']} proofs.
"""
path = "docs/benchmarks.md"
head = "# Benchmarks\n\nWritten by `make bench` (bench/run.sh); newest last. Speed targets are met here, never asserted in tests.\n"
text = open(path).read() if os.path.exists(path) else head
open(path, "w").write(text + section)
print(section)
PY
