#!/usr/bin/env bash
# The project's Python for tests: a venv at .cache/pyenv with the reference packages the tests
# compare against (numpy for PoC v1's random numbers). Idempotent; prints the interpreter path.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$root/.cache/pyenv
requirements=$root/scripts/requirements-test.txt
stamp=$venv/.installed-$(sha256sum "$requirements" | cut -c1-12)
if [ ! -f "$stamp" ]; then
  echo "pyenv.sh: installing $(tr '\n' ' ' < "$requirements")into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$requirements"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
echo "$venv/bin/python"
