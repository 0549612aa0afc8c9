"""Building the native code on first use, into a cache: the C kernels (`csrc/groklm.c` and the files it
includes) with a C compiler, and the C++ ops (`csrc/ops.cpp`) with torch's extension builder.

Both are cached under `$GROKLM_CACHE` (default `~/.cache/groklm`), keyed by a hash of their sources and
flags, so that a changed source or flag builds anew and concurrent first uses never see a half-built file."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
KERNELS_SOURCE = CSRC / "groklm.c"
"""The C kernels' one translation unit; it includes the other .c and .h files of csrc/."""


def cache_dir() -> Path:
    return Path(os.environ.get("GROKLM_CACHE", Path.home() / ".cache" / "groklm"))


def kernel_sources() -> list[Path]:
    """Every file the C library is built from: a change to any of them builds it anew."""
    return sorted(p for p in CSRC.iterdir() if p.suffix in (".c", ".h"))


def compile_kernels(compiler: str, flags: list[str]) -> Path | None:
    """The shared library built with these flags (cached by its sources' and the flags' hash), or None
    if the compiler refuses them."""
    digest = hashlib.sha256()
    for source in kernel_sources():
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    digest.update(" ".join(flags).encode())
    lib = cache_dir() / f"groklm-{digest.hexdigest()[:16]}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        print(f"groklm: compiling the native CPU kernels, once (a few seconds), into {lib.parent}", file=sys.stderr)
        with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
            out = Path(tmp) / lib.name
            command = [compiler, *flags, str(KERNELS_SOURCE), "-o", str(out)]
            if subprocess.run(command, capture_output=True, text=True).returncode != 0:
                return None
            os.replace(out, lib)  # atomic: concurrent first uses never load a half-written file
    return lib


CPP_FLAGS = ["-O2", "-ffp-contract=off"]
"""Without contraction a product and a sum round apart, as torch's one-op-a-tensor code rounds them
(the decode block's glue in ops.cpp matches model.py bit for bit)."""


def build_cpp_ops() -> ctypes.CDLL | None:
    """`csrc/ops.cpp` built with torch's extension builder (needs ninja and a C++ compiler) into
    `$GROKLM_CACHE`, and loaded; None if it does not build.

    The build directory is keyed by the source's hash, torch's version and where this torch is
    installed: torch's builder rebuilds whenever its include paths change, so two virtual
    environments sharing a directory would rebuild each other's ops at every start. A built library
    is loaded as it is, without asking the builder (or waiting on its lock). A build holds an
    advisory lock (`flock`), which the kernel drops when its process dies: torch's own lock file,
    left behind by a build that was killed, made every later process wait on it forever; holding
    ours, any such file is stale and is removed."""
    source = CSRC / "ops.cpp"
    key = source.read_bytes() + torch.__version__.encode() + str(Path(torch.__file__).parent).encode()
    key += " ".join(CPP_FLAGS).encode()
    digest = hashlib.sha256(key).hexdigest()[:16]
    build, name = cache_dir() / f"ops-{digest}", f"groklm_ops_{digest}"
    built = build / f"{name}.so"
    try:
        if not built.exists():
            from torch.utils import cpp_extension

            build.mkdir(parents=True, exist_ok=True)
            with build_lock(build):
                if not built.exists():
                    print(f"groklm: building the C++ kernel ops, once (~20 s), into {build}", file=sys.stderr)
                    (build / "lock").unlink(missing_ok=True)  # torch's, stale: we hold the only build lock
                    cpp_extension.load(
                        name, [str(source)], extra_cflags=CPP_FLAGS, build_directory=str(build),
                        is_python_module=False, verbose=False,
                    )  # fmt: skip
        lib = ctypes.CDLL(str(built))
    except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError):  # no ninja, no C++ compiler, ...
        return None
    lib.groklm_ops_set_kernels.argtypes = [ctypes.c_void_p] * 4
    return lib


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
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
