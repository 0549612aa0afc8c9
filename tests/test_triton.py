"""The Triton kernels, run by Triton's interpreter on the CPU (conftest.py sets TRITON_INTERPRET=1 where
there is no GPU): weight-only int8/int4 matmuls against dequantize-then-matmul in float64, the fused MoE
against the model's own MoE, attention against the model's own attention, over tails, 1 to 65 rows,
every scale layout, int4 group sizes, skewed and empty expert groups, prefill and decode. The golden
parity with the kernels forced is in test_golden.py (its "bf16-triton" mode)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor

from groklm import kernels
from groklm.config import get_preset
from groklm.model import MASK_VALUE, Attention, MoE
from groklm.quant import (
    QuantizedAttention,
    QuantizedMoE,
    block_major,
    dequantize_weight,
    dequantize_weight_int4,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    quantize_weight_int4,
)
from groklm.quant import linear as quant

gpu = pytest.importorskip("groklm.kernels.triton")


@pytest.fixture
def forced() -> Iterator[None]:
    kernels.select("triton")
    yield
    kernels.select("auto")


def _close_to(y: Tensor, x: Tensor, w: Tensor) -> None:
    """y (bf16) is x @ w.T computed in float64 then rounded once: within half a bf16 step of the exact
    value, plus fp32 summation error (2^-20 of the sum of |products|)."""
    exact = x.double() @ w.double().T
    bound = exact.abs() * 2**-8 + (x.double().abs() @ w.double().abs().T) * 2**-20
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max().item():.3g}, at most {bound.max().item():.3g} allowed"


def _as_the_kernel_dequantizes(w: Tensor, group: int) -> Tensor:
    """The exact integer x scale where a scale group is a multiple of 16 columns (whole K tiles); else
    rounded to bf16, as the reference dequantizes."""
    return w.double() if group % 16 == 0 else w.bfloat16().double()


# (outputs, inputs, scale groups, block-major): per-row scales, the released row blocks held row-major
# and block-major, groups of 22 columns (the golden case's down projections: not a multiple of 16), tails
# in both dimensions.
INT8_LAYOUTS = [(96, 256, 1, False), (70, 192, 8, False), (70, 192, 8, True), (33, 176, 8, True), (40, 1024, 1, False)]


@pytest.mark.parametrize("rows", [1, 7, 17, 65])
@pytest.mark.parametrize("layout", INT8_LAYOUTS, ids=lambda x: "x".join(map(str, x)))
def test_int8_matmul_is_dequantize_then_matmul(rows: int, layout: tuple[int, int, int, bool]) -> None:
    n, k, groups, blocked = layout
    torch.manual_seed(rows * n)
    q, s = quantize_weight(torch.randn(n, k), groups, torch.bfloat16)
    w = _as_the_kernel_dequantizes(dequantize_weight(q, s), k // groups)
    x = torch.randn(rows, k).bfloat16()
    if blocked:
        q = block_major(q, groups)
    for split in (1, 2, 3):
        y = gpu.matmul(x, q, s, 8, split=split)
        assert y.shape == (rows, n) and y.dtype == torch.bfloat16
        _close_to(y, x, w)


@pytest.mark.parametrize("rows", [1, 16, 33])
@pytest.mark.parametrize("group", [16, 32, 64, 128])
def test_int4_matmul_is_dequantize_then_matmul(rows: int, group: int) -> None:
    torch.manual_seed(group + rows)
    n, k = 72, 256
    packed, s = quantize_weight_int4(torch.randn(n, k), group, torch.bfloat16)
    w = _as_the_kernel_dequantizes(dequantize_weight_int4(packed, s), group)
    x = torch.randn(rows, k).bfloat16()
    for split in (1, 2):
        _close_to(gpu.matmul(x, packed, s, 4, split=split), x, w)


def test_split_k_only_for_few_rows_and_wide_enough_weights() -> None:
    cpu = torch.device("cpu")
    assert gpu.split_k(64, 8192, 65, cpu) == 1  # prefill: enough tiles of rows
    assert gpu.split_k(64, 8192, 1, cpu) > 1  # one tile of columns: split the long K
    assert gpu.split_k(64, 256, 1, cpu) == 1  # too short to split
    assert gpu.split_k(64, 8192, 1, cpu) == gpu.split_k(64, 8192, 64, cpu)  # a row's sums do not depend on the batch


def _moe(bits: int, up_groups: int, erf: bool, seed: int) -> QuantizedMoE:
    torch.manual_seed(seed)
    config = get_preset("mini").replace(gelu="erf" if erf else "tanh")
    moe = MoE(config, torch.bfloat16)
    if bits == 8:
        moe = quantize_int8(
            moe, lambda name: None if name == "router" else 8 if name == "w2" else up_groups, torch.bfloat16
        )
    else:
        moe = quantize_int4(moe, group_size=32)
    assert type(moe) is QuantizedMoE
    return moe


@pytest.mark.parametrize(("bits", "up_groups", "erf", "tokens"),
                         [(8, 1, False, 1), (8, 4, False, 5), (8, 1, True, 40), (4, 1, False, 3), (4, 1, True, 40)])  # fmt: skip
def test_fused_moe_matches_the_models_moe(
    bits: int, up_groups: int, erf: bool, tokens: int, forced: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two launches for all experts (gelu(x W1) * (x V) in the first's epilogue, the gates in the second's)
    equal the model's MoE over the same quantized experts, expert by expert, each product taken in fp32
    and rounded once as the kernel's are: only fp32 summation order differs. With 40 tokens one expert takes
    most of them and some take none."""
    moe = _moe(bits, up_groups, erf, tokens)
    xs = torch.randn(tokens, moe.router.in_features).bfloat16()
    if tokens == 40:
        favoured = torch.randn(moe.router.in_features)
        with torch.no_grad():
            moe.router.weight[5] = 8 * favoured / favoured.square().sum()
        xs[:30] = (favoured + 0.1 * torch.randn(30, favoured.numel())).bfloat16()
    before = dict(gpu.launches)
    fused = moe(xs)
    assert gpu.launches["moe"] == before["moe"] + 1 and gpu.launches["matmul"] == before["matmul"]
    _, experts = MoE.route(moe, xs)
    if tokens == 40:
        assert experts.unique().numel() < moe.num_experts and (experts == 5).sum() >= 30
    kernels.select("off")

    def exact(dequantize: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        def linear(x: Tensor, weight: Tensor, scales: Tensor) -> Tensor:  # in fp32, rounded once
            w = dequantize(weight, scales)
            return (x.float() @ _as_the_kernel_dequantizes(w, w.shape[1] // scales.shape[1]).float().T).to(x.dtype)

        return linear

    monkeypatch.setattr(quant, "_int8_linear", exact(dequantize_weight))
    monkeypatch.setattr(quant, "_int4_linear", exact(dequantize_weight_int4))
    with torch.no_grad():
        reference = MoE.forward(moe, xs)
    assert fused.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference, rtol=2**-7, atol=2**-7 * reference.abs().max().item())
    assert (fused != reference).float().mean() < 0.05  # almost everything bit-identical


def test_no_tokens_no_launch(forced: None) -> None:
    moe = _moe(8, 1, False, 0)
    assert moe(torch.empty(0, moe.router.in_features, dtype=torch.bfloat16)).shape == (0, moe.router.in_features)


def _attention(g: int, dh: int, rounding: bool) -> QuantizedAttention:
    config = get_preset("mini").replace(num_kv_heads=2, num_q_heads=2 * g, key_size=dh, jax_rounding=rounding)
    attn = Attention(config, torch.bfloat16)
    attn = quantize_int8(attn, lambda name: 1, torch.bfloat16)
    assert type(attn) is QuantizedAttention
    return attn


@pytest.mark.parametrize(("t", "s", "g", "dh", "temp", "rounding"),
                         [(1, 1, 6, 128, False, True), (1, 77, 6, 8, False, True), (1, 130, 1, 64, True, False),
                          (5, 5, 2, 32, False, True), (70, 70, 3, 16, True, False), (9, 40, 6, 128, False, True)])  # fmt: skip
def test_attention_matches_the_models_attention(
    t: int, s: int, g: int, dh: int, temp: bool, rounding: bool, forced: None
) -> None:
    """Prefill (t = s, causal, with padded keys) and decode (t = 1 over a strided cache with a masked tail), GQA
    groups of 1 to 6, head sizes from 8 (padded to a tile of 16) to 128, Grok-2's temperature, Grok-1's
    rounding of the logits."""
    torch.manual_seed(t * s + g)
    attn = _attention(g, dh, rounding)
    b, kh = 2, 2
    q = (torch.randn(b, t, kh, g, dh) * 2).bfloat16()
    cache_k = (torch.randn(b, s + 7, kh, dh) * 2).bfloat16()  # a cache longer than the prefix read
    cache_v = torch.randn(b, s + 7, kh, dh).bfloat16()
    k, v = cache_k[:, :s], cache_v[:, :s]
    key_ok = torch.rand(b, s) > 0.2
    key_ok[:, -1] = True
    if t == s:
        key_ok[1, :] = False  # a row with every key masked: uniform, as the reference's finite mask value gives
    positions = torch.arange(s - t, s).expand(b, t)
    mask = (key_ok[:, None, :] & (torch.arange(s)[None, None, :] <= positions[:, :, None]))[:, None, None]
    if t == 1:  # decode over the whole (static) cache: its unused tail masked, and not read
        k, v = cache_k, cache_v
        mask = torch.cat([mask, torch.zeros(b, 1, 1, 1, 7, dtype=torch.bool)], dim=-1)
    scale = None
    if temp:
        p = positions.float() + 2000
        scale = (torch.log2(p) / math.log2(1024.0))[:, None, None, :, None]
    before = gpu.launches["attention"]
    got = attn.attend(q, k, v, mask, scale)
    assert gpu.launches["attention"] == before + 1
    reference = Attention.attend(attn, q, k, v, mask, scale)
    assert got.shape == reference.shape == (b, t, kh * g * dh) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got, reference, rtol=2**-7, atol=2**-7 * reference.abs().max().item())
    assert (got != reference).float().mean() < 0.1
    assert MASK_VALUE < -1e29  # (the masked logit the kernel is given: finite, so an all-masked row is uniform)


def test_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2, dtype=torch.bfloat16)
    assert not kernels.use_triton(x)  # auto: CUDA tensors only
    kernels.select("triton")
    try:
        assert kernels.use_triton(x) and not kernels.use_triton(x.float())  # fp32 stays the exact torch path
        assert not kernels.use_triton(x.clone().requires_grad_())  # training takes autograd's path
    finally:
        kernels.select("auto")
    with pytest.raises(ValueError, match="GROKLM_KERNELS must be one of auto, triton, off, not 'cuda'"):
        kernels.select("cuda")


AHEAD_OF_TIME = """
import os, sys
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from groklm.kernels import triton as gpu

assert not gpu._INTERPRETED
target = GPUTarget("cuda", int(sys.argv[1]), 32)
wmm = gpu._wmm_kernel.arg_names
base = {"x_ptr": "*bf16", "w_ptr": "*i8", "s_ptr": "*bf16", "w3_ptr": "*i8", "s3_ptr": "*bf16", "y_ptr": "*bf16",
        "rows_ptr": "*i32", "expert_ptr": "*i32", "gate_ptr": "*fp32"} | {n: "i32" for n in wmm[9:23]}
built = 0
for bits, gather, fuse, gated, one_group, y in [(8, 0, 0, 0, 1, "*bf16"), (8, 0, 0, 0, 1, "*fp32"), (8, 0, 0, 0, 0, "*bf16"),
                                                (4, 0, 0, 0, 1, "*bf16"), (8, 1, 1, 0, 1, "*bf16"), (8, 1, 0, 1, 1, "*fp32"),
                                                (4, 1, 1, 0, 1, "*bf16"), (4, 1, 0, 1, 1, "*fp32")]:
    for block_m, block_n in [(16, 64), (64, 128)] if built == 0 else [(16, 64)]:  # decode tiles; prefill's once
        const = dict(BITS=bits, PACK=32 if bits == 4 else 1, GATHER=bool(gather), FUSE=bool(fuse), ERF=bool(fuse),
                     GATED=bool(gated), ONE_GROUP=bool(one_group), F32=False, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_K=128 if one_group else 32)
        sig = base | {"y_ptr": y} | ({"w_ptr": "*u8", "w3_ptr": "*u8"} if bits == 4 else {}) | {c: "constexpr" for c in const}
        compile(ASTSource(fn=gpu._wmm_kernel, signature=sig, constexprs=const), target=target)
        built += 1
att = gpu._attention_kernel.arg_names
sig = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "mask_ptr": "*i8", "temp_ptr": "*fp32", "limit_ptr": "*i32",
       "o_ptr": "*bf16"} | {n: "i32" for n in att[7:]} | {n: "fp32" for n in ("multiplier", "cap", "masked")}
for temp, rounding, dh, block_m in [(1, 0, 128, 16), (0, 1, 16, 64)]:
    const = dict(HAS_TEMP=bool(temp), ROUND=bool(rounding), F32=False, DH_P=dh, BLOCK_M=block_m, BLOCK_S=64)
    compile(ASTSource(fn=gpu._attention_kernel, signature=sig | {c: "constexpr" for c in const}, constexprs=const),
            target=target)
    built += 1
print(built)
"""


def test_every_kernel_variant_compiles_for_an_h100_and_h200() -> None:
    """The interpreter checks what the kernels compute, not that Triton's compiler takes them: compiled
    ahead of time here for sm_90 (Hopper: H100, H200) with the ptxas that comes with triton, no GPU needed."""
    env = os.environ | {"TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    r = subprocess.run(
        [sys.executable, "-c", AHEAD_OF_TIME, "90"], capture_output=True, text=True, env=env, timeout=600
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[-1] == "11"
