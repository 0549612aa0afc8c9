"""The native int8/int4 kernels (AVX2, and AVX-512 VNNI where the CPU has it) equal dequantize-then-matmul,
on every row-tile remainder and group count, and the two builds agree bit for bit."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import Tensor

from groklm import kernels
from groklm.config import get_preset
from groklm.model import Attention, MoE
from groklm.quant import (
    QuantizedAttention,
    QuantizedMoE,
    block_major,
    dequantize_weight,
    quantize_int4,
    quantize_int8,
    quantize_weight,
    quantize_weight_int4,
    scales_to_panels,
    to_panels,
)

T = TypeVar("T")

pytestmark = pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 kernel is x86 only")


@pytest.fixture(params=["native", "avx2"])
def build(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Each test runs on the build this CPU gets and on the AVX2 build (the same where there is no VNNI)."""
    if request.param == "avx2":
        monkeypatch.setenv("GROKLM_ISA", "avx2")
    kernels.rebuild()
    yield request.param
    monkeypatch.undo()
    kernels.rebuild()


def _on_build(name: str, fn: Callable[[], T]) -> T:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GROKLM_ISA", name)
        kernels.rebuild()
        try:
            return fn()
        finally:
            mp.undo()
            kernels.rebuild()


def test_kernel_is_built_here() -> None:
    """CI machines are x86 with a C compiler: the fast path must not silently fall back there."""
    assert shutil.which("cc") or shutil.which("gcc")
    assert kernels.available()
    vnni = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= set(
        next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
    )
    forced = os.environ.get("GROKLM_ISA", "").lower() == "avx2"
    assert kernels.isa() == ("avx512vnni" if vnni and not forced else "avx2")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 6, 9])
def test_vnni_and_avx2_builds_agree_bit_for_bit(bits: int, rows: int) -> None:
    """Integer dot products are exact and both builds fold them alike, so their outputs are equal (int4:
    weights in rows and in panels, which give the rows' bits)."""
    if kernels.isa() != "avx512vnni":
        pytest.skip("this CPU has no AVX-512 VNNI")
    g = torch.Generator().manual_seed(rows + bits)
    w = torch.randn(1030, 2048, generator=g)
    q, s = quantize_weight(w, 8, torch.bfloat16) if bits == 8 else quantize_weight_int4(w, 64, torch.bfloat16)
    layouts = [(q, s)] if bits == 8 else [(q, s), (to_panels(q[:1024]), scales_to_panels(s[:1024]))]
    x = torch.randn(rows, 2048, generator=g).bfloat16()
    for weight in layouts:
        outs = [
            _on_build(name, lambda: (kernels.isa(), kernels.linear(bits, x, [weight], torch.float32)[0]))  # noqa: B023
            for name in ("", "avx2")
        ]
        assert [isa for isa, _ in outs] == ["avx512vnni", "avx2"]  # each call ran on the build it names
        assert torch.equal(outs[0][1], outs[1][1])
        assert torch.equal(outs[0][1][:, :1024], kernels.linear(bits, x, [(q, s)], torch.float32)[0][:, :1024])


_SHAPES = [(1, 2048, 72), (8, 10240, 77), (8, 512, 1030), (96, 6144, 9), (32, 2048, 13), (4, 32768, 21)]


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 21])
@pytest.mark.parametrize(
    "groups, in_features, out_features, blocked",
    [(*shape, blocked) for shape in _SHAPES for blocked in ((False, True) if shape[0] > 1 else (False,))],
)
def test_native_matches_dequantized_matmul(
    build: str, rows: int, groups: int, in_features: int, out_features: int, blocked: bool
) -> None:
    """Out sizes cover the weight-row streams (4 at a time, in blocks of 256 per thread) and every remainder;
    block-major weights cover activation chunks spanning several blocks (512, 6144), one (10240) and
    part of one (32768: 8192-column blocks, 2048-column chunks)."""
    g = torch.Generator().manual_seed(rows * 7 + groups)
    w = torch.randn(out_features, in_features, generator=g)
    q_rows, s = quantize_weight(w, groups, torch.bfloat16)
    q = block_major(q_rows, groups) if blocked else q_rows
    if blocked:
        assert q.shape == (groups, out_features, in_features // groups)
    assert kernels.supports(q, s)
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    expected = x.double() @ dequantize_weight(q_rows, s, torch.float64).T
    got = kernels.int8_matmul(x, q, s, torch.float32)
    torch.testing.assert_close(kernels.int8_matmul(x, q, s), got.bfloat16(), rtol=0, atol=0)  # bf16 = rounded fp32
    # int16 activations: a 2^-15 step per 2048-column chunk; errors far below bf16's 2^-8
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=2e-4 * expected.abs().max().item())


def test_no_overflow_at_extremes(build: str) -> None:
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


@pytest.mark.parametrize("bits, up_groups", [(8, 1), (8, 4), (4, None)])
@pytest.mark.parametrize("tokens", [1, 2, 7, 40])
def test_fused_moe_matches_expert_by_expert(
    build: str, bits: int, up_groups: int | None, tokens: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-call MoE kernel, routing included, equals the torch path over the same quantized experts:
    same choices, same roundings; only tanh's last bits and the fp32 summation order may differ. int8
    down projections are block-major (8 blocks, as released); the up projections too with 4 blocks."""
    torch.manual_seed(tokens)
    config = get_preset("mini")
    moe = MoE(config, torch.bfloat16)
    if bits == 8:
        moe = quantize_int8(
            moe, lambda name: None if name == "router" else 8 if name == "w2" else up_groups, torch.bfloat16
        )
        assert moe.w2.weight.dim() == 4 and moe.w1.weight.dim() == (4 if up_groups == 4 else 3)
    else:
        moe = quantize_int4(moe, group_size=32)
    assert type(moe) is QuantizedMoE
    xs = torch.randn(tokens, config.emb_size).bfloat16()
    if tokens == 40:  # skewed: expert 5 takes most tokens, some experts none
        favoured = torch.randn(config.emb_size)
        with torch.no_grad():
            moe.router.weight[5] = 8 * favoured / favoured.square().sum()
        xs[:30] = (favoured + 0.1 * torch.randn(30, config.emb_size)).bfloat16()
    _, experts = moe.route(xs)
    if tokens == 40:
        assert (experts == 5).any(dim=1)[:30].all() and experts.unique().numel() < config.num_experts
    with monkeypatch.context() as patch:
        patch.setattr(MoE, "experts", None)  # the native path must not need it
        fused = moe(xs)
    reference = MoE.forward(moe, xs)
    assert fused.dtype == reference.dtype == torch.bfloat16
    torch.testing.assert_close(fused, reference, rtol=2**-7, atol=2**-7 * reference.abs().max().item())
    assert (fused != reference).float().mean() < 0.05  # almost everything bit-identical


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 6])
@pytest.mark.parametrize("groups", [1, 8])
def test_linear_of_several_weights_equals_one_call_each(build: str, bits: int, rows: int, groups: int) -> None:
    """One call over weights of 72, 13, 1030 and 1 rows (threads split them end to end, across the
    weights' borders) equals a call per weight, bit for bit."""
    g = torch.Generator().manual_seed(rows + groups + bits)
    if bits == 8:
        parts = [quantize_weight(torch.randn(n, 2048, generator=g), groups, torch.bfloat16) for n in (72, 13, 1030, 1)]
    else:
        parts = [
            quantize_weight_int4(torch.randn(n, 2048, generator=g), 2048 // groups, torch.bfloat16)
            for n in (72, 13, 1030, 1)
        ]
    x = torch.randn(rows, 2048, generator=g).bfloat16()
    together = kernels.linear(bits, x, parts, torch.float32)
    for (w, s), y in zip(parts, together, strict=True):
        assert y.shape == (rows, s.shape[0])
        assert torch.equal(y, kernels.linear(bits, x, [(w, s)], torch.float32)[0])


@pytest.mark.parametrize("bits, groups, blocked", [(8, 1, False), (8, 8, False), (8, 8, True), (4, 32, False)])
def test_each_row_gets_the_bits_it_gets_alone(build: str, bits: int, groups: int, blocked: bool) -> None:
    """Batch invariance: a row's result does not depend on how many rows share the call (1 to 40,
    across every tile and path boundary), nor does an MoE token's on the tokens routed with it. A
    server prefills prompts in chunks and decodes them in batches that change every step; each still
    gets exactly what it gets alone."""
    g = torch.Generator().manual_seed(bits + groups)
    w, sc = (quantize_weight if bits == 8 else quantize_weight_int4)(torch.randn(300, 1024, generator=g),
                                                                      groups if bits == 8 else 1024 // groups,
                                                                      torch.bfloat16)  # fmt: skip
    if blocked:
        w = block_major(w, groups)
    x = torch.randn(40, 1024, generator=g).bfloat16()
    alone = torch.cat([kernels.linear(bits, x[i : i + 1], [(w, sc)], torch.float32)[0] for i in range(40)])
    for rows in (2, 5, 16, 17, 40):
        assert torch.equal(kernels.linear(bits, x[:rows], [(w, sc)], torch.float32)[0], alone[:rows]), rows
    config = get_preset("mini")
    moe = MoE(config, torch.bfloat16)
    moe = quantize_int8(moe, lambda name: None if name == "router" else 8 if name == "w2" else 1, torch.bfloat16)
    xs = torch.randn(48, config.emb_size, generator=g).bfloat16()  # up to 48 tokens an expert
    together = moe(xs)
    assert torch.equal(together, torch.cat([moe(xs[i : i + 1]) for i in range(48)]))
    assert torch.equal(together[:20], moe(xs[:20]))


@pytest.mark.parametrize("slots", [1, 7, 8, 13, 30])
def test_decode_attention_does_not_depend_on_slots_beyond_the_row(build: str, slots: int) -> None:
    """A row attends over the cache up to the longest row of its batch; the slots past its own end are
    masked, and its result must be what it is when it attends over its own slots only."""
    torch.manual_seed(slots)
    q = torch.randn(1, 4, 2, 64).bfloat16()
    k, v = torch.randn(1, slots + 19, 4, 64).bfloat16(), torch.randn(1, slots + 19, 4, 64).bfloat16()
    mask = torch.zeros(1, slots + 19, dtype=torch.bool)
    mask[0, :slots] = True
    own = kernels.attend(q, k[:, :slots], v[:, :slots], mask[:, :slots], 0.125, 30.0, -1e30)
    for more in (1, 8, 19):
        assert torch.equal(kernels.attend(q, k[:, : slots + more], v[:, : slots + more], mask[:, : slots + more],
                                          0.125, 30.0, -1e30), own), more  # fmt: skip


def test_linear_refuses_weights_that_do_not_share_a_layout() -> None:
    a = quantize_weight(torch.randn(8, 256), 1, torch.bfloat16)
    b = quantize_weight(torch.randn(8, 256), 2, torch.bfloat16)
    c = quantize_weight(torch.randn(8, 512), 1, torch.bfloat16)
    x = torch.randn(1, 256).bfloat16()
    for parts in ([a, b], [a, c]):
        with pytest.raises(ValueError, match="does not take these weights"):
            kernels.linear(8, x, parts)
    with pytest.raises(ValueError, match="expect"):
        kernels.linear(8, torch.randn(1, 128).bfloat16(), [a])


def test_quantized_attention_projects_q_k_v_in_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    config = get_preset("mini")
    attn = Attention(config, torch.bfloat16)
    attn = quantize_int8(attn, lambda name: 1, torch.bfloat16)
    assert type(attn) is QuantizedAttention
    x = torch.randn(2, 3, config.emb_size).bfloat16()
    real, calls = kernels.linear, []
    monkeypatch.setattr(
        kernels,
        "linear",
        lambda bits, x, parts, dtype=torch.bfloat16: calls.append(len(parts)) or real(bits, x, parts, dtype),
    )
    fused = attn.qkv(x)
    assert calls == [3]
    for got, want in zip(fused, Attention.qkv(attn, x), strict=True):  # one call per projection
        assert torch.equal(got, want)
    assert calls == [3, 1, 1, 1]


def _decode_attention_case(
    batch: int, slots: int, dh: int, seed: int
) -> tuple[QuantizedAttention, Tensor, Tensor, Tensor, Tensor]:
    """A quantized attention (4 kv heads of 2 query heads), one new query per row, a cache prefix of
    `slots` out of slots + 5 (so rows lie further apart than the prefix), and a mask with holes;
    the last row of a batch > 1 has every slot masked (the softmax is then uniform)."""
    torch.manual_seed(seed)
    config = replace(get_preset("mini"), num_q_heads=8, num_kv_heads=4, key_size=dh)
    attn = Attention(config, torch.bfloat16)
    attn = quantize_int8(attn, lambda name: 1, torch.bfloat16)
    assert type(attn) is QuantizedAttention
    q = (torch.randn(batch, 1, 4, 2, dh) * 3).bfloat16()
    k = (torch.randn(batch, slots + 5, 4, dh) * 3).bfloat16()[:, :slots]
    v = torch.randn(batch, slots + 5, 4, dh).bfloat16()[:, :slots]
    mask = torch.rand(batch, slots) < 0.8
    mask[:, -1] = True
    if batch > 1:
        mask[-1] = False
    return attn, q, k, v, mask[:, None, None, None, :]


@pytest.mark.parametrize(("batch", "slots", "dh"), [(1, 1, 32), (1, 77, 128), (3, 64, 32), (2, 1000, 128)])
def test_native_decode_attention_matches_the_torch_path(build: str, batch: int, slots: int, dh: int) -> None:
    """One call per decode step's attention (soft-capped logits, masked softmax, weighted values) gives
    the torch path's result: the same roundings; only fp32 summation order and tanh's and exp's last bits
    may differ."""
    attn, q, k, v, mask = _decode_attention_case(batch, slots, dh, seed=slots)
    native = attn.attend(q, k, v, mask)
    reference = Attention.attend(attn, q, k, v, mask)
    assert native.shape == reference.shape == (batch, 1, 8 * dh) and native.dtype == torch.bfloat16
    torch.testing.assert_close(native, reference, rtol=2**-7, atol=2**-7 * reference.abs().max().item())
    assert (native != reference).float().mean() < 0.05  # almost everything bit-identical


def test_native_attention_takes_prefill_row_by_row_and_refuses_bad_masks() -> None:
    """Several new tokens a row (a prompt): each query position is a row of its own for the kernel, so
    its output is exactly what one query alone, under its own mask, gets; with and without the
    rounding of the scores to bf16 (Grok-1's reference rounds, Grok-2's does not), as the torch path."""
    attn, q, k, v, mask = _decode_attention_case(2, 16, 32, seed=0)
    later = mask.clone()
    later[:, ..., 3] = ~later[:, ..., 3]  # the second query sees other slots
    q2 = torch.cat([q, (q.float() * -0.5).bfloat16()], dim=1)
    both = attn.attend(q2, k, v, torch.cat([mask, later], dim=3))
    assert torch.equal(both[:, :1], attn.attend(q, k, v, mask))
    assert torch.equal(both[:, 1:], attn.attend(q2[:, 1:], k, v, later))
    assert not torch.equal(both[:, :1], both[:, 1:])
    # without a cache, k and v are the prompt's own (v a view of the projection: other strides than k's)
    wide = torch.randn(2, 16, 3, 4, 32).bfloat16()
    kp, vp = wide[:, :, 0], wide[:, :, 1]
    causal = torch.ones(16, 16, dtype=torch.bool).tril()[None, None, None].expand(2, 1, 1, 16, 16)
    qp = torch.randn(2, 16, 4, 2, 32).bfloat16()
    _assert_bf16_near(attn.attend(qp, kp, vp, causal), Attention.attend(attn, qp, kp, vp, causal))  # as decode's
    rounded = attn.attend(qp, kp, vp, causal)
    attn.config = replace(attn.config, jax_rounding=False)
    unrounded = attn.attend(qp, kp, vp, causal)
    _assert_bf16_near(unrounded, Attention.attend(attn, qp, kp, vp, causal))
    assert not torch.equal(rounded, unrounded)
    with pytest.raises(ValueError, match="mask"):
        kernels.attend(q[:, 0], k, v, mask[:, 0, 0, 0, :8], 1.0, 30.0, -1e30)
    with pytest.raises(ValueError, match="mask"):
        kernels.attend(q[:, 0], k, v, mask[:, 0, 0, 0].int(), 1.0, 30.0, -1e30)
    with pytest.raises(ValueError):
        kernels.attend(q[:, 0], k[:, :, :2], v[:, :, :2], mask[:, 0, 0, 0], 1.0, 30.0, -1e30)


@pytest.mark.parametrize("shape", [(16, 16), (37, 100), (100, 37), (2048, 320), (5, 3), (1, 64)])
def test_transpose_into_a_slice_of_a_wider_matrix(shape: tuple[int, int]) -> None:
    """The loader's [in, out] -> [out, in]: tiles, ragged edges, and a destination that is a column
    slice of a wider matrix, whose other columns stay as they were."""
    rows, cols = shape
    src = torch.randint(-128, 128, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(rows * cols))
    wide = torch.full((cols, rows + 11), 7, dtype=torch.int8)
    dst = wide[:, 5 : 5 + rows]
    assert kernels.transpose_into(dst, src)
    assert torch.equal(dst, src.T)
    assert wide[:, :5].eq(7).all() and wide[:, 5 + rows :].eq(7).all()


def test_transpose_into_declines_what_it_does_not_take() -> None:
    src = torch.zeros(8, 4, dtype=torch.int8)
    assert not kernels.transpose_into(torch.empty(4, 8, dtype=torch.bfloat16), src.bfloat16())  # 2-byte elements
    assert not kernels.transpose_into(torch.empty(8, 4, dtype=torch.int8), src)  # not [cols, rows]
    assert not kernels.transpose_into(torch.empty(8, 4, dtype=torch.int8).T, src)  # columns not contiguous
    assert not kernels.transpose_into(torch.empty(4, 8, dtype=torch.int8), src.T.contiguous().T)  # src strided


def test_weights_replaced_or_moved_are_checked_again() -> None:
    """Each call reads the weights where they are now: a new tensor object, or the same object moved
    to other storage (set_), is checked and read anew, never through a stale address."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 512, generator=g).bfloat16()
    q1, s1 = quantize_weight(torch.randn(64, 512, generator=g), 1, torch.bfloat16)
    q2, s2 = quantize_weight(torch.randn(64, 512, generator=g), 1, torch.bfloat16)

    def reference(q: Tensor, s: Tensor) -> Tensor:
        return x.float() @ dequantize_weight(q, s).T

    torch.testing.assert_close(kernels.int8_matmul(x, q1, s1, torch.float32), reference(q1, s1), rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(kernels.int8_matmul(x, q2, s2, torch.float32), reference(q2, s2), rtol=2e-3, atol=2e-3)
    w, s = q1.clone(), s1.clone()
    kernels.int8_matmul(x, w, s)
    w.set_(q2.clone())
    s.set_(s2.clone())
    torch.testing.assert_close(kernels.int8_matmul(x, w, s, torch.float32), reference(q2, s2), rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="does not take"):
        w.set_(torch.zeros(64, 100, dtype=torch.int8))  # now a shape the kernel refuses
        kernels.int8_matmul(x, w, s)


def test_a_router_that_does_not_fit_is_refused() -> None:
    config = get_preset("mini")
    moe = MoE(config, torch.bfloat16)
    moe = quantize_int8(moe, lambda name: None if name == "router" else 1, torch.bfloat16)
    xs = torch.randn(2, config.emb_size).bfloat16()
    parts = [(m.weight, m.scales) for m in (moe.w1, moe.v, moe.w2)]
    router = moe.router.weight
    for bad, topk in ((router[:-1], 2), (router.bfloat16(), 2), (router.T.contiguous().T, 2), (router, 0), (router, 9)):
        with pytest.raises(ValueError, match=r"router|top-"):
            kernels.moe(xs, bad, topk, 8, *parts)


_PYTHON_OPS = """
import torch
from groklm import kernels
from groklm.config import get_preset
from groklm.model import Attention, MoE
from groklm.quant import dequantize_weight, quantize_int8, quantize_weight
assert kernels.available() and not kernels.ops.NATIVE_OPS
x = torch.randn(3, 512).bfloat16()
q, s = quantize_weight(torch.randn(64, 512), 8, torch.bfloat16)
torch.testing.assert_close(kernels.int8_matmul(x, q, s, torch.float32), x.float() @ dequantize_weight(q, s).T,
                           rtol=2e-3, atol=2e-3)
moe = MoE(get_preset("mini"), torch.bfloat16)
moe = quantize_int8(moe, lambda name: None if name == "router" else 1, torch.bfloat16)
xs = torch.randn(4, 256).bfloat16()
experts, MoE.experts = MoE.experts, None  # the native path must not need it
fused = moe(xs)
MoE.experts = experts
torch.testing.assert_close(fused, MoE.forward(moe, xs), rtol=0.02, atol=0.02)
attn = Attention(get_preset("mini"), torch.bfloat16)
attn = quantize_int8(attn, lambda name: 1, torch.bfloat16)
q, k, v = torch.randn(2, 1, 2, 4, 32).bfloat16(), torch.randn(2, 9, 2, 32).bfloat16(), torch.randn(2, 9, 2, 32).bfloat16()
mask = torch.ones(2, 1, 1, 1, 9, dtype=torch.bool)
torch.testing.assert_close(attn.attend(q, k, v, mask), Attention.attend(attn, q, k, v, mask), rtol=0.02, atol=0.02)
print("python ops ok")
"""


def test_python_implementations_of_the_ops_where_cpp_does_not_build() -> None:
    """Without the C++ ops (no ninja or C++ compiler; forced here), the ops run their Python
    implementations, with the same results."""
    env = {**os.environ, "GROKLM_CPP_OPS": "0"}
    out = subprocess.run([sys.executable, "-c", _PYTHON_OPS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "python ops ok" in out.stdout


def test_cpp_ops_are_built_here() -> None:
    """CI machines have ninja and a C++ compiler: the ops must not silently fall back to Python there."""
    assert kernels.available() and kernels.ops.NATIVE_OPS


# ---------------------------------------------------------------------------------------------
# Each SIMD build against the scalar twins (csrc/reference.c, `reference=True`): plain C that states
# what each kernel computes. The `build` fixture runs each case on the build this CPU gets and on the
# AVX2 one; a new SIMD path (another ISA, another tile) is held to the same twin by these tests.


def _int8_bound(x: Tensor, q_rows: Tensor, s: Tensor, groups: int) -> Tensor:
    """Where the int8 kernels and their twin may differ: both sum each segment (one scale, one activation
    step) exactly in integers, from the same quantized activations; the kernels fold a segment into 8
    fp32 lanes (block-major: a sum a block) and add them up at the end, the twin folds it whole. That is
    at most 2S + 8 roundings (S segments a row), each within 2^-24 of the sum of the products' magnitudes,
    here bounded by (|x| + max|x| / 32767) @ |dequant(W)|.T (an activation is within half a step of x)."""
    k = x.shape[1]
    segments = k // min(k // groups, kernels.native.chunk(8, k, groups))
    magnitude = (x.double().abs() + x.double().abs().max() / 32767) @ dequantize_weight(
        q_rows, s, torch.float64
    ).abs().T
    return (2 * segments + 8) * 2.0**-24 * magnitude


@pytest.mark.parametrize("rows", [1, 3, 5, 8])
@pytest.mark.parametrize(
    "bits, groups, blocked",
    [(8, 1, False), (8, 8, False), (8, 8, True), (8, 5, True), (4, 32, False), (4, 32, True), (4, 4, True)],
)
def test_linear_equals_its_scalar_twin(build: str, bits: int, groups: int, blocked: bool, rows: int) -> None:
    """int4 (rows, and panels with their scales in panel order): bit for bit, in fp32 and bf16, since the
    kernels fold each segment with one fused multiply-add as the twin does. int8 (rows, block-major):
    within `_int8_bound`, in fp32 (bf16 is that rounded, tested above)."""
    g = torch.Generator().manual_seed(rows * 10 + groups + bits)
    k = 2560 if groups == 5 else 2048
    w = torch.randn(1040, k, generator=g)
    x = (torch.randn(rows, k, generator=g) * torch.rand(rows, 1, generator=g) * 4).bfloat16()
    if bits == 8:
        q_rows, s = quantize_weight(w, groups, torch.bfloat16)
        weight = (block_major(q_rows, groups) if blocked else q_rows, s)
    else:
        q_rows, s = quantize_weight_int4(w, k // groups, torch.bfloat16)
        weight = (to_panels(q_rows), scales_to_panels(s)) if blocked else (q_rows, s)
    got = kernels.linear(bits, x, [weight], torch.float32)[0]
    twin = kernels.linear(bits, x, [weight], torch.float32, reference=True)[0]
    if bits == 4:
        assert torch.equal(got, twin)
        assert torch.equal(kernels.linear(bits, x, [weight])[0], kernels.linear(bits, x, [weight], reference=True)[0])
    else:
        assert ((got.double() - twin.double()).abs() <= _int8_bound(x, q_rows, s, groups)).all()


def _assert_bf16_near(got: Tensor, twin: Tensor) -> None:
    """The bound for the float kernels (MoE, attention) against their twins: the same roundings to bf16,
    with torch's 8-lane tanh, exp and erf against libm's and fp32 sums in another order, so each output
    is within 2^-7 of the largest (a bf16 step or two) and almost all are bit-identical."""
    assert got.dtype == twin.dtype == torch.bfloat16 and got.shape == twin.shape
    torch.testing.assert_close(got, twin, rtol=2**-7, atol=2**-7 * twin.abs().max().item())
    assert (got != twin).float().mean() < 0.05


@pytest.mark.parametrize("bits, up_groups, grok2", [(8, 1, False), (8, 4, True), (4, None, False), (4, None, True)])
@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_moe_and_route_equal_their_scalar_twins(
    build: str, bits: int, up_groups: int | None, grok2: bool, tokens: int
) -> None:
    """The one-call MoE, int8 (down projections block-major, up ones too with 4 blocks) and int4 (panels),
    with Grok-1's tanh GELU or Grok-2's erf GELU and capped router: within `_assert_bf16_near` of its twin.
    The routing alone: the same experts, and gates within 2^-20 (fp32 sums in another order; no near ties)."""
    torch.manual_seed(tokens + bits)
    config = get_preset("mini")
    moe = MoE(config, torch.bfloat16)
    if bits == 8:
        quantize_int8(moe, lambda name: None if name == "router" else 8 if name == "w2" else up_groups, torch.bfloat16)
    else:
        quantize_int4(moe, group_size=32)
    parts = [(m.weight, m.scales) for m in (moe.w1, moe.v, moe.w2)]
    xs = (torch.randn(tokens, config.emb_size) * 2).bfloat16()
    router, cap = moe.router.weight.contiguous(), 5.0 if grok2 else 0.0
    args = (xs, router, config.num_selected_experts, bits, *parts, cap, grok2)
    _assert_bf16_near(kernels.moe(*args), kernels.moe(*args, reference=True))
    gates, experts = kernels.route(xs, router, config.num_selected_experts, cap)
    twin_gates, twin_experts = kernels.route(xs, router, config.num_selected_experts, cap, reference=True)
    assert torch.equal(experts, twin_experts)
    torch.testing.assert_close(gates, twin_gates, rtol=2**-20, atol=2**-20)


@pytest.mark.parametrize(("batch", "slots", "dh", "temperature"), [(1, 1, 32, False), (1, 77, 128, True),
                                                                   (3, 64, 32, False), (2, 1000, 128, True)])  # fmt: skip
@pytest.mark.parametrize("round_scores", [True, False])
def test_attend_equals_its_scalar_twin(
    build: str, batch: int, slots: int, dh: int, temperature: bool, round_scores: bool
) -> None:
    """Decode attention (soft-capped scores, rounded to bf16 or not; masked softmax, weighted values;
    Grok-2's per-row temperature) within `_assert_bf16_near` of its twin. Every row sees a slot, as a decoded token sees
    itself (with none, the kernel's softmax spreads over the slots rounded up to 8)."""
    _, q, k, v, mask = _decode_attention_case(batch, slots, dh, seed=slots)
    mask = mask[:, 0, 0, 0].clone()
    mask[:, -1] = True
    scale = torch.rand(batch) + 0.5 if temperature else None
    args = (q[:, 0].contiguous(), k, v, mask, 0.125, 30.0, -1e30, scale)
    got = kernels.attend(*args, round_scores=round_scores)
    _assert_bf16_near(got, kernels.attend(*args, round_scores=round_scores, reference=True))


def test_transpose_equals_its_scalar_twin(build: str) -> None:
    src = torch.randint(-128, 128, (300, 170), dtype=torch.int8, generator=torch.Generator().manual_seed(1))
    got, twin = torch.zeros(170, 300, dtype=torch.int8), torch.ones(170, 300, dtype=torch.int8)
    assert kernels.transpose_into(got, src) and kernels.transpose_into(twin, src, reference=True)
    assert torch.equal(got, twin) and torch.equal(got, src.T)
