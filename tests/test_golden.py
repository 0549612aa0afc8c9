"""Parity with the reference implementation's own outputs on the miniature checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

import groklm
from groklm.checkpoint import reference_params
from groklm.config import GrokConfig
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


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def golden_model(request: pytest.FixtureRequest, golden_config: GrokConfig) -> groklm.Grok:
    return groklm.load(GOLDEN, golden_config, dtype=request.param, progress=False)


# (mean |diff| bound, top-1 agreement bound). fp32 is the spec's requirement; measured 0.0054 mean,
# 0.056 max, 16/16. bf16 measured 0.052 mean, 1.59 max, 14/16 top-1: the two misses are where the
# reference's own top-1/top-2 gap is 0.0 and 0.047, within bf16 rounding; our bf16 is as far from
# our fp32 (0.052) as from the reference, so this is rounding, not a wiring difference.
TOLERANCE = {torch.float32: (0.03, 0.97), torch.bfloat16: (0.08, 0.85)}


def test_logits_match_reference(golden_model: groklm.Grok, golden: dict[str, np.ndarray]) -> None:
    tokens = torch.tensor(golden["batch"], dtype=torch.long)
    ref = torch.tensor(golden["logits"])
    logits = golden_model(tokens)
    assert logits.shape == ref.shape and logits.dtype == torch.float32
    mean_bound, top1_bound = TOLERANCE[golden_model.dtype]
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
    mean_bound, _ = TOLERANCE[golden_model.dtype]
    assert (logits - ref).abs().mean().item() <= mean_bound
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))


def test_padding_tokens_are_masked_as_keys(golden_model: groklm.Grok) -> None:
    """Token 0 is padding and masked as a key: no other position may see what its embedding is."""
    tokens = torch.tensor([[5, 0, 77, 300, 0, 12]])
    before = golden_model(tokens)
    saved = golden_model.embed.weight[0].clone()
    try:
        golden_model.embed.weight[0] = torch.randn_like(saved) * 10
        after = golden_model(tokens)
    finally:
        golden_model.embed.weight[0] = saved
    # Vocabulary column 0 is excluded: the output embedding is tied, so token 0's logit uses that row.
    # fp32 differences of ~1e-6 remain: the pad's own expert choice changes the per-expert group
    # sizes of the other tokens, and the matmuls round differently. A leak would be O(1).
    others = [0, 2, 3, 5]
    torch.testing.assert_close(after[:, others, 1:], before[:, others, 1:], rtol=0, atol=1e-4)
    assert not torch.allclose(after[:, 1], before[:, 1])  # the pad's own position does change
