#!/usr/bin/env bash
# One-command GPU proof of ftjax's kernels, from a clean checkout:
#
#     bash examples/gpu_check.sh [--skip-tests] [--budget-s 330]
#
# On an NVIDIA GPU: makes a venv (.venv-gpu-check), installs ".[gpu,test-notorch]" and runs
# `python -m ftjax.gpu_check` (kernel tests for real, kernel benchmarks against XLA and the
# HBM peak, the FasterTransformer-style model table); exits non-zero on any numerical
# mismatch. Without a GPU it says so and exits 0 before installing anything.
# FTJAX_PYTHON: the interpreter for the venv (default python3; jax >= 0.11 needs >= 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds none): nothing to check."
    exit 0
fi
nvidia-smi -L
python=${FTJAX_PYTHON:-python3}
if [ ! -x .venv-gpu-check/bin/python ]; then
    "$python" -m venv .venv-gpu-check
fi
.venv-gpu-check/bin/python -m pip install -q --upgrade pip
.venv-gpu-check/bin/python -m pip install -q -e ".[gpu,test-notorch]"
exec .venv-gpu-check/bin/python -m ftjax.gpu_check "$@"
