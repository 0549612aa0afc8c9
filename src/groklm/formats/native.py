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

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from groklm.config import GrokConfig
from groklm.formats.common import CheckpointError, advise_huge_pages, progress_bar, return_freed_memory
from groklm.formats.released import MappedEmbedding, open_released
from groklm.model import Grok
from groklm.quant import Int4ExpertLinear, Int4Linear, Int8Linear, block_major, quantize_int8

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
    for name, t in _state(model).items():
        shards.setdefault(_shard_of(name), {})[name] = t
    for index in range(model.config.num_layers + 1):
        _save_shard(out, index, shards.get(index, {}))
    return out


def _state(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    state = {prefix + name: t for name, t in module.state_dict().items()}
    if isinstance(getattr(module, "embed", None), MappedEmbedding):  # the table lives in the source file
        state[prefix + "embed.weight"] = module.embed.table.to(module.dtype)  # type: ignore[union-attr, operator]
    return state


def _save_shard(out: Path, index: int, tensors: dict[str, Tensor]) -> None:
    save_file(
        {name: t.contiguous() for name, t in tensors.items()},
        str(out / SHARD.format(index)),
        metadata={"format": "pt", "groklm": "1"},
    )


def convert(
    src: str | Path,
    out: str | Path,
    bits: int = 8,
    group_size: int = 64,
    config: GrokConfig | None = None,
    progress: bool = True,
) -> Path:
    """Write a checkpoint (released or groklm's) in groklm's layout, int8 as it is or int4, one
    decoder layer at a time: memory holds 1-3 layers' worth for int8 (the layer and safetensors'
    serialized copy of it) and about 3 for int4 (float temporaries and the result), plus the int8
    output head, never the model. For the released Grok-1 that is under 16 GB rather than 300.

    The result equals loading the whole model, quantizing it and `save_native`, bit for bit."""
    from groklm.quant import quantize_int4

    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    out = Path(out)
    if is_native(src):
        model = load_native(src, torch.bfloat16, mmap=True)  # weights stay on disk until read
        if config is not None and config != model.config:
            raise CheckpointError(f"{src}: its config.json differs from the config given")
        if bits == 8 and any(isinstance(m, (Int4Linear, Int4ExpertLinear)) for m in model.modules()):
            raise ValueError(f"{src} is int4: int8 cannot be recovered from it")

        def fill(part: str) -> None:
            pass

    else:
        released = open_released(src, config, torch.bfloat16, quantize_head=True)
        model = released.model
        fill = released.fill
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
    bar = progress_bar(model.config.num_layers + 1, f"converting to int{bits}", progress, unit="part")
    for i, layer in enumerate(model.layers):
        fill(f"layers.{i}")
        if bits == 4:
            quantize_int4(layer, group_size)
        _save_shard(out, i + 1, _state(layer, f"layers.{i}."))
        layer.to("meta")  # frees it (or drops its maps)
        return_freed_memory()
        bar.update(1)
    fill("")
    if bits == 4:
        quantize_int4(model, group_size)  # the output head; the layers, on meta by now, are only laid out
    _save_shard(out, 0, {name: t for name, t in _state(model).items() if not name.startswith("layers.")})
    bar.update(1)
    bar.close()
    return out


def _stored(path: Path) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """name -> (shard, shape, dtype string) for every tensor in the checkpoint."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for shard in sorted(path.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                found[name] = (shard, tuple(sl.get_shape()), sl.get_dtype())
    return found


def load_native(
    path: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", mmap: bool = False
) -> Grok:
    """Load groklm's layout. With `mmap`, tensors stay in the files' (copy-on-write) memory maps and
    are paged in as they are first used: start-up is immediate and a model larger than RAM still
    runs, at the speed of the disk. Otherwise they are copied into freshly allocated memory."""
    path = Path(path)
    config = GrokConfig.from_json(path / "config.json")
    stored = _stored(path)
    with torch.device("meta"):
        model = Grok(config, dtype)
        # Lay out each quantized module as stored: int8 (I8 weight) or int4 (U8 packed weight).
        # (A tensor without its scales is left alone here; the name check below reports it.)
        quantized = {
            n[: -len(".weight")]: dt
            for n, (_, _, dt) in stored.items()
            if n.endswith(".weight") and n[: -len("weight")] + "scales" in stored
        }
        int8_groups = {m: stored[m + ".scales"][1][-1] for m, dt in quantized.items() if dt == "I8" and m != "head"}
        quantize_int8(model, lambda name: int8_groups.get(name))
        for module_name, dt in quantized.items():
            if dt != "U8":
                continue
            shape = stored[module_name + ".weight"][1]
            scales = stored[module_name + ".scales"][1]
            in_features = shape[-1] * 2
            group = in_features // scales[-1]
            new: nn.Module = (
                Int4ExpertLinear(shape[0], in_features, shape[1], group, dtype)
                if len(shape) == 3
                else Int4Linear(in_features, shape[0], group, dtype)
            )
            _set(model, module_name, new)
        if "head.weight" in stored and stored["head.weight"][2] == "I8":
            _set(model, "head", Int8Linear(config.emb_size, config.vocab_size, stored["head.scales"][1][-1], dtype))
    expected = dict(model.state_dict())
    if set(expected) != set(stored):
        missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
        raise CheckpointError(
            f"{path}: tensor names do not match the model: missing {missing[:5]}, unexpected {extra[:5]}"
        )
    # Files written before int8 row blocks were held block-major store them row-major: re-laid out as read.
    relayout = {
        name
        for name, t in expected.items()
        if t.dim() == len(stored[name][1]) + 1
        and stored[name][1] == (*t.shape[:-3], t.shape[-2], t.shape[-3] * t.shape[-1])
    }
    for name, t in expected.items():
        if tuple(t.shape) != stored[name][1] and name not in relayout:
            raise CheckpointError(f"{stored[name][0]}: {name} has shape {stored[name][1]}, expected {tuple(t.shape)}")
    if mmap and torch.device(device).type != "cpu":
        raise ValueError("mmap loading is for the CPU")
    if not mmap:
        model.to_empty(device=device)
        advise_huge_pages([*model.parameters(), *model.buffers()])
    targets = dict(model.state_dict(keep_vars=True))
    by_shard: dict[Path, list[str]] = {}
    for name, (shard, _, _) in stored.items():
        by_shard.setdefault(shard, []).append(name)
    mapped: dict[str, Tensor] = {}
    with torch.no_grad():
        for shard, names in sorted(by_shard.items()):
            with safe_open(str(shard), framework="pt") as f:  # tensors it hands out keep their map alive
                for name in names:
                    t = f.get_tensor(name)
                    if name in relayout:
                        t = block_major(t, expected[name].shape[-3])
                    if not mmap:
                        targets[name].copy_(t)
                    else:  # a float table stored in another dtype is copied, the rest stays mapped
                        mapped[name] = t if t.dtype == expected[name].dtype else t.to(expected[name].dtype)
    if mmap:
        model.load_state_dict(mapped, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
