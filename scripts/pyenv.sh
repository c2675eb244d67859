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
