#!/usr/bin/env bash
# One GPU check, no internet, under 8 minutes: loader-to-GPU samples/s, vilbert_base's train step in
# bf16 with and without torch.compile, MFU, data-wait fraction, peak memory. Prints one JSON line and
# appends the figures with the card's name to benchmarks/RESULTS.md (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh             # on a machine with one CUDA GPU
#   bash benchmarks/gpu_check.sh --dry-run   # CPU, tiny preset, a few steps; RESULTS.md untouched
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-}"
if [ -z "${PYTHON}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec timeout --signal=TERM --kill-after=10 "${GPU_CHECK_LIMIT_S:-480}" "${PYTHON}" benchmarks/gpu_check.py "$@"
