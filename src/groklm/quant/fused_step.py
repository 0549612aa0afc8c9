"""A decode step as one native call: a block's (`QuantizedBlock`), all the decoder's blocks' (`QuantizedLayers`)
and the whole model's hidden states and logits (`QuantizedGrok`), built on the fused modules of `quant.fused`.
`fuse(model)` swaps all of them in where the blocks' linears are int8 or int4; each falls back to the plain
path wherever the kernels do not apply.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules import module as nn_module
from torch.utils.hooks import RemovableHandle

from groklm import kernels
from groklm.kernels.layout import Weight
from groklm.model import (
    MASK_VALUE,
    Attention,
    Block,
    Grok,
    KVCache,
    Layers,
    MoE,
    RMSNorm,
    attn_temperature,
    recast,
    rope_tables,
)
from groklm.quant.fused import (
    _EXPERT_BITS,
    _LINEAR_BITS,
    NativeRMSNorm,
    QuantizedAttention,
    QuantizedMoE,
    _native_input,
    _one_kind,
)

Plan = tuple[list[Tensor], list[Tensor], list[Tensor], tuple[Any, ...]]
"""`kernels.blocks`' arguments for one block or several: norm weights, weights, routers, and the settings
from `bits` to `gelu_erf`."""


def _run_blocks(h: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, cache_k: list[Tensor], cache_v: list[Tensor],
                where: tuple[Tensor, Tensor], temp: Tensor | None, plan: Plan) -> Tensor:  # fmt: skip
    """A decode step (one new token a row) through the blocks `plan` holds, in one native call."""
    b = h.shape[0]
    scale = None if temp is None else temp.reshape(b).contiguous()
    norms, weights, routers, settings = plan
    out = kernels.blocks(h.reshape(b, -1), cos.reshape(b, -1), sin.reshape(b, -1), mask.reshape(b, -1), cache_k,
                         cache_v, where[1].reshape(b), norms, weights, routers, *settings, scale=scale)  # fmt: skip
    return out.view(h.shape)


class QuantizedBlock(Block):
    """A block of the fused attention and MoE above: a decode step (one new token a row, through the
    cache) runs as one native call, `kernels.blocks`: the kernels and the norms, RoPE, cache write and
    residual adds between them, with model.py's bits. Eager decode otherwise makes ~150 torch calls a
    layer between the kernels, milliseconds a step (compiled decode fuses them itself and keeps this
    path off). It falls back to Block where the C++ ops are not built, wherever a part is another kind
    (Grok-2's dense MLP, LoRA, parallel or float modules) and wherever a part has hooks to run.
    `QuantizedLayers` runs all the blocks' steps as one call where each block's would run so."""

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        kv: tuple[Tensor, Tensor] | None,
        where: tuple[Tensor, Tensor],
        temp: Tensor | None = None,
    ) -> Tensor:
        plan = self._decode_plan(kv) if kv is not None and _decode_step(h) else None
        if plan is None:
            return super().forward(h, cos, sin, mask, kv, where, temp)
        assert kv is not None
        return _run_blocks(h, cos, sin, mask, [kv[0]], [kv[1]], where, temp, plan)

    def _decode_plan(self, kv: tuple[Tensor, Tensor]) -> Plan | None:
        """This block's `kernels.blocks` arguments for a decode step (`_decode_step`) through its cache kv,
        or None: run as Block. Called every layer every step, after the weights have swept the caches:
        parts are read from the module dicts, not through nn.Module's attribute lookup, and the arguments
        (whether the kernels take the weights, first) are worked out once for the tensors at hand (the
        same tuple each step while they stay)."""
        mods = self._modules
        if self.mlp is not None:
            return None
        a, m = mods["attn"], mods["moe"]
        if type(a) is not QuantizedAttention or type(m) is not QuantizedMoE:
            return None
        am, mm = a._modules, m._modules
        linears, experts = (am["wq"], am["wk"], am["wv"], am["wo"]), (mm["w1"], mm["v"], mm["w2"])
        norms = (mods["attn_norm"], mods["attn_out_norm"], mods["moe_norm"], mods["moe_out_norm"])
        bits = _one_kind(linears, _LINEAR_BITS)
        if bits is None or _one_kind(experts, _EXPERT_BITS) != bits:
            return None
        parts = (a, m, mm["router"], *linears, *experts, *norms)
        if any(p._forward_hooks or p._forward_pre_hooks for p in parts):
            return None
        if not _cache_fits(kv[0]):
            return None
        tensors = [t for mod in (*linears, *experts) for t in (mod._buffers["weight"], mod._buffers["scales"])]
        norm_weights, router = [n._parameters["weight"] for n in norms], mm["router"]._parameters.get("weight")
        key = [*tensors, *norm_weights, router]
        cached = self.__dict__.get("_plan")
        if cached is None or any(x is not y for x, y in zip(cached[0], key, strict=True)):
            c = a.config
            settings = (bits, self.attn_norm.eps, c.attn_output_multiplier, c.attn_softcap, MASK_VALUE, c.jax_rounding,
                        m.top_k, m.router_softcap or 0.0, m.approximate == "none")  # fmt: skip
            plan = (norm_weights, tensors, [router], settings) if self._fits(bits) else None
            cached = (key, plan)
            self.__dict__["_plan"] = cached
        return cached[1]

    def _fits(self, bits: int) -> bool:
        """Whether the native calls take this block's norms and weights (its MoE: `QuantizedMoE.takes`)."""
        a = self.attn
        norms = (self.attn_norm, self.attn_out_norm, self.moe_norm, self.moe_out_norm)
        norms_fit = all(type(n) in (RMSNorm, NativeRMSNorm) and n.weight.dtype == torch.float32
                        and n.eps == self.attn_norm.eps for n in norms)  # fmt: skip
        qkv = [(x.weight, x.scales) for x in (a.wq, a.wk, a.wv)]
        fits = kernels.supports_blocks() and kernels.supports_linear(bits, qkv)
        fits = fits and kernels.supports_linear(bits, [(a.wo.weight, a.wo.scales)]) and self.moe.takes(bits)
        return norms_fit and fits


class QuantizedLayers(Layers):
    """Decoder blocks whose decode step runs as one native call for them all (`kernels.blocks`), where
    each is a QuantizedBlock without hooks of its own that would run its step natively, all with the
    same settings: one call a step, not one a layer (a call from Python costs tens of microseconds when
    the weight sweep has left the caches cold). Otherwise each block runs its own way."""

    def forward(
        self,
        h: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        cache: KVCache | None,
        where: tuple[Tensor, Tensor],
        temp: Tensor | None = None,
    ) -> Tensor:
        plan = self._decode_plan(cache) if cache is not None and _decode_step(h) else None
        if plan is None:
            return super().forward(h, cos, sin, mask, cache, where, temp)
        assert cache is not None
        return _run_blocks(h, cos, sin, mask, cache.k, cache.v, where, temp, plan)

    def _decode_plan(self, cache: KVCache) -> Plan | None:
        """The blocks' plans for a decode step (`_decode_step`) joined, or None. The joined plan is kept with
        a `_Watch`: while no module, parameter, buffer or hook is registered anywhere it holds, and checking
        that costs a step microseconds where asking each block for its plan cost ~0.3 ms (the weight sweep
        leaves the caches cold)."""
        layers = self._modules
        if not layers or len(cache.k) != len(layers) or len(cache.v) != len(layers):
            return None
        if not all(_cache_fits(k) for k in cache.k):
            return None
        cached = self.__dict__.get("_plan")
        if cached is not None and cached[1].holds():
            return cached[0]
        plans: list[Plan] = []
        for layer, k, v in zip(layers.values(), cache.k, cache.v, strict=True):
            if type(layer) is not QuantizedBlock or layer._forward_hooks or layer._forward_pre_hooks:
                return None
            plan = layer._decode_plan((k, v))
            if plan is None or (plans and plan[3] != plans[0][3]):
                return None
            plans.append(plan)
        joined = tuple([t for p in plans for t in p[i]] for i in range(3))
        self.__dict__["_plan"] = cached = ((*joined, plans[0][3]), _Watch())
        return cached[0]


_registrations = 0
"""Modules, parameters and buffers registered anywhere in this process so far (torch's global registration
hooks count them: every nn.Module attribute set, `register_*` and `add_module` runs them)."""


def _count_registration(*_: Any) -> None:
    global _registrations
    _registrations += 1


nn_module.register_module_module_registration_hook(_count_registration)
nn_module.register_module_parameter_registration_hook(_count_registration)
nn_module.register_module_buffer_registration_hook(_count_registration)


class _Watch:
    """When a plan was made: how many modules, parameters and buffers had been registered anywhere
    (`_registrations`) and how many hooks (`RemovableHandle.next_id`, which every hook's handle takes).
    `holds()` says neither has moved since: a module swapped, a tensor replaced or a hook registered
    anywhere shows. (A part deleted does not, but the plain path would fail on it.) Checking each of the
    blocks' ~900 dict entries instead cost a step ~0.17 ms where the weights had swept the caches."""

    def __init__(self) -> None:
        self.seen = (_registrations, RemovableHandle.next_id)

    def holds(self) -> bool:
        return (_registrations, RemovableHandle.next_id) == self.seen


def _cache_fits(k: Tensor) -> bool:
    """Whether `kernels.blocks` takes this layer's cache of keys [B, S, K, Dh] (its values alike)."""
    return (
        k.dtype == torch.bfloat16 and k.shape[3] % 8 == 0 and k.stride()[1:] == (k.shape[2] * k.shape[3], k.shape[3], 1)
    )


def _decode_step(h: Tensor) -> bool:
    """What a decode step through `kernels.blocks` needs of the step as a whole, checked once a step: one
    new token a row (h [B, 1, D]) and `_native_step`."""
    return h.dim() == 3 and h.shape[1] == 1 and _native_step(h)


_BF16 = torch.empty(0, dtype=torch.bfloat16)
"""Stands for a step's bf16 CPU hidden states, no gradient wanted, before there are any."""


def _native_step(x: Tensor) -> bool:
    """Whether the native kernels take x (`_native_input`) in a step run natively as a whole: eager mode
    (compiled decode fuses the torch path itself) and no hooks registered for every module (they would
    have to run on each part)."""
    if torch.compiler.is_compiling() or not _native_input(x):
        return False
    return not (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks)


class QuantizedGrok(Grok):
    """A Grok whose decode step's hidden states (one new token a row, through a cache) come from one native
    call, `kernels.decode`: the cache's key_ok and the mask, the rows' RoPE tables (rows of tables kept
    here: rope_tables' for positions 0..P-1, the same numbers), all the blocks (`QuantizedLayers`' plan)
    and the final norm, and the embedding too where it is a plain bf16 nn.Embedding without hooks (any
    other runs as a module first); and whose int8 or int4 head gives its logits in one more
    (`unembed`), or, for a whole step (`next_logits`), in the same call. All with model.py's bits:
    Grok.hidden's and unembed's ~35 torch calls cost a step over a millisecond where the weights have
    just swept the caches. Anywhere else (a prompt, hooks, compiling, float blocks, ...) it is Grok."""

    def hidden(
        self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None, valid: Tensor | None = None
    ) -> Tensor:
        plan = self._decode_plan(tokens, cache, positions, valid)
        if plan is None:
            return super().hidden(tokens, cache, positions, valid)
        assert cache is not None and positions is not None
        return self._one_call(tokens, positions, cache, plan, 0, None).view(tokens.shape[0], 1, -1)

    def next_logits(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """As Grok.next_logits, the step and the head in one native call where `hidden` and `unembed` would each
        run as one (between the two, Python and the calls' own costs came to ~0.3 ms a step, cold); a head the
        kernel does not take runs after the step's call, through `unembed`."""
        steps, where = tokens[:, None], positions[:, None]
        plan = self._decode_plan(steps, cache, where, None)
        if plan is None:
            return super().next_logits(tokens, positions, cache)
        bits, head = self._native_head(_BF16)
        out = self._one_call(steps, where, cache, plan, bits, head)
        return out if head is not None else self.unembed(out)

    def _one_call(self, tokens: Tensor, positions: Tensor, cache: KVCache, plan: Plan, bits: int,
                  head: Weight | None) -> Tensor:  # fmt: skip
        """`kernels.decode` for tokens and positions [B, 1] through the layers' plan: hidden states [B, D], or
        with a head (`_native_head`'s), logits [B, V]."""
        c, b = self.config, tokens.shape[0]
        embed = self._modules["embed"]
        table = embed._parameters.get("weight") if type(embed) is nn.Embedding else None
        lookup = table is not None and embed.max_norm is None and table.dtype == torch.bfloat16
        lookup = lookup and table.is_contiguous() and not (embed._forward_hooks or embed._forward_pre_hooks)
        x = table if lookup else self.embed(tokens).reshape(b, -1).contiguous()  # bf16, as compute_dtype is
        temp = attn_temperature(positions, c)
        norms, weights, routers, settings = plan
        pad = -1 if c.pad_token is None else c.pad_token
        rows, where = tokens.reshape(b).contiguous(), positions.reshape(b).contiguous()
        return kernels.decode(rows, where, x, lookup, c.embedding_multiplier_scale, c.jax_rounding, pad, cache.key_ok,
                              self._rope(cache.slots), cache.k, cache.v, norms, weights, routers, self.norm.weight,
                              *settings, scale=None if temp is None else temp.reshape(b).contiguous(), head=head,
                              head_bits=bits, output_multiplier=c.output_multiplier_scale,
                              final_cap=c.final_softcap or 0.0)  # fmt: skip

    def unembed(self, h: Tensor) -> Tensor:
        """As Grok.unembed, in one native call (`kernels.unembed`) where the head is int8 or int4 without
        hooks and h is a step's bf16 CPU hidden states (~0.4 ms of torch calls a step, cold)."""
        bits, head = self._native_head(h)
        if head is None:
            return super().unembed(h)
        c = self.config
        logits = kernels.unembed(bits, h.reshape(-1, h.shape[-1]).contiguous(), head, c.output_multiplier_scale,
                                 c.jax_rounding, c.final_softcap or 0.0)  # fmt: skip
        return logits.view(*h.shape[:-1], -1)

    def _native_head(self, h: Tensor) -> tuple[int, Weight | None]:
        """The head's width and (weight, scales) where `kernels.unembed` takes it and h, else (0, None);
        whether the kernel takes the weights is worked out once for the tensors at hand."""
        head = self._modules["head"]
        bits = _LINEAR_BITS.get(type(head))
        if bits is None or head._forward_hooks or head._forward_pre_hooks or not _native_step(h):
            return 0, None
        weight = (head._buffers["weight"], head._buffers["scales"])
        cached = self.__dict__.get("_head")
        if cached is None or cached[0][0] is not weight[0] or cached[0][1] is not weight[1]:
            cached = (weight, kernels.supports_blocks() and kernels.supports_linear(bits, [weight]))
            self.__dict__["_head"] = cached
        return (bits, weight) if cached[1] else (0, None)

    def _decode_plan(
        self, tokens: Tensor, cache: KVCache | None, positions: Tensor | None, valid: Tensor | None
    ) -> Plan | None:
        """The layers' plan (`QuantizedLayers._decode_plan`) where this step runs as one `kernels.decode`
        call, else None: one new token a row, int64 tokens and positions on the CPU, no `valid`, no
        gradient (generate's and serve's inference mode), bf16 hidden states that the native kernels take,
        the final norm fp32 with the blocks' eps, and no hooks on the norm or layers."""
        if cache is None or positions is None or valid is not None or tokens.dim() != 2 or tokens.shape[1] != 1:
            return None
        if tokens.dtype != torch.long or positions.dtype != torch.long or positions.shape != tokens.shape:
            return None
        mods = self._modules
        norm, layers = mods["norm"], mods["layers"]
        if type(layers) is not QuantizedLayers or type(norm) not in (RMSNorm, NativeRMSNorm):
            return None
        if norm._parameters["weight"].dtype != torch.float32 or self.compute_dtype != torch.bfloat16:
            return None
        if torch.is_grad_enabled() or tokens.device.type != "cpu" or not _native_step(_BF16):
            return None
        if any(m._forward_hooks or m._forward_pre_hooks for m in (norm, layers)):
            return None
        plan = layers._decode_plan(cache)
        return plan if plan is not None and plan[3][1] == norm.eps else None

    def _rope(self, slots: int) -> tuple[Tensor, Tensor]:
        """cos, sin [P, Dh] for positions 0..P-1, P >= slots: rope_tables' numbers, made once per doubling."""
        table = self.__dict__.get("_rope_table")
        if table is None or table[0].shape[0] < slots:
            c = self.config
            cos, sin = rope_tables(torch.arange(max(64, 1 << (slots - 1).bit_length()))[None], c.key_size, c.rope_base)
            table = (cos[0], sin[0])
            self.__dict__["_rope_table"] = table
        return table


FUSED: dict[type[nn.Module], type[nn.Module]] = {
    Grok: QuantizedGrok,
    RMSNorm: NativeRMSNorm,
    MoE: QuantizedMoE,
    Attention: QuantizedAttention,
    Block: QuantizedBlock,
    Layers: QuantizedLayers,
}
"""The blocks `fuse` swaps, by exact class: a block another transform has swapped already (an expert-
parallel MoE, which holds a share of the experts the fused MoE kernel cannot route over) keeps its own."""


def fuse(model: nn.Module) -> nn.Module:
    """Give norms, attention, MoE, blocks, the decoder's layers and the model their fused native paths (each
    swapped for a module holding the same parameters, settings and hooks: state-dict names unchanged), in
    place; returns the model, or, where `model` is itself such a module (a Grok, a block), the new one.
    Only `qkv`, `attend`, the model's `hidden` and `unembed`, and the norms', the MoE's, the block's and the
    layers' `forward` differ, and they fall back to the plain ones wherever the kernels do not apply (float
    weights included)."""
    for name, module in list(model.named_modules()):
        kind = FUSED.get(type(module))
        if kind is not None and name:
            model.set_submodule(name, recast(module, kind))
    kind = FUSED.get(type(model))
    return model if kind is None else recast(model, kind)
