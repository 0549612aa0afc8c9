"""Parity with the reference implementation's own outputs on the miniature checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

import groklm
from groklm import kernels
from groklm.config import GrokConfig
from groklm.formats.released import reference_params
from tests.conftest import GOLDEN


def test_file_table_derived_from_config_matches_reference(
    golden_case: dict[str, Any], golden_config: GrokConfig
) -> None:
    expected = [(t["index"], t["name"], tuple(t["shape"])) for t in golden_case["tensors"]]
    assert [(p.index, p.name, p.shape) for p in reference_params(golden_config)] == expected
    for t, p in zip(golden_case["tensors"], reference_params(golden_config), strict=True):
        assert (t["scales"] is None) == (p.groups is None)
        if t["scales"] is not None:
            assert t["scales"][-2] == p.groups


MODES = {
    # name: (dtype, torch kernels only (or "triton"), mean |diff| bound, top-1 agreement bound)
    # fp32 is the spec's requirement; measured 0.0054 mean, 0.056 max, 16/16.
    "fp32": (torch.float32, False, 0.03, 0.97),
    # bf16 with the fast paths (native int8 kernel, int8 output head): measured 0.020 mean, 0.18 max,
    # 15/16 top-1; the miss is where the reference's own top-1/top-2 gap is 0.0.
    "bf16": (torch.bfloat16, False, 0.03, 0.9),
    # bf16 with torch's kernels only (no C compiler): measured 0.052 mean, 1.59 max, 14/16; the
    # misses are at reference gaps 0.0 and 0.047. That path rounds each group's partial sum to bf16;
    # our bf16 there is as far from our fp32 as from the reference: rounding, not wiring.
    "bf16-torch": (torch.bfloat16, True, 0.08, 0.85),
    # bf16 through the Triton kernels (GROKLM_KERNELS=triton; interpreted here): measured 0.028 mean, 15/16
    # (the miss at a reference gap of 0.16), greedy-step logits 0.0295. This case amplifies rounding: the
    # choice of where the int8 scale is applied alone moved these between 0.022 and 0.044.
    "bf16-triton": (torch.bfloat16, "triton", 0.03, 0.9),
}


@pytest.fixture(scope="module", params=list(MODES))
def golden_model(request: pytest.FixtureRequest, golden_config: GrokConfig) -> Iterator[groklm.Grok]:
    dtype, which, *_ = MODES[request.param]
    with pytest.MonkeyPatch.context() as mp:
        if which is True:
            mp.setattr(kernels, "supports", lambda *_: False)
        model = groklm.load(GOLDEN, golden_config, dtype=dtype, progress=False)
        model.mode = request.param  # type: ignore[assignment]
        if which != "triton":
            yield model
            return
        from groklm.kernels import triton as gpu

        before = dict(gpu.launches)
        kernels.select("triton")
        try:
            yield model
        finally:
            kernels.select("auto")
        assert all(gpu.launches[k] > before[k] for k in before), "the Triton kernels did not run"


def _bounds(model: groklm.Grok) -> tuple[float, float]:
    return MODES[model.mode][2:]  # type: ignore[index, return-value]


def test_logits_match_reference(golden_model: groklm.Grok, golden: dict[str, np.ndarray]) -> None:
    tokens = torch.tensor(golden["batch"], dtype=torch.long)
    ref = torch.tensor(golden["logits"])
    logits = golden_model(tokens)
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    mean_bound, top1_bound = _bounds(golden_model)
    assert (logits - ref).abs().mean().item() <= mean_bound
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean().item() >= top1_bound


def test_greedy_generation_through_cache_matches_reference(
    golden_model: groklm.Grok, golden: dict[str, np.ndarray], golden_case: dict[str, Any]
) -> None:
    prompt = golden_case["greedy_prompt"]
    new = groklm.generate(golden_model, [prompt], max_new_tokens=golden_case["greedy_new"], stop_at_eos=False)[0]
    assert prompt + new == golden["greedy_tokens"].tolist()


def test_greedy_step_logits_match_reference(
    golden_model: groklm.Grok, golden: dict[str, np.ndarray], golden_case: dict[str, Any]
) -> None:
    """The logits each greedy token was chosen from, recomputed over the whole sequence."""
    seq = torch.tensor(golden["greedy_tokens"], dtype=torch.long)[None]
    n_prompt = len(golden_case["greedy_prompt"])
    logits = golden_model(seq[:, :-1])[0, n_prompt - 1 :]
    ref = torch.tensor(golden["greedy_logits"])
    mean_bound, _ = _bounds(golden_model)
    assert (logits - ref).abs().mean().item() <= mean_bound
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_padding_tokens_are_masked_as_keys(golden_model: groklm.Grok) -> None:
    """Token 0 is padding and masked as a key: no other position may see what its embedding is."""
    tokens = torch.tensor([[5, 0, 77, 300, 0, 12]])
    pads = tokens == 0
    before = golden_model(tokens)

    def scramble_pads(_m: torch.nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        return torch.where(pads[..., None], torch.randn_like(out) * 10, out)

    handle = golden_model.embed.register_forward_hook(scramble_pads)
    try:
        after = golden_model(tokens)
    finally:
        handle.remove()
    # fp32 differences of ~1e-6 remain: the pad's own expert choice changes the per-expert group
    # sizes of the other tokens, and the matmuls round differently. A leak would be O(1).
    others = [0, 2, 3, 5]
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=1e-4)
    assert not torch.allclose(after[:, 1], before[:, 1])  # the pad's own position does change
