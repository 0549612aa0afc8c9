"""GGUF files of llama.cpp's `grok` architecture, written and read with the `gguf` package.

Names (ours -> GGUF): embed -> token_embd, norm -> output_norm, and per layer attn_norm, attn_q, attn_k,
attn_v, attn_output, attn_output_norm (post-attention), ffn_norm (pre-MoE), ffn_gate_inp (router),
ffn_gate_exps (W1, the GELU branch), ffn_up_exps (V), ffn_down_exps (W2), layer_output_norm (post-MoE).
Experts are stacked, [E, out, in] in numpy's order. The head is tied: no `output` tensor is written
(llama.cpp then uses token_embd), as for the released model.

Types (`--type`):
- q8_0: the released int8 values re-blocked into Q8_0's 32-column blocks, each block taking its
  released scale as f16: exact wherever the scale groups are whole blocks and f16 holds the scale
  (the released model's groups are 6144, 768 and 4096 columns). A weight whose groups do not split
  into whole blocks is written F32 (int8 x bf16 products are exact in F32). Weights that were never
  int8 are quantized to Q8_0 by the `gguf` package.
- f16 / bf16: every weight dequantized to that type.
- q4_0: every weight quantized to Q4_0 by the `gguf` package (from the dequantized int8).
The embedding, fp32 as released, stays F32 in every type unless `--embedding-type` (f16, bf16 or q8_0)
asks otherwise: rounding it to bf16 alone moved the golden case's fp32 logits from 0.005 to 0.044 mean
|diff| (a router choice flips), and to f16 then bf16 (a bf16 run of an f16 file) to 0.07; it is 0.5% of
Grok-1, but the head is tied, so llama.cpp reads it whole every token. Norms and routers are F32 (as
llama.cpp's converter keeps them).

Reading maps each tensor back by name and shape. Q8_0 weights become int8 with the grouping recorded in
`groklm.int8_groups` (written here), else with 32-column groups; their f16 scales are rounded to bf16
(exact for files written here). Other types are dequantized by the `gguf` package, then kept in the
compute dtype or, with `bits`, quantized with the released grouping; the embedding table is read (and
dequantized) a block of rows at a time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import Tensor

from groklm.config import GrokConfig
from groklm.files import CheckpointError, parse_json, progress_bar
from groklm.formats.common import Item, Tensors, part_of, parts
from groklm.formats.gguf_scan import Scan, scan

ARCH = "grok"
TYPES = ("q8_0", "f16", "bf16", "q4_0")
EMBEDDING_TYPES = ("f32", "f16", "bf16", "q8_0")  # `--embedding-type`, as llama-quantize's --token-embedding-type
_EMBEDDING_T = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
# Float and the block types that `gguf.quants.dequantize` reads (named here: the package keeps its own list private).
_READABLE = {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K}
_TABLE_ROWS = 4096  # the embedding table is read this many rows at a time
_TOP = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
_LAYER = {
    "attn_norm.weight": "blk.{i}.attn_norm.weight",
    "attn.wq.weight": "blk.{i}.attn_q.weight",
    "attn.wk.weight": "blk.{i}.attn_k.weight",
    "attn.wv.weight": "blk.{i}.attn_v.weight",
    "attn.wo.weight": "blk.{i}.attn_output.weight",
    "attn_out_norm.weight": "blk.{i}.attn_output_norm.weight",
    "moe_norm.weight": "blk.{i}.ffn_norm.weight",
    "moe.router.weight": "blk.{i}.ffn_gate_inp.weight",
    "moe.w1.weight": "blk.{i}.ffn_gate_exps.weight",
    "moe.v.weight": "blk.{i}.ffn_up_exps.weight",
    "moe.w2.weight": "blk.{i}.ffn_down_exps.weight",
    "moe_out_norm.weight": "blk.{i}.layer_output_norm.weight",
}
_Q8_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", 32)])
_FILE_TYPES = {"q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}  # fmt: skip


def names(config: GrokConfig) -> list[tuple[str, str]]:
    """(our parameter, GGUF name) of every tensor, in file order."""
    out = list(_TOP.items())
    for i in range(config.num_layers):
        out += [(f"layers.{i}.{ours}", theirs.format(i=i)) for ours, theirs in _LAYER.items()]
    return out


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def find_gguf(path: Path) -> Path | None:
    """The GGUF file itself, or the only .gguf in a directory."""
    if path.is_file():
        return path if is_gguf(path) else None
    found = [p for p in sorted(path.glob("*.gguf")) if is_gguf(p)] if path.is_dir() else []
    if len(found) > 1:
        raise CheckpointError(f"{path}: holds {len(found)} GGUF files; give the one to load")
    return found[0] if found else None


# -- writing -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Planned:
    ours: str
    name: str
    qtype: T
    shape: tuple[int, ...]  # logical, numpy order


def plan(model: Tensors, qtype: str, embedding_type: str = "f32") -> list[Planned]:
    """The GGUF type of every tensor for `--type qtype` and `--embedding-type` (see the module docstring)."""
    if qtype not in TYPES:
        raise ValueError(f"GGUF type must be one of {TYPES}, not {qtype!r}")
    if embedding_type not in EMBEDDING_TYPES:
        raise ValueError(f"--embedding-type must be one of {EMBEDDING_TYPES}, not {embedding_type!r}")
    if embedding_type == "q8_0" and model.config.emb_size % 32:
        raise ValueError(f"--embedding-type q8_0 needs a width that is a multiple of 32, not {model.config.emb_size}")
    out = []
    for ours, name in names(model.config):
        groups = model.int8_groups(ours)
        stacked = name.endswith("_exps.weight")
        shape = ((model.config.num_experts,) if stacked else ()) + model.shape(ours)
        k = shape[-1]
        if ours.endswith("norm.weight") or ours.endswith("router.weight"):
            t = T.F32
        elif ours == "embed.weight":
            t = _EMBEDDING_T[embedding_type]
        elif qtype in ("f16", "bf16"):
            t = T.F16 if qtype == "f16" else T.BF16
        elif k % 32:
            t = T.F32 if qtype == "q8_0" else T.F16
        elif qtype == "q4_0":
            t = T.Q4_0
        elif groups is not None and (k // groups) % 32:
            t = T.F32  # scale groups that are not whole 32-column blocks: exact in F32
        else:
            t = T.Q8_0
        out.append(Planned(ours, name, t, shape))
    return out


def _byte_shape(p: Planned) -> tuple[tuple[int, ...], np.dtype]:
    if p.qtype in (T.F32, T.F16):
        return p.shape, np.dtype(np.float32 if p.qtype == T.F32 else np.float16)
    return gguf.quants.quant_shape_to_byte_shape(p.shape, p.qtype), np.dtype(np.uint8)


def _q8_exact(w: Tensor, scales: Tensor) -> np.ndarray:
    """Q8_0 blocks of an int8 weight [N, K] (row-major or block-major) with scales [N, G]: the int8
    values as they are, each 32-column block with its group's scale as f16."""
    n, k = w.shape
    per_block = scales.float().repeat_interleave(k // scales.shape[-1] // 32, dim=-1)  # [N, K/32]
    blocks = np.empty((n, k // 32), dtype=_Q8_BLOCK)
    blocks["qs"] = w.reshape(n, k // 32, 32).numpy()
    blocks["d"] = per_block.numpy().astype(np.float16)
    return blocks.view(np.uint8).reshape(n, -1)


def _encode(p: Planned, dense: Tensor) -> np.ndarray:
    """A float tensor (fp32) as the planned GGUF type."""
    a = dense.detach().float().numpy()
    if p.qtype == T.F32:
        return a
    if p.qtype == T.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, p.qtype)


def _chunks(model: Tensors, p: Planned) -> Iterator[np.ndarray]:
    """The planned tensor's bytes: whole, or one expert at a time for stacked experts (so one fp32
    expert is the largest temporary, and no stacked copy is ever made)."""
    stacked = p.name.endswith("_exps.weight")
    for e in range(p.shape[0]) if stacked else [None]:
        if p.qtype == T.Q8_0 and model.int8_groups(p.ours) is not None:
            yield _q8_exact(*model.int8(p.ours, e))
        else:
            yield _encode(p, model.dense(p.ours, e))


def _write_chunks(writer: gguf.GGUFWriter, chunks: Iterator[np.ndarray], bar: Any) -> None:
    """`writer.write_tensor_data` for a tensor that comes in chunks along its first axis (that takes
    whole arrays only): the next announced tensor's bytes, aligned as the writer aligns them, with the
    writer's own padding and bookkeeping (gguf's single-file writer)."""
    fout = writer.fout[0]
    name = next(iter(writer.tensors[0]))
    info = writer.tensors[0].pop(name)
    writer.write_padding(fout, fout.tell())
    written = 0
    for chunk in chunks:
        chunk.tofile(fout)
        written += chunk.nbytes
        bar.update(chunk.nbytes)
    if written != info.nbytes:
        raise ValueError(f"GGUF tensor {name}: wrote {written} bytes of {info.nbytes}")
    writer.write_padding(fout, written)
    writer.state = gguf.gguf_writer.WriterState.WEIGHTS


def _vocabulary(writer: gguf.GGUFWriter, tokenizer: Path | None, config: GrokConfig) -> None:
    """The SentencePiece vocabulary as llama.cpp's converter writes it (pieces, scores, token types, the
    special ids), with no BOS added, as the reference adds none."""
    writer.add_pad_token_id(config.pad_token)
    writer.add_eos_token_id(config.eos_token)
    if tokenizer is None:
        return
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    pieces, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(
            gguf.TokenType.UNKNOWN if sp.is_unknown(i) else gguf.TokenType.CONTROL if sp.is_control(i)
            else gguf.TokenType.UNUSED if sp.is_unused(i) else gguf.TokenType.BYTE if sp.is_byte(i)
            else gguf.TokenType.NORMAL
        )  # fmt: skip
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(pieces)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)


def write(model: Tensors, out: Path, qtype: str = "q8_0", tokenizer: Path | None = None,
          progress: bool = True, embedding_type: str = "f32") -> None:  # fmt: skip
    """Write the model the layer above gives, a part at a time (see `common.Tensors`), as one GGUF file.
    Every tensor's name, type and size is declared first (from the layout alone), then the data is
    written part by part: memory holds one part and one tensor's encoding."""
    config = model.config
    planned = plan(model, qtype, embedding_type)
    writer = gguf.GGUFWriter(out, ARCH)
    writer.add_name("Grok-1")
    writer.add_context_length(config.sequence_len)
    writer.add_embedding_length(config.emb_size)
    writer.add_block_count(config.num_layers)
    writer.add_feed_forward_length(config.ffn_size)
    writer.add_expert_feed_forward_length(config.ffn_size)
    writer.add_head_count(config.num_q_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_key_length(config.key_size)
    writer.add_value_length(config.key_size)
    writer.add_rope_dimension_count(config.key_size)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_expert_count(config.num_experts)
    writer.add_expert_used_count(config.num_selected_experts)
    writer.add_embedding_scale(config.embedding_multiplier_scale)
    writer.add_logit_scale(config.output_multiplier_scale)
    writer.add_attn_output_scale(config.attn_output_multiplier)
    writer.add_attn_logit_softcapping(config.attn_softcap)
    writer.add_file_type(_FILE_TYPES[qtype])
    _vocabulary(writer, tokenizer, config)
    groups = {p.name: model.int8_groups(p.ours) for p in planned
              if p.qtype == T.Q8_0 and model.int8_groups(p.ours) is not None}  # fmt: skip
    writer.add_string("groklm.config", json.dumps(config.to_dict()))
    writer.add_string("groklm.int8_groups", json.dumps(groups))
    for p in planned:
        shape, dtype = _byte_shape(p)
        writer.add_tensor_info(p.name, shape, dtype, math.prod(shape) * dtype.itemsize, raw_dtype=p.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    bar = progress_bar(sum(math.prod(_byte_shape(p)[0]) * _byte_shape(p)[1].itemsize for p in planned),
                       f"writing {out.name}", progress, unit="B")  # fmt: skip
    for part in parts(config):
        model.read(part)
        for p in planned:
            if part_of(p.ours) != part:
                continue
            if p.ours == "embed.weight":  # the largest float table: streamed in rows
                _write_chunks(writer, (_encode(p, rows) for rows in model.table_rows()), bar)
                continue
            _write_chunks(writer, _chunks(model, p), bar)
            model.done(p.ours)  # its memory goes now
        model.drop(part)
    writer.close()
    bar.close()


# -- reading -----------------------------------------------------------------------------------------


def config_from_gguf(found: Scan, where: str) -> GrokConfig:
    """The config of a scanned GGUF (`gguf_scan.scan`): groklm's own where it wrote one, else from llama.cpp's
    keys, every value checked before it is used."""
    fields = found.fields
    saved = fields.get("groklm.config")
    if saved is not None:
        if not isinstance(saved, str):
            raise CheckpointError(f"{where}: key groklm.config is not a string")
        try:
            return GrokConfig.from_dict(parse_json(saved, f"{where}: key groklm.config"))
        except ValueError as e:
            raise ValueError(f"{where}: key groklm.config: {e}") from None
    from groklm.config import need_ints, need_numbers
    from groklm.formats.hf import widening_for

    a = ARCH
    ints = ("embedding_length", "attention.head_count", "attention.head_count_kv", "attention.key_length",
            "block_count", "feed_forward_length", "expert_feed_forward_length", "expert_count", "expert_used_count",
            "context_length")  # fmt: skip
    need_ints({f"key {a}.{k}": fields.get(f"{a}.{k}") for k in ints}, tuple(f"key {a}.{k}" for k in ints), where)
    floats = ("embedding_scale", "logit_scale", "attention.output_scale", "rope.freq_base",
              "attention.layer_norm_rms_epsilon", "attn_logit_softcapping")  # fmt: skip
    need_numbers({f"key {a}.{k}": fields.get(f"{a}.{k}") for k in floats}, tuple(f"key {a}.{k}" for k in floats),
                 where)  # fmt: skip
    for key in ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.eos_token_id"):
        if key in fields and type(fields[key]) is not int:
            raise ValueError(f"{where}: key {key} must be an integer, not {str(fields[key])[:40]!r}")

    def need(key: str) -> Any:
        value = fields.get(f"{a}.{key}")
        if value is None:
            raise ValueError(f"{where}: no key {a}.{key}")
        return value

    embd = found.tensors.get("token_embd.weight")
    if embd is None:
        raise CheckpointError(f"{where}: no tensor token_embd.weight")
    if len(embd.shape) != 2:
        raise CheckpointError(f"{where}: tensor token_embd.weight: shape {embd.shape}, expected [vocabulary, width]")
    emb, heads = need("embedding_length"), need("attention.head_count")
    ffn = fields.get(f"{a}.expert_feed_forward_length") or need("feed_forward_length")
    try:
        # Absent multipliers take Grok-1's values, as llama.cpp's loader assumes for old files.
        return GrokConfig(
            vocab_size=embd.shape[0],
            emb_size=emb,
            key_size=fields.get(f"{a}.attention.key_length") or emb // heads,
            num_q_heads=heads,
            num_kv_heads=need("attention.head_count_kv"),
            num_layers=need("block_count"),
            widening_factor=widening_for(ffn, emb),
            num_experts=need("expert_count"),
            num_selected_experts=need("expert_used_count"),
            sequence_len=need("context_length"),
            pad_token=fields.get("tokenizer.ggml.padding_token_id", 0),
            eos_token=fields.get("tokenizer.ggml.eos_token_id", 2),
            embedding_multiplier_scale=float(fields.get(f"{a}.embedding_scale", 78.38367176906169)),
            output_multiplier_scale=float(fields.get(f"{a}.logit_scale", 0.5773502691896257)),
            attn_output_multiplier=float(fields.get(f"{a}.attention.output_scale", 0.08838834764831845)),
            rope_base=float(fields.get(f"{a}.rope.freq_base", 10000.0)),
            norm_eps=float(need("attention.layer_norm_rms_epsilon")),
            attn_softcap=float(fields.get(f"{a}.attn_logit_softcapping", 30.0)),
        )
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def check_names(found: Scan, config: GrokConfig, where: str) -> None:
    """The tensors a grok GGUF of this config holds, by name, before any model is built for it."""
    expected = {name for _, name in names(config)}
    missing = [name for _, name in names(config) if name not in found.tensors]
    unexpected = [n for n in found.tensors if n not in expected and n != "output.weight"]
    if missing or unexpected:
        raise CheckpointError(f"{where}: tensor names do not match a grok GGUF of {config.num_layers} layers: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]}")  # fmt: skip


def read_config(file: Path, config: GrokConfig | None = None) -> tuple[GrokConfig, Scan]:
    """The config of a GGUF file (checked against `config` if given), its tensor names checked against it,
    and the scan it came from."""
    found = scan(file)
    if found.fields.get("general.architecture") != ARCH:
        raise CheckpointError(f"{file}: a GGUF of the {found.fields.get('general.architecture')!r} architecture, "
                              f"not {ARCH!r}")  # fmt: skip
    result = config_from_gguf(found, str(file))
    if config is not None and config != result:
        raise CheckpointError(f"{file}: its metadata differs from the config given")
    check_names(found, result, str(file))
    return result, found


class GGUFSource:
    """A `grok` GGUF file opened for reading (see `common.Source`): names, counts and extents are checked
    before the gguf package reads the file, shapes against the model laid out for it before any tensor is
    read. Q8_0 weights are yielded as their int8 values and scales where the model holds them int8."""

    def __init__(self, path: str | Path, config: GrokConfig | None = None, int8_head: bool = False) -> None:
        self.path = path = Path(path)
        self.int8_head = int8_head
        found, scanned = read_config(path, config)
        self.config = found
        saved = scanned.fields.get("groklm.int8_groups")
        groups = parse_json(saved, f"{path}: key groklm.int8_groups") if isinstance(saved, str) else {}
        if not isinstance(groups, dict):
            raise CheckpointError(f"{path}: key groklm.int8_groups is not a JSON object")
        self.quantized: dict[str, tuple[int, int]] = {}  # Q8_0 weights stay int8
        for ours, name in names(found):
            t = scanned.tensors[name]
            if t.qtype not in _READABLE:
                raise CheckpointError(f"{path}: tensor {name}: type {t.qtype.name}, not a float or quantized "
                                      f"type groklm reads")  # fmt: skip
            if t.qtype == T.Q8_0 and ours == "embed.weight":
                continue  # a float table: dequantized as read
            if t.qtype == T.Q8_0:
                g = groups.get(name, t.shape[-1] // 32)
                if type(g) is not int or g <= 0 or (t.shape[-1] // 32) % g:
                    raise CheckpointError(f"{path}: tensor {name}: {g!r} int8 groups do not split its "
                                          f"{t.shape[-1] // 32} Q8_0 blocks a row")  # fmt: skip
                self.quantized[ours.rpartition(".")[0]] = (8, g)
        try:
            self.reader = reader = gguf.GGUFReader(path)
        except (ValueError, OSError, IndexError, KeyError) as e:
            raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from None
        tensors = {t.name: t for t in reader.tensors}
        self.table = [(ours, name, tensors[name], tuple(int(n) for n in reversed(tensors[name].shape)))
                      for ours, name in names(found)]  # fmt: skip
        self.raw: set[str] = set()

    def check(self, held: dict[str, Tensor], dense: Callable[[str], tuple[int, ...]]) -> None:
        for ours, name, t, shape in self.table:
            expected = ((self.config.num_experts,) if name.endswith("_exps.weight") else ()) + dense(ours)
            if shape != expected:
                raise CheckpointError(f"{self.path}: tensor {name}: shape {shape}, expected {expected}")
            if t.tensor_type == T.Q8_0 and held[ours].dtype == torch.int8:  # (not where quantized to int4)
                self.raw.add(ours)

    def tensors(self, part: str) -> Iterator[Item]:
        for ours, name, t, shape in self.table:
            if part_of(ours) != part:
                continue
            where = f"{self.path}: tensor {name}"
            if ours == "embed.weight":  # a block of rows at a time: no second copy of the table
                for r0 in range(0, shape[0], _TABLE_ROWS):
                    rows = slice(r0, min(r0 + _TABLE_ROWS, shape[0]))
                    table = _decode(np.asarray(t.data[rows]), t.tensor_type)
                    yield ours, rows, torch.from_numpy(np.array(table)), where
                continue
            stacked = name.endswith("_exps.weight")
            for e in range(shape[0]) if stacked else [None]:
                data = np.asarray(t.data[e] if stacked else t.data)
                if ours in self.raw:
                    q, scales = self._q8(data, self.quantized[ours.rpartition(".")[0]][1], where)
                    yield ours, e, q, where
                    yield ours.removesuffix("weight") + "scales", e, scales, where
                else:
                    yield ours, e, torch.from_numpy(np.array(_decode(data, t.tensor_type))), where

    @staticmethod
    def _q8(data: np.ndarray, groups: int, where: str) -> tuple[Tensor, Tensor]:
        """Q8_0 blocks as int8 values [N, K] and their scales [N, groups] (one a group, as recorded)."""
        blocks = np.ascontiguousarray(data).view(_Q8_BLOCK)  # [N, K/32]
        n = blocks.shape[0]
        per_group = blocks.shape[1] // groups
        d = torch.from_numpy(blocks["d"].astype(np.float32))  # [N, K/32]
        if not torch.equal(d, d[:, ::per_group].repeat_interleave(per_group, dim=1)):
            raise CheckpointError(f"{where}: Q8_0 block scales differ within the {groups} groups recorded for it")
        return torch.from_numpy(np.ascontiguousarray(blocks["qs"]).reshape(n, -1)), d[:, ::per_group]

    def __len__(self) -> int:
        per = {ours: 2 if ours in self.raw else 1 for ours, *_ in self.table}
        per["embed.weight"] = -(-self.config.vocab_size // _TABLE_ROWS)
        return sum(
            per[ours] * (shape[0] if name.endswith("_exps.weight") else 1) for ours, name, _, shape in self.table
        )


def _decode(data: np.ndarray, qtype: T) -> np.ndarray:
    if qtype == T.F32:
        return data
    if qtype == T.F16:
        return data.astype(np.float32)
    return gguf.quants.dequantize(data, qtype)
