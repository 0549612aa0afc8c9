"""`groklm convert`, `groklm quantize` and `groklm init-random`: any checkpoint groklm reads, streamed part
by part into another format (peak memory is about one decoder layer and one tensor's encoding, never the
model); a model written in groklm's layout; a random-weight checkpoint in the released format. The format
modules write the (our name, tensor) pairs given here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from groklm import place
from groklm.config import GrokConfig
from groklm.files import CheckpointError, output_dir, progress_bar, return_freed_memory
from groklm.formats import native, registry
from groklm.formats.common import Source
from groklm.formats.released import MappedEmbedding, RefParam, reference_params, write_tensor_file
from groklm.model import Grok
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    check_int4_group,
    dense_weight,
    from_panels,
    is_panels,
    quantize_int4,
    quantize_weight,
    row_major,
    scales_from_panels,
)
from groklm.tokenizer import find_tokenizer

WRITERS = registry.WRITABLE


def convert(src: str | Path, out: str | Path, to: str, qtype: str | None = None, bits: int = 8, group_size: int = 64,
            config: GrokConfig | None = None, progress: bool = True, force: bool = False,
            embedding_type: str = "f32") -> Path:  # fmt: skip
    """Write checkpoint `src` (any format) as `to`: "hf" (safetensors shards, `qtype` bf16 or f32),
    "gguf" (one file `out`, `qtype` q8_0, f16, bf16 or q4_0, the embedding `embedding_type`: f32, f16,
    bf16 or q8_0) or "native" (groklm's layout, int8 as released or int4 with `bits` 4). Everything is
    checked before anything is written; the output appears only once complete."""
    if to not in WRITERS:
        raise ValueError(f"--to must be one of {WRITERS}, not {to!r}")
    if embedding_type != "f32" and to != "gguf":
        raise ValueError("--embedding-type is for --to gguf")
    target = registry.by_name(to)
    if not target.write_types:  # groklm's own layout, written from the model as it runs (int8 or int4)
        return to_native(src, out, bits, group_size, config, progress=progress, force=force)
    fmt = registry.detect(src)
    if (config or fmt.read_config(Path(src), None)[0]).family != "grok-1":
        raise ValueError(f"--to {to} writes Grok-1 layouts; convert Grok-2 to groklm's own (--to native)")
    qtype = qtype or target.write_types[0]
    if qtype not in target.write_types:
        raise ValueError(f"--type for {to} must be one of {target.write_types}, not {qtype!r}")
    try:
        tokenizer = find_tokenizer(src).path
    except FileNotFoundError:
        tokenizer = None
    dtype = torch.float32 if qtype == "f32" else torch.bfloat16
    source = fmt.open(Path(src), config, stream_table=True)
    tensors = Parts(place.laid_out(source, dtype), source)
    out = Path(out)
    if not target.writes_file:
        with output_dir(out, force) as tmp:
            target.write(tensors, tmp, qtype, tokenizer, progress)  # type: ignore[misc]
        return out
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the {target.title}'s name")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists (--force, or force=True, replaces it)")
    tmp_file = out.with_name(f".{out.name}.partial")
    try:
        target.write(tensors, tmp_file, qtype, tokenizer, progress, embedding_type)  # type: ignore[misc]
        tmp_file.replace(out)
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        raise
    return out


def to_native(
    src: str | Path,
    out: str | Path,
    bits: int = 8,
    group_size: int = 64,
    config: GrokConfig | None = None,
    progress: bool = True,
    force: bool = False,
) -> Path:
    """Write a checkpoint in groklm's layout, int8 as it is or int4, one decoder layer at a time: memory
    holds 1-3 layers' worth for int8 (the layer and safetensors' serialized copy of it) and about 3 for
    int4 (float temporaries and the result), plus the int8 output head, never the model. For the released
    Grok-1 that is under 16 GB rather than 300. Float formats (Grok-2's, Hugging Face's, GGUF's) are
    quantized as they are read.

    The result equals loading the whole model, quantizing it and `save_native`, bit for bit. It is
    written beside `out` and moved there at the end (`files.output_dir`): nothing half-written is left."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, not {bits}")
    fmt = registry.detect(src)
    if fmt.mappable:  # weights stay on disk until read
        as_stored = fmt.open(Path(src), config)
        model = place.mapped(place.laid_out(as_stored, torch.bfloat16), as_stored)
        source: Source | None = None
        if bits == 8 and any(isinstance(m, (Int4Linear, Int4ExpertLinear)) for m in model.modules()):
            raise ValueError(f"{src} is int4: int8 cannot be recovered from it")
    else:
        # Float weights are quantized as they are read, the output head int8 too (64-column groups, as
        # released) for int8; the released table is streamed into the shard, the int8 head made from it.
        source = fmt.open(Path(src), config, int8_head=bits == 8 or not fmt.quantizes_on_load, stream_table=True)
        model = place.laid_out(source, torch.bfloat16, bits if fmt.quantizes_on_load else None)
    if bits == 4:
        check_int4_group(model.config, group_size)
    with output_dir(out, force) as tmp:
        native.write_config(tmp, model.config)
        bar = progress_bar(model.config.num_layers + 1, f"converting to int{bits}", progress, unit="part")
        for i, layer in enumerate(model.layers):
            if source is not None:
                place.fill_part(model, source, f"layers.{i}")
            if bits == 4:
                quantize_int4(layer, group_size)
            native.save_shard(tmp, i + 1, stored(layer, f"layers.{i}."))
            layer.to("meta")  # frees it (or drops its maps)
            return_freed_memory()
            bar.update(1)
        if source is not None:
            place.fill_part(model, source, "")
        if bits == 4 and not fmt.quantizes_on_load:
            quantize_int4(model, group_size)  # the output head; the layers, on meta by now, are only laid out
        top = {name: t for name, t in stored(model).items() if not name.startswith("layers.")}
        streamed = {}
        if "embed.weight" not in top:
            table = (rows.to(model.dtype) for rows in place.embedding_rows(model, source))
            streamed["embed.weight"] = (model.dtype, (model.config.vocab_size, model.config.emb_size), table)
        native.save_shard(tmp, 0, top, streamed)
        bar.update(1)
        bar.close()
    return Path(out)


def save_native(model: Grok, out: str | Path, progress: bool = True) -> Path:
    """Write `model` (float, int8 or int4 modules) in groklm's layout: safetensors shards plus config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    native.write_config(out, model.config)
    shards: dict[int, dict[str, Tensor]] = {}
    for name, t in stored(model).items():
        shards.setdefault(native.shard_of(name), {})[name] = t
    for index in range(model.config.num_layers + 1):
        native.save_shard(out, index, shards.get(index, {}))
    return out


def stored(module: nn.Module, prefix: str = "") -> dict[str, Tensor]:
    """A model's (or a layer's) tensors as groklm's layout stores them, by name."""
    state = {prefix + name: t for name, t in module.state_dict().items()}
    for name, t in list(state.items()):  # int4 weights in the CPU kernel's panels are written in rows
        scales_name = name.removesuffix("weight") + "scales"
        scales = state.get(scales_name)
        if t.dtype == torch.uint8 and name.endswith("weight") and scales is not None and is_panels(t, scales):
            state[name], state[scales_name] = from_panels(t), scales_from_panels(scales)
    if isinstance(getattr(module, "embed", None), MappedEmbedding):  # the table lives in the source file
        state[prefix + "embed.weight"] = module.embed.table.to(module.dtype)  # type: ignore[union-attr, operator]
    return state


class Parts:
    """A model laid out from a source, read a part at a time, as a writer takes it (`formats.common.Tensors`)."""

    def __init__(self, model: Grok, source: Source) -> None:
        self.model, self.source, self.config = model, source, model.config

    def shape(self, name: str) -> tuple[int, ...]:
        return place.dense_shape(self.model, name)

    def int8_groups(self, name: str) -> int | None:
        module = self.model.get_submodule(name.rpartition(".")[0])
        int8 = isinstance(module, (Int8Linear, Int8ExpertLinear)) and name.endswith(".weight")
        return module.scales.shape[-1] if int8 else None

    def read(self, part: str) -> None:
        place.fill_part(self.model, self.source, part)

    def dense(self, name: str, expert: int | None = None) -> Tensor:
        module_name, _, leaf = name.rpartition(".")
        module = self.model.get_submodule(module_name)
        if leaf == "weight" and hasattr(module, "scales"):
            return dense_weight(module, expert)
        value = getattr(module, leaf).detach()
        return value if expert is None else value[expert]

    def int8(self, name: str, expert: int | None = None) -> tuple[Tensor, Tensor]:
        module = self.model.get_submodule(name.rpartition(".")[0])
        weight = module.weight if expert is None else module.weight[expert]
        scales = module.scales if expert is None else module.scales[expert]
        return row_major(weight, scales), scales

    def done(self, name: str) -> None:
        self.model.get_submodule(name.rpartition(".")[0]).to("meta")

    def drop(self, part: str) -> None:
        place.free(self.model, part)

    def table_rows(self) -> Iterator[Tensor]:
        return place.embedding_rows(self.model, self.source)


def _random_param(p: RefParam, config: GrokConfig, gen: torch.Generator) -> tuple[Iterator[Tensor], list[Tensor]]:
    """Chunks of a random parameter in reference layout, and (filled as the chunks are consumed) the
    per-slab bf16 scales if it is an int8 linear."""
    if p.kind == "embed":
        # With a tied unembedding, a random model whose residual stream is mostly the input token's
        # embedding just repeats its last token. Post-norm scales 4x the embedding scale make the
        # layers' outputs dominate; these sizes give logits of std ~1 with clear top-1 gaps.
        std = 8.0 / config.embedding_multiplier_scale
        return (torch.randn(rows, p.shape[1], generator=gen) * std for rows in _splits(p.shape[0], 4096)), []
    if p.kind == "norm":
        gain = 32.0 if p.module.endswith("out_norm") else 1.0
        return iter([(torch.rand(p.shape, generator=gen) + 0.5) * gain]), []
    if p.kind == "router":
        return iter([torch.randn(p.shape, generator=gen) * 2.0 / p.shape[0] ** 0.5]), []
    scales: list[Tensor] = []
    in_features, out_features = p.shape[-2], p.shape[-1]
    assert p.groups is not None
    lead = p.shape[0] if len(p.shape) == 3 else 1

    def slabs() -> Iterator[Tensor]:
        for _ in range(lead):
            w = torch.randn(out_features, in_features, generator=gen) / in_features**0.5  # [out, in]
            q, s = quantize_weight(w, p.groups, torch.bfloat16)  # [out, in], [out, G]
            scales.append(s.T)  # released layout [G, out]
            yield q.T  # released layout [in, out]

    return slabs(), scales


def _splits(n: int, step: int) -> Iterator[int]:
    for start in range(0, n, step):
        yield min(step, n - start)


def write_random_checkpoint(
    out: str | Path, config: GrokConfig, seed: int = 0, progress: bool = True, force: bool = False
) -> Path:
    """Write a random-weight checkpoint in the released format, with `config.json`; returns ckpt-0/.
    `out` must be empty or new (or `force`, to replace it); nothing is left half-written."""
    with output_dir(out, force) as tmp:
        ckpt = tmp / "ckpt-0"
        ckpt.mkdir()
        native.write_config(tmp, config)
        gen = torch.Generator().manual_seed(seed)
        params = reference_params(config)
        bar = progress_bar(len(params), f"writing {Path(out) / 'ckpt-0'}", progress)
        for p in params:
            chunks, scales = _random_param(p, config, gen)
            stacked = None
            if p.kind == "linear":
                stacked = (lambda s=scales: torch.stack(s)) if len(p.shape) == 3 else (lambda s=scales: s[0])
            write_tensor_file(ckpt / p.file, p.shape, chunks, stacked)
            bar.update(1)
        bar.close()
    return Path(out) / "ckpt-0"
