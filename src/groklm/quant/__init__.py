"""Weight-only int8 and int4 as transforms on a built model, each `model -> model`: `quantize_int8`,
`quantize_int4` (linears swapped for quantized ones, then `fused_step.fuse`), `quantize_output_head` (an int8
copy of the tied table for the output head) and `pack_int4` (int4 weights in the CPU kernel's panels).
The weights' layouts and matmuls are in `quant.linear`, the fused native modules in `quant.fused`, a decode
step as one call in `quant.fused_step`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import advise_huge_pages
from groklm.model import ExpertLinear, Grok
from groklm.quant.fused import QuantizedAttention, QuantizedMoE
from groklm.quant.fused_step import fuse
from groklm.quant.linear import (
    PANEL,
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    block_major,
    check_int4_group,
    dense_weight,
    dequantize_weight,
    dequantize_weight_int4,
    dequantized_linear,
    from_panels,
    int4_linear,
    int8_linear,
    is_panels,
    quantize_weight,
    quantize_weight_int4,
    row_major,
    scaled_int8_matmul,
    scales_from_panels,
    scales_to_panels,
    to_panels,
)

__all__ = [
    "PANEL",
    "Groups",
    "Int4ExpertLinear",
    "Int4Linear",
    "Int8ExpertLinear",
    "Int8Linear",
    "QuantizedAttention",
    "QuantizedMoE",
    "block_major",
    "check_int4_group",
    "dense_weight",
    "dequantize_weight",
    "dequantize_weight_int4",
    "dequantized_linear",
    "fill_int8_head",
    "from_panels",
    "fuse",
    "int4_linear",
    "int8_head",
    "int8_linear",
    "is_panels",
    "pack_int4",
    "quantize_int4",
    "quantize_int8",
    "quantize_output_head",
    "quantize_weight",
    "quantize_weight_int4",
    "released_groups",
    "row_major",
    "scaled_int8_matmul",
    "scales_from_panels",
    "scales_to_panels",
    "to_panels",
]


Groups = Callable[[str], int | None]
"""Module path -> number of scale groups, or None to leave that module as it is."""


def quantize_int8(model: nn.Module, groups: Groups, scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap Linear / ExpertLinear modules for int8 ones, in place, then `fuse`; returns the model (a new
    block where `model` is itself an attention or MoE block: use what it returns).

    On the meta device this only lays out empty int8 storage (for a loader to fill); on a real
    device the existing weights are quantized. Modules for which `groups` says None stay as they
    are (the router is fp32 in the released model).
    """
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, ExpertLinear))]
    for name, module in targets:
        g = groups(name)
        if g is None:
            continue
        dtype = scale_dtype or module.weight.dtype
        device = module.weight.device
        if isinstance(module, nn.Linear):
            new: nn.Module = Int8Linear(module.in_features, module.out_features, g, dtype, block_major=True)
        else:
            e, out_features, in_features = module.weight.shape
            new = Int8ExpertLinear(e, in_features, out_features, g, dtype)
        new = new.to(device)
        if device.type != "meta":
            q, s = quantize_weight(module.weight.detach(), g, dtype)
            new.weight.copy_(q if g == 1 else block_major(q, g))
            new.scales.copy_(s)
        model.set_submodule(name, new)
    return fuse(model)


def int8_head(config: GrokConfig, dtype: torch.dtype, group_size: int = 64) -> Int8Linear:
    """An empty int8 output projection [vocab, width] with one scale per `group_size` columns."""
    width = config.emb_size
    groups = width // group_size if width % group_size == 0 else 1
    return Int8Linear(width, config.vocab_size, groups, dtype)


def fill_int8_head(head: Int8Linear, start: int, rows: Tensor) -> None:
    """Quantize embedding-table rows [n, width] into head rows start..start+n."""
    q, sc = quantize_weight(rows, head.scales.shape[-1], head.scales.dtype)
    head.weight[start : start + rows.shape[0]] = q
    head.scales[start : start + rows.shape[0]] = sc


def quantize_output_head(model: Grok, group_size: int = 64) -> Grok:
    """Give the output projection its own int8 copy of the (tied) embedding table, with one scale
    per `group_size` columns; the input lookup keeps the exact table.

    The output head reads the whole table every token (vocab x width), so this halves its bytes
    against bf16. Quantizing the lookup too would move the golden logits ~5x further from the
    reference (router choices flip); the head alone moves them from 0.0196 to 0.0203 mean |diff|
    in bf16. (A loader avoids the extra copy: it fills this head from the table's rows as it reads them,
    and the released format's lookup reads the table from its file.)
    """
    table = model.embed.weight if model.config.tie_embeddings else model.head.weight  # Grok-2: its own head
    head = int8_head(model.config, table.dtype, group_size).to(table.device)
    with torch.no_grad():
        for start in range(0, table.shape[0], 8192):  # bounded temporaries
            fill_int8_head(head, start, table[start : start + 8192])
    model.head = head
    return model


def released_groups(module: str) -> int | None:
    """Scale groups over the input of the released int8 weights, by our module name: 8 blocks for the
    attention output and the experts' down projections, one scale per output row for the other
    linears; None (left in float) for the router, the norms and the embedding."""
    leaf = module.rpartition(".")[2]
    if leaf in ("wo", "w2", "down"):  # (Grok-2's dense MLP as its experts)
        return 8
    return 1 if leaf in ("wq", "wk", "wv", "w1", "v", "gate", "up") else None


def quantize_int4(model: nn.Module, group_size: int = 64, scale_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Swap every linear / expert linear except the router for int4, in place, one module (and one
    expert, 4096 rows) at a time, each module's old storage freed as it is replaced: the temporaries
    are one block of fp32 rows. Works from float or int8 modules. On the meta device it only lays out
    empty storage, for a loader to fill. Then `fuse`; returns the model (as `quantize_int8`)."""
    kinds = (nn.Linear, ExpertLinear, Int8Linear, Int8ExpertLinear)
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and not n.endswith("router")]
    for name in names:
        module = model.get_submodule(name)
        w = module.weight
        out_features = w.shape[-2]
        int8 = isinstance(module, (Int8Linear, Int8ExpertLinear))
        in_features = kernels.in_features(w, module.scales) if int8 else w.shape[-1]
        stacked = isinstance(module, (ExpertLinear, Int8ExpertLinear))
        new: nn.Module = (
            Int4ExpertLinear(w.shape[0], in_features, out_features, group_size, scale_dtype)
            if stacked
            else Int4Linear(in_features, out_features, group_size, scale_dtype)
        ).to(w.device)
        if w.device.type != "meta":
            with torch.no_grad():
                for e in range(w.shape[0]) if stacked else [None]:
                    weight = module.weight if e is None else module.weight[e]
                    scales = (module.scales if e is None else module.scales[e]) if int8 else None
                    for r0 in range(0, out_features, 4096):
                        n = min(4096, out_features - r0)
                        rows = weight.narrow(-2, r0, n)
                        dense = (
                            dequantize_weight(rows, scales.narrow(-2, r0, n)) if scales is not None else rows.float()
                        )
                        q, sc = quantize_weight_int4(dense, group_size, scale_dtype)
                        (new.weight if e is None else new.weight[e])[r0 : r0 + n] = q
                        (new.scales if e is None else new.scales[e])[r0 : r0 + n] = sc
        model.set_submodule(name, new)
        del module, w
    return fuse(model)


def pack_int4(model: nn.Module) -> nn.Module:
    """Lay out every int4 weight the native CPU kernel takes in its panels (`to_panels`, its scales in
    panel order: `scales_to_panels`), in place, one module at a time (each module's rows freed as its
    panels replace them). A transform for CPU inference after loading: everything else reads either
    layout (`dequantize_weight_int4`), and `save_native` writes rows."""
    for module in model.modules():
        if isinstance(module, (Int4Linear, Int4ExpertLinear)) and not is_panels(module.weight, module.scales):
            n, groups, k = module.scales.shape[-2], module.scales.shape[-1], module.weight.shape[-1] * 2
            if module.weight.device.type == "cpu" and n % PANEL == 0 and (k // groups) % 32 == 0:
                rows = module.weight
                panels = torch.empty(*rows.shape[:-2], n // PANEL, k // 32, 16 * PANEL, dtype=torch.uint8)
                scales = torch.empty_like(module.scales)
                advise_huge_pages([panels, scales])  # as the loader's weights: decode streams them every token
                module.weight = to_panels(rows, out=panels)
                module.scales = scales.copy_(scales_to_panels(module.scales))
                del rows
    return model
