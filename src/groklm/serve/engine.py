"""The serving engine: one model, a fixed number of KV rows, and a scheduler that lets requests arrive
and leave at any step. No HTTP here: `api.py` speaks it.

Each step (`Engine.step`) admits waiting sequences into free rows, decodes one token for every
decoding sequence in one batched model call, runs one chunk (`prefill_chunk` tokens) of one
prefilling sequence, and retires what finished (EOS, a stop string, `max_tokens`, the context, or an
abort when the client left), freeing its row at once. Sequences with different sampling settings
share a step: each row samples with its own settings and, when seeded, its own generator, exactly as
`generate` samples that row alone. A row with a grammar (`Params.grammar`: structured outputs, forced
tool calls) has its logits masked by its own matcher first, and finishes when the grammar is complete.

KV cache: one preallocated `KVCache` of `max_batch` rows of `max_model_len` slots; a sequence owns a
row and starts at position 0, as it would alone. Decoding rows are kept at the front (rows
0..n_dec-1: a finished row swaps places with the last decoding one, a sequence whose prefill ends
with the first non-decoding one), so a decode step runs on a view of the cache, never a gathered copy,
and the decode attention op reads each row's slots in place. (Paged blocks would need a gather or a
paged attention kernel for every step; rows cost a bounded copy when sequences come and go.)

Prefix cache: a row keeps the tokens whose keys and values it holds after its sequence is gone. A new
sequence takes the free row sharing the longest prefix with its prompt, or copies that prefix from a
busy row into a free one, and prefills only the rest. Free rows are reused least recently used first.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from groklm.generate import Decode, check_sampling, decode_one, sample
from groklm.model import Grok, KVCache
from groklm.sampling import Penalties, apply_penalties, check_penalties
from groklm.serve.adapters import use_adapters
from groklm.serve.metrics import Metrics
from groklm.tokenizer import AnyTokenizer, TextStream

if TYPE_CHECKING:
    from groklm.serve.grammar import Grammar, Matcher


class QueueFull(RuntimeError):
    """The wait queue is full (`max_waiting`): try again later."""


class Draining(RuntimeError):
    """The engine is shutting down and takes no new requests."""


@dataclass(frozen=True)
class Params:
    """One sequence's settings (checked by `check`)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # alternatives to report per token (0: only the chosen one's)
    prompt_logprobs: bool = False  # logprobs of the prompt's tokens too (echo)
    grammar: Grammar | None = field(default=None, compare=False)  # structured output: each row masked by it
    penalties: Penalties = field(default_factory=Penalties)  # presence, frequency, repetition, logit_bias (`groklm.sampling`)
    min_p: float = 0.0
    adapter: Any = None  # the `serve.adapters.Adapter` its rows run with (None: the base)


@dataclass
class TokenEvent:
    token: int
    text: str  # text that became final with this token (may be "")
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class PromptLogprobs:
    logprobs: list[float | None]  # per prompt token (None for the first)
    top_logprobs: list[list[tuple[int, float]] | None]


@dataclass
class FinishEvent:
    reason: str  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    error: str | None = None


Event = TokenEvent | PromptLogprobs | FinishEvent


@dataclass
class Sequence:
    id: int
    prompt: list[int]
    params: Params
    emit: Callable[[Event], None]
    generator: torch.Generator | None
    text: TextStream | None
    arrived: float
    output: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting | prefilling | decoding | finished
    row: int = -1
    prefilled: int = 0
    cached: int = 0
    next_token: int | None = None
    last_token_at: float | None = None
    aborted: bool = False
    aborted_at_step: int = 0
    matcher: Matcher | None = None


@dataclass
class Row:
    seq: Sequence | None = None
    tokens: list[int] = field(default_factory=list)  # ids whose keys and values the row holds, by position
    adapter: Any = None  # the adapter those keys and values were computed with (a prefix is no use to another)
    last_used: int = 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class Runner:
    """The model calls and KV-cache moves of the engine's steps, and nothing else: every rank of a
    tensor-parallel model runs the same ones (`serve.ranks` sends rank 0's to the others)."""

    def __init__(self, model: Grok, max_batch: int, max_model_len: int, decode: Decode = decode_one) -> None:
        self.model, self.decode_fn = model, decode
        self.cache = KVCache.allocate(model.config, max_batch, max_model_len, model.dtype, model.device)

    def prefill(self, row: int, start: int, tokens: list[int], all_logits: bool, last_logits: bool
                ) -> tuple[Tensor | None, Tensor | None]:  # fmt: skip
        """Run `tokens` at positions start.. of KV row `row`; the fp32 logits at every one of them [T, V]
        and/or at the last [1, V], as asked."""
        device = self.model.device
        end = start + len(tokens)
        ids = torch.tensor([tokens], device=device)
        positions = torch.arange(start, end, device=device)[None]
        h = self.model.hidden(ids, self.cache.rows(row, row + 1).prefix(end), positions)  # [1, T, D]
        every = self.model.unembed(h[0]) if all_logits else None
        last = self.model.unembed(h[0, -1:]) if last_logits else None
        return every, last

    def decode(self, tokens: list[int], positions: list[int]) -> Tensor:
        """One token for each of KV rows 0..n-1 -> fp32 logits [n, V]."""
        device = self.model.device
        pos = torch.tensor(positions, device=device)
        view = self.cache.rows(0, len(tokens))
        if not getattr(self.decode_fn, "static_cache", False):  # (a CUDA graph takes every slot: one shape)
            view = view.prefix(max(positions) + 1)  # slots past a row's position are masked either way
        return self.decode_fn(self.model, torch.tensor(tokens, device=device), pos, view)

    def copy_rows(self, src: list[int], dst: list[int], slots: int) -> None:
        self.cache.copy_rows(src, dst, slots)

    def idle(self) -> None:
        """Called while there is nothing to run (about every half second)."""

    def close(self) -> None:
        """The engine has stopped."""


class Engine:
    def __init__(
        self,
        model: Grok,
        tokenizer: AnyTokenizer | None,
        max_batch: int = 8,
        max_waiting: int = 64,
        prefill_chunk: int = 256,
        max_model_len: int | None = None,
        decode: Decode = decode_one,
        metrics: Metrics | None = None,
        runner: Callable[[Grok, int, int, Decode], Runner] = Runner,
    ) -> None:
        config = model.config
        self.max_model_len = max_model_len or config.sequence_len
        for name, value, low in (("max_batch", max_batch, 1), ("max_waiting", max_waiting, 0),
                                 ("prefill_chunk", prefill_chunk, 1), ("max_model_len", self.max_model_len, 2)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        if self.max_model_len > config.sequence_len:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's context {config.sequence_len}")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.max_waiting, self.prefill_chunk = max_batch, max_waiting, prefill_chunk
        self.metrics = metrics or Metrics()
        self.metrics.kv_rows_total.set(max_batch)
        self.runner = runner(model, max_batch, self.max_model_len, decode)
        self.rows = [Row() for _ in range(max_batch)]
        self.n_dec = 0  # rows 0..n_dec-1 hold the decoding sequences
        self.waiting: deque[Sequence] = deque()
        self.by_id: dict[int, Sequence] = {}
        self._ids = itertools.count()
        self._clock = itertools.count(1)
        self._cv = threading.Condition()
        self._draining = False
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._steps = 0

    # -- the other threads' side ----------------------------------------------------------------

    def check(self, prompt: list[int], params: Params) -> None:
        """Raise ValueError naming what is wrong with this request (before it waits for anything)."""
        vocab = self.model.config.vocab_size
        if not prompt:
            raise ValueError("prompt: the prompt is empty (it must have at least one token)")
        bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt: token ids {bad[:5]} are outside the vocabulary (0..{vocab - 1})")
        check_sampling(params.temperature, params.top_p, params.top_k, params.seed, params.max_tokens)
        check_penalties(params.penalties, params.min_p, vocab)
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"max_tokens: the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceed the "
                f"context of {self.max_model_len} tokens"
            )
        if any(not s for s in params.stop):
            raise ValueError("stop: stop strings must not be empty")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer, and the server has none")
        if any(not 0 <= t < vocab for t in params.stop_token_ids):
            raise ValueError("stop_token_ids: outside the vocabulary")
        if params.logprobs is not None and not 0 <= params.logprobs <= 20:
            raise ValueError(f"logprobs: must be in 0..20, not {params.logprobs}")

    def submit(self, prompt: list[int], params: Params, emit: Callable[[Event], None]) -> int:
        """Queue one sequence; `emit` is called (from the engine's thread) with its events. Returns
        its id (for `abort`). Raises ValueError (bad request), QueueFull or Draining."""
        self.check(prompt, params)
        gen = None if params.seed is None else torch.Generator(device=self.model.device).manual_seed(params.seed)
        text = TextStream(self.tokenizer, prompt, params.stop) if self.tokenizer is not None else None
        matcher = params.grammar.start() if params.grammar is not None else None
        with self._cv:
            if self._draining:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                raise QueueFull(f"{len(self.waiting)} requests are waiting already (the most the server queues)")
            seq = Sequence(next(self._ids), list(prompt), params, emit, gen, text, time.monotonic())
            seq.matcher = matcher
            self.waiting.append(seq)
            self.by_id[seq.id] = seq
            self.metrics.waiting.set(len(self.waiting))
            self._cv.notify()
        return seq.id

    def abort(self, seq_id: int) -> None:
        """Stop a sequence (its client left): its row is freed at the start of the next step."""
        with self._cv:
            seq = self.by_id.get(seq_id)
            if seq is not None and not seq.aborted:
                seq.aborted, seq.aborted_at_step = True, self._steps
                self._cv.notify()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="groklm-engine", daemon=True)
        self._thread.start()

    def drain(self) -> None:
        """Take no new requests from now on; the ones queued and running go on."""
        with self._cv:
            self._draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for every sequence to finish; whether they all did."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self.by_id and time.monotonic() < deadline:
                self._cv.wait(min(0.1, max(0.0, deadline - time.monotonic())))
            return not self.by_id

    def abort_all(self) -> None:
        with self._cv:
            ids = list(self.by_id)
        for seq_id in ids:
            self.abort(seq_id)

    def stop(self, timeout: float = 300.0) -> None:
        """Drain, wait (up to `timeout` s) for every sequence to finish, abort what is left (it is freed
        at the next step, within a few seconds), then stop the thread."""
        self.drain()
        if not self.wait_idle(timeout):
            self.abort_all()
            self.wait_idle(5.0)
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def idle(self) -> bool:
        return not self.by_id

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the engine's thread --------------------------------------------------------------------

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    if not self._stopped and not self.by_id:
                        self._cv.wait(0.5)
                    stopped, busy = self._stopped, bool(self.by_id)
                if stopped:
                    self.runner.close()
                    return
                if not busy:
                    self.runner.idle()
                    continue
                try:
                    self.step()
                except Exception as e:  # a failed step fails its sequences, not the server
                    self._fail_all(f"{type(e).__name__}: {e}")

    @torch.inference_mode()
    def step(self) -> None:
        """One scheduling step (see the module docstring)."""
        self._retire_aborted()
        self._admit()
        if self.n_dec:
            self._decode_step()
        prefilling = [r.seq for r in self.rows if r.seq is not None and r.seq.state == "prefilling"]
        if prefilling:
            self._prefill_step(min(prefilling, key=lambda s: s.id))
        self._steps += 1
        self.metrics.steps.inc()
        self._update_gauges()

    def _update_gauges(self) -> None:
        used = sum(r.seq is not None for r in self.rows)
        self.metrics.running.set(used)
        self.metrics.kv_rows_used.set(used)
        self.metrics.kv_rows_cached.set(sum(r.seq is None and bool(r.tokens) for r in self.rows))
        self.metrics.waiting.set(len(self.waiting))

    def _retire_aborted(self) -> None:
        with self._cv:
            gone = [s for s in self.by_id.values() if s.aborted]
            for s in gone:
                if s.state == "waiting":
                    self.waiting.remove(s)
        for s in gone:
            self.metrics.abort_steps.observe(self._steps - s.aborted_at_step)
            self._finish(s, "abort")

    def _admit(self) -> None:
        while True:
            free = [i for i, r in enumerate(self.rows) if r.seq is None]
            with self._cv:
                if not free or not self.waiting:
                    return
                seq = self.waiting.popleft()
            # The row sharing the longest prefix with the prompt (at least its last token is run again:
            # its logits are needed; all of it when the prompt's own logprobs are asked for).
            limit = 0 if seq.params.prompt_logprobs else len(seq.prompt) - 1
            matches = [(min(common_prefix(r.tokens, seq.prompt), limit) if r.adapter is seq.params.adapter else 0, i)
                       for i, r in enumerate(self.rows)]  # fmt: skip
            best, source = max(matches, key=lambda m: (m[0], self.rows[m[1]].seq is None))
            if best > 0 and self.rows[source].seq is None:
                target = source
            else:
                target = min(free, key=lambda i: (bool(self.rows[i].tokens), self.rows[i].last_used))
                if best > 0:
                    self.runner.copy_rows([source], [target], best)
            row = self.rows[target]
            row.tokens = (self.rows[source].tokens if best > 0 else [])[:best]
            row.seq, row.last_used, row.adapter = seq, next(self._clock), seq.params.adapter
            seq.row, seq.state, seq.prefilled, seq.cached = target, "prefilling", best, best
            self.metrics.prompt_tokens.inc(len(seq.prompt))
            if best:
                self.metrics.prefix_hits.inc()
                self.metrics.prefix_hit_tokens.inc(best)

    def _prefill_step(self, seq: Sequence) -> None:
        row = self.rows[seq.row]
        start = seq.prefilled
        end = min(len(seq.prompt), start + self.prefill_chunk)
        with use_adapters(self.model, [seq.params.adapter]):
            every, last = self.runner.prefill(
                seq.row, start, seq.prompt[start:end], seq.params.prompt_logprobs, end == len(seq.prompt)
            )
        row.tokens.extend(seq.prompt[start:end])
        seq.prefilled = end
        if every is not None:
            self._prompt_logprobs(seq, start, end, every.log_softmax(-1))
        if last is None:
            return
        seq.state = "decoding"
        self._move(seq.row, self.n_dec)
        self.n_dec += 1
        self._take(seq, last[0], self._penalised([seq], last)[0])

    def _prompt_logprobs(self, seq: Sequence, start: int, end: int, logprobs: Tensor) -> None:
        """The logprob of each prompt token after `start` given the ones before it (for echo); `logprobs`
        [T, V]: position p predicts token p + 1."""
        out: list[float | None] = [None] if start == 0 else []
        tops: list[list[tuple[int, float]] | None] = [None] if start == 0 else []
        n = seq.params.logprobs or 0
        for p in range(start, min(end, len(seq.prompt) - 1)):
            row = logprobs[p - start]
            out.append(float(row[seq.prompt[p + 1]]))
            tops.append(_top(row, n))
        seq.emit(PromptLogprobs(out, tops))

    def _decode_step(self) -> None:
        n = self.n_dec
        seqs = [self.rows[i].seq for i in range(n)]
        assert all(s is not None and s.state == "decoding" for s in seqs)
        tokens = [s.next_token for s in seqs]  # type: ignore[union-attr]
        adapters = [s.params.adapter for s in seqs]  # type: ignore[union-attr]
        if len(set(adapters)) > 1:
            self.metrics.lora_mixed_steps.inc()
        with use_adapters(self.model, adapters):
            logits = self.runner.decode(tokens, [len(self.rows[i].tokens) for i in range(n)])  # type: ignore[arg-type]
        for i, seq in enumerate(seqs):
            assert seq is not None and seq.next_token is not None
            self.rows[i].tokens.append(seq.next_token)
        chosen = self._penalised(seqs, logits)  # type: ignore[arg-type]
        for seq, row_logits, row_chosen in zip(seqs, logits, chosen, strict=True):
            self._take(seq, row_logits, row_chosen)  # type: ignore[arg-type]

    def _penalised(self, seqs: list[Sequence], logits: Tensor) -> Tensor:
        """Every row's bias and penalties on the logits [n, V] of its sequence, in one batched pass."""
        return apply_penalties(logits, [s.params.penalties for s in seqs], [s.prompt for s in seqs],
                               [s.output for s in seqs])  # fmt: skip

    def _take(self, seq: Sequence, logits: Tensor, chosen: Tensor) -> None:
        """`_next`, but a failure there (sampling, detokenizing, reporting) fails this sequence alone: its
        row's keys and values were written by the step, which went well, so the others and the prefix
        cache go on."""
        try:
            self._next(seq, logits, chosen)
        except Exception as e:
            self._finish(seq, "error", f"{type(e).__name__}: {e}")

    def _next(self, seq: Sequence, logits: Tensor, chosen: Tensor) -> None:
        """Sample this sequence's next token from `chosen` [V] (its logits after the bias and penalties),
        report it with its logprobs (of the model's logits [V], as vLLM reports them), and finish it if
        it is done."""
        p = seq.params
        gens = None if seq.generator is None else [seq.generator]
        allowed = chosen if seq.matcher is None else seq.matcher.mask(chosen)
        token = int(sample(allowed[None], p.temperature, p.top_p, p.top_k, gens, p.min_p)[0])
        logprob, tops = None, None
        if p.logprobs is not None:
            lp = logits.float().log_softmax(-1)
            logprob, tops = float(lp[token]), _top(lp, p.logprobs)
        now = time.monotonic()
        if seq.last_token_at is None:
            self.metrics.ttft.observe(now - seq.arrived)
        else:
            self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.output.append(token)
        if seq.matcher is not None:
            seq.matcher.accept(token)
        self.metrics.generation_tokens.inc()
        piece = seq.text.add(token) if seq.text is not None else ""
        seq.emit(TokenEvent(token, piece, logprob, tops))
        eos = token == self.model.config.eos_token and not p.ignore_eos
        if seq.matcher is not None and seq.matcher.error:
            self._finish(seq, "error", f"grammar: {seq.matcher.error}")
        elif (
            eos
            or token in p.stop_token_ids
            or (seq.text is not None and seq.text.stopped)
            or (seq.matcher is not None and seq.matcher.done)
        ):
            self._finish(seq, "stop")
        elif len(seq.output) >= p.max_tokens or len(seq.prompt) + len(seq.output) >= self.max_model_len:
            self._finish(seq, "length")
        else:
            seq.next_token = token

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if seq.state == "finished":
            return
        if seq.text is not None and reason in ("stop", "length"):
            try:
                rest = seq.text.finish()
            except Exception as e:  # detokenizing failed: this sequence fails, no other
                reason, error, rest = "error", f"{type(e).__name__}: {e}", ""
            if rest:
                seq.emit(TokenEvent(-1, rest))  # held-back text, no new token
        if seq.row >= 0:
            row = self.rows[seq.row]
            row.seq, row.last_used = None, next(self._clock)  # its tokens stay: a cached prefix
            if seq.state == "decoding":
                self.n_dec -= 1
                self._move(seq.row, self.n_dec)  # the last decoding row fills the gap
        seq.state = "finished"
        now = time.monotonic()
        self.metrics.e2e.observe(now - seq.arrived)
        self.metrics.finished.labels(reason).inc()
        with self._cv:
            self.by_id.pop(seq.id, None)
            self._cv.notify_all()
        seq.emit(FinishEvent(reason, len(seq.prompt), len(seq.output), seq.cached, error))

    def _move(self, a: int, b: int) -> None:
        """Swap rows a and b: their keys and values, tokens and sequences."""
        if a == b:
            return
        ra, rb = self.rows[a], self.rows[b]
        slots = max(len(ra.tokens), len(rb.tokens))
        if slots:
            self.runner.copy_rows([a, b], [b, a], slots)
        self.rows[a], self.rows[b] = rb, ra
        for i in (a, b):
            if self.rows[i].seq is not None:
                self.rows[i].seq.row = i  # type: ignore[union-attr]

    def _fail_all(self, error: str) -> None:
        with self._cv:
            seqs = list(self.by_id.values())
            self.waiting.clear()
        for seq in seqs:
            self._finish(seq, "error", error)
        # What the failed step may have half-written is not a prefix anyone can trust.
        for row in self.rows:
            row.tokens = []
        self.n_dec = 0


def _top(logprobs: Tensor, n: int) -> list[tuple[int, float]]:
    if n <= 0:
        return []
    values, ids = logprobs.topk(n)
    return [(int(i), float(v) if math.isfinite(float(v)) else -9999.0) for i, v in zip(ids, values, strict=True)]
