"""`groklm generate` as a function: `generate(checkpoint=..., prompt=..., max_new_tokens=...)` checks every
argument against the checkpoint's config before a weight is read, loads the model, streams the new text to
stdout and reports the timing (or one JSON object)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from groklm.config import GrokConfig
from groklm.runtime import (
    Ranks,
    UsageError,
    check_holding,
    check_placement,
    check_threads,
    parse_ids,
    read_prompt_file,
    set_threads,
    start_ranks,
    tokenizer_fits,
    torch_dtype,
)


def decode_timing(at: list[float], total_s: float, compiled: bool) -> tuple[float | None, float | None]:
    """(decode tokens/s, compile seconds or None) from the times `at` each new token came (from the start
    of generation) and the total. The rate counts the tokens after the first (the prefill's); compiled,
    after the second: the first decode step is the one that compiles (tens of seconds), reported apart."""
    compile_s = at[1] - at[0] if compiled and len(at) > 1 else None
    skip = 1 if compile_s is None else 2
    if len(at) <= skip or total_s <= at[skip - 1]:
        return None, compile_s
    return (len(at) - skip) / (total_s - at[skip - 1]), compile_s


@dataclass
class Prompt:
    """A checked request: the prompt's ids (and text), the tokenizer if any, the sampling processors."""

    text: str | None
    ids: list[int]
    tokenizer: Any
    processors: dict[str, Any]


@dataclass
class Output:
    """What a generation produced, and when."""

    new: list[int] = field(default_factory=list)
    text: str | None = None
    finish: str = "length"
    load_s: float = 0.0
    first_s: float | None = None
    total_s: float = 0.0
    rate: float | None = None
    compile_s: float | None = None


def read_prompt(prompt: str | None, prompt_file: str | None, prompt_ids: str | None) -> str | None:
    """The text prompt (None for --prompt-ids): exactly one of the three must be given."""
    given = [name for name, v in (("PROMPT", prompt), ("--prompt-file", prompt_file),
                                  ("--prompt-ids", prompt_ids)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise UsageError(
            "give one prompt: a text PROMPT, --prompt-file FILE (- for stdin) or --prompt-ids"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    return read_prompt_file(prompt_file) if prompt_file is not None else prompt


def sampling_processors(temperature: float, top_p: float, top_k: int, seed: int | None, max_new_tokens: int,
                        presence_penalty: float, frequency_penalty: float, repetition_penalty: float, min_p: float,
                        logit_bias: str | None, stop: Sequence[str]) -> dict[str, Any]:  # fmt: skip
    """generate's sampling options, checked; the penalties, --min-p and --logit-bias as `generate_stream` takes them
    (the bias's token ids are checked against the vocabulary in `prepare`)."""
    from groklm.generate import check_sampling
    from groklm.sampling import Penalties, check_penalties, parse_logit_bias

    try:
        check_sampling(temperature, top_p, top_k, seed, max_new_tokens)
        bias = parse_logit_bias(logit_bias)
        p = Penalties(presence_penalty, frequency_penalty, repetition_penalty, bias)
        check_penalties(p, min_p, 1 << 62)  # the vocabulary is checked once the config is read
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None
    if any(s == "" for s in stop):
        raise UsageError("--stop: a stop string must not be empty")
    return {"presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "repetition_penalty": p.repetition_penalty, "min_p": min_p, "logit_bias": list(bias)}  # fmt: skip


def prepare(checkpoint: str, config: GrokConfig, text: str | None, prompt_ids: str | None, tokenizer: str | None,
            stop: Sequence[str], max_new_tokens: int, processors: dict[str, Any]) -> Prompt:  # fmt: skip
    """Find the tokenizer, encode the prompt and check its ids, the bias's and the length against `config`."""
    from groklm.tokenizer import find_tokenizer

    tok = None
    if text is not None or stop:
        try:
            tok = find_tokenizer(checkpoint, tokenizer)
        except FileNotFoundError as e:
            need = "--stop" if text is None else "a text prompt"
            raise UsageError(f"{e} (--tokenizer PATH); {need} needs it") from None
    else:  # --prompt-ids: decode the output where a tokenizer is at hand
        try:
            tok = find_tokenizer(checkpoint, tokenizer)
        except FileNotFoundError:
            if tokenizer:
                raise
    tokenizer_fits(tok, config, "generate")
    ids = tok.encode(text) if text is not None else parse_ids(prompt_ids or "")
    if not ids:
        raise UsageError("the prompt is empty: it encodes to no tokens")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        what = "--prompt-ids: token ids" if text is None else f"the tokenizer {tok.path} gave token ids"
        raise UsageError(f"{what} {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    bad = [t for t, _ in processors["logit_bias"] if not 0 <= t < config.vocab_size]
    if bad:
        raise UsageError(f"--logit-bias: token ids {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    processors = {**processors, "logit_bias": {str(t): b for t, b in processors["logit_bias"]}}
    if len(ids) + max_new_tokens > config.sequence_len:
        raise UsageError(
            f"the prompt ({len(ids)} tokens) + --max-new-tokens {max_new_tokens} exceed the context of "
            f"{config.sequence_len} tokens"
        )
    return Prompt(text, ids, tok, processors)


def load_model(checkpoint: str, config: GrokConfig, ranks: Ranks, *, dtype: str, device: str, progress: bool,
               mmap: bool, bits: int | None, adapter: str | None) -> Any:  # fmt: skip
    """The model as generate and serve hold it: on this rank's device, with its share, the adapter applied."""
    from groklm.load import load

    model = load(checkpoint, config, dtype=torch_dtype(dtype), device=ranks.device if ranks.parallel else device,
                 progress=progress and ranks.leader, mmap=mmap, bits=bits, tp=ranks.tp, ep=ranks.ep)  # fmt: skip
    if adapter:
        from groklm.train.lora import load_adapter

        load_adapter(model, adapter)
    return model


def stream(model: Any, p: Prompt, eos: int, *, max_new_tokens: int, temperature: float, top_p: float, top_k: int,
           seed: int | None, stop: Sequence[str], ignore_eos: bool, compile: bool, show: bool) -> Output:  # fmt: skip
    """Generate, printing each new piece to stdout when `show`; what came out, and when."""
    from groklm.generate import decoder, generate_stream
    from groklm.tokenizer import TextStream

    text_stream = TextStream(p.tokenizer, p.ids, list(stop)) if p.tokenizer is not None else None
    pieces: list[str] = []

    def should_stop(_row: int, produced: list[int]) -> bool:
        if text_stream is None:
            return False
        pieces.append(text_stream.add(produced[-1]))
        return text_stream.stopped

    steps = generate_stream(
        model, [p.ids], max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
        stop_at_eos=not ignore_eos, should_stop=should_stop, decode=decoder(compile, model.device), **p.processors,
    )  # fmt: skip
    out = Output()
    t1 = time.perf_counter()
    at: list[float] = []  # seconds from t1 to each new token
    for step in steps:
        if step[0] is None:
            break
        at.append(time.perf_counter() - t1)
        out.new.append(step[0])
        if show:
            piece = pieces.pop() if pieces else ""
            print(piece if text_stream else step[0], end="" if text_stream else " ", flush=True)
    tail = text_stream.finish() if text_stream else ""
    out.total_s = time.perf_counter() - t1
    if show:
        print(tail)
    out.text = text_stream.text if text_stream else None
    stopped = (text_stream is not None and text_stream.stopped) or (out.new and out.new[-1] == eos and not ignore_eos)
    out.finish = "stop" if stopped else "length"
    out.first_s = at[0] if at else None
    out.rate, out.compile_s = decode_timing(at, out.total_s, compile)
    return out


def report(p: Prompt, out: Output, ranks: Ranks, threads: int, *, as_json: bool) -> None:
    """One JSON object on stdout, or the timing line on stderr."""
    if as_json:
        result = {
            "prompt": p.text,
            "prompt_ids": p.ids,
            "text": out.text,
            "token_ids": out.new,
            "finish_reason": out.finish,
            "usage": {"prompt_tokens": len(p.ids), "completion_tokens": len(out.new),
                      "total_tokens": len(p.ids) + len(out.new)},
            "timing": {"load_s": round(out.load_s, 3), "first_token_s": round(out.first_s or 0.0, 3),
                       "total_s": round(out.total_s, 3), "decode_tokens_per_s": out.rate and round(out.rate, 2),
                       **({"compile_s": round(out.compile_s, 3)} if out.compile_s is not None else {})},
            "threads": threads,
            **({"tp": ranks.tp, "ep": ranks.ep} if ranks.parallel else {}),
        }  # fmt: skip
        print(json.dumps(result, ensure_ascii=False))
        return
    after = "the first" if out.compile_s is None else f"the second (the compile took {out.compile_s:.1f} s)"
    speed = f", {out.rate:.1f} tok/s after {after}" if out.rate else ""
    print(
        f"[load {out.load_s:.1f} s · prompt {len(p.ids)} tokens, first token after {out.first_s or 0:.2f} s · "
        f"{len(out.new)} tokens in {out.total_s:.2f} s{speed} · {out.finish} · {threads} threads"
        + (f" · tp {ranks.tp} x ep {ranks.ep}]" if ranks.parallel else "]"),
        file=sys.stderr,
    )


def generate(*, checkpoint: str, prompt: str | None = None, prompt_file: str | None = None,
             prompt_ids: str | None = None, tokenizer: str | None = None, config: GrokConfig | None = None,
             max_new_tokens: int = 100, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             seed: int | None = None, presence_penalty: float = 0.0, frequency_penalty: float = 0.0,
             repetition_penalty: float = 1.0, min_p: float = 0.0, logit_bias: str | None = None,
             stop: Sequence[str] = (), ignore_eos: bool = False, no_echo: bool = False, as_json: bool = False,
             dtype: str = "bf16", device: str = "cpu", threads: int | None = None, bits: int | None = None,
             mmap: bool = False, compile: bool = False, tp: int = 1, ep: int = 1, adapter: str | None = None,
             quiet: bool = False) -> int:  # fmt: skip
    """Generate from one prompt (a text, a file's text or token ids), streamed to stdout; under torchrun with
    tp x ep > 1, each rank holds its share. Everything that can be wrong with the request is found before the
    weights are read (`UsageError` naming the option). Returns the exit status."""
    model_config = check_placement(checkpoint, config, device=device, tp=tp, ep=ep)
    ranks = start_ranks(tp, ep, device)
    try:
        stdin = prompt_file == "-"
        text = ranks.share(read_prompt(prompt, prompt_file, prompt_ids) if ranks.leader or not stdin else None)
        processors = sampling_processors(temperature, top_p, top_k, seed, max_new_tokens, presence_penalty,
                                         frequency_penalty, repetition_penalty, min_p, logit_bias, stop)  # fmt: skip
        check_threads(threads)
        check_holding(checkpoint, model_config, parallel=ranks.parallel, mmap=mmap, bits=bits, leader=ranks.leader)
        if adapter:
            from groklm.train.lora import check_adapter_option

            check_adapter_option(adapter, model_config, ranks.parallel)
        p = prepare(checkpoint, model_config, text, prompt_ids, tokenizer, stop, max_new_tokens, processors)
        n_threads = set_threads(threads)
        if ranks.parallel and seed is None and temperature > 0:  # every rank must draw the same tokens
            import random

            seed = ranks.share(random.getrandbits(63))
        t0 = time.perf_counter()
        model = load_model(checkpoint, model_config, ranks, dtype=dtype, device=device, progress=not quiet,
                           mmap=mmap, bits=bits, adapter=adapter)  # fmt: skip
        load_s = time.perf_counter() - t0
        if compile and not quiet:
            print("groklm: compiling the decode step (the first token waits tens of seconds)", file=sys.stderr)
        show = not as_json and ranks.leader
        if show and not no_echo:
            tok = p.tokenizer
            print(text if text is not None else (tok.decode(p.ids) if tok else " ".join(map(str, p.ids))),
                  end="" if tok else " ", flush=True)  # fmt: skip
        out = stream(model, p, model_config.eos_token, max_new_tokens=max_new_tokens, temperature=temperature,
                     top_p=top_p, top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos, compile=compile,
                     show=show)  # fmt: skip
        out.load_s = load_s
        if ranks.leader and (as_json or not quiet):
            report(p, out, ranks, n_threads, as_json=as_json)
        return 0
    finally:
        ranks.close()
