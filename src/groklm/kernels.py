"""Native CPU kernels (plain C, AVX2 + OpenMP), compiled on first use and called through ctypes.

The source is `csrc/int8_matmul.c`; the shared library is cached under `$GROKLM_CACHE` (default
`~/.cache/groklm`) keyed by the source's hash. Without a C compiler or AVX2, `available()` is
False and callers use torch's kernels instead. `GROKLM_NATIVE=0` turns the native path off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

_SOURCE = Path(__file__).parent / "csrc" / "int8_matmul.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]


def _cache_dir() -> Path:
    return Path(os.environ.get("GROKLM_CACHE", Path.home() / ".cache" / "groklm"))


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("GROKLM_NATIVE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"int8_matmul-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            result = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                return None
            os.replace(out, lib)  # atomic: concurrent first uses never load a half-written file
    cdll = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    cdll.groklm_chunk.argtypes, cdll.groklm_chunk.restype = [i], i
    cdll.groklm_quantize_rows.argtypes = [p, i, i, i, p, p]
    cdll.groklm_int8_matmul.argtypes = [p, p, i, i, p, p, i, i, i, p, i]
    return cdll


def available() -> bool:
    return _library() is not None


def supports(weight: Tensor, scales: Tensor) -> bool:
    """Whether int8_matmul takes this weight [N, K] (int8, contiguous) with bf16 scales [N, G]."""
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.int8
        and scales.dtype == torch.bfloat16
        and weight.is_contiguous()
        and scales.is_contiguous()
        and (weight.shape[-1] // scales.shape[-1]) % 64 == 0
        and available()
    )


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant(weight [N, K], scales [N, G]).T -> [M, N] in `out_dtype` (bf16 or fp32).

    x is read as bf16 (other dtypes are cast first); accumulation is fp32, rounded once at the end.
    """
    lib = _library()
    assert lib is not None and supports(weight, scales)
    n, k = weight.shape
    groups = scales.shape[-1]
    m = x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, weight expects {k}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"int8_matmul writes bf16 or fp32, not {out_dtype}")
    chunk = lib.groklm_chunk(k // groups)
    xb = x.to(torch.bfloat16).contiguous()  # kept alive across the calls below
    xq = torch.empty(m, k, dtype=torch.int16)
    xs = torch.empty(m, k // chunk, dtype=torch.float32)
    y = torch.empty(m, n, dtype=out_dtype)
    lib.groklm_quantize_rows(xb.data_ptr(), m, k, chunk, xq.data_ptr(), xs.data_ptr())
    lib.groklm_int8_matmul(
        xq.data_ptr(),
        xs.data_ptr(),
        m,
        k,
        weight.data_ptr(),
        scales.data_ptr(),
        groups,
        n,
        chunk,
        y.data_ptr(),
        int(out_dtype == torch.bfloat16),
    )
    return y
