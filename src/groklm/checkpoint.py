"""The released Grok-1 checkpoint format (`ckpt-0/tensorNNNNN_000`): a safe reader, a streaming loader, a writer.

Each file is one pickle of one parameter: a numpy array, or a `QuantizedWeight8bit` holding an int8
array and its bf16 scales. Pickle runs code, and these files come from strangers, so we never let
pickle build anything itself: `SafeUnpickler` maps the handful of globals such a file may name to
inert stand-ins that only record shape, dtype and where the bytes are, and refuses every other
global. Tensor bytes stay on disk until the loader copies them, a bounded chunk at a time, straight
into a model built on the meta device: no /dev/shm copy and no second copy of the model.

File order is the flattened parameter tree, dict keys sorted as strings (so layers go 0, 1, 10, 11,
..., 2, 20, ...). `reference_params` derives the whole table from a config.
"""

from __future__ import annotations

import ctypes
import io
import json
import mmap
import os
import pickle
import struct
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.model import Grok
from groklm.quant import Int8ExpertLinear, Int8Linear, fill_int8_head, int8_head, quantize_int8, quantize_weight


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, truncated, corrupt, mis-shaped or unsafe."""


# ---------------------------------------------------------------------------------------------
# The parameter table of the released format.

# Per decoder layer: reference module path -> our module path. Expert tensors have a leading axis E.
_LAYER_PARAMS: dict[str, str] = {
    "moe/linear": "moe.w1",
    "moe/linear_1": "moe.w2",
    "moe/linear_v": "moe.v",
    "multi_head_attention/key": "attn.wk",
    "multi_head_attention/linear": "attn.wo",
    "multi_head_attention/query": "attn.wq",
    "multi_head_attention/value": "attn.wv",
    "rms_norm": "attn_norm",
    "rms_norm_1": "attn_out_norm",
    "rms_norm_2": "moe_norm",
    "rms_norm_3": "moe_out_norm",
    "router": "moe.router",
}
# Scale groups over the input rows in the released int8 files (the attention output and expert down
# projections are split in 8 blocks, everything else has one scale per output column).
RELEASED_GROUPS: dict[str, int] = {
    "moe/linear": 1,
    "moe/linear_1": 8,
    "moe/linear_v": 1,
    "multi_head_attention/key": 1,
    "multi_head_attention/linear": 8,
    "multi_head_attention/query": 1,
    "multi_head_attention/value": 1,
}


@dataclass(frozen=True)
class RefParam:
    index: int
    name: str  # reference name, e.g. transformer/decoder_layer_3/router/w
    module: str  # our module path, e.g. layers.3.moe.router
    kind: str  # "embed" | "norm" | "router" | "linear" (maybe int8, stored [.., in, out])
    shape: tuple[int, ...]  # reference layout
    groups: int | None  # scale groups when written by us in the released layout

    @property
    def file(self) -> str:
        return f"tensor{self.index:05d}_000"


def reference_params(config: GrokConfig) -> list[RefParam]:
    c = config
    d, f, e = c.emb_size, c.ffn_size, c.num_experts
    shapes = {
        "moe/linear": (e, d, f),
        "moe/linear_1": (e, f, d),
        "moe/linear_v": (e, d, f),
        "multi_head_attention/key": (d, c.kv_size),
        "multi_head_attention/linear": (c.q_size, d),
        "multi_head_attention/query": (d, c.q_size),
        "multi_head_attention/value": (d, c.kv_size),
        "router": (d, e),
    }
    entries: list[tuple[str, str, str, str, tuple[int, ...], int | None]] = [
        ("language_model/in_out_embed", "embeddings", "embed", "embed", (c.vocab_size, d), None),
        ("language_model/rms_norm", "scale", "norm", "norm", (d,), None),
    ]
    for layer in range(c.num_layers):
        for ref, ours in _LAYER_PARAMS.items():
            kind = "norm" if ref.startswith("rms_norm") else "router" if ref == "router" else "linear"
            entries.append(
                (
                    f"transformer/decoder_layer_{layer}/{ref}",
                    "scale" if kind == "norm" else "w",
                    f"layers.{layer}.{ours}",
                    kind,
                    shapes.get(ref, (d,)),
                    RELEASED_GROUPS.get(ref),
                )
            )
    entries.sort(key=lambda x: (x[0], x[1]))  # the flattened tree's order
    return [RefParam(i, f"{m}/{p}", ours, kind, shape, g) for i, (m, p, ours, kind, shape, g) in enumerate(entries)]


# ---------------------------------------------------------------------------------------------
# Reading one file without running it.

_DTYPES: dict[str, torch.dtype] = {
    "f4": torch.float32,
    "f2": torch.float16,
    "f8": torch.float64,
    "i1": torch.int8,
    "u1": torch.uint8,
    "i2": torch.int16,
    "i4": torch.int32,
    "i8": torch.int64,
    "b1": torch.bool,
}


@dataclass
class FileSlice:
    """Bytes of a pickle that stay on disk: `length` bytes at `offset`."""

    offset: int
    length: int


class _BFloat16:
    """Stands in for `ml_dtypes.bfloat16`; never instantiated."""


class _DType:
    """Stands in for `numpy.dtype(code, align, copy)` and its BUILD state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if code is _BFloat16:
            self.torch_dtype = torch.bfloat16
        elif isinstance(code, str) and code in _DTYPES:
            self.torch_dtype = _DTYPES[code]
        else:
            raise pickle.UnpicklingError(f"unsupported array dtype {code!r}")
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) < 2:
            raise pickle.UnpicklingError("malformed dtype state")
        self.byteorder = state[1]
        if self.byteorder == ">":
            raise pickle.UnpicklingError("big-endian arrays are not supported")


class _ArrayStub:
    """Stands in for `numpy.ndarray`; records shape, dtype and the data's location."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    data: bytes | FileSlice

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("malformed ndarray state")
        _version, shape, dtype, fortran, data = state
        if not isinstance(dtype, _DType):
            raise pickle.UnpicklingError("ndarray state without a dtype")
        if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
            raise pickle.UnpicklingError(f"malformed ndarray shape {shape!r}")
        if fortran:
            raise pickle.UnpicklingError("Fortran-ordered arrays are not supported")
        if not isinstance(data, (bytes, FileSlice)):
            raise pickle.UnpicklingError("ndarray data is not raw bytes (object arrays are refused)")
        self.shape, self.dtype, self.data = shape, dtype.torch_dtype, data
        expected = self.numel * self.dtype.itemsize
        got = data.length if isinstance(data, FileSlice) else len(data)
        if got != expected:
            raise pickle.UnpicklingError(f"array {shape} {self.dtype} needs {expected} bytes, has {got}")

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _ArrayStub:
        raise pickle.UnpicklingError("numpy _reconstruct called on something other than ndarray")
    return _ArrayStub()


def _jax_reconstruct_array(fun: Any, args: Any, arr_state: Any, aval_state: Any = None) -> _ArrayStub:
    # jax pickles an Array as (_reconstruct_array, (numpy's reconstruct, its args, ndarray state, aval)).
    if fun is not _reconstruct or not isinstance(args, tuple):
        raise pickle.UnpicklingError("jax array reconstruction with an unexpected function")
    arr = fun(*args)
    arr.__setstate__(arr_state)
    return arr


class QuantizedWeight8bit:
    """Stands in for the reference's dataclass: int8 `weight` and its `scales`."""

    weight: _ArrayStub
    scales: _ArrayStub

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = state[0]
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            raise pickle.UnpicklingError("QuantizedWeight8bit without exactly weight and scales")
        if not all(isinstance(v, _ArrayStub) for v in state.values()):
            raise pickle.UnpicklingError("QuantizedWeight8bit fields must be arrays")
        self.weight, self.scales = state["weight"], state["scales"]


_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _ArrayStub,
    ("numpy", "dtype"): _DType,
    ("ml_dtypes", "bfloat16"): _BFloat16,
    ("__main__", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("model", "QuantizedWeight8bit"): QuantizedWeight8bit,
    ("jax._src.array", "_reconstruct_array"): _jax_reconstruct_array,
}


class _BoundedFile:
    """A file that refuses to read past its end: a corrupt length in a pickle (an 8-byte string
    length, say) then fails at once instead of asking for exabytes of memory."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file, self._size = file, size

    def check(self, n: int, what: str = "bytes asked for") -> None:
        """Raise unless `n` more bytes lie between the position and the end."""
        at = self._file.tell()
        if n > self._size - at:
            raise CheckpointError(f"truncated or corrupt: {n} {what} at offset {at}, but the file has {self._size}")

    def read(self, n: int = -1) -> bytes:
        if n is not None and n >= 0:
            self.check(n)
        return self._file.read(n)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        self.check(len(buffer))
        return self._file.readinto(buffer)  # type: ignore[attr-defined, no-any-return]

    def readline(self) -> bytes:
        return self._file.readline()

    def tell(self) -> int:
        return self._file.tell()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._file.seek(offset, whence)


class SafeUnpickler(pickle._Unpickler):  # type: ignore[name-defined]
    """Pure-Python unpickler that resolves only the globals in `_ALLOWED`, to inert stand-ins.

    Byte strings written outside a pickle frame (numpy's array data, by size) are not read: they
    become a `FileSlice` and the file position skips past them.
    """

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._fileobj = _BoundedFile(file, size)  # a corrupt length fails here, before any allocation
        super().__init__(self._fileobj)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refusing persistent ids")

    def _bytes(self, fmt: str) -> None:
        (length,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        if self._unframer.current_frame is not None:  # small, inside a frame: it is in memory already
            self.append(self.read(length))
            return
        offset = self._fileobj.tell()
        self._fileobj.check(length, "bytes of data")
        self._fileobj.seek(length, io.SEEK_CUR)
        self.append(FileSlice(offset, length))

    def _bytearray8(self) -> None:
        # The stock handler allocates the length it reads before reading: bound it by the file first.
        (length,) = struct.unpack("<Q", self.read(8))
        self._fileobj.check(length, "bytes of bytearray")
        buffer = bytearray(length)
        self.readinto(buffer)
        self.append(buffer)

    dispatch: ClassVar[dict[int, Any]] = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]
    dispatch[pickle.BYTEARRAY8[0]] = _bytearray8
    dispatch[pickle.BINBYTES[0]] = lambda self: self._bytes("<I")
    dispatch[pickle.SHORT_BINBYTES[0]] = lambda self: self._bytes("<B")
    dispatch[pickle.BINBYTES8[0]] = lambda self: self._bytes("<Q")


Record = _ArrayStub | QuantizedWeight8bit


def read_record(path: Path) -> Record:
    """Parse one tensor file's pickle; array bytes stay on disk. Raises CheckpointError naming the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            obj = SafeUnpickler(f, size).load()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file is missing") from None
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError, struct.error) as e:
        raise CheckpointError(f"{path}: truncated or corrupt pickle ({type(e).__name__}: {e})") from None
    if not isinstance(obj, (_ArrayStub, QuantizedWeight8bit)):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not an array or QuantizedWeight8bit")
    return obj


class _Reader:
    """Copies an array's bytes out of its file in bounded chunks of leading-axis rows."""

    CHUNK_BYTES = 64 << 20

    def __init__(self, path: Path, array: _ArrayStub) -> None:
        self.path, self.array = path, array
        self.row_shape = array.shape[1:]
        self.row_bytes = (
            max(1, array.numel // max(1, array.shape[0]) * array.dtype.itemsize)
            if array.shape
            else array.dtype.itemsize
        )

    def rows(self, step_rows: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Yield (first row, tensor of rows) covering axis 0. The tensors share one buffer, read
        into without zero-filling: each is only valid until the next is yielded."""
        a = self.array
        dtype, n = a.dtype, (a.shape[0] if a.shape else 1)
        step = step_rows or max(1, self.CHUNK_BYTES // self.row_bytes)
        if isinstance(a.data, bytes):  # small, already in memory
            whole = torch.frombuffer(bytearray(a.data), dtype=dtype) if a.data else torch.empty(0, dtype=dtype)
            whole = whole.view(a.shape)
            for r0 in range(0, n, step):
                yield r0, whole if not a.shape else whole[r0 : r0 + step]
            return
        buf = bytearray(min(n, step) * self.row_bytes)
        with open(self.path, "rb") as f:
            f.seek(a.data.offset)
            for r0 in range(0, n, step):
                rows = min(n, r0 + step) - r0
                length = rows * self.row_bytes
                if f.readinto(memoryview(buf)[:length]) != length:
                    raise CheckpointError(f"{self.path}: file ended inside its data (truncated)")
                t = torch.frombuffer(buf, dtype=dtype, count=length // dtype.itemsize)
                yield r0, t.view(a.shape) if not a.shape else t.view(rows, *self.row_shape)


# ---------------------------------------------------------------------------------------------
# Loading into a model.


def find_ckpt_dir(path: str | Path) -> Path:
    """Accept the download root (holding ckpt-0/) or ckpt-0/ itself."""
    p = Path(path)
    if (p / "ckpt-0").is_dir():
        return p / "ckpt-0"
    if p.is_dir():
        return p
    raise CheckpointError(f"{p}: no such checkpoint directory")


def find_config(ckpt_dir: Path) -> GrokConfig | None:
    for candidate in (ckpt_dir / "config.json", ckpt_dir.parent / "config.json"):
        if candidate.is_file():
            return GrokConfig.from_json(candidate)
    return None


def _check_shape(path: Path, param: RefParam, what: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{path}: {param.name} {what} has shape {tuple(got)}, expected {tuple(expected)}")


def _scale_groups(path: Path, param: RefParam, rec: QuantizedWeight8bit) -> int:
    w, s = rec.weight, rec.scales
    _check_shape(path, param, "weight", w.shape, param.shape)
    if w.dtype != torch.int8:
        raise CheckpointError(f"{path}: {param.name} quantized weight is {w.dtype}, expected int8")
    lead, in_features, out_features = param.shape[:-2], param.shape[-2], param.shape[-1]
    if (
        len(s.shape) != len(param.shape)
        or tuple(s.shape[:-2]) != lead
        or s.shape[-1] != out_features
        or not s.shape[-2]
    ):
        raise CheckpointError(
            f"{path}: {param.name} scales have shape {s.shape}, expected {(*lead, 'G', out_features)}"
        )
    groups = s.shape[-2]
    if in_features % groups:
        raise CheckpointError(f"{path}: {param.name} has {groups} scale groups, which do not divide {in_features} rows")
    return groups


def _fill_transposed(path: Path, array: _ArrayStub, dst: Tensor) -> None:
    """Source [*L, in, out] -> dst [*L, out, in]; chunks of source rows land transposed in place."""
    in_features = dst.shape[-1]
    flat_dst = dst.view(-1, dst.shape[-2], in_features)  # [prod(L), out, in]
    src = _Reader(path, _as_rows(array))
    step = max(1, min(in_features, src.CHUNK_BYTES // src.row_bytes))
    step = next(s for s in range(step, 0, -1) if in_features % s == 0)  # chunks never straddle a slab
    for r0, rows in src.rows(step):
        lead, k0 = divmod(r0, in_features)
        part = flat_dst[lead, :, k0 : k0 + rows.shape[0]]
        if not kernels.transpose_into(part, rows):  # int8: tiled and threaded, ~10x torch's copy
            part.copy_(rows.T)


def _as_rows(array: _ArrayStub) -> _ArrayStub:
    """View [*L, rows, cols] (or [cols]) as a 2-D [prod(L) * rows, cols]."""
    view = _ArrayStub()
    view.shape = (array.numel // array.shape[-1], array.shape[-1]) if len(array.shape) > 1 else (1, array.shape[0])
    view.dtype, view.data = array.dtype, array.data
    return view


def _fill_rows(path: Path, array: _ArrayStub, dst: Tensor) -> None:
    flat = dst.view(dst.shape[0], -1) if dst.dim() > 1 else dst.view(1, -1)
    arr = array if len(array.shape) > 1 else _as_rows(array)
    for r0, rows in _Reader(path, arr).rows():
        flat[r0 : r0 + rows.shape[0]] = rows.reshape(rows.shape[0], -1)


class MappedEmbedding(nn.Module):
    """Embedding rows read on demand from the checkpoint file's own fp32 table, memory-mapped.

    A lookup needs one row per token, so the table need not be resident: pages are read (and count
    in RSS) only for the rows used. Rows are cast to the compute dtype, as the reference does.
    """

    def __init__(self, path: Path, array: _ArrayStub, dtype: torch.dtype) -> None:
        super().__init__()
        if not isinstance(array.data, FileSlice):
            raise CheckpointError(f"{path}: embedding table is not stored outside the pickle frames")
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        with warnings.catch_warnings():  # read-only buffer: we never write to it
            warnings.simplefilter("ignore", UserWarning)
            table = torch.frombuffer(self._map, dtype=array.dtype, count=array.numel, offset=array.data.offset)
        self.table = table.view(array.shape)  # a plain attribute: not a parameter, never copied
        self.out_dtype = dtype

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table[tokens.cpu()].to(self.out_dtype)


def load(
    path: str | Path,
    config: GrokConfig | None = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize_head: bool | None = None,
    mmap: bool = False,
) -> Grok:
    """Load a checkpoint into a Grok model: the released format, or groklm's own (`native.py`).

    Released format: int8 weights stay int8.

    Peak memory is the model plus one bounded read chunk: the model is built on the meta device,
    given uninitialised storage, and every tensor is copied from its file straight into place.
    `mmap` (groklm's layout only) leaves the weights in the files' memory maps, paged in on use.
    `quantize_head` (default: when dtype is bf16, the fast dtype, on CPU) gives the output
    projection an int8 copy of the embedding table (see `quant.quantize_output_head`), made from the
    file's fp32 rows; the input lookup then reads those rows from the file (`MappedEmbedding`), so
    no float copy of the table is held at all.
    """
    from groklm.native import is_native, load_native  # the other on-disk format; imports this module

    if is_native(path):
        model = load_native(path, dtype, device, mmap=mmap)
        if config is not None and config != model.config:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        return model
    if mmap:
        raise ValueError(
            f"{path}: mmap loading needs groklm's own layout (the released files store [in, out]); "
            "write it once with `groklm quantize --bits 8 IN OUT`"
        )
    if quantize_head is None:
        quantize_head = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    released = open_released(path, config, dtype, quantize_head)
    bar = progress_bar(len(released.params), f"loading {released.ckpt}", progress)
    for part in released.parts():
        released.fill(part, device, bar)
    bar.close()
    return released.model.eval().requires_grad_(False)


@dataclass
class Released:
    """A released checkpoint, parsed and checked, its model laid out on the meta device; `fill` gives
    one part of it storage and copies that part's tensors in. A part is a decoder layer
    ("layers.3") or everything else (""): loading fills them all, a conversion one at a time."""

    ckpt: Path
    model: Grok
    params: list[RefParam]
    records: list[Record]
    quantize_head: bool
    map_embedding: bool

    def parts(self) -> list[str]:
        return ["", *(f"layers.{i}" for i in range(self.model.config.num_layers))]

    def fill(self, part: str, device: str | torch.device = "cpu", bar: Any = None) -> None:
        model = self.model
        for module in [model.get_submodule(part)] if part else [c for n, c in model.named_children() if n != "layers"]:
            module.to_empty(device=device)
            advise_huge_pages([*module.parameters(), *module.buffers()])
        with torch.no_grad():
            for p, rec in zip(self.params, self.records, strict=True):
                if _part_of(p.module) == part:
                    self._fill_param(p, rec)
                    if bar is not None:
                        bar.update(1)

    def _fill_param(self, p: RefParam, rec: Record) -> None:
        file = self.ckpt / p.file
        model = self.model
        module = model.get_submodule(p.module)
        try:
            if isinstance(rec, QuantizedWeight8bit):
                assert isinstance(module, (Int8Linear, Int8ExpertLinear))
                _fill_transposed(file, rec.weight, module.weight)  # [*L, in, out] -> [*L, out, in]
                _fill_transposed(file, rec.scales, module.scales)  # [*L, G, out] -> [*L, out, G]
            elif p.kind in ("linear", "router"):  # unquantized [.., in, out]
                _fill_transposed(file, rec, module.weight)
            elif p.kind == "embed" and self.quantize_head:
                assert isinstance(rec, _ArrayStub) and isinstance(model.head, Int8Linear)
                for r0, rows in _Reader(file, rec).rows():
                    fill_int8_head(model.head, r0, rows.float())
                    if not self.map_embedding:
                        model.embed.weight[r0 : r0 + rows.shape[0]] = rows
                if self.map_embedding:
                    model.embed = MappedEmbedding(file, rec, model.dtype)
            else:  # embed, norm: same layout
                _fill_rows(file, rec, module.weight)
        except CheckpointError as e:
            raise CheckpointError(f"{e} [parameter {p.name}]") from None


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


def _part_of(module: str) -> str:
    """The part (see `Released`) a module belongs to: "layers.N" or ""."""
    head, _, rest = module.partition(".")
    return f"layers.{rest.partition('.')[0]}" if head == "layers" else ""


def open_released(
    path: str | Path, config: GrokConfig | None = None, dtype: torch.dtype = torch.bfloat16, quantize_head: bool = True
) -> Released:
    """Parse every pickle of a released checkpoint (no tensor data is read), check names, kinds and
    shapes against the config (default: config.json beside it, else Grok-1), and lay out the model
    on the meta device, int8 where the files are."""
    ckpt = find_ckpt_dir(path)
    if config is None:
        config = find_config(ckpt) or GrokConfig()
    params = reference_params(config)
    present = sorted(p.name for p in ckpt.glob("tensor*_000"))
    if len(present) != len(params):
        raise CheckpointError(
            f"{ckpt}: {len(present)} tensor files, but the config ({config.num_layers} layers) needs "
            f"{len(params)}: wrong config or incomplete download"
        )
    records: list[Record] = []
    groups: dict[str, int] = {}
    for p in params:
        file = ckpt / p.file
        try:
            rec = read_record(file)
        except CheckpointError as e:
            raise CheckpointError(f"{e} [parameter {p.name}]") from None
        if isinstance(rec, QuantizedWeight8bit):
            if p.kind != "linear":
                raise CheckpointError(f"{file}: {p.name} is quantized, but this parameter never is")
            groups[p.module] = _scale_groups(file, p, rec)
        else:
            _check_shape(file, p, "array", rec.shape, p.shape)
            if not rec.dtype.is_floating_point:
                raise CheckpointError(f"{file}: {p.name} is {rec.dtype}, expected a float array")
        records.append(rec)

    with torch.device("meta"):
        model = Grok(config, dtype)
    quantize_int8(model, groups.get)
    embed_rec = records[0]
    assert params[0].kind == "embed" and isinstance(embed_rec, _ArrayStub)
    # With an int8 head the table is only looked up: read it from the file if it has its own place there.
    map_embedding = quantize_head and isinstance(embed_rec.data, FileSlice)
    if quantize_head:
        with torch.device("meta"):
            model.head = int8_head(config, dtype)
    if map_embedding:
        del model.embed.weight  # replaced by MappedEmbedding when filled: never allocated
    return Released(ckpt, model, params, records, quantize_head, map_embedding)


class _NoBar:
    def update(self, n: int) -> None: ...
    def close(self) -> None: ...


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "tensor") -> Any:
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=False)


# ---------------------------------------------------------------------------------------------
# Writing the same format (random weights for tests, benchmarks and the demo).


def _op_str(s: str) -> bytes:
    b = s.encode()
    return b"\x8c" + bytes([len(b)]) + b if len(b) < 256 else b"X" + struct.pack("<I", len(b)) + b


def _op_global(module: str, name: str) -> bytes:
    return _op_str(module) + _op_str(name) + pickle.STACK_GLOBAL


def _op_int(n: int) -> bytes:
    return pickle.BININT + struct.pack("<i", n)


_NP_CODES = {torch.float32: ("f4", "<"), torch.int8: ("i1", "|")}


def _array_header(shape: tuple[int, ...], dtype: torch.dtype, nbytes: int) -> bytes:
    """Opcodes of `numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')` + BUILD state, up to the data."""
    if dtype == torch.bfloat16:
        dt = _op_global("numpy", "dtype") + _op_global("ml_dtypes", "bfloat16") + pickle.NEWFALSE + pickle.NEWTRUE
        dt += pickle.TUPLE3 + pickle.REDUCE + pickle.MARK + _op_int(3) + _op_str("<") + pickle.NONE * 3
        dt += _op_int(2) + _op_int(2) + _op_int(64) + pickle.TUPLE + pickle.BUILD
    else:
        code, order = _NP_CODES[dtype]
        dt = (
            _op_global("numpy", "dtype")
            + _op_str(code)
            + pickle.NEWFALSE
            + pickle.NEWTRUE
            + pickle.TUPLE3
            + pickle.REDUCE
        )
        dt += pickle.MARK + _op_int(3) + _op_str(order) + pickle.NONE * 3 + _op_int(-1) + _op_int(-1) + _op_int(0)
        dt += pickle.TUPLE + pickle.BUILD
    out = _op_global("numpy.core.multiarray", "_reconstruct") + _op_global("numpy", "ndarray")
    out += _op_int(0) + pickle.TUPLE1 + pickle.SHORT_BINBYTES + b"\x01b" + pickle.TUPLE3 + pickle.REDUCE
    out += pickle.MARK + _op_int(1) + pickle.MARK + b"".join(_op_int(n) for n in shape) + pickle.TUPLE
    out += dt + pickle.NEWFALSE
    if nbytes < 2**32:
        out += pickle.BINBYTES + struct.pack("<I", nbytes)
    else:
        out += pickle.BINBYTES8 + struct.pack("<Q", nbytes)
    return out


_ARRAY_END = pickle.TUPLE + pickle.BUILD


def _write_array(f: BinaryIO, shape: tuple[int, ...], dtype: torch.dtype, chunks: Iterator[Tensor]) -> None:
    numel = 1
    for s in shape:
        numel *= s
    f.write(_array_header(shape, dtype, numel * dtype.itemsize))
    written = 0
    for chunk in chunks:
        data = (
            chunk.contiguous().view(torch.uint8).numpy()
            if chunk.dtype == torch.bfloat16
            else chunk.contiguous().numpy()
        )
        f.write(memoryview(data).cast("B"))
        written += chunk.numel()
    assert written == numel, (written, numel)
    f.write(_ARRAY_END)


def write_tensor_file(
    path: Path, shape: tuple[int, ...], chunks: Iterator[Tensor], scales: Callable[[], Tensor] | None = None
) -> None:
    """Write one parameter file. Without scales, a float32 numpy array; with scales, a
    __main__.QuantizedWeight8bit of int8 weight and bf16 scales (asked for once the weight is out,
    so they can be computed while the chunks stream)."""
    with open(path, "wb") as f:
        f.write(pickle.PROTO + b"\x04")
        if scales is None:
            _write_array(f, shape, torch.float32, chunks)
        else:
            f.write(_op_global("__main__", "QuantizedWeight8bit") + pickle.EMPTY_TUPLE + pickle.NEWOBJ)
            f.write(pickle.EMPTY_DICT + pickle.MARK + _op_str("weight"))
            _write_array(f, shape, torch.int8, chunks)
            s = scales()
            f.write(_op_str("scales"))
            _write_array(f, tuple(s.shape), torch.bfloat16, iter([s]))
            f.write(pickle.SETITEMS + pickle.BUILD)
        f.write(pickle.STOP)


def _random_param(p: RefParam, config: GrokConfig, gen: torch.Generator) -> tuple[Iterator[Tensor], list[Tensor]]:
    """Chunks of a random parameter in reference layout, and (filled as the chunks are consumed) the
    per-slab bf16 scales if it is an int8 linear."""
    if p.kind == "embed":
        # With a tied unembedding, a random model whose residual stream is mostly the input token's
        # embedding just repeats its last token. Post-norm scales 4x the embedding scale make the
        # layers' outputs dominate; these sizes give logits of std ~1 with clear top-1 gaps.
        std = 8.0 / config.embedding_multiplier_scale
        return (torch.randn(rows, p.shape[1], generator=gen) * std for rows in _splits(p.shape[0], 4096)), []
    if p.kind == "norm":
        gain = 32.0 if p.module.endswith("out_norm") else 1.0
        return iter([(torch.rand(p.shape, generator=gen) + 0.5) * gain]), []
    if p.kind == "router":
        return iter([torch.randn(p.shape, generator=gen) * 2.0 / p.shape[0] ** 0.5]), []
    scales: list[Tensor] = []
    in_features, out_features = p.shape[-2], p.shape[-1]
    assert p.groups is not None
    lead = p.shape[0] if len(p.shape) == 3 else 1

    def slabs() -> Iterator[Tensor]:
        for _ in range(lead):
            w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5  # [out, in]
            q, s = quantize_weight(w, p.groups, torch.bfloat16)  # [out, in], [out, G]
            scales.append(s.T)  # released layout [G, out]
            yield q.T  # released layout [in, out]

    return slabs(), scales


def _splits(n: int, step: int) -> Iterator[int]:
    for start in range(0, n, step):
        yield min(step, n - start)


def write_random_checkpoint(out: str | Path, config: GrokConfig, seed: int = 0, progress: bool = True) -> Path:
    """Write a random-weight checkpoint in the released format, with `config.json`; returns ckpt-0/."""
    ckpt = Path(out) / "ckpt-0"
    ckpt.mkdir(parents=True, exist_ok=True)
    (Path(out) / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    gen = torch.Generator().manual_seed(seed)
    params = reference_params(config)
    bar = progress_bar(len(params), f"writing {ckpt}", progress)
    for p in params:
        chunks, scales = _random_param(p, config, gen)
        tmp = ckpt / (p.file + ".tmp")
        stacked = None
        if p.kind == "linear":
            stacked = (lambda s=scales: torch.stack(s)) if len(p.shape) == 3 else (lambda s=scales: s[0])
        write_tensor_file(tmp, p.shape, chunks, stacked)
        os.replace(tmp, ckpt / p.file)
        bar.update(1)
    bar.close()
    return ckpt


def parameter_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
