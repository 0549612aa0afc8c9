"""Tensor and expert parallel over torch.distributed, as a transform: `parallelize(model, mesh) -> model`.

The mesh is a DeviceMesh with named dims ("ep", "tp"), ep x tp ranks (either may be 1). Each rank
keeps its share of the model; the model file knows nothing of it:

- tp, attention: whole kv-head groups a rank (q, k and v column-parallel: a rank's query heads are
  the ones that read its kv heads); the output projection row-parallel, its partial sums added by one
  all-reduce. The KV cache holds a rank's kv heads only (the local config's). With more ranks than
  kv heads, kv heads are replicated: tp / K ranks share each.
- tp, experts: each expert's hidden dimension split (the reference's own sharding): W1 and V by
  rows, W2 by columns, the MoE's partial sums added by one all-reduce. Grok-2's dense MLP likewise.
  Int8 weights with row-blocked scales (the attention output, the down projections) are split where
  whole scale blocks stay together (or within one block, which then keeps its scale).
- ep: each rank holds whole experts (E / ep). Activations are the same on every rank (attention is
  tensor-parallel or replicated), so each rank runs its own experts on the tokens that chose them
  and the sum over ranks is the MoE's output: "all-gather and local selection", whose only
  communication is the all-reduce tp already needs (an all-to-all would move the tokens twice).
- the embedding and the output head are split over the vocabulary: a lookup's partial rows (zeros
  outside a rank's range) are added by an all-reduce, and each rank's slice of the logits is
  all-gathered, so every rank has the full logits and samples the same token.

`plan(config, tp, ep)` checks a layout before anything is loaded; `groklm.load(..., tp=, ep=)` builds
the rank's share on the meta device and reads only its bytes (see `load_sharded`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from groklm import kernels
from groklm.config import GrokConfig
from groklm.formats.common import BlockMajorArray, TensorArray
from groklm.model import MLP, Attention, ExpertLinear, Grok, MoE, TiedHead
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    block_major,
    from_panels,
    is_panels,
    scales_from_panels,
)

Slices = tuple[slice, ...]


class ParallelError(ValueError):
    """A layout that cannot be made (named: which size does not divide which)."""


@dataclass(frozen=True)
class Plan:
    """Which part of every parameter a rank holds. Global shapes are ours: [out, in] for linears,
    [E, out, in] for experts, scales [.., out, G]; `slices(name, shape)` gives the rank's slices of
    the logical (row-major) tensor, or None where it holds all of it."""

    config: GrokConfig
    tp: int
    ep: int
    tp_rank: int = 0
    ep_rank: int = 0

    @property
    def local_config(self) -> GrokConfig:
        c = self.config
        return c.replace(num_q_heads=c.num_q_heads // self.tp, num_kv_heads=max(1, c.num_kv_heads // self.tp))

    def _range(self, n: int, parts: int, rank: int) -> slice:
        return slice(n * rank // parts, n * (rank + 1) // parts)

    def q_rows(self) -> slice:
        c = self.config
        return self._range(c.q_size, self.tp, self.tp_rank)

    def kv_rows(self) -> slice:
        c = self.config
        if self.tp <= c.num_kv_heads:
            return self._range(c.kv_size, self.tp, self.tp_rank)
        head = self.tp_rank // (self.tp // c.num_kv_heads)  # tp > K: tp / K ranks share one kv head
        return slice(head * c.key_size, (head + 1) * c.key_size)

    def experts(self) -> slice:
        return self._range(self.config.num_experts, self.ep, self.ep_rank)

    def vocab(self) -> slice:
        return self._range(self.config.vocab_size, self.tp, self.tp_rank)

    def slices(self, name: str, shape: tuple[int, ...], groups: int | None = None) -> Slices | None:
        """The rank's slices of parameter `name` (logical shape `shape`; `groups`: the scale groups of
        an int8/int4 weight's input, for its `.scales`)."""
        c = self.config
        module, _, leaf = name.rpartition(".")
        last = module.rpartition(".")[2]
        full = slice(None)
        tp_rows = self._range  # (for brevity below)
        if name in ("embed.weight", "head.weight", "head.scales"):
            return (self.vocab(), *([full] * (len(shape) - 1)))
        if last in ("wq", "wk", "wv"):
            rows = self.q_rows() if last == "wq" else self.kv_rows()
            return (rows, full)
        if last in ("wo", "down"):  # row-parallel: the input split
            n_in = c.q_size if last == "wo" else c.dense_ffn_size or 0
            cols = tp_rows(n_in, self.tp, self.tp_rank)
            return (full, cols if leaf == "weight" else self._groups(cols, n_in, groups or shape[-1], module))
        if last in ("gate", "up"):
            return (tp_rows(shape[0], self.tp, self.tp_rank), full)
        if last in ("w1", "v"):  # [E, F, D]: experts over ep, F over tp
            return (self.experts(), tp_rows(c.ffn_size, self.tp, self.tp_rank), full)
        if last == "w2":  # [E, D, F]
            cols = tp_rows(c.ffn_size, self.tp, self.tp_rank)
            return (
                self.experts(),
                full,
                cols if leaf == "weight" else self._groups(cols, c.ffn_size, groups or shape[-1], module),
            )
        return None  # norms, routers: every rank holds them whole

    @staticmethod
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


# -- communication ----------------------------------------------------------------------------------


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
    import time

    t = time.perf_counter()
    out = fn()
    Stats.seconds += time.perf_counter() - t
    Stats.bytes += nbytes
    Stats.calls += 1
    return out


def _reduce_hook(group: Any, size: int) -> Callable[..., Tensor]:
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
    (one all-reduce over every rank: the tp ranks' partial sums too), rounding once, as one rank does."""

    offset = 0
    groups = Groups()

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


# -- laying out a shard ------------------------------------------------------------------------------


def _local_shape(shape: tuple[int, ...], slices: Slices | None) -> tuple[int, ...]:
    if slices is None:
        return shape
    return tuple((s.stop - s.start) if s != slice(None) else n for n, s in zip(shape, slices, strict=True))


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


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def meta_copy(model: Grok) -> Grok:
    """A copy of `model` with every tensor on the meta device (no storage copied; the embedding a plain
    meta table, whatever reads the original's)."""
    memo: dict[int, Any] = {}
    for t in [*model.parameters(), *model.buffers()]:
        empty = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(empty, requires_grad=False) if isinstance(t, nn.Parameter) else empty
    c = model.config
    memo[id(model.embed)] = nn.Embedding(c.vocab_size, c.emb_size, device="meta", dtype=model.dtype)
    return copy.deepcopy(model, memo)


def apply_plan(model: Grok, p: Plan, groups: Groups | None = None) -> Grok:
    """The rank's share of `model`, with the collectives added: a new model, configured with the rank's
    heads (`model.config`, so KV caches are allocated for them) and `model.plan` = p. A model on the
    meta device gives one only laid out (for a loader to fill, see `fill_module`); a real one, filled
    with copies of its slices."""
    groups = groups or Groups()
    whole, model = model, meta_copy(model)
    linears = (nn.Linear, ExpertLinear, Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)
    local = p.local_config
    for name, module in list(model.named_modules()):
        if isinstance(module, linears) and name != "head" and not name.endswith("router"):
            _set(model, name, shard_module(module, name, p))
    for module in model.modules():
        if isinstance(module, Attention):
            module.config = local
            module.register_forward_hook(_reduce_hook(groups.tp, groups.tp_size))
        elif isinstance(module, MLP):
            module.register_forward_hook(_reduce_hook(groups.tp, groups.tp_size))
        elif isinstance(module, MoE):
            if p.ep > 1:  # (an int8 MoE's fused kernel takes all the experts: the plain path here)
                module.__class__ = ExpertParallelMoE
                module.offset, module.groups = p.experts().start, groups  # type: ignore[attr-defined]
            else:
                module.register_forward_hook(_reduce_hook(groups.tp, groups.tp_size))
    vocab = p.vocab()
    with torch.device("meta"):
        table = torch.empty(vocab.stop - vocab.start, p.config.emb_size, dtype=model.dtype)
    model.embed = VocabParallelEmbedding(table, vocab.start, groups)
    head = TiedHead(model.embed) if isinstance(model.head, TiedHead) else shard_module(model.head, "head", p)
    model.head = VocabParallelHead(head, groups)  # type: ignore[arg-type]
    model.config = local
    model.plan = p  # type: ignore[assignment]
    if whole.norm.weight.device.type != "meta":
        model.to_empty(device=whole.norm.weight.device)
        read = model_reader(whole)
        for name in filled_modules(model):
            fill_module(model, whole, p, name, read)
    return model.eval().requires_grad_(False)


# -- meshes ---------------------------------------------------------------------------------------


def make_mesh(config: GrokConfig, tp: int, ep: int, device: str | torch.device = "cpu") -> DeviceMesh:
    """A DeviceMesh ("ep", "tp") over the initialised process group, after checking that the layout
    splits this model and that the group has tp x ep ranks (`init` starts one from torchrun's
    environment). Everything is checked before anything is loaded."""
    plan(config, tp, ep)  # the layout first: it fails without a process group too
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError(f"tp={tp} x ep={ep} needs a torch.distributed process group: start under torchrun")
    world = dist.get_world_size()
    if world != tp * ep:
        raise ParallelError(f"tp={tp} x ep={ep} = {tp * ep} ranks, but the process group has {world}")
    return init_device_mesh(torch.device(device).type, (ep, tp), mesh_dim_names=("ep", "tp"))


def plan_of(config: GrokConfig, mesh: DeviceMesh) -> tuple[Plan, Groups]:
    """This rank's Plan and process groups on `mesh` (dims named "tp" and/or "ep"; a missing one is 1)."""
    names = mesh.mesh_dim_names or ()
    unknown = set(names) - {"tp", "ep"}
    if unknown:
        raise ParallelError(f"mesh dims {names}: expected 'tp' and/or 'ep', not {sorted(unknown)}")
    size = {n: mesh.size(i) for i, n in enumerate(names)}
    rank = {n: mesh.get_local_rank(n) for n in names}
    tp, ep = size.get("tp", 1), size.get("ep", 1)
    p = plan(config, tp, ep, rank.get("tp", 0), rank.get("ep", 0))
    groups = Groups(
        tp=mesh.get_group("tp") if "tp" in names else None,
        ep=mesh.get_group("ep") if "ep" in names else None,
        world=mesh.get_group() if len(names) == 1 else _flat_group(mesh),
        tp_size=tp,
        world_size=tp * ep,
    )
    return p, groups


def _flat_group(mesh: DeviceMesh) -> Any:
    """The group of all the mesh's ranks (the default group when the mesh spans it)."""
    ranks = sorted(mesh.mesh.flatten().tolist())
    if ranks == list(range(dist.get_world_size())):
        return dist.group.WORLD
    return dist.new_group(ranks)


def parallelize(model: Grok, mesh: DeviceMesh) -> Grok:
    """Tensor and expert parallel as a transform: keep this rank's share of `model` (see the module's
    docstring) on `mesh`; calling the result on tokens gives the full logits on every rank."""
    p, groups = plan_of(model.config, mesh)
    return apply_plan(model, p, groups)


def init(device: str | torch.device = "cpu", timeout_s: float | None = None) -> int:
    """Initialise the default process group from torchrun's environment (gloo on the CPU, NCCL on
    CUDA); returns this rank. A no-op if it is initialised already."""
    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise ParallelError("no process group: run under torchrun (--nproc-per-node N), which sets RANK")
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        kwargs: dict[str, Any] = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group("nccl" if cuda else "gloo", **kwargs)
    return dist.get_rank()


# -- filling a shard --------------------------------------------------------------------------------

_QUANT = (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)
Read = Callable[[str, Slices], Tensor]


def model_reader(whole: Grok) -> Read:
    """`read` (see `fill_module`) from a model in memory."""

    def read(name: str, slices: Slices | None) -> Tensor:
        module_name, _, leaf = name.rpartition(".")
        module = whole.get_submodule(module_name)
        t = getattr(module, leaf, None)
        if t is None and name == "embed.weight":  # a table read from the checkpoint file
            t = module.table
        if isinstance(module, (Int4Linear, Int4ExpertLinear)) and is_panels(module.weight, module.scales):
            # (a copy in rows: slices of panels are not rows)
            t = from_panels(t) if leaf == "weight" else scales_from_panels(t) if leaf == "scales" else t
        array: Any = TensorArray(t)
        if isinstance(module, _QUANT) and leaf == "weight" and t.dim() == module.scales.dim() + 1:
            array = BlockMajorArray(array)
        return array.read(slices)

    return read


def global_name(name: str) -> str:
    """A sharded model's parameter or module name as the whole model has it."""
    return "head" + name[len("head.local") :] if name.startswith("head.local") else name


def logical_shape(module: nn.Module) -> tuple[int, ...]:
    """An int8/int4 module's weight as [.., out, in] (int4: in counts columns, not packed bytes)."""
    w, s = module.weight, module.scales
    if isinstance(module, (Int4Linear, Int4ExpertLinear)):  # in rows or in panels
        return (*s.shape[:-1], kernels.in_features(w, s))
    if w.dim() == s.dim() + 1:  # block-major [.., G, out, in/G]
        return (*w.shape[:-3], w.shape[-2], w.shape[-3] * w.shape[-1])
    return tuple(w.shape)


def _whole(slices: Slices | None, shape: tuple[int, ...]) -> Slices:
    """Slices with every axis explicit (None, or slice(None), for an axis taken whole)."""
    slices = slices or (slice(None),) * len(shape)
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(slices, shape, strict=True))


def shard_reads(local: Grok, whole: Grok, p: Plan, module: str) -> list[tuple[str, Slices]]:
    """The (global name, slices: every axis explicit) module `module` of the sharded model is filled from."""
    mod = local.get_submodule(module)
    g = global_name(module)
    if g == "embed":  # (a streamed table is not in the whole model)
        return [("embed.weight", (p.vocab(), slice(0, p.config.emb_size)))]
    gmod = whole.get_submodule(g)
    if isinstance(mod, _QUANT):
        shape = logical_shape(gmod)
        wsl = _whole(p.slices(f"{g}.weight", shape), shape)
        scales = tuple(gmod.scales.shape)
        ssl = _whole(p.slices(f"{g}.scales", scales, scales[-1]), scales)
        if isinstance(mod, (Int4Linear, Int4ExpertLinear)):  # two columns a byte
            wsl = (*wsl[:-1], slice(wsl[-1].start // 2, wsl[-1].stop // 2))
        return [(f"{g}.weight", wsl), (f"{g}.scales", ssl)]
    return [(f"{g}.{leaf}", _whole(p.slices(f"{g}.{leaf}", tuple(t.shape)), tuple(t.shape))) for leaf, t in
            [*gmod.named_parameters(recurse=False), *gmod.named_buffers(recurse=False)]]  # fmt: skip


def fill_module(local: Grok, whole: Grok, p: Plan, module: str, read: Read, chunk_bytes: int = 16 << 20) -> None:
    """Fill module `module` of the sharded model (given storage) with `read(global name, slices)`, which
    returns a slice of the whole model's tensor in its logical layout (int8 row-major [.., out, in],
    int4 packed [.., out, in/2], scales [.., out, G]); read `chunk_bytes` at a time along the first
    axis (experts, or output rows), so that a large shard is never held twice."""
    mod = local.get_submodule(module)
    reads = shard_reads(local, whole, p, module)
    quant = isinstance(mod, _QUANT)
    blocked = quant and mod.weight.dim() == mod.scales.dim() + 1  # held block-major [.., G, out, in/G]
    targets = [mod.weight, mod.scales] if quant else [*mod.parameters(recurse=False), *mod.buffers(recurse=False)]
    first = reads[0][1][0]
    n = first.stop - first.start
    row = max(1, targets[0].numel() * targets[0].element_size() // max(1, n))
    step = max(1, chunk_bytes // row)
    with torch.no_grad():
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            for i, ((name, sl), target) in enumerate(zip(reads, targets, strict=True)):
                value = read(name, (slice(sl[0].start + r0, sl[0].start + r1), *sl[1:]))
                if blocked and i == 0:
                    value = block_major(value, mod.scales.shape[-1])
                    # a 2-D weight's rows are its second axis when block-major
                    part = target[r0:r1] if mod.weight.dim() == 4 else target[:, r0:r1]
                else:
                    part = target[r0:r1]
                _copy(part, value, name)


def _copy(target: Tensor, value: Tensor, name: str) -> None:
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"{name}: a shard of shape {tuple(value.shape)}, expected {tuple(target.shape)}")
    if value.dtype != target.dtype and not (value.dtype.is_floating_point and target.dtype.is_floating_point):
        raise ValueError(f"{name}: stored as {value.dtype}, the shard holds {target.dtype}")
    target.copy_(value)


def filled_modules(model: Grok) -> list[str]:
    """The modules holding tensors of their own (what `fill_module` fills), in order."""
    return [n for n, m in model.named_modules() if [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
