"""Kernels: the choice between them (`use_triton`), and the native CPU ones (plain C, AVX2 or AVX-512
VNNI, + OpenMP), compiled on first use and called through ctypes. The GPU ones (Triton) are in
`groklm.kernels.triton`.

The source is `csrc/int8_matmul.c`; the shared library is cached under `$GROKLM_CACHE` (default
`~/.cache/groklm`) keyed by the source's and the flags' hash. It is built for AVX-512 VNNI where the
CPU has it, else for AVX2 (`isa()` says which). Without a C compiler or AVX2, `available()` is
False and callers use torch's kernels instead. `GROKLM_NATIVE=0` turns the native path off.

The kernels are exposed as the torch ops groklm::linear, groklm::moe and groklm::attend, whose CPU
implementations are C++ (`csrc/ops.cpp`, built on first use with torch's extension builder) or, where
that does not build, Python. torch.compile always calls the ops; eager mode calls the C++ ones too, or
else the Python functions directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor

KERNEL_CHOICES = ("auto", "triton", "off")
_kernels = os.environ.get("GROKLM_KERNELS", "auto")


def select(name: str) -> None:
    """Which kernels quantized models use: "auto" (Triton for CUDA tensors when triton is installed, the
    native ones on the CPU), "triton" (Triton for CPU tensors too, interpreted: for tests), "off" (no
    Triton). The default is $GROKLM_KERNELS, else auto."""
    global _kernels
    if name not in KERNEL_CHOICES:
        raise ValueError(f"GROKLM_KERNELS must be one of {', '.join(KERNEL_CHOICES)}, not {name!r}")
    _kernels = name


@functools.cache
def _has_triton() -> bool:
    import importlib.util

    return importlib.util.find_spec("triton") is not None


def use_triton(x: Tensor) -> bool:
    """Whether a quantized layer runs this bf16/fp16 input through the Triton kernels (never with autograd)."""
    if _kernels == "auto":
        return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not needs_grad(x) and _has_triton()
    if _kernels == "off":
        return False
    if _kernels != "triton":
        select(_kernels)  # raises, naming the bad value
    return x.dtype in (torch.bfloat16, torch.float16) and not needs_grad(x)


def needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()


_SOURCE = Path(__file__).parent / "csrc" / "int8_matmul.c"
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# AVX-512 VNNI (Intel Cascade Lake and later, AMD Zen 4 and later): fused int16 and int8 multiply-adds
# (vpdpwssd, vpdpbusd) and 32 vector registers. The same source, built with these, takes 4 activation
# rows against 4 int8 weight streams at once (3-8 rows, batches and MoE experts at batch 8, about 1.5x
# faster, measured on a Zen 4) and int4 panels of 16 rows a vector.
_VNNI_FLAGS = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
_VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


def _cache_dir() -> Path:
    return Path(os.environ.get("GROKLM_CACHE", Path.home() / ".cache" / "groklm"))


def _compile(compiler: str, flags: list[str]) -> Path | None:
    """The shared library built with these flags (cached by the source's and the flags' hash), or None
    if the compiler refuses them."""
    digest = hashlib.sha256(_SOURCE.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"int8_matmul-{digest}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        print(f"groklm: compiling the native CPU kernels, once (a few seconds), into {lib.parent}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            result = subprocess.run([compiler, *flags, str(_SOURCE), "-o", str(out)], capture_output=True, text=True)
            if result.returncode != 0:
                return None
            os.replace(out, lib)  # atomic: concurrent first uses never load a half-written file
    return lib


def _cpu_has_vnni() -> bool:
    if os.environ.get("GROKLM_ISA", "").lower() == "avx2":  # force the AVX2 build
        return False
    try:
        cpu = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in cpu.splitlines() if line.startswith("flags")), [])
    return _VNNI_CPU_FLAGS <= set(flags)


def isa() -> str | None:
    """The instruction set the kernels were built for: "avx512vnni" where the CPU has it, else "avx2";
    None without native kernels. `GROKLM_ISA=avx2` forces the AVX2 build."""
    built = _built()
    return built[1] if built else None


def _library() -> ctypes.CDLL | None:
    built = _built()
    return built[0] if built else None


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
    builds = [("avx512vnni", _VNNI_FLAGS)] if _cpu_has_vnni() else []
    found = next(
        (
            (lib, name)
            for name, flags in [*builds, ("avx2", [])]
            if (lib := _compile(compiler, [*_FLAGS, *flags, *extra]))
        ),
        None,
    )
    if found is None:
        return None
    lib, name = found
    cdll = ctypes.CDLL(str(lib))
    p, i = ctypes.c_void_p, ctypes.c_int
    cdll.groklm_chunk.argtypes, cdll.groklm_chunk.restype = [i, i, i], i
    cdll.groklm_linear.argtypes, cdll.groklm_linear.restype = [i, p, i, i, i, i, p, p, i, p, p, i, i], i
    fl = ctypes.c_float
    cdll.groklm_moe.argtypes, cdll.groklm_moe.restype = (
        [i, p, i, i, p, i, i, i, *[p, p, i] * 3, i, i, i, i, fl, i, p],
        i,
    )
    cdll.groklm_route.argtypes, cdll.groklm_route.restype = [p, i, i, p, i, i, fl, p, p], None
    cdll.groklm_attend.argtypes = [p, p, p, ctypes.c_long, p, i, i, i, i, i, fl, fl, fl, p, p]
    cdll.groklm_attend.restype = i
    cdll.groklm_set_tanh8.argtypes = cdll.groklm_set_exp8.argtypes = cdll.groklm_set_erf8.argtypes = [p]
    cdll.groklm_transpose8.argtypes = [p, ctypes.c_long, ctypes.c_long, p, ctypes.c_long]
    cdll.groklm_guard_sigbus.argtypes = [ctypes.c_char_p]
    # The MoE's GELU and the attention's soft-cap and softmax then run 8 lanes at a time, with torch's own functions.
    for setter, symbol in (
        (cdll.groklm_set_tanh8, "Sleef_tanhf8_u10"),
        (cdll.groklm_set_exp8, "Sleef_expf8_u10"),
        (cdll.groklm_set_erf8, "Sleef_erff8_u10"),
    ):
        if (fn := _torch_symbol(symbol)) is not None:
            setter(fn)
    ops = _cpu_ops()
    if ops is not None:  # the C++ ops call this library's kernels
        fns = (cdll.groklm_linear, cdll.groklm_moe, cdll.groklm_chunk, cdll.groklm_attend)
        ops.groklm_ops_set_kernels(*(ctypes.cast(f, ctypes.c_void_p).value for f in fns))
    return cdll, name


def rebuild() -> None:
    """Forget the loaded library and load (building it, or finding it in the cache) the one for the
    current environment, e.g. after setting GROKLM_ISA; the C++ ops then call its kernels."""
    _built.cache_clear()
    _built()  # now, so that the C++ ops call the kernels of the library for this environment


def _torch_symbol(name: str) -> int | None:
    """The address of a function exported by torch's CPU library (already loaded), or None."""
    try:
        return ctypes.cast(
            getattr(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")), name), ctypes.c_void_p
        ).value
    except (OSError, AttributeError):
        return None


def available() -> bool:
    return _library() is not None


# torch.compile takes it as a constant, not something to trace into: what
# torch.compiler.assume_constant_result marks, without importing torch._dynamo into every command.
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def is_block_major(weight: Tensor, scales: Tensor) -> bool:
    """Whether a weight is in its kernel's own layout, one dimension more than its scales: int8
    block-major [..., G, N, K/G], int4 panels [..., N/16, K/32, 256] (scales [..., N, G], for panels in
    panel order: `quant.scales_to_panels`); not in rows."""
    return weight.dim() == scales.dim() + 1


def in_features(weight: Tensor, scales: Tensor) -> int:
    """The input size K of an int8 weight, row-major [..., N, K] or block-major [..., G, N, K/G], or of a
    packed int4 one [..., N, K/2] or in panels [..., N/16, K/32, 256] (uint8), with scales [..., N, G]."""
    if weight.dtype == torch.uint8:
        return weight.shape[-2] * 32 if is_block_major(weight, scales) else weight.shape[-1] * 2
    if is_block_major(weight, scales):
        return weight.shape[-1] * scales.shape[-1]
    return weight.shape[-1]


def _fits(weight: Tensor, scales: Tensor, dtype: torch.dtype, in_features: int, block: int) -> bool:
    """CPU, contiguous, bf16 scales [N, G] (row-major weight [N, ...], or int8 block-major [G, N, K/G]),
    and each scale group a multiple of `block` columns."""
    groups = scales.shape[-1]
    blocked = is_block_major(weight, scales)
    lead = scales.dim() - 2
    if not blocked:
        rows = weight.dim() == scales.dim() and weight.shape[-2] == scales.shape[-2]
    elif dtype == torch.int8:  # block-major
        rows = weight.shape[lead] == groups and weight.shape[-2] == scales.shape[-2]
    else:  # int4 panels
        rows = weight.shape[-3] * 16 == scales.shape[-2] and weight.shape[-1] == 256
    return (
        lead >= 0
        and rows
        and weight.shape[:lead] == scales.shape[:lead]
        and weight.device.type == "cpu"
        and weight.dtype == dtype
        and scales.dtype == torch.bfloat16
        and weight.is_contiguous()
        and scales.is_contiguous()
        and in_features % groups == 0
        and (in_features // groups) % block == 0
        and available()
    )


def supports(weight: Tensor, scales: Tensor) -> bool:
    """Whether int8_matmul takes this weight [N, K] or [G, N, K/G] (int8) with bf16 scales [N, G]."""
    return _fits(weight, scales, torch.int8, in_features(weight, scales), 64)


def supports_int4(packed: Tensor, scales: Tensor) -> bool:
    """Whether int4_matmul takes this packed weight [N, K/2] or [N/16, K/32, 256] (uint8, in rows or in
    panels: `quant.to_panels`, the scales then in panel order) with bf16 scales [N, G]."""
    return _fits(packed, scales, torch.uint8, in_features(packed, scales), 32)


def transpose_into(dst: Tensor, src: Tensor) -> bool:
    """dst[...] = src.T for a 2-D one-byte src [rows, cols] and dst [cols, rows] whose rows may be a
    slice of a wider matrix (unit column stride), in one native call (tiled, threaded). Returns False,
    doing nothing, where the native library or these layouts are not there: the caller copies with torch."""
    lib = _library()
    if (
        lib is None
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
    lib.groklm_transpose8(src.data_ptr(), src.shape[0], src.shape[1], dst.data_ptr(), dst.stride(0))
    return True


def guard_mapped_files(what: str) -> None:
    """From now on, a bus error (a memory-mapped file that shrank under us) ends the process with a
    message naming `what` instead of a bare crash (see `groklm_guard_sigbus`). Without the native
    library, Python's faulthandler prints where it happened."""
    lib = _library()
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


def busy_cores(seconds: float = 0.2) -> float:
    """How many of the CPUs this process may use other processes keep busy: their non-idle time in
    /proc/stat over `seconds`, while this process sleeps. 0.0 where /proc/stat is not there."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def sample() -> tuple[int, int]:
        total = idle = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                total += sum(values)
                idle += values[3] + values[4]  # idle, iowait
        return total, idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return 0.0
    if total1 <= total0:
        return 0.0
    return len(cpus) * (1 - (idle1 - idle0) / (total1 - total0))


def choose_threads() -> int:
    """The number of compute threads to use: the CPUs this process may use, less those other
    processes keep busy (`busy_cores`), at least 1; `OMP_NUM_THREADS`, where set, decides instead.

    Every kernel splits its work evenly across its threads and waits for the last, so a thread that
    shares its core with a busy process holds all of them back: with one of two cores busy, two
    threads decoded `mini` at 60-140 tok/s and one thread at 185-205 (this machine, a loop in
    another process). `benchmarks/threads.py` measures it."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - round(busy_cores()))


Weight = tuple[Tensor, Tensor]
"""A quantized weight [N, K] (int8, or packed int4 [N, K/2]) and its bf16 scales [N, G]."""


def supports_linear(bits: int, parts: Sequence[Weight]) -> bool:
    """Whether `linear` takes these weights: each fits its kernel, and all share K and G."""
    fits = supports if bits == 8 else supports_int4
    return (
        bits in (4, 8)
        and all(fits(w, s) for w, s in parts)
        and len({in_features(w, s) for w, s in parts}) == 1
        and len({s.shape[-1] for _, s in parts}) == 1
        and len({is_block_major(w, s) for w, s in parts}) == 1
    )


@functools.cache
def _chunk(bits: int, k: int, groups: int) -> int:
    """Activation chunk: the C library's rule (groklm_chunk)."""
    lib = _library()
    assert lib is not None
    return lib.groklm_chunk(bits, k, k // groups)


def _pointers(ctype: type, values: Sequence[int]) -> ctypes.Array:
    return (ctype * len(values))(*values)


def _linear(bits: int, x: Tensor, parts: Sequence[Weight], out_dtype: torch.dtype) -> Tensor:
    """The Python implementation of groklm::linear (see `linear`), where the C++ one does not build."""
    lib = _library()
    if lib is None or not supports_linear(bits, parts):
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
    rc = lib.groklm_linear(
        bits, xb.data_ptr(), m, k, _chunk(bits, k, groups), len(parts),
        _pointers(ctypes.c_void_p, [w.data_ptr() for w, _ in parts]),
        _pointers(ctypes.c_void_p, [s.data_ptr() for _, s in parts]), groups,
        _pointers(ctypes.c_int, [s.shape[0] for _, s in parts]),
        y.data_ptr(), int(out_dtype == torch.bfloat16), int(is_block_major(*parts[0])),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native linear could not allocate its scratch for {m} rows")
    return y


# The kernels are torch ops, opaque to torch.compile (which fuses what lies between them). Decode calls
# them ~25 times a token, each time with caches its weights have just swept, where every Python and
# torch call around a kernel costs 7-50 us: so their CPU implementations are C++ (see `_cpu_ops`), and
# they are defined with a plain torch.library.Library, not custom_op, whose Python wrapping cost 90 us
# a call (measured: 396 against 309 us).
_OPS = torch.library.Library("groklm", "DEF")
_OPS.define("linear(int bits, Tensor x, Tensor[] weights, bool fp32) -> Tensor")
_OPS.define(
    "moe(Tensor x, Tensor router, int topk, int bits, Tensor[] weights, float router_cap, int gelu_erf) -> Tensor"
)
_OPS.define(
    "attend(Tensor q, Tensor k, Tensor v, Tensor mask, float multiplier, float softcap, float masked, "
    "Tensor? scale) -> Tensor"
)


def _linear_op(bits: int, x: Tensor, weights: list[Tensor], fp32: bool) -> Tensor:
    return _linear(
        bits, x, list(zip(weights[::2], weights[1::2], strict=True)), torch.float32 if fp32 else torch.bfloat16
    )


@torch.library.register_fake("groklm::linear")
def _(bits: int, x: Tensor, weights: list[Tensor], fp32: bool) -> Tensor:
    dtype = torch.float32 if fp32 else torch.bfloat16
    return x.new_empty(x.shape[0], sum(s.shape[0] for s in weights[1::2]), dtype=dtype)


def linear(bits: int, x: Tensor, parts: Sequence[Weight], out_dtype: torch.dtype = torch.bfloat16) -> list[Tensor]:
    """x [M, K] @ dequant(W_j).T for each int8 (bits 8) or packed int4 (bits 4) weight W_j with its
    scales, all sharing K and the scale layout, in one native call -> [M, N_j] each, in `out_dtype`
    (bf16 or fp32): views of one [M, N_0 + N_1 + ...] result. x is read as bf16; accumulation is fp32,
    rounded once at the end. One pass over all the weights: an attention layer's q, k and v together
    cost one call, not three. (The op returns one tensor, not a list: inductor's C++ wrapper, which
    `generate.compile_decode` uses, takes ops that return one.)"""
    if _NATIVE_OPS or torch.compiler.is_compiling():
        y = torch.ops.groklm.linear(bits, x, [t for part in parts for t in part], out_dtype == torch.float32)
    else:
        y = _linear(bits, x, parts, out_dtype)
    return list(y.split([s.shape[0] for _, s in parts], dim=1))


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant(weight [N, K] int8, scales [N, G]).T -> [M, N] in `out_dtype` (see `linear`)."""
    return linear(8, x, [(weight, scales)], out_dtype)[0]


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant_int4(packed [N, K/2], scales [N, G]).T -> [M, N], as int8_matmul."""
    return linear(4, x, [(packed, scales)], out_dtype)[0]


Expert = tuple[Tensor, Tensor]
"""Stacked expert weights [E, out, in] (int8, or packed int4 [E, out, in/2]) and bf16 scales [E, out, G]."""


def supports_moe(bits: int, w1: Expert, v: Expert, w2: Expert) -> bool:
    """Whether `moe` takes these experts: each fits its matmul kernel, and W1 and V share a scale layout."""
    fits = supports if bits == 8 else supports_int4
    return (
        bits in (4, 8)
        and all(fits(w, s) for w, s in (w1, v, w2))
        and w1[0].shape == v[0].shape
        and w1[1].shape == v[1].shape
    )


def _moe_op(x: Tensor, router: Tensor, topk: int, bits: int, weights: list[Tensor], router_cap: float,
            gelu_erf: int) -> Tensor:  # fmt: skip
    w1, s1, v, sv, w2, s2 = weights
    return _moe(x, router, topk, bits, (w1, s1), (v, sv), (w2, s2), router_cap, bool(gelu_erf))


@torch.library.register_fake("groklm::moe")
def _(
    x: Tensor, router: Tensor, topk: int, bits: int, weights: list[Tensor], router_cap: float, gelu_erf: int
) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.bfloat16)


@functools.cache
def _cpu_ops() -> ctypes.CDLL | None:
    """Registers the CPU implementations of the groklm ops, once: the C++ ones where
    they build (`_build_cpp_ops`), else the Python ones (`_linear`, `_moe`, `_attend`); `GROKLM_CPP_OPS=0`
    chooses Python. Returns the C++ library, or None."""
    global _NATIVE_OPS
    lib = _build_cpp_ops() if os.environ.get("GROKLM_CPP_OPS", "1") != "0" else None
    if lib is None:
        _OPS.impl("linear", _linear_op, "CPU")
        _OPS.impl("moe", _moe_op, "CPU")
        _OPS.impl("attend", _attend, "CPU")
    _NATIVE_OPS = lib is not None
    return lib


def _build_cpp_ops() -> ctypes.CDLL | None:
    """`csrc/ops.cpp` built with torch's extension builder (needs ninja and a C++ compiler) into
    `$GROKLM_CACHE`, and loaded; None if it does not build.

    The build directory is keyed by the source's hash, torch's version and where this torch is
    installed: torch's builder rebuilds whenever its include paths change, so two virtual
    environments sharing a directory would rebuild each other's ops at every start. A built library
    is loaded as it is, without asking the builder (or waiting on its lock). A build holds an
    advisory lock (`flock`), which the kernel drops when its process dies: torch's own lock file,
    left behind by a build that was killed, made every later process wait on it forever; holding
    ours, any such file is stale and is removed."""
    source = _SOURCE.parent / "ops.cpp"
    key = source.read_bytes() + torch.__version__.encode() + str(Path(torch.__file__).parent).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    build, name = _cache_dir() / f"ops-{digest}", f"groklm_ops_{digest}"
    built = build / f"{name}.so"
    try:
        if not built.exists():
            from torch.utils import cpp_extension

            build.mkdir(parents=True, exist_ok=True)
            with _build_lock(build):
                if not built.exists():
                    print(f"groklm: building the C++ kernel ops, once (~20 s), into {build}", file=sys.stderr)
                    (build / "lock").unlink(missing_ok=True)  # torch's, stale: we hold the only build lock
                    cpp_extension.load(
                        name, [str(source)], extra_cflags=["-O2"], build_directory=str(build),
                        is_python_module=False, verbose=False,
                    )  # fmt: skip
        lib = ctypes.CDLL(str(built))
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError):  # no ninja, no C++ compiler, ...
        return None
    lib.groklm_ops_set_kernels.argtypes = [ctypes.c_void_p] * 4
    return lib


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on `directory`/groklm.lock, held while building there: a second
    process waits for the first build (saying so), and a process that dies drops its lock."""
    with open(directory / "groklm.lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"groklm: waiting for another process building in {directory}", file=sys.stderr)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_NATIVE_OPS = False  # the ops' CPU implementations are the C++ ones: eager mode calls them too


def moe(x: Tensor, router: Tensor, topk: int, bits: int, w1: Expert, v: Expert, w2: Expert, router_cap: float = 0.0,
        gelu_erf: bool = False) -> Tensor:  # fmt: skip
    """One MoE layer in one native call, routing included: x [N, D] bf16, router [E, D] fp32 -> bf16
    [N, D] = sum over the top-k experts e of softmax(router x)[e] * expert_e(x), as `MoE.forward`
    computes it (see `groklm_moe`); Grok-2's router logits capped at `router_cap` (0: none) and its
    erf GELU with `gelu_erf`.

    Reads only the chosen experts' weights, each once for all the tokens that chose it; no host
    synchronisation on the routing.
    """
    if _NATIVE_OPS or torch.compiler.is_compiling():
        return torch.ops.groklm.moe(x, router, topk, bits, [*w1, *v, *w2], router_cap, int(gelu_erf))
    return _moe(x, router, topk, bits, w1, v, w2, router_cap, gelu_erf)


def _moe(x: Tensor, router: Tensor, topk: int, bits: int, w1: Expert, v: Expert, w2: Expert, router_cap: float = 0.0,
         gelu_erf: bool = False) -> Tensor:  # fmt: skip
    """The Python implementation of groklm::moe (see `moe`), where the C++ one does not build."""
    lib = _library()
    if lib is None or not supports_moe(bits, w1, v, w2):
        raise ValueError(f"the native int{bits} MoE does not take these experts: {tuple(w1[0].shape)}")
    e, f = w1[1].shape[:2]
    d = in_features(*w1)
    if in_features(*w2) != f or tuple(w2[1].shape[:2]) != (e, d):
        raise ValueError(f"expert shapes {tuple(w1[0].shape)}, {tuple(w2[0].shape)} do not fit together")
    chunk_d, chunk_f = _chunk(bits, d, w1[1].shape[-1]), _chunk(bits, f, w2[1].shape[-1])
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
    rc = lib.groklm_moe(
        bits, xb.data_ptr(), n, d, router.data_ptr(), topk, e, f, *weights, chunk_d, chunk_f, *blocked, router_cap,
        int(gelu_erf), y.data_ptr(),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native MoE could not allocate its scratch for {n} tokens")
    return y


def route(x: Tensor, router: Tensor, topk: int, router_cap: float = 0.0) -> tuple[Tensor, Tensor]:
    """The routing `moe` computes (the same native function): x [N, D] bf16, router [E, D] fp32 -> gates
    [N, k] fp32 (softmax probabilities, not renormalised) and expert ids [N, k] int64, best first."""
    lib = _library()
    if lib is None:
        raise ValueError("the native kernels are not available")
    n, d = x.shape
    e = router.shape[0]
    xb, r = x.to(torch.bfloat16).contiguous(), router.float().contiguous()
    experts = torch.empty(n, topk, dtype=torch.int32)
    gates = torch.empty(n, topk, dtype=torch.float32)
    lib.groklm_route(xb.data_ptr(), n, d, r.data_ptr(), e, topk, router_cap, experts.data_ptr(), gates.data_ptr())
    return gates, experts.long()


def supports_attend(q: Tensor, k: Tensor) -> bool:
    """Whether `attend` takes this query [B, H, G, Dh] and cache [B, S, H, Dh] (or its prefix)."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == torch.bfloat16
        and q.dim() == k.dim() == 4
        and q.shape[3] % 8 == 0
        and k.stride()[1:] == (k.shape[2] * k.shape[3], k.shape[3], 1)
        and available()
    )


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
           scale: Tensor | None = None) -> Tensor:  # fmt: skip
    """The attention of one new token per row over its cache, in one native call: q [B, H, G, Dh] (G
    query heads per kv head, rotated), k and v [B, S, H, Dh] (a prefix of the cache), mask [B, S]
    bool -> [B, H, G, Dh], all bf16 but the mask (see `groklm_attend`); `scale` [B] fp32 multiplies
    each row's capped scores (Grok-2's temperature). Nothing is copied: the torch path turns the whole
    cache into fp32 for two matmuls every step."""
    if _NATIVE_OPS or torch.compiler.is_compiling():
        return torch.ops.groklm.attend(q, k, v, mask, multiplier, softcap, masked, scale)
    return _attend(q, k, v, mask, multiplier, softcap, masked, scale)


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
            scale: Tensor | None = None) -> Tensor:  # fmt: skip
    """The Python implementation of groklm::attend (see `attend`), where the C++ one does not build."""
    lib = _library()
    if lib is None or not supports_attend(q, k) or k.shape != v.shape or k.stride() != v.stride():
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
    rc = lib.groklm_attend(
        qc.data_ptr(), k.data_ptr(), v.data_ptr(), k.stride(0), mc.data_ptr(), b, k.shape[1], h, g, dh,
        multiplier, softcap, masked, None if sc is None else sc.data_ptr(), o.data_ptr(),
    )  # fmt: skip
    if rc:
        raise MemoryError(f"the native attention could not allocate its scores for {k.shape[1]} slots")
    return o


@torch.library.register_fake("groklm::attend")
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
      scale: Tensor | None) -> Tensor:  # fmt: skip
    return torch.empty_like(q, memory_format=torch.contiguous_format)
