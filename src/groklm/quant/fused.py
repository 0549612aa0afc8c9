"""Fused native paths for quantized modules: attention whose q, k and v projections run as one native call
(and a decode step's attention over the cache), an MoE whose routing and chosen experts run as one, and an
RMSNorm in one call, not six. Each falls back to its plain path wherever the kernels do not apply. A whole
decode step as one call, and `fuse`, which swaps all of them in: `quant.fused_step`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.model import (
    MASK_VALUE,
    Attention,
    MoE,
    RMSNorm,
)
from groklm.quant.linear import Int4ExpertLinear, Int4Linear, Int8ExpertLinear, Int8Linear

_EXPERT_BITS: dict[type[nn.Module], int] = {Int8ExpertLinear: 8, Int4ExpertLinear: 4}
_LINEAR_BITS: dict[type[nn.Module], int] = {Int8Linear: 8, Int4Linear: 4}


def _native_input(x: Tensor) -> bool:
    """Whether the native kernels take x: bf16 on the CPU, no gradient wanted, Triton not chosen."""
    return (
        x.dtype == torch.bfloat16 and x.device.type == "cpu" and not kernels.needs_grad(x) and not kernels.use_triton(x)
    )


def _one_kind(modules: tuple[nn.Module, ...], bits_of: dict[type[nn.Module], int]) -> int | None:
    """The width (8 or 4) of these quantized modules if they are all of one kind; else None."""
    bits = bits_of.get(type(modules[0]))
    return None if bits is None or any(type(m) is not type(modules[0]) for m in modules) else bits


def _native_bits(x: Tensor, modules: tuple[nn.Module, ...], bits_of: dict[type[nn.Module], int]) -> int | None:
    """The width (8 or 4) of these quantized modules if a native call can take them all with x; else None."""
    return _one_kind(modules, bits_of) if _native_input(x) else None


class QuantizedAttention(Attention):
    """Attention whose q, k and v projections are int8 or int4: on CPU in bf16 they run as one native
    call (`kernels.linear`: one activation quantization, one pass over the three weights), and so does
    the attention over the cache or the prompt (`kernels.attend`, rounding the scores where the
    model's reference does: `jax_rounding`). The torch path, in fp64 (see `Attention.attend`), cost a
    quarter of a 512-token bench-mid prefill."""

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
        if kernels.needs_grad(q) or not kernels.supports_attend(q[:, 0], k):
            return super().attend(q, k, v, mask, temp)
        args = (c.attn_output_multiplier, c.attn_softcap, MASK_VALUE)
        if t == 1:
            q1, mask1 = q[:, 0].contiguous(), mask[:, 0, 0, 0].contiguous()  # [B, K, G, Dh], [B, S]
            scale = None if temp is None else temp.reshape(b).contiguous()
            return kernels.attend(q1, k, v, mask1, *args, scale, round_scores=c.jax_rounding).view(b, 1, c.q_size)
        # Prefill: each query position a row of its own, over the same keys (rows 0 apart) under its own
        # mask. A row's result depends on nothing else (not T, nor S: see groklm_attend), so a prompt
        # prefilled in chunks gets the bits it gets whole, and those a decode step gives its position.
        if k.stride() != v.stride():  # the prompt's own keys and values (no cache): v a view of the projection
            k, v = k.contiguous(), v.contiguous()
        outs = []
        for i in range(b):
            ki, vi = k[i : i + 1].expand(t, *k.shape[1:]), v[i : i + 1].expand(t, *v.shape[1:])
            scale = None if temp is None else temp[i].reshape(t).contiguous()
            mi = mask[i, 0, 0].contiguous()
            outs.append(kernels.attend(q[i].contiguous(), ki, vi, mi, *args, scale, round_scores=c.jax_rounding))
        return torch.stack(outs).view(b, t, c.q_size)


class QuantizedMoE(MoE):
    """An MoE whose experts are int8 or int4: on CPU in bf16, the routing and the chosen experts run in
    one native call (`kernels.moe`: grouped by expert, no host synchronisation on the routing);
    elsewhere as MoE."""

    def native(self, x: Tensor) -> int | None:
        """The width of the native call this input takes (8 or 4), or None: the plain MoE path."""
        bits = _native_bits(x, (self.w1, self.v, self.w2), _EXPERT_BITS)
        return bits if bits is not None and self.takes(bits) else None

    def takes(self, bits: int) -> bool:
        """Whether the native call takes this MoE's router (fp32) and its experts at this width."""
        if type(self.router) is not nn.Linear or self.router.weight.dtype != torch.float32:
            return False
        return kernels.supports_moe(bits, *[(m.weight, m.scales) for m in (self.w1, self.v, self.w2)])

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


class NativeRMSNorm(RMSNorm):
    """RMSNorm whose bf16 CPU rows (no gradient wanted) are normed in one native call, `kernels.rms_norm`, with
    RMSNorm's bits: its torch path makes six calls, each costing tens of microseconds where the weights have
    just swept the caches (the decoder's final norm, once a decode step). Elsewhere, and under
    torch.compile (which fuses the torch path itself), it is RMSNorm."""

    def forward(self, x: Tensor) -> Tensor:
        w = self._parameters["weight"]
        native = w.dtype == torch.float32 and not kernels.needs_grad(w) and _native_input(x)
        if torch.compiler.is_compiling() or not native or not kernels.supports_blocks():
            return super().forward(x)
        return kernels.rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), w, self.eps).view(x.shape)
