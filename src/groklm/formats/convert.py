"""`groklm convert --checkpoint IN --out OUT --to FORMAT`: any checkpoint groklm reads, streamed part by
part into another format: peak memory is about one decoder layer (and one tensor's encoding), never the model."""

from __future__ import annotations

from pathlib import Path

import torch

from groklm.config import GrokConfig
from groklm.files import CheckpointError, output_dir
from groklm.formats.layout import Source

FORMATS = ("hf", "gguf", "native")


def open_source(path: str | Path, config: GrokConfig | None = None, dtype: torch.dtype = torch.bfloat16,
                bits: int | None = None) -> Source:  # fmt: skip
    """Open a checkpoint of any format for streaming (see `layout.Source`), laid out on the meta device."""
    from groklm.load import detect_format

    fmt = detect_format(path)
    if fmt == "released":
        from groklm.formats.released import open_released

        if bits not in (None, 8):
            raise ValueError("the released checkpoint is int8: convert it to int4 with --to native --bits 4")
        return open_released(path, config, dtype, quantize_head=False, lazy_embedding=True)
    if fmt == "native":
        from groklm.formats.native import NativeSource

        return NativeSource(path, config, dtype)
    if fmt == "grok2":
        from groklm.formats.grok2 import Grok2Source

        return Grok2Source(path, config, dtype, bits)
    if fmt == "hf":
        from groklm.formats.hf import HFSource

        return HFSource(path, config, dtype, bits)
    from groklm.formats.gguf import GGUFSource, find_gguf

    return GGUFSource(find_gguf(Path(path)) or path, config, dtype, bits)


def _config_of(src: str | Path) -> GrokConfig:
    from groklm.load import checkpoint_config

    return checkpoint_config(src)[0]


def convert(src: str | Path, out: str | Path, to: str, qtype: str | None = None, bits: int = 8, group_size: int = 64,
            config: GrokConfig | None = None, progress: bool = True, force: bool = False) -> Path:  # fmt: skip
    """Write checkpoint `src` (any format) as `to`: "hf" (safetensors shards, `qtype` bf16 or f32),
    "gguf" (one file `out`, `qtype` q8_0, f16, bf16 or q4_0) or "native" (groklm's layout, int8 as
    released or int4 with `bits` 4). Everything is checked before anything is written; the output
    appears only once complete."""
    from groklm.formats import gguf, hf, native
    from groklm.tokenizer import find_tokenizer

    if to not in FORMATS:
        raise ValueError(f"--to must be one of {FORMATS}, not {to!r}")
    if to == "native":
        return native.convert(src, out, bits, group_size, config, progress=progress, force=force)
    if to in ("hf", "gguf") and (config or _config_of(src)).family != "grok-1":
        raise ValueError(f"--to {to} writes Grok-1 layouts; convert Grok-2 to groklm's own (--to native)")
    types = {"hf": ("bf16", "f32"), "gguf": gguf.TYPES}[to]
    qtype = qtype or types[0]
    if qtype not in types:
        raise ValueError(f"--type for {to} must be one of {types}, not {qtype!r}")
    try:
        tokenizer = find_tokenizer(src).path
    except FileNotFoundError:
        tokenizer = None
    source = open_source(src, config, torch.float32 if qtype == "f32" else torch.bfloat16)
    out = Path(out)
    if to == "hf":
        with output_dir(out, force) as tmp:
            hf.write(source, tmp, torch.float32 if qtype == "f32" else torch.bfloat16, tokenizer, progress)
        return out
    if out.is_dir():
        raise CheckpointError(f"{out}: is a directory; give the GGUF file's name")
    if out.exists() and not force:
        raise FileExistsError(f"{out}: exists (--force, or force=True, replaces it)")
    gguf.plan(source.model, qtype)  # refuses a bad type before the file is made
    tmp_file = out.with_name(f".{out.name}.partial")
    try:
        gguf.write(source, tmp_file, qtype, tokenizer, progress)
        tmp_file.replace(out)
    except BaseException:
        tmp_file.unlink(missing_ok=True)
        raise
    return out
