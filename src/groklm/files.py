"""What every layer shares for files and memory: the error for a bad input file, JSON read within
limits, an output directory that appears only once complete, memory advice, progress bars. It imports
nothing of groklm, so anything may import it."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import Tensor, nn


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt, mis-shaped or unsafe. The message names
    the file, and the tensor or parameter where there is one."""


MAX_JSON = 16 << 20  # a config, tokenizer or adapter file; safetensors headers pass their own limit
MAX_JSON_DEPTH = 64


def _json_depth(data: bytes) -> int:
    """How deep JSON text nests, found in a few vectorized passes: escapes dropped left to right (as a
    parser reads them), what lies between quotes is string, the brackets outside count."""
    import numpy as np

    b = np.frombuffer(data.replace(b"\\\\", b"").replace(b'\\"', b""), dtype=np.uint8)
    outside = np.cumsum(b == ord('"')) % 2 == 0
    step = (((b == ord("[")) | (b == ord("{"))).astype(np.int8) - ((b == ord("]")) | (b == ord("}")))) * outside
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def parse_json(raw: bytes | str, where: str, limit: int = MAX_JSON, depth: int = MAX_JSON_DEPTH) -> Any:
    """JSON text parsed within a size and a nesting limit (Python's parser recurses: deep nesting would
    end in RecursionError). Errors are CheckpointErrors that begin with `where`."""
    data = raw.encode() if isinstance(raw, str) else bytes(raw)
    if len(data) > limit:
        raise CheckpointError(f"{where}: {len(data)} bytes of JSON, more than the {limit} allowed")
    if data.count(b"[") + data.count(b"{") > depth and _json_depth(data) > depth:
        raise CheckpointError(f"{where}: JSON nested more than {depth} deep")
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{where}: not valid JSON ({e})") from None


def read_json(path: str | os.PathLike[str], limit: int = MAX_JSON, kind: type | None = None) -> Any:
    """A JSON file parsed as `parse_json` does (the file named in every error); `kind` (dict, say) is
    the type the top level must have."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > limit:
            raise CheckpointError(f"{path}: {size} bytes, more than the {limit} allowed for a JSON file")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None
    value = parse_json(raw, str(path), limit)
    if kind is not None and not isinstance(value, kind):
        raise CheckpointError(
            f"{path}: must hold a JSON {_JSON_KINDS.get(kind, kind.__name__)}, not {type(value).__name__}"
        )
    return value


_JSON_KINDS = {dict: "object", list: "array", str: "string"}


_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def advise_huge_pages(tensors: Iterable[Tensor]) -> None:
    """Ask Linux to back these tensors (large, on the CPU, not yet written) with 2 MB pages: madvise
    MADV_HUGEPAGE, for kernels where transparent huge pages are "madvise" only, as is common.
    Decoding streams every weight per token: on a 2-core Zen 4 VM a large reduction read huge-page
    memory 3-4% faster (57 of 60 alternating trials). A no-op off Linux and for tensors under 2 MB."""
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    for t in tensors:
        if t.device.type != "cpu":
            continue
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        lo, hi = -(-start // _HUGE_PAGE) * _HUGE_PAGE, end // _HUGE_PAGE * _HUGE_PAGE
        if hi > lo:
            madvise(lo, hi - lo, _MADV_HUGEPAGE)  # advice: a refusal changes nothing


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps tens of MB chunks it has freed, so without
    this a conversion's footprint creeps up layer by layer: measured 5 layers' worth after 6)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...
    def set_postfix(self, **_: Any) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tensor", initial: int = 0,
                 leave: bool = False) -> Any:  # fmt: skip
    """A tqdm bar on stderr (bytes get B/s and an ETA with unit="B"), or one that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                leave=leave, file=sys.stderr, initial=initial)  # fmt: skip


def parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@contextlib.contextmanager
def output_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """A directory to write a checkpoint into that becomes `out` only once everything is written:
    a failure or Ctrl-C leaves nothing half-written behind. An existing, non-empty `out` is refused
    unless `force` (then it is replaced, at the end)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (--force, or force=True, replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
