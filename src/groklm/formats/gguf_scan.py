"""A bounded pre-scan of a GGUF file's header, metadata and tensor table, before the `gguf` package sees it.

The `gguf` package trusts the counts it reads: an array claiming 2^62 items makes it loop (and grow) for
ever, a kv count of 2^63 ends in a KeyError. Here every count is checked against the bytes left before
anything is read (each item takes at least its minimum size), arrays nest at most `MAX_NESTING` deep, and
every tensor's data must lie inside the file, aligned, and overlap no other: the checks the safetensors
reader makes. Layout (little-endian): b"GGUF", version u32, tensor count u64, kv count u64; each kv a
string key, a u32 type and the value (a string is a u64 length and bytes; an array a u32 item type, a
u64 count and the items); each tensor a string name, u32 n_dims, u64 dims (fastest first), u32 type,
u64 offset into the data, which starts at the next multiple of `general.alignment` (32 by default).
"""

from __future__ import annotations

import itertools
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from groklm.files import CheckpointError

MAX_NESTING = 2  # an array of arrays at most (none in a grok GGUF)
MAX_DIMS = 4  # ggml's
_SCALARS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}  # fmt: skip
_MIN_SIZE = {**{t: struct.calcsize(f) for t, f in _SCALARS.items()}, GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}


@dataclass(frozen=True)
class Array:
    """An array value, skipped over: its item type and count (a grok GGUF reads none of its arrays)."""

    item: str
    count: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy's order (slowest first)
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file
    nbytes: int


@dataclass(frozen=True)
class Scan:
    fields: dict[str, Any]  # scalars and strings as values, arrays as Array
    tensors: dict[str, TensorInfo]
    data_start: int


class _Cursor:
    def __init__(self, data: Any, path: Path) -> None:
        self.data, self.path, self.pos, self.size = data, path, 0, len(data)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise CheckpointError(f"{self.path}: {what} needs {n} bytes at byte {self.pos}, "
                                  f"{self.size - self.pos} are left: truncated or corrupt")  # fmt: skip

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", what)
        if limit is not None and n > limit:
            raise CheckpointError(f"{self.path}: {what} is {n} bytes long, more than {limit}")
        self.need(n, f"{what} ({n} bytes)")
        raw = self.data[self.pos : self.pos + n]
        self.pos += n
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: {what} is not UTF-8") from None

    def value(self, kind: int, key: str, depth: int = 0) -> Any:
        if kind in _SCALARS:
            return self.unpack(_SCALARS[GGUFValueType(kind)], f"key {key}")
        if kind == GGUFValueType.STRING:
            return self.string(f"key {key}")
        if kind != GGUFValueType.ARRAY:
            raise CheckpointError(f"{self.path}: key {key}: unknown value type {kind}")
        item = self.unpack("<I", f"key {key}")
        count = self.unpack("<Q", f"key {key}")
        if item not in _MIN_SIZE:
            raise CheckpointError(f"{self.path}: key {key}: array of unknown item type {item}")
        if item == GGUFValueType.ARRAY and depth + 1 >= MAX_NESTING:
            raise CheckpointError(f"{self.path}: key {key}: arrays nested more than {MAX_NESTING} deep")
        name = GGUFValueType(item).name
        least = count * _MIN_SIZE[GGUFValueType(item)]
        if least > self.size - self.pos:
            raise CheckpointError(f"{self.path}: key {key}: an array of {count} {name} items needs at least {least} "
                                  f"bytes, {self.size - self.pos} are left")  # fmt: skip
        if item in _SCALARS:
            self.pos += least
        else:
            for _ in range(count):
                self.value(item, key, depth + 1)
        return Array(name, count)


def scan(path: str | Path) -> Scan:
    """The metadata and tensor table of a GGUF file, every count and extent checked (see the module)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise CheckpointError(f"{path}: {size} bytes, too short for a GGUF header")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return _scan(_Cursor(data, path))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read it ({e.strerror or e})") from None


def _scan(c: _Cursor) -> Scan:
    path = c.path
    if c.data[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file")
    c.pos = 4
    version = c.unpack("<I", "the version")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version}; versions 2 and 3 are read (little-endian)")
    n_tensors, n_kv = c.unpack("<Q", "the tensor count"), c.unpack("<Q", "the kv count")
    if n_kv * 13 > c.size - c.pos:  # key length 8, type 4, a value of at least 1 byte
        raise CheckpointError(f"{path}: the kv count {n_kv} needs at least {n_kv * 13} bytes, "
                              f"{c.size - c.pos} are left")  # fmt: skip
    fields: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"key {i}", limit=1 << 16)
        if key in fields:
            raise CheckpointError(f"{path}: key {key} appears twice")
        fields[key] = c.value(c.unpack("<I", f"key {key}"), key)
    if n_tensors * 32 > c.size - c.pos:  # name length 8, n_dims 4, a dim 8, type 4, offset 8
        raise CheckpointError(f"{path}: the tensor count {n_tensors} needs at least {n_tensors * 32} bytes, "
                              f"{c.size - c.pos} are left")  # fmt: skip
    infos = []
    for i in range(n_tensors):
        name = c.string(f"tensor {i}'s name", limit=1 << 10)
        n_dims = c.unpack("<I", f"tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CheckpointError(f"{path}: tensor {name}: {n_dims} dimensions, not 1..{MAX_DIMS}")
        dims = [c.unpack("<Q", f"tensor {name}") for _ in range(n_dims)]
        kind, offset = c.unpack("<I", f"tensor {name}"), c.unpack("<Q", f"tensor {name}")
        infos.append((name, dims, kind, offset))
    alignment = fields.get("general.alignment", 32)
    if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: key general.alignment = {alignment!r} is not a power of 2")
    start = -(-c.pos // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, kind, offset in infos:
        where = f"{path}: tensor {name}"
        if name in tensors:
            raise CheckpointError(f"{where}: appears twice")
        try:
            qtype = GGMLQuantizationType(kind)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise CheckpointError(f"{where}: unknown ggml type {kind}") from None
        if 0 in dims or dims[0] % block:
            raise CheckpointError(f"{where}: dimensions {dims} do not hold whole {qtype.name} blocks of {block}")
        numel = 1
        for n in dims:
            numel *= n
        nbytes = numel // block * type_size
        if offset % alignment:
            raise CheckpointError(f"{where}: data offset {offset} is not a multiple of the alignment {alignment}")
        if start + offset + nbytes > c.size:
            raise CheckpointError(f"{where}: its data needs {start + offset + nbytes} bytes, the file has {c.size}: "
                                  "truncated or corrupt")  # fmt: skip
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), qtype, start + offset, nbytes)
    spans = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in itertools.pairwise(spans):
        if b.offset < a.offset + a.nbytes:
            raise CheckpointError(f"{path}: tensors {a.name} and {b.name} overlap")
    return Scan(fields, tensors, start)
