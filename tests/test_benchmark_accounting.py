"""The benchmarks' byte accounting and step timing: the rooflines they report are only as right as these."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import groklm
from benchmarks.decode import decode_steps, experts_touched, step_fraction, weight_bytes


def test_weight_bytes_counts_the_chosen_share_of_the_experts(mini_ckpt: Path) -> None:
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    c = model.config
    tensors = [*model.named_parameters(), *model.named_buffers()]
    experts = [t for name, t in tensors if name.split(".")[-2] in ("w1", "v", "w2") and ".moe." in name]
    assert len(experts) == c.num_layers * 3 * 2  # int8 weights and their scales
    expert = sum(t.nbytes for t in experts)
    everything = sum(t.nbytes for name, t in tensors if name != "embed.weight")  # the head has its own int8 copy
    assert any(True for _ in model.head.buffers())
    assert weight_bytes(model, c.num_experts) == everything
    assert weight_bytes(model, 2) == everything - expert + expert * 2 / c.num_experts
    assert weight_bytes(model, 0) == everything - expert


def test_decode_steps_probes_around_every_step_and_experts_are_counted(mini_ckpt: Path) -> None:
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    calls: list[int] = []
    seconds, readings = decode_steps(model, 3, 4, context=5, probe=lambda: calls.append(1) or float(len(calls)))
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert readings == [1.0, 2.0, 3.0, 4.0, 5.0]  # before each timed step, and after the last
    # the median of 10 / 1 / 5, 10 / 2 / 5 and 10 / 5 / 2.5
    assert step_fraction(10.0, [1.0, 2.0, 5.0], [4.0, 6.0, 4.0, 1.0]) == 1.0
    calls.clear()
    seconds, readings = decode_steps(model, 1, 5, context=5, probe=lambda: calls.append(1) or float(len(calls)),
                                     probe_every=2)  # fmt: skip
    assert len(seconds) == 5 and readings == [1.0, 2.0, 3.0, 4.0]  # before steps 1, 3 and 5, and after the last
    # runs of two steps (the last one step) against the readings around each: 12 / 3 / 2, 12 / 4 / 2, 6 / 2 / 1
    assert step_fraction(6.0, [1.0, 2.0, 3.0, 1.0, 2.0], [1.0, 3.0, 1.0, 1.0], every=2) == 2.0
    with pytest.raises(ValueError, match="4 bandwidth readings for 2 runs"):
        step_fraction(6.0, [1.0, 2.0, 3.0], [1.0, 3.0, 1.0, 1.0], every=2)
    with experts_touched([layer.moe for layer in model.layers]) as touched:
        decode_steps(model, 1, 2, context=5)
    # batch 1: one call per layer per step (the untimed first step too), each choosing exactly top-2
    assert touched == [model.config.num_selected_experts] * (model.config.num_layers * 3)
    with experts_touched([layer.moe for layer in model.layers]) as touched:
        decode_steps(model, 8, 1, context=5)
    assert all(2 <= n <= model.config.num_experts for n in touched) and max(touched) > 2
