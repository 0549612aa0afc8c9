"""groklm's own checkpoint layout: safetensors shards under our module names, quantized as held in memory.

    OUT/config.json                 GrokConfig (the reference's field names)
    OUT/model-00000.safetensors     embed.weight (bf16), norm.weight, head.* (if the head is quantized)
    OUT/model-00001.safetensors     layers.0.*   (one shard per decoder layer)
    ...

int8 tensors are [out, in] with bf16 scales [out, G]; the layers' row-blocked ones (G > 1) are
block-major, [G, out, in/G] (see `quant`; files written row-major before that are re-laid out as they
load), the output head is not. int4 tensors are packed uint8 [out, in/2] with scales [out, in/group]
(see `quant.quantize_weight_int4`). The loader infers each module's kind from the stored dtypes and
checks every name and shape against the model it builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import CheckpointError, advise_huge_pages
from groklm.formats.common import BlockMajorArray, DiskArray
from groklm.formats.layout import allocate, part_of
from groklm.formats.released import MappedEmbedding
from groklm.formats.safetensors_io import NAMES, Entry, MappedFile, read_header, read_into, read_tensor, write_file
from groklm.model import Grok
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    block_major,
    from_panels,
    is_panels,
    quantize_int8,
    scales_from_panels,
)

SHARD = "model-{:05d}.safetensors"


def is_native(path: str | Path) -> bool:
    return (Path(path) / SHARD.format(0)).is_file()


def _shard_of(name: str) -> int:
    m = re.match(r"layers\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else 0


def save_native(model: Grok, out: str | Path, progress: bool = True) -> Path:
    """Write `model` (float, int8 or int4 modules) as safetensors shards plus config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    shards: dict[int, dict[str, Tensor]] = {}
    for name, t in as_stored(model).items():
        shards.setdefault(_shard_of(name), {})[name] = t
    for index in range(model.config.num_layers + 1):
        save_shard(out, index, shards.get(index, {}))
    return out


def as_stored(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    state = {prefix + name: t for name, t in module.state_dict().items()}
    for name, t in list(state.items()):  # int4 weights in the CPU kernel's panels are written in rows
        scales_name = name.removesuffix("weight") + "scales"
        scales = state.get(scales_name)
        if t.dtype == torch.uint8 and name.endswith("weight") and scales is not None and is_panels(t, scales):
            state[name], state[scales_name] = from_panels(t), scales_from_panels(scales)
    if isinstance(getattr(module, "embed", None), MappedEmbedding):  # the table lives in the source file
        state[prefix + "embed.weight"] = module.embed.table.to(module.dtype)  # type: ignore[union-attr, operator]
    return state


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


def _layout(path: Path, dtype: torch.dtype) -> tuple[Grok, dict[str, Entry], set[str]]:
    """The model on the meta device, laid out as the checkpoint stores it (int8 where I8 weights have
    scales, int4 where U8 ones do), every tensor's entry, and the names stored row-major that are held
    block-major (files written before int8 row blocks were): names, shapes and dtypes all checked."""
    config = GrokConfig.from_json(path / "config.json")
    stored = _stored(path, config.num_layers)
    shape_of = {n: e.shape for n, e in stored.items()}
    with torch.device("meta"):
        model = Grok(config, dtype)
        # Lay out each quantized module as stored: int8 (I8 weight) or int4 (U8 packed weight).
        # (A tensor without its scales is left alone here; the name check below reports it.)
        quantized = {
            n[: -len(".weight")]: e.dtype
            for n, e in stored.items()
            if n.endswith(".weight") and n[: -len("weight")] + "scales" in stored
        }
        int8_groups = {
            m: shape_of[m + ".scales"][-1] for m, dt in quantized.items() if dt == torch.int8 and m != "head"
        }
        quantize_int8(model, lambda name: int8_groups.get(name))
        for module_name, dt in quantized.items():
            if dt != torch.uint8:
                continue
            shape, scales = shape_of[module_name + ".weight"], shape_of[module_name + ".scales"]
            in_features = shape[-1] * 2
            if not scales or not scales[-1] or in_features % scales[-1]:
                raise CheckpointError(
                    f"{stored[module_name + '.scales'].where()}: shape {scales} does not fit weight {shape}"
                )
            group = in_features // scales[-1]
            new: nn.Module = (
                Int4ExpertLinear(shape[0], in_features, shape[1], group, dtype)
                if len(shape) == 3
                else Int4Linear(in_features, shape[0], group, dtype)
            )
            _set(model, module_name, new)
        if "head.weight" in stored and stored["head.weight"].dtype == torch.int8:
            _set(model, "head", Int8Linear(config.emb_size, config.vocab_size, shape_of["head.scales"][-1], dtype))
    expected = dict(model.state_dict())
    if set(expected) != set(stored):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise CheckpointError(
            f"{path}: tensor names do not match the model: missing {missing[:5]}, unexpected "
            f"{[f'{n} (in {stored[n].file.name})' for n in extra[:5]]}"
        )
    relayout = {
        name
        for name, t in expected.items()
        if t.dim() == len(shape_of[name]) + 1
        and shape_of[name] == (*t.shape[:-3], t.shape[-2], t.shape[-3] * t.shape[-1])
    }
    for name, t in expected.items():
        if tuple(t.shape) != shape_of[name] and name not in relayout:
            raise CheckpointError(f"{stored[name].where()}: shape {shape_of[name]}, expected {tuple(t.shape)}")
        _check_dtype(stored[name], t.dtype)
    return model, stored, relayout


def _read(target: Tensor, entry: Entry, relayout: bool) -> None:
    """Read a stored tensor into the model's (re-laid out block-major, or converted, where it must be)."""
    if relayout:
        target.copy_(block_major(read_tensor(entry), target.shape[-3]))
    elif entry.dtype != target.dtype:
        target.copy_(read_tensor(entry))
    else:
        read_into(entry, target)


def load_native(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", mmap: bool = False
) -> Grok:
    """Load groklm's layout. With `mmap`, tensors stay in the files' (copy-on-write) memory maps and
    are paged in as they are first used: start-up is immediate and a model larger than RAM still
    runs, at the speed of the disk. Otherwise they are read into freshly allocated memory.

    Every shard's header is checked, and every tensor's name, shape and dtype against the model,
    before any weight is read."""
    path = Path(path)
    if mmap and torch.device(device).type != "cpu":
        raise ValueError("mmap loading is for the CPU")
    model, stored, relayout = _layout(path, dtype)
    expected = dict(model.state_dict())
    if mmap:
        files = {e.file: MappedFile(e.file) for e in stored.values()}
        kernels.guard_mapped_files(f"the shards of {path}")
        mapped = {}
        for name, entry in stored.items():
            t = files[entry.file].tensor(entry)
            if name in relayout:
                t = block_major(t, expected[name].shape[-3])
            mapped[name] = t if t.dtype == expected[name].dtype else t.to(expected[name].dtype)  # a float table: copied
        model.load_state_dict(mapped, strict=True, assign=True)
        return model.eval().requires_grad_(False)
    model.to_empty(device=device)
    advise_huge_pages([*model.parameters(), *model.buffers()])
    targets = dict(model.state_dict(keep_vars=True))
    with torch.no_grad():
        for name, entry in sorted(stored.items(), key=lambda item: (str(item[1].file), item[1].offset)):
            _read(targets[name], entry, name in relayout)
    return model.eval().requires_grad_(False)


class NativeSource:
    """groklm's layout opened for streaming (see `layout.Source`): laid out on the meta device, a part's
    tensors read when it is filled; `lazy` reads a slice of one (a tensor-parallel rank's share)."""

    def __init__(self, path: str | Path, config: GrokConfig | None = None, dtype: torch.dtype = torch.bfloat16) -> None:
        self.path = Path(path)
        self.head_from_table = False  # a quantized head is stored
        self.model, self.stored, self.relayout = _layout(self.path, dtype)
        if config is not None and config != self.model.config:
            raise CheckpointError(f"{path}: its config.json differs from the config given")

    def fill(self, part: str, device: str | torch.device = "cpu", bar: Any = None) -> None:
        allocate(self.model, part, device)
        targets = dict(self.model.state_dict(keep_vars=True))
        with torch.no_grad():
            for name, entry in self.stored.items():
                if part_of(name) == part:
                    _read(targets[name], entry, name in self.relayout)
                    if bar is not None:
                        bar.update(1)

    def lazy(self, name: str) -> Any:
        """Tensor `name` on disk, read slice by slice in our logical layout ([.., out, in] row-major)."""
        entry = self.stored[name]
        module = self.model.get_submodule(name.rpartition(".")[0])
        if name.endswith(".weight") and name not in self.relayout and isinstance(module, (Int8Linear, Int8ExpertLinear)) \
                and entry.dtype == torch.int8 and len(entry.shape) == module.scales.dim() + 1:  # fmt: skip
            return BlockMajorArray(DiskArray(entry.file, entry.offset, entry.shape, entry.dtype))
        return DiskArray(entry.file, entry.offset, entry.shape, entry.dtype)

    def __len__(self) -> int:
        return len(self.stored)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
