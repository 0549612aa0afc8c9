"""The commands that write, check or describe a checkpoint, as typed functions: `init_random`, `quantize`,
`convert`, `verify` and `info` check their arguments (`UsageError` naming the option) and call the format
modules; they return what they wrote or found, and print nothing."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from groklm.config import GrokConfig, get_preset
from groklm.runtime import UsageError, license_of


def copy_tokenizer(src: Path, out: Path) -> None:
    """The tokenizer in or next to checkpoint `src`, copied into the new checkpoint `out`."""
    for name in ("tokenizer.model", "tokenizer.tok.json"):
        for tok in (src / name, src.parent / name):
            if tok.is_file():
                shutil.copy(tok, out / name)
                return


def init_random(*, out: str, config: GrokConfig | None = None, seed: int = 0, tokenizer: str | None = None,
                force: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """A random-weight checkpoint in the released format (default: the mini preset); its ckpt-0/ directory."""
    from groklm.convert import write_random_checkpoint

    ckpt = write_random_checkpoint(out, config or get_preset("mini"), seed=seed, progress=progress, force=force)
    if tokenizer:
        shutil.copy(tokenizer, Path(out) / "tokenizer.model")
    return ckpt


def quantize(*, checkpoint: str, out: str, bits: int = 4, group_size: int = 64, config: GrokConfig | None = None,
             force: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """The checkpoint in groklm's safetensors layout, int8 or int4, with its tokenizer."""
    from groklm.convert import to_native as write_native

    if bits == 8 and group_size != 64:
        raise UsageError("--group-size is for --bits 4 (int8 keeps the released scale groups)")
    write_native(checkpoint, out, bits, group_size, config, progress=progress, force=force)
    copy_tokenizer(Path(checkpoint), Path(out))
    return Path(out)


def convert(*, checkpoint: str, out: str, to: str, type: str | None = None, embedding_type: str | None = None,
            bits: int = 8, group_size: int = 64, config: GrokConfig | None = None, force: bool = False,
            progress: bool = True) -> Path:  # fmt: skip
    """The checkpoint in another format (`to`: hf, gguf or native), streamed; the file or directory written.
    `embedding_type` (gguf: f32, f16, bf16 or q8_0) is the embedding's, the tied head llama.cpp reads."""
    from groklm.convert import convert as write
    from groklm.formats import registry

    target = registry.by_name(to)
    if target.write_types and (bits != 8 or group_size != 64):
        raise UsageError("--bits and --group-size are for --to native (hf and gguf take --type)")
    if not target.write_types and type:
        raise UsageError("--type is for --to hf or gguf (native takes --bits)")
    if type and type not in target.write_types:
        raise UsageError(f"--type for --to {to} must be one of {', '.join(target.write_types)}, not {type!r}")
    if embedding_type and to != "gguf":
        raise UsageError("--embedding-type is for --to gguf")
    return Path(write(checkpoint, out, to, type, bits, group_size, config, progress=progress, force=force,
                      embedding_type=embedding_type or "f32"))  # fmt: skip


def verify(*, checkpoint: str, config: GrokConfig | None = None, sha256: str | None = None,
           progress: bool = True) -> Any:  # fmt: skip
    """The checkpoint's files checked (and against a `sha256sum` manifest): a `verify.Report`."""
    from groklm.verify import verify as check

    return check(checkpoint, config, Path(sha256) if sha256 else None, progress=progress)


def write_manifest(*, checkpoint: str, out: str, progress: bool = True) -> int:
    """`sha256sum` lines for every file of the checkpoint, written to `out`; how many files."""
    from groklm.verify import write_manifest as write

    return int(write(Path(checkpoint), Path(out), progress=progress))


def info(
    *, checkpoint: str | None = None, config: GrokConfig | None = None, source: str | None = None
) -> dict[str, Any]:
    """A model's config, parameter counts and the memory its weights take (int8, int4, bf16), from a checkpoint,
    a given config (`source` names it) or Grok-1's."""
    import torch

    from groklm.files import parameter_bytes
    from groklm.load import checkpoint_config
    from groklm.model import Grok
    from groklm.quant import quantize_int4, quantize_int8, released_groups

    if checkpoint:
        config, source = checkpoint_config(checkpoint, config)
    elif config is None:
        config, source = get_preset("grok-1"), "preset grok-1"
    total, active = config.param_counts()
    with torch.device("meta"):
        bf16 = parameter_bytes(Grok(config, torch.bfloat16))
        int8 = parameter_bytes(quantize_int8(Grok(config, torch.bfloat16), released_groups))
        int4 = parameter_bytes(quantize_int4(Grok(config, torch.bfloat16), 64))
    return {"source": source, "model": config.family, "config": config.to_dict(), "ffn_size": config.ffn_size,
            "parameters_total": total, "parameters_active_per_token": active, "memory_int8": int8,
            "memory_int4": int4, "memory_bf16": bf16, "license": license_of(config)}  # fmt: skip
