"""Hugging Face Grok-1 directories: safetensors shards with `model.safetensors.index.json` and config.json.

Two community layouts exist, both [out, in] linears with one tensor per expert:

    hpcai   (hpcai-tech/grok-1; what vLLM's Grok-1 loader reads)
            model.embed_tokens.weight, model.norm.scale,
            model.layers.N.attn.{q,k,v,o}_proj.weight, model.layers.N.moe_block.gate.weight,
            model.layers.N.moe_block.experts.E.{linear,linear_v,linear_1}.weight,
            model.layers.N.{pre_attn,post_attn,pre_moe,post_moe}_norm.scale
    keyfan  (keyfan/grok-1-hf; what llama.cpp's converter reads)
            transformer.in_out_embed.weight, transformer.rms_norm.weight,
            transformer.decoder_layer.N.multi_head_attention.{query,key,value,linear}.weight,
            transformer.decoder_layer.N.router.weight, transformer.decoder_layer.N.moe.E.{linear,...}.weight,
            transformer.decoder_layer.N.rms_norm{,_1,_2,_3}.weight

Both are read (norms as `.scale` or `.weight`); hpcai is written. The output head is tied, so no
`lm_head.weight` is written, and one found is only checked for its shape. Weights are dequantized to
bf16 on export (what those layouts hold; `f32` keeps the int8 x scale products exact), and read back
as they are or, with `bits`, quantized on load with the released grouping.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from groklm.config import GrokConfig, need_ints, need_numbers
from groklm.files import CheckpointError, progress_bar, read_json
from groklm.formats.common import Item, Tensors, check_shape, part_of, parts
from groklm.formats.safetensors_io import Entry, read_header, read_tensor, write_file

INDEX = "model.safetensors.index.json"
_LAYER = {
    # our parameter: (hpcai name, keyfan name); {i} the layer, {e} the expert
    "attn.wq.weight": ("model.layers.{i}.attn.q_proj.weight", "transformer.decoder_layer.{i}.multi_head_attention.query.weight"),
    "attn.wk.weight": ("model.layers.{i}.attn.k_proj.weight", "transformer.decoder_layer.{i}.multi_head_attention.key.weight"),
    "attn.wv.weight": ("model.layers.{i}.attn.v_proj.weight", "transformer.decoder_layer.{i}.multi_head_attention.value.weight"),
    "attn.wo.weight": ("model.layers.{i}.attn.o_proj.weight", "transformer.decoder_layer.{i}.multi_head_attention.linear.weight"),
    "moe.router.weight": ("model.layers.{i}.moe_block.gate.weight", "transformer.decoder_layer.{i}.router.weight"),
    "moe.w1.weight": ("model.layers.{i}.moe_block.experts.{e}.linear.weight", "transformer.decoder_layer.{i}.moe.{e}.linear.weight"),
    "moe.v.weight": ("model.layers.{i}.moe_block.experts.{e}.linear_v.weight", "transformer.decoder_layer.{i}.moe.{e}.linear_v.weight"),
    "moe.w2.weight": ("model.layers.{i}.moe_block.experts.{e}.linear_1.weight", "transformer.decoder_layer.{i}.moe.{e}.linear_1.weight"),
    "attn_norm.weight": ("model.layers.{i}.pre_attn_norm.scale", "transformer.decoder_layer.{i}.rms_norm.weight"),
    "attn_out_norm.weight": ("model.layers.{i}.post_attn_norm.scale", "transformer.decoder_layer.{i}.rms_norm_1.weight"),
    "moe_norm.weight": ("model.layers.{i}.pre_moe_norm.scale", "transformer.decoder_layer.{i}.rms_norm_2.weight"),
    "moe_out_norm.weight": ("model.layers.{i}.post_moe_norm.scale", "transformer.decoder_layer.{i}.rms_norm_3.weight"),
}  # fmt: skip
_TOP = {"embed.weight": ("model.embed_tokens.weight", "transformer.in_out_embed.weight"),
        "norm.weight": ("model.norm.scale", "transformer.rms_norm.weight")}  # fmt: skip
LAYOUTS = ("hpcai", "keyfan")
_IGNORED = ("lm_head.weight", "rotary_emb.inv_freq")  # a tied head's copy; buffers some exports carry


@dataclass(frozen=True)
class Name:
    theirs: str
    ours: str  # our parameter
    expert: int | None  # the slot of a stacked expert weight


def names(config: GrokConfig, layout: str = "hpcai") -> list[Name]:
    """Every tensor of the layout, in file order (the top part, then layer by layer)."""
    k = LAYOUTS.index(layout)
    out = [Name(theirs[k], ours, None) for ours, theirs in _TOP.items()]
    for i in range(config.num_layers):
        for ours, theirs in _LAYER.items():
            experts = range(config.num_experts) if "{e}" in theirs[k] else [None]
            out += [Name(theirs[k].format(i=i, e=e), f"layers.{i}.{ours}", e) for e in experts]
    return out


def _alias(name: str) -> str:
    """A norm's other accepted suffix (`.scale` <-> `.weight`)."""
    if "norm" not in name:
        return name
    return name[: -len(".scale")] + ".weight" if name.endswith(".scale") else name.rpartition(".")[0] + ".scale"


# -- config.json -------------------------------------------------------------------------------------


def hf_config(config: GrokConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """config.json with the keys vLLM's Grok-1 loader and the community ports read; `groklm` holds ours."""
    return {
        "architectures": ["Grok1ModelForCausalLM"],
        "model_type": "grok-1",
        "vocab_size": config.vocab_size,
        "hidden_size": config.emb_size,
        "intermediate_size": config.ffn_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_q_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.key_size,
        "num_experts": config.num_experts,
        "num_local_experts": config.num_experts,
        "num_experts_per_tok": config.num_selected_experts,
        "max_position_embeddings": config.sequence_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_base,
        "attn_output_multiplier": config.attn_output_multiplier,
        "embedding_multiplier_scale": config.embedding_multiplier_scale,
        "output_multiplier_scale": config.output_multiplier_scale,
        "attn_logit_softcapping": config.attn_softcap,
        "max_attn_value": config.attn_softcap,
        "pad_token_id": config.pad_token,
        "bos_token_id": 1,
        "eos_token_id": config.eos_token,
        "tie_word_embeddings": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "groklm": config.to_dict(),
    }


def widening_for(ffn_size: int, emb_size: int) -> float:
    """The reference's widening factor that gives this expert hidden size at this width (its rule:
    two thirds of widening x width, rounded up to a multiple of 8)."""
    w = ffn_size * 3 / (2 * emb_size)
    probe = GrokConfig(emb_size=emb_size, widening_factor=w, vocab_size=16, pad_token=0, eos_token=1)
    if probe.ffn_size != ffn_size:
        raise ValueError(f"no widening factor gives an expert hidden size of {ffn_size} at width {emb_size}")
    return w


def config_from_hf(d: dict[str, Any], where: str) -> GrokConfig:
    """Our config from a Hugging Face Grok-1 config.json (ours where groklm wrote it)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where}: must hold a JSON object, not {type(d).__name__}")
    if isinstance(d.get("groklm"), dict):
        try:
            return GrokConfig.from_dict(d["groklm"])
        except ValueError as e:
            raise ValueError(f"{where}: groklm: {e}") from None
    need_ints(d, ("hidden_size", "num_attention_heads", "head_dim", "intermediate_size"), where)
    need_numbers(d, ("embedding_multiplier_scale", "output_multiplier_scale", "attn_output_multiplier", "rope_theta",
                     "rms_norm_eps", "attn_logit_softcapping", "max_attn_value"), where)  # fmt: skip

    def need(*keys: str) -> Any:
        for key in keys:
            if key in d:
                return d[key]
        raise ValueError(f"no {' or '.join(keys)}")

    try:
        hidden, heads = need("hidden_size"), need("num_attention_heads")
        return GrokConfig(
            vocab_size=need("vocab_size"),
            emb_size=hidden,
            key_size=d.get("head_dim") or hidden // heads,
            num_q_heads=heads,
            num_kv_heads=need("num_key_value_heads"),
            num_layers=need("num_hidden_layers"),
            widening_factor=widening_for(need("intermediate_size"), hidden),
            num_experts=need("num_experts", "num_local_experts"),
            num_selected_experts=need("num_experts_per_tok"),
            sequence_len=need("max_position_embeddings"),
            pad_token=d.get("pad_token_id", 0),
            eos_token=d.get("eos_token_id", 2),
            embedding_multiplier_scale=float(need("embedding_multiplier_scale")),
            output_multiplier_scale=float(need("output_multiplier_scale")),
            attn_output_multiplier=float(need("attn_output_multiplier")),
            rope_base=float(d.get("rope_theta", 10000.0)),
            norm_eps=float(d.get("rms_norm_eps", 1e-5)),
            attn_softcap=float(d.get("attn_logit_softcapping", d.get("max_attn_value", 30.0))),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def is_hf(path: Path) -> bool:
    """Safetensors with a config.json that has hidden_size, or is unreadable (then an error names it)."""
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        return False
    try:
        d = read_json(path / "config.json")
    except CheckpointError:
        return True
    return not isinstance(d, dict) or "hidden_size" in d


def read_config(path: Path) -> GrokConfig:
    file = path / "config.json"
    return config_from_hf(read_json(file, kind=dict), str(file))


# -- reading -----------------------------------------------------------------------------------------


class HFSource:
    """A Hugging Face Grok-1 directory opened for streaming (see `common.Source`). Every expected tensor
    is found, by name, and its shape checked against the config before any is read."""

    quantized = None  # float weights only

    def __init__(self, path: str | Path, config: GrokConfig | None = None, int8_head: bool = False) -> None:
        self.path = path = Path(path)
        self.int8_head = int8_head
        self.config = found = read_config(path)
        if config is not None and config != found:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        self.entries: dict[str, Entry] = {}
        for shard in sorted(path.glob("*.safetensors")):
            for name, entry in read_header(shard)[0].items():
                if name in self.entries:
                    raise CheckpointError(f"{shard}: tensor {name} is also in {self.entries[name].file.name}")
                self.entries[name] = entry
        layout = "keyfan" if "transformer.in_out_embed.weight" in self.entries else "hpcai"
        found_names: list[tuple[Name, Entry]] = []
        missing = []
        for n in names(found, layout):  # every name matched before a model is built for the config
            entry = self.entries.get(n.theirs) or self.entries.get(_alias(n.theirs))
            if entry is None:
                missing.append(n.theirs)
            else:
                found_names.append((n, entry))
        used = {e.name for _, e in found_names}
        unexpected = [n for n in self.entries if n not in used and not n.endswith(_IGNORED)]
        if missing or unexpected:
            raise CheckpointError(
                f"{path}: tensor names do not match a {layout} Grok-1 layout of this config ({found.num_layers} "
                f"layers, {found.num_experts} experts): missing {missing[:5]}{' and more' if len(missing) > 5 else ''}"
                f", unexpected {unexpected[:5]}"
            )
        for _, entry in found_names:
            if not entry.dtype.is_floating_point:
                raise CheckpointError(f"{entry.where()}: stored as {entry.dtype_name}, expected a float dtype")
        self.table = found_names
        head = self.entries.get("lm_head.weight")
        if head is not None and head.shape != (found.vocab_size, found.emb_size):
            raise CheckpointError(f"{head.where()}: shape {head.shape}, expected {(found.vocab_size, found.emb_size)}")

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None:
        for n, entry in self.table:
            check_shape(entry.where(), entry.shape, dense(n.ours))

    def tensors(self, part: str) -> Iterator[Item]:
        for n, entry in self.table:
            if part_of(n.ours) == part:
                yield n.ours, n.expert, read_tensor(entry), entry.where()

    def __len__(self) -> int:
        return len(self.table)


# -- writing -----------------------------------------------------------------------------------------


def _counted(bar: Any, tensors: Any) -> Any:
    for t in tensors:
        bar.update(t.numel() * t.element_size())
        yield t


def write(model: Tensors, out: Path, dtype: torch.dtype = torch.bfloat16, tokenizer: Path | None = None,
          progress: bool = True) -> None:  # fmt: skip
    """Write the model the layer above gives, a part at a time (see `common.Tensors`), into directory `out`
    (made already) in the hpcai layout: one shard per part, each tensor dense and written as it is made,
    so memory holds one part and one tensor."""
    config = model.config
    table = names(config, "hpcai")
    all_parts = parts(config)
    shard_of = {p: f"model-{i + 1:05d}-of-{len(all_parts):05d}.safetensors" for i, p in enumerate(all_parts)}
    total = sum(math.prod(model.shape(n.ours)) * dtype.itemsize for n in table)
    bar = progress_bar(total, "writing hf", progress, unit="B")
    for p in all_parts:
        mine = [n for n in table if part_of(n.ours) == p]
        model.read(p)

        def made(mine: list[Name] = mine) -> Any:
            for k, n in enumerate(mine):
                if n.ours == "embed.weight":
                    yield _counted(bar, (rows.to(dtype) for rows in model.table_rows()))
                    continue
                yield next(_counted(bar, iter([model.dense(n.ours, n.expert).to(dtype)])))
                if k + 1 == len(mine) or mine[k + 1].ours != n.ours:  # its last expert: its memory goes now
                    model.done(n.ours)

        layout = [(n.theirs, dtype, model.shape(n.ours)) for n in mine]
        write_file(out / shard_of[p], layout, made(), metadata={"format": "pt"})
        model.drop(p)
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": {n.theirs: shard_of[part_of(n.ours)] for n in table}}
    (out / INDEX).write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(hf_config(config, dtype), indent=1))
    if tokenizer is not None:
        shutil.copy(tokenizer, out / "tokenizer.model")
