"""int8 weight-only matmul with grouped scales equals dequantize-then-matmul."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from groklm import kernels
from groklm.quant import dequantize_weight, int8_linear, quantize_weight, scaled_int8_matmul
from tests.conftest import not_under_lowered_capability


@pytest.fixture(params=["native", "torch"])
def kernel_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with the native kernel, then with torch's kernels only."""
    if request.param == "torch":
        monkeypatch.setattr(kernels, "supports", lambda *_: False)
    return str(request.param)


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("rows", [1, 5, 64])  # fused kernels (bf16, few rows) and the dequantizing path
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_grouped_int8_matmul_equals_dequantize_then_matmul(
    groups: int, rows: int, dtype: torch.dtype, kernel_path: str
) -> None:
    g = torch.Generator().manual_seed(groups * 100 + rows)
    w = torch.randn(96, 1024, generator=g)
    q, s = quantize_weight(w, groups, torch.bfloat16)
    assert q.dtype == torch.int8 and q.shape == (96, 1024) and s.shape == (96, groups)
    x = torch.randn(rows, 1024, generator=g).to(dtype)
    expected = x.double() @ dequantize_weight(q, s, torch.float64).T
    got = int8_linear(x, q, s.to(dtype))
    assert got.dtype == dtype and got.shape == (rows, 96)
    # bf16 output has 8 bits of mantissa; fp32 is exact to accumulation order
    tol = 2**-7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("groups", [1, 8])
@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=not_under_lowered_capability)])
def test_scaled_int8_matmul_equals_dequantize_then_matmul(groups: int, compiled: bool) -> None:
    """The GPU path (scales applied to the matmul's output), eager and through torch.compile's
    inductor, checked on CPU: shapes and numerics as the dequantizing reference."""
    g = torch.Generator().manual_seed(groups)
    q, s = quantize_weight(torch.randn(80, 512, generator=g), groups, torch.bfloat16)
    x = torch.randn(3, 512, generator=g).bfloat16()
    expected = x.double() @ dequantize_weight(q, s, torch.float64).T
    fn = torch.compile(scaled_int8_matmul) if compiled else scaled_int8_matmul
    got = fn(x, q, s)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 80)
    torch.testing.assert_close(got.double(), expected, rtol=2**-7, atol=2**-7 * expected.abs().max().item())


def test_grouped_scales_are_not_interchangeable() -> None:
    """Each block of input rows has its own scale: swapping two blocks' scales changes the result."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[:, :8] *= 50  # block 0 much larger than the rest
    q, s = quantize_weight(w, 8, torch.float32)
    x = torch.randn(2, 64, generator=g)
    right = int8_linear(x, q, s)
    wrong = int8_linear(x, q, s.flip(-1))
    assert not torch.allclose(right, wrong)
    torch.testing.assert_close(right, x @ dequantize_weight(q, s).T, rtol=1e-5, atol=1e-4)


def test_quantization_error_is_bounded() -> None:
    w = torch.randn(64, 128)
    q, s = quantize_weight(w, 4, torch.bfloat16)
    err = (dequantize_weight(q, s) - w).abs()
    # half a quantization step, plus the scale's bf16 rounding (2^-8 relative) over at most 127 steps
    blocks = w.reshape(64, 4, 32).abs().amax(-1)  # [out, G]
    bound = (blocks / 127 * 0.5 * (1 + 2**-7) + blocks * 2**-8).repeat_interleave(32, dim=1)
    assert torch.all(err <= bound)


def test_no_transform_assigns_a_class() -> None:
    """Transforms swap modules (`model.recast`) or add hooks: none changes an object's class under those
    holding it."""
    src = Path(__file__).resolve().parents[1] / "src" / "groklm"
    assert [f for f in src.rglob("*.py") if ".__class__ =" in f.read_text()] == []
