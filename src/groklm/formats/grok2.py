"""Grok-2's released layout (xai-org/grok-2): bf16 safetensors split for 8-way tensor parallelism.

    pytorch_model-000NN-TP-common.safetensors    whole tensors (embedding, lm_head, norms, attention,
                                                 the dense MLP, the router), one group of names a file
    pytorch_model-000NN-TP-00r.safetensors       rank r's share of every expert matrix, under the same
                                                 names in every rank's file: rows r*F/R..(r+1)*F/R of
                                                 w1 and w3, the same columns of w2

A single process concatenates the ranks' shares in rank order (rows of w1/w3, columns of w2); any
number of ranks works, not only 8. Names (theirs -> ours): model.embed_tokens -> embed, lm_head ->
head (untied), model.norm -> norm, self_attn.{q,k,v,o}_proj -> attn.{wq,wk,wv,wo}, mlp.{gate,up,
down}_proj -> mlp.{gate,up,down}, block_sparse_moe.gate -> moe.router, experts.E.{w1,w3,w2} ->
moe.{w1,v,w2}[E] (w1 is the GELU side), {pre,post}_{attn,moe}_norm -> attn_norm, attn_out_norm,
moe_norm, moe_out_norm. The config is `config.grok2_config` of config.json.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

from groklm.config import GrokConfig, grok2_config
from groklm.files import CheckpointError, read_json
from groklm.formats.common import Item, part_of
from groklm.formats.safetensors_io import Entry, read_header, read_tensor

LICENSE = (
    "Grok 2 Community License Agreement (now titled the xAI Community License Agreement): you may not use "
    "the model, derivatives or outputs to train or improve other foundational, large language or general-purpose "
    "AI models; fine-tuning Grok 2 itself is allowed"
)
_FILE = re.compile(r"^pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors$")
_LAYER = {
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
    "moe.router.weight": "block_sparse_moe.gate.weight",
    "attn_norm.weight": "pre_attn_norm.weight",
    "attn_out_norm.weight": "post_attn_norm.weight",
    "moe_norm.weight": "pre_moe_norm.weight",
    "moe_out_norm.weight": "post_moe_norm.weight",
}
_EXPERTS = {"moe.w1.weight": ("w1", 0), "moe.v.weight": ("w3", 0), "moe.w2.weight": ("w2", 1)}  # theirs, split dim


def is_grok2(path: Path) -> bool:
    return path.is_dir() and any(path.glob("pytorch_model-*-TP-common.safetensors"))


def names(config: GrokConfig) -> list[tuple[str, str, int | None, int | None]]:
    """(ours, theirs, expert, split dim) of every tensor; split dim None: a whole tensor in a common file."""
    out: list[tuple[str, str, int | None, int | None]] = [
        ("embed.weight", "model.embed_tokens.weight", None, None),
        ("head.weight", "lm_head.weight", None, None),
        ("norm.weight", "model.norm.weight", None, None),
    ]
    for i in range(config.num_layers):
        for ours, theirs in _LAYER.items():
            if ours.startswith("mlp.") and config.dense_ffn_size is None:
                continue
            out.append((f"layers.{i}.{ours}", f"model.layers.{i}.{theirs}", None, None))
        for ours, (theirs, dim) in _EXPERTS.items():
            for e in range(config.num_experts):
                out.append(
                    (f"layers.{i}.{ours}", f"model.layers.{i}.block_sparse_moe.experts.{e}.{theirs}.weight", e, dim)
                )
    return out


def read_config(path: Path) -> GrokConfig:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{file}: missing (Grok-2's config.json comes with the download)")
    return grok2_config(read_json(file, kind=dict), str(file))


class Grok2Source:
    """Grok-2's released files opened for streaming (see `common.Source`): every tensor found by name,
    every rank's share of every expert matrix, shapes checked against config.json, before any is read."""

    quantized = None  # bf16 weights only

    def __init__(self, path: str | Path, config: GrokConfig | None = None, int8_head: bool = False) -> None:
        self.path = path = Path(path)
        self.int8_head = int8_head  # (untied: from its stored head)
        self.config = found = read_config(path)
        if config is not None and config != found:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        common: dict[str, Entry] = {}
        shards: dict[str, dict[int, Entry]] = {}
        files: dict[str, int] = {}  # tensor -> the file index holding it
        for file in sorted(path.glob("pytorch_model-*-TP-*.safetensors")):
            m = _FILE.match(file.name)
            if not m:
                continue
            for name, entry in read_header(file)[0].items():
                files[name] = int(m.group(1))
                if m.group(2) == "common":
                    if name in common:
                        raise CheckpointError(f"{file}: tensor {name} is also in {common[name].file.name}")
                    common[name] = entry
                else:
                    shards.setdefault(name, {})[int(m.group(2))] = entry
        ranks = 1 + max((r for by_rank in shards.values() for r in by_rank), default=0)
        wanted = names(found)
        missing = [theirs for _, theirs, _, dim in wanted if (common if dim is None else shards).get(theirs) is None]
        if missing:  # before a model is built for the config
            raise CheckpointError(f"{path}: tensors missing for this config ({found.num_layers} layers, "
                                  f"{found.num_experts} experts): {missing[:5]}{' and more' if len(missing) > 5 else ''}")  # fmt: skip
        self.common, self.shards, self.files, self.ranks = common, shards, files, ranks
        self.wanted = wanted

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None:
        path, ranks, common, shards, files = self.path, self.ranks, self.common, self.shards, self.files
        self.table: list[tuple[str, str, int | None, int | None, list[Entry]]] = []
        missing: list[str] = []
        for ours, theirs, expert, dim in self.wanted:
            expected = dense(ours)
            if dim is None:
                entry = common.get(theirs)
                if entry is None:
                    missing.append(theirs)
                    continue
                parts = [entry]
                got = entry.shape
            else:
                by_rank = shards.get(theirs, {})
                absent = [r for r in range(ranks) if r not in by_rank]
                if len(absent) == ranks:
                    missing.append(theirs)
                    continue
                if absent:
                    index = files[theirs]
                    raise CheckpointError(
                        f"{path / f'pytorch_model-{index:05d}-TP-{absent[0]:03d}.safetensors'}: missing, or without "
                        f"tensor {theirs} (rank {absent[0]} of {ranks})"
                    )
                parts = [by_rank[r] for r in range(ranks)]
                for e in parts:
                    other = [n for i, n in enumerate(e.shape) if i != dim]
                    if other != [n for i, n in enumerate(expected) if i != dim]:
                        raise CheckpointError(
                            f"{e.where()}: shape {e.shape} does not fit {expected} split over dim {dim}"
                        )
                got = tuple(sum(e.shape[dim] for e in parts) if i == dim else n for i, n in enumerate(parts[0].shape))
            if got != expected:
                raise CheckpointError(
                    f"{parts[0].where()}: shape {got}, expected {expected} (a config that does not match?)"
                )
            for e in parts:
                if not e.dtype.is_floating_point:
                    raise CheckpointError(f"{e.where()}: stored as {e.dtype_name}, expected a float dtype")
            self.table.append((ours, theirs, expert, dim, parts))
        if missing:
            raise CheckpointError(f"{path}: tensors missing: {missing[:5]}{' and more' if len(missing) > 5 else ''}")

    def tensors(self, part: str) -> Iterator[Item]:
        for ours, theirs, expert, dim, parts in self.table:
            if part_of(ours) == part:
                value = read_tensor(parts[0]) if dim is None else torch.cat([read_tensor(e) for e in parts], dim=dim)
                yield ours, expert, value, f"{parts[0].file}: tensor {theirs}"

    def __len__(self) -> int:
        return len(self.wanted)
