"""What the native kernels take: the weight layouts (int8 in rows or block-major, int4 packed in rows or
in panels), their sizes, and the conditions on shapes, dtypes and strides. Pure shape rules: whether
the library is there is `native.available`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

Weight = tuple[Tensor, Tensor]
"""A quantized weight [N, K] (int8, or packed int4 [N, K/2]) and its bf16 scales [N, G]."""

Expert = tuple[Tensor, Tensor]
"""Stacked expert weights [E, out, in] (int8, or packed int4 [E, out, in/2]) and bf16 scales [E, out, G]."""


def is_block_major(weight: Tensor, scales: Tensor) -> bool:
    """Whether a weight is in its kernel's own layout, one dimension more than its scales: int8
    block-major [..., G, N, K/G], int4 panels [..., N/16, K/32, 256] (scales [..., N, G], for panels in
    panel order: `quant.scales_to_panels`); not in rows."""
    return weight.dim() == scales.dim() + 1


def in_features(weight: Tensor, scales: Tensor) -> int:
    """The input size K of an int8 weight, row-major [..., N, K] or block-major [..., G, N, K/G], or of a
    packed int4 one [..., N, K/2] or in panels [..., N/16, K/32, 256] (uint8), with scales [..., N, G]."""
    if weight.dtype == torch.uint8:
        return weight.shape[-2] * 32 if is_block_major(weight, scales) else weight.shape[-1] * 2
    if is_block_major(weight, scales):
        return weight.shape[-1] * scales.shape[-1]
    return weight.shape[-1]


def fits(weight: Tensor, scales: Tensor, bits: int) -> bool:
    """CPU, contiguous, bf16 scales [N, G] (row-major weight [N, ...], int8 block-major [G, N, K/G], or
    int4 panels), and each scale group a multiple of the kernel's block: 64 columns (int8), 32 (int4)."""
    dtype, block = (torch.int8, 64) if bits == 8 else (torch.uint8, 32)
    k = in_features(weight, scales)
    groups = scales.shape[-1]
    blocked = is_block_major(weight, scales)
    lead = scales.dim() - 2
    if not blocked:
        rows = weight.dim() == scales.dim() and weight.shape[-2] == scales.shape[-2]
    elif dtype == torch.int8:  # block-major
        rows = weight.shape[lead] == groups and weight.shape[-2] == scales.shape[-2]
    else:  # int4 panels
        rows = weight.shape[-3] * 16 == scales.shape[-2] and weight.shape[-1] == 256
    return (
        lead >= 0
        and rows
        and weight.shape[:lead] == scales.shape[:lead]
        and weight.device.type == "cpu"
        and weight.dtype == dtype
        and scales.dtype == torch.bfloat16
        and weight.is_contiguous()
        and scales.is_contiguous()
        and k % groups == 0
        and (k // groups) % block == 0
    )


def share_a_layout(parts: Sequence[Weight]) -> bool:
    """Whether weights can share one call: the same K, scale groups and layout."""
    return (
        len({in_features(w, s) for w, s in parts}) == 1
        and len({s.shape[-1] for _, s in parts}) == 1
        and len({is_block_major(w, s) for w, s in parts}) == 1
    )


def fits_linear(bits: int, parts: Sequence[Weight]) -> bool:
    return bits in (4, 8) and all(fits(w, s, bits) for w, s in parts) and share_a_layout(parts)


def pair_up(w1: Expert, v: Expert) -> bool:
    """Whether an MoE's W1 and V share a shape and a scale layout (one activation quantization feeds both)."""
    return w1[0].shape == v[0].shape and w1[1].shape == v[1].shape


def fits_moe(bits: int, w1: Expert, v: Expert, w2: Expert) -> bool:
    return bits in (4, 8) and all(fits(w, s, bits) for w, s in (w1, v, w2)) and pair_up(w1, v)


def fits_attend(q: Tensor, k: Tensor) -> bool:
    """A query [B, H, G, Dh] and cache [B, S, H, Dh] (or its prefix): bf16 on the CPU, Dh a multiple of 8,
    each slot's heads contiguous."""
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == torch.bfloat16
        and q.dim() == k.dim() == 4
        and q.shape[3] % 8 == 0
        and k.stride()[1:] == (k.shape[2] * k.shape[3], k.shape[3], 1)
    )
