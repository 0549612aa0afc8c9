"""Kernels for quantized models: what each native CPU kernel takes (`supports*`) and the calls into them
(`linear`, `moe`, `attend`, `route`, ...). The GPU ones (Triton) are in `groklm.kernels.triton`.

The parts, each in its own module:

- `choice`: Triton or the native kernels, by tensor and $GROKLM_KERNELS (`select`, `use_triton`);
- `isa`: the instruction set the native library is built for (AVX-512 VNNI, else AVX2; $GROKLM_ISA);
- `build`: compiling the C kernels (`csrc/groklm.c` and the files it includes) and the C++ ops
  (`csrc/ops.cpp`) on first use, into a cache keyed by their sources, under a build lock;
- `native`: the library, loaded with ctypes, and the Python calls into it; each kernel's scalar twin
  (`reference=True`) is in the same library;
- `ops`: the kernels as the torch ops groklm::linear, groklm::moe and groklm::attend;
- `layout`: the weight layouts and the shape rules the kernels take;
- `threads`: how many threads to use, from the load other processes put on the CPUs.

The native kernels are plain C (AVX2 or AVX-512 VNNI, + OpenMP). Without a C compiler or AVX2,
`available()` is False and callers use torch's kernels instead; `GROKLM_NATIVE=0` turns them off.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from groklm.kernels import layout, native, ops
from groklm.kernels.choice import KERNEL_CHOICES, needs_grad, select, use_triton
from groklm.kernels.layout import Expert, Weight, in_features, is_block_major
from groklm.kernels.native import available, guard_mapped_files, isa, rebuild, route, transpose_into
from groklm.kernels.threads import busy_cores, choose_threads

__all__ = [
    "KERNEL_CHOICES",
    "Expert",
    "Weight",
    "attend",
    "available",
    "blocks",
    "busy_cores",
    "choose_threads",
    "decode",
    "guard_mapped_files",
    "in_features",
    "int4_matmul",
    "int8_matmul",
    "is_block_major",
    "isa",
    "linear",
    "moe",
    "needs_grad",
    "rebuild",
    "rms_norm",
    "route",
    "select",
    "supports",
    "supports_attend",
    "supports_blocks",
    "supports_int4",
    "supports_linear",
    "supports_moe",
    "transpose_into",
    "unembed",
    "use_triton",
]

# The supports* checks look each other up here, in the package, so that a test which replaces
# `kernels.supports` (or `supports_int4`) turns the native path off for every layer that would take it.


def supports(weight: Tensor, scales: Tensor) -> bool:
    """Whether int8_matmul takes this weight [N, K] or [G, N, K/G] (int8) with bf16 scales [N, G]."""
    return layout.fits(weight, scales, 8) and available()


def supports_int4(packed: Tensor, scales: Tensor) -> bool:
    """Whether int4_matmul takes this packed weight [N, K/2] or [N/16, K/32, 256] (uint8, in rows or in
    panels: `quant.to_panels`, the scales then in panel order) with bf16 scales [N, G]."""
    return layout.fits(packed, scales, 4) and available()


def supports_linear(bits: int, parts: Sequence[Weight]) -> bool:
    """Whether `linear` takes these weights: each fits its kernel, and all share K and G."""
    fits = supports if bits == 8 else supports_int4
    return bits in (4, 8) and all(fits(w, s) for w, s in parts) and layout.share_a_layout(parts)


def supports_moe(bits: int, w1: Expert, v: Expert, w2: Expert) -> bool:
    """Whether `moe` takes these experts: each fits its matmul kernel, and W1 and V share a scale layout."""
    fits = supports if bits == 8 else supports_int4
    return bits in (4, 8) and all(fits(w, s) for w, s in (w1, v, w2)) and layout.pair_up(w1, v)


def supports_blocks() -> bool:
    """Whether `blocks`, `decode`, `unembed` and `rms_norm` are there: they are C++ only (the ops' C++
    implementations built and loaded)."""
    return available() and ops.NATIVE_OPS


def supports_attend(q: Tensor, k: Tensor) -> bool:
    """Whether `attend` takes this query [B, H, G, Dh] and cache [B, S, H, Dh] (or its prefix)."""
    return layout.fits_attend(q, k) and available()


layout_fits = layout.fits


def linear(bits: int, x: Tensor, parts: Sequence[Weight], out_dtype: torch.dtype = torch.bfloat16, *,
           reference: bool = False) -> list[Tensor]:  # fmt: skip
    """x [M, K] @ dequant(W_j).T for each int8 (bits 8) or packed int4 (bits 4) weight W_j with its
    scales, all sharing K and the scale layout, in one native call -> [M, N_j] each, in `out_dtype`
    (bf16 or fp32): views of one [M, N_0 + N_1 + ...] result. x is read as bf16; accumulation is fp32,
    rounded once at the end. One pass over all the weights: an attention layer's q, k and v together
    cost one call, not three. (The op returns one tensor, not a list: inductor's C++ wrapper, which
    `generate.compile_decode` uses, takes ops that return one.) With `reference`, the kernel's scalar
    twin computes it (slow: for tests)."""
    if reference:
        y = native.linear(bits, x, parts, out_dtype, reference=True)
    elif ops.NATIVE_OPS or torch.compiler.is_compiling():
        y = torch.ops.groklm.linear(bits, x, [t for part in parts for t in part], out_dtype == torch.float32)
    else:
        y = native.linear(bits, x, parts, out_dtype)
    return list(y.split([s.shape[0] for _, s in parts], dim=1))


def int8_matmul(x: Tensor, weight: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant(weight [N, K] int8, scales [N, G]).T -> [M, N] in `out_dtype` (see `linear`)."""
    return linear(8, x, [(weight, scales)], out_dtype)[0]


def int4_matmul(x: Tensor, packed: Tensor, scales: Tensor, out_dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """x [M, K] @ dequant_int4(packed [N, K/2], scales [N, G]).T -> [M, N], as int8_matmul."""
    return linear(4, x, [(packed, scales)], out_dtype)[0]


def moe(x: Tensor, router: Tensor, topk: int, bits: int, w1: Expert, v: Expert, w2: Expert, router_cap: float = 0.0,
        gelu_erf: bool = False, *, reference: bool = False) -> Tensor:  # fmt: skip
    """One MoE layer in one native call, routing included: x [N, D] bf16, router [E, D] fp32 -> bf16
    [N, D] = sum over the top-k experts e of softmax(router x)[e] * expert_e(x), as `MoE.forward`
    computes it (see `groklm_moe`); Grok-2's router logits capped at `router_cap` (0: none) and its
    erf GELU with `gelu_erf`. With `reference`, the kernel's scalar twin computes it.

    Reads only the chosen experts' weights, each once for all the tokens that chose it; no host
    synchronisation on the routing.
    """
    if not reference and (ops.NATIVE_OPS or torch.compiler.is_compiling()):
        return torch.ops.groklm.moe(x, router, topk, bits, [*w1, *v, *w2], router_cap, int(gelu_erf))
    return native.moe(x, router, topk, bits, w1, v, w2, router_cap, gelu_erf, reference)


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
           scale: Tensor | None = None, *, round_scores: bool = True, reference: bool = False) -> Tensor:  # fmt: skip
    """The attention of one new token per row over its cache, in one native call: q [B, H, G, Dh] (G
    query heads per kv head, rotated), k and v [B, S, H, Dh] (a prefix of the cache), mask [B, S]
    bool -> [B, H, G, Dh], all bf16 but the mask (see `groklm_attend`); `scale` [B] fp32 multiplies
    each row's capped scores (Grok-2's temperature). q . k is rounded to bf16 before the multiplier
    with `round_scores` (Grok-1's reference), kept in fp32 without (Grok-2's). Nothing is copied: the
    torch path turns the whole cache into fp32 for two matmuls every step. With `reference`, the
    kernel's scalar twin computes it."""
    if not reference and (ops.NATIVE_OPS or torch.compiler.is_compiling()):
        return torch.ops.groklm.attend(q, k, v, mask, multiplier, softcap, masked, scale, round_scores)
    return native.attend(q, k, v, mask, multiplier, softcap, masked, scale, round_scores, reference)


def blocks(h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_k: Sequence[Tensor], cache_v: Sequence[Tensor],
           positions: Tensor, norms: Sequence[Tensor], weights: Sequence[Tensor], routers: Sequence[Tensor], bits: int,
           eps: float, multiplier: float, softcap: float, masked: float, round_scores: bool, topk: int,
           router_cap: float, gelu_erf: bool, *, scale: Tensor | None) -> Tensor:  # fmt: skip
    """Decoder layers' decode step in one native call (`Block`s for one new token a row, in order, as
    `quant.fused_step` hands them over): h [B, D] bf16 -> [B, D]; each layer's new keys and values written
    into its cache_k[i], cache_v[i] [B, S, K, Dh] at `positions` [B]. Each layer has four RMSNorm weights
    in `norms` (in the order it applies them), fourteen tensors in `weights` (wq, wk, wv, wo, w1, v, w2,
    each weight then its scales) and a router; the settings are shared. The norms, RoPE, cache writes and
    residual adds between the kernels give model.py's bits (see ops.cpp)."""
    return torch.ops.groklm.blocks(h, cos, sin, mask, cache_k, cache_v, positions, norms, weights, routers,
                                   bits, eps, multiplier, softcap, masked, scale, round_scores, topk, router_cap,
                                   int(gelu_erf))  # fmt: skip


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """model.py's RMSNorm of the rows of x [N, D] bf16 (contiguous) with weight [D] fp32, bit for bit, in one
    native call (C++ only: `supports_blocks`)."""
    return torch.ops.groklm.rms_norm(x, weight, eps)


def decode(tokens: Tensor, positions: Tensor, embedded: Tensor, lookup: bool, embed_multiplier: float,
           jax_rounding: bool, pad: int, key_ok: Tensor, rope: tuple[Tensor, Tensor], cache_k: Sequence[Tensor],
           cache_v: Sequence[Tensor], norms: Sequence[Tensor], weights: Sequence[Tensor], routers: Sequence[Tensor],
           final_norm: Tensor, bits: int, eps: float, multiplier: float, softcap: float, masked: float,
           round_scores: bool, topk: int, router_cap: float, gelu_erf: bool, *, scale: Tensor | None,
           head: Weight | None = None, head_bits: int = 0, output_multiplier: float = 1.0,
           final_cap: float = 0.0) -> Tensor:  # fmt: skip
    """A decode step's final-normed hidden states [B, D] in one native call (C++ only: `supports_blocks`):
    model.py's `Grok.hidden` for one new token a row, tokens and positions [B] (int64), bit for bit. The
    tokens' embeddings [B, D] bf16 (with `lookup`, the table [V, D] to look them up in) and their
    multiplier, the pad token (-1: none), the cache's key_ok [B, S] (its slots in use; the new tokens' are
    set), the RoPE tables `rope` (cos, sin [P, Dh] fp32 for positions 0..P-1), then `blocks`' arguments,
    and the final norm's weight. Given a `head` (an int8 or int4 weight and scales, `head_bits` wide), the
    step's fp32 logits [B, V] instead, as `unembed` gives them from those hidden states."""
    return torch.ops.groklm.decode(tokens, positions, embedded, lookup, embed_multiplier, jax_rounding, pad, key_ok,
                                   *rope, cache_k, cache_v, norms, weights, routers, final_norm, bits, eps, multiplier,
                                   softcap, masked, scale, round_scores, topk, router_cap, int(gelu_erf),
                                   list(head or ()), head_bits, output_multiplier, final_cap)  # fmt: skip


def unembed(bits: int, x: Tensor, head: Weight, multiplier: float, jax_rounding: bool, final_cap: float) -> Tensor:
    """model.py's `Grok.unembed` over an int8 or int4 head (weight, scales) in one native call (C++ only:
    `supports_blocks`), bit for bit: x [N, D] bf16 -> fp32 logits [N, V], the output multiplier and,
    where final_cap > 0, Grok-2's final cap applied."""
    return torch.ops.groklm.unembed(bits, x, list(head), multiplier, jax_rounding, final_cap)
