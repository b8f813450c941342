#!/usr/bin/env bash
# Install everything (dev extras included) into .venv and run the tests.
# Slow tests (>2 GB model round trip) run with: ./tools/test.sh -m slow
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[dev]"
# The custom-op library: CPU kernels always, the CUDA kernels too wherever nvcc is installed
# (they compile everywhere and run only on a GPU; tests/gpu skips without one).
python tools/build_custom_ops.py
exec python -m pytest "$@"
