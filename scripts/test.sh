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
# With no tier named, on 2 or more cores, the tiers run in two lanes side by side (unit + format | integration +
# browser), each with half the cores (OMP_NUM_THREADS): the models are tiny, so one thread each is nearly as fast as
# two, and a lane waiting on a server or the browser leaves its core to the other. The longest unit files
# (SHARED_UNIT) are left out of lane A's unit tier; each lane takes them one by one after its own tiers, so both
# end together. DYNASYN_TEST_LANES=1: one lane.
# Usage: bash scripts/test.sh [unit|format|integration|browser|realsize ...] [-- extra pytest args]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONDONTWRITEBYTECODE=1
# glibc gives every freed block over its mmap threshold back to the OS and faults the pages in again at the next
# allocation: sampling the Shapes World model took a quarter longer so (13.3 s against 10.6 s, 1.1 M page faults
# against 0.3 M). Freed memory stays in the heap instead; not for realsize, whose heap would then keep its peak of GBs.
export MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
tiers=(); extra=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--" ]; then shift; extra=("$@"); break; fi
  tiers+=("$1"); shift
done
[ ${#tiers[@]} -gt 0 ] || tiers=(unit format integration browser realsize-if-changed)
for tier in "${tiers[@]}"; do [ "$tier" != browser ] || bash scripts/setup_browser.sh; done
# pytest's exit 5 (nothing collected, e.g. a tier whose every test is realsize) is not a failure.
run_pytest() { .venv/bin/python -m pytest -c tests/pytest.ini -q -p no:cacheprovider "$@" ${extra[@]+"${extra[@]}"} || [ $? -eq 5 ]; }
run_tiers() {
  local status=0 tier start
  for tier in "$@"; do
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
        # a condition, so that set -e does not end the script at the first failing directory
        if ! ( unset MALLOC_MMAP_THRESHOLD_ MALLOC_TRIM_THRESHOLD_; run_pytest "$dir" -m realsize ) 2>&1 | tee -a "$log"; then
          ok=0
        fi
      done
      if [ $ok -eq 1 ]; then
        passed="$(grep -oE '[0-9]+ passed' "$log" | awk '{s += $1} END {print s + 0}')"
        [ ${#extra[@]} -gt 0 ] || .venv/bin/python scripts/realsize_stamp.py write "$passed" $(( $(date +%s) - start ))
      else
        status=1
      fi
      rm -f "$log"
    elif [ "$tier" = unit-own ]; then  # the unit tier less the files either lane may take (below)
      run_pytest tests/unit "${SHARED_UNIT[@]/#/--ignore=}" -m "not realsize" || status=1
    elif [ "$tier" = shared ]; then
      # each shared file once, by whichever lane gets to it first (mkdir is atomic): the lane that ends its own tiers
      # early works on while the other still runs, and neither core waits idle at the end. Outside the lanes
      # (no claims folder) every file runs.
      for f in "${SHARED_UNIT[@]}"; do
        [ -z "${SHARED_CLAIMS:-}" ] || mkdir "$SHARED_CLAIMS/$(basename "$f")" 2>/dev/null || continue
        run_pytest "$f" -m "not realsize" || status=1
      done
    elif ! run_pytest "tests/$tier" -m "not realsize"; then
      status=1
    fi
    echo "=== tier $tier took $(( $(date +%s) - start )) s ==="
  done
  return $status
}

# Unit files, the longest first, that the two lanes share out at their ends (tier "shared"); measured in a lane run
# on 2026-12-07: 186, 82 and 49 s, while the lanes' own tiers differed by about 230 s
SHARED_UNIT=(tests/unit/test_shapes_model.py tests/unit/test_shapes_learning.py tests/unit/test_shapes_training.py)
cores="$(nproc 2>/dev/null || echo 1)"
if [ "${tiers[*]}" = "unit format integration browser realsize-if-changed" ] && [ "$cores" -ge 2 ] \
   && [ "${DYNASYN_TEST_LANES:-2}" != 1 ]; then
  half=$(( cores / 2 )); t0=$(date +%s)
  echo "=== two lanes side by side, $half thread(s) each: [A] unit, format  [B] integration, browser; then both: ${SHARED_UNIT[*]} ==="
  # each lane's lines carry its letter; a lane's status is its subshell's exit code. Each lane is its own process
  # group (set -m), so Ctrl-C or a TERM to this script stops both lanes with their servers and browsers; no lane
  # reads the terminal (a background group that did would be stopped).
  SHARED_CLAIMS="$(mktemp -d)"
  set -m
  ( export OMP_NUM_THREADS=$half MKL_NUM_THREADS=$half; run_tiers unit-own format shared 2>&1 | sed -u 's/^/[A] /'; exit "${PIPESTATUS[0]}" ) </dev/null &
  lane_a=$!
  ( export OMP_NUM_THREADS=$(( cores - half )) MKL_NUM_THREADS=$(( cores - half )); run_tiers integration browser shared 2>&1 | sed -u 's/^/[B] /'; exit "${PIPESTATUS[0]}" ) </dev/null &
  lane_b=$!
  set +m
  trap 'kill -TERM -- -"$lane_a" -"$lane_b" 2>/dev/null; rm -rf "$SHARED_CLAIMS"; exit 130' INT TERM
  status=0
  wait $lane_a || status=1
  wait $lane_b || status=1
  trap - INT TERM
  rm -rf "$SHARED_CLAIMS"
  echo "=== both lanes took $(( $(date +%s) - t0 )) s ==="
  run_tiers realsize-if-changed || status=1  # GBs of RAM: alone, with every core
  exit $status
fi
run_tiers "${tiers[@]}"
