#!/usr/bin/env bash
# Inference benchmark: the engine (`gonka-inference-bench`) next to transformers and vLLM (its
# CPU build, the serving engine hosts would pick instead) on the same random model (BENCH_ARCH:
# qwen3, the default, hidden 512, 8 layers, vocab 32000; or qwen3_moe / minimax_m2, the same
# attention with 32 experts of width 256, top 4; or deepseek_v4, DeepSeek-V4-Flash's layout in
# that size; float32 on this CPU), the same work on every
# side (checked: the same next token after the prompt on all; equal last prefill logits and
# PoC v2 artifact with transformers), BENCH_RUNS (5) alternated runs each, median and range, the
# kernels each side ran, written to docs/benchmarks.md with the machine and date. Not a test.
# vLLM's PoC v2 runs in upstream's fork, not in this build: its PoC column is the same forward
# alone (PoC's batches of seq_len-token sequences, one token generated), a bound on what its
# nonces cost, against the whole pipeline on the other sides. Every side runs under the same
# glibc allocator settings (BENCH_GLIBC_TUNABLES). BENCH_VLLM=0 leaves vLLM out. BENCH_BEFORE=<an earlier build of gonka-inference-bench> adds it
# as a side of its own, alternated with the rest (a change measured against what it replaces).
#
#   bench/inference.sh [prompt_tokens] [decode_tokens] [batch]     (default: 512 64 8)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
prompt=${1:-512}
decode=${2:-64}
batch=${3:-8}
py=$(scripts/pyenv.sh)
vllm_py=$(scripts/vllm-env.sh)
export LIBTORCH; LIBTORCH=$(scripts/pyenv.sh --libtorch)
arch=${BENCH_ARCH:-qwen3}
model=.cache/bench-models/$arch-bench
if [ ! -f "$model/config.json" ]; then
  mkdir -p "$model"
  "$py" bench/inference_reference.py "{\"make_model\": true, \"dir\": \"$model\", \"arch\": \"$arch\"}"
fi
# vLLM 0.32's CPU build routes experts with softmax only (its CPU MoE asserts on MiniMax-M2's
# sigmoid router with a correction bias), and runs DeepSeek-V4 on CUDA kernels only, so it is
# no peer for minimax_m2 or deepseek_v4 here.
default_vllm=1
case "$arch" in minimax_m2|deepseek_v4) default_vllm=0 ;; esac
with_vllm=${BENCH_VLLM:-$default_vllm}
before=${BENCH_BEFORE:-}
cargo build --release --locked -q -p gonka-inference --bin gonka-inference-bench
# Every side on the same threads (vLLM bound to the same cores, none reserved for its front
# end); runs alternate (ours, transformers, vLLM, ...) so drift hits all alike.
threads=${BENCH_THREADS:-$(nproc)}
export BENCH_THREADS=$threads OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads
# Every side under the same glibc allocator settings (docs/cpu-compute.md: libtorch's CPU
# buffers otherwise go back to the kernel and fault in again every layer); BENCH_GLIBC_TUNABLES=
# (empty) runs them all on glibc's defaults.
tunables=${BENCH_GLIBC_TUNABLES-glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456:glibc.malloc.hugetlb=1}
if [ -n "$tunables" ]; then export GLIBC_TUNABLES=$tunables; else unset GLIBC_TUNABLES; fi
runs=${BENCH_RUNS:-5}
request="{\"dir\": \"$model\", \"prompt\": $prompt, \"decode\": $decode, \"batch\": $batch, \"poc_seq_len\": 256, \"poc_batch\": 8, \"poc_nonces\": 32}"
results=$(mktemp)
vllm_log=$(mktemp)
for i in $(seq 1 "$runs"); do
  echo "bench: run $i/$runs: gonka-inference ..." >&2
  target/release/gonka-inference-bench "$model" --prompt "$prompt" --decode "$decode" --batch "$batch" \
    --poc-seq-len 256 --poc-batch 8 --poc-nonces 32 >>"$results"
  if [ -n "$before" ]; then
    echo "bench: run $i/$runs: gonka-inference before ($before) ..." >&2
    "$before" "$model" --prompt "$prompt" --decode "$decode" --batch "$batch" \
      --poc-seq-len 256 --poc-batch 8 --poc-nonces 32 | sed 's/"engine":"gonka-inference/"engine":"before: gonka-inference/' >>"$results"
  fi
  echo "bench: run $i/$runs: transformers ..." >&2
  "$py" bench/inference_reference.py "$request" >>"$results"
  [ "$with_vllm" = 1 ] || continue
  echo "bench: run $i/$runs: vLLM ..." >&2
  # vLLM logs on stdout (its engine process too, which can write inside a line of ours): the
  # result goes to a file of its own; the log is kept for the kernels it chose.
  VLLM_LOGGING_LEVEL=DEBUG "$vllm_py" bench/vllm_reference.py "$request" "$vllm_log.json" \
    >"$vllm_log.run" 2>&1 || { tail -30 "$vllm_log.run" >&2; exit 1; }
  cat "$vllm_log.json" >>"$results"
  cat "$vllm_log.run" >>"$vllm_log"
done
vllm_kernels=$(grep -oE 'CPU unquantized GEMM dispatch: [^"]*|core ids=\[[0-9, ]*\]|Using [A-Za-z_]+ (attention )?backend[^"]*' "$vllm_log" | sort -u | paste -sd ";" - || true)
rm -f "$vllm_log" "$vllm_log.run" "$vllm_log.json"

"$py" - "$results" "$vllm_kernels" "$model/config.json" "$before" "$tunables" <<'PY'
import datetime, json, os, platform, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
vllm_kernels = sys.argv[2]
config = json.load(open(sys.argv[3]))
before_binary = sys.argv[4]
allocator = f"glibc with GLIBC_TUNABLES={sys.argv[5]}" if sys.argv[5] else "glibc's defaults"
ours = [r for r in runs if r["engine"].startswith("gonka-inference")]
earlier = [r for r in runs if r["engine"].startswith("before: ")]
theirs = [r for r in runs if r["engine"].startswith("transformers")]
served = [r for r in runs if r["engine"].startswith("vLLM")]
assert len(ours) == len(theirs) and len(served) in (0, len(ours)) and len(earlier) in (0, len(ours)), "a side is missing runs"
# Equal work, checked before any figure: the same next token after the prompt on every side,
# the same last prefill logits and the same PoC v2 artifact for the warm-up nonce with
# transformers (float32 on this CPU; the artifact through float16).
for i, (a, b) in enumerate(zip(ours, theirs)):
    others = [side[i] for side in (earlier, served) if side]
    tokens = {r["engine"]: r["prefill_next_token"] for r in [a, b, *others]}
    assert len(set(tokens.values())) == 1, f"next tokens differ: {tokens}"
    for c in [a, *earlier[i:i + 1]]:
        dl = max(abs(x - y) for x, y in zip(c["prefill_last_logits"], b["prefill_last_logits"]))
        da = max(abs(x - y) for x, y in zip(c["poc_warmup_artifact"], b["poc_warmup_artifact"]))
        assert dl < 1e-3 * max(1.0, max(abs(x) for x in b["prefill_last_logits"])), f"{c['engine']}: prefill logits differ by {dl}"
        assert da < 2e-3, f"{c['engine']}: PoC v2 artifacts differ by {da}"
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
machine = f"{cpu}, {os.cpu_count()} cores, {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB, {platform.system()} {platform.release()}"
# PoC v2 twice: the whole pipeline (ours and transformers) and the forward alone (ours and vLLM,
# whose CPU build has no PoC v2: see vllm_reference.py), each compared only with its like.
keys = ["prefill_tokens_per_second", "decode_tokens_per_second", "batch_decode_tokens_per_second", "poc_nonces_per_second", "poc_forward_nonces_per_second"]
def stats(side, k):
    v = [r[k] for r in side if k in r]
    return (statistics.median(v), min(v), max(v)) if v else None
cell = lambda s: f"{s[0]:.1f} ({s[1]:.1f}–{s[2]:.1f})" if s else "—"
row = lambda side: f"| {side[0]['engine']} | {side[0]['device']} {side[0]['dtype']} | {side[0]['threads']} | " + " | ".join(cell(stats(side, k)) for k in keys) + " |"
def verdicts(other):
    out = []
    for k in keys:
        if stats(other, k) is None or stats(ours, k) is None:
            continue
        (mo, lo, ho), (mt, lt, ht) = stats(ours, k), stats(other, k)
        name = k.replace("_per_second", "").replace("_", " ")
        # A ratio is reported with its spread (worst and best pairing of the ranges); ranges
        # that overlap are parity.
        if lo <= ht and lt <= ho:
            out.append(f"{name}: parity ({mo / mt:.2f}x, ranges overlap)")
        else:
            out.append(f"{name} {mo / mt:.2f}x ({lo / ht:.2f}–{ho / lt:.2f}x)")
    return " · ".join(out)
kernel_text = lambda r: ", ".join(k for k, on in r["kernels"].items() if on) or "none"
o = ours[0]
arch = config["architectures"][0].removesuffix("ForCausalLM")
experts = config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
if experts:
    width = config.get("moe_intermediate_size") or config["intermediate_size"]
    arch += f" (mixture of experts: {experts} of width {width}, top {config['num_experts_per_tok']})"
if config.get("hc_mult"):
    kinds = ", ".join(config.get("layer_types") or [])
    arch += (f" ({config['hc_mult']} residual streams; layers: {kinds}; a window of {config['sliding_window']},"
             f" {config['num_key_value_heads']} key head of {config['head_dim']})")
embeddings = "tied embeddings" if config.get("tie_word_embeddings") else "untied embeddings"
threads_and_kernels = f"Threads: {o['threads']} on every side"
if served:
    threads_and_kernels += f", vLLM's compute bound to cores {served[0]['cores']} (none reserved for its front end, which by default takes one)"
threads_and_kernels += f". Kernels: ours libtorch ({kernel_text(o)}); transformers PyTorch ({kernel_text(theirs[0])})"
if served:
    threads_and_kernels += f"; vLLM PyTorch ({kernel_text(served[0])}) under its own CPU ops, its log: {vllm_kernels or 'nothing on its kernels'}"
threads_and_kernels += f". Allocator: {allocator}, every side."
sides = f"{len(ours)} runs per side, alternated"
if earlier:
    sides += f"; the engine before the change (`{before_binary}`) a side of its own"
section = f"""
## Inference and PoC v2, {datetime.date.today().isoformat()}

Machine: {machine}. Model: random {arch}, hidden {o['hidden']}, {o['layers']} layers, vocab 32000, {embeddings} (`bench/inference_reference.py`); prefill {o['prefill_tokens']} tokens (warmed on the same shape first on every side; no cache kept, the last position's logits: ours and transformers; vLLM: a request generating one token, prefix caching and chunked prefill off); decode after a 16-token prompt, 1 sequence and {o['batch']} (vLLM: the same requests generating one token more than the decode length, less their prefill); PoC v2 seq_len {o['poc_seq_len']}, batches of {o['poc_batch']}: the whole pipeline (forward with reflections, normalise, pick, Haar, encode; ours and transformers), and the forward alone (ours: {o['poc_batch']} sequences of {o['poc_seq_len']} tokens, the last position's logits; vLLM, whose PoC v2 is in upstream's fork, not its CPU build: {o['poc_batch']} requests of {o['poc_seq_len']} tokens generating one). {sides}, median (min–max); every side gave the same next token after the prompt, and ours and transformers the same last prefill logits and warm-up PoC v2 artifact, before timing. {threads_and_kernels}

| engine | device | threads | prefill tok/s | decode tok/s | batch decode tok/s | PoC v2 nonces/s | PoC v2 forward nonces/s |
|---|---|---|---|---|---|---|---|
{row(ours)}
""" + (f"{row(earlier)}\n" if earlier else "") + f"""{row(theirs)}
""" + (f"{row(served)}\n" if served else "") + (f"\nOurs / before: {verdicts(earlier)}." if earlier else "") + f"""
Ours / transformers: {verdicts(theirs)}.
""" + (f"Ours / vLLM: {verdicts(served)}.\n" if served else "")
path = "docs/benchmarks.md"
text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
open(path, "w").write(text + section)
print(section)
PY
rm -f "$results"
