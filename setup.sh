#!/usr/bin/env bash
# Sets up pocketlm in ./.venv. `bash setup.sh --test` adds the test dependencies.
# PyTorch's CPU build is installed first, pinned, so pip never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "pocketlm needs Python 3.11 or newer" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip
.venv/bin/python -c 'import torch' 2>/dev/null || pip install torch==2.13.0
if [ "${1:-}" = "--test" ]; then
  # llama-cpp-python (the llama.cpp peer in tests) compiles llama.cpp on first install: several minutes.
  pip install -e ".[test]"
else
  pip install -e .
fi
echo "pocketlm is set up in .venv: run .venv/bin/pocketlm --help" >&2
