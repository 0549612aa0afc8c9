"""A rank's share of a model: laid out on the meta device by the plan (`apply_plan`), and filled with
its slices of the whole model's tensors (`fill_module`), read from a model in memory (`model_reader`)
or, by a loader, from the checkpoint's files.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from groklm.model import Grok
from groklm.parallel.modules import Groups
from groklm.parallel.plan import Plan, Slices, lay_out, logical_shape
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    block_major,
    from_panels,
    is_panels,
    scales_from_panels,
)


def meta_copy(model: Grok) -> Grok:
    """A copy of `model` with every tensor on the meta device (no storage copied; the embedding a plain
    meta table, whatever reads the original's)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    c = model.config
    memo[id(model.embed)] = nn.Embedding(c.vocab_size, c.emb_size, device="meta", dtype=model.dtype)
    return copy.deepcopy(model, memo)


def apply_plan(model: Grok, p: Plan, groups: Groups | None = None) -> Grok:
    """The rank's share of `model`, with the collectives added: a new model, configured with the rank's
    heads (`model.config`, so KV caches are allocated for them) and `model.plan` = p. A model on the
    meta device gives one only laid out (for a loader to fill, see `fill_module`); a real one, filled
    with copies of its slices."""
    whole, model = model, lay_out(meta_copy(model), p, groups or Groups())
    model.plan = p  # type: ignore[assignment]
    if whole.norm.weight.device.type != "meta":
        model.to_empty(device=whole.norm.weight.device)
        read = model_reader(whole)
        for name in filled_modules(model):
            fill_module(model, whole, p, name, read)
    return model.eval().requires_grad_(False)


_QUANT = (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)
Read = Callable[[str, Slices], Tensor]


def model_reader(whole: Grok) -> Read:
    """`read` (see `fill_module`) from a model in memory."""

    def read(name: str, slices: Slices | None) -> Tensor:
        module_name, _, leaf = name.rpartition(".")
        module = whole.get_submodule(module_name)
        t = getattr(module, leaf, None)
        if t is None and name == "embed.weight":  # a table read from the checkpoint file
            t = module.table
        if isinstance(module, (Int4Linear, Int4ExpertLinear)) and is_panels(module.weight, module.scales):
            # (a copy in rows: slices of panels are not rows)
            t = from_panels(t) if leaf == "weight" else scales_from_panels(t) if leaf == "scales" else t
        if isinstance(module, _QUANT) and leaf == "weight" and t.dim() == module.scales.dim() + 1:
            return _take_block_major(t, slices)
        return _take(t, slices)

    return read


def _take(t: Tensor, slices: Slices | None) -> Tensor:
    """A copy of t's slices."""
    for dim, s in enumerate(slices or ()):
        t = t[(slice(None),) * dim + (s,)]
    return t.contiguous().clone()


def _take_block_major(t: Tensor, slices: Slices | None) -> Tensor:
    """A block-major int8 weight [.., G, out, in/G] sliced as its row-major [.., out, in]: an input slice
    of whole blocks, or within one, copies those blocks only."""
    cols = t.shape[-1]
    *lead, rows, sl = _whole(slices, (*t.shape[:-3], t.shape[-2], t.shape[-3] * cols))
    b0, b1 = sl.start // cols, (sl.stop - 1) // cols + 1
    if b1 - b0 > 1 and (sl.start % cols or sl.stop % cols):
        raise ValueError(f"input columns {sl.start}..{sl.stop} straddle blocks of {cols}")
    inner = slice(sl.start - b0 * cols, sl.stop - b0 * cols) if b1 - b0 == 1 else slice(None)
    return _take(t, (*lead, slice(b0, b1), rows, inner)).movedim(-3, -2).flatten(-2)  # [.., out, cols]


def global_name(name: str) -> str:
    """A sharded model's parameter or module name as the whole model has it."""
    return "head" + name[len("head.local") :] if name.startswith("head.local") else name


def _whole(slices: Slices | None, shape: tuple[int, ...]) -> Slices:
    """Slices with every axis explicit (None, or slice(None), for an axis taken whole)."""
    slices = slices or (slice(None),) * len(shape)
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(slices, shape, strict=True))


def shard_reads(local: Grok, whole: Grok, p: Plan, module: str) -> list[tuple[str, Slices]]:
    """The (global name, slices: every axis explicit) module `module` of the sharded model is filled from."""
    mod = local.get_submodule(module)
    g = global_name(module)
    if g == "embed":  # (a streamed table is not in the whole model)
        return [("embed.weight", (p.vocab(), slice(0, p.config.emb_size)))]
    gmod = whole.get_submodule(g)
    if isinstance(mod, _QUANT):
        shape = logical_shape(gmod)
        wsl = _whole(p.slices(f"{g}.weight", shape), shape)
        scales = tuple(gmod.scales.shape)
        ssl = _whole(p.slices(f"{g}.scales", scales, scales[-1]), scales)
        if isinstance(mod, (Int4Linear, Int4ExpertLinear)):  # two columns a byte
            wsl = (*wsl[:-1], slice(wsl[-1].start // 2, wsl[-1].stop // 2))
        return [(f"{g}.weight", wsl), (f"{g}.scales", ssl)]
    return [(f"{g}.{leaf}", _whole(p.slices(f"{g}.{leaf}", tuple(t.shape)), tuple(t.shape))) for leaf, t in
            [*gmod.named_parameters(recurse=False), *gmod.named_buffers(recurse=False)]]  # fmt: skip


def fill_module(local: Grok, whole: Grok, p: Plan, module: str, read: Read, chunk_bytes: int = 16 << 20) -> None:
    """Fill module `module` of the sharded model (given storage) with `read(global name, slices)`, which
    returns a slice of the whole model's tensor in its logical layout (int8 row-major [.., out, in],
    int4 packed [.., out, in/2], scales [.., out, G]); read `chunk_bytes` at a time along the first
    axis (experts, or output rows), so that a large shard is never held twice."""
    mod = local.get_submodule(module)
    reads = shard_reads(local, whole, p, module)
    quant = isinstance(mod, _QUANT)
    blocked = quant and mod.weight.dim() == mod.scales.dim() + 1  # held block-major [.., G, out, in/G]
    targets = [mod.weight, mod.scales] if quant else [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
    first = reads[0][1][0]
    n = first.stop - first.start
    row = max(1, targets[0].numel() * targets[0].element_size() // max(1, n))
    step = max(1, chunk_bytes // row)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            for i, ((name, sl), target) in enumerate(zip(reads, targets, strict=True)):
                value = read(name, (slice(sl[0].start + r0, sl[0].start + r1), *sl[1:]))
                if blocked and i == 0:
                    value = block_major(value, mod.scales.shape[-1])
                    # a 2-D weight's rows are its second axis when block-major
                    part = target[r0:r1] if mod.weight.dim() == 4 else target[:, r0:r1]
                else:
                    part = target[r0:r1]
                _copy(part, value, name)


def _copy(target: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name}: a shard of shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    if value.dtype != target.dtype and not (value.dtype.is_floating_point and target.dtype.is_floating_point):
        raise ValueError(f"{name}: stored as {value.dtype}, the shard holds {target.dtype}")
    target.copy_(value)


def filled_modules(model: Grok) -> list[str]:
    """The modules holding tensors of their own (what `fill_module` fills), in order."""
    return [n for n, m in model.named_modules() if [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
