#!/usr/bin/env bash
# The project's Python for tests, a venv at .cache/pyenv: the reference packages the tests
# compare against (requirements-test.txt: numpy) and libtorch for the daemon's PoC jobs
# (requirements-torch.txt, --no-deps). Idempotent; pip's own cache keeps the wheels.
#   scripts/pyenv.sh            # prints the interpreter
#   scripts/pyenv.sh --libtorch # prints the LIBTORCH directory
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.cache/pyenv
test_reqs=$root/scripts/requirements-test.txt
torch_reqs=$root/scripts/requirements-torch.txt
stamp=$venv/.installed-$(cat "$test_reqs" "$torch_reqs" | sha256sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  # The torch wheel unpacks to ~1.6 GB next to a ~0.5 GB download; say so plainly rather than
  # letting pip fail halfway with ENOSPC.
  mkdir -p "$root/.cache"
  need_mb=2500
  free_mb=$(df -Pm "$root/.cache" | awk 'NR==2 {print $4}')
  if [ "${free_mb:-0}" -lt "$need_mb" ]; then
    echo "pyenv.sh: $root/.cache has ${free_mb} MB free; installing libtorch needs about ${need_mb} MB" >&2
    exit 1
  fi
  echo "pyenv.sh: installing numpy and libtorch into $venv (first run downloads ~550 MB)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$test_reqs"
  "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$torch_reqs"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
if [ "${1:-}" = "--libtorch" ]; then
  echo "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/torch"
else
  echo "$venv/bin/python"
fi
