#!/usr/bin/env bash
# make gpu-kit: builds, here, everything the GPU check needs into one folder under 64 MiB
# (target/gpu-kit/kit, or $GPU_KIT_DIR), for a GPU machine that has no Rust, no network and
# Python with CUDA PyTorch 2.11.0+cu130 (the lent H200s).
#
# How the binaries meet that machine's libtorch: they are built against libtorch 2.11.0 — the
# libraries and headers of PyPI's torch-2.11.0 wheel (cu130, the same build that machine has),
# fetched once without its dependencies — with tch 0.24 (tch's release for libtorch 2.11; the
# workspace builds with 0.26 for 2.13, and the crates accept both), pinned in a copy of the
# sources so the repository's lockfile stays as it is. They link libtorch_cpu and libc10 only;
# on the GPU machine kit/run.sh puts that machine's torch/lib on the library path and preloads
# its libtorch_cuda.so, which registers CUDA with the same libc10.
#
#   scripts/gpu-kit.sh           build the kit
#   scripts/gpu-kit.sh --check   also run its CPU part here (kit/run.sh --cpu)
#   scripts/gpu-kit.sh --cpu-here
#                                the kit's CPU part on the workspace's own debug binaries and
#                                libtorch (no 2.11 build, no wheel): what `make test` runs, so
#                                run.sh and its Python peers are exercised on every change
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

if [ "${1:-}" = "--cpu-here" ]; then
  target=${CARGO_TARGET_DIR:-$root/target}
  kit=$(mktemp -d "${TMPDIR:-/tmp}/gonka-gpu-kit.XXXXXX")
  trap 'rm -rf "$kit"' EXIT
  mkdir -p "$kit/bin" "$kit/python"
  for b in gonka-node-daemon gonka-inference-bench; do
    [ -x "$target/debug/$b" ] || { echo "gpu-kit: $target/debug/$b missing (make test builds it)" >&2; exit 1; }
    ln -s "$target/debug/$b" "$kit/bin/$b"
  done
  cp bench/pytorch_poc.py bench/inference_reference.py bench/fp8_matmul.py node-daemon/tests/reference/upstream_poc.py \
    inference/tests/reference/poc_v2_reference.py inference/tests/reference/qwen_reference.py "$kit/python/"
  cp scripts/gpu-kit/run.sh "$kit/run.sh"
  git rev-parse HEAD >"$kit/COMMIT" 2>/dev/null || true
  pyenv_torch=$(scripts/pyenv.sh --libtorch)
  GPU_KIT_TORCH_LIB="$pyenv_torch/lib" GPU_KIT_PYTHON="$(scripts/pyenv.sh)" OUT="$kit/report" "$kit/run.sh" --cpu
  exit
fi
torch_version=2.11.0
tch_version=0.24.0
cache=$root/.cache/gpu-kit
kit=${GPU_KIT_DIR:-$root/target/gpu-kit/kit}
build_target=$root/target/gpu-kit
limit_mb=64

# 1. libtorch 2.11: the wheel's torch/lib and torch/include, unpacked once (~1 GB).
libtorch=$cache/torch-$torch_version/torch
if [ ! -f "$libtorch/lib/libtorch_cpu.so" ]; then
  echo "gpu-kit: fetching torch $torch_version (cu130 wheel, no dependencies) for its libtorch" >&2
  mkdir -p "$cache/wheels"
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --platform manylinux_2_28_x86_64 "torch==$torch_version" -d "$cache/wheels"
  wheel=$(ls "$cache"/wheels/torch-"$torch_version"-*.whl | head -1)
  rm -rf "$cache/torch-$torch_version" && mkdir -p "$cache/torch-$torch_version"
  python3 - "$wheel" "$cache/torch-$torch_version" <<'PY'
import sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
z = zipfile.ZipFile(wheel)
z.extractall(out, [n for n in z.namelist() if n.startswith(("torch/lib/", "torch/include/", "torch/share/")) or n == "torch/version.py"])
PY
fi
# Its libtorch_cpu.so needs CUDA 13's runtime to load even on a CPU: the test venv's (same CUDA
# 13.0 as the wheel's) is where the wheel's RUNPATH ($ORIGIN/../../nvidia/...) looks.
pyenv_torch=$(scripts/pyenv.sh --libtorch)
ln -sfn "$(dirname "$pyenv_torch")/nvidia" "$cache/torch-$torch_version/nvidia"

# 2. The sources as they are (tracked files and the working tree's changes), tch pinned.
src=$cache/src
rm -rf "$src" && mkdir -p "$src"
git ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$src" 2>/dev/null || true)
(cd "$src" && cargo update --quiet -p tch --precise "$tch_version")
echo "gpu-kit: building the daemon and the inference bench against libtorch $torch_version (tch $tch_version)" >&2
(cd "$src" && LIBTORCH="$libtorch" CARGO_TARGET_DIR="$build_target" \
  RUSTFLAGS="-C link-arg=-Wl,--allow-shlib-undefined" \
  cargo build --release --locked -q -p gonka-node-daemon --features torch --bin gonka-node-daemon \
    -p gonka-inference --bin gonka-inference-bench)

# 3. The folder: binaries (stripped, no build paths to find libtorch by), the Python peers and
#    references, the script and what it reads.
rm -rf "$kit" && mkdir -p "$kit/bin" "$kit/python"
for b in gonka-node-daemon gonka-inference-bench; do
  cp "$build_target/release/$b" "$kit/bin/$b"
  strip "$kit/bin/$b"
done
cp bench/pytorch_poc.py bench/inference_reference.py bench/fp8_matmul.py "$kit/python/"
cp node-daemon/tests/reference/upstream_poc.py inference/tests/reference/poc_v2_reference.py \
  inference/tests/reference/qwen_reference.py "$kit/python/"
cp scripts/gpu-kit/run.sh "$kit/run.sh"
chmod +x "$kit/run.sh"
git rev-parse HEAD >"$kit/COMMIT" 2>/dev/null || true
size_mb=$(du -sm "$kit" | cut -f1)
echo "gpu-kit: $kit, ${size_mb} MiB" >&2
if [ "$size_mb" -ge "$limit_mb" ]; then
  echo "gpu-kit: the kit is ${size_mb} MiB; the GPU machine takes at most ${limit_mb} MiB" >&2
  exit 1
fi

if [ "${1:-}" = "--check" ]; then
  # The CPU part, here: the same script, on this libtorch 2.11 and the test venv's Python.
  GPU_KIT_TORCH_LIB="$libtorch/lib" GPU_KIT_PYTHON="$(scripts/pyenv.sh)" OUT="$build_target/cpu-report" \
    "$kit/run.sh" --cpu
fi
