"""Weight-only int8 and int4 linears: the weights and their scales, their layouts, and the matmuls that
read them without ever dequantizing a whole weight.

Layout. The released checkpoint stores a weight [in, out] with scales [G, out]: input rows split into
G equal blocks, one scale per (block, output column). We hold it as nn.Linear does, weight
[out, in] (int8), with scales [out, G], and

    y[n] = sum_g scales[n, g] * (x[block g] . weight[n, block g])

is exactly the reference's `x @ (w * scales)`: within a block the scale is a per-column constant.
G = 1 is ordinary per-output-channel int8.

Row-blocked weights (G > 1: the released attention output and expert down projections) are held
block-major, [G, out, in/G]: block g of every row together, as the released [in, out] array already
orders its rows. A matvec then reads each block as one run against only its own in/G activations,
which stay in the L1 cache however wide the row (see `weight_dot` in kernels/csrc/linear.c). The int8
output head's many 64-column groups stay row-major (`Int8Linear`'s default).

Kernels, best first: the native kernel (`groklm.kernels`, AVX2 or AVX-512 VNNI, bf16 activations on CPU); torch's
`_weight_int8pack_mm` (CPU, bf16, G = 1); otherwise dequantize this one weight for the call.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig


def _torch_int8_ok(x: Tensor, weight: Tensor, groups: int) -> bool:
    # torch's CPU int8 weight-only kernel: fast only in bf16 with few rows, per-channel scales only,
    # and it crashes (segfault, torch 2.13) unless the reduction length is a multiple of 8.
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.shape[0] <= 32
        and groups == 1
        and weight.shape[-1] % 8 == 0
    )


def row_major(weight: Tensor, scales: Tensor) -> Tensor:
    """An int8 weight as [..., out, in]: itself, or a row-major copy of a block-major one."""
    if not kernels.is_block_major(weight, scales):
        return weight
    return weight.movedim(-3, -2).flatten(-2)


def block_major(weight: Tensor, groups: int) -> Tensor:
    """A row-major weight [..., out, in] as a block-major copy [..., G, out, in/G]."""
    return weight.unflatten(-1, (groups, -1)).movedim(-2, -3).contiguous()


class _FrozenMatmul(torch.autograd.Function):
    """A quantized linear differentiable in its input only (its weight is frozen): the forward as it
    runs without gradients (native kernels included); the backward grad_y @ W with W dequantized a
    block of output rows at a time (never a whole dequantized copy). What LoRA and QLoRA train through."""

    ROWS = 4096

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, scales: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight, scales)
        ctx.bits, ctx.in_features = bits, x.shape[-1]
        with torch.no_grad():
            return (_int8_linear if bits == 8 else _int4_linear)(x, weight, scales)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:  # type: ignore[override]
        weight, scales = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        gx = torch.zeros(g.shape[0], ctx.in_features, dtype=torch.float32, device=g.device)
        blocked = weight.dim() == scales.dim() + 1  # int8 block-major, int4 panels (ROWS % PANEL == 0)
        for r0 in range(0, scales.shape[0], _FrozenMatmul.ROWS):
            r1 = min(scales.shape[0], r0 + _FrozenMatmul.ROWS)
            if blocked:
                w = weight[:, r0:r1] if ctx.bits == 8 else weight[r0 // PANEL : r1 // PANEL]
            else:
                w = weight[r0:r1]
            deq = dequantize_weight(w, scales[r0:r1]) if ctx.bits == 8 else dequantize_weight_int4(w, scales[r0:r1])
            gx += g[:, r0:r1].float() @ deq
        return gx.to(grad.dtype).view(*grad.shape[:-1], ctx.in_features), None, None, None


def int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] @ dequant(weight [out, in] or block-major [G, out, in/G], scales [out, G]).T ->
    [..., out] in x's dtype; differentiable in x (see `_FrozenMatmul`)."""
    if kernels.needs_grad(x):
        return _FrozenMatmul.apply(x, weight, scales, 8)
    return _int8_linear(x, weight, scales)


def _int8_linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    out_features, groups = scales.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kernels.in_features(weight, scales))
    if kernels.use_triton(x):
        from groklm.kernels import triton as gpu

        return gpu.matmul(x2, weight, scales, 8).view(*lead, out_features)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.supports(weight, scales):
        return kernels.int8_matmul(x2, weight, scales).view(*lead, out_features)
    weight = row_major(weight, scales)
    if _torch_int8_ok(x2, weight, groups):
        y = torch._weight_int8pack_mm(x2.contiguous(), weight, scales[:, 0].to(x.dtype))
    elif x.device.type != "cpu":
        y = scaled_int8_matmul(x2, weight, scales)
    else:  # CPU without the native kernel (or fp32, the exact reference mode)
        y = dequantized_linear(x2, dequantize_weight(weight, scales, x.dtype))
    return y.view(*lead, out_features)


def dequantized_linear(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, K] @ weight [N, K].T, a dequantized weight no native kernel takes. In bf16 on the CPU the
    sums run in fp64 (the bf16 products are exact there, and so, short of a 2^37 spread in their sizes,
    are their sums): a row's result then does not depend on how many rows share the call, as with the
    native kernels, which a server's batches and chunked prefills rely on. MKL's own order changes
    with the shapes (a Skylake-SP's bf16 matmul gave 21 rows other bits than the same rows among 40).
    fp32, the exact reference mode, stays in fp32."""
    if x.device.type != "cpu" or x.dtype == torch.float32:
        return F.linear(x, weight)
    return F.linear(x.double(), weight.double()).to(x.dtype)


def scaled_int8_matmul(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] @ dequant(weight [N, K], scales [N, G]).T with the scales applied to the matmul's
    output, block by block: y = sum_g scales[:, g] * (x_g @ weight_g.T).

    The path for GPUs. The only elementwise work on the weight is its int8 -> x.dtype cast, which
    torch.compile fuses into the matmul (as gpt-fast does), so no dequantized weight is written to
    memory; block products are scaled and summed in fp32.
    """
    (n, k), groups, m = weight.shape, scales.shape[-1], x.shape[0]
    w = weight.to(x.dtype)
    if groups == 1:
        return (F.linear(x, w).float() * scales[:, 0].float()).to(x.dtype)
    blocks = torch.einsum("mgk,ngk->mgn", x.view(m, groups, k // groups), w.view(n, groups, k // groups))
    return (blocks.float() * scales.float().T).sum(dim=1).to(x.dtype)


def quantize_weight(w: Tensor, groups: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Symmetric absmax int8 of w [..., out, in] with `groups` blocks over the input axis.

    Returns weight [..., out, in] int8 and scales [..., out, G]. Scales are rounded to
    `scale_dtype` before dividing, so dequantization reproduces the stored values exactly.
    """
    *lead, out_features, in_features = w.shape
    if in_features % groups:
        raise ValueError(f"input size {in_features} is not divisible into {groups} scale groups")
    blocks = w.float().reshape(*lead, out_features, groups, in_features // groups)
    scales = (blocks.abs().amax(dim=-1) / 127.0).clamp_min(1e-12).to(scale_dtype)  # [..., out, G]
    q = (blocks / scales.float()[..., None]).round().clamp(-127, 127).to(torch.int8)
    return q.reshape(w.shape), scales


def dequantize_weight(weight: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """weight [..., out, in] (or block-major [..., G, out, in/G]) int8 with scales [..., out, G] ->
    [..., out, in] in `dtype`."""
    weight = row_major(weight, scales)
    *lead, out_features, in_features = weight.shape
    groups = scales.shape[-1]
    w = weight.view(*lead, out_features, groups, in_features // groups).to(dtype) * scales.to(dtype)[..., None]
    return w.view(weight.shape)


class Int8Linear(nn.Module):
    """weight [out, in] int8, or block-major [G, out, in/G] where G > 1 and `block_major`; scales [out, G]."""

    def __init__(
        self, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype, block_major: bool = False
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        shape = (
            (groups, out_features, in_features // groups) if block_major and groups > 1 else (out_features, in_features)
        )
        self.register_buffer("weight", torch.empty(shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, groups, dtype=scale_dtype))

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.weight, self.scales)


class Int8ExpertLinear(nn.Module):
    """weight [E, out, in] int8, or block-major [E, G, out, in/G] where G > 1; scales [E, out, G]."""

    def __init__(
        self, num_experts: int, in_features: int, out_features: int, groups: int, scale_dtype: torch.dtype
    ) -> None:
        super().__init__()
        shape = (out_features, in_features) if groups == 1 else (groups, out_features, in_features // groups)
        self.register_buffer("weight", torch.empty(num_experts, *shape, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(num_experts, out_features, groups, dtype=scale_dtype))

    def forward(self, x: Tensor, expert: int) -> Tensor:
        return int8_linear(x, self.weight[expert], self.scales[expert])


# ---------------------------------------------------------------------------------------------
# int4: symmetric, one bf16 scale per `group_size` input columns, two weights a byte.
#
# Packing (as GGUF's Q4_0): each block of B consecutive input columns is B/2 bytes; byte j holds
# column j in its low nibble and column j + B/2 in its high nibble, both offset by 8 (stored 0..15 =
# value -8..7). B is 32 when the group size allows (the AVX2 kernel unpacks a block with one mask
# and one shift), else 16 (small models, dequantized per call).


def check_int4_group(config: GrokConfig, group_size: int) -> None:
    """Raise ValueError unless `group_size` fits every matrix of this config (checked before any work):
    a multiple of 16 that divides every input size."""
    inputs = {config.emb_size, config.q_size, config.ffn_size}
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"int4 group size must be a positive integer, not {group_size!r}")
    if group_size % 16 or any(n % group_size for n in inputs):
        fits = [g for g in (256, 128, 64, 32, 16) if all(n % g == 0 for n in inputs)]
        raise ValueError(
            f"int4 group size {group_size} must be a multiple of 16 dividing every input size {sorted(inputs)}; "
            f"these fit: {fits}"
        )


def _int4_block(group_size: int) -> int:
    if group_size % 32 == 0:
        return 32
    if group_size % 16 == 0:
        return 16
    raise ValueError(f"int4 group size {group_size} must be a multiple of 16")


def quantize_weight_int4(w: Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """w [..., out, in] -> packed uint8 [..., out, in/2] and scales [..., out, in/group_size]."""
    *lead, out_features, in_features = w.shape
    block = _int4_block(group_size)
    if in_features % group_size:
        fits = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        raise ValueError(f"int4 group size {group_size} does not divide the input size {in_features}; try {fits}")
    groups = in_features // group_size
    blocks = w.float().reshape(*lead, out_features, groups, group_size)
    scales = (blocks.abs().amax(dim=-1) / 7.0).clamp_min(1e-12).to(scale_dtype)  # [..., out, G]
    q = (blocks / scales.float()[..., None]).round().clamp(-8, 7).to(torch.int16) + 8  # 0..15
    q = q.reshape(*lead, out_features, in_features // block, 2, block // 2)  # [.., blocks, (low, high), B/2]
    packed = (q[..., 0, :] | (q[..., 1, :] << 4)).to(torch.uint8)
    return packed.reshape(*lead, out_features, in_features // 2), scales


PANEL = 16
"""Rows of an int4 weight the native CPU kernel interleaves (see `to_panels`)."""


def to_panels(packed: Tensor, out: Tensor | None = None) -> Tensor:
    """A packed int4 weight in rows [..., N, K/2] (N % 16 == 0, 32-column blocks) as the native CPU
    kernel reads it: [..., N/16, K/32, 256], for each 16 rows and 32 columns 4 runs of 16 dwords, run t
    holding bytes 4t..4t+3 of each row's 16 (columns 4t.. in the low nibbles, 16+4t.. in the high).
    Written into `out` where given (no other copy made)."""
    *lead, n, half = packed.shape
    # [.., panel, row, block, dword, byte] -> [.., panel, block, dword, row, byte]
    p = packed.reshape(*lead, n // PANEL, PANEL, half // 16, 4, 4).movedim(-4, -2)
    if out is None:
        return p.reshape(*lead, n // PANEL, half // 16, 16 * PANEL)
    out.view(p.shape).copy_(p)
    return out


def from_panels(panels: Tensor) -> Tensor:
    """Inverse of `to_panels`: [..., N/16, K/32, 256] -> [..., N, K/2]."""
    *lead, n16, blocks, _ = panels.shape
    p = panels.reshape(*lead, n16, blocks, 4, PANEL, 4).movedim(-2, -4)
    return p.reshape(*lead, n16 * PANEL, blocks * 16)


def scales_to_panels(scales: Tensor) -> Tensor:
    """The scales [..., N, G] of a weight in panels, as the kernel reads them: the same shape, but each
    panel's 16 x G scales group by group, so that `.view(..., N/16, G, 16)[.., p, g, r]` is row
    16p + r's scale of group g (a panel's scales are then one run, read in order with its weight)."""
    *lead, n, groups = scales.shape
    return scales.reshape(*lead, n // PANEL, PANEL, groups).transpose(-1, -2).reshape(*lead, n, groups)


def scales_from_panels(scales: Tensor) -> Tensor:
    """Inverse of `scales_to_panels`: scales [..., N, G] back in rows."""
    *lead, n, groups = scales.shape
    return scales.reshape(*lead, n // PANEL, groups, PANEL).transpose(-1, -2).reshape(*lead, n, groups)


def is_panels(packed: Tensor, scales: Tensor) -> bool:
    """Whether a packed int4 weight is in the kernel's panels (see `to_panels`; its scales then in panel
    order, `scales_to_panels`), not in rows."""
    return kernels.is_block_major(packed, scales)  # (the kernels' own layout, one dimension more than the scales)


def dequantize_weight_int4(packed: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of quantize_weight_int4 (from rows or panels): -> [..., out, in] in `dtype`."""
    if is_panels(packed, scales):
        packed, scales = from_panels(packed), scales_from_panels(scales)
    *lead, out_features, half = packed.shape
    groups = scales.shape[-1]
    block = _int4_block(half * 2 // groups)
    p = packed.reshape(*lead, out_features, half * 2 // block, block // 2).to(torch.int16)
    q = torch.stack([p & 15, p >> 4], dim=-2).reshape(*lead, out_features, half * 2) - 8  # [.., out, in]
    w = q.view(*lead, out_features, groups, -1).to(dtype) * scales.to(dtype)[..., None]
    return w.view(*lead, out_features, half * 2)


def int4_linear(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """x [..., in] @ dequant_int4(packed [out, in/2], scales [out, G]).T -> [..., out] in x's dtype;
    differentiable in x (see `_FrozenMatmul`)."""
    if kernels.needs_grad(x):
        return _FrozenMatmul.apply(x, packed, scales, 4)
    return _int4_linear(x, packed, scales)


def _int4_linear(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    out_features = scales.shape[0]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, kernels.in_features(packed, scales))
    if kernels.use_triton(x):
        from groklm.kernels import triton as gpu

        return gpu.matmul(x2, packed, scales, 4).view(*lead, out_features)
    if x.dtype == torch.bfloat16 and x.device.type == "cpu" and kernels.supports_int4(packed, scales):
        y = kernels.int4_matmul(x2, packed, scales)
    else:
        y = dequantized_linear(x2, dequantize_weight_int4(packed, scales, x.dtype))
    return y.view(*lead, out_features)


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int, scale_dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, in_features // group_size, dtype=scale_dtype))

    def forward(self, x: Tensor) -> Tensor:
        return int4_linear(x, self.weight, self.scales)


class Int4ExpertLinear(nn.Module):
    def __init__(
        self, num_experts: int, in_features: int, out_features: int, group_size: int, scale_dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(num_experts, out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales", torch.empty(num_experts, out_features, in_features // group_size, dtype=scale_dtype)
        )

    def forward(self, x: Tensor, expert: int) -> Tensor:
        return int4_linear(x, self.weight[expert], self.scales[expert])


def dense_weight(module: nn.Module, expert: int | None = None) -> Tensor:
    """The fp32 weight [out, in] of a float, int8 or int4 linear, or of one expert of a stacked one."""
    w = module.weight if expert is None else module.weight[expert]
    if isinstance(module, (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)):
        scales = module.scales if expert is None else module.scales[expert]
        if isinstance(module, (Int4Linear, Int4ExpertLinear)):
            return dequantize_weight_int4(w, scales)
        return dequantize_weight(w, scales)
    return w.detach().float()
