#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs every tier.
#   unit         tiny random models, no ComfyUI          (seconds)
#   format       real ComfyUI loaders in-process, random real-size SD 1.5 / 2.1-768-v  (minutes)
#   integration  a real ComfyUI 0.3.75 server on 127.0.0.1 running the pack's nodes, the demo (minutes)
#   browser      the real page in headless Chromium: extension, workflows, chart, SAM picker (minutes)
# Each tier runs in its own process so real-size models are freed between tiers.
# Usage: bash scripts/test.sh [unit|format|integration|browser ...] [-- extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
tiers=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  tiers+=("$1"); shift
done
[ ${#tiers[@]} -gt 0 ] || tiers=(unit format integration browser)
for tier in "${tiers[@]}"; do [ "$tier" != browser ] || bash scripts/setup_browser.sh; done
status=0
for tier in "${tiers[@]}"; do
  echo "=== tier: $tier ==="
  start=$(date +%s)
  if ! .venv/bin/python -m pytest -c tests/pytest.ini "tests/$tier" -q -p no:cacheprovider ${extra[@]+"${extra[@]}"}; then
    status=1
  fi
  echo "=== tier $tier took $(( $(date +%s) - start )) s ==="
done
exit $status
