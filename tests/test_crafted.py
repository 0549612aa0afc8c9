"""Crafted and mismatched files of every format, tokenizer, adapter and config, given to the real CLI in a
child process: each ends in exactly one `error:` line naming the file and the field or tensor, exit status
1 or 2, no traceback and no abort, within 2 s of CPU and 200 MB, before any weight is read.

The child is forked from a fork server with everything imported (an interpreter that imports torch costs
seconds), resets its peak-memory mark and runs `cli.main` on the arguments; its exit status and signal come
from os.wait4. The files are made from a tiny random model written in groklm's layout and converted to the
others, then altered one field at a time."""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import shutil
import struct
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from groklm import cli, verify
from groklm.config import GrokConfig
from groklm.convert import convert, save_native
from groklm.formats import gguf, grok2, hf, native  # noqa: F401
from groklm.formats.gguf_scan import scan
from groklm.formats.safetensors_io import write_file
from groklm.model import Grok
from groklm.train import lora  # noqa: F401
from tests.conftest import SHARED, TOKENIZER, peak_rss_since_reset, reset_peak_rss

GROK2 = SHARED / "golden" / "grok2-tiny"
TINY = GrokConfig(vocab_size=256, emb_size=64, key_size=16, num_q_heads=4, num_kv_heads=2, num_layers=2,
                  widening_factor=1.5, num_experts=4, num_selected_experts=2, sequence_len=64,
                  embedding_multiplier_scale=8.0, attn_output_multiplier=0.25)  # fmt: skip
DEEP = "[" * 100_000 + "]" * 100_000  # Python's own parser ends in RecursionError on it
LIMIT_BYTES = 200 << 20
CPU_SECONDS = 2


# -- the tiny model in each format ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    save_native(Grok(TINY, torch.bfloat16), d / "native", progress=False)
    convert(d / "native", d / "hf", "hf", "bf16", progress=False)
    convert(d / "native", d / "tiny.gguf", "gguf", "q8_0", progress=False)
    return {"native": d / "native", "hf": d / "hf", "gguf": d / "tiny.gguf"}


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        shutil.copy(src, dst)
    return dst


def _edit_json(path: Path, change: Callable[[Any], Any]) -> None:
    data = json.loads(path.read_text())
    out = change(data)
    path.write_text(out if isinstance(out, str) else json.dumps(data if out is None else out))


def _set(**values: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.update(values)


# -- GGUF written by hand, so that any count or offset can be a lie ----------------------------------------


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _value(v: Any) -> bytes:
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<Iq", 11, v)
    if isinstance(v, float):
        return struct.pack("<Id", 12, v)
    return struct.pack("<I", 8) + _s(v)


def _gguf(kv: list[bytes], tensors: list[bytes] = (), data: bytes = b"", n_kv: int | None = None,
          n_tensors: int | None = None) -> bytes:  # fmt: skip
    """A GGUF file from encoded kv pairs and tensor infos, the data aligned to 32 bytes after them."""
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kv) if n_kv is None else n_kv)  # fmt: skip
    body = head + b"".join(kv) + b"".join(tensors)
    return body + b"\0" * (-len(body) % 32) + data if tensors else body


def _rewrite_gguf(src: Path, dst: Path, fields: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
                  tensors: Callable[[list[list[Any]]], None] | None = None) -> Path:  # fmt: skip
    """The GGUF file `src` written again with some fields changed or dropped, or its tensor table edited
    (rows of [name, dims fastest first, type, offset into the data])."""
    found = scan(src)
    values = {k: v for k, v in found.fields.items() if k not in drop}
    values.update(fields or {})
    rows = [[t.name, list(reversed(t.shape)), int(t.qtype), t.offset - found.data_start] for t in found.tensors.values()]
    if tensors is not None:
        tensors(rows)
    kv = [_s(k) + _value(v) for k, v in values.items()]
    infos = [_s(n) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", t, o)
             for n, dims, t, o in rows]  # fmt: skip
    dst.write_bytes(_gguf(kv, infos, src.read_bytes()[found.data_start :]))
    return dst


_ARCH = _s("general.architecture") + _value("grok")


def _gguf_cases(d: Path, base: dict[str, Path]) -> dict[str, Path]:
    g = base["gguf"]
    llama_keys = ("groklm.config",)  # without ours, the config comes from llama.cpp's keys
    out = {
        # An array of 2^62 uint8 items in a 161-byte file (the gguf package loops for ever on it).
        "huge-array": _gguf([_ARCH, _s("grok.huge") + struct.pack("<IIQ", 9, 0, 1 << 62) + b"\0" * 60]),
        "huge-string-array": _gguf([_ARCH, _s("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 1 << 62)]),
        "huge-kv-count": _gguf([_ARCH], n_kv=1 << 63),
        "huge-tensor-count": _gguf([_ARCH], n_tensors=1 << 60),
        "huge-key": b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 40) + b"\0" * 16,
        "nested-arrays": _gguf([_ARCH, _s("grok.nest") + struct.pack("<IIQIQIQ", 9, 9, 1, 9, 1, 0, 1) + b"\0"]),
        "truncated-key": _gguf([_ARCH, _s("grok.cut") + struct.pack("<IQ", 8, 1000) + b"abc"]),
    }
    paths = {}
    for name, raw in out.items():
        paths[name] = d / f"{name}.gguf"
        paths[name].write_bytes(raw)

    def overlap(rows: list[list[Any]]) -> None:
        rows[3][3] = rows[2][3]

    def past_end(rows: list[list[Any]]) -> None:
        rows[-1][3] += 1 << 20

    def bad_type(rows: list[list[Any]]) -> None:
        rows[1][2] = 99

    def embd_i32(rows: list[list[Any]]) -> None:
        rows[0][2] = 26  # token_embd as ggml's I32: its F32 bytes, a type no table is dequantized from

    edits: dict[str, dict[str, Any]] = {
        "head-count-0": {"drop": llama_keys, "fields": {"grok.attention.head_count": 0}},
        "block-count-1e9": {"drop": llama_keys, "fields": {"grok.block_count": 10**9}},
        "block-count-3": {"drop": llama_keys, "fields": {"grok.block_count": 3}},
        "head-count-string": {"drop": llama_keys, "fields": {"grok.attention.head_count": "eight"}},
        "config-deep": {"fields": {"groklm.config": DEEP}},
        "config-string": {"fields": {"groklm.config": '"grok"'}},
        "llama": {"fields": {"general.architecture": "llama"}},
        "groups-7": {"fields": {"groklm.int8_groups": json.dumps({"blk.0.attn_q.weight": 7})}},
        "overlap": {"tensors": overlap},
        "past-end": {"tensors": past_end},
        "bad-type": {"tensors": bad_type},
        "embd-i32": {"tensors": embd_i32},
    }
    for name, how in edits.items():
        paths[name] = _rewrite_gguf(g, d / f"{name}.gguf", how.get("fields"), how.get("drop", ()), how.get("tensors"))
    return paths


# -- adapters written by hand --------------------------------------------------------------------------


def _adapter(out: Path, config: GrokConfig, r: int = 4, targets: list[str] | None = None,
             layers: int | None = None) -> Path:  # fmt: skip
    """A PEFT adapter of attention q/v with rank r for `config` (`layers` of them), zeros."""
    out.mkdir()
    targets = targets or ["q_proj", "v_proj"]
    sizes = {"q_proj": (config.emb_size, config.q_size), "v_proj": (config.emb_size, config.kv_size)}
    tensors = []
    for i in range(config.num_layers if layers is None else layers):
        for t in targets:
            in_f, out_f = sizes[t]
            key = f"base_model.model.model.layers.{i}.attn.{t}"
            tensors += [(f"{key}.lora_A.weight", torch.float32, (r, in_f)), (f"{key}.lora_B.weight", torch.float32, (out_f, r))]
    write_file(out / "adapter_model.safetensors", tensors, iter([torch.zeros(s, dtype=dt) for _, dt, s in tensors]))
    (out / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 8,
                                                         "target_modules": targets}))  # fmt: skip
    return out


# -- tokenizers ----------------------------------------------------------------------------------------------


def _tok_json(change: Callable[[dict[str, Any]], Any] | None = None) -> str:
    data = json.loads((GROK2 / "tokenizer.tok.json").read_text())
    if change is not None:
        change(data)
    return json.dumps(data)


def _bad_byte(d: dict[str, Any]) -> None:
    d["regular_tokens"][300]["bytes"] = [3_000_000_000]


def _one_byte_short(d: dict[str, Any]) -> None:
    d["regular_tokens"] = [t for t in d["regular_tokens"] if t["bytes"] != [65]]


def _huge_rank(d: dict[str, Any]) -> None:
    d["regular_tokens"][300]["token"] = 1 << 40


def _deep_rank(d: dict[str, Any]) -> None:
    d["regular_tokens"][300]["token"] = "@DEEP@"


# -- the table ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def made(base: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every crafted file or directory, by case name."""
    d = tmp_path_factory.mktemp("crafted")
    paths = {f"gguf:{k}": v for k, v in _gguf_cases(d, base).items()}

    def variant(kind: str, name: str, file: str, change: Callable[[Any], Any]) -> None:
        src = base[kind] if kind != "grok2" else GROK2
        path = _copy(src, d / f"{kind}-{name}")
        _edit_json(path / file, change)
        paths[f"{kind}:{name}"] = path

    variant("hf", "config-string", "config.json", lambda c: json.dumps("grok-1"))
    variant("hf", "config-deep", "config.json", lambda c: DEEP)
    variant("hf", "layers-1e9", "config.json", lambda c: c["groklm"].update(num_layers=10**9))
    variant("hf", "layers-3", "config.json", lambda c: c["groklm"].update(num_layers=3))
    variant("hf", "heads-0", "config.json", lambda c: c.pop("groklm") and c.update(num_attention_heads=0))
    variant("hf", "experts-16", "config.json", lambda c: c["groklm"].update(num_experts=16))
    variant("native", "config-list", "config.json", lambda c: "[1, 2]")
    variant("native", "layers-1e9", "config.json", _set(num_layers=10**9))
    variant("native", "layers-3", "config.json", _set(num_layers=3))
    variant("native", "heads-5", "config.json", _set(num_q_heads=5))
    variant("native", "width-1e9", "config.json", _set(emb_size=10**9))
    variant("grok2", "layers-1e9", "config.json", _set(num_hidden_layers=10**9))
    variant("grok2", "head-dim-0", "config.json", _set(head_dim=0))
    variant("grok2", "hidden-string", "config.json", _set(hidden_size="8192"))
    variant("grok2", "config-deep", "config.json", lambda c: DEEP)
    variant("grok2", "layers-plus-1", "config.json", lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1))

    # A safetensors header nested 100 k deep, and one whose tensors overlap (HF shard 2, a layer).
    shard = sorted((base["hf"]).glob("model-*.safetensors"))[1].name
    for name in ("header-deep", "header-overlap"):
        path = _copy(base["hf"], d / f"hf-{name}")
        raw = (path / shard).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if name == "header-deep":
            text = json.dumps(header).replace('"pt"', DEEP[:5000] + DEEP[-5000:]).encode()
        else:
            a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
            size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
            header[b]["data_offsets"] = [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]
            text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        (path / shard).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        paths[f"hf:{name}"] = path

    tok = d / "tok"
    tok.mkdir()
    for name, change in (("bad-byte", _bad_byte), ("one-byte-short", _one_byte_short), ("huge-rank", _huge_rank),
                         ("wrong-vocab-size", lambda t: t.update(vocab_size=5)), ("a-list", None)):  # fmt: skip
        paths[f"tok:{name}"] = tok / f"{name}.tok.json"
        paths[f"tok:{name}"].write_text("[]" if change is None else _tok_json(change))
    paths["tok:deep"] = tok / "deep.tok.json"
    paths["tok:deep"].write_text(_tok_json(_deep_rank).replace('"@DEEP@"', DEEP))
    paths["tok:garbage.model"] = tok / "garbage.model"
    paths["tok:garbage.model"].write_bytes(b"\x0a\xff\xff\xff\xff\x0f" + os.urandom(200))
    paths["tok:grok-1"] = TOKENIZER

    ad = d / "adapters"
    ad.mkdir()
    paths["adapter:rank-1e9"] = _adapter(ad / "rank", TINY)
    _edit_json(ad / "rank" / "adapter_config.json", _set(r=10**9))
    paths["adapter:wrong-base"] = _adapter(ad / "wrong-base", TINY.replace(emb_size=128, key_size=32))
    paths["adapter:extra-layer"] = _adapter(ad / "extra-layer", TINY, layers=3)
    paths["adapter:mlp-on-grok-1"] = _adapter(ad / "mlp", TINY, targets=["q_proj"])
    _edit_json(ad / "mlp" / "adapter_config.json", _set(target_modules=["gate_proj"]))
    paths["adapter:config-deep"] = _adapter(ad / "deep", TINY)
    (ad / "deep" / "adapter_config.json").write_text(DEEP)
    paths["adapter:rank-string"] = _adapter(ad / "rank-string", TINY)
    _edit_json(ad / "rank-string" / "adapter_config.json", _set(r="4"))
    released = {"config-deep": DEEP, "layers-1e9": json.dumps({**TINY.to_dict(), "num_layers": 10**9}),
                "no-files": json.dumps(TINY.to_dict())}  # fmt: skip
    for name, text in released.items():
        paths[f"released:{name}"] = d / f"released-{name}"
        (d / f"released-{name}" / "ckpt-0").mkdir(parents=True)
        (d / f"released-{name}" / "config.json").write_text(text)
    paths["config:a-list"] = d / "list.json"
    paths["config:a-list"].write_text("[]")
    paths["config:deep"] = d / "deep.json"
    paths["config:deep"].write_text(DEEP)
    paths.update({f"base:{k}": v for k, v in base.items()})
    return paths


# (case, argv with {name} for a made path, the words the error line must hold besides the file's name)
GENERATE = "generate --prompt-ids 1,2 --json --max-new-tokens 1 --checkpoint"
CASES: list[tuple[str, str, str]] = [
    ("gguf:huge-array", "info --checkpoint {gguf:huge-array}", "key grok.huge: an array of 4611686018427387904 UINT8"),
    ("gguf:huge-string-array", "info --checkpoint {gguf:huge-string-array}", "key tokenizer.ggml.tokens: an array of"),
    ("gguf:huge-kv-count", "info --checkpoint {gguf:huge-kv-count}", "the kv count 9223372036854775808 needs"),
    ("gguf:huge-tensor-count", "info --checkpoint {gguf:huge-tensor-count}", "the tensor count 1152921504606846976"),
    ("gguf:huge-key", "info --checkpoint {gguf:huge-key}", "key 0 is 1099511627776 bytes long"),
    ("gguf:nested-arrays", "info --checkpoint {gguf:nested-arrays}", "key grok.nest: arrays nested more than 2"),
    ("gguf:truncated-key", "info --checkpoint {gguf:truncated-key}", "key grok.cut (1000 bytes) needs 1000 bytes"),
    ("gguf:head-count-0", "info --checkpoint {gguf:head-count-0}", "grok.attention.head_count must be a positive"),
    ("gguf:head-count-string", "info --checkpoint {gguf:head-count-string}", "grok.attention.head_count must be"),
    ("gguf:block-count-1e9", "info --checkpoint {gguf:block-count-1e9}", "num_layers = 1000000000 is over the limit"),
    ("gguf:block-count-3", f"{GENERATE} {{gguf:block-count-3}}", "missing ['blk.2.attn_norm.weight'"),
    ("gguf:config-deep", "info --checkpoint {gguf:config-deep}", "key groklm.config: JSON nested more than 64"),
    ("gguf:config-string", "info --checkpoint {gguf:config-string}", "key groklm.config: a config must be a JSON object"),
    ("gguf:llama", "info --checkpoint {gguf:llama}", "a GGUF of the 'llama' architecture"),
    ("gguf:groups-7", f"{GENERATE} {{gguf:groups-7}}", "tensor blk.0.attn_q.weight: 7 int8 groups do not split"),
    ("gguf:overlap", "info --checkpoint {gguf:overlap}", "overlap"),
    ("gguf:past-end", "info --checkpoint {gguf:past-end}", "needs"),
    ("gguf:bad-type", "info --checkpoint {gguf:bad-type}", "unknown ggml type 99"),
    ("gguf:embd-i32", f"{GENERATE} {{gguf:embd-i32}}", "tensor token_embd.weight: type I32, not a float or"),
    ("hf:config-string", "info --checkpoint {hf:config-string}", "config.json: must hold a JSON object, not str"),
    ("hf:config-deep", "info --checkpoint {hf:config-deep}", "config.json: JSON nested more than 64 deep"),
    ("hf:layers-1e9", "info --checkpoint {hf:layers-1e9}", "num_layers = 1000000000 is over the limit of 1024"),
    ("hf:layers-3", f"{GENERATE} {{hf:layers-3}}", "missing ['model.layers.2."),
    ("hf:heads-0", "info --checkpoint {hf:heads-0}", "config.json: num_attention_heads must be a positive integer"),
    ("hf:experts-16", f"{GENERATE} {{hf:experts-16}}", "missing ['model.layers.0.moe_block.experts.4."),
    ("hf:header-deep", f"{GENERATE} {{hf:header-deep}}", "corrupt safetensors header (JSON nested more than 4 deep)"),
    ("hf:header-overlap", f"{GENERATE} {{hf:header-overlap}}", "overlap"),
    ("native:config-list", "info --checkpoint {native:config-list}", "config.json: a config must be a JSON object"),
    ("native:layers-1e9", "info --checkpoint {native:layers-1e9}", "num_layers = 1000000000 is over the limit"),
    ("native:layers-3", "info --checkpoint {native:layers-3}", "shard files missing: model-00003.safetensors"),
    ("native:heads-5", "info --checkpoint {native:heads-5}", "num_q_heads 5 is not a multiple of num_kv_heads 2"),
    ("native:width-1e9", "info --checkpoint {native:width-1e9}", "emb_size = 1000000000 is over the limit"),
    ("grok2:layers-1e9", "info --checkpoint {grok2:layers-1e9}", "num_layers = 1000000000 is over the limit"),
    ("grok2:head-dim-0", "info --checkpoint {grok2:head-dim-0}", "config.json: head_dim must be a positive integer"),
    ("grok2:hidden-string", "info --checkpoint {grok2:hidden-string}", "config.json: hidden_size must be a positive"),
    ("grok2:config-deep", "info --checkpoint {grok2:config-deep}", "config.json: JSON nested more than 64 deep"),
    ("grok2:layers-plus-1", f"{GENERATE} {{grok2:layers-plus-1}}", "tensors missing for this config"),
    ("released:config-deep", "info --checkpoint {released:config-deep}", "config.json: JSON nested more than 64"),
    ("released:layers-1e9", "info --checkpoint {released:layers-1e9}", "num_layers = 1000000000 is over the limit"),
    ("released:no-files", f"{GENERATE} {{released:no-files}}", "0 tensor files, but the config (2 layers) needs"),
    ("tok:bad-byte", "generate --checkpoint {base:native} hi --tokenizer {tok:bad-byte}",
     "regular_tokens[300]: bytes must be a non-empty list of values 0..255"),
    ("tok:one-byte-short", "generate --checkpoint {base:native} hi --tokenizer {tok:one-byte-short}",
     "regular_tokens cover 255 of the 256 single bytes (not [65])"),
    ("tok:huge-rank", "generate --checkpoint {base:native} hi --tokenizer {tok:huge-rank}",
     "regular_tokens[300]: token must be an integer"),
    ("tok:wrong-vocab-size", "generate --checkpoint {base:native} hi --tokenizer {tok:wrong-vocab-size}",
     "vocab_size 5 is not the 318 tokens"),
    ("tok:a-list", "generate --checkpoint {base:native} hi --tokenizer {tok:a-list}", "must hold a JSON object, not list"),
    ("tok:deep", "generate --checkpoint {base:native} hi --tokenizer {tok:deep}", "JSON nested more than 64 deep"),
    ("tok:garbage.model", "generate --checkpoint {base:native} hi --tokenizer {tok:garbage.model}",
     "not a SentencePiece model"),
    ("tok:grok-1", "generate --checkpoint {base:native} hi --tokenizer {tok:grok-1}",
     "131072 pieces, more than the model's vocabulary of 256"),
    ("adapter:rank-1e9", f"{GENERATE} {{base:native}} --adapter {{adapter:rank-1e9}}",
     "adapter_config.json: LoRA rank must be an integer in 1..65536, not 1000000000"),
    ("adapter:rank-string", f"{GENERATE} {{base:native}} --adapter {{adapter:rank-string}}",
     "adapter_config.json: r must be a number, not '4'"),
    ("adapter:wrong-base", f"{GENERATE} {{base:native}} --adapter {{adapter:wrong-base}}",
     "tensor base_model.model.model.layers.0.attn.q_proj.lora_A.weight: F32 (4, 128), expected a float (4, 64)"),
    ("adapter:extra-layer", f"{GENERATE} {{base:native}} --adapter {{adapter:extra-layer}}",
     "unexpected ['base_model.model.model.layers.2.attn.q_proj.lora_A.weight'"),
    ("adapter:mlp-on-grok-1", f"{GENERATE} {{base:native}} --adapter {{adapter:mlp-on-grok-1}}",
     "no module of this grok-1 model matches the LoRA targets ['gate']"),
    ("adapter:config-deep", f"{GENERATE} {{base:native}} --adapter {{adapter:config-deep}}", "JSON nested more than 64"),
    ("config:a-list", f"{GENERATE} {{base:native}} --config {{config:a-list}}", "a config must be a JSON object"),
    ("config:deep", f"{GENERATE} {{base:native}} --config {{config:deep}}", "JSON nested more than 64 deep"),
]  # fmt: skip


_CHILD_ERR = 70  # the child's own failure (an uncaught exception in cli.main)


# Children are forked from a fork server: a fresh interpreter with groklm imported that has run no torch
# op, so no OpenMP thread pool is inherited (forked from pytest, after other tests had run ops, a child
# that computed hung in libgomp).
_FORKS = multiprocessing.get_context("forkserver")
_FORKS.set_forkserver_preload(["groklm.cli", "groklm.formats.gguf", "groklm.formats.grok2", "groklm.formats.hf",
                               "groklm.formats.native", "groklm.verify", "groklm.convert", "groklm.train.lora",
                               "tests.test_crafted"])  # fmt: skip


def _child(argv: list[str], err_path: str, mem_path: str) -> None:
    """Runs `cli.main(argv)` with stderr to `err_path`, under the CPU limit; writes its peak memory growth."""
    code = _CHILD_ERR
    try:
        fd = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.stderr = open(2, "w", closefd=False)
        sys.stdout = open(1, "w", closefd=False)
        before = reset_peak_rss()
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        used = resource.getrusage(resource.RUSAGE_SELF)
        resource.setrlimit(resource.RLIMIT_CPU, (int(used.ru_utime + used.ru_stime) + CPU_SECONDS, hard))
        try:
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        sys.stderr.flush()
        Path(mem_path).write_text(str(peak_rss_since_reset() - before))
    finally:
        os._exit(code)


def _run_forked(argv: list[str], out: Path) -> tuple[int, int, str, int]:
    """(exit status, signal, stderr, peak memory growth in bytes) of `cli.main(argv)` in a forked child."""
    err_path, mem_path = out / "stderr", out / "grew"
    child = _FORKS.Process(target=_child, args=(argv, str(err_path), str(mem_path)))
    child.start()
    child.join(60)  # a hang fails the test instead of stalling the suite
    if child.exitcode is None:
        child.kill()
        child.join(10)
        pytest.fail(f"{argv}: still running after 60 s")
    grew = int(mem_path.read_text()) if mem_path.exists() else -1
    err = err_path.read_text() if err_path.exists() else ""
    code = child.exitcode
    return (code, 0, err, grew) if code >= 0 else (-code, -code, err, grew)


def _argv(template: str, made: dict[str, Path]) -> list[str]:
    words = []
    for word in template.split():
        if word.startswith("{") and word.endswith("}"):
            word = str(made[word[1:-1]])
        words.append(word)
    return words


def test_the_table_is_large_and_every_case_made(made: dict[str, Path]) -> None:
    assert len(CASES) >= 30 and len({c[0] for c in CASES}) == len(CASES)
    assert all(case in made for case, _, _ in CASES)
    assert (made["gguf:huge-array"]).stat().st_size == 161


@pytest.mark.parametrize("case, template, words", CASES, ids=[c[0] for c in CASES])
def test_a_crafted_input_ends_in_one_error_line(case: str, template: str, words: str, made: dict[str, Path],
                                                 tmp_path: Path) -> None:  # fmt: skip
    code, sig, err, grew = _run_forked(_argv(template, made), tmp_path)
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert sig == 0 and code in (1, 2), (code, sig, err)
    assert "Traceback" not in err and len(errors) == 1 and errors[0] == lines[-1], err
    named = made[case]
    assert str(named) in errors[0] or named.name in errors[0], err  # the file (or the directory holding it)
    assert words in errors[0], err
    assert 0 <= grew < LIMIT_BYTES, grew


def test_the_crafted_gguf_fails_the_same_in_a_fresh_interpreter(made: dict[str, Path]) -> None:
    """The forked runs stand for `python -m groklm`: the 161-byte GGUF, there."""
    import subprocess

    r = subprocess.run([sys.executable, "-m", "groklm", "info", "--checkpoint", str(made["gguf:huge-array"])],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 1 and r.stderr.count("error:") == 1 and "key grok.huge" in r.stderr, r.stderr


def test_the_valid_tiny_files_load(made: dict[str, Path], tmp_path: Path) -> None:
    """The files the cases alter are themselves good: each error above is the alteration's."""
    for kind in ("native", "hf", "gguf"):
        code, sig, err, _ = _run_forked(_argv(f"{GENERATE} {{base:{kind}}}", made), tmp_path)
        assert (code, sig) == (0, 0), err


def test_verify_says_how_many_bytes_a_truncated_file_needs(tmp_path: Path) -> None:
    from tests.conftest import GOLDEN

    ckpt = _copy(GOLDEN / "ckpt-0", tmp_path / "ckpt-0")
    file = ckpt / "tensor00002_000"
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 3])
    config = GrokConfig.from_dict(json.loads((GOLDEN / "case.json").read_text()))
    problems = [str(p) for p in verify.verify(tmp_path, config, progress=False).problems]
    line = next(p for p in problems if "tensor00002_000" in p)
    assert f"bytes, has {size // 3}" in line and "needs " in line and "offset" not in line, line


def test_a_tokenizer_far_smaller_than_the_vocabulary_is_warned_of_naming_both_sizes() -> None:
    from groklm.tokenizer import Tokenizer, check_vocabulary

    tok = Tokenizer(TOKENIZER)
    assert check_vocabulary(tok, 131072) is None
    warning = check_vocabulary(tok, 1 << 20)
    assert warning is not None and "131072 pieces" in warning and "1048576" in warning and str(TOKENIZER) in warning
    with pytest.raises(ValueError, match="131072 pieces, more than the model's vocabulary of 1024"):
        check_vocabulary(tok, 1024)
