#!/usr/bin/env bash
# Set up, lint, and run the test suite (CPU only, no network at test time; needs ../shared beside the
# checkout). The playground test drives Debian's headless Chromium: installed here when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
