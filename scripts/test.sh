#!/usr/bin/env bash
# Set up, lint, and run the test suite (CPU only, no network; needs ../shared beside the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
.venv/bin/python -m pytest -q "$@"
