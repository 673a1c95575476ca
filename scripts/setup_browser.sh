#!/usr/bin/env bash
# What the browser tier needs besides the Python env: Chromium (Debian package), Node and
# playwright-core (package.json; no browser download). Idempotent.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v node >/dev/null 2>&1 || need+=(nodejs)
command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing ${need[*]} (apt)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -f node_modules/playwright-core/package.json ]; then
  echo "[setup] installing playwright-core (npm)"
  npm ci --no-audit --no-fund --silent
fi
echo "[setup] browser tier ready: $(command -v chromium), node $(node --version)"
