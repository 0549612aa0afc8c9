#!/usr/bin/env bash
# Create .venv and install groklm with its test tools. torch is pinned to the CPU wheel (an
# unpinned torch pulls several GB of CUDA packages); on a GPU machine install your CUDA torch first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q torch==2.13.0
fi
.venv/bin/pip install -q -e ".[test]"
