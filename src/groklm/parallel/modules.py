"""The modules and hooks a parallel plan adds: collectives (timed, for `benchmarks/parallel.py`), the
vocabulary-parallel embedding and head, and the expert-parallel MoE.

Expert parallel is "all-gather and local selection": activations are the same on every rank (attention
is tensor-parallel or replicated), so each rank runs its own experts on the tokens that chose them and
the sum over ranks is the MoE's output; its only communication is the all-reduce tp already needs (an
all-to-all would move the tokens twice).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from groklm.model import MoE


@dataclass
class Groups:
    tp: Any = None  # process groups (None: a single rank)
    ep: Any = None
    world: Any = None
    tp_size: int = 1
    world_size: int = 1


def _all_reduce(t: Tensor, group: Any, size: int) -> Tensor:
    if size > 1:
        dist.all_reduce(t, group=group)
    return t


class Stats:
    """Time spent in and bytes moved by the collectives (for `benchmarks/parallel.py`)."""

    seconds = 0.0
    bytes = 0
    calls = 0


def _timed(fn: Callable[[], Any], nbytes: int) -> Any:
    t = time.perf_counter()
    out = fn()
    Stats.seconds += time.perf_counter() - t
    Stats.bytes += nbytes
    Stats.calls += 1
    return out


def reduce_hook(group: Any, size: int) -> Callable[..., Tensor]:
    """A forward hook adding a row-parallel block's partial outputs across `group`, in fp32 (each rank's
    partial is rounded once, as one rank rounds its whole sum; the sum itself is not rounded again)."""

    def hook(_module: nn.Module, _args: Any, out: Tensor) -> Tensor:
        if size == 1:
            return out
        total = out.float()
        _timed(lambda: dist.all_reduce(total, group=group), total.numel() * total.element_size())
        return total.to(out.dtype)

    return hook


class VocabParallelEmbedding(nn.Module):
    """Rows start..stop of the table; a lookup's rows outside them are zeros, added up across tp ranks."""

    def __init__(self, weight: Tensor, start: int, groups: Groups) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.groups = start, groups

    def forward(self, tokens: Tensor) -> Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        rows = self.weight[local.clamp(0, self.weight.shape[0] - 1)] * inside[..., None].to(self.weight.dtype)
        if self.groups.tp_size > 1:
            _timed(lambda: dist.all_reduce(rows, group=self.groups.tp), rows.numel() * rows.element_size())
        return rows


class VocabParallelHead(nn.Module):
    """The output head's rows for a vocabulary slice (its own module: float, int8 or int4; or the tied
    local embedding), each rank's logits all-gathered into the full vocabulary."""

    def __init__(self, local: nn.Module, groups: Groups) -> None:
        super().__init__()
        self.local, self.groups = local, groups

    def forward(self, h: Tensor) -> Tensor:
        logits = self.local(h)
        n = self.groups.tp_size
        if n == 1:
            return logits
        parts = [torch.empty_like(logits) for _ in range(n)]
        _timed(lambda: dist.all_gather(parts, logits.contiguous(), group=self.groups.tp),
               logits.numel() * logits.element_size() * (n - 1))  # fmt: skip
        return torch.cat(parts, dim=-1)


class ExpertParallelMoE(MoE):
    """An MoE holding experts `offset` .. `offset + local` only: it routes over all of them (the router
    is whole), runs the ones it holds on the tokens that chose them, and adds the other ranks' in fp32
    (one all-reduce over every rank: the tp ranks' partial sums too), rounding once, as one rank does.

    Quantized or not, it runs its experts one by one, each through its own linears (native int8/int4
    matmuls where they apply): the fused MoE kernel routes over, and reads, every expert it is given.
    It is what the plan makes of an MoE (plain or `QuantizedMoE`) and what `quant.fuse` leaves as it
    is, so quantizing before or after parallelizing gives the same module."""

    offset: int
    groups: Groups

    def forward(self, x: Tensor) -> Tensor:
        xs = x.reshape(-1, x.shape[-1])
        gates, experts = self.route(xs)
        out = torch.zeros(xs.shape, dtype=torch.float32, device=xs.device)
        flat, weights = experts.flatten(), gates.flatten()  # pair p is token p // k
        for e in range(self.w1.weight.shape[0]):
            pick = torch.nonzero(flat == self.offset + e).flatten()
            if pick.numel():
                rows = pick // self.top_k
                xe = xs[rows]
                h = torch.nn.functional.gelu(self.w1(xe, e), approximate=self.approximate) * self.v(xe, e)
                # (a token's two terms add in expert order here, by probability in MoE: fp32 a + b = b + a)
                out.index_add_(0, rows, self.w2(h, e).float() * weights[pick, None])
        g = self.groups
        if g.world_size > 1:
            _timed(lambda: dist.all_reduce(out, group=g.world), out.numel() * out.element_size())
        return out.to(x.dtype).view(x.shape)
