"""Grok-1 (xAI, 2024) and Grok-2 (2025): decoder-only Mixture-of-Experts transformers, faithful to their
references: Grok-1 to xAI's JAX code (`shared/spec/grok1.md`), Grok-2 to SGLang (`shared/spec/grok2.md`).

Grok-2's differences are switched on by optional parts of the config, each off for Grok-1: a dense
GELU MLP beside the MoE (`dense_ffn_size`), the router's cap, erf GELU, the attention temperature past
`attn_temperature_len`, the final logit cap, an untied output head, and torch's roundings
(`jax_rounding`). Where a peer port differs from a reference, the reference wins. Quantization,
parallelism and compilation are transforms applied to a built model elsewhere; this file knows
nothing of them beyond calling its submodules.

Shape letters: B batch, T tokens in this call, S cache slots, D width, H query heads, K kv heads,
G query heads per kv head (H = K * G), Dh head size, E experts, F expert hidden size, V vocabulary,
N tokens in a flat batch, P routed (token, expert) pairs (N * experts chosen per token).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from groklm.config import GrokConfig

M = TypeVar("M", bound=nn.Module)

# The reference masks attention logits with this finite value (not -inf), so a query that sees no
# valid key gets a uniform softmax instead of NaN.
MASK_VALUE = -1e30


@dataclass
class KVCache:
    """Preallocated rotated keys and values of every layer, written by position.

    Each row of the batch has its own positions. Example: prompts of lengths 3 and 5 prefilled
    together are right-padded to 5 with the pad token and written at positions 0..4 of both rows;
    row 0's slots 3 and 4 hold padding, which `key_ok` marks as unusable. The first decode step then
    writes row 0 at position 3 and row 1 at position 5, so every prompt starts at position 0 and
    sees exactly what it would see alone.
    """

    k: list[Tensor]  # per layer [B, S, K, Dh]
    v: list[Tensor]  # per layer [B, S, K, Dh]
    key_ok: Tensor  # [B, S] bool: slot written with a non-pad token

    @classmethod
    def allocate(
        cls, config: GrokConfig, batch: int, slots: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        # One tensor per layer, not one [L, ...] tensor: torch.compile then writes each in place (a
        # write into a view of one big input makes it copy the whole cache every step).
        shape = (batch, slots, config.num_kv_heads, config.key_size)
        return cls(
            k=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
            v=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)],
            key_ok=torch.zeros(batch, slots, dtype=torch.bool, device=device),
        )

    @property
    def slots(self) -> int:
        return self.key_ok.shape[1]

    def prefix(self, slots: int) -> KVCache:
        """The first `slots` slots, as views: writes land in this cache. A decode step through the
        prefix that holds every position in use attends over those slots only, not the whole
        allocation (under torch.compile the length is a dynamic dimension: one graph serves all)."""
        return KVCache([k[:, :slots] for k in self.k], [v[:, :slots] for v in self.v], self.key_ok[:, :slots])

    def rows(self, start: int, stop: int) -> KVCache:
        """Batch rows start..stop-1, as views (a server keeps one row per request)."""
        return KVCache([k[start:stop] for k in self.k], [v[start:stop] for v in self.v], self.key_ok[start:stop])

    def copy_rows(self, src: list[int], dst: list[int], slots: int) -> None:
        """Row dst[i] takes row src[i]'s first `slots` slots (all sources read before any write, so
        src = [a, b], dst = [b, a] swaps two rows)."""
        s, d = torch.tensor(src), torch.tensor(dst)
        for t in (*self.k, *self.v, self.key_ok):
            t[d, :slots] = t[s, :slots]


def _scaled(x: Tensor, multiplier: float, jax_rounding: bool) -> Tensor:
    # Grok-1's reference multiplies a bf16 activation by a weakly-typed Python float, which JAX rounds
    # to bf16 first (78.38 -> 78.5): rounding the multiplier to the activation dtype reproduces that.
    # torch (SGLang, Grok-2) multiplies in fp32 and rounds the product once.
    if jax_rounding:
        return x * torch.tensor(multiplier, dtype=x.dtype, device=x.device)
    return x * multiplier


def capped(x: Tensor, cap: float) -> Tensor:
    """The soft cap `cap * tanh(x / cap)`: x squashed into (-cap, cap)."""
    return cap * torch.tanh(x / cap)


def recast(module: nn.Module, kind: type[M], **settings: Any) -> M:
    """A new module of class `kind` holding `module`'s parameters, buffers, submodules, settings and
    hooks (so its state-dict names are unchanged), plus `settings`: how a transform gives a module
    another forward. `kind` must add methods only; `module` itself is left as it was."""
    new = kind.__new__(kind)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(module).items()})
    new.__dict__.update(settings)
    return new


class RMSNorm(nn.Module):
    """`scale * x * rsqrt(mean(x^2) + eps)` in fp32; the stored scale multiplies directly (not 1 + scale).
    For bf16 on the CPU (where the native kernels run) the squares are summed in fp64 and the mean rounded
    to fp32 once: the squares of fp32 numbers are exact in fp64, so any order of summing them (torch's, or
    the fused decode block's loop, `quant.fused_step.QuantizedBlock`) rounds to the same fp32 mean, and the two
    paths agree bit for bit. The choice depends on the dtype only, never on autograd's mode, so a model
    gives the same bits under `no_grad` and without."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        acc = torch.float64 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else torch.float32
        normed = xf * torch.rsqrt(xf.to(acc).square().mean(-1, keepdim=True).float() + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def rope_tables(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, Dh] in fp32 for integer positions [B, T]; frequencies tiled twice (rotate-half)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    phase = positions.float()[..., None] * inv_freq  # [B, T, Dh/2]
    phase = torch.cat([phase, phase], dim=-1)  # [B, T, Dh]
    return phase.cos(), phase.sin()


def attn_temperature(positions: Tensor, config: GrokConfig) -> Tensor | None:
    """Grok-2's attention temperature for query positions [B, T]: log2(p) / log2(L) past L
    (`attn_temperature_len`), 1 up to it, as [B, 1, 1, T, 1] fp32; None for Grok-1 (no L)."""
    if config.attn_temperature_len is None:
        return None
    p = positions.float()
    ratio = torch.log2(p.clamp_min(1.0)) / math.log2(config.attn_temperature_len)
    return torch.where(positions > config.attn_temperature_len, ratio, torch.ones_like(p))[:, None, None, :, None]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, ..., Dh]; cos/sin [B, T, Dh]. Rotate-half layout, computed in fp32."""
    extra = x.dim() - cos.dim()
    cos = cos.view(*cos.shape[:2], *([1] * extra), cos.shape[-1])
    sin = sin.view(*sin.shape[:2], *([1] * extra), sin.shape[-1])
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: GrokConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        d = config.emb_size
        self.wq = nn.Linear(d, config.q_size, bias=False, dtype=dtype)
        self.wk = nn.Linear(d, config.kv_size, bias=False, dtype=dtype)
        self.wv = nn.Linear(d, config.kv_size, bias=False, dtype=dtype)
        self.wo = nn.Linear(config.q_size, d, bias=False, dtype=dtype)

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The query, key and value projections of x [B, T, D]."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        kv: tuple[Tensor, Tensor] | None,
        where: tuple[Tensor, Tensor],
        temp: Tensor | None = None,
    ) -> Tensor:
        """x [B, T, D]; mask [B, 1, 1, T, S] (S = T without a cache); kv: this layer's cache
        [B, S, K, Dh], written at `where` = (row index [B, 1], positions [B, T]); temp [B, 1, 1, T, 1]:
        each query's attention temperature (Grok-2), or None."""
        c = self.config
        b, t, _ = x.shape
        kh, g, dh = c.num_kv_heads, c.num_q_heads // c.num_kv_heads, c.key_size
        q, k, v = self.qkv(x)
        # Query head j reads kv head j // G: splitting H as (K, G) puts it there.
        q = apply_rope(q.view(b, t, kh, g, dh), cos, sin)
        k = apply_rope(k.view(b, t, kh, dh), cos, sin)
        v = v.view(b, t, kh, dh)
        if kv is not None:
            cache_k, cache_v = kv
            cache_k[where] = k
            cache_v[where] = v
            k, v = cache_k, cache_v  # [B, S, K, Dh]
        return self.wo(self.attend(q, k, v, mask, temp))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, temp: Tensor | None = None) -> Tensor:
        """q [B, T, K, G, Dh] and k, v [B, S, K, Dh] (rotated), mask [B, 1, 1, T, S], temp [B, 1, 1, T, 1]
        or None -> [B, T, K * G * Dh]."""
        c = self.config
        b, t = q.shape[:2]
        # Attention logits, soft-cap, mask and softmax in fp32, as the reference does. The matmuls
        # run in fp32 on the bf16 values (products of bf16 numbers are exact in fp32, and CPU bf16
        # matmuls are slow); Grok-1's reference rounds their results to the compute dtype (its bf16
        # einsums), SGLang's kernels keep them in fp32. Grok-2 then scales the capped logits by its
        # temperature, before the mask. On the CPU all of it runs in fp64 and is rounded where the
        # reference rounds: the bf16 products are exact in fp64, and so, short of a 2^37 spread in their
        # sizes, are their sums, and a last-bit difference in tanh or exp there almost never survives
        # the rounding. A row's result then does not depend on the shapes at hand, so a prompt
        # prefilled in chunks (a server's) gets the bits it gets whole; in fp32 it did not (on a
        # Skylake-SP): MKL's order changes with the shapes, and elementwise ops compute a tensor's
        # last few elements with scalar, not vector, tanh and exp.
        acc = torch.float64 if q.device.type == "cpu" else torch.float32
        scores = torch.einsum("btkgd,bskd->bkgts", q.to(acc), k.to(acc))
        if c.jax_rounding:
            scores = scores.to(q.dtype).to(acc)
        scores = capped(scores * c.attn_output_multiplier, c.attn_softcap)
        if temp is not None:
            scores = scores * temp
        scores = scores.masked_fill(~mask, MASK_VALUE)
        probs = scores.softmax(dim=-1).to(v.dtype).to(acc)  # [B, K, G, T, S], rounded as the reference
        return torch.einsum("bkgts,bskd->btkgd", probs, v.to(acc)).float().to(v.dtype).reshape(b, t, c.q_size)


class ExpertLinear(nn.Module):
    """E stacked [out, in] weights; `forward(x, e)` applies expert e only."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, dtype=dtype))
        if self.weight.device.type != "meta":  # on meta, init runs torch._refs, which import torch._dynamo
            nn.init.normal_(self.weight, std=in_features**-0.5)

    def forward(self, x: Tensor, expert: int) -> Tensor:
        return F.linear(x, self.weight[expert])


class MLP(nn.Module):
    """Grok-2's dense MLP beside the MoE: down(gelu(gate(x)) * up(x)), erf GELU (SGLang's CUDA path)."""

    def __init__(self, config: GrokConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, f = config.emb_size, config.dense_ffn_size or 0
        self.approximate = "none" if config.gelu == "erf" else "tanh"
        self.gate = nn.Linear(d, f, bias=False, dtype=dtype)
        self.up = nn.Linear(d, f, bias=False, dtype=dtype)
        self.down = nn.Linear(f, d, bias=False, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.gate(x), approximate=self.approximate) * self.up(x))


class MoE(nn.Module):
    """Softmax router over all experts (its logits capped for Grok-2), top-k by probability, gates NOT
    renormalised, GELU experts (tanh approximation for Grok-1, erf for Grok-2).

    Tokens are grouped by the expert they chose and each expert runs once on its group: a token
    costs the compute of its chosen experts only, never all of them.
    """

    def __init__(self, config: GrokConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.top_k, self.num_experts = config.num_selected_experts, config.num_experts
        self.router_softcap = config.router_softcap
        self.approximate = "none" if config.gelu == "erf" else "tanh"
        d, f, e = config.emb_size, config.ffn_size, config.num_experts
        self.router = nn.Linear(d, e, bias=False, dtype=torch.float32)
        self.w1 = ExpertLinear(e, d, f, dtype)  # gelu branch (reference moe/linear)
        self.v = ExpertLinear(e, d, f, dtype)  # linear branch (reference moe/linear_v)
        self.w2 = ExpertLinear(e, f, d, dtype)  # down projection (reference moe/linear_1)

    def forward(self, x: Tensor) -> Tensor:
        xs = x.reshape(-1, x.shape[-1])  # [N, D]
        gates, experts = self.route(xs)
        return self.experts(xs, gates, experts).view(x.shape)

    def route(self, xs: Tensor) -> tuple[Tensor, Tensor]:
        """xs [N, D] -> gates [N, k] (fp32 probabilities) and expert ids [N, k]."""
        logits = self.router(xs.float())  # [N, E], fp32
        if self.router_softcap is not None:
            logits = capped(logits, self.router_softcap)
        return logits.softmax(dim=-1).topk(self.top_k, dim=-1)

    def experts(self, xs: Tensor, gates: Tensor, experts: Tensor) -> Tensor:
        """sum over j of gates[:, j] * expert experts[:, j] (xs) -> [N, D]."""
        flat = experts.flatten()  # [P], pair p = token p // k
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        grouped = xs[order // self.top_k]  # [P, D]
        outs = torch.empty_like(grouped)
        start = 0
        for e, n in enumerate(counts):
            if n:
                xe = grouped[start : start + n]
                h = F.gelu(self.w1(xe, e), approximate=self.approximate) * self.v(xe, e)
                outs[start : start + n] = self.w2(h, e)
                start += n
        pairs = torch.empty(outs.shape, dtype=torch.float32, device=xs.device)
        pairs[order] = outs.float() * gates.flatten()[order, None]
        return pairs.view(-1, self.top_k, xs.shape[-1]).sum(dim=1).to(xs.dtype)


class Block(nn.Module):
    """Sandwich norms: each sub-block's input and output are normalised, each norm with its own scale.
    With Grok-2's dense MLP, the MoE's output is (MLP(x) + MoE(x)) / sqrt(2) (SGLang's residual MoE)."""

    def __init__(self, config: GrokConfig, dtype: torch.dtype) -> None:
        super().__init__()
        eps = config.norm_eps
        self.attn_norm = RMSNorm(config.emb_size, eps)  # reference rms_norm
        self.attn = Attention(config, dtype)
        self.attn_out_norm = RMSNorm(config.emb_size, eps)  # reference rms_norm_1
        self.moe_norm = RMSNorm(config.emb_size, eps)  # reference rms_norm_2
        self.moe = MoE(config, dtype)
        self.mlp = MLP(config, dtype) if config.dense_ffn_size is not None else None
        self.moe_out_norm = RMSNorm(config.emb_size, eps)  # reference rms_norm_3

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
        h = h + self.attn_out_norm(self.attn(self.attn_norm(h), cos, sin, mask, kv, where, temp))
        x = self.moe_norm(h)
        f = self.moe(x)
        if self.mlp is not None:
            f = (self.mlp(x) + f) / math.sqrt(2)
        return h + self.moe_out_norm(f)


class Layers(nn.ModuleList):
    """The decoder's blocks, run in order, each with its layer of the cache: a module of its own so that a
    transform can run them as one (`quant.fused_step` does, for eager decode)."""

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
        for i, layer in enumerate(self):
            h = layer(h, cos, sin, mask, None if cache is None else (cache.k[i], cache.v[i]), where, temp)
        return h


class TiedHead(nn.Module):
    """The output projection: the input embedding's table, transposed. Holds no weights of its own
    (the embedding is kept out of the module tree, so state dicts name it once)."""

    def __init__(self, embed: nn.Embedding) -> None:
        super().__init__()
        self._embed = [embed]

    def forward(self, h: Tensor) -> Tensor:
        return h @ self._embed[0].weight.T


class Grok(nn.Module):
    def __init__(self, config: GrokConfig, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        self.config = config
        self.compute_dtype = dtype
        # Stored in the compute dtype: the reference casts its fp32 table to bf16 before use anyway.
        table = torch.empty(config.vocab_size, config.emb_size, dtype=dtype)
        self.embed = nn.Embedding(config.vocab_size, config.emb_size, _weight=table)
        if self.embed.weight.device.type != "meta":  # as ExpertLinear's
            nn.init.normal_(self.embed.weight)
        self.layers = Layers(Block(config, dtype) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.emb_size, config.norm_eps)
        # Tied (Grok-1): a transform may swap in a cheaper copy (quant.quantize_output_head). Grok-2's is its own.
        self.head: nn.Module = (
            TiedHead(self.embed)
            if config.tie_embeddings
            else nn.Linear(config.emb_size, config.vocab_size, bias=False, dtype=dtype)
        )

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def forward(
        self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None, valid: Tensor | None = None
    ) -> Tensor:
        """tokens [B, T] -> fp32 logits [B, T, V]."""
        return self.unembed(self.hidden(tokens, cache, positions, valid))

    def next_logits(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """A decode step: tokens [B] at positions [B], one new token a row, through the cache -> fp32 logits
        [B, V] for the next token (a transform may run it as one call: `quant.fused_step`)."""
        return self.unembed(self.hidden(tokens[:, None], cache, positions[:, None])[:, 0])

    def hidden(
        self, tokens: Tensor, cache: KVCache | None = None, positions: Tensor | None = None, valid: Tensor | None = None
    ) -> Tensor:
        """tokens [B, T] -> final-normed hidden states [B, T, D].

        Without a cache the tokens are a whole sequence from position 0. With one, `positions`
        [B, T] says where each token goes (and reads up to); keys and values are written there.
        `valid` [B, T] marks the tokens that are real (right-padding is not); pad tokens are never
        attended to where the config names one (Grok-1's reference masks them).
        """
        c = self.config
        b, t = tokens.shape
        if positions is None:
            if cache is not None:
                raise ValueError("decoding through a cache needs explicit positions")
            positions = torch.arange(t, device=tokens.device).expand(b, t)
        rows = torch.arange(b, device=tokens.device)[:, None]  # [B, 1]
        not_pad = tokens != c.pad_token if c.pad_token is not None else torch.ones_like(tokens, dtype=torch.bool)
        if valid is not None:
            not_pad = not_pad & valid
        if cache is None:
            key_ok, key_pos = not_pad, positions
        else:
            cache.key_ok[rows, positions] = not_pad
            key_ok = cache.key_ok
            key_pos = torch.arange(cache.slots, device=tokens.device).expand(b, -1)
        mask = key_ok[:, None, :] & (key_pos[:, None, :] <= positions[:, :, None])  # [B, T, S]
        mask = mask[:, None, None]  # [B, 1, 1, T, S]
        cos, sin = rope_tables(positions, c.key_size, c.rope_base)
        temp = attn_temperature(positions, c)
        h = _scaled(self.embed(tokens), c.embedding_multiplier_scale, c.jax_rounding)
        h = self.layers(h, cos, sin, mask, cache, (rows, positions), temp)
        return self.norm(h)

    def unembed(self, h: Tensor) -> Tensor:
        """The output head, the output multiplier, and Grok-2's final soft-cap (in fp32): [..., D] ->
        fp32 logits [..., V]."""
        c = self.config
        logits = _scaled(self.head(h), c.output_multiplier_scale, c.jax_rounding).float()
        return logits if c.final_softcap is None else capped(logits, c.final_softcap)
