#!/usr/bin/env bash
# The test command: sets everything up on a fresh machine, then runs every tier.
#   unit         tiny random models, no ComfyUI          (seconds)
#   format       real ComfyUI loaders in-process, random real-size SD 1.5 / 2.1-768-v  (minutes)
#   integration  a real ComfyUI 0.3.75 server on 127.0.0.1 running the pack's nodes, the demo (minutes)
#   browser      the real page in headless Chromium: extension, workflows, chart, SAM picker (minutes)
#   realsize     the tests on random-weight real-size SD 1.5 / 2.1 checkpoints (format + integration;
#                GBs of RAM, ~10 min). With no tier named they run only if their inputs changed since the
#                last passing run (tests/realsize.passed, see scripts/realsize_stamp.py); naming the tier
#                always runs it, and a pass on a clean tree re-stamps.
# Each tier runs in its own process so real-size models are freed between tiers.
# Usage: bash scripts/test.sh [unit|format|integration|browser|realsize ...] [-- extra pytest args]
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
[ ${#tiers[@]} -gt 0 ] || tiers=(unit format integration browser realsize-if-changed)
for tier in "${tiers[@]}"; do [ "$tier" != browser ] || bash scripts/setup_browser.sh; done
status=0
# pytest's exit 5 (nothing collected, e.g. a tier whose every test is realsize) is not a failure.
run_pytest() { .venv/bin/python -m pytest -c tests/pytest.ini -q -p no:cacheprovider "$@" ${extra[@]+"${extra[@]}"} || [ $? -eq 5 ]; }
for tier in "${tiers[@]}"; do
  if [ "$tier" = realsize-if-changed ]; then
    .venv/bin/python scripts/realsize_stamp.py check && continue
    tier=realsize
  fi
  echo "=== tier: $tier ==="
  start=$(date +%s)
  if [ "$tier" = realsize ]; then
    # format and integration in separate processes: the in-process real-size models of the format tests
    # would otherwise still hold ~10 GB while the integration tests' server loads its own
    log="$(mktemp)"; ok=1
    for dir in tests/format tests/integration; do
      run_pytest "$dir" -m realsize 2>&1 | tee -a "$log"; [ "${PIPESTATUS[0]}" -eq 0 ] || ok=0
    done
    if [ $ok -eq 1 ]; then
      passed="$(grep -oE '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')"
      [ ${#extra[@]} -gt 0 ] || .venv/bin/python scripts/realsize_stamp.py write "$passed" $(( $(date +%s) - start ))
    else
      status=1
    fi
    rm -f "$log"
  elif ! run_pytest "tests/$tier" -m "not realsize"; then
    status=1
  fi
  echo "=== tier $tier took $(( $(date +%s) - start )) s ==="
done
exit $status
