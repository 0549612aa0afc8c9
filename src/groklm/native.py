"""groklm's own checkpoint layout: safetensors shards under our module names, quantized as held in memory.

    OUT/config.json                 GrokConfig (the reference's field names)
    OUT/model-00000.safetensors     embed.weight (bf16), norm.weight, head.* (if the head is quantized)
    OUT/model-00001.safetensors     layers.0.*   (one shard per decoder layer)
    ...

int8 tensors are [out, in] with bf16 scales [out, G]; int4 tensors are packed uint8 [out, in/2]
with scales [out, in/group] (see `quant.quantize_weight_int4`). The loader infers each module's kind
from the stored dtypes and checks every name and shape against the model it builds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from groklm.checkpoint import CheckpointError, MappedEmbedding
from groklm.config import GrokConfig
from groklm.model import Grok
from groklm.quant import Int4ExpertLinear, Int4Linear, Int8Linear, quantize_int8

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
    state = dict(model.state_dict())
    if isinstance(model.embed, MappedEmbedding):  # the table lives in the source file: store it here
        state["embed.weight"] = model.embed.table.to(model.dtype)
    shards: dict[int, dict[str, Tensor]] = {}
    for name, t in state.items():
        shards.setdefault(_shard_of(name), {})[name] = t.contiguous()
    for index in range(model.config.num_layers + 1):
        save_file(shards.get(index, {}), str(out / SHARD.format(index)), metadata={"format": "pt", "groklm": "1"})
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
    for name, t in expected.items():
        if tuple(t.shape) != stored[name][1]:
            raise CheckpointError(f"{stored[name][0]}: {name} has shape {stored[name][1]}, expected {tuple(t.shape)}")
    if mmap and torch.device(device).type != "cpu":
        raise ValueError("mmap loading is for the CPU")
    if not mmap:
        model.to_empty(device=device)
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
