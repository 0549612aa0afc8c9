"""groklm's own checkpoint layout: safetensors shards under our module names, quantized as held in memory.

    OUT/config.json                 GrokConfig (the reference's field names)
    OUT/model-00000.safetensors     embed.weight (bf16), norm.weight, head.* (if the head is quantized)
    OUT/model-00001.safetensors     layers.0.*   (one shard per decoder layer)
    ...

int8 tensors are [out, in] with bf16 scales [out, G]; the layers' row-blocked ones (G > 1) are
block-major, [G, out, in/G] (see `quant`; files written row-major before that are re-laid out as they
load), the output head is not. int4 tensors are packed uint8 [out, in/2] with scales [out, in/group]
(see `quant.quantize_weight_int4`). The reader infers each linear's kind from the stored dtypes; every
name and shape is checked against the model laid out for it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import CheckpointError
from groklm.formats.common import BlockMajorArray, DiskArray, Item, part_of
from groklm.formats.safetensors_io import NAMES, Entry, MappedFile, read_header, read_into, read_tensor, write_file

SHARD = "model-{:05d}.safetensors"


def is_native(path: str | Path) -> bool:
    return (Path(path) / SHARD.format(0)).is_file()


def shard_of(name: str) -> int:
    """The shard a tensor goes in: 0 outside the decoder layers, N + 1 for layer N."""
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 0


def write_config(out: Path, config: GrokConfig) -> None:
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))


def save_shard(out: Path, index: int, tensors: dict[str, Tensor], streamed: dict[str, Any] | None = None) -> None:
    """One shard: `tensors`, then each of `streamed` (name -> (dtype, shape, chunks along axis 0))."""
    streamed = streamed or {}
    layout = [(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    layout += [(name, dtype, shape) for name, (dtype, shape, _) in streamed.items()]
    data = [*tensors.values(), *(chunks for _, _, chunks in streamed.values())]
    write_file(out / SHARD.format(index), layout, iter(data), metadata={"format": "pt", "groklm": "1"})


def shard_files(path: Path, num_layers: int) -> list[Path]:
    """The shards of a checkpoint of `num_layers` layers, all there and no more (the config matches the files)."""
    shards = [path / SHARD.format(i) for i in range(num_layers + 1)]
    missing = [f.name for f in shards if not f.is_file()]
    if missing:
        raise CheckpointError(f"{path}: shard files missing: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"
                              f" (its config.json has {num_layers} layers)")  # fmt: skip
    if (path / SHARD.format(num_layers + 1)).is_file():
        raise CheckpointError(f"{path}: holds {SHARD.format(num_layers + 1)}, more layers than the {num_layers} "
                              "of its config.json")  # fmt: skip
    return shards


def _stored(path: Path, num_layers: int) -> dict[str, Entry]:
    """name -> where it lies, for every tensor of the checkpoint's shards (all there, headers checked)."""
    shards = shard_files(path, num_layers)
    found: dict[str, Entry] = {}
    for shard in shards:
        entries, _ = read_header(shard)
        for name, entry in entries.items():
            if name in found:
                raise CheckpointError(f"{shard}: tensor {name} is also in {found[name].file.name}")
            found[name] = entry
    return found


# What a stored tensor's dtype may be, by what it is in the model: integer tensors exactly as held,
# float ones any float (widened or narrowed to the compute dtype as the model holds them).
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _check_dtype(entry: Entry, expected: torch.dtype) -> None:
    ok = entry.dtype == expected or (expected.is_floating_point and entry.dtype in _FLOATS)
    if not ok:
        raise CheckpointError(f"{entry.where()}: stored as {entry.dtype_name}, expected {NAMES[expected]}")


def _quantized(stored: dict[str, Entry]) -> dict[str, tuple[int, int]]:
    """How the linears are stored: int8 where I8 weights have scales (their groups), int4 where U8 ones do
    (their group size). A weight without its scales is left float here; the name check reports it."""
    out = {}
    for name, entry in stored.items():
        module = name.removesuffix(".weight")
        scales = stored.get(module + ".scales")
        if not name.endswith(".weight") or scales is None:
            continue
        if entry.dtype == torch.int8:
            out[module] = (8, scales.shape[-1])
        elif entry.dtype == torch.uint8:
            in_features = entry.shape[-1] * 2
            if not scales.shape or not scales.shape[-1] or in_features % scales.shape[-1]:
                raise CheckpointError(f"{scales.where()}: shape {scales.shape} does not fit weight {entry.shape}")
            out[module] = (4, in_features // scales.shape[-1])
    return out


class NativeSource:
    """groklm's layout opened for reading (see `common.Source`): every shard's header read, the linears'
    kinds taken from the stored dtypes; each tensor is read straight into its place. `lazy` reads a slice
    of one (a tensor-parallel rank's share); `mapped` gives every tensor in the files' memory maps."""

    int8_head = False  # a quantized head is stored as it is

    def __init__(self, path: str | Path, config: GrokConfig | None = None) -> None:
        self.path = path = Path(path)
        self.config = GrokConfig.from_json(path / "config.json")
        self.stored = _stored(path, self.config.num_layers)
        if config is not None and config != self.config:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        self.quantized = _quantized(self.stored)
        self.relayout: set[str] = set()

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None:
        """Names, shapes and dtypes against the model laid out as stored; finds the int8 weights stored
        row-major that are held block-major (files written before int8 row blocks were)."""
        stored = self.stored
        shape_of = {n: e.shape for n, e in stored.items()}
        if set(held) != set(stored):
            missing, extra = sorted(set(held) - set(stored)), sorted(set(stored) - set(held))
            raise CheckpointError(
                f"{self.path}: tensor names do not match the model: missing {missing[:5]}, unexpected "
                f"{[f'{n} (in {stored[n].file.name})' for n in extra[:5]]}"
            )
        self.relayout = {
            name
            for name, t in held.items()
            if t.dim() == len(shape_of[name]) + 1
            and shape_of[name] == (*t.shape[:-3], t.shape[-2], t.shape[-3] * t.shape[-1])
        }
        for name, t in held.items():
            if tuple(t.shape) != shape_of[name] and name not in self.relayout:
                raise CheckpointError(f"{stored[name].where()}: shape {shape_of[name]}, expected {tuple(t.shape)}")
            _check_dtype(stored[name], t.dtype)

    def tensors(self, part: str) -> Iterator[Item]:
        for name, entry in self.stored.items():
            if part_of(name) == part:
                # row-major int8 is re-laid by the caller; the rest is read straight into place
                value = read_tensor(entry) if name in self.relayout else functools.partial(_read, entry=entry)
                yield name, None, value, entry.where()

    def mapped(self) -> dict[str, Tensor]:
        """Every tensor in the files' (copy-on-write) memory maps: paged in as first used."""
        files = {e.file: MappedFile(e.file) for e in self.stored.values()}
        kernels.guard_mapped_files(f"the shards of {self.path}")
        return {name: files[entry.file].tensor(entry) for name, entry in self.stored.items()}

    def lazy(self, name: str) -> Any:
        """Tensor `name` on disk, read slice by slice in our logical layout ([.., out, in] row-major)."""
        entry = self.stored[name]
        scales = self.stored.get(name.removesuffix("weight") + "scales")
        if name.endswith(".weight") and name not in self.relayout and entry.dtype == torch.int8 \
                and scales is not None and len(entry.shape) == len(scales.shape) + 1:  # fmt: skip
            return BlockMajorArray(DiskArray(entry.file, entry.offset, entry.shape, entry.dtype))
        return DiskArray(entry.file, entry.offset, entry.shape, entry.dtype)

    def __len__(self) -> int:
        return len(self.stored)


def _read(target: Tensor, entry: Entry) -> None:
    """Read a stored tensor into the model's (converted to its float dtype where it must be)."""
    if entry.dtype != target.dtype:
        target.copy_(read_tensor(entry))
    else:
        read_into(entry, target)
