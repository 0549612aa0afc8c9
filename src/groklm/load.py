"""`load(path, ...)`: find out which format a checkpoint is in, build the model on the meta device,
stream its tensors into place, and apply the transforms the caller asked for."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from groklm import kernels, parallel, place
from groklm.config import GrokConfig
from groklm.files import progress_bar, return_freed_memory
from groklm.formats import registry
from groklm.formats.common import Source, part_of, parts
from groklm.model import Grok
from groklm.quant import Int4ExpertLinear, Int4Linear, Int8Linear, fill_int8_head, pack_int4

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


class OptionError(ValueError):
    """A load option the checkpoint cannot take: `str` says it as `load`'s keyword; `flag` and `reason` let
    a command say it as its option (`f"{e.flag} {e.reason}"`)."""

    def __init__(self, flag: str, reason: str, said: str) -> None:
        super().__init__(said)
        self.flag, self.reason = flag, reason


def checkpoint_config(path: str | Path, config: ConfigLike = None, *, mmap: bool = False, bits: int | None = None,
                      tp: int = 1, ep: int = 1) -> tuple[GrokConfig, str]:  # fmt: skip
    """The config a checkpoint will be loaded with, and where it comes from, without reading any weights,
    after checking `load`'s options against it (OptionError): the one check `load` and the commands make
    before the expensive part."""
    _, found, where = _checked(path, config, mmap, bits, tp, ep)
    return found, where


def _checked(path: str | Path, config: ConfigLike, mmap: bool, bits: int | None, tp: int,
             ep: int) -> tuple[registry.Format, GrokConfig, str]:  # fmt: skip
    fmt = registry.detect(path)
    found, where = fmt.read_config(Path(path), as_config(config))
    if bits not in (None, 8, 4):
        raise OptionError("--bits", "must be 8 or 4", f"bits must be 8, 4 or None, not {bits}")
    if not fmt.takes_bits(bits):
        reason = "is for Grok-2, Hugging Face and GGUF checkpoints (write int4 with `groklm quantize`)"
        raise OptionError("--bits", reason, f"{path}: bits {reason} (the {fmt.title} are quantized as stored)")
    if mmap and (tp, ep) != (1, 1):
        reason = "is for one process (each rank of --tp/--ep reads its own share into memory)"
        raise OptionError("--mmap", reason, f"mmap loading {reason.replace('--tp/--ep', 'tp x ep')}")
    if mmap and not fmt.mappable:
        reason = (f"needs groklm's own layout (the {fmt.name} files are not laid out as it runs); write it once with "
                  "`groklm quantize --bits 8 --checkpoint IN --out OUT`")  # fmt: skip
        raise OptionError("--mmap", reason, f"{path}: mmap loading {reason}")
    if (tp, ep) != (1, 1):
        parallel.plan(found, tp, ep)  # the layout splits this model (ParallelError)
    return fmt, found, where


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
    """Load a checkpoint into a Grok model, in whichever format it is (`formats.registry.detect`).

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
    panels (`quant.pack_int4`); `convert.save_native` writes them back in rows.
    """
    fmt, config, _ = _checked(path, config, mmap, bits, tp, ep)  # before any weight is read
    if mmap and torch.device(device).type != "cpu":
        raise ValueError("mmap loading is for the CPU")
    if quantize_head is None:
        quantize_head = dtype == torch.bfloat16 and torch.device(device).type == "cpu"
    sharded = (tp, ep) != (1, 1)
    mesh = parallel.make_mesh(config, tp, ep, device) if sharded else None  # the process group, before any file
    source = fmt.open(Path(path), config, int8_head=quantize_head, stream_table=sharded)
    model = place.build(source, dtype)  # on the meta device
    model = place.lay_out(model, source.quantized)  # int8 and int4 as stored
    model = place.quantize_on_load(model, bits if fmt.quantizes_on_load else None)
    model = place.with_int8_head(model, source.int8_head)  # filled from the table as it is read
    model = place.with_table(model, source)  # held, mapped from its file, or left there
    model = place.checked(model, source)  # every tensor's name and shape, before any is read
    if mmap:
        return place.mapped(model, source)
    if sharded:
        model = load_sharded(model, source, mesh, device, progress, f"loading {path}")
    else:
        bar = progress_bar(len(source), f"loading {path}", progress)
        model = place.fill(model, source, device, bar)
        bar.close()
    return for_kernels(model, dtype, device)


def for_kernels(model: Grok, dtype: torch.dtype, device: str | torch.device) -> Grok:
    """In bf16 on the CPU with the native kernels: int4 weights laid out in their panels (`quant.pack_int4`).
    A model without int4 weights is left alone, the kernels not even loaded (which costs memory)."""
    int4 = any(isinstance(m, (Int4Linear, Int4ExpertLinear)) for m in model.modules())
    if int4 and torch.device(device).type == "cpu" and dtype == torch.bfloat16 and kernels.available():
        pack_int4(model)
    return model


def load_sharded(whole: Grok, source: Source, mesh: Any, device: str | torch.device = "cpu", progress: bool = True,
                 what: str = "loading") -> Grok:  # fmt: skip
    """This rank's share of a checkpoint on `mesh` (`parallel.make_mesh`): the whole model as laid out
    for the source (on meta), sharded, and filled with its slices only. The released pickles and groklm's
    layout are read slice by slice (each rank reads its bytes, seeking within the files); the other formats
    a part (a layer) at a time, sliced, the part then dropped. An int8 output head made from the table is
    filled from the table's rows (the rank's vocabulary). Every call into `parallel` but `make_mesh` is here."""
    p, groups = parallel.plan_of(whole.config, mesh)
    model = parallel.apply_plan(whole, p, groups)  # laid out on meta
    model.to_empty(device=device)
    names = parallel.filled_modules(model)
    bar = progress_bar(len(names), f"{what} (tp rank {p.tp_rank} of {p.tp}, ep rank {p.ep_rank} of {p.ep})", progress)
    lazy = getattr(source, "lazy", None)
    head = model.head.local  # type: ignore[union-attr]
    head_from_table = source.int8_head and whole.config.tie_embeddings and isinstance(head, Int8Linear)
    with torch.no_grad():
        if lazy is not None:
            if head_from_table or "embed" in names:  # the table's rows: the embedding, and the int8 head from them
                table, start = lazy("embed.weight"), p.vocab().start
                local_rows = p.vocab().stop - start
                for r in range(0, local_rows, 4096):
                    n = min(4096, local_rows - r)
                    rows = table.read((slice(start + r, start + r + n), slice(None)))
                    model.embed.weight[r : r + n] = rows
                    if head_from_table:
                        fill_int8_head(head, r, rows.float())
            done = {"embed", "head.local"} if head_from_table else {"embed"}
            for name in names:
                if name not in done:
                    parallel.fill_module(model, whole, p, name, lambda n, sl: lazy(n).read(sl))
                    return_freed_memory()
                bar.update(1)
        else:
            read = parallel.model_reader(whole)
            for part in parts(whole.config):
                place.fill_part(whole, source, part, "cpu")
                for name in names:
                    if part_of(parallel.global_name(name)) == part:
                        parallel.fill_module(model, whole, p, name, read)
                        bar.update(1)
                place.free(whole, part)
    bar.close()
    return model.eval().requires_grad_(False)
