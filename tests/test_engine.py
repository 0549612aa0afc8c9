"""The serving engine without HTTP, stepped by hand: staggered arrivals, chunked prefill, prefix reuse
(from a free row and from a busy one) and aborts leave every sequence with the tokens `generate`
gives it alone."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import groklm
from groklm.serve.engine import Draining, Engine, FinishEvent, Params, QueueFull, TokenEvent
from groklm.tokenizer import Tokenizer
from tests.conftest import TOKENIZER


@pytest.fixture(scope="module")
def model(mini_ckpt: Path) -> groklm.Grok:
    return groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


class Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.finish: FinishEvent | None = None

    def __call__(self, event: Any) -> None:
        if isinstance(event, TokenEvent) and event.token >= 0:
            self.tokens.append(event.token)
        elif isinstance(event, FinishEvent):
            self.finish = event


def run_all(engine: Engine, steps_between: int, jobs: list[tuple[list[int], Params]]) -> list[Collect]:
    out = [Collect() for _ in jobs]
    for (prompt, params), c in zip(jobs, out, strict=True):
        engine.submit(prompt, params, c)
        for _ in range(steps_between):
            engine.step()
    for _ in range(10_000):
        if engine.idle:
            break
        engine.step()
    assert engine.idle
    return out


def alone(model: groklm.Grok, prompt: list[int], p: Params) -> list[int]:
    return groklm.generate(model, [prompt], p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed,
                           stop_at_eos=not p.ignore_eos)[0]  # fmt: skip


@pytest.mark.parametrize("chunk, rows, gap", [(7, 3, 1), (64, 2, 3), (5, 8, 0)])
def test_staggered_sequences_get_what_they_get_alone(
    model: groklm.Grok, tok: Tokenizer, chunk: int, rows: int, gap: int
) -> None:
    rng = random.Random(chunk)
    words = "the of and a to in is you that it he was for on are as with his they at be this from".split()
    jobs = []
    for i in range(10):
        prompt = tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
        p = Params(max_tokens=rng.randint(1, 20), temperature=0.0) if i % 3 else Params(
            max_tokens=rng.randint(1, 20), temperature=1.0, top_p=0.8, top_k=30, seed=i)  # fmt: skip
        jobs.append((prompt, p))
    engine = Engine(model, tok, max_batch=rows, prefill_chunk=chunk)
    for (prompt, p), got in zip(jobs, run_all(engine, gap, jobs), strict=True):
        assert got.tokens == alone(model, prompt, p)
        assert got.finish is not None and got.finish.completion_tokens == len(got.tokens)


def test_prefixes_are_reused_from_free_and_busy_rows(model: groklm.Grok, tok: Tokenizer) -> None:
    system = tok.encode("You are a helpful assistant who answers briefly. " * 4)
    engine = Engine(model, tok, max_batch=3, prefill_chunk=8)
    # A long one keeps its row busy while the next ones copy its prefix; then one takes a free row's.
    jobs = [(system + tok.encode(q), Params(max_tokens=n, temperature=0.0))
            for q, n in (("Hi", 30), ("Why?", 5), ("How?", 5), ("Hi", 4))]  # fmt: skip
    got = run_all(engine, 12, jobs)
    for (prompt, p), g in zip(jobs, got, strict=True):
        assert g.tokens == alone(model, prompt, p)
    assert [g.finish.cached_tokens for g in got[1:]] == [
        len(system) + 0,
        len(system),
        len(system + tok.encode("Hi")) - 1,
    ]  # type: ignore[union-attr]
    assert engine.metrics.prefix_hits._value.get() == 3  # type: ignore[attr-defined]


def test_abort_frees_the_row_at_the_next_step_and_the_others_go_on(model: groklm.Grok, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=2, max_waiting=1, prefill_chunk=16)
    a, b = Collect(), Collect()
    pa, pb = [5, 6, 7], [9, 10]
    ida = engine.submit(pa, Params(max_tokens=50, temperature=0.0, ignore_eos=True), a)
    engine.step()
    engine.submit(pb, Params(max_tokens=20, temperature=0.0, ignore_eos=True), b)
    engine.step()
    engine.submit([1, 2], Params(max_tokens=2), Collect())  # waits: both rows are busy
    with pytest.raises(QueueFull):
        engine.submit([3], Params(max_tokens=2), Collect())
    for _ in range(4):
        engine.step()
    engine.abort(ida)
    engine.step()
    assert a.finish is not None and a.finish.reason == "abort"
    assert sum(r.seq is not None for r in engine.rows) == 2  # the waiting one took the freed row
    while not engine.idle:
        engine.step()
    assert b.tokens == groklm.generate(model, [pb], 20, stop_at_eos=False)[0]
    engine.drain()
    with pytest.raises(Draining):
        engine.submit([3], Params(max_tokens=2), Collect())


def test_bad_requests_are_refused_by_name(model: groklm.Grok, tok: Tokenizer) -> None:
    engine = Engine(model, tok, max_batch=1, max_model_len=64)
    for prompt, params, words in (
        ([], Params(), "prompt: the prompt is empty"),
        ([131072], Params(), "outside the vocabulary"),
        ([5] * 60, Params(max_tokens=10), "max_tokens: the prompt (60 tokens) + max_tokens (10) exceed"),
        ([5], Params(top_p=0.0), "top_p must be in (0, 1]"),
        ([5], Params(stop=("",)), "stop: stop strings must not be empty"),
        ([5], Params(logprobs=21), "logprobs: must be in 0..20"),
    ):
        with pytest.raises(ValueError, match=re.escape(words)):
            engine.submit(prompt, params, Collect())
    with pytest.raises(ValueError, match="max_batch must be an integer >= 1"):
        Engine(model, tok, max_batch=0)
