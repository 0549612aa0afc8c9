"""What the format modules share: a checkpoint opened as a `Source` of (our name, tensor) pairs, the parts
they come in, and reading parts of arrays stored in files (a tensor-parallel rank, or a lazily streamed
table, reads its own slices with positioned reads, never the whole tensor)."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from torch import Tensor

from groklm.config import GrokConfig
from groklm.files import CheckpointError

# What a source yields: (our parameter or buffer name, where in it: an expert's slot, or rows of it, or
# None for the whole, the value, where it lies (file and tensor, for messages)). The value is a tensor as
# stored ([out, in] for linears; float, or int8/uint8 values and their scales), or a function that reads
# it straight into the target it is given (of the stored shape and dtype) where the format has a faster way.
Item = tuple[str, "int | slice | None", "Tensor | Callable[[Tensor], None]", str]


class Source(Protocol):
    """A checkpoint opened for reading, its names, kinds and shapes checked (nothing read yet). `quantized`
    tells how its linears are stored: module -> (8, scale groups) or (4, group size); None where every one
    is float. `check(held, dense)` checks every tensor against the model laid out for it (`held`: its
    tensors on the meta device by name; `dense(name)`: a linear's [out, in], one expert's for stacked ones)
    before any is read; `tensors(part)` reads a part's: "" (everything outside the decoder layers) or
    "layers.N"."""

    config: GrokConfig
    quantized: dict[str, tuple[int, int]] | None
    int8_head: bool  # the output head is made int8 as it is read (from the table, where tied)

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None: ...

    def tensors(self, part: str) -> Iterator[Item]: ...

    def __len__(self) -> int: ...  # the items `tensors` yields, over all parts


class Tensors(Protocol):
    """What a writer is given by the layer above: a model, one part at a time, as (our name, tensor). `shape`
    and `int8_groups` need nothing read: a linear's dense [out, in] (one expert's), and the scale groups
    of an int8 one (None where it is not int8)."""

    config: GrokConfig

    def shape(self, name: str) -> tuple[int, ...]: ...

    def int8_groups(self, name: str) -> int | None: ...

    def read(self, part: str) -> None: ...  # the part's tensors read in

    def dense(self, name: str, expert: int | None = None) -> Tensor: ...  # float: dequantized where quantized

    def int8(self, name: str, expert: int | None = None) -> tuple[Tensor, Tensor]: ...  # [out, in] int8, [out, G]

    def done(self, name: str) -> None: ...  # the module holding `name` is written: its memory goes now

    def drop(self, part: str) -> None: ...  # the part is written: its memory goes

    def table_rows(self) -> Iterator[Tensor]: ...  # the embedding table [V, D] in chunks of rows, as stored


def parts(config: GrokConfig) -> list[str]:
    return ["", *(f"layers.{i}" for i in range(config.num_layers))]


def part_of(name: str) -> str:
    """The part a parameter or module belongs to: "layers.N" or ""."""
    head, _, rest = name.partition(".")
    return f"layers.{rest.partition('.')[0]}" if head == "layers" else ""


def check_shape(where: str, got: Any, expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{where}: shape {tuple(got)}, expected {tuple(expected)}")


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
