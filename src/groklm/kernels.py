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
    cdll.groklm_int4_matmul.argtypes = [p, p, i, i, p, p, i, i, i, p, i]
    return cdll


def available() -> bool:
    return _library() is not None


def _fits(weight: Tensor, scales: Tensor, dtype: torch.dtype, in_features: int, block: int) -> bool:
    """CPU, contiguous, bf16 scales [N, G], and each scale group a multiple of `block` columns."""
    groups = scales.shape[-1]
    return (
        weight.device.type == "cpu"
        and weight.dtype == dtype
        and scales.dtype == torch.bfloat16
        and weight.is_contiguous()
        and scales.is_contiguous()
        and in_features % groups == 0
        and (in_features // groups) % block == 0
        and available()
    )


def supports(weight: Tensor, scales: Tensor) -> bool:
    """Whether int8_matmul takes this weight [N, K] (int8) with bf16 scales [N, G]."""
    return _fits(weight, scales, torch.int8, weight.shape[-1], 64)


def supports_int4(packed: Tensor, scales: Tensor) -> bool:
    """Whether int4_matmul takes this packed weight [N, K/2] (uint8) with bf16 scales [N, G]."""
    return _fits(packed, scales, torch.uint8, packed.shape[-1] * 2, 32)


@functools.cache
def _int4_chunk(k: int, group: int) -> int:
    """Activation chunk for int4: the largest multiple of the scale group, at most 2048, dividing K."""
    best = group
    for c in range(group, min(k, 2048) + 1, group):
        if k % c == 0:
            best = c
    return best


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant(weight [N, K] int8, scales [N, G]).T -> [M, N] in `out_dtype` (bf16 or fp32).

    x is read as bf16 (other dtypes are cast first); accumulation is fp32, rounded once at the end.
    """
    lib = _library()
    assert lib is not None and supports(weight, scales)
    k = weight.shape[1]
    return _call(lib, lib.groklm_int8_matmul, x, weight, scales, k, lib.groklm_chunk(k // scales.shape[-1]), out_dtype)


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant_int4(packed [N, K/2], scales [N, G]).T -> [M, N], as int8_matmul."""
    lib = _library()
    assert lib is not None and supports_int4(packed, scales)
    k = packed.shape[1] * 2
    return _call(lib, lib.groklm_int4_matmul, x, packed, scales, k, _int4_chunk(k, k // scales.shape[-1]), out_dtype)


def _call(
    lib: ctypes.CDLL,
    fn: ctypes._NamedFuncPointer,
    x: Tensor,
    weight: Tensor,
    scales: Tensor,
    k: int,
    chunk: int,
    out_dtype: torch.dtype,
) -> Tensor:
    n, groups, m = weight.shape[0], scales.shape[-1], x.shape[0]
    if x.shape[1] != k:
        raise ValueError(f"x has {x.shape[1]} columns, weight expects {k}")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the native kernels write bf16 or fp32, not {out_dtype}")
    xb = x.to(torch.bfloat16).contiguous()  # kept alive across the calls below
    xq = torch.empty(m, k, dtype=torch.int16)
    xs = torch.empty(m, k // chunk, dtype=torch.float32)
    y = torch.empty(m, n, dtype=out_dtype)
    lib.groklm_quantize_rows(xb.data_ptr(), m, k, chunk, xq.data_ptr(), xs.data_ptr())
    fn(
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
