"""Shared by the benchmarks: the machine they ran on, named in every report."""

from __future__ import annotations

import os
from pathlib import Path

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def cpu() -> dict[str, object]:
    """The CPU's model name, its logical CPUs and which of the instruction sets that matter here it has."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"model": fields.get("model name", "unknown"), "logical_cpus": os.cpu_count(),
            "flags": [f for f in _FLAGS if f in flags]}  # fmt: skip
