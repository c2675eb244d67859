#!/usr/bin/env bash
# PoC v1 benchmark: `gonka-node-daemon bench` next to the same computation in PyTorch (our
# restatement of upstream's, bench/pytorch_poc.py), on this machine: BENCH_RUNS (5) alternated
# runs each, the same proofs required of every pair, median and range written to
# docs/benchmarks.md (machine, date, ratio with its spread). Not a test.
#
#   bench/run.sh [preset-or-params-json] [batch_size] [nonces]      (default: small 16 256)
#
# Both sides use the test venv of scripts/pyenv.sh: its torch is the daemon's libtorch (the
# same version, the same kernels), with numpy.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
preset=${1:-small}
batch=${2:-16}
nonces=${3:-256}
r_target=1.4013564660458173
python=$(scripts/pyenv.sh)

export LIBTORCH; LIBTORCH=$(scripts/pyenv.sh --libtorch)
cargo build --release --locked -q -p gonka-node-daemon --features torch
daemon=target/release/gonka-node-daemon

# Both sides on the same threads; runs alternate (ours, theirs, ...) so drift hits both alike.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} MKL_NUM_THREADS=${MKL_NUM_THREADS:-$(nproc)}
runs=${BENCH_RUNS:-5}
results=$(mktemp)
params_json=""
for i in $(seq 1 "$runs"); do
  echo "bench: run $i/$runs: Rust (tch) ..." >&2
  rust=$("$daemon" bench --params "$preset" --batch-size "$batch" --nonces "$nonces" --r-target "$r_target")
  echo "$rust" >>"$results"
  # The same model shape for PyTorch: the params the daemon resolved.
  params_json=$(printf '%s' "$rust" | python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["params"]))')
  echo "bench: run $i/$runs: PyTorch ..." >&2
  "$python" bench/pytorch_poc.py "$params_json" "$batch" "$nonces" "$r_target" >>"$results"
done

python3 - "$results" "$params_json" <<'PY'
import datetime, json, os, platform, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
params = sys.argv[2]
rust = [r for r in runs if r["engine"].startswith("gonka-node-daemon")]
py = [r for r in runs if not r["engine"].startswith("gonka-node-daemon")]
for a, b in zip(rust, py):
    assert a["proofs"] == b["proofs"], f"the two engines disagree on proofs: {a['proofs']} vs {b['proofs']}"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
machine = f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.system()} {platform.release()}"
def stats(side):
    v = [r["nonces_per_second"] for r in side]
    return statistics.median(v), min(v), max(v)
(mr, lr, hr), (mp, lp, hp) = stats(rust), stats(py)
cell = lambda m, l, h: f"{m:.1f} ({l:.1f}–{h:.1f})"
row = lambda side, s: f"| {side[0]['engine']} | {side[0]['device']} {side[0]['dtype']} | {side[0]['threads']} | {cell(*s)} | {statistics.median(r['model_load_seconds'] for r in side):.2f} | {side[0]['proofs']} |"
# A ratio with its spread (worst and best pairing of the ranges); overlapping ranges are parity.
verdict = (f"parity ({mr / mp:.2f}x, ranges overlap)" if lr <= hp and lp <= hr
           else f"**{mr / mp:.2f}x** ({lr / hp:.2f}–{hr / lp:.2f}x)")
r0 = rust[0]
kernel_text = lambda r: ", ".join(k for k, on in r.get("kernels", {}).items() if on) or "none"
section = f"""
## PoC v1 nonces per second, {datetime.date.today().isoformat()}

Machine: {machine}. Model params: `{params}` ({r0['parameters']:,} parameters), batch size {r0['batch_size']}, {r0['nonces']} nonces, r_target 1.4013564660458173. {len(rust)} runs per side, alternated, median (min–max), {r0['threads']} threads each; kernels: ours libtorch ({kernel_text(r0)}), PyTorch ({kernel_text(py[0])}). The PyTorch side is our restatement of upstream's compute (see the top of this file).

| engine | device | threads | nonces/s | model build s | proofs |
|---|---|---|---|---|---|
{row(rust, (mr, lr, hr))}
{row(py, (mp, lp, hp))}

Rust / PyTorch: {verdict}. Both found the same {r0['proofs']} proofs in every run.
"""
path = "docs/benchmarks.md"
head = "# Benchmarks\n\nWritten by `make bench` (bench/run.sh); newest last. Speed targets are met here, never asserted in tests.\n"
text = open(path).read() if os.path.exists(path) else head
open(path, "w").write(text + section)
print(section)
PY
rm -f "$results"
