"""LoRA on a frozen quantized base: zero adapters change nothing, training lowers the loss, adapters
survive saving (in PEFT's names), resuming and merging, and the command line uses them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import groklm
from groklm.config import GrokConfig
from groklm.model import MoE
from groklm.quant import QuantizedMoE, dense_weight
from groklm.train.finetune import FinetuneConfig, finetune
from groklm.train.lora import LoraConfig, adapters, add_lora, load_adapter, merge
from tests.conftest import GOLDEN, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "Question: what colour is the sky on a clear day? Answer: blue.\n"
    "Question: what colour is grass? Answer: green.\n"
    "Question: what colour is snow? Answer: white.\n"
) * 12


@pytest.fixture(scope="module")
def mini_with_tokenizer(tmp_path_factory: pytest.TempPathFactory, mini_ckpt: Path) -> Path:
    out = tmp_path_factory.mktemp("mini-tok") / "mini"
    import shutil

    shutil.copytree(mini_ckpt, out)
    shutil.copy(TOKENIZER, out / "tokenizer.model")
    return out


def _tokens() -> torch.Tensor:
    return torch.tensor(np.load(GOLDEN / "golden.npz")["batch"], dtype=torch.long)


def test_zero_adapters_leave_the_logits_exactly_unchanged(
    golden_config: GrokConfig, mini_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """B starts at zero. fp32 (torch paths) with every target; bf16 on mini (native int8 kernels) with the
    attention, whose base modules run the same kernels wrapped or not, and the router. An adapted router
    takes the MoE off its fused native call (which routes inside) onto the plain MoE path: the same
    function, not always the same bits (they differed on a Zen 4 VM), so it is held to that path's."""
    model = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False)
    tokens = _tokens()
    with torch.no_grad():
        before = model(tokens)
        add_lora(model, LoraConfig(4, 8, 0.0, ["attn", "experts", "router"]))
        assert len(adapters(model)) == golden_config.num_layers * 8
        assert torch.equal(model(tokens), before)
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    with torch.no_grad():
        before = model(tokens)
        add_lora(model, LoraConfig(4, 8, 0.0, ["attn"]))
        assert torch.equal(model(tokens), before)
        with monkeypatch.context() as m:
            m.setattr(QuantizedMoE, "native", lambda self, x: None)
            plain = model(tokens)
        add_lora(model, LoraConfig(4, 8, 0.0, ["router"]))
        assert torch.equal(model(tokens), plain)


def _finetune(ckpt: Path, tmp: Path, out: str, **kw: object) -> dict[str, object]:
    data = tmp / "data.txt"
    data.write_text(TEXT)
    args = {"steps": 30, "seq_len": 48, "lr": 2e-3, "warmup": 3, "eval_every": 10, "save_every": 10,
            "progress": False, "lora": LoraConfig(8, 16, 0.0, ["attn", "experts", "router"])} | kw  # fmt: skip
    return finetune(FinetuneConfig(str(ckpt), str(data), str(tmp / out), **args))  # type: ignore[arg-type]


def test_finetuning_lowers_the_loss_and_resumes_exactly(mini_with_tokenizer: Path, tmp_path: Path) -> None:
    whole = _finetune(mini_with_tokenizer, tmp_path, "whole")
    # The random mini model on a small repetitive text: measured 10.6 -> 2.5 (first vs last 10 steps).
    assert whole["last_loss"] < 0.5 * whole["first_loss"], whole  # type: ignore[operator]
    log = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 30 and "eval_loss" in log[-1]
    assert (tmp_path / "whole" / "loss.png").stat().st_size > 5000
    # Stopped after step 12, then resumed: the same losses, bit for bit (CPU, same threads).
    _finetune(mini_with_tokenizer, tmp_path, "split", stop_after=12)
    _finetune(mini_with_tokenizer, tmp_path, "split", resume=True)
    split = [json.loads(x) for x in (tmp_path / "split" / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in split] == [r["loss"] for r in log]


def test_adapters_save_in_peft_names_reload_and_merge(
    mini_with_tokenizer: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _finetune(mini_with_tokenizer, tmp_path, "a", steps=15)
    saved = tmp_path / "a"
    cfg = json.loads((saved / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 16
    assert sorted(cfg["target_modules"]) == ["gate", "k_proj", "linear", "linear_1", "linear_v", "o_proj", "q_proj",
                                             "v_proj"]  # fmt: skip
    keys = load_file(str(saved / "adapter_model.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((saved / "adapter_model.safetensors").stat().st_mode) == 0o666 & ~umask  # not 0600
    assert "base_model.model.model.layers.0.attn.q_proj.lora_A.weight" in keys
    assert keys["base_model.model.model.layers.3.moe_block.experts.7.linear_1.lora_B.weight"].shape == (256, 8)
    assert "base_model.model.model.layers.1.moe_block.gate.lora_A.weight" in keys

    tokens = _tokens()
    fp32 = torch.float32
    base = groklm.load(mini_with_tokenizer, dtype=fp32, progress=False)
    # The merged model is run on the adapted model's expert choices (its gates its own router's): in a
    # random model near-tied routers flip on the requantization's smallest changes, and a flipped token's
    # logits move far, by how much depending on the fine-tuning's numerics (0.12 against the adapter's
    # 0.29 on a Zen 4 VM, 0.027 elsewhere), which would hide what merging itself does.
    chosen: list[torch.Tensor] = []
    route = MoE.route

    def recording(moe: MoE, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates, experts = route(moe, xs)
        chosen.append(experts)
        return gates, experts

    def replaying(moe: MoE, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert moe.router_softcap is None  # Grok-1's router: a plain softmax
        experts = chosen.pop(0)
        return moe.router(xs.float()).softmax(dim=-1).gather(-1, experts), experts

    with torch.no_grad(), monkeypatch.context() as m:
        plain = base(tokens)
        m.setattr(MoE, "route", recording)
        adapted = load_adapter(base, saved)(tokens)
        m.setattr(MoE, "route", route)
        again = load_adapter(groklm.load(mini_with_tokenizer, dtype=fp32, progress=False), saved)(tokens)
        assert torch.equal(adapted, again)  # the file holds exactly what was trained
        effect = (adapted - plain).abs().mean().item()
        wrapped = base.layers[1].attn.wq
        folded = dense_weight(wrapped.base_layer) + wrapped.delta_weight().float()
        m.setattr(MoE, "route", replaying)
        merged = merge(base)(tokens)
        assert not chosen
    assert not adapters(base)
    # Merging folds W + BA back into int8 with the base's grouping: each weight within half a step of it.
    wq = base.layers[1].attn.wq
    step = wq.scales.float().repeat_interleave(folded.shape[1] // wq.scales.shape[1], dim=1)
    assert ((dense_weight(wq) - folded).abs() <= 0.5 * step * (1 + 2**-7)).all()
    # In logits, on the same expert choices, the requantization moves them by a small part of what the
    # adapter itself does (0.024 against 0.29 on a Zen 4 VM, top-1 kept at 15 of 16 positions).
    diff = (merged - adapted).abs().mean().item()
    assert effect > 0.1 and diff < 0.15 * effect, (diff, effect)
    assert (merged.argmax(-1) == adapted.argmax(-1)).float().mean() >= 0.85

    # The command line: generate with the adapter, merge, and generate from the merged checkpoint.
    def cli(*a: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "groklm", *a], capture_output=True, text=True, cwd=ROOT,
                              timeout=300)  # fmt: skip

    ids = ",".join(map(str, tokens[0, :6].tolist()))
    r = cli("generate", "--checkpoint", str(mini_with_tokenizer), "--adapter", str(saved), "--prompt-ids", ids,
            "--max-new-tokens", "6", "--json", "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        expected = groklm.generate(load_adapter(groklm.load(mini_with_tokenizer, progress=False), saved),
                                   [tokens[0, :6].tolist()], 6)[0]  # fmt: skip
    assert json.loads(r.stdout)["token_ids"] == expected
    r = cli("merge", "--checkpoint", str(mini_with_tokenizer), "--adapter", str(saved), "--out", str(tmp_path / "m"),
            "--quiet")  # fmt: skip
    assert r.returncode == 0, r.stderr
    with torch.no_grad():  # the command writes what merging in memory gives
        in_memory = merge(load_adapter(groklm.load(mini_with_tokenizer, progress=False), saved))(tokens)
        assert torch.equal(groklm.load(tmp_path / "m", progress=False)(tokens), in_memory)
    r = cli("generate", "--checkpoint", str(mini_with_tokenizer), "--adapter", str(tmp_path), "hi")
    assert r.returncode == 2 and "no adapter here" in r.stderr


def test_lora_on_int4_in_panels_trains_and_merges_as_in_rows(mini_ckpt: Path) -> None:
    """An int4 base laid out for the CPU kernel (as `load` leaves it) gives the adapters the gradients,
    and the merge the weights, that the same base in rows gives."""
    from groklm.quant import Int4Linear, dense_weight, is_panels, pack_int4, quantize_int4

    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["wq", "w1"])
    models = []
    for panels in (False, True):
        model = quantize_int4(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), group_size=64)
        if panels:
            pack_int4(model)
        assert any(isinstance(m, Int4Linear) and is_panels(m.weight, m.scales) for m in model.modules()) == panels
        add_lora(model, lora)
        torch.manual_seed(0)
        for m in adapters(model).values():
            torch.nn.init.normal_(m.lora_A, std=0.05)
            torch.nn.init.normal_(m.lora_B, std=0.05)
        model(_tokens()).float().logsumexp(-1).mean().backward()
        models.append(model)
    rows, panels = models
    for (name, a), (_, b) in zip(adapters(rows).items(), adapters(panels).items(), strict=True):
        assert torch.equal(a.lora_A.grad, b.lora_A.grad) and torch.equal(a.lora_B.grad, b.lora_B.grad), name
    merged = [merge(m) for m in models]
    for (name, a), (_, b) in zip(merged[0].named_modules(), merged[1].named_modules(), strict=True):
        if isinstance(a, Int4Linear):
            assert torch.equal(dense_weight(a), dense_weight(b)), name
