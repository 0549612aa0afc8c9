"""The released Grok-1 checkpoint format (`ckpt-0/tensorNNNNN_000`): its parameter table, a streaming
loader, a writer.

Each file is one pickle of one parameter: a numpy array, or a `QuantizedWeight8bit` holding an int8
array and its bf16 scales, read without running anything (`safe_pickle`). Tensor bytes stay on disk
until the loader copies them, a bounded chunk at a time, straight into a model built on the meta
device: no /dev/shm copy and no second copy of the model.

File order is the flattened parameter tree, dict keys sorted as strings (so layers go 0, 1, 10, 11,
..., 2, 20, ...). `reference_params` derives the whole table from a config.
"""

from __future__ import annotations

import functools
import mmap
import pickle
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import CheckpointError
from groklm.formats.common import DiskArray, Item, TensorArray, part_of
from groklm.formats.safe_pickle import ArrayStub, FileSlice, QuantizedWeight8bit, Record, read_record

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


class _Reader:
    """Copies an array's bytes out of its file in bounded chunks of leading-axis rows."""

    CHUNK_BYTES = 64 << 20

    def __init__(self, path: Path, array: ArrayStub) -> None:
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


def checkpoint_config(ckpt_dir: Path, given: GrokConfig | None) -> GrokConfig:
    """The config a released checkpoint is read with: its config.json (written beside it by
    groklm), else the one given, else Grok-1's (the download has none). Both, differing: an error."""
    found = find_config(ckpt_dir)
    if found is not None and given is not None and found != given:
        raise CheckpointError(f"{ckpt_dir}: its config.json differs from the config given")
    return found or given or GrokConfig()


def _check_shape(path: Path, param: RefParam, what: str, got: tuple[int, ...], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{path}: {param.name} {what} has shape {tuple(got)}, expected {tuple(expected)}")


def _scale_groups(path: Path, param: RefParam, rec: QuantizedWeight8bit) -> int:
    w, s = rec.weight, rec.scales
    _check_shape(path, param, "weight", w.shape, param.shape)
    if w.dtype != torch.int8:
        raise CheckpointError(f"{path}: {param.name} quantized weight is {w.dtype}, expected int8")
    lead, in_features, out_features = param.shape[:-2], param.shape[-2], param.shape[-1]
    if not s.dtype.is_floating_point:
        raise CheckpointError(f"{path}: {param.name} scales are {s.dtype}, expected bf16 (or another float)")
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


def _fill_transposed(path: Path, array: ArrayStub, dst: Tensor) -> None:
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


def _as_rows(array: ArrayStub) -> ArrayStub:
    """View [*L, rows, cols] (or [cols]) as a 2-D [prod(L) * rows, cols]."""
    view = ArrayStub()
    view.shape = (array.numel // array.shape[-1], array.shape[-1]) if len(array.shape) > 1 else (1, array.shape[0])
    view.dtype, view.data = array.dtype, array.data
    return view


def _fill_rows(path: Path, array: ArrayStub, dst: Tensor) -> None:
    flat = dst.view(dst.shape[0], -1) if dst.dim() > 1 else dst.view(1, -1)
    arr = array if len(array.shape) > 1 else _as_rows(array)
    for r0, rows in _Reader(path, arr).rows():
        flat[r0 : r0 + rows.shape[0]] = rows.reshape(rows.shape[0], -1)


class MappedEmbedding(nn.Module):
    """Embedding rows read on demand from the checkpoint file's own fp32 table, memory-mapped.

    A lookup needs one row per token, so the table need not be resident: pages are read (and count
    in RSS) only for the rows used. Rows are cast to the compute dtype, as the reference does.
    """

    def __init__(self, path: Path, array: ArrayStub, dtype: torch.dtype) -> None:
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


@dataclass
class Released:
    """A released checkpoint, parsed and checked against its config's table (see `common.Source`): each
    file's tensor is read straight into place, the [in, out] weights transposed a bounded chunk at a time.
    The embedding table is `table`: "held" (read into the model), "mapped" (looked up from its file, see
    `MappedEmbedding`; with an int8 head made from it) or "streamed" (left in its file, `table_rows`)."""

    ckpt: Path
    config: GrokConfig
    params: list[RefParam]
    records: list[Record]
    quantized: dict[str, tuple[int, int]]
    int8_head: bool
    table: str

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None:
        pass  # every file was checked against the config's table when opened

    def table_rows(self, rows: int = 4096) -> Iterator[Tensor]:
        """The embedding table [V, D] as stored (fp32), `rows` rows at a time, read through one bounded
        buffer: each chunk is valid until the next is asked for."""
        for _, chunk in _Reader(self.ckpt / self.params[0].file, self.records[0]).rows(rows):  # type: ignore[arg-type]
            yield chunk

    def map_table(self, dtype: torch.dtype) -> MappedEmbedding:
        return MappedEmbedding(self.ckpt / self.params[0].file, self.records[0], dtype)  # type: ignore[arg-type]

    def _reads_table(self) -> bool:
        return self.table == "held" or self.int8_head

    def __len__(self) -> int:
        table = _Reader(self.ckpt / self.params[0].file, self.records[0])  # type: ignore[arg-type]
        rows = self.records[0].shape[0]  # type: ignore[union-attr]
        chunks = -(-rows // max(1, table.CHUNK_BYTES // table.row_bytes)) if self._reads_table() else 0
        return chunks + sum(2 if isinstance(r, QuantizedWeight8bit) else 1 for r in self.records[1:])

    def tensors(self, part: str) -> Iterator[Item]:
        for p, rec in zip(self.params, self.records, strict=True):
            if part_of(p.module) != part:
                continue
            file = self.ckpt / p.file
            where = f"{file}: {p.name}"
            if isinstance(rec, QuantizedWeight8bit):  # weight [*L, in, out], scales [*L, G, out]: ours transposed
                for leaf, array in (("weight", rec.weight), ("scales", rec.scales)):
                    yield f"{p.module}.{leaf}", None, _named(p, functools.partial(_fill_transposed, file, array)), where
            elif p.kind in ("linear", "router"):  # unquantized [.., in, out]
                yield f"{p.module}.weight", None, _named(p, functools.partial(_fill_transposed, file, rec)), where
            elif p.kind == "embed":
                if self._reads_table():
                    try:
                        for r0, rows in _Reader(file, rec).rows():  # type: ignore[arg-type]
                            yield "embed.weight", slice(r0, r0 + rows.shape[0]), rows, where
                    except CheckpointError as e:
                        raise CheckpointError(f"{e} [parameter {p.name}]") from None
            else:  # norm: same layout
                yield f"{p.module}.weight", None, _named(p, functools.partial(_fill_rows, file, rec)), where

    def lazy(self, name: str) -> DiskArray | TensorArray:
        """Tensor `name` (ours) in our layout, read slice by slice from its file: the [.., in, out]
        weights (and [.., G, out] scales) as [.., out, in] (and [.., out, G]). KeyError if not stored."""
        module, _, leaf = name.rpartition(".")
        found = [(p, rec) for p, rec in zip(self.params, self.records, strict=True) if p.module == module]
        if not found:
            raise KeyError(name)
        p, rec = found[0]
        if isinstance(rec, QuantizedWeight8bit):
            array = {"weight": rec.weight, "scales": rec.scales}.get(leaf)
        else:
            array = rec if leaf == "weight" else None
        if array is None:
            raise KeyError(name)
        transposed = p.kind in ("linear", "router")
        if isinstance(array.data, FileSlice):
            return DiskArray(self.ckpt / p.file, array.data.offset, array.shape, array.dtype, transposed)
        whole = next(_Reader(self.ckpt / p.file, array).rows(max(1, array.shape[0] if array.shape else 1)))[1]
        return TensorArray(whole.clone(), transposed)


def _named(p: RefParam, read: Callable[[Tensor], None]) -> Callable[[Tensor], None]:
    """`read` with its errors naming the parameter."""

    def named(target: Tensor) -> None:
        try:
            read(target)
        except CheckpointError as e:
            raise CheckpointError(f"{e} [parameter {p.name}]") from None

    return named


def read_param(ckpt: Path, p: RefParam) -> tuple[Record, int | None]:
    """Parse the file of one parameter (no tensor data is read) and check it against the table: kind,
    dtype and shapes. Returns the record and, for an int8 weight, its number of scale groups. Raises
    CheckpointError naming the file and the parameter."""
    file = ckpt / p.file
    try:
        rec = read_record(file)
    except CheckpointError as e:
        raise CheckpointError(f"{e} [parameter {p.name}]") from None
    if isinstance(rec, QuantizedWeight8bit):
        if p.kind != "linear":
            raise CheckpointError(f"{file}: {p.name} is quantized, but this parameter never is")
        return rec, _scale_groups(file, p, rec)
    _check_shape(file, p, "array", rec.shape, p.shape)
    if not rec.dtype.is_floating_point:
        raise CheckpointError(f"{file}: {p.name} is {rec.dtype}, expected a float array")
    return rec, None


def open_released(path: str | Path, config: GrokConfig | None = None, int8_head: bool = False,
                  stream_table: bool = False) -> Released:  # fmt: skip
    """Parse every pickle of a released checkpoint (no tensor data is read) and check names, kinds and
    shapes against the config (default: config.json beside it, else Grok-1). `int8_head`: the output head
    int8, made from the table as it is read (the table then mapped from its file, where it has its own
    place there); `stream_table`: the table left in its file (`table_rows`)."""
    ckpt = find_ckpt_dir(path)
    config = checkpoint_config(ckpt, config)
    params = reference_params(config)
    present = {p.name for p in ckpt.glob("tensor*_000")}
    missing = [f"{p.file} ({p.name})" for p in params if p.file not in present]
    unexpected = sorted(present - {p.file for p in params})
    if missing or unexpected:
        problems = [f"{len(present)} tensor files, but the config ({config.num_layers} layers) needs {len(params)}"]
        if missing:
            problems.append(f"{', '.join(missing[:5])}{' and more' if len(missing) > 5 else ''} missing")
        if unexpected:
            problems.append(f"unexpected {', '.join(unexpected[:5])}")
        raise CheckpointError(f"{ckpt}: {'; '.join(problems)}: wrong config or incomplete download")
    records: list[Record] = []
    quantized: dict[str, tuple[int, int]] = {}
    for p in params:
        rec, g = read_param(ckpt, p)
        if g is not None:
            quantized[p.module] = (8, g)
        records.append(rec)
    embed_rec = records[0]
    assert params[0].kind == "embed" and isinstance(embed_rec, ArrayStub)
    # With an int8 head the table is only looked up: read it from the file if it has its own place there.
    table = "streamed" if stream_table else "mapped" if int8_head and isinstance(embed_rec.data, FileSlice) else "held"
    return Released(ckpt, config, params, records, quantized, int8_head, table)


# ---------------------------------------------------------------------------------------------
# Writing the same format, from the tensors the layer above gives (`convert.write_random_checkpoint`).


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
