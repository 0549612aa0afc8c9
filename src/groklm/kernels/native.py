"""The native CPU kernels' library (plain C, AVX2 or AVX-512 VNNI, + OpenMP), built on first use
(`build`) for the best instruction set this CPU has (`isa`), loaded with ctypes, and called: the Python
implementations of the ops, and the kernels that are not ops (routing, the loader's transpose, the
SIGBUS guard). Each kernel has a scalar twin in the same library (`reference=True`), the definition the
SIMD builds are tested against.

Without a C compiler or AVX2, `available()` is False and callers use torch's kernels instead.
`GROKLM_NATIVE=0` turns the native path off."""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from groklm.kernels import isa as _isa
from groklm.kernels import layout, ops
from groklm.kernels.build import compile_kernels
from groklm.kernels.layout import Expert, Weight, in_features, is_block_major


@functools.cache
def _built() -> tuple[ctypes.CDLL, str] | None:
    """The loaded library and the instruction set it was built for, or None."""
    if os.environ.get("GROKLM_NATIVE", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None
    extra = os.environ.get("GROKLM_CFLAGS", "").split()  # for tuning
    found = next(
        (
            (lib, name)
            for name, flags in _isa.candidates()
            if (lib := compile_kernels(compiler, [*_isa.BASE_FLAGS, *flags, *extra]))
        ),
        None,
    )
    if found is None:
        return None
    lib, name = found
    cdll = ctypes.CDLL(str(lib))
    p, i, fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    cdll.groklm_chunk.argtypes, cdll.groklm_chunk.restype = [i, i, i], i
    for suffix in ("", "_ref"):  # each kernel and its scalar twin share a signature
        linear, moe, route = (getattr(cdll, f"groklm_{k}{suffix}") for k in ("linear", "moe", "route"))
        attend, transpose = getattr(cdll, f"groklm_attend{suffix}"), getattr(cdll, f"groklm_transpose8{suffix}")
        linear.argtypes, linear.restype = [i, p, i, i, i, i, p, p, i, p, p, i, fl, i], i
        moe.argtypes, moe.restype = [i, p, i, i, p, i, i, i, *[p, p, i] * 3, i, i, i, i, fl, i, p], i
        route.argtypes, route.restype = [p, i, i, p, i, i, fl, p, p], None
        attend.argtypes, attend.restype = [p, p, p, ctypes.c_long, p, i, i, i, i, i, fl, fl, fl, i, p, p], i
        transpose.argtypes = [p, ctypes.c_long, ctypes.c_long, p, ctypes.c_long]
    cdll.groklm_set_tanh8.argtypes = cdll.groklm_set_exp8.argtypes = cdll.groklm_set_erf8.argtypes = [p]
    cdll.groklm_guard_sigbus.argtypes = [ctypes.c_char_p]
    # The MoE's GELU and the attention's soft-cap and softmax then run 8 lanes at a time, with torch's own functions.
    for setter, symbol in (
        (cdll.groklm_set_tanh8, "Sleef_tanhf8_u10"),
        (cdll.groklm_set_exp8, "Sleef_expf8_u10"),
        (cdll.groklm_set_erf8, "Sleef_erff8_u10"),
    ):
        if (fn := _torch_symbol(symbol)) is not None:
            setter(fn)
    cpp = _cpu_ops()
    if cpp is not None:  # the C++ ops call this library's kernels
        fns = (cdll.groklm_linear, cdll.groklm_moe, cdll.groklm_chunk, cdll.groklm_attend)
        cpp.groklm_ops_set_kernels(*(ctypes.cast(f, ctypes.c_void_p).value for f in fns))
    return cdll, name


@functools.cache
def _cpu_ops() -> ctypes.CDLL | None:
    """The ops' CPU implementations, registered once: the C++ ones (their library), else these Python ones."""
    cpp = ops.cpp_ops()
    if cpp is None:
        ops.use_python(linear, moe, attend)
    return cpp


def _torch_symbol(name: str) -> int | None:
    """The address of a function exported by torch's CPU library (already loaded), or None."""
    try:
        return ctypes.cast(
            getattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")), name), ctypes.c_void_p
        ).value
    except (OSError, AttributeError):
        return None


def library() -> ctypes.CDLL | None:
    built = _built()
    return built[0] if built else None


def isa() -> str | None:
    """The instruction set the kernels were built for: "avx512vnni" where the CPU has it, else "avx2";
    None without native kernels. `GROKLM_ISA=avx2` forces the AVX2 build."""
    built = _built()
    return built[1] if built else None


def rebuild() -> None:
    """Forget the loaded library and load (building it, or finding it in the cache) the one for the
    current environment, e.g. after setting GROKLM_ISA; the C++ ops then call its kernels."""
    _built.cache_clear()
    _built()  # now, so that the C++ ops call the kernels of the library for this environment


def available() -> bool:
    return library() is not None


# torch.compile takes it as a constant, not something to trace into: what
# torch.compiler.assume_constant_result marks, without importing torch._dynamo into every command.
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def _kernel(name: str, reference: bool) -> ctypes._CFuncPtr:  # type: ignore[name-defined]
    lib = library()
    assert lib is not None
    return getattr(lib, f"groklm_{name}_ref" if reference else f"groklm_{name}")


@functools.cache
def chunk(bits: int, k: int, groups: int) -> int:
    """Activation chunk: the C library's rule (groklm_chunk)."""
    lib = library()
    assert lib is not None
    return lib.groklm_chunk(bits, k, k // groups)


def _pointers(ctype: type, values: Sequence[int]) -> ctypes.Array:
    return (ctype * len(values))(*values)


def linear(bits: int, x: Tensor, parts: Sequence[Weight], out_dtype: torch.dtype, reference: bool = False) -> Tensor:
    """groklm::linear in Python (see `groklm.kernels.linear`): one [M, N_0 + N_1 + ...] result; with
    `reference`, the scalar twin computes it."""
    if not available() or not layout.fits_linear(bits, parts):
        raise ValueError(
            f"the native int{bits} kernel does not take these weights: {[tuple(w.shape) for w, _ in parts]}"
        )
    k, groups, m = in_features(*parts[0]), parts[0][1].shape[-1], x.shape[0]
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x has shape {tuple(x.shape)}, the weights expect [rows, {k}]")
    if out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"the native kernels write bf16 or fp32, not {out_dtype}")
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.empty(m, sum(s.shape[0] for _, s in parts), dtype=out_dtype)
    rc = _kernel("linear", reference)(
        bits, xb.data_ptr(), m, k, chunk(bits, k, groups), len(parts),
        _pointers(ctypes.c_void_p, [w.data_ptr() for w, _ in parts]),
        _pointers(ctypes.c_void_p, [s.data_ptr() for _, s in parts]), groups,
        _pointers(ctypes.c_int, [s.shape[0] for _, s in parts]),
        y.data_ptr(), int(out_dtype == torch.bfloat16), 1.0, int(is_block_major(*parts[0])),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native linear could not allocate its scratch for {m} rows")
    return y


def moe(x: Tensor, router: Tensor, topk: int, bits: int, w1: Expert, v: Expert, w2: Expert, router_cap: float = 0.0,
        gelu_erf: bool = False, reference: bool = False) -> Tensor:  # fmt: skip
    """groklm::moe in Python (see `groklm.kernels.moe`); with `reference`, the scalar twin computes it."""
    if not available() or not layout.fits_moe(bits, w1, v, w2):
        raise ValueError(f"the native int{bits} MoE does not take these experts: {tuple(w1[0].shape)}")
    e, f = w1[1].shape[:2]
    d = in_features(*w1)
    if in_features(*w2) != f or tuple(w2[1].shape[:2]) != (e, d):
        raise ValueError(f"expert shapes {tuple(w1[0].shape)}, {tuple(w2[0].shape)} do not fit together")
    chunk_d, chunk_f = chunk(bits, d, w1[1].shape[-1]), chunk(bits, f, w2[1].shape[-1])
    weights = [a for w, s in (w1, v, w2) for a in (w.data_ptr(), s.data_ptr(), s.shape[-1])]
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x has shape {tuple(x.shape)}, the experts expect [tokens, {d}]")
    if router.dtype != torch.float32 or tuple(router.shape) != (e, d) or not router.is_contiguous():
        raise ValueError(f"the router must be a contiguous fp32 [{e}, {d}], not {router.dtype} {tuple(router.shape)}")
    if not 1 <= topk <= e:
        raise ValueError(f"top-{topk} of {e} experts")
    n = x.shape[0]
    xb = x.to(torch.bfloat16).contiguous()
    y = torch.empty(n, d, dtype=torch.bfloat16)
    blocked = [int(is_block_major(*part)) for part in (w1, w2)]
    rc = _kernel("moe", reference)(
        bits, xb.data_ptr(), n, d, router.data_ptr(), topk, e, f, *weights, chunk_d, chunk_f, *blocked, router_cap,
        int(gelu_erf), y.data_ptr(),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native MoE could not allocate its scratch for {n} tokens")
    return y


def route(
    x: Tensor, router: Tensor, topk: int, router_cap: float = 0.0, reference: bool = False
) -> tuple[Tensor, Tensor]:
    """The routing `moe` computes (the same native function): x [N, D] bf16, router [E, D] fp32 -> gates
    [N, k] fp32 (softmax probabilities, not renormalised) and expert ids [N, k] int64, best first."""
    if not available():
        raise ValueError("the native kernels are not available")
    n, d = x.shape
    e = router.shape[0]
    xb, r = x.to(torch.bfloat16).contiguous(), router.float().contiguous()
    experts = torch.empty(n, topk, dtype=torch.int32)
    gates = torch.empty(n, topk, dtype=torch.float32)
    _kernel("route", reference)(
        xb.data_ptr(), n, d, r.data_ptr(), e, topk, router_cap, experts.data_ptr(), gates.data_ptr()
    )
    return gates, experts.long()


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
           scale: Tensor | None = None, round_scores: bool = True, reference: bool = False) -> Tensor:  # fmt: skip
    """groklm::attend in Python (see `groklm.kernels.attend`); with `reference`, the scalar twin computes it."""
    if not available() or not layout.fits_attend(q, k) or k.shape != v.shape or k.stride() != v.stride():
        raise ValueError(
            f"the native attention does not take q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    b, h, g, dh = q.shape
    if k.shape[0] != b or k.shape[2:] != (h, dh):
        raise ValueError(f"k {tuple(k.shape)} does not fit q {tuple(q.shape)}")
    if mask.dtype != torch.bool or tuple(mask.shape) != (b, k.shape[1]):
        raise ValueError(f"mask must be bool [{b}, {k.shape[1]}], not {mask.dtype} {tuple(mask.shape)}")
    if scale is not None and (scale.dtype != torch.float32 or tuple(scale.shape) != (b,)):
        raise ValueError(f"scale must be fp32 [{b}], not {scale.dtype} {tuple(scale.shape)}")
    qc, mc = q.contiguous(), mask.contiguous()
    sc = None if scale is None else scale.contiguous()
    o = torch.empty_like(qc)
    rc = _kernel("attend", reference)(
        qc.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), mc.data_ptr(), b, k.shape[1], h, g, dh,
        multiplier, softcap, masked, int(round_scores), None if sc is None else sc.data_ptr(), o.data_ptr(),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native attention could not allocate its scores for {k.shape[1]} slots")
    return o


def transpose_into(dst: Tensor, src: Tensor, reference: bool = False) -> bool:
    """dst[...] = src.T for a 2-D one-byte src [rows, cols] and dst [cols, rows] whose rows may be a
    slice of a wider matrix (unit column stride), in one native call (tiled, threaded). Returns False,
    doing nothing, where the native library or these layouts are not there: the caller copies with torch."""
    if (
        not available()
        or src.element_size() != 1
        or dst.dtype != src.dtype
        or src.dim() != 2
        or dst.shape != (src.shape[1], src.shape[0])
        or not src.is_contiguous()
        or dst.stride(1) != 1
        or src.device.type != "cpu"
        or dst.device.type != "cpu"
    ):
        return False
    _kernel("transpose8", reference)(src.data_ptr(), src.shape[0], src.shape[1], dst.data_ptr(), dst.stride(0))
    return True


def guard_mapped_files(what: str) -> None:
    """From now on, a bus error (a memory-mapped file that shrank under us) ends the process with a
    message naming `what` instead of a bare crash (see `groklm_guard_sigbus`). Without the native
    library, Python's faulthandler prints where it happened."""
    lib = library()
    message = (
        f"groklm: error: a memory-mapped checkpoint file shrank while in use (bus error): {what}. "
        "The weights read from it are gone; do not change checkpoint files while a model runs from them "
        "with --mmap (load without --mmap to copy them into memory).\n"
    )
    if lib is not None:
        lib.groklm_guard_sigbus(message.encode())
    else:
        import faulthandler

        faulthandler.enable()
