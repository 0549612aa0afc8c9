"""The one table of checkpoint formats: how each is recognised, where its config comes from, how it is
opened for reading, and what a caller may ask of it (memory-mapping, quantizing on load). Callers ask
`detect(path)` for a `Format` and use its properties; no module outside `formats/` tests a format's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from groklm.config import GrokConfig
from groklm.files import CheckpointError
from groklm.formats import gguf, grok2, hf, native, released


@dataclass(frozen=True)
class Format:
    """One on-disk format. `read_config(path, given)` gives (config, where it comes from) without reading any
    weights, `given` checked against what the files hold. `open(path, config, int8_head, stream_table)`
    opens it for reading as a `common.Source` of (our name, tensor): `int8_head` asks for the output head
    int8 as it is read (from the table, where tied), `stream_table` leaves the released fp32 table in its
    file (`table_rows`). `write(tensors, out, qtype, tokenizer, progress)` writes what the layer above
    gives (`common.Tensors`)."""

    name: str
    title: str  # what it is, for messages
    detect: Callable[[Path], bool]
    read_config: Callable[[Path, GrokConfig | None], tuple[GrokConfig, str]]
    open: Callable[..., Any]
    quantizes_on_load: bool = False  # float weights, quantized as read with `bits` 8 or 4
    holds_int8: bool = False  # int8 as stored, so `bits` 8 asks for what it is already
    file_per_tensor: bool = False  # one file a tensor (`verify` checks each)
    mappable: bool = False  # laid out as the model runs, so its files can be memory-mapped as they are
    write: Callable[..., None] | None = None  # write(source, out, qtype, tokenizer, progress), `groklm convert`
    write_types: tuple[str, ...] = ()  # its `--type`s, the default first
    writes_file: bool = False  # one file, not a directory

    def takes_bits(self, bits: int | None) -> bool:
        """Whether loading it with `bits` means anything (None always does)."""
        return bits is None or self.quantizes_on_load or (self.holds_int8 and bits == 8)


def _differs(path: Path, given: GrokConfig | None, found: GrokConfig) -> GrokConfig:
    if given is not None and given != found:
        raise CheckpointError(f"{path}: its config.json differs from the config given")
    return found


def _native_config(path: Path, given: GrokConfig | None) -> tuple[GrokConfig, str]:
    found = GrokConfig.from_json(path / "config.json")
    native.shard_files(path, found.num_layers)
    return _differs(path, given, found), str(path / "config.json")


def _released_config(path: Path, given: GrokConfig | None) -> tuple[GrokConfig, str]:
    ckpt = released.find_ckpt_dir(path)
    found = released.find_config(ckpt)
    chosen = released.checkpoint_config(ckpt, given)
    source = "config.json" if found else "the config given" if given else "Grok-1's (assumed: no config.json)"
    return chosen, f"{ckpt} with {source}"


def _grok2_config(path: Path, given: GrokConfig | None) -> tuple[GrokConfig, str]:
    return _differs(path, given, grok2.read_config(path)), str(path / "config.json")


def _hf_config(path: Path, given: GrokConfig | None) -> tuple[GrokConfig, str]:
    return _differs(path, given, hf.read_config(path)), str(path / "config.json")


def _gguf_config(path: Path, given: GrokConfig | None) -> tuple[GrokConfig, str]:
    file = gguf.find_gguf(path) or path
    return gguf.read_config(file, given)[0], str(file)


def _open_released(path: Path, config: GrokConfig | None, int8_head: bool = False,
                   stream_table: bool = False) -> released.Released:  # fmt: skip
    return released.open_released(path, config, int8_head, stream_table)


def _open_native(path: Path, config: GrokConfig | None, int8_head: bool = False,
                 stream_table: bool = False) -> native.NativeSource:  # fmt: skip
    return native.NativeSource(path, config)  # as stored: a quantized head is stored so


def _open_grok2(path: Path, config: GrokConfig | None, int8_head: bool = False,
                stream_table: bool = False) -> grok2.Grok2Source:  # fmt: skip
    return grok2.Grok2Source(path, config, int8_head)


def _open_hf(path: Path, config: GrokConfig | None, int8_head: bool = False,
             stream_table: bool = False) -> hf.HFSource:  # fmt: skip
    return hf.HFSource(path, config, int8_head)


def _open_gguf(path: Path, config: GrokConfig | None, int8_head: bool = False,
               stream_table: bool = False) -> gguf.GGUFSource:  # fmt: skip
    return gguf.GGUFSource(gguf.find_gguf(path) or path, config, int8_head)


def _is_released(path: Path) -> bool:
    return (path / "ckpt-0").is_dir() or any(path.glob("tensor*_000"))


def _write_hf(source: Any, out: Path, qtype: str, tokenizer: Path | None, progress: bool) -> None:
    hf.write(source, out, torch.float32 if qtype == "f32" else torch.bfloat16, tokenizer, progress)


NATIVE = Format("native", "groklm's own layout", native.is_native, _native_config, _open_native, mappable=True)
RELEASED = Format("released", "released Grok-1 pickles", _is_released, _released_config, _open_released,
                  holds_int8=True, file_per_tensor=True)  # fmt: skip
GROK2 = Format("grok2", "Grok-2 shards", grok2.is_grok2, _grok2_config, _open_grok2, quantizes_on_load=True)
HF = Format("hf", "Hugging Face directory", hf.is_hf, _hf_config, _open_hf, quantizes_on_load=True, write=_write_hf,
            write_types=("bf16", "f32"))  # fmt: skip
GGUF = Format("gguf", "GGUF file", lambda p: gguf.find_gguf(p) is not None, _gguf_config, _open_gguf,
              quantizes_on_load=True, write=gguf.write, write_types=gguf.TYPES, writes_file=True)  # fmt: skip
FORMATS = (NATIVE, RELEASED, GROK2, HF, GGUF)  # in the order they are tried
WRITABLE = (HF.name, GGUF.name, NATIVE.name)  # what `groklm convert --to` writes (groklm's own: `convert.to_native`)


def by_name(name: str) -> Format:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"no format {name!r}: one of {', '.join(f.name for f in FORMATS)}")


def detect(path: str | Path) -> Format:
    """The format a checkpoint is in: the released Grok-1 pickles (`ckpt-0/`), Grok-2's released TP shards,
    groklm's safetensors layout, a Hugging Face Grok-1 directory, or a GGUF file (or a directory holding one)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if p.is_file():
        if GGUF.detect(p):
            return GGUF
        raise CheckpointError(f"{p}: not a directory or a GGUF file (give the checkpoint's directory)")
    for fmt in FORMATS:
        if fmt.detect(p):
            return fmt
    raise CheckpointError(
        f"{p}: no checkpoint found: expected the released Grok-1 ckpt-0/tensorNNNNN_000 files, Grok-2's "
        "pytorch_model-NNNNN-TP-*.safetensors, groklm's model-NNNNN.safetensors shards, a Hugging Face Grok-1 "
        "directory or a GGUF file"
    )
