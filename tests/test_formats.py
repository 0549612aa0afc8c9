"""Conversions to Hugging Face and GGUF and back give the released checkpoint's logits (exactly where
nothing is rounded), the files are what vLLM's and llama.cpp's loaders read, and `verify` names every
problem with a download."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import groklm
from groklm import cli
from groklm.config import GrokConfig, get_preset
from groklm.convert import convert
from groklm.files import CheckpointError
from groklm.formats import hf
from groklm.model import ExpertLinear
from groklm.quant import Int8ExpertLinear, Int8Linear, dequantize_weight
from groklm.verify import verify
from tests.conftest import GOLDEN, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, golden_config: GrokConfig) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("converted")
    out = {}
    for to, qtype in (("hf", "f32"), ("hf", "bf16"), ("gguf", "q8_0"), ("gguf", "f16")):
        path = d / (f"{to}-{qtype}" + (".gguf" if to == "gguf" else ""))
        convert(GOLDEN, path, to, qtype, config=golden_config, progress=False)
        out[f"{to}-{qtype}"] = path
    return out


@pytest.fixture(scope="module")
def released(golden_config: GrokConfig) -> dict[torch.dtype, groklm.Grok]:
    return {dt: groklm.load(GOLDEN, golden_config, dtype=dt, progress=False) for dt in (torch.float32, torch.bfloat16)}


@pytest.mark.parametrize("name", ["hf-f32", "gguf-q8_0"])
def test_lossless_paths_give_the_released_logits_exactly(
    name: str,
    converted: dict[str, Path],
    released: dict[torch.dtype, groklm.Grok],
    golden: dict[str, np.ndarray],
    golden_config: GrokConfig,
) -> None:
    """hf f32 holds each int8 x scale product exactly; gguf q8_0 holds the int8 values and their scales.
    Read back (hf quantized again with the released grouping), the logits are the released ones, bit
    for bit, in fp32 and through the bf16 fast path. (gguf keeps scale groups narrower than its 32-column
    blocks as exact F32 products, read back as plain linears: in bf16 those are compared with plain
    linears holding the released int8 x scale, as the int8 fallback sums in fp64, plain bf16 in bf16.)"""
    tokens = torch.tensor(golden["batch"], dtype=torch.long)
    for dtype, want in released.items():
        got = groklm.load(converted[name], dtype=dtype, progress=False, bits=8 if name.startswith("hf") else None)
        if dtype == torch.bfloat16:
            want = _plain_where_plain(groklm.load(GOLDEN, golden_config, dtype=dtype, progress=False), got)
        assert torch.equal(got(tokens), want(tokens)), (name, dtype)


def _plain_where_plain(model: groklm.Grok, like: groklm.Grok) -> groklm.Grok:
    """`model` with its int8 linears and expert linears made plain ones (their dequantized bf16 weight)
    where `like`'s are, so that both run the same bf16 operations: a plain bf16 matmul and the int8
    fallback round differently on CPUs without native bf16 (AVX2), and agree only by chance elsewhere."""
    for name, module in list(model.named_modules()):
        other = type(like.get_submodule(name))
        if isinstance(module, Int8Linear) and other is torch.nn.Linear:
            w = dequantize_weight(module.weight, module.scales, torch.bfloat16)  # [out, in]
            plain: torch.nn.Module = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.bfloat16)
        elif isinstance(module, Int8ExpertLinear) and other is ExpertLinear:
            w = dequantize_weight(module.weight, module.scales, torch.bfloat16)  # [E, out, in]
            plain = ExpertLinear(w.shape[0], w.shape[2], w.shape[1], torch.bfloat16)
        else:
            continue
        plain.weight.data = w
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    return model


def test_gguf_q8_0_holds_the_released_int8_values(
    converted: dict[str, Path], released: dict[torch.dtype, groklm.Grok]
) -> None:
    got = groklm.load(converted["gguf-q8_0"], dtype=torch.bfloat16, progress=False)
    want = released[torch.bfloat16]
    int8 = [(n, m) for n, m in want.named_modules() if isinstance(m, (Int8Linear, Int8ExpertLinear)) and n != "head"]
    exact = 0
    for name, module in int8:
        other = got.get_submodule(name)
        if isinstance(other, (Int8Linear, Int8ExpertLinear)):  # written Q8_0 (the rest, F32: groups of 16 or 22)
            assert torch.equal(other.weight, module.weight) and torch.equal(other.scales, module.scales), name
            exact += 1
    assert exact == 5 * 12  # q, k, v, W1 and V of every layer: their groups are whole 32-column blocks


@pytest.mark.parametrize("name, dtype", [("hf-bf16", torch.bfloat16), ("hf-bf16", torch.float32),
                                         ("gguf-f16", torch.bfloat16), ("gguf-f16", torch.float32)])  # fmt: skip
def test_golden_parity_through_the_rounding_imports(
    name: str,
    dtype: torch.dtype,
    converted: dict[str, Path],
    golden: dict[str, np.ndarray],
    golden_case: dict[str, Any],
) -> None:
    """The bf16 fast path's bounds (mean |diff| <= 0.03, the greedy tokens through the KV cache) and the
    same top-1 wherever the reference's own top-1 margin exceeds one bf16 step of its logits (0.125):
    hf holds bf16 weights and a bf16 table, gguf f16 f16 weights, both quantized again on load."""
    model = groklm.load(converted[name], dtype=dtype, progress=False, bits=8)
    ref = torch.tensor(golden["logits"])
    logits = model(torch.tensor(golden["batch"], dtype=torch.long))
    assert (logits - ref).abs().mean().item() <= 0.03
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.125
    assert torch.equal(logits.argmax(-1)[clear], ref.argmax(-1)[clear])
    prompt = golden_case["greedy_prompt"]
    new = groklm.generate(model, [prompt], max_new_tokens=golden_case["greedy_new"], stop_at_eos=False)[0]
    assert prompt + new == golden["greedy_tokens"].tolist()


def test_gguf_with_a_q8_0_embedding_reads_back_close_to_the_f32_one(
    tmp_path: Path,
    converted: dict[str, Path],
    golden: dict[str, np.ndarray],
    golden_case: dict[str, Any],
    golden_config: GrokConfig,
) -> None:
    """`--embedding-type q8_0` writes token_embd (the tied head llama.cpp reads every token) as Q8_0, 34 bytes
    a 32 values against F32's 128; groklm dequantizes it as it reads it. Measured on the golden case: fp32
    logits 0.019 mean |diff| from the F32 file's (0.25 at most), 0.020 from the reference's (the F32 file:
    0.005); bf16 0.023 from the reference's (0.020). Bounds: the bf16 fast path's 0.03, the same top-1
    where the reference's margin exceeds 0.25 (the largest difference seen), the greedy tokens."""
    path = convert(GOLDEN, tmp_path / "q8head.gguf", "gguf", "q8_0", config=golden_config, progress=False,
                   embedding_type="q8_0")  # fmt: skip
    types = {t.name: t for t in gguf.GGUFReader(path).tensors}
    f32 = {t.name: t for t in gguf.GGUFReader(converted["gguf-q8_0"]).tensors}
    assert types["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert f32["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert types["token_embd.weight"].n_bytes * 128 == f32["token_embd.weight"].n_bytes * 34
    assert types["blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0  # the rest as --type has it
    ref = torch.tensor(golden["logits"])
    tokens = torch.tensor(golden["batch"], dtype=torch.long)
    top2 = ref.topk(2, -1).values
    clear = (top2[..., 0] - top2[..., 1]) > 0.25
    for dtype in (torch.float32, torch.bfloat16):
        model = groklm.load(path, dtype=dtype, progress=False)
        logits = model(tokens)
        assert (logits - ref).abs().mean().item() <= 0.03, dtype
        if dtype == torch.float32:
            want = groklm.load(converted["gguf-q8_0"], dtype=dtype, progress=False)(tokens)
            assert (logits - want).abs().mean().item() <= 0.03
        assert torch.equal(logits.argmax(-1)[clear], ref.argmax(-1)[clear]), dtype
        prompt = golden_case["greedy_prompt"]
        new = groklm.generate(model, [prompt], max_new_tokens=golden_case["greedy_new"], stop_at_eos=False)[0]
        assert prompt + new == golden["greedy_tokens"].tolist(), dtype


def test_hf_files_are_what_vllm_reads(converted: dict[str, Path], golden_config: GrokConfig) -> None:
    d = converted["hf-bf16"]
    config = json.loads((d / "config.json").read_text())
    assert config["architectures"] == ["Grok1ModelForCausalLM"] and config["tie_word_embeddings"] is True
    assert (config["hidden_size"], config["intermediate_size"], config["num_experts"]) == (128, 176, 8)
    index = json.loads((d / hf.INDEX).read_text())
    names = set(index["weight_map"])
    assert {"model.embed_tokens.weight", "model.norm.scale", "model.layers.0.attn.q_proj.weight",
            "model.layers.11.moe_block.gate.weight", "model.layers.3.moe_block.experts.7.linear_1.weight",
            "model.layers.0.post_moe_norm.scale"} <= names  # fmt: skip
    assert len(names) == 2 + 12 * (9 + 3 * 8)
    seen = {}
    for shard in sorted(d.glob("*.safetensors")):  # the safetensors package reads what we streamed
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                seen[key] = f.get_slice(key).get_shape()
                assert index["weight_map"][key] == shard.name
    assert seen["model.layers.0.moe_block.experts.0.linear.weight"] == [176, 128]  # [out, in]
    assert seen["model.layers.0.moe_block.experts.0.linear_1.weight"] == [128, 176]
    assert seen["model.layers.0.attn.k_proj.weight"] == [64, 128]
    assert sum(f.stat().st_size for f in d.glob("*.safetensors")) >= index["metadata"]["total_size"]


def test_the_keyfan_layout_reads_as_the_hpcai_one(tmp_path: Path, converted: dict[str, Path]) -> None:
    src = converted["hf-f32"]
    cfg = hf.config_from_hf(json.loads((src / "config.json").read_text()), "config.json")
    table = {a.theirs: b.theirs for a, b in zip(hf.names(cfg, "hpcai"), hf.names(cfg, "keyfan"), strict=True)}
    out = tmp_path / "keyfan"
    out.mkdir()
    shutil.copy(src / "config.json", out / "config.json")
    for shard in src.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file({table[k]: v for k, v in tensors.items()}, str(out / shard.name))
    tokens = torch.tensor([[1, 5, 9, 77, 300, 12]])
    a = groklm.load(src, dtype=torch.float32, progress=False)
    b = groklm.load(out, dtype=torch.float32, progress=False)
    assert torch.equal(a(tokens), b(tokens))


def test_hf_names_and_shapes_are_checked(tmp_path: Path, converted: dict[str, Path]) -> None:
    d = tmp_path / "hf"
    shutil.copytree(converted["hf-bf16"], d)
    shard = d / "model-00002-of-00013.safetensors"
    tensors = load_file(str(shard))
    tensors["model.layers.0.attn.q_proj.weight"] = tensors["model.layers.0.attn.q_proj.weight"][:, :64].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError, match=r"tensor model.layers.0.attn.q_proj.weight: shape \(128, 64\), expected \(128, 128\)"
    ):
        groklm.load(d, progress=False)
    del tensors["model.layers.0.attn.q_proj.weight"]
    save_file(tensors, str(shard))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.0.attn.q_proj.weight'\]"):
        groklm.load(d, progress=False)


def test_gguf_is_what_llama_cpp_reads(tmp_path: Path, mini_ckpt: Path) -> None:
    """Read back by the gguf package's own reader: the grok architecture's metadata (multipliers and
    soft-cap included), the tensors llama.cpp's grok loader creates with their shapes (ggml order) and
    types, and the SentencePiece vocabulary as llama.cpp's converter writes it."""
    src = tmp_path / "mini"
    shutil.copytree(mini_ckpt, src)
    shutil.copy(TOKENIZER, src / "tokenizer.model")
    path = convert(src, tmp_path / "mini.gguf", "gguf", "q8_0", progress=False)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.ggml.token")}
    c = get_preset("mini")
    assert f["general.architecture"] == "grok"
    assert (f["grok.embedding_length"], f["grok.block_count"], f["grok.context_length"]) == (256, 4, 2048)
    assert (f["grok.attention.head_count"], f["grok.attention.head_count_kv"]) == (8, 2)
    assert (f["grok.expert_count"], f["grok.expert_used_count"], f["grok.expert_feed_forward_length"]) == (
        8,
        2,
        c.ffn_size,
    )
    assert f["grok.rope.freq_base"] == 10000.0 and f["grok.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert f["grok.embedding_scale"] == pytest.approx(c.embedding_multiplier_scale)
    assert f["grok.logit_scale"] == pytest.approx(c.output_multiplier_scale)
    assert f["grok.attention.output_scale"] == pytest.approx(c.attn_output_multiplier)
    assert f["grok.attn_logit_softcapping"] == 30.0 and "grok.router_logit_softcapping" not in f
    assert f["tokenizer.ggml.model"] == "llama" and f["tokenizer.ggml.add_bos_token"] is False
    assert (
        f["tokenizer.ggml.bos_token_id"],
        f["tokenizer.ggml.eos_token_id"],
        f["tokenizer.ggml.padding_token_id"],
    ) == (1, 2, 0)
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert (
        len(tokens) == 131072
        and tokens[422] == "\u2581The"
        and types[2] == gguf.TokenType.CONTROL
        and types[228] == gguf.TokenType.BYTE
    )
    t = {x.name: x for x in r.tensors}
    ggml_shape = {name: [int(n) for n in x.shape] for name, x in t.items()}
    assert (
        ggml_shape["token_embd.weight"] == [256, 131072] and "output.weight" not in t
    )  # tied: llama.cpp reuses token_embd
    assert ggml_shape["blk.0.attn_q.weight"] == [256, 256] and ggml_shape["blk.0.attn_k.weight"] == [256, 64]
    assert ggml_shape["blk.0.ffn_gate_inp.weight"] == [256, 8]
    assert ggml_shape["blk.3.ffn_gate_exps.weight"] == [256, c.ffn_size, 8]
    assert ggml_shape["blk.3.ffn_down_exps.weight"] == [c.ffn_size, 256, 8]
    for name in ("attn_norm", "attn_output_norm", "ffn_norm", "layer_output_norm"):
        assert (
            ggml_shape[f"blk.2.{name}.weight"] == [256]
            and t[f"blk.2.{name}.weight"].tensor_type == gguf.GGMLQuantizationType.F32
        )
    assert t["blk.0.ffn_up_exps.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert t["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert len(t) == 2 + 4 * 12
    tokens_in = torch.tensor([[422, 3033, 356, 1180]])
    want = groklm.load(src, dtype=torch.bfloat16, progress=False)
    assert torch.equal(groklm.load(path, dtype=torch.bfloat16, progress=False)(tokens_in), want(tokens_in))


_CONVERT_RSS = r"""
import json, sys
from groklm.convert import convert
from tests.conftest import peak_rss_since_reset, reset_peak_rss
before = reset_peak_rss()
convert(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], progress=False)
print(json.dumps({"before": before, "peak": peak_rss_since_reset()}))
"""


def test_conversion_holds_about_one_layer(tmp_path: Path) -> None:
    """Six layers of ~100 MiB of int8 experts and a 32 MiB table: converting to each format adds
    about one layer (and its encoding) to the process's memory, never the model."""
    config = get_preset("mini").replace(vocab_size=8192, emb_size=1024, num_q_heads=8, num_kv_heads=2, key_size=128,
                                        num_layers=6, widening_factor=6.0)  # fmt: skip
    groklm.write_random_checkpoint(tmp_path / "src", config, seed=0, progress=False)
    layer = sum(f.stat().st_size for f in (tmp_path / "src" / "ckpt-0").iterdir()) / config.num_layers
    for to, qtype, limit in (("hf", "bf16", 3.5), ("gguf", "q8_0", 2.5), ("gguf", "f16", 3.5)):
        out = tmp_path / f"{to}-{qtype}"
        r = subprocess.run([sys.executable, "-c", _CONVERT_RSS, str(tmp_path / "src"), str(out), to, qtype],
                           capture_output=True, text=True, timeout=600, cwd=ROOT)  # fmt: skip
        assert r.returncode == 0, r.stderr
        m = json.loads(r.stdout)
        # A dequantized layer is 2x (bf16, f16) or about 1x (q8_0) the int8 one, held beside it.
        assert m["peak"] - m["before"] < limit * layer, (to, qtype, m, layer)


# ---------------------------------------------------------------------------------------------
# verify


@pytest.fixture
def download(tmp_path: Path) -> Path:
    d = tmp_path / "dl"
    shutil.copytree(GOLDEN, d)
    for f in d.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    (d / "config.json").write_text(json.dumps(json.loads((GOLDEN / "case.json").read_text())["config"]))
    return d


class _System:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("true",))


def test_verify_names_every_problem(download: Path, tmp_path: Path) -> None:
    manifest = tmp_path / "SHA256SUMS"
    assert cli.main(["verify", str(download), "--write-manifest", str(manifest), "--quiet"]) == 0
    assert verify(download, manifest=manifest, progress=False).ok
    ckpt = download / "ckpt-0"
    (ckpt / "tensor00009_000").unlink()  # missing
    data = (ckpt / "tensor00002_000").read_bytes()
    (ckpt / "tensor00002_000").write_bytes(data[: len(data) // 3])  # truncated
    a, b = (ckpt / "tensor00005_000").read_bytes(), (ckpt / "tensor00007_000").read_bytes()
    (ckpt / "tensor00005_000").write_bytes(b)  # a swapped pair: key/w and query/w
    (ckpt / "tensor00007_000").write_bytes(a)
    (ckpt / "tensor00013_000").write_bytes(pickle.dumps(_System(), protocol=4))  # code
    (ckpt / "tensor00020_000").write_bytes((ckpt / "tensor00020_000").read_bytes()[:-1] + b"!")  # a changed byte
    report = verify(download, manifest=manifest, progress=False)
    lines = [str(p) for p in report.problems]
    expected = [
        ("tensor00009_000", "decoder_layer_0/rms_norm/scale", "missing"),
        ("tensor00002_000", "decoder_layer_0/moe/linear/w", "truncated"),
        ("tensor00005_000", "multi_head_attention/key/w", "shape (128, 128), expected (128, 64)"),
        ("tensor00007_000", "multi_head_attention/query/w", "shape (128, 64), expected (128, 128)"),
        ("tensor00013_000", "decoder_layer_0/router/w", "refusing to load global posix.system"),
        ("tensor00020_000", None, "sha256"),
        ("tensor00002_000", None, "sha256"),
        ("tensor00009_000", None, "in the manifest but missing"),
    ]
    for file, param, words in expected:
        assert any(file in line and (param is None or param in line) and words in line for line in lines), (
            file,
            words,
            lines,
        )
    assert not report.ok


def test_verify_cli_exit_code_and_json(download: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["verify", str(download), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    (download / "ckpt-0" / "tensor00030_000").write_bytes(b"\x80\x04garbage")
    assert cli.main(["verify", str(download), "--json", "--quiet"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["ok"] and report["problems"][0]["file"].endswith("tensor00030_000")
    assert report["problems"][0]["parameter"].startswith("transformer/decoder_layer_10/")


def test_convert_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "g.gguf"
    assert (
        cli.main(["convert", str(GOLDEN), str(out), "--to", "gguf", "--config", str(GOLDEN / "case.json"), "--quiet"])
        == 0
    )
    assert "wrote" in capsys.readouterr().out and out.is_file()
    assert (
        cli.main(["convert", str(GOLDEN), str(out), "--to", "gguf", "--config", str(GOLDEN / "case.json"), "--quiet"])
        == 1
    )
    assert "exists" in capsys.readouterr().err
    assert cli.main(["convert", str(GOLDEN), str(tmp_path / "x"), "--to", "gguf", "--type", "q3_k", "--quiet",
                     "--config", str(GOLDEN / "case.json")]) == 2  # fmt: skip
    assert "--type for --to gguf must be one of" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(SystemExit) as bad:
        cli.main(["convert", str(GOLDEN), str(tmp_path / "x"), "--to", "gguf", "--embedding-type", "q4_0", "--quiet"])
    assert bad.value.code == 2 and "--embedding-type: invalid choice: 'q4_0'" in capsys.readouterr().err
    assert cli.main(["convert", str(GOLDEN), str(tmp_path / "x"), "--to", "hf", "--embedding-type", "q8_0", "--quiet",
                     "--config", str(GOLDEN / "case.json")]) == 2  # fmt: skip
    assert "--embedding-type is for --to gguf" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(["info", "--checkpoint", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["emb_size"] == 128


def test_load_takes_the_reference_config_dict_a_config_or_a_json_path(golden_case: dict[str, Any]) -> None:
    tokens = torch.tensor([[1, 5, 9, 77]])
    by_dict = groklm.load(GOLDEN, config=golden_case["config"], dtype=torch.float32, progress=False)
    for config in (GrokConfig.from_dict(golden_case), GOLDEN / "case.json", str(GOLDEN / "case.json")):
        assert torch.equal(
            groklm.load(GOLDEN, config=config, dtype=torch.float32, progress=False)(tokens), by_dict(tokens)
        )
