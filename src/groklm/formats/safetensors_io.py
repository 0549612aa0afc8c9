"""safetensors files read and written one tensor at a time, with every error naming the file and tensor.

The `safetensors` package reads a file by memory-mapping all of it and writes one by serialising all
of it in memory first. Neither suits a 300 GB model: a file that shrinks under a map kills the
process with SIGBUS, and a shard of experts would be held twice. The format itself is simple (an
8-byte little-endian header length, a JSON header of name -> dtype, shape, [start, end) offsets, then
the data), so here the header is parsed and checked, copies are plain reads into the destination
(a short read is an error naming the file, not a crash), maps are private and guarded, and writing
streams each tensor as it comes. Files written here are read back by `safetensors` in the tests.
"""

from __future__ import annotations

import itertools
import json
import mmap
import struct
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from groklm.files import CheckpointError, parse_json

MAX_HEADER = 100 << 20  # the safetensors package's own limit
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
_READ_CHUNK = 64 << 20


@dataclass(frozen=True)
class Entry:
    """One tensor of a safetensors file: where its bytes lie."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # from the start of the file
    nbytes: int

    @property
    def dtype_name(self) -> str:
        return NAMES[self.dtype]

    def where(self) -> str:
        return f"{self.file}: tensor {self.name}"


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """The tensors of a safetensors file and its metadata, checked: a sane header length, valid JSON,
    known dtypes, shapes and byte counts that agree, data inside the file, no overlaps."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
            (length,) = struct.unpack("<Q", head)
            if length > min(MAX_HEADER, size - 8):
                raise CheckpointError(
                    f"{path}: not a safetensors file or truncated: its header claims {length} bytes, "
                    f"the file has {size - 8} after the length"
                )
            raw = f.read(length)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    try:
        header = parse_json(raw, str(path), MAX_HEADER, depth=4)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: corrupt safetensors header ({str(e).removeprefix(f'{path}: ')})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base = 8 + length
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
    entries: dict[str, Entry] = {}
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name}"
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            raise CheckpointError(
                f"{where}: unknown dtype {str(info.get('dtype') if isinstance(info, dict) else info)[:40]}"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(type(n) is int and n >= 0 for n in shape)):
            raise CheckpointError(f"{where}: malformed shape {str(shape)[:60]}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(n) is int for n in offsets)):
            raise CheckpointError(f"{where}: malformed data_offsets {str(offsets)[:60]}")
        start, end = offsets
        dtype = DTYPES[info["dtype"]]
        numel = 1
        for n in shape:
            numel *= n
        if not 0 <= start <= end or end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{where}: data_offsets {offsets} do not hold {shape} {info['dtype']}")
        if base + end > size:
            raise CheckpointError(
                f"{where}: data ends at byte {base + end}, past the end of the file ({size} bytes): truncated"
            )
        entries[name] = Entry(path, name, dtype, tuple(shape), base + start, end - start)
        spans.append((start, end, name))
    spans.sort()
    for (_, end0, a), (start1, _, b) in itertools.pairwise(spans):
        if start1 < end0:
            raise CheckpointError(f"{path}: tensors {a} and {b} overlap")
    return entries, {str(k): str(v) for k, v in metadata.items()}


def read_into(entry: Entry, dst: Tensor) -> None:
    """Copy a tensor's bytes from its file into `dst` (same dtype and element count; contiguous CPU
    memory, or any device through a bounce buffer), in bounded plain reads."""
    if dst.dtype != entry.dtype or dst.numel() * dst.element_size() != entry.nbytes:
        raise CheckpointError(
            f"{entry.where()}: {entry.dtype_name} {entry.shape} does not fit {dst.dtype} {tuple(dst.shape)}"
        )
    if dst.device.type != "cpu" or not dst.is_contiguous():
        tmp = torch.empty(dst.shape, dtype=dst.dtype)
        read_into(entry, tmp)
        dst.copy_(tmp)
        return
    if entry.nbytes == 0:
        return
    buf = memoryview(dst.view(-1).view(torch.uint8).numpy())
    with open(entry.file, "rb") as f:
        f.seek(entry.offset)
        done = 0
        while done < entry.nbytes:
            n = f.readinto(buf[done : done + _READ_CHUNK])
            if not n:
                raise CheckpointError(f"{entry.where()}: file ended inside the tensor's data (truncated)")
            done += n


def read_tensor(entry: Entry) -> Tensor:
    """A tensor's data, read into new memory."""
    t = torch.empty(entry.shape, dtype=entry.dtype)
    read_into(entry, t)
    return t


class MappedFile:
    """A private (copy-on-write) map of a whole file: tensors made from it are paged in on use and
    keep the map alive. A write to such a tensor copies the page; nothing reaches the file."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if path.stat().st_size else None

    def tensor(self, entry: Entry) -> Tensor:
        if entry.nbytes == 0 or self.map is None:
            return torch.empty(entry.shape, dtype=entry.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.frombuffer(self.map, dtype=entry.dtype, count=entry.nbytes // entry.dtype.itemsize,
                                    offset=entry.offset)  # fmt: skip
        return flat.view(entry.shape)


def write_file(path: Path, tensors: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
               data: Iterator[Tensor | Iterable[Tensor]], metadata: dict[str, str] | None = None) -> None:  # fmt: skip
    """Write a safetensors file whose tensors (name, dtype, shape, in this order) are announced first
    and whose data `data` yields one tensor at a time, in the same order, or for a large one an
    iterable of chunks along its first axis: memory holds one tensor (or chunk), not the file. The
    header is padded to 8 bytes, as the safetensors package writes it."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    layout = list(tensors)
    offset = 0
    for name, dtype, shape in layout:
        numel = 1
        for n in shape:
            numel *= n
        header[name] = {
            "dtype": NAMES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + numel * dtype.itemsize],
        }
        offset += numel * dtype.itemsize
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for (name, dtype, shape), item in zip(layout, data, strict=True):
            rows = 0
            for t in [item] if isinstance(item, Tensor) else item:
                if t.dtype != dtype or tuple(t.shape[1:]) != tuple(shape[1:]) or t.dim() != len(shape):
                    raise ValueError(
                        f"{path}: tensor {name} came as {t.dtype} {tuple(t.shape)}, announced {dtype} {shape}"
                    )
                _write_tensor(f, t)
                rows += t.shape[0] if t.dim() else 1
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{path}: tensor {name} came with {rows} rows, announced {shape}")


def _write_tensor(f: BinaryIO, t: Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    if t.numel():
        f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
