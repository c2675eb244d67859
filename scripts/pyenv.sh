#!/usr/bin/env bash
# The project's Python for tests, a venv at .cache/pyenv (requirements-test.txt): the reference
# packages the tests compare against (numpy, torch, transformers) and libtorch for the daemon's
# PoC jobs and inference engine (the torch wheel's own). Idempotent; pip's own cache keeps the
# wheels.
#   scripts/pyenv.sh            # prints the interpreter
#   scripts/pyenv.sh --libtorch # prints the LIBTORCH directory
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.cache/pyenv
test_reqs=$root/scripts/requirements-test.txt
stamp=$venv/.installed-$(sha256sum <"$test_reqs" | cut -c1-12)
if [ ! -f "$stamp" ]; then
  # torch and its CUDA libraries unpack to ~5 GB next to ~3 GB of downloads; say so plainly
  # rather than letting pip fail halfway with ENOSPC.
  mkdir -p "$root/.cache"
  need_mb=9000
  free_mb=$(df -Pm "$root/.cache" | awk 'NR==2 {print $4}')
  if [ "${free_mb:-0}" -lt "$need_mb" ]; then
    echo "pyenv.sh: $root/.cache has ${free_mb} MB free; installing libtorch needs about ${need_mb} MB" >&2
    exit 1
  fi
  echo "pyenv.sh: installing numpy, torch and transformers into $venv (first run downloads ~3 GB)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$test_reqs"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
if [ "${1:-}" = "--libtorch" ]; then
  echo "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
else
  echo "$venv/bin/python"
fi
