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
beyond_avx2='import torch, groklm.kernels as k; print(torch.backends.cpu.get_cpu_capability() != "AVX2" or k.isa() not in (None, "avx2"))'
if [ $# -eq 0 ] && [ "$(.venv/bin/python -c "$beyond_avx2")" = True ]; then
  # The ISA-sensitive tests again as an AVX2-only x86 runs them: groklm's AVX2 kernel build, torch's and
  # oneDNN's AVX2 code (no native bf16), so that every CI machine catches a divergence between builds.
  echo "--- again as an AVX2-only x86 (GROKLM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)"
  GROKLM_ISA=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python -m pytest -q \
    -k "not triton" tests/test_kernels.py tests/test_formats.py tests/test_native_int4.py tests/test_golden.py \
    tests/test_quant.py  # the Triton cases run interpreted, in numpy: no build of ours to tell apart
fi
