"""The native AVX2 int8 kernel equals dequantize-then-matmul, on every row-tile remainder and group count."""

from __future__ import annotations

import platform
import shutil

import pytest
import torch

from groklm import kernels
from groklm.quant import dequantize_weight, quantize_weight

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 kernel is x86 only")


def test_kernel_is_built_here() -> None:
    """CI machines are x86 with a C compiler: the fast path must not silently fall back there."""
    assert shutil.which("cc") or shutil.which("gcc")
    assert kernels.available()


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13])
@pytest.mark.parametrize("groups, in_features", [(1, 2048), (8, 10240), (8, 512), (96, 6144)])
def test_native_matches_dequantized_matmul(rows: int, groups: int, in_features: int) -> None:
    g = torch.Generator().manual_seed(rows * 7 + groups)
    w = torch.randn(72, in_features, generator=g)
    q, s = quantize_weight(w, groups, torch.bfloat16)
    assert kernels.supports(q, s)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    expected = x.double() @ dequantize_weight(q, s, torch.float64).T
    got = kernels.int8_matmul(x, q, s, torch.float32)
    torch.testing.assert_close(kernels.int8_matmul(x, q, s), got.bfloat16(), rtol=0, atol=0)  # bf16 = rounded fp32
    # int16 activations: a 2^-15 step per 2048-column chunk; errors far below bf16's 2^-8
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4 * expected.abs().max().item())


def test_no_overflow_at_extremes() -> None:
    """-128 weights (legal in the released int8) against activations all at the chunk maximum."""
    q = torch.full((4, 4096), -128, dtype=torch.int8)
    s = torch.ones(4, 2, dtype=torch.bfloat16)
    x = torch.full((1, 4096), 3.0)
    y = kernels.int8_matmul(x, q, s, torch.float32)
    torch.testing.assert_close(y, torch.full((1, 4), -128.0 * 3.0 * 4096), rtol=1e-6, atol=0)


def test_unsupported_shapes_are_declined() -> None:
    q, s = quantize_weight(torch.randn(8, 176), 8, torch.bfloat16)  # 22-column blocks
    assert not kernels.supports(q, s)
    q, s = quantize_weight(torch.randn(8, 256), 1, torch.float32)  # fp32 scales
    assert not kernels.supports(q, s)
