"""`load(path, ...)`: find out which format a checkpoint is in, build the model on the meta device,
stream its tensors into place, and apply the transforms the caller asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import CheckpointError, progress_bar, return_freed_memory
from groklm.model import Grok

ConfigLike = GrokConfig | dict[str, Any] | str | Path | None


def as_config(config: ConfigLike) -> GrokConfig | None:
    """A GrokConfig from a GrokConfig, a dict (our field names or the reference's, as `case.json`'s
    `config` object), or the path of a JSON file holding one."""
    if config is None or isinstance(config, GrokConfig):
        return config
    if isinstance(config, dict):
        return GrokConfig.from_dict(config)
    if isinstance(config, (str, Path)):
        return GrokConfig.from_json(config)
    raise TypeError(f"config must be a GrokConfig, a dict or a JSON path, not {type(config).__name__}")


def detect_format(path: str | Path) -> str:
    """Which format a checkpoint is in: "released" (the Grok-1 pickles, `ckpt-0/`), "grok2" (Grok-2's
    released TP shards), "native" (groklm's safetensors layout), "hf" (a Hugging Face Grok-1 directory)
    or "gguf" (a GGUF file, or a directory holding one)."""
    from groklm.formats.gguf import find_gguf
    from groklm.formats.grok2 import is_grok2
    from groklm.formats.hf import is_hf
    from groklm.formats.native import is_native

    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if p.is_file():
        if find_gguf(p):
            return "gguf"
        raise CheckpointError(f"{p}: not a directory or a GGUF file (give the checkpoint's directory)")
    if is_native(p):
        return "native"
    if (p / "ckpt-0").is_dir() or any(p.glob("tensor*_000")):
        return "released"
    if is_grok2(p):
        return "grok2"
    if is_hf(p):
        return "hf"
    if find_gguf(p):
        return "gguf"
    raise CheckpointError(
        f"{p}: no checkpoint found: expected the released Grok-1 ckpt-0/tensorNNNNN_000 files, Grok-2's "
        "pytorch_model-NNNNN-TP-*.safetensors, groklm's model-NNNNN.safetensors shards, a Hugging Face Grok-1 "
        "directory or a GGUF file"
    )


def checkpoint_config(path: str | Path, config: ConfigLike = None) -> tuple[GrokConfig, str]:
    """The config a checkpoint will be loaded with, and where it comes from, without reading any
    weights: what a command checks its settings against before the expensive part."""
    config = as_config(config)
    fmt = detect_format(path)
    if fmt == "native":
        from groklm.formats.native import shard_files

        found = GrokConfig.from_json(Path(path) / "config.json")
        shard_files(Path(path), found.num_layers)
        if config is not None and config != found:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        return found, f"{Path(path) / 'config.json'}"
    if fmt == "grok2":
        from groklm.formats.grok2 import read_config

        found = read_config(Path(path))
        if config is not None and config != found:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        return found, str(Path(path) / "config.json")
    if fmt == "hf":
        from groklm.formats.hf import read_config as hf_config

        where = Path(path) / "config.json"
        found = hf_config(Path(path))
        if config is not None and config != found:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        return found, str(where)
    if fmt == "gguf":
        from groklm.formats.gguf import find_gguf, read_config

        file = find_gguf(Path(path))
        found, _ = read_config(file, config)
        return found, str(file)
    from groklm.formats.released import checkpoint_config as released_config
    from groklm.formats.released import find_ckpt_dir, find_config

    ckpt = find_ckpt_dir(path)
    found = find_config(ckpt)
    chosen = released_config(ckpt, config)
    source = "config.json" if found else "the config given" if config else "Grok-1's (assumed: no config.json)"
    return chosen, f"{ckpt} with {source}"


def load(
    path: str | Path,
    config: ConfigLike = None,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
    quantize_head: bool | None = None,
    mmap: bool = False,
    bits: int | None = None,
    tp: int = 1,
    ep: int = 1,
) -> Grok:
    """Load a checkpoint into a Grok model, in whichever format it is (`detect_format`).

    `config` (a GrokConfig, a dict, or a JSON path) is needed only where the checkpoint has no
    config.json; where it has one, a different config is an error. Released format: int8 weights
    stay int8.

    Peak memory is the model plus one bounded read chunk: the model is built on the meta device,
    given uninitialised storage, and every tensor is copied from its file straight into place.
    `mmap` (groklm's layout only) leaves the weights in the files' memory maps, paged in on use.
    `quantize_head` (default: when dtype is bf16, the fast dtype, on CPU) gives the output
    projection an int8 copy of the embedding table (see `quant.quantize_output_head`), made from the
    file's fp32 rows; the input lookup then reads those rows from the file (`MappedEmbedding`), so
    no float copy of the table is held at all. `bits` (8 or 4) quantizes the float weights of a Hugging
    Face or GGUF checkpoint as they load, int8 with the released grouping.

    `tp` x `ep` > 1 (in an initialised process group of that many ranks, as torchrun starts): this
    rank's share of the model only (`parallel`), its bytes read from the files and nothing more; calling
    it on tokens gives the full logits on every rank.

    In bf16 on the CPU (not memory-mapped), int4 weights are then laid out in the native kernel's
    panels (`quant.pack_int4`); `save_native` writes them back in rows.
    """
    config = as_config(config)
    fmt = detect_format(path)
    if bits not in (None, 8, 4):
        raise ValueError(f"bits must be 8, 4 or None, not {bits}")
    if quantize_head is None:
        quantize_head = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    if (tp, ep) != (1, 1):
        if mmap:
            raise ValueError("mmap loading is for one process; a tensor-parallel rank reads its own share")
        from groklm import parallel

        found, _ = checkpoint_config(path, config)
        mesh = parallel.make_mesh(found, tp, ep, device)  # every check before any weight is read
        model = load_sharded(path, mesh, found, dtype, device, progress, quantize_head and fmt != "native", bits)
        return _for_kernels(model, dtype, device)
    if fmt == "native":
        from groklm.formats.native import load_native

        model = load_native(path, dtype, device, mmap=mmap)
        if config is not None and config != model.config:
            raise CheckpointError(f"{path}: its config.json differs from the config given")
        return model if mmap else _for_kernels(model, dtype, device)
    if mmap:
        raise ValueError(
            f"{path}: mmap loading needs groklm's own layout (the {fmt} files are not laid out as it runs); "
            "write it once with `groklm quantize --bits 8 --checkpoint IN --out OUT`"
        )
    if fmt == "released":
        from groklm.formats.released import open_released

        if bits not in (None, 8):
            raise ValueError(f"{path}: the released checkpoint is int8; write an int4 copy with `groklm quantize`")
        released = open_released(path, config, dtype, quantize_head)
        bar = progress_bar(len(released.params), f"loading {released.ckpt}", progress)
        for part in released.parts():
            released.fill(part, device, bar)
        bar.close()
        return released.model.eval().requires_grad_(False)
    from groklm.formats.convert import open_source
    from groklm.formats.layout import parts

    source = open_source(path, config, dtype, bits)
    model = source.model
    if quantize_head:  # filled from the table as it is read (see `layout.place`)
        from groklm.quant import int8_head

        with torch.device("meta"):
            model.head = int8_head(model.config, dtype)
    bar = progress_bar(len(source), f"loading {path}", progress)  # type: ignore[arg-type]
    for part in parts(model):
        source.fill(part, device, bar)
    bar.close()
    return _for_kernels(model.eval().requires_grad_(False), dtype, device)


def _for_kernels(model: Grok, dtype: torch.dtype, device: str | torch.device) -> Grok:
    """In bf16 on the CPU with the native kernels: int4 weights laid out in their panels (`quant.pack_int4`).
    A model without int4 weights is left alone, the kernels not even loaded (which costs memory)."""
    from groklm.quant import Int4ExpertLinear, Int4Linear, pack_int4

    int4 = any(isinstance(m, (Int4Linear, Int4ExpertLinear)) for m in model.modules())
    if int4 and torch.device(device).type == "cpu" and dtype == torch.bfloat16 and kernels.available():
        pack_int4(model)
    return model


def load_sharded(path: str | Path, mesh: Any, config: GrokConfig, dtype: torch.dtype = torch.bfloat16,
                 device: str | torch.device = "cpu", progress: bool = True, quantize_head: bool = False,
                 bits: int | None = None) -> Grok:  # fmt: skip
    """This rank's share of a checkpoint on `mesh` (see `parallel`), laid out on the meta device and
    filled with its slices only. The released pickles and groklm's layout are read slice by slice (each
    rank reads its bytes, seeking within the files); the other formats a part (a layer) at a time,
    sliced, the part then dropped. `quantize_head`: the int8 output head from the released fp32 table's
    rows (the rank's vocabulary)."""
    from groklm import parallel
    from groklm.formats.convert import open_source
    from groklm.formats.layout import free, part_of, parts
    from groklm.quant import Int8Linear, fill_int8_head, int8_head

    source = open_source(path, config, dtype, bits)
    whole = source.model
    if quantize_head:
        with torch.device("meta"):
            whole.head = int8_head(whole.config, dtype)
    p, groups = parallel.plan_of(whole.config, mesh)
    model = parallel.apply_plan(whole, p, groups)  # laid out on meta
    model.to_empty(device=device)
    names = parallel.filled_modules(model)
    bar = progress_bar(
        len(names), f"loading {path} (tp rank {p.tp_rank} of {p.tp}, ep rank {p.ep_rank} of {p.ep})", progress
    )
    lazy = getattr(source, "lazy", None)
    head = model.head.local  # type: ignore[union-attr]
    with torch.no_grad():
        if lazy is not None:
            if quantize_head or "embed" in names:  # the table's rows: the embedding, and the int8 head from them
                table, start = lazy("embed.weight"), p.vocab().start
                local_rows = p.vocab().stop - start
                for r in range(0, local_rows, 4096):
                    n = min(4096, local_rows - r)
                    rows = table.read((slice(start + r, start + r + n), slice(None)))
                    model.embed.weight[r : r + n] = rows
                    if quantize_head and isinstance(head, Int8Linear):
                        fill_int8_head(head, r, rows.float())
            done = {"embed", "head.local"} if quantize_head else {"embed"}
            for name in names:
                if name not in done:
                    parallel.fill_module(model, whole, p, name, lambda n, sl: lazy(n).read(sl))
                    return_freed_memory()
                bar.update(1)
        else:
            read = parallel.model_reader(whole)
            for part in parts(whole):
                source.fill(part, "cpu")
                for name in names:
                    if part_of(parallel.global_name(name)) == part:
                        parallel.fill_module(model, whole, p, name, read)
                        bar.update(1)
                free(whole, part)
    bar.close()
    return model.eval().requires_grad_(False)
