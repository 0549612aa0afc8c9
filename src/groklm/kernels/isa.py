"""Which instruction set the native CPU kernels are built for: AVX-512 VNNI where the CPU has it, else
AVX2; `GROKLM_ISA=avx2` forces the AVX2 build (as an AVX2-only x86 runs it, for tests)."""

from __future__ import annotations

import os
from pathlib import Path

BASE_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
"""Every build: AVX2 and FMA are the floor (`torch.backends.cpu.get_cpu_capability()` AVX2 or above)."""

# AVX-512 VNNI (Intel Cascade Lake and later, AMD Zen 4 and later): fused int16 and int8 multiply-adds
# (vpdpwssd, vpdpbusd) and 32 vector registers. The same source, built with these, takes more activation
# rows against the weight streams at once (`VNNI` in csrc/common.h) and int4 panels of 16 rows a vector.
ISA_FLAGS = {"avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"], "avx2": []}
_VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def cpu_has_vnni() -> bool:
    if os.environ.get("GROKLM_ISA", "").lower() == "avx2":  # force the AVX2 build
        return False
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
    return _VNNI_CPU_FLAGS <= set(flags)


def candidates() -> list[tuple[str, list[str]]]:
    """The builds to try, best first, as (name, extra compiler flags): the first that compiles is used."""
    return [(name, flags) for name, flags in ISA_FLAGS.items() if name == "avx2" or cpu_has_vnni()]
