"""What every on-disk format shares: the error type, memory placement, progress, sizes."""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import math
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
        raise CheckpointError(f"{path}: must hold a JSON {_JSON_KINDS.get(kind, kind.__name__)}, not {type(value).__name__}")
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


class DiskArray:
    """A row-major array in a file (`shape` elements of `dtype` at byte `offset`) whose slices are read
    with plain positioned reads of their contiguous runs only: a tensor-parallel rank reads its own
    share of a weight, never the whole of it. `transposed` presents the last two axes swapped (the
    released [in, out] weights as our [out, in]): the slices are taken in our order, read in the
    file's, and the result transposed."""

    def __init__(self, path: str | os.PathLike[str], offset: int, shape: tuple[int, ...], dtype: Any,
                 transposed: bool = False) -> None:  # fmt: skip
        self.path, self.offset, self.file_shape, self.dtype, self.transposed = (
            Path(path),
            offset,
            shape,
            dtype,
            transposed,
        )
        self.shape = (*shape[:-2], shape[-1], shape[-2]) if transposed else shape

    def read(self, slices: tuple[slice, ...] | None = None) -> Any:
        import torch

        slices = tuple(slices or ()) + (slice(None),) * (len(self.shape) - len(slices or ()))
        want = [range(*s.indices(n)) for s, n in zip(slices, self.shape, strict=True)]
        if self.transposed:
            want = [*want[:-2], want[-1], want[-2]]  # in the file's order
        shape = self.file_shape
        out = torch.empty([len(r) for r in want], dtype=self.dtype)
        itemsize = out.element_size()
        # The longest run: the trailing axes read whole, and the one before them as far as it goes.
        d = len(shape) - 1
        while d > 0 and len(want[d]) == shape[d]:
            d -= 1
        run = len(want[d]) * math.prod(shape[d + 1 :])  # elements
        strides = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        buf = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
        with open(self.path, "rb") as f:
            fd = f.fileno()
            pos = 0
            for index in itertools.product(*want[:d]):
                start = sum(i * st for i, st in zip(index, strides, strict=False)) + want[d].start * strides[d]
                n = run * itemsize
                got = os.preadv(fd, [buf[pos : pos + n]], self.offset + start * itemsize)
                if got != n:
                    raise CheckpointError(f"{self.path}: file ended inside its data (truncated)")
                pos += n
        return out.transpose(-1, -2).contiguous() if self.transposed else out


class TensorArray:
    """A tensor in memory with DiskArray's interface (small arrays stored inside a pickle's frames)."""

    def __init__(self, tensor: Any, transposed: bool = False) -> None:
        self.tensor = tensor.transpose(-1, -2) if transposed else tensor
        self.shape = tuple(self.tensor.shape)
        self.dtype = self.tensor.dtype

    def read(self, slices: tuple[slice, ...] | None = None) -> Any:
        t = self.tensor
        for dim, s in enumerate(slices or ()):
            t = t[(slice(None),) * dim + (s,)]
        return t.contiguous().clone()


class BlockMajorArray:
    """A block-major int8 weight on disk ([.., G, out, in/G]) read as its row-major [.., out, in]: an
    input slice of whole blocks, or within one, reads those blocks' bytes only."""

    def __init__(self, disk: DiskArray | TensorArray) -> None:
        self.disk = disk
        *lead, g, out, cols = disk.shape
        self.groups, self.cols = g, cols
        self.shape = (*lead, out, g * cols)

    def read(self, slices: tuple[slice, ...] | None = None) -> Any:
        slices = tuple(slices or ()) + (slice(None),) * (len(self.shape) - len(slices or ()))
        *lead, rows, cols = slices
        start, stop, _ = cols.indices(self.shape[-1])
        b0, b1 = start // self.cols, (stop - 1) // self.cols + 1
        if b1 - b0 > 1 and (start % self.cols or stop % self.cols):
            raise ValueError(f"input columns {start}..{stop} straddle blocks of {self.cols}")
        inner = slice(start - b0 * self.cols, stop - b0 * self.cols) if b1 - b0 == 1 else slice(None)
        part = self.disk.read((*lead, slice(b0, b1), rows, inner))  # [.., blocks, out, cols]
        return part.movedim(-3, -2).flatten(-2)
