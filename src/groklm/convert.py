"""`groklm convert` and `groklm quantize`: any checkpoint groklm reads, streamed part by part into another
format: peak memory is about one decoder layer (and one tensor's encoding), never the model."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from groklm.config import GrokConfig
from groklm.files import CheckpointError, output_dir, progress_bar, return_freed_memory
from groklm.formats import native, registry
from groklm.formats.layout import embedding_rows
from groklm.quant import Int4ExpertLinear, Int4Linear, check_int4_group, quantize_int4
from groklm.tokenizer import find_tokenizer

WRITERS = tuple(f.name for f in registry.FORMATS if f.write_types or f.mappable)  # groklm's own: `to_native`


def convert(src: str | Path, out: str | Path, to: str, qtype: str | None = None, bits: int = 8, group_size: int = 64,
            config: GrokConfig | None = None, progress: bool = True, force: bool = False) -> Path:  # fmt: skip
    """Write checkpoint `src` (any format) as `to`: "hf" (safetensors shards, `qtype` bf16 or f32),
    "gguf" (one file `out`, `qtype` q8_0, f16, bf16 or q4_0) or "native" (groklm's layout, int8 as
    released or int4 with `bits` 4). Everything is checked before anything is written; the output
    appears only once complete."""
    if to not in WRITERS:
        raise ValueError(f"--to must be one of {WRITERS}, not {to!r}")
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
    source = fmt.open(Path(src), config, dtype, stream_table=True)
    out = Path(out)
    if not target.writes_file:
        with output_dir(out, force) as tmp:
            target.write(source, tmp, qtype, tokenizer, progress)  # type: ignore[misc]
        return out
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the {target.title}'s name")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists (--force, or force=True, replaces it)")
    tmp_file = out.with_name(f".{out.name}.partial")
    try:
        target.write(source, tmp_file, qtype, tokenizer, progress)  # type: ignore[misc]
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
        model = native.load_native(src, torch.bfloat16, mmap=True)
        if config is not None and config != model.config:
            raise CheckpointError(f"{src}: its config.json differs from the config given")
        if bits == 8 and any(isinstance(m, (Int4Linear, Int4ExpertLinear)) for m in model.modules()):
            raise ValueError(f"{src} is int4: int8 cannot be recovered from it")
        source = None
    else:
        # Float weights are quantized as they are read, the output head int8 too (64-column groups, as
        # released) for int8; the released table is streamed into the shard, the int8 head made from it.
        head = bits == 8 or not fmt.quantizes_on_load
        source = fmt.open(Path(src), config, torch.bfloat16, bits if fmt.quantizes_on_load else None,
                          quantize_head=head, stream_table=True)  # fmt: skip
        model = source.model
    if bits == 4:
        check_int4_group(model.config, group_size)
    with output_dir(out, force) as tmp:
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=1))
        bar = progress_bar(model.config.num_layers + 1, f"converting to int{bits}", progress, unit="part")
        for i, layer in enumerate(model.layers):
            if source is not None:
                source.fill(f"layers.{i}")
            if bits == 4:
                quantize_int4(layer, group_size)
            native.save_shard(tmp, i + 1, native.as_stored(layer, f"layers.{i}."))
            layer.to("meta")  # frees it (or drops its maps)
            return_freed_memory()
            bar.update(1)
        if source is not None:
            source.fill("")
        if bits == 4 and not fmt.quantizes_on_load:
            quantize_int4(model, group_size)  # the output head; the layers, on meta by now, are only laid out
        top = {name: t for name, t in native.as_stored(model).items() if not name.startswith("layers.")}
        streamed = {}
        if "embed.weight" not in top:
            table = (rows.to(model.dtype) for rows in embedding_rows(source))  # type: ignore[arg-type]
            streamed["embed.weight"] = (model.dtype, (model.config.vocab_size, model.config.emb_size), table)
        native.save_shard(tmp, 0, top, streamed)
        bar.update(1)
        bar.close()
    return Path(out)
