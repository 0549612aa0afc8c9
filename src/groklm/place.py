"""Placing a checkpoint into a model: build it on the meta device, lay its linears out as the checkpoint
stores them (or as `bits` asks), check every tensor against that before any is read, and copy the
(our name, tensor) pairs a format yields into place, one part at a time, quantizing on the way where the
module is int8 or int4 and the value float."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from groklm.files import advise_huge_pages, return_freed_memory
from groklm.formats.common import Source, check_shape, parts
from groklm.model import ExpertLinear, Grok
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    block_major,
    fill_int8_head,
    int8_head,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    quantize_weight_int4,
    released_groups,
)

_QUANTIZED = (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)


def build(source: Source, dtype: torch.dtype) -> Grok:
    """The model for the source's config on the meta device, nothing allocated."""
    with torch.device("meta"):
        return Grok(source.config, dtype)


def lay_out(model: Grok, quantized: dict[str, tuple[int, int]] | None) -> Grok:
    """The linears int8 or int4 as a checkpoint stores them (module -> (8, scale groups) or (4, group
    size)); the output head int8 unblocked where stored so."""
    if quantized is None:
        return model
    int8 = {m: g for m, (bits, g) in quantized.items() if bits == 8 and m != "head"}
    with torch.device("meta"):
        model = quantize_int8(model, int8.get)
        for name, (bits, group) in quantized.items():
            if bits != 4:
                continue
            c = model.config  # (a tied head has no weight of its own)
            shape = (c.vocab_size, c.emb_size) if name == "head" else tuple(model.get_submodule(name).weight.shape)
            new: nn.Module = (
                Int4ExpertLinear(shape[0], shape[2], shape[1], group, model.dtype)
                if len(shape) == 3
                else Int4Linear(shape[1], shape[0], group, model.dtype)
            )
            _set(model, name, new)
        if quantized.get("head", (0, 0))[0] == 8:
            model.head = Int8Linear(model.config.emb_size, model.config.vocab_size, quantized["head"][1], model.dtype)
    return model


def quantize_on_load(model: Grok, bits: int | None, group_size: int = 64) -> Grok:
    """Lay out (on meta) the float linears to be quantized as they are read: int8 with the released
    grouping, or int4 with `group_size`; None leaves them float."""
    if bits == 8:
        model = quantize_int8(model, released_groups)
    elif bits == 4:
        model = quantize_int4(model, group_size)
    elif bits is not None:
        raise ValueError(f"bits must be 4, 8 or None, not {bits}")
    return model


def with_int8_head(model: Grok, quantize_head: bool = True) -> Grok:
    """The output head laid out int8 (on meta), filled from the table as it is read (see `place`)."""
    if quantize_head:
        with torch.device("meta"):
            model.head = int8_head(model.config, model.dtype)
    return model


def with_table(model: Grok, source: Source) -> Grok:
    """The embedding table as the source has it read: held in the model, mapped from its file (an int8
    head then being made from it), or left out (streamed from the file where wanted)."""
    table = getattr(source, "table", "held")
    if table == "mapped":
        model.embed = source.map_table(model.dtype)  # type: ignore[attr-defined]
    elif table == "streamed":
        del model.embed.weight
    return model


def checked(model: Grok, source: Source) -> Grok:
    """Every tensor of the source checked against the model laid out for it, before any is read."""
    source.check(dict(model.state_dict(keep_vars=True)), lambda name: dense_shape(model, name))
    return model


def laid_out(source: Source, dtype: torch.dtype, bits: int | None = None) -> Grok:
    """The model a source fills, on the meta device: built, its linears as stored, the float ones as
    `bits` asks, the head int8 if the source was opened so, the table as the source has it, checked
    against the source. Each step one call."""
    model = build(source, dtype)
    model = lay_out(model, source.quantized)
    model = quantize_on_load(model, bits)
    model = with_int8_head(model, source.int8_head)
    model = with_table(model, source)
    return checked(model, source)


def part_modules(model: Grok, part: str) -> list[nn.Module]:
    return [model.get_submodule(part)] if part else [m for n, m in model.named_children() if n != "layers"]


def allocate(model: Grok, part: str, device: str | torch.device = "cpu") -> None:
    """Give a part's modules (on the meta device) uninitialised storage."""
    for module in part_modules(model, part):
        module.to_empty(device=device)
        advise_huge_pages([*module.parameters(), *module.buffers()])


def free(model: Grok, part: str) -> None:
    """Drop a part's storage (back to the meta device): a conversion holds one part at a time."""
    for module in part_modules(model, part):
        module.to("meta")
    return_freed_memory()


def fill_part(model: Grok, source: Source, part: str, device: str | torch.device = "cpu", bar: Any = None) -> None:
    """Give a part storage and place the tensors the source yields for it."""
    allocate(model, part, device)
    head = source.int8_head and model.config.tie_embeddings and isinstance(model.head, Int8Linear)
    with torch.no_grad():
        for name, index, value, where in source.tensors(part):
            place(model, name, value, index, where, head)
            if bar is not None:
                bar.update(1)


def place(model: Grok, param: str, value: Any, index: int | slice | None = None, where: str = "",
          head: bool = False) -> None:  # fmt: skip
    """Put a tensor (as stored in a file, [out, in] for linears) into the model's parameter or buffer
    `param` (our name; `index` an expert's slot of a stacked weight, or rows), quantizing a float one
    when the module is int8 or int4, re-laying an int8 one stored row-major where held block-major; or
    let `value`, a function, read itself into place. `where` names the file and tensor. `head`: the
    int8 output head is made from the embedding table's rows as they are placed."""
    module_name, _, leaf = param.rpartition(".")
    module = model.get_submodule(module_name)
    target = getattr(module, leaf, None)
    if target is not None and index is not None:
        target = target[index]
    with torch.no_grad():
        if callable(value):
            value(target)
        elif isinstance(module, _QUANTIZED) and leaf == "weight" and value.is_floating_point():
            weight, scales = target, module.scales if index is None else module.scales[index]
            out_features, groups = scales.shape
            in_features = _in_features(module, weight, scales)
            check_shape(where, value.shape, (out_features, in_features))
            if isinstance(module, (Int8Linear, Int8ExpertLinear)):
                q, s = quantize_weight(value.float(), groups, scales.dtype)
                weight.copy_(q if weight.dim() == 2 else block_major(q, groups))
            else:
                q, s = quantize_weight_int4(value.float(), in_features // groups, scales.dtype)
                weight.copy_(q)
            scales.copy_(s)
        elif target is not None and target.dim() == value.dim() + 1 and value.dtype == torch.int8:
            target.copy_(block_major(value, target.shape[-3]))  # stored row-major, held in row blocks
        elif target is not None:
            check_shape(where, value.shape, tuple(target.shape))
            target.copy_(value)
        if head and param == "embed.weight":
            # The int8 output head from the table as stored, not as rounded to the compute dtype: what
            # the released loader does (see `quant.quantize_output_head`).
            start = index.start if isinstance(index, slice) else 0
            for r in range(0, value.shape[0], 8192):
                fill_int8_head(model.head, start + r, value[r : r + 8192].float())


def _in_features(module: nn.Module, weight: Tensor, scales: Tensor) -> int:
    if isinstance(module, (Int4Linear, Int4ExpertLinear)):
        return weight.shape[-1] * 2
    return weight.shape[-1] * (scales.shape[-1] if weight.dim() == scales.dim() + 1 else 1)


def dense_shape(model: Grok, param: str) -> tuple[int, ...]:
    """The shape a file stores parameter `param` in, one expert of it for stacked experts: [out, in] for
    linears (int8 and int4 ones included), the parameter's own shape otherwise."""
    if param == "embed.weight":  # (a streamed table is not in the model)
        return (model.config.vocab_size, model.config.emb_size)
    module_name, _, leaf = param.rpartition(".")
    module = model.get_submodule(module_name)
    stacked = isinstance(module, (ExpertLinear, Int8ExpertLinear, Int4ExpertLinear))
    if isinstance(module, _QUANTIZED) and leaf == "weight":
        weight = module.weight[0] if stacked else module.weight
        scales = module.scales[0] if stacked else module.scales
        return (scales.shape[0], _in_features(module, weight, scales))
    shape = tuple(getattr(module, leaf).shape)
    return shape[1:] if stacked else shape


def fill(model: Grok, source: Source, device: str | torch.device = "cpu", bar: Any = None) -> Grok:
    """Every part given storage on `device` and the source's tensors placed."""
    for part in parts(model.config):
        fill_part(model, source, part, device, bar)
    return model.eval().requires_grad_(False)


def mapped(model: Grok, source: Any) -> Grok:
    """The model (laid out on meta) given the source's memory-mapped tensors as they are (`assign`): paged
    in from the files as first used. Int8 stored row-major is re-laid in row blocks, a float table
    converted to the model's dtype: those are copies."""
    held = dict(model.state_dict())
    tensors = {}
    for name, t in source.mapped().items():
        if t.dtype == torch.int8 and held[name].dim() == t.dim() + 1:
            t = block_major(t, held[name].shape[-3])
        tensors[name] = t if t.dtype == held[name].dtype else t.to(held[name].dtype)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def embedding_rows(model: Grok, source: Source | None = None, rows: int = 4096) -> Iterator[Tensor]:
    """The embedding table [V, D] in chunks of `rows` rows: streamed from the file where the source can
    (the released fp32 table is never held whole), else slices of the model's table. Each chunk is
    valid until the next is asked for."""
    stream = getattr(source, "table_rows", None)
    if stream is not None:
        yield from stream(rows)
        return
    embed = model.embed
    table = embed.table if hasattr(embed, "table") else embed.weight
    for r0 in range(0, table.shape[0], rows):
        yield table[r0 : r0 + rows]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
