"""GPU kernels in Triton: weight-only int8 and int4 matmuls, a fused MoE, soft-capped attention.

- `matmul`: x [M, K] (bf16/fp16) times an int8 weight with the released scale layouts (one scale per
  output row, or row blocks held block-major [G, N, K/G]) or groklm's int4 (two a byte, Q4_0's nibble
  order, one scale per group). The weight is read once per tile of rows and never written back
  dequantized: where a K tile lies in one scale group (every released Grok layout), the integers
  (exact in bf16) are multiplied on tensor cores and the fp32 sums scaled after, which is the exact
  product the native CPU kernels compute too (here correctly rounded to bf16 in all but 1 of 82,000
  outputs measured on the golden case's weights; the native kernel, whose activations are int16, was
  one bf16 step off in 1.8-42% of them). For few rows (decode) the K loop is split
  over programs (split-K) so the whole GPU reads the weight; the partial sums are added in a fixed
  order.
- `moe`: the pairs (token, chosen expert) sorted by expert and padded to whole row tiles, one launch
  for all experts' up projections with gelu(x W1) * (x V) in its epilogue, one for the down
  projections with the gates in its epilogue. Only the chosen experts' weights are read.
- `attention`: flash attention over the (T x G) query rows that share a kv head, with Grok's scaling,
  tanh soft-cap, optional per-query temperature (Grok-2) and the model's boolean mask, softmax in
  fp32: scores never reach memory. Two passes over the keys (the row max and sum, then the
  probabilities normalised and rounded to bf16 before they weigh the values, as the reference rounds
  them), so a decode step reads each kv head's keys twice and its values once.

Used for CUDA tensors when triton is installed (`groklm.kernels.use_triton`); GROKLM_KERNELS=triton
forces them for CPU tensors too, where Triton's interpreter runs them (TRITON_INTERPRET=1, which
the `groklm` command and the tests set when there is no GPU, before anything imports triton, with
`runtime.interpret_triton_without_gpu`; a library user sets it themselves): that is how the tests run
them on machines without one.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from groklm.kernels import is_block_major

# Triton 3.9's interpreter multiplies bf16 tiles wrongly (tl.dot on bf16 operands gives values ~1e9):
# interpreted, every product is taken on fp32 copies of the same (already rounded) operands, which
# is what the GPU's bf16 tensor cores compute, accumulating in fp32.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

launches: dict[str, int] = {"matmul": 0, "moe": 0, "attention": 0}  # counted, so tests can see the path taken


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _round(x, dtype: tl.constexpr):
    """fp32 x rounded to `dtype` (to nearest, ties to even), as fp32. bf16 by its bits: Triton 3.9's
    interpreter truncates fp32 -> bf16 casts, which biased every rounding toward zero (golden logits off
    by 0.05 instead of 0.02); a value rounded here is then stored exactly by any cast."""
    if dtype == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _dot(a, b, F32: tl.constexpr):
    if F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _weight_tile(w_base, offs_k, offs_n, k_ok, n_ok, kg, stride_wg, stride_wn, BITS: tl.constexpr,
                 PACK: tl.constexpr):  # fmt: skip
    """The integer weight tile [BLOCK_K, BLOCK_N] as fp32: int8 element (n, k) lies at
    (k // kg) * stride_wg + n * stride_wn + k % kg (row-major and block-major alike); int4 byte j of a
    PACK-column block holds column j (low nibble) and j + PACK/2 (high), offset by 8."""
    ok = k_ok[:, None] & n_ok[None, :]
    if BITS == 8:
        off = (offs_k // kg)[:, None] * stride_wg + offs_n[None, :] * stride_wn + (offs_k % kg)[:, None]
        return tl.load(w_base + off, mask=ok, other=0).to(tl.float32)
    half: tl.constexpr = PACK // 2
    j = offs_k % PACK
    off = offs_n[None, :] * stride_wn + ((offs_k // PACK) * half + j % half)[:, None]
    byte = tl.load(w_base + off, mask=ok, other=8).to(tl.int32)
    nibble = tl.where((j < half)[:, None], byte & 15, byte >> 4)
    return (nibble - 8).to(tl.float32)


@triton.jit
def _tile_product(xt, w_base, s_base, offs_k, offs_n, k_ok, n_ok, k0, kg, stride_wg, stride_wn, stride_sn,
                  BITS: tl.constexpr, PACK: tl.constexpr, ONE_GROUP: tl.constexpr, F32: tl.constexpr):  # fmt: skip
    """xt [BLOCK_M, BLOCK_K] @ the dequantized weight tile -> fp32 [BLOCK_M, BLOCK_N]."""
    q = _weight_tile(w_base, offs_k, offs_n, k_ok, n_ok, kg, stride_wg, stride_wn, BITS, PACK)
    if ONE_GROUP:  # the tile lies in one scale group: a row of scales
        sc = tl.load(s_base + offs_n * stride_sn + k0 // kg, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    else:
        sc = tl.load(s_base + offs_n[None, :] * stride_sn + (offs_k // kg)[:, None],
                     mask=k_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # fmt: skip
    if ONE_GROUP:  # integers (exact in bf16) on tensor cores, then the scale: x.dequant(w) exactly, in fp32
        return _dot(xt, q.to(xt.dtype), F32) * sc
    # A tile across groups (only group sizes that are not a multiple of 16, as in the golden miniature):
    # the weight dequantized as the reference does, integer x scale rounded to the compute dtype.
    return _dot(xt, _round(q * sc, xt.dtype).to(xt.dtype), F32)


@triton.jit
def _wmm_kernel(
    x_ptr, w_ptr, s_ptr, w3_ptr, s3_ptr, y_ptr, rows_ptr, expert_ptr, gate_ptr,
    M, N, K, x_div, stride_xm, stride_ym, stride_ysplit,
    stride_we, stride_wg, stride_wn, stride_se, stride_sn, kg, k_per_split,
    BITS: tl.constexpr, PACK: tl.constexpr, GATHER: tl.constexpr, FUSE: tl.constexpr, ERF: tl.constexpr,
    GATED: tl.constexpr, ONE_GROUP: tl.constexpr, F32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """y[rows] = x[rows // x_div] @ dequant(w[e]).T over this program's K range, for one tile of rows and
    columns. GATHER: the rows are rows_ptr[tile] (pairs sorted by expert, padded with M) and the tile's
    expert is expert_ptr[tile] (-1: an empty tile). FUSE: gelu(x w) * (x w3) in the epilogue; GATED:
    times gate_ptr[row]. kg: input columns per scale."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    if GATHER:
        e = tl.load(expert_ptr + pid_m)
        rows = tl.load(rows_ptr + offs_m)
        row_ok = rows < tl.where(e >= 0, M, 0)
        k_end = tl.where(e >= 0, K, 0)  # an empty tile reads nothing
        e = tl.maximum(e, 0)
    else:
        e = pid_m * 0  # expert 0, as a tensor like the loaded one
        rows = offs_m
        row_ok = offs_m < M
        k_end = K
    xrows = rows // x_div
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    w_base = w_ptr + e.to(tl.int64) * stride_we
    s_base = s_ptr + e.to(tl.int64) * stride_se
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, k_end)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        xt = tl.load(
            x_ptr + xrows[:, None] * stride_xm + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        acc += _tile_product(xt, w_base, s_base, offs_k, offs_n, k_ok, n_ok, k0, kg, stride_wg, stride_wn, stride_sn,
                             BITS, PACK, ONE_GROUP, F32)  # fmt: skip
        if FUSE:
            w3_base = w3_ptr + e.to(tl.int64) * stride_we
            s3_base = s3_ptr + e.to(tl.int64) * stride_se
            acc3 += _tile_product(xt, w3_base, s3_base, offs_k, offs_n, k_ok, n_ok, k0, kg, stride_wg, stride_wn,
                                  stride_sn, BITS, PACK, ONE_GROUP, F32)  # fmt: skip
    act: tl.constexpr = x_ptr.dtype.element_ty
    out = acc
    if FUSE:  # each branch rounded to the activation dtype, as the unfused MoE rounds them
        a = _round(acc, act)
        b = _round(acc3, act)
        if ERF:
            g = 0.5 * a * (1.0 + tl.erf(a * 0.7071067811865476))
        else:
            g = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
        out = _round(g, act) * b
    if GATED:
        gate = tl.load(gate_ptr + rows, mask=row_ok, other=0.0)
        out = _round(acc, act) * gate[:, None]
    y = y_ptr + pid_k * stride_ysplit + rows[:, None] * stride_ym + offs_n[None, :]
    tl.store(y, _round(out, y_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreted: a few splits, so the tests run the split-K path


class _Layout:
    """How `_wmm_kernel` addresses one (possibly stacked) quantized weight."""

    def __init__(self, weight: Tensor, scales: Tensor, bits: int, stacked: bool) -> None:
        if bits not in (8, 4):
            raise ValueError(f"bits must be 8 or 4, not {bits}")
        lead = 1 if stacked else 0
        self.n, self.groups = scales.shape[lead], scales.shape[lead + 1]
        self.stride_we = weight.stride(0) if stacked else 0
        self.stride_se, self.stride_sn = (scales.stride(0) if stacked else 0), scales.stride(lead)
        if scales.stride(-1) != 1 or weight.stride(-1) != 1:
            raise ValueError("the weight's and the scales' last dimensions must be contiguous")
        if bits == 8:
            if is_block_major(weight[0] if stacked else weight, scales[0] if stacked else scales):
                self.k = weight.shape[-1] * self.groups
                self.stride_wg, self.stride_wn = weight.stride(lead), weight.stride(lead + 1)
            else:
                self.k = weight.shape[-1]
                self.stride_wg, self.stride_wn = self.k // self.groups, weight.stride(lead)
            self.pack = 1
        else:
            if weight.dim() != scales.dim():
                raise ValueError("this int4 weight is in the CPU kernel's panels (quant.pack_int4): load the model "
                                 "on the GPU, where int4 weights stay in rows")  # fmt: skip
            self.k = weight.shape[-1] * 2
            self.stride_wg, self.stride_wn = 0, weight.stride(lead)
            gs = self.k // self.groups
            self.pack = 32 if gs % 32 == 0 else 16
        self.kg = self.k // self.groups
        self.bits = bits

    def block_k(self) -> tuple[int, bool]:
        """The K tile, and whether each lies within one scale group."""
        for b in (128, 64, 32, 16):
            if self.kg % b == 0:
                return b, True
        return 32, False


def _launch(x: Tensor, w: Tensor, s: Tensor, lay: _Layout, y: Tensor, rows_m: int, *, split: int = 1,
            gather: tuple[Tensor, Tensor, int] | None = None, w3: tuple[Tensor, Tensor] | None = None,
            erf: bool = False, gate: Tensor | None = None, block_m: int = 16) -> None:  # fmt: skip
    block_k, one_group = lay.block_k()
    block_n = 64 if rows_m <= 64 else 128
    if _INTERPRETED:  # each program is a Python call there: fewer, wider tiles
        block_n = min(256, triton.next_power_of_2(lay.n))
    k_per_split = _k_per_split(lay, split)
    tiles_m = gather[2] if gather is not None else triton.cdiv(rows_m, block_m)
    grid = (tiles_m, triton.cdiv(lay.n, block_n), triton.cdiv(lay.k, k_per_split))
    rows, experts, _ = gather if gather is not None else (y, y, 0)
    _wmm_kernel[grid](
        x, w, s, *(w3 if w3 is not None else (w, s)), y, rows, experts, gate if gate is not None else y,
        rows_m, lay.n, lay.k, rows_m // x.shape[0] if gather is not None else 1,
        x.stride(0), y.stride(-2), y.stride(0) if y.dim() == 3 else 0,
        lay.stride_we, lay.stride_wg, lay.stride_wn, lay.stride_se, lay.stride_sn, lay.kg, k_per_split,
        BITS=lay.bits, PACK=lay.pack, GATHER=gather is not None, FUSE=w3 is not None, ERF=erf,
        GATED=gate is not None, ONE_GROUP=one_group, F32=_INTERPRETED, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip


def _k_per_split(lay: _Layout, split: int) -> int:
    block_k = lay.block_k()[0]
    return triton.cdiv(triton.cdiv(lay.k, split), block_k) * block_k


def split_k(n: int, k: int, rows: int, device: torch.device) -> int:
    """K splits for a weight of n outputs: enough programs for two per SM when there are few rows
    (decode), at least four K tiles a split; 1 for many rows. Depends on the weight's shape and the
    row count's class only, so a row's result is the same at any batch of up to 64 rows."""
    if rows > 64:
        return 1
    tiles = triton.cdiv(n, 64)
    split = 1
    while tiles * split < 2 * _sms(device) and k // (split * 2) >= 4 * 128:
        split *= 2
    return split


def matmul(x: Tensor, weight: Tensor, scales: Tensor, bits: int, split: int | None = None) -> Tensor:
    """x [M, K] (bf16 or fp16) @ dequant(weight, scales).T -> [M, N] in x's dtype. int8: weight [N, K]
    or block-major [G, N, K/G], scales [N, G]; int4: packed [N, K/2], scales [N, K/group]."""
    lay = _Layout(weight, scales, bits, stacked=False)
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != lay.k:
        raise ValueError(f"x {tuple(x.shape)} does not fit a weight of {lay.k} inputs")
    x = x.contiguous()
    split = split_k(lay.n, lay.k, m, x.device) if split is None else split
    split = triton.cdiv(lay.k, _k_per_split(lay, split))  # whole K tiles a split
    launches["matmul"] += 1
    if split == 1:
        y = torch.empty(m, lay.n, dtype=x.dtype, device=x.device)
        _launch(x, weight, scales, lay, y, m, block_m=_block_m(m))
        return y
    parts = torch.empty(split, m, lay.n, dtype=torch.float32, device=x.device)
    _launch(x, weight, scales, lay, parts, m, split=split, block_m=_block_m(m))
    return parts.sum(0).to(x.dtype)


def _block_m(rows: int) -> int:
    return 16 if rows <= 16 else 32 if rows <= 32 else 64


def _sorted_pairs(experts: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor, int]:
    """The (token, expert) pairs' ids grouped by expert, each group padded to whole tiles of block_m
    (padding: the pair count), and each tile's expert (-1 past the last): computed on the device,
    without reading the routing back (the tile count is its bound, cdiv(P, block_m) + E)."""
    flat = experts.flatten()
    p = flat.numel()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)
    tiles = triton.cdiv(p, block_m) + num_experts
    if _INTERPRETED:  # no GPU to keep in step with, and each empty tile is a Python call there
        tiles = int((padded // block_m).sum())
    by_expert = flat[order]
    rank = torch.arange(p, device=flat.device) - (counts.cumsum(0) - counts)[by_expert]
    rows = torch.full((tiles * block_m,), p, dtype=torch.int32, device=flat.device)
    rows[(ends - padded)[by_expert] + rank] = order.to(torch.int32)
    tile = torch.searchsorted(ends, torch.arange(tiles, device=flat.device) * block_m, right=True)
    tile_expert = torch.where(tile < num_experts, tile, -1).to(torch.int32)
    return rows, tile_expert, tiles


def moe(xs: Tensor, gates: Tensor, experts: Tensor, bits: int, w1: tuple[Tensor, Tensor], v: tuple[Tensor, Tensor],
        w2: tuple[Tensor, Tensor], erf: bool = False) -> Tensor:  # fmt: skip
    """sum over j of gates[:, j] * expert experts[:, j](xs), an expert being w2(gelu(w1 x) * v x):
    xs [N, D] bf16/fp16, gates [N, k] fp32, experts [N, k]; stacked weights [E, ...] as `matmul`'s."""
    l1, l3, l2 = (_Layout(w, s, bits, stacked=True) for w, s in (w1, v, w2))
    n, k = experts.shape
    p = n * k
    if (l1.n, l1.k) != (l3.n, l3.k) or (l2.n, l2.k) != (l1.k, l1.n) or xs.shape[1] != l1.k:
        raise ValueError(f"expert shapes do not fit: w1 {(l1.n, l1.k)}, v {(l3.n, l3.k)}, w2 {(l2.n, l2.k)}, "
                         f"x {tuple(xs.shape)}")  # fmt: skip
    num_experts = w1[0].shape[0]
    if p == 0:
        return torch.zeros_like(xs)
    block_m = _block_m(max(1, p // num_experts))
    gather = _sorted_pairs(experts, num_experts, block_m)
    launches["moe"] += 1
    xs = xs.contiguous()
    h = torch.empty(p, l1.n, dtype=xs.dtype, device=xs.device)
    _launch(xs, *w1, l1, h, p, gather=gather, w3=v, erf=erf, block_m=block_m)
    out = torch.empty(p, l2.n, dtype=torch.float32, device=xs.device)
    _launch(h, *w2, l2, out, p, gather=gather, gate=gates.reshape(p).float().contiguous(), block_m=block_m)
    return out.view(n, k, l2.n).sum(1).to(xs.dtype)


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, temp_ptr, limit_ptr, o_ptr,
    T, G, DH, sq_b, sq_t, sq_h, sk_b, sk_s, sk_h, sv_b, sv_s, sv_h, sm_b, sm_t, st_b, so_b, so_t, so_h,
    multiplier, cap, masked,
    HAS_TEMP: tl.constexpr, ROUND: tl.constexpr, F32: tl.constexpr, DH_P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    """One tile of the T x G query rows of kv head h in batch row b: rows r = t * G + g; q [B, T, K, G, Dh]
    (g's stride is Dh), k and v [B, S, K, Dh], mask [B, T, S] (bool as int8), temp [B, T] fp32."""
    pid, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = r < T * G
    t, g = r // G, r % G
    d = tl.arange(0, DH_P)
    d_ok = d < DH
    qt = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h * sq_h + g[:, None] * DH + d[None, :],
                 mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    if HAS_TEMP:
        temp = tl.load(temp_ptr + b * st_b + t, mask=r_ok, other=1.0)
    else:
        temp = tl.full((BLOCK_M,), 1.0, dtype=tl.float32)
    # Two passes over the keys: the row max and sum first (online), then the probabilities, normalised
    # and rounded to the value dtype before they weigh the values, as the reference rounds them.
    S = tl.load(limit_ptr + b)  # the slots this batch row reads: past them every key is masked
    m_i = tl.full((BLOCK_M,), -3.0e38, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        sc = _scores(qt, k_ptr, mask_ptr, b, h, t, r_ok, d, d_ok, s0, S, sk_b, sk_s, sk_h, sm_b, sm_t, temp, multiplier,
                     cap, masked, q_ptr.dtype.element_ty, ROUND, F32, BLOCK_S)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(sc - m_new[:, None]), 1)
        m_i = m_new
    acc = tl.zeros((BLOCK_M, DH_P), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        sc = _scores(qt, k_ptr, mask_ptr, b, h, t, r_ok, d, d_ok, s0, S, sk_b, sk_s, sk_h, sm_b, sm_t, temp, multiplier,
                     cap, masked, q_ptr.dtype.element_ty, ROUND, F32, BLOCK_S)  # fmt: skip
        s = s0 + tl.arange(0, BLOCK_S)
        vt = tl.load(v_ptr + b * sv_b + s[:, None] * sv_s + h * sv_h + d[None, :], mask=(s < S)[:, None] & d_ok[None, :],
                     other=0.0)  # fmt: skip
        p = _round(tl.exp(sc - m_i[:, None]) / l_i[:, None], vt.dtype)
        acc += _dot(p.to(vt.dtype), vt, F32)
    tl.store(o_ptr + b * so_b + t[:, None] * so_t + h * so_h + g[:, None] * DH + d[None, :],
             _round(acc, o_ptr.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])  # fmt: skip


@triton.jit
def _scores(qt, k_ptr, mask_ptr, b, h, t, r_ok, d, d_ok, s0, S, sk_b, sk_s, sk_h, sm_b, sm_t, temp, multiplier, cap,
            masked, dtype: tl.constexpr, ROUND: tl.constexpr, F32: tl.constexpr, BLOCK_S: tl.constexpr):  # fmt: skip
    """The fp32 attention logits of keys s0..s0+BLOCK_S: q.k, rounded to the compute dtype where the
    reference rounds them, scaled, soft-capped, times the temperature, masked; -inf past S."""
    s = s0 + tl.arange(0, BLOCK_S)
    s_ok = s < S
    kt = tl.load(k_ptr + b * sk_b + s[:, None] * sk_s + h * sk_h + d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                 other=0.0)  # fmt: skip
    sc = _dot(qt, tl.trans(kt), F32)
    if ROUND:
        sc = _round(sc, dtype)
    sc = _tanh(sc * multiplier / cap) * cap * temp[:, None]
    keep = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + s[None, :], mask=r_ok[:, None] & s_ok[None, :], other=0)
    sc = tl.where(keep != 0, sc, masked)
    return tl.where(s_ok[None, :], sc, float("-inf"))


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
              temp: Tensor | None = None, round_scores: bool = False) -> Tensor:  # fmt: skip
    """q [B, T, K, G, Dh] (rotated), k and v [B, S, K, Dh] (a cache or its prefix: any strides with Dh
    contiguous), mask [B, 1, 1, T, S] or [B, T, S] bool, temp [B, 1, 1, T, 1] or [B, T] or None ->
    [B, T, K * G * Dh] in q's dtype. As `Attention.attend`: logits x multiplier, tanh soft-cap, times
    temp, masked to `masked`, softmax in fp32."""
    b, t, kh, g, dh = q.shape
    s = k.shape[1]
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (kh, dh) or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    mask = mask.reshape(b, t, s)
    if mask.stride(-1) != 1:
        mask = mask.contiguous()
    # Each batch row reads its slots up to its last unmasked one (a static cache's unused tail is never
    # read), or all of them where some query sees no key at all (uniform over every slot, as the finite
    # mask value gives in the reference). Computed on the device: no host synchronisation.
    seen = mask.any(dim=1)  # [B, S]
    last = torch.where(seen, torch.arange(1, s + 1, device=mask.device), 0).amax(dim=-1)
    limit = torch.where(mask.any(dim=-1).all(dim=-1), last, s).to(torch.int32)
    q = q.contiguous()
    temp2 = None if temp is None else temp.reshape(b, t).float().contiguous()
    o = torch.empty(b, t, kh, g, dh, dtype=q.dtype, device=q.device)
    block_m = 16 if t * g <= 16 else 64
    grid = (triton.cdiv(t * g, block_m), kh, b)
    launches["attention"] += 1
    _attention_kernel[grid](
        q, k, v, mask.view(torch.int8), temp2 if temp2 is not None else q, limit, o,
        t, g, dh, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), mask.stride(0), mask.stride(1), 0 if temp2 is None else temp2.stride(0),
        o.stride(0), o.stride(1), o.stride(2), multiplier, softcap, masked,
        HAS_TEMP=temp2 is not None, ROUND=round_scores, F32=_INTERPRETED, DH_P=max(16, triton.next_power_of_2(dh)), BLOCK_M=block_m,
        BLOCK_S=64,
    )  # fmt: skip
    return o.view(b, t, kh * g * dh)
