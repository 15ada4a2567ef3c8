#!/usr/bin/env bash
# One GPU check for a lent CUDA machine, at most 8 minutes; prints one table (see benchmarks/gpu_check.py).
#   bash benchmarks/gpu_check.sh [gpu_check.py options]       e.g. --n 5000 for a shorter run
# Exits 2 at once when torch sees no CUDA device; 1 when a target is missed; 124 if the 8-minute cap is hit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD:$PWD/cli${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --signal=INT --kill-after=10 480 "$PY" benchmarks/gpu_check.py "$@"
