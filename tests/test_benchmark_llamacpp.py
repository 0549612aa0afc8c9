"""benchmarks/llamacpp.py's arithmetic: the rate it reads from llama-bench's JSON and the ratios it reports
(building llama.cpp needs the network and minutes, so the comparison itself is not run here)."""

from __future__ import annotations

import json

import pytest

from benchmarks.llamacpp import bench_rate, compare


def test_bench_rate_reads_llama_bench_json() -> None:
    test = {"model_type": "grok 8x? Q8_0", "n_prompt": 512, "n_gen": 0, "n_threads": 2, "avg_ns": 13474000000,
            "stddev_ns": 0, "avg_ts": 38.0, "stddev_ts": 0.0, "samples_ts": [38.0]}  # fmt: skip
    assert bench_rate(json.dumps([test])) == 38.0
    with pytest.raises(ValueError):  # two tests in one call: which one was meant is not guessed
        bench_rate(json.dumps([test, test]))


def test_compare_gives_the_ratio_of_medians_and_round_by_round() -> None:
    got = compare([15.0, 16.0, 30.0], [12.0, 8.0, 12.0])
    assert got["groklm_tokens_per_s"] == {"min": 15.0, "median": 16.0, "max": 30.0}
    assert got["llamacpp_tokens_per_s"] == {"min": 8.0, "median": 12.0, "max": 12.0}
    assert got["groklm_over_llamacpp"] == round(16.0 / 12.0, 3)
    assert got["groklm_over_llamacpp_by_round"] == {"min": 1.25, "median": 2.0, "max": 2.5}
    with pytest.raises(ValueError):
        compare([1.0], [1.0, 2.0])
