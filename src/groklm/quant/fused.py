"""Fused native paths for quantized blocks: attention whose q, k and v projections run as one native call
(and a decode step's attention over the cache), and an MoE whose routing and chosen experts run as one.
`fuse(model)` swaps them in where the blocks' linears are int8 or int4; they fall back to the plain
paths wherever the kernels do not apply.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.model import MASK_VALUE, Attention, MoE, recast
from groklm.quant.linear import Int4ExpertLinear, Int4Linear, Int8ExpertLinear, Int8Linear

_EXPERT_BITS: dict[type[nn.Module], int] = {Int8ExpertLinear: 8, Int4ExpertLinear: 4}
_LINEAR_BITS: dict[type[nn.Module], int] = {Int8Linear: 8, Int4Linear: 4}


def _native_bits(x: Tensor, modules: tuple[nn.Module, ...], bits_of: dict[type[nn.Module], int]) -> int | None:
    """The width (8 or 4) of these quantized modules if a native call can take them all with x (bf16,
    CPU, one kind of module, one scale layout); else None."""
    bits = bits_of.get(type(modules[0]))
    if (
        bits is None
        or x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or kernels.needs_grad(x)
        or kernels.use_triton(x)
    ):
        return None
    if any(type(m) is not type(modules[0]) for m in modules):
        return None
    return bits


class QuantizedAttention(Attention):
    """Attention whose q, k and v projections are int8 or int4: on CPU in bf16 they run as one native
    call (`kernels.linear`: one activation quantization, one pass over the three weights), and so does
    a decode step's attention over the cache (`kernels.attend`)."""

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        mods = (self.wq, self.wk, self.wv)
        bits = _native_bits(x, mods, _LINEAR_BITS)
        parts = [(m.weight, m.scales) for m in mods] if bits is not None else []
        if bits is None or not kernels.supports_linear(bits, parts):
            return super().qkv(x)
        q, k, v = kernels.linear(bits, x.reshape(-1, x.shape[-1]), parts)
        return q.view(*x.shape[:-1], -1), k.view(*x.shape[:-1], -1), v.view(*x.shape[:-1], -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, temp: Tensor | None = None) -> Tensor:
        b, t = q.shape[:2]
        c = self.config
        if kernels.use_triton(q):
            from groklm.kernels import triton as gpu

            return gpu.attention(q, k, v, mask, c.attn_output_multiplier, c.attn_softcap, MASK_VALUE, temp,
                                 round_scores=c.jax_rounding)  # fmt: skip
        if t != 1 or not kernels.supports_attend(q[:, 0], k):  # prefill: torch's batched matmuls
            return super().attend(q, k, v, mask, temp)
        q1, mask1 = q[:, 0].contiguous(), mask[:, 0, 0, 0].contiguous()  # [B, K, G, Dh], [B, S]
        scale = None if temp is None else temp.reshape(b).contiguous()
        o = kernels.attend(q1, k, v, mask1, c.attn_output_multiplier, c.attn_softcap, MASK_VALUE, scale)
        return o.view(b, 1, c.q_size)


class QuantizedMoE(MoE):
    """An MoE whose experts are int8 or int4: on CPU in bf16, the routing and the chosen experts run in
    one native call (`kernels.moe`: grouped by expert, no host synchronisation on the routing);
    elsewhere as MoE."""

    def native(self, x: Tensor) -> int | None:
        """The width of the native call this input takes (8 or 4), or None: the plain MoE path."""
        mods = (self.w1, self.v, self.w2)
        bits = _native_bits(x, mods, _EXPERT_BITS)
        if bits is None or type(self.router) is not nn.Linear or self.router.weight.dtype != torch.float32:
            return None
        return bits if kernels.supports_moe(bits, *[(m.weight, m.scales) for m in mods]) else None

    def route(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """As MoE.route, computed as the native call routes where it applies (the same function)."""
        if self.native(xs) is None:
            return super().route(xs)
        return kernels.route(xs, self.router.weight.contiguous(), self.top_k, self.router_softcap or 0.0)

    def forward(self, x: Tensor) -> Tensor:
        mods = (self.w1, self.v, self.w2)
        bits = _EXPERT_BITS.get(type(self.w1))
        if kernels.use_triton(x) and bits is not None and all(type(m) is type(self.w1) for m in mods):
            from groklm.kernels import triton as gpu

            xs = x.reshape(-1, x.shape[-1])
            gates, experts = MoE.route(self, xs)
            w = [(m.weight, m.scales) for m in mods]
            return gpu.moe(xs, gates, experts, bits, *w, erf=self.approximate == "none").view(x.shape)
        bits = self.native(x)
        if bits is None:
            return super().forward(x)
        parts = [(m.weight, m.scales) for m in (self.w1, self.v, self.w2)]
        cap = self.router_softcap or 0.0
        return kernels.moe(
            x.reshape(-1, x.shape[-1]),
            self.router.weight.contiguous(),
            self.top_k,
            bits,
            *parts,
            cap,
            self.approximate == "none",
        ).view(x.shape)


FUSED: dict[type[nn.Module], type[nn.Module]] = {MoE: QuantizedMoE, Attention: QuantizedAttention}
"""The blocks `fuse` swaps, by exact class: a block another transform has swapped already (an expert-
parallel MoE, which holds a share of the experts the fused MoE kernel cannot route over) keeps its own."""


def fuse(model: nn.Module) -> nn.Module:
    """Give attention and MoE blocks their fused native paths, in place (each swapped for a module
    holding the same parameters, settings and hooks: state-dict names unchanged); returns the model,
    or, where `model` is itself such a block, the new block. Only `qkv`, `attend` and the MoE's
    `forward` differ, and they fall back to the plain ones wherever the kernels do not apply (float
    weights included)."""
    if type(model) in FUSED:
        return recast(model, FUSED[type(model)])
    for name, module in list(model.named_modules()):
        kind = FUSED.get(type(module))
        if kind is not None:
            model.set_submodule(name, recast(module, kind))
    return model
