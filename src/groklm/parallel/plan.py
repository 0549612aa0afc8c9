"""The parallel plan: which part of every tensor a rank holds, and what each block does about it, in one
table keyed by module path (torchtitan's form). `LAYER_PLAN` holds a decoder layer's entries (paths
relative to the layer), `MODEL_PLAN` the model's own; modules with no entry (norms, routers) are held
whole by every rank. Global shapes are ours: [out, in] for linears, [E, out, in] for experts, scales
[.., out, G]; a style's `slices` gives a rank's slices of the logical (row-major) tensor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.model import ExpertLinear, Grok, TiedHead, recast
from groklm.parallel.modules import (
    ExpertParallelMoE,
    Groups,
    VocabParallelEmbedding,
    VocabParallelHead,
    reduce_hook,
)
from groklm.quant import Int4ExpertLinear, Int4Linear, Int8ExpertLinear, Int8Linear

Slices = tuple[slice, ...]
FULL = slice(None)


class ParallelError(ValueError):
    """A layout that cannot be made (named: which size does not divide which)."""


# -- styles: how a module is split --------------------------------------------------------------------


class Sharded:
    """A linear (float, int8, int4; stacked experts too) of which a rank holds a part: laid out as a
    module of the same kind holding that part (see `shard_module`)."""

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> Slices:
        raise NotImplementedError

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        return shard_module(model.get_submodule(name), name, p)


@dataclass(frozen=True)
class Colwise(Sharded):
    """Output rows split over tp: the rank's share of `rows` ("q", "kv", "ffn", "dense")."""

    rows: str

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> Slices:
        return (p.tp_share(self.rows), FULL)


@dataclass(frozen=True)
class Rowwise(Sharded):
    """Input columns split over tp (of size `cols`), the scales' groups with them: whole groups, or the
    one group a rank's columns lie in; the block's partial sums are added by its hook."""

    cols: str

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> Slices:
        n_in = p.size(self.cols)
        cols = p.tp_share(self.cols)
        return (FULL, cols if leaf == "weight" else _groups(cols, n_in, groups, module))


@dataclass(frozen=True)
class Experts(Sharded):
    """Stacked experts [E, ...]: whole experts over ep, each split over tp as `inner` says."""

    inner: Colwise | Rowwise

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> Slices:
        return (p.experts(), *self.inner.slices(p, leaf, shape[1:], groups, module))


@dataclass(frozen=True)
class VocabRows(Sharded):
    """The embedding table or the output head: vocabulary rows over tp; a lookup's rows summed, the
    logits gathered (`VocabParallelEmbedding`, `VocabParallelHead`)."""

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> Slices:
        return (p.vocab(), *([FULL] * (len(shape) - 1)))

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        vocab = p.vocab()
        if name == "embed":
            with torch.device("meta"):
                table = torch.empty(vocab.stop - vocab.start, p.config.emb_size, dtype=model.dtype)
            return VocabParallelEmbedding(table, vocab.start, groups)
        # (the embedding is swapped first: a tied head reads the rank's rows of the table)
        head = TiedHead(model.embed) if isinstance(model.head, TiedHead) else shard_module(model.head, name, p)
        return VocabParallelHead(head, groups)


class BlockStyle:
    """A block's behaviour under the plan (its parameters split by its children's entries)."""

    def slices(self, p: Plan, leaf: str, shape: tuple[int, ...], groups: int, module: str) -> None:
        return None  # (a block holds no tensors of its own)

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        raise NotImplementedError


class SumOutputs(BlockStyle):
    """Partial outputs (of row-parallel projections) added across the tp ranks by a forward hook."""

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        module = model.get_submodule(name)
        module.register_forward_hook(reduce_hook(groups.tp, groups.tp_size))
        return module


class LocalHeads(SumOutputs):
    """Attention over the rank's heads (the local config's, so KV caches hold those only)."""

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        module = super().apply(model, name, p, groups)
        module.config = p.local_config
        return module


class ExpertParallel(SumOutputs):
    """With ep > 1, the MoE holding the rank's experts (`ExpertParallelMoE`: quantized or not, whichever
    transform ran first), its output summed over every rank; otherwise as SumOutputs."""

    def apply(self, model: Grok, name: str, p: Plan, groups: Groups) -> nn.Module:
        if p.ep == 1:
            return super().apply(model, name, p, groups)
        return recast(model.get_submodule(name), ExpertParallelMoE, offset=p.experts().start, groups=groups)


Style = Sharded | BlockStyle

LAYER_PLAN: dict[str, Style] = {
    "attn": LocalHeads(),
    "attn.wq": Colwise("q"),
    "attn.wk": Colwise("kv"),
    "attn.wv": Colwise("kv"),
    "attn.wo": Rowwise("q"),
    "mlp": SumOutputs(),  # Grok-2's dense MLP
    "mlp.gate": Colwise("dense"),
    "mlp.up": Colwise("dense"),
    "mlp.down": Rowwise("dense"),
    "moe": ExpertParallel(),
    "moe.w1": Experts(Colwise("ffn")),
    "moe.v": Experts(Colwise("ffn")),
    "moe.w2": Experts(Rowwise("ffn")),
}
"""A decoder layer's plan, by module path within the layer (the reference's own sharding of the experts:
each expert's hidden dimension split, W1 and V by rows, W2 by columns)."""

MODEL_PLAN: dict[str, Style] = {"embed": VocabRows(), "head": VocabRows()}

_LAYER = re.compile(r"layers\.\d+\.")


def style_of(module: str) -> Style | None:
    """The plan's entry for a module path of the whole model (None: held whole)."""
    inner = _LAYER.match(module)
    return LAYER_PLAN.get(module[inner.end() :]) if inner else MODEL_PLAN.get(module)


# -- a rank's plan ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """One rank's place in a tp x ep layout of a model: the sizes and ranges the styles split by."""

    config: GrokConfig
    tp: int
    ep: int
    tp_rank: int = 0
    ep_rank: int = 0

    @property
    def local_config(self) -> GrokConfig:
        c = self.config
        return c.replace(num_q_heads=c.num_q_heads // self.tp, num_kv_heads=max(1, c.num_kv_heads // self.tp))

    def size(self, what: str) -> int:
        c = self.config
        return {"q": c.q_size, "kv": c.kv_size, "ffn": c.ffn_size, "dense": c.dense_ffn_size or 0}[what]

    def tp_share(self, what: str) -> slice:
        """The rank's rows of `what` ("q", "kv", "ffn", "dense"). With more ranks than kv heads, tp / K
        ranks share each kv head."""
        c = self.config
        if what == "kv" and self.tp > c.num_kv_heads:
            head = self.tp_rank // (self.tp // c.num_kv_heads)
            return slice(head * c.key_size, (head + 1) * c.key_size)
        return _range(self.size(what), self.tp, self.tp_rank)

    def experts(self) -> slice:
        return _range(self.config.num_experts, self.ep, self.ep_rank)

    def vocab(self) -> slice:
        return _range(self.config.vocab_size, self.tp, self.tp_rank)

    def slices(self, name: str, shape: tuple[int, ...], groups: int | None = None) -> Slices | None:
        """The rank's slices of tensor `name` of the whole model (logical shape `shape`; `groups`: the
        scale groups of an int8/int4 weight's input, for its `.scales`), or None where it holds all of it."""
        module, _, leaf = name.rpartition(".")
        style = style_of(module)
        return None if style is None else style.slices(self, leaf, shape, groups or shape[-1], module)


def _range(n: int, parts: int, rank: int) -> slice:
    return slice(n * rank // parts, n * (rank + 1) // parts)


def _groups(cols: slice, n_in: int, groups: int, name: str = "") -> slice:
    """The scale groups covering input columns `cols`: whole blocks, or the one block they lie in."""
    block = n_in // groups
    start, stop = cols.start, cols.stop
    if start % block == 0 and stop % block == 0:
        return slice(start // block, stop // block)
    if start // block == (stop - 1) // block:
        return slice(start // block, start // block + 1)
    raise ParallelError(
        f"{name or 'a weight'}: a rank's input columns {start}..{stop} of {n_in} cut its scale groups of "
        f"{block} (int4 groups must fit whole in a rank's share: a smaller group size, or another tp)"
    )


def plan(config: GrokConfig, tp: int, ep: int, tp_rank: int = 0, ep_rank: int = 0) -> Plan:
    """Check that tp x ep can split this model, naming what does not divide; the Plan if it can."""
    c = config
    for name, n in (("tp", tp), ("ep", ep)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ParallelError(f"{name}={n!r} is not a positive integer")
    problems = []
    if c.num_q_heads % tp:
        problems.append(f"tp={tp} does not divide the {c.num_q_heads} query heads")
    if tp <= c.num_kv_heads and c.num_kv_heads % tp:
        problems.append(f"tp={tp} does not divide the {c.num_kv_heads} kv heads")
    if tp > c.num_kv_heads and tp % c.num_kv_heads:
        problems.append(f"tp={tp} is not a multiple of the {c.num_kv_heads} kv heads (to replicate them)")
    if c.num_experts % ep:
        problems.append(f"ep={ep} does not divide the {c.num_experts} experts")
    if c.vocab_size % tp:
        problems.append(f"tp={tp} does not divide the vocabulary of {c.vocab_size}")
    for what, n, blocks in (("expert hidden size", c.ffn_size, 8), ("query size", c.q_size, 8),
                            ("dense MLP size", c.dense_ffn_size, 8)):  # fmt: skip
        if n is None:
            continue
        if n % tp:
            problems.append(f"tp={tp} does not divide the {what} {n}")
            continue
        block, part = n // blocks, n // tp
        if n % blocks == 0 and part % block and block % part:
            problems.append(f"tp={tp} splits the {what} {n} across its {blocks} int8 scale blocks of {block}")
    if problems:
        raise ParallelError("; ".join(problems))
    return Plan(config, tp, ep, tp_rank, ep_rank)


# -- laying out a shard -------------------------------------------------------------------------------


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """An int8/int4 module's weight as [.., out, in] (int4: in counts columns, not packed bytes)."""
    w, s = module.weight, module.scales
    if isinstance(module, (Int4Linear, Int4ExpertLinear)):  # in rows or in panels
        return (*s.shape[:-1], kernels.in_features(w, s))
    if w.dim() == s.dim() + 1:  # block-major [.., G, out, in/G]
        return (*w.shape[:-3], w.shape[-2], w.shape[-3] * w.shape[-1])
    return tuple(w.shape)


def _local_shape(shape: tuple[int, ...], slices: Slices | None) -> tuple[int, ...]:
    if slices is None:
        return shape
    return tuple((s.stop - s.start) if s != FULL else n for n, s in zip(shape, slices, strict=True))


def shard_module(module: nn.Module, name: str, p: Plan) -> nn.Module:
    """The rank's share of a linear (float, int8, int4; stacked experts too), laid out on the meta
    device as a module of the same kind (int8 block-major with the groups its slice keeps)."""
    weight = module.weight
    if isinstance(module, (nn.Linear, ExpertLinear)):
        shape = _local_shape(tuple(weight.shape), p.slices(f"{name}.weight", tuple(weight.shape)))
        with torch.device("meta"):
            if isinstance(module, nn.Linear):
                return nn.Linear(shape[1], shape[0], bias=False, dtype=weight.dtype).requires_grad_(False)
            return ExpertLinear(shape[0], shape[2], shape[1], weight.dtype).requires_grad_(False)
    scales = module.scales
    shape = logical_shape(module)
    w_shape = _local_shape(shape, p.slices(f"{name}.weight", shape))
    s_shape = _local_shape(tuple(scales.shape), p.slices(f"{name}.scales", tuple(scales.shape), scales.shape[-1]))
    groups, (out_f, in_f) = s_shape[-1], w_shape[-2:]
    stacked = isinstance(module, (Int8ExpertLinear, Int4ExpertLinear))
    with torch.device("meta"):
        if isinstance(module, (Int4Linear, Int4ExpertLinear)):
            return (Int4ExpertLinear(w_shape[0], in_f, out_f, in_f // groups, scales.dtype) if stacked
                    else Int4Linear(in_f, out_f, in_f // groups, scales.dtype))  # fmt: skip
        if stacked:
            return Int8ExpertLinear(w_shape[0], in_f, out_f, groups, scales.dtype)
        return Int8Linear(in_f, out_f, groups, scales.dtype, block_major=weight.dim() == scales.dim() + 1)


def lay_out(model: Grok, p: Plan, groups: Groups) -> Grok:
    """Apply the plan to `model` (on the meta device) in place, in module order (a block before its
    children): every module with an entry swapped for, or made into, the rank's share of it."""
    for name, _ in list(model.named_modules()):
        style = style_of(name)
        if style is not None:
            model.set_submodule(name, style.apply(model, name, p, groups))
    model.config = p.local_config
    return model
