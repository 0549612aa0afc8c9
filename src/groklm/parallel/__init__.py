"""Tensor, expert and data parallel over torch.distributed, as one transform: `parallelize(model, mesh)`.

The mesh is a DeviceMesh with named dims: "tp" and "ep" to serve a model (tp x ep ranks, either may
be 1), or "dp" to train one (FSDP). Each rank keeps its share of the model; the model file knows
nothing of it. The plan (`parallel.plan`, one table keyed by module path) says what each rank holds:

- tp, attention: whole kv-head groups a rank (q, k and v column-parallel: a rank's query heads are
  the ones that read its kv heads); the output projection row-parallel, its partial sums added by one
  all-reduce. The KV cache holds a rank's kv heads only (the local config's). With more ranks than
  kv heads, kv heads are replicated: tp / K ranks share each.
- tp, experts: each expert's hidden dimension split (the reference's own sharding): W1 and V by
  rows, W2 by columns, the MoE's partial sums added by one all-reduce. Grok-2's dense MLP likewise.
  Int8 weights with row-blocked scales (the attention output, the down projections) are split where
  whole scale blocks stay together (or within one block, which then keeps its scale).
- ep: each rank holds whole experts (E / ep), run by `ExpertParallelMoE` (see `parallel.modules`).
- the embedding and the output head are split over the vocabulary: a lookup's partial rows (zeros
  outside a rank's range) are added by an all-reduce, and each rank's slice of the logits is
  all-gathered, so every rank has the full logits and samples the same token.
- dp: FSDP2 (`fully_shard`), each layer then the whole model, for training.

`plan(config, tp, ep)` checks a layout before anything is loaded; `groklm.load(..., tp=, ep=)` builds
the rank's share on the meta device and reads only its bytes (`apply_plan`, `fill_module`).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from groklm.config import GrokConfig
from groklm.model import Grok
from groklm.parallel.modules import ExpertParallelMoE, Groups, Stats, VocabParallelEmbedding, VocabParallelHead
from groklm.parallel.plan import LAYER_PLAN, MODEL_PLAN, ParallelError, Plan, Slices, plan, shard_module
from groklm.parallel.shard import (
    Read,
    apply_plan,
    fill_module,
    filled_modules,
    global_name,
    meta_copy,
    model_reader,
    shard_reads,
)

__all__ = [
    "LAYER_PLAN",
    "MODEL_PLAN",
    "ExpertParallelMoE",
    "Groups",
    "ParallelError",
    "Plan",
    "Read",
    "Slices",
    "Stats",
    "VocabParallelEmbedding",
    "VocabParallelHead",
    "apply_plan",
    "fill_module",
    "filled_modules",
    "fully_shard_model",
    "global_name",
    "init",
    "make_mesh",
    "meta_copy",
    "model_reader",
    "parallelize",
    "plan",
    "plan_of",
    "shard_module",
    "shard_reads",
]


def parallelize(model: Grok, mesh: DeviceMesh) -> Grok:
    """Parallelism as a transform, by the mesh's dims, in a fixed order: tensor and expert parallel
    ("tp", "ep": this rank's share of `model`, whose output on tokens is the full logits on every
    rank; a new model), then FSDP ("dp": in place, for training). Serving and training meshes are
    apart: tp/ep shard a frozen model, FSDP a trained one."""
    names = set(mesh.mesh_dim_names or ())
    if not names or names - {"dp", "tp", "ep"}:
        raise ParallelError(f"mesh dims {mesh.mesh_dim_names}: expected named dims among 'dp', 'tp' and 'ep'")
    if "dp" in names and names & {"tp", "ep"}:
        raise ParallelError("FSDP (dp) trains a whole model and tp/ep serve a frozen one: one or the other")
    if names & {"tp", "ep"}:
        model = apply_plan(model, *plan_of(model.config, mesh))
    if "dp" in names:
        model = fully_shard_model(model, mesh["dp"])
    return model


def fully_shard_model(model: Grok, mesh: DeviceMesh) -> Grok:
    """FSDP2 over `mesh`, in place: each layer a unit, then the rest (embedding, norm, head)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for method in ("hidden", "unembed"):  # training calls these, not forward: they gather the root's weights too
        register_fsdp_forward_method(model, method)
    return model


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
