#!/usr/bin/env bash
# The main job in one command: sets up (same ComfyUI, pack and dependencies as the tests) and runs
# example_workflows/dynasyn_full.json headless on the bundled picture. Options: python -m demo --help
#   bash scripts/demo.sh                                   # the Shapes World model learns the bundled pair, no download
#   bash scripts/demo.sh --tiny                            # the SD workflow on a built-in tiny random model
#   bash scripts/demo.sh --checkpoint /path/to/v1-5-pruned-emaonly.safetensors
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m demo "$@"
