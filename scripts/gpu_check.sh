#!/usr/bin/env bash
# The GPU check (longtake/tools/gpu_check.py): every family's CUDA path against its CPU frames, a 1.3B-sized Wan
# at 480x832, the decode's memory and `longtake bench`'s GPU rows; one JSON summary on stdout, details in
# gpu-check/. At most 8 minutes on one GPU. `--dry-run` (any machine) lists what it would run and checks the
# imports. Needs a Python with a CUDA build of torch and longtake installed: $PYTHON, else .venv/bin/python.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout --signal=INT --kill-after=20 480 "$PY" -m longtake.tools.gpu_check "$@"
