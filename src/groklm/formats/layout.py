"""What the format modules share: a checkpoint opened as a `Source` (a model laid out on the meta device
and filled one part at a time), the parts of a model, and placing one tensor from a file into a module
(as it is, or quantized with the released grouping on the way)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from groklm.files import CheckpointError, advise_huge_pages, return_freed_memory
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


class Source(Protocol):
    """A checkpoint opened for streaming: `model` is laid out on the meta device (int8 or int4 where the
    files are, or where the reader quantizes), and `fill(part)` gives one part storage and reads its
    tensors in. Parts are "" (everything outside the decoder layers) and "layers.N"."""

    model: Grok
    head_from_table: bool  # the int8 output head is made from the embedding table as it is read

    def __len__(self) -> int: ...  # the tensors `fill` reads

    def fill(self, part: str, device: str | torch.device = "cpu", bar: Any = None) -> None: ...


def parts(model: Grok) -> list[str]:
    return ["", *(f"layers.{i}" for i in range(model.config.num_layers))]


def part_of(name: str) -> str:
    """The part a parameter or module belongs to: "layers.N" or ""."""
    head, _, rest = name.partition(".")
    return f"layers.{rest.partition('.')[0]}" if head == "layers" else ""


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


def quantize_layout(model: Grok, bits: int | None, group_size: int = 64) -> Grok:
    """Lay out (on meta) the linears a reader quantizes on the way in: int8 with the released grouping,
    or int4 with `group_size`; None leaves them float."""
    if bits == 8:
        quantize_int8(model, released_groups)
    elif bits == 4:
        quantize_int4(model, group_size)
    elif bits is not None:
        raise ValueError(f"bits must be 4, 8 or None, not {bits}")
    return model


def with_int8_head(model: Grok, quantize_head: bool = True) -> Grok:
    """The output head laid out int8 (on meta), filled from the table as it is read (see `place`)."""
    if quantize_head:
        with torch.device("meta"):
            model.head = int8_head(model.config, model.dtype)
    return model


def place(model: Grok, param: str, value: Tensor, expert: int | None = None, where: str = "") -> None:
    """Put a float tensor (as stored in a file, [out, in] for linears) into the model's parameter or
    buffer `param` (our name; `expert` picks one slot of a stacked expert weight), quantizing it when
    the module is int8 or int4. Shapes are checked exactly; `where` names the file and tensor."""
    module_name, _, leaf = param.rpartition(".")
    module = model.get_submodule(module_name)
    with torch.no_grad():
        if isinstance(module, (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)) and leaf == "weight":
            weight = module.weight if expert is None else module.weight[expert]
            scales = module.scales if expert is None else module.scales[expert]
            out_features, groups = scales.shape
            in_features = _in_features(module, weight, scales)
            _check(where, value.shape, (out_features, in_features))
            if isinstance(module, (Int8Linear, Int8ExpertLinear)):
                q, s = quantize_weight(value.float(), groups, scales.dtype)
                weight.copy_(q if weight.dim() == 2 else block_major(q, groups))
            else:
                q, s = quantize_weight_int4(value.float(), in_features // groups, scales.dtype)
                weight.copy_(q)
            scales.copy_(s)
            return
        target = getattr(module, leaf)
        target = target if expert is None else target[expert]
        _check(where, value.shape, tuple(target.shape))
        target.copy_(value)
        if param == "embed.weight" and model.config.tie_embeddings and isinstance(model.head, Int8Linear):
            # The int8 output head from the table as stored, not as rounded to the compute dtype: what
            # the released loader does (see `quant.quantize_output_head`).
            for start in range(0, value.shape[0], 8192):
                fill_int8_head(model.head, start, value[start : start + 8192].float())


def _in_features(module: nn.Module, weight: Tensor, scales: Tensor) -> int:
    if isinstance(module, (Int4Linear, Int4ExpertLinear)):
        return weight.shape[-1] * 2
    return weight.shape[-1] * (scales.shape[-1] if weight.dim() == scales.dim() + 1 else 1)


def _check(where: str, got: Iterable[int], expected: tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise CheckpointError(f"{where}: shape {tuple(got)}, expected {expected}")


def dense_shape(model: Grok, param: str) -> tuple[int, ...]:
    """The shape a file stores parameter `param` in, one expert of it for stacked experts: [out, in] for
    linears (int8 and int4 ones included), the parameter's own shape otherwise."""
    if param == "embed.weight":  # (a streamed table is not in the model)
        return (model.config.vocab_size, model.config.emb_size)
    module_name, _, leaf = param.rpartition(".")
    module = model.get_submodule(module_name)
    stacked = isinstance(module, (ExpertLinear, Int8ExpertLinear, Int4ExpertLinear))
    if isinstance(module, (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)) and leaf == "weight":
        weight = module.weight[0] if stacked else module.weight
        scales = module.scales[0] if stacked else module.scales
        return (scales.shape[0], _in_features(module, weight, scales))
    shape = tuple(getattr(module, leaf).shape)
    return shape[1:] if stacked else shape


def embedding_rows(source: Source, rows: int = 4096) -> Iterator[Tensor]:
    """The embedding table [V, D] in chunks of `rows` rows: streamed from the file where the source can
    (the released fp32 table is never held whole), else slices of the model's table. Each chunk is
    valid until the next is asked for."""
    stream = getattr(source, "embedding_rows", None)
    if stream is not None:
        yield from stream(rows)
        return
    embed = source.model.embed
    table = embed.table if hasattr(embed, "table") else embed.weight
    for r0 in range(0, table.shape[0], rows):
        yield table[r0 : r0 + rows]
