#!/usr/bin/env bash
# GPU checks of issue 14 in one command (offline, random-weight models made here; a few minutes on one GPU).
# Prints one "RESULT <name> {json}" line per check. Without CUDA it runs the same code on the tiny model and
# says which CUDA-only checks it skipped. Extra arguments go to scripts/gpu_check.py (see its --help).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" scripts/gpu_check.py "$@"
