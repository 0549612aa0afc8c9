"""Routing statistics: the counts are the router's own choices, the native MoE reports the routing it
runs, and the command writes its JSON, plots and report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import groklm
from groklm import kernels
from groklm.analyze.routing import analyze, capture_routing, summarize
from groklm.config import GrokConfig
from groklm.model import MoE
from groklm.quant import QuantizedMoE
from tests.conftest import GOLDEN, TOKENIZER

ROOT = Path(__file__).resolve().parents[1]


def _moe_inputs(model: groklm.Grok, tokens: list[int]) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda _m, a: seen.append(a[0].reshape(-1, a[0].shape[-1]).clone()))
               for m in model.modules() if isinstance(m, MoE)]  # fmt: skip
    with torch.inference_mode():
        model.hidden(torch.tensor([tokens]))
    for h in handles:
        h.remove()
    return seen


def test_counts_are_the_routers_top2(golden_config: GrokConfig, golden: dict[str, np.ndarray]) -> None:
    """fp32 on the golden case: top-2 of the softmax of the reference-layout router, counted directly."""
    model = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False)
    tokens = np.asarray(golden["batch"]).flatten().tolist()
    experts, gates, probs = analyze(model, tokens)
    stats = summarize(experts, probs, tokens)
    for layer, x in enumerate(_moe_inputs(model, tokens)):
        moe = model.layers[layer].moe
        p = moe.router(x.float()).softmax(-1)
        top = p.topk(2, dim=-1)
        direct = torch.bincount(top.indices.flatten(), minlength=golden_config.num_experts)
        assert stats["expert_counts"][layer] == direct.tolist()
        assert torch.equal(experts[layer], top.indices) and torch.equal(gates[layer], top.values)
        torch.testing.assert_close(probs[layer], p, rtol=0, atol=0)
    assert sum(stats["expert_counts"][0]) == 2 * len(tokens)
    assert all(0 < e <= 1 for e in stats["router_entropy_fraction"])
    # co-selection: each token adds its pair once each way
    assert sum(sum(row) for row in stats["coselection"][0]) == 2 * len(tokens)


@pytest.mark.skipif(not kernels.available(), reason="needs the native kernels")
def test_native_moe_reports_the_routing_it_runs(mini_ckpt: Path) -> None:
    """bf16 on mini (whose experts the fused MoE takes; the golden case's 176 columns it does not): the
    fused MoE routes in C; its routing function, called by the capture, gives the torch path's choices
    on the same inputs."""
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    assert any(isinstance(m, QuantizedMoE) for m in model.modules())
    tokens = [(37 * i) % 5000 + 10 for i in range(200)]
    inputs = _moe_inputs(model, tokens)
    with capture_routing(model) as cap, torch.inference_mode():
        model.hidden(torch.tensor([tokens]))
    for layer, x in enumerate(inputs):
        moe = model.layers[layer].moe
        assert moe.native(x) is not None  # the native path is the one that ran
        native_gates, native_experts = cap.gates[layer][0], cap.experts[layer][0]
        torch_gates, torch_experts = MoE.route(moe, x)
        assert torch.equal(native_experts, torch_experts)
        torch.testing.assert_close(native_gates, torch_gates, rtol=1e-5, atol=1e-6)


def test_analyze_command_writes_json_plots_and_report(mini_ckpt: Path, tmp_path: Path) -> None:
    text = tmp_path / "in.txt"
    text.write_text("def parse(line):\n    return line.split(',')  # the same words, the same words\n" * 20)
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, "-m", "groklm", "analyze", "routing", "--checkpoint", str(mini_ckpt),
                        "--tokenizer", str(TOKENIZER), "--text", str(text), "--out", str(out), "--max-tokens", "300",
                        "--window", "128", "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    stats: dict[str, Any] = json.loads((out / "routing.json").read_text())
    assert stats["tokens"] == 300 and stats["layers"] == 4 and len(stats["expert_counts"][0]) == 8
    assert stats["repeats"]["occurrences"] > 100  # the text repeats itself
    assert len(stats["route_map"]["labels"]) == 48 and len(stats["route_map"]["top1"]) == 4
    for name in ("load.png", "coselection.png", "consistency.png", "route_map.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / name).stat().st_size > 5000
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4
    bad = subprocess.run([sys.executable, "-m", "groklm", "analyze", "routing", "--checkpoint", str(mini_ckpt),
                          "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "give one input" in bad.stderr
