"""Generation as plain functions over an explicit, preallocated KV cache: prefill, decode, sample.

Prompts of different lengths run together, right-padded; each row keeps its own positions (see
`KVCache`), so every prompt gets exactly the tokens it would get alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from groklm.model import Grok, KVCache
from groklm.sampling import Penalties, apply_penalties, check_penalties, min_p_filter, parse_logit_bias
from groklm.tokenizer import TextStream, Tokenizer


class Matcher(Protocol):
    """A row's place in a grammar that constrains it (`groklm.serve.grammar.Matcher`: structured outputs)."""

    def mask(self, logits: Tensor) -> Tensor: ...  # the logits [V], every token the grammar forbids at -inf
    def accept(self, token: int) -> None: ...
    @property
    def done(self) -> bool: ...
    @property
    def error(self) -> str | None: ...


MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5  # temperatures below this are greedy, as vLLM's are: dividing by them overflows fp32


def check_sampling(
    temperature: float, top_p: float, top_k: int, seed: int | None, max_new_tokens: int | None = None
) -> None:
    """Raise ValueError naming the setting that is out of range. The checks vLLM makes: temperature
    finite and >= 0 (below 1e-5 is greedy), top_p in (0, 1] (1 is off; 0 would keep no token), top_k >= 0 or
    -1 (both off), a seed in 0..2^63-1, at least one new token."""

    def number(name: str, value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, not {value!r}")
        return float(value)

    def integer(name: str, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, not {value!r}")
        return value

    if number("temperature", temperature) < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), not {temperature}")
    if not 0 < number("top_p", top_p) <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), not {top_p}")
    if integer("top_k", top_k) < -1:
        raise ValueError(f"top_k must be >= 0, or -1 (0 and -1 keep every token), not {top_k}")
    if seed is not None and not 0 <= integer("seed", seed) <= MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED}, not {seed}")
    if max_new_tokens is not None and integer("max_new_tokens", max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raise ValueError unless every prompt is a non-empty list of token ids inside the vocabulary."""
    if isinstance(prompts, (str, bytes)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if isinstance(p, (str, bytes)) or len(p) == 0:
            raise ValueError(f"prompt {i} is empty or not a list of token ids: every prompt needs at least one token")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i}: token ids {bad[:5]} are outside the vocabulary (0..{vocab_size - 1})")


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """The reference's nucleus filter: keep the smallest set of tokens whose probability mass
    reaches p, counting from the top; tokens tied with the last one kept are kept too."""
    if top_p >= 1.0:
        return logits
    ascending = logits.sort(dim=-1).values
    mass_from_bottom = ascending.softmax(dim=-1).cumsum(dim=-1)
    cut = (mass_from_bottom >= 1.0 - top_p).int().argmax(dim=-1, keepdim=True)  # first index reaching it
    threshold = ascending.gather(-1, cut)
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    if top_k <= 0 or top_k >= logits.shape[-1]:  # 0 and -1 (vLLM's word for it) are off
        return logits
    kth = logits.topk(top_k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def sample(
    logits: Tensor,
    temperature: float,
    top_p: float,
    top_k: int,
    generators: Sequence[torch.Generator] | None,
    min_p: float = 0.0,
) -> Tensor:
    """logits [B, V] fp32 -> token ids [B]. Temperatures below GREEDY_BELOW are greedy. Each row draws
    from its own generator."""
    if temperature < GREEDY_BELOW:
        # The first of tied maxima (a NaN above all), as argmax gives. On the CPU numpy's argmax: one pass,
        # no threads to wake, a third of torch's time right after a decode step (benchmarks/NOTES.md).
        if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64) and not logits.requires_grad:
            return torch.from_numpy(logits.numpy().argmax(-1))
        return logits.max(dim=-1).indices
    logits = top_p_filter(top_k_filter(min_p_filter(logits / temperature, min_p), top_k), top_p)
    probs = logits.softmax(dim=-1)
    if generators is None:
        return torch.multinomial(probs, 1).squeeze(-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def prefill(model: Grok, prompts: Sequence[Sequence[int]], cache: KVCache) -> Tensor:
    """Run the prompts right-padded from position 0; returns fp32 logits [B, V] at each prompt's last token."""
    device = model.device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lengths.max())
    pad = model.config.pad_token if model.config.pad_token is not None else 0
    tokens = torch.full((len(prompts), width), pad, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    valid = positions < lengths[:, None]  # the right-padding is never attended to
    h = model.hidden(tokens, cache, positions, valid)  # [B, T, D]
    last = h[torch.arange(len(prompts), device=device), lengths - 1]  # [B, D]: only these need logits
    return model.unembed(last)


def decode_one(model: Grok, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
    """tokens [B], positions [B] -> fp32 logits [B, V] for the next token."""
    return model.next_logits(tokens, positions, cache)


Decode = Callable[[Grok, Tensor, Tensor, KVCache], Tensor]


def compile_decode() -> Decode:
    """`decode_one` through torch.compile (inductor): the norms, RoPE and masks between the weight
    kernels fuse into a few generated kernels, called from a C++ wrapper (`cpp_wrapper`), not Python:
    on bench-mid that saved 0.65-0.9 ms of a 31-46 ms step (alternating steps in one process), for
    twice the compile time. Rounds to bf16 wherever eager mode does (`emulate_precision_casts`), so its
    logits equal eager mode's. The first call per batch size compiles (tens of seconds on a small
    CPU). The cache's length (the prefix in use, one slot longer every step) is dynamic from that first
    compile on: left to itself, torch.compile specialised the first step to its length and compiled
    again, dynamic, at the second (35 then 22 s before the second new token, the mini preset on 2 cores)."""
    options = {"emulate_precision_casts": True, "cpp_wrapper": True}
    compiled = torch.compile(decode_one, options=options)

    def decode(model: Grok, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        for t in (*cache.k, *cache.v, cache.key_ok):
            torch._dynamo.maybe_mark_dynamic(t, 1)
        return compiled(model, tokens, positions, cache)

    return decode


def compile_decode_cuda() -> Decode:
    """`decode_one` through torch.compile with CUDA graphs (mode "reduce-overhead"): a step replays one
    recorded graph of kernel launches, so the host costs nothing per layer. The graph needs the same
    shapes every step, so `generate` hands it the whole cache (the mask hides the slots not yet
    written) instead of the prefix in use (`static_cache`); the only host synchronisation per token is
    reading the sampled ids."""
    compiled = torch.compile(decode_one, mode="reduce-overhead", dynamic=False)

    def decode(model: Grok, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        return compiled(model, tokens, positions, cache).clone()  # the graph's output buffer is reused

    decode.static_cache = True  # type: ignore[attr-defined]
    return decode


def decoder(compile: bool, device: torch.device) -> Decode:
    """The decode step `generate` uses: eager, or compiled (CUDA graphs on a GPU, inductor's C++ on CPU)."""
    if not compile:
        return decode_one
    return compile_decode_cuda() if device.type == "cuda" else compile_decode()


def generate_stream(
    model: Grok,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_at_eos: bool = True,
    should_stop: Callable[[int, list[int]], bool] | None = None,
    decode: Decode = decode_one,
    matchers: Sequence[Matcher | None] | None = None,
    *,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    min_p: float = 0.0,
    logit_bias: dict[str, float] | dict[int, float] | str | None = None,
) -> Iterator[list[int | None]]:
    """Yield, at each step, the new token of every row (None for rows already finished).

    A row finishes at EOS (if `stop_at_eos`; the reference never stops early), when
    `should_stop(row, its new tokens)` says so, when its grammar is complete, or after `max_new_tokens`.
    `decode` runs each step (e.g. `compile_decode()`). `matchers`, one per row or None, constrain rows to
    a grammar (`groklm.serve.grammar`: structured outputs). The penalties, `min_p` and `logit_bias`
    ({token id: bias}, or "ID=BIAS,...") are `groklm.sampling`'s. The prompts and settings are checked
    here, before anything runs.
    """
    config = model.config
    check_prompts(prompts, config.vocab_size)
    check_sampling(temperature, top_p, top_k, seed, max_new_tokens)
    if isinstance(logit_bias, dict):
        logit_bias = {str(k): v for k, v in logit_bias.items()}
    penalties = Penalties(presence_penalty, frequency_penalty, repetition_penalty, parse_logit_bias(logit_bias))
    check_penalties(penalties, min_p, config.vocab_size)
    slots = max(len(p) for p in prompts) + max_new_tokens
    if slots > config.sequence_len:
        raise ValueError(
            f"prompt ({max(len(p) for p in prompts)} tokens) + max_new_tokens ({max_new_tokens}) = {slots} "
            f"exceeds the context length {config.sequence_len}"
        )
    if matchers is not None and len(matchers) != len(prompts):
        raise ValueError(f"matchers: one per prompt (or None), not {len(matchers)} for {len(prompts)} prompts")
    return _stream(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, should_stop, decode,
                   matchers, penalties, min_p)  # fmt: skip


@torch.inference_mode()
def _stream(
    model: Grok,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    stop_at_eos: bool,
    should_stop: Callable[[int, list[int]], bool] | None,
    decode: Decode,
    matchers: Sequence[Matcher | None] | None,
    penalties: Penalties,
    min_p: float,
) -> Iterator[list[int | None]]:
    config = model.config
    longest = max(len(p) for p in prompts)
    batch = len(prompts)
    device = model.device
    cache = KVCache.allocate(config, batch, longest + max_new_tokens, model.dtype, device)
    generators = None if seed is None else [torch.Generator(device=device).manual_seed(seed) for _ in range(batch)]
    done = [False] * batch
    produced: list[list[int]] = [[] for _ in range(batch)]
    positions = torch.tensor([len(p) for p in prompts], device=device)

    logits = prefill(model, prompts, cache)
    for step in range(max_new_tokens):
        if matchers is not None:
            rows = [
                x if m is None or done[i] else m.mask(x) for i, (m, x) in enumerate(zip(matchers, logits, strict=True))
            ]
            logits = torch.stack([r.to(logits.dtype) for r in rows])
        if penalties.active:
            logits = apply_penalties(logits, [penalties] * batch, prompts, produced)
        tokens = sample(logits, temperature, top_p, top_k, generators, min_p)
        out: list[int | None] = []
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                out.append(None)
                continue
            produced[row].append(token)
            out.append(token)
            matcher = matchers[row] if matchers is not None else None
            if matcher is not None:
                matcher.accept(token)
            if (stop_at_eos and token == config.eos_token) or (should_stop and should_stop(row, produced[row])):
                done[row] = True
            elif matcher is not None and (matcher.done or matcher.error):
                done[row] = True
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        # Every row's next position is below longest + step + 1: attend over those slots only (a CUDA
        # graph needs the same shapes every step: it takes the whole cache).
        view = cache if getattr(decode, "static_cache", False) else cache.prefix(longest + step + 1)
        logits = decode(model, tokens, positions, view)
        positions = positions + 1


def generate(
    model: Grok,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop_at_eos: bool = True,
    decode: Decode = decode_one,
    matchers: Sequence[Matcher | None] | None = None,
    **processors: Any,
) -> list[list[int]]:
    """The new token ids of each prompt (prompts are lists of token ids); `matchers`, the penalties,
    `min_p` and `logit_bias` as `generate_stream`'s."""
    results: list[list[int]] = [[] for _ in prompts]
    steps = generate_stream(model, prompts, max_new_tokens, temperature, top_p, top_k, seed, stop_at_eos, decode=decode,
                            matchers=matchers, **processors)  # fmt: skip
    for step in steps:
        for row, token in enumerate(step):
            if token is not None:
                results[row].append(token)
    return results


def stream_text(
    model: Grok,
    tokenizer: Tokenizer,
    prompt_ids: list[int],
    stop: Sequence[str] = (),
    **kwargs: Any,
) -> Iterator[str]:
    """Yield decoded text as it comes for one prompt, ending before the first stop string (see
    `tokenizer.TextStream`: text that could still become a stop string is held back until it cannot)."""
    text = TextStream(tokenizer, prompt_ids, stop)
    pieces: list[str] = []

    def should_stop(_row: int, new: list[int]) -> bool:
        pieces.append(text.add(new[-1]))
        return text.stopped

    for _ in generate_stream(model, [prompt_ids], should_stop=should_stop, **kwargs):
        piece = pieces.pop() if pieces else ""
        if piece:
            yield piece
    rest = text.finish()
    if rest:
        yield rest
