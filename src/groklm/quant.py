"""Weight-only int8 as a transform on a built model: int8 weights plus their scales, never dequantized whole.

Layout. The released checkpoint stores a weight [in, out] with scales [G, out]: input rows split into
G equal blocks, one scale per (block, output column). We hold it as weight [G, out, in/G] (int8) and
scales [G, out], so block g is the contiguous [out, in/G] matrix the fused kernels want, and

    y = sum_g (x[:, block g] @ weight[g].T) * scales[g]

is exactly the reference's `x @ (w * scales)`: within a block the scale is a per-column constant.
G = 1 is ordinary per-output-channel int8.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groklm.model import ExpertLinear


def _fused_ok(x: Tensor, block: int) -> bool:
    # torch's CPU int8 weight-only kernel; in bf16 it runs at memory speed. Its fp32 path is slow,
    # it wants few rows, and it crashes (segfault, torch 2.13) unless the reduction length is a
    # multiple of 8, so other cases dequantize one block at a time.
    return x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.shape[0] <= 32 and block % 8 == 0


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] @ dequant(weight [G, out, in/G], scales [G, out]).T -> [..., out] in x's dtype."""
    groups, out_features, block = weight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, groups * block)
    fused = _fused_ok(x2, block)
    acc: Tensor | None = None
    for g in range(groups):
        xg = x2[:, g * block : (g + 1) * block]
        if fused:
            y = torch._weight_int8pack_mm(xg.contiguous(), weight[g], scales[g]).float()
        else:
            y = F.linear(xg, weight[g].to(x.dtype)).float() * scales[g].float()
        acc = y if acc is None else acc + y  # partial sums in fp32, as one fp32-accumulated matmul
    assert acc is not None
    return acc.to(x.dtype).view(*lead, out_features)


def quantize_weight(w: Tensor, groups: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 of w [..., out, in] with `groups` blocks over the input axis.

    Returns weight [..., G, out, in/G] int8 and scales [..., G, out]. Scales are rounded to
    `scale_dtype` before dividing, so dequantization reproduces the stored values exactly.
    """
    *lead, out_features, in_features = w.shape
    if in_features % groups:
        raise ValueError(f"input size {in_features} is not divisible into {groups} scale groups")
    blocks = w.float().reshape(*lead, out_features, groups, in_features // groups).transpose(-3, -2)
    scales = (blocks.abs().amax(dim=-1) / 127.0).clamp_min(1e-12).to(scale_dtype)  # [..., G, out]
    q = (blocks / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def dequantize_weight(weight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse layout of quantize_weight: [..., G, out, in/G] -> [..., out, in]."""
    *lead, groups, out_features, block = weight.shape
    w = weight.to(dtype) * scales.to(dtype)[..., None]
    return w.transpose(-3, -2).reshape(*lead, out_features, groups * block)


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(groups, out_features, in_features // groups, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=scale_dtype))

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.scales)


class Int8ExpertLinear(nn.Module):
    def __init__(
        self, num_experts: int, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (num_experts, groups, out_features, in_features // groups)
        self.register_buffer("weight", torch.empty(shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_experts, groups, out_features, dtype=scale_dtype))

    def forward(self, x: Tensor, expert: int) -> Tensor:
        return int8_linear(x, self.weight[expert], self.scales[expert])


Groups = Callable[[str], int | None]
"""Module path -> number of scale groups, or None to leave that module as it is."""


def quantize_int8(model: nn.Module, groups: Groups, scale_dtype: torch.dtype | None = None) -> nn.Module:
    """Swap Linear / ExpertLinear modules for int8 ones, in place; returns the model.

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
            new: nn.Module = Int8Linear(module.in_features, module.out_features, g, dtype)
        else:
            e, out_features, in_features = module.weight.shape
            new = Int8ExpertLinear(e, in_features, out_features, g, dtype)
        new = new.to(device)
        if device.type != "meta":
            q, s = quantize_weight(module.weight.detach(), g, dtype)
            new.weight.copy_(q)
            new.scales.copy_(s)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return model
