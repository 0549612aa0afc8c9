"""Decode/prefill speed of a `bench-mid` checkpoint against the memory-bandwidth roofline, as JSON.

    .venv/bin/python benchmarks/decode.py [--preset bench-mid] [--bits 4] [--batches 1,2,4,8,16] [--runs 3]

The roofline is bytes of weights read per decode step (from the model as loaded; a batch step reads
every expert its tokens chose) divided by the read bandwidth measured in the same process (a large
tensor reduction). This machine's bandwidth jumps between levels (about 30 to 80 GB/s here) every
few seconds, so it is measured every few decode steps (--probe-every) and those steps are scored
against the readings on either side of them. Decode runs eager and through torch.compile. With --bits 4 an int4
copy of the checkpoint (made once, as `groklm quantize --bits 4` makes it) is measured in the same
run, after the int8 one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

import groklm
from groklm import kernels
from groklm.config import get_preset
from groklm.convert import to_native
from groklm.files import advise_huge_pages
from groklm.generate import Decode, compile_decode, decode_one, prefill, sample
from groklm.model import Grok, KVCache, MoE

CACHE = Path(__file__).resolve().parent / ".cache"


_BANDWIDTH_BUFFER: list[torch.Tensor] = []


def read_bandwidth(gib: float = 1.0, runs: int = 5) -> float:
    """Bytes/s of a large reduction: the rate at which this process can stream memory (best of
    `runs`). The buffer is made once and kept, so repeated measurements cost no allocation."""
    if not _BANDWIDTH_BUFFER or _BANDWIDTH_BUFFER[0].numel() != int(gib * 2**30) // 8:
        # in 2 MB pages where the kernel allows, as the loaded weights are: the limit for the same pages
        buffer = torch.empty(int(gib * 2**30) // 8, dtype=torch.int64)
        advise_huge_pages([buffer])
        _BANDWIDTH_BUFFER[:] = [buffer.fill_(1)]
    x = _BANDWIDTH_BUFFER[0]
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(runs))
    return x.numel() * 8 / best


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


_EXPERT_WEIGHT = re.compile(r"(^|\.)moe\.(w1|v|w2)\.")


def weight_bytes(module: nn.Module, experts_read: float) -> float:
    """Bytes of weights one decode step reads when each MoE layer reads `experts_read` of its
    experts (2 for one token, top-2): every other weight once, the output head included (the tied
    table, or its own int8 copy). The one embedding row looked up per token is left out (a few KB)."""
    tied = not any(True for _ in getattr(module, "head", nn.Module()).buffers())
    total = 0.0
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        n = t.numel() * t.element_size()
        if name == "embed.weight":
            total += n if tied else 0
        elif _EXPERT_WEIGHT.search(name):  # int8 or packed int4 alike: [E, ...]
            total += n * experts_read / t.shape[0]
        else:
            total += n
    return total


@contextlib.contextmanager
def experts_touched(moes: list[MoE]) -> Iterator[list[int]]:
    """Records, for every MoE call made inside, how many distinct experts its tokens chose (eager
    mode: the hooks run the router a second time)."""
    counts: list[int] = []

    def hook(moe: MoE, args: tuple[Tensor, ...]) -> None:
        counts.append(moe.route(args[0].reshape(-1, args[0].shape[-1]))[1].unique().numel())

    handles = [moe.register_forward_pre_hook(hook) for moe in moes]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def decode_steps(
    model: Grok,
    batch: int,
    steps: int,
    decode: Decode = decode_one,
    context: int = 64,
    probe: Callable[[], float] | None = None,
    probe_every: int = 1,
) -> tuple[list[float], list[float]]:
    """Seconds of each of `steps` decode steps of `batch` rows after `context` cached tokens (and one
    untimed step first, which compiles when `decode` is compiled). The context is random keys and
    values written straight into the cache (a prefill would only make them real, not faster); each
    step attends over the slots in use, as `generate` does. `probe`, if given, runs untimed before
    the first timed step of every `probe_every` and once after the last; its readings are returned
    with the seconds."""
    c = model.config
    cache = KVCache.allocate(c, batch, context + steps + 1, model.dtype, model.device)
    gen = torch.Generator().manual_seed(0)
    for k, v in zip(cache.k, cache.v, strict=True):
        k[:, :context] = torch.randn(k[:, :context].shape, generator=gen)
        v[:, :context] = torch.randn(v[:, :context].shape, generator=gen)
    cache.key_ok[:, :context] = True
    seconds: list[float] = []
    readings: list[float] = []
    with torch.inference_mode():  # all inputs inference tensors, as in generate (else compile sees two kinds)
        tokens = torch.arange(batch) * 17 + 3
        positions = torch.full((batch,), context)
        for step in range(steps + 1):
            if step and probe and (step - 1) % probe_every == 0:
                readings.append(probe())
            t = time.perf_counter()
            tokens = sample(decode(model, tokens, positions, cache.prefix(context + step + 1)), 0.0, 1.0, 0, None)
            if step:
                seconds.append(time.perf_counter() - t)
            positions += 1
    if probe:
        readings.append(probe())
    return seconds, readings


def step_fraction(step_bytes: float, seconds: list[float], probes: list[float], every: int = 1) -> float:
    """Median over runs of `every` steps (the last may be shorter) of (bytes the steps read / their time)
    over the mean of the bandwidth readings on either side of the run (`probes` holds one reading more
    than there are runs: decode_steps' with the same `every`)."""
    runs = [seconds[i : i + every] for i in range(0, len(seconds), every)]
    if len(probes) != len(runs) + 1:
        raise ValueError(f"{len(probes)} bandwidth readings for {len(runs)} runs of {every} steps")
    return statistics.median(
        step_bytes * len(run) / sum(run) / ((before + after) / 2)
        for run, before, after in zip(runs, probes, probes[1:], strict=False)
    )


def decode_rate(model: Grok, batch: int, steps: int, decode: Decode = decode_one, context: int = 64) -> float:
    """Tokens/s over `steps` decode steps (see `decode_steps`)."""
    return batch * steps / sum(decode_steps(model, batch, steps, decode, context)[0])


def prefill_rate(model: Grok, length: int) -> tuple[float, float]:
    """(prefill tokens/s for one prompt of `length`, time to first token in s)."""
    cache = KVCache.allocate(model.config, 1, length + 1, model.dtype, model.device)
    prompt = [[(7 * j) % 1000 + 3 for j in range(length)]]
    with torch.inference_mode():
        t = time.perf_counter()
        prefill(model, prompt, cache).argmax(-1)
        dt = time.perf_counter() - t
    return length / dt, dt


def int4_checkpoint(source: Path, group_size: int) -> Path:
    """An int4 copy of `source` (made once, as `groklm quantize --bits 4` makes it, and kept in the cache)."""
    out = CACHE / f"{source.name}-int4-g{group_size}"
    if not (out / "config.json").is_file():
        to_native(source, out, bits=4, group_size=group_size, progress=False, force=True)
    return out


def measure(model: Grok, batches: list[int], args: argparse.Namespace, bandwidths: list[float]) -> dict[str, object]:
    """Decode at each batch size (eager and, unless --no-compile, compiled), prefill and TTFT, each
    against the roofline measured around it; the bandwidth readings are appended to `bandwidths`."""
    per_token = weight_bytes(model, model.config.num_selected_experts)
    # A batch step reads every expert any of its tokens chose: counted on the runs' own tokens.
    per_step = {}
    for batch in batches:
        with experts_touched([layer.moe for layer in model.layers]) as touched:
            decode_rate(model, batch, args.steps)
        per_step[batch] = weight_bytes(model, statistics.mean(touched))
    readings: list[float] = []

    def scored_runs(batch: int, decode: Decode) -> tuple[list[float], list[float], list[float]]:
        """tokens/s of each run, each run's fraction of its roofline (the median over its steps of
        (bytes a step of this batch reads / the step's time) over the bandwidth measured right before
        and right after that step, their mean; with --probe-every N, over N steps at a time) and each
        run's median bandwidth reading. This machine's bandwidth jumps between levels every few
        seconds, so the roofline is measured a few steps at a time."""
        rates, fractions, levels = [], [], []
        every = args.probe_every
        for _ in range(args.runs):
            seconds, probes = decode_steps(model, batch, args.steps, decode, probe=lambda: read_bandwidth(0.5, 3),
                                           probe_every=every)  # fmt: skip
            readings.extend(probes)
            rates.append(batch * len(seconds) / sum(seconds))
            fractions.append(step_fraction(per_step[batch], seconds, probes, every))
            levels.append(statistics.median(probes) / 1e9)
        return rates, fractions, levels

    t = time.perf_counter()
    decoders = {"eager": decode_one}
    if not args.no_compile:
        compiled = compile_decode()
        for batch in batches:
            decode_rate(model, batch, 1, compiled)  # compile now, not inside a timed run
        decoders["compiled"] = compiled
    compile_s = time.perf_counter() - t
    results: dict[str, dict[str, object]] = {}
    for name, decode in decoders.items():
        results[name] = {}
        for batch in batches:
            rates, fractions, levels = scored_runs(batch, decode)
            results[name][f"b{batch}"] = {
                "tokens_per_s": _spread(rates),
                "fraction_of_roofline": _spread(fractions),
                "read_bandwidth_GBps": _spread(levels),
            }
        results[name]["b1_at_context_1000_tokens_per_s"] = _spread(
            [decode_rate(model, 1, args.steps, decode, context=1000) for _ in range(args.runs)]
        )
    # Prefill is compute-bound: its rate, and the bandwidth around it only to say which level it ran at.
    prefills, around = [], []
    for _ in range(args.runs):
        around.append(read_bandwidth(0.5, 3))
        prefills.append(prefill_rate(model, args.prefill)[0])
    around.append(read_bandwidth(0.5, 3))
    readings.extend(around)
    ttft = [prefill_rate(model, 32)[1] for _ in range(args.runs)]
    bandwidths.extend(readings)
    return {
        "kernels": kernels.isa(),
        "read_bandwidth_GBps": _spread([b / 1e9 for b in readings]),
        "weight_bytes_per_token": round(per_token),
        "roofline_b1_tokens_per_s": round(statistics.median(readings) / per_token, 2),
        "weight_bytes_per_step": {f"b{b}": round(per_step[b]) for b in batches},
        # The most batch B can gain over batch 1 at memory speed: B tokens a step, each step reading
        # the experts all B chose.
        "over_b1_at_roofline": {f"b{b}": round(b * per_token / per_step[b], 2) for b in batches},
        "decode": results,
        "compile_s": round(compile_s, 1),
        f"prefill_{args.prefill}_tokens_per_s": _spread(prefills),
        "prefill_read_bandwidth_GBps": _spread([b / 1e9 for b in around]),
        "ttft_32_tokens_s": round(statistics.median(ttft), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--checkpoint", help="benchmark this checkpoint instead of the preset's")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(8, 4),
        default=8,
        help="4: also an int4 copy of the checkpoint (made once), measured in the same run as it",
    )
    parser.add_argument("--group-size", type=int, default=64, help="the int4 copy's scale group")
    parser.add_argument("--batches", default="1,8", help="decode batch sizes, comma-separated")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--no-compile", action="store_true", help="eager decode only")
    parser.add_argument(
        "--probe-every",
        type=int,
        default=4,
        help="decode steps between two bandwidth readings: a reading reads 2 GB, and the step right after one "
        "ran 0.4-0.8 ms slower than a step after a step (int4 bench-mid, ~26 ms); 1 reads around every step",
    )
    args = parser.parse_args()
    # a 0-token prompt failed deep in the model, with a traceback
    for name in ("prefill", "runs", "steps", "probe_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    batches = [int(b) for b in args.batches.split(",")]

    ckpt = Path(args.checkpoint) if args.checkpoint else CACHE / args.preset
    if not args.checkpoint and not (ckpt / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(ckpt, get_preset(args.preset), seed=0, progress=False)
    checkpoints = {"int8": ckpt} if args.bits == 8 else {"int8": ckpt, "int4": int4_checkpoint(ckpt, args.group_size)}
    # the build: `kernels` (its ISA) in each model's report, and any extra flags it was built with
    report: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "kernel_cflags": os.environ.get("GROKLM_CFLAGS", ""),
    }
    bandwidths: list[float] = []
    for name, path in checkpoints.items():
        disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.name != "tokenizer.model")
        t = time.perf_counter()
        model = groklm.load(path, dtype=torch.bfloat16, progress=False)
        load_s = time.perf_counter() - t
        report[name] = {"checkpoint": str(path), "checkpoint_bytes": disk, "load_s": round(load_s, 2),
                        **measure(model, batches, args, bandwidths)}  # fmt: skip
        del model
    report["read_bandwidth_GBps"] = _spread([b / 1e9 for b in bandwidths])
    if "int4" in report:
        int8, int4 = (report[k][f"prefill_{args.prefill}_tokens_per_s"]["median"] for k in ("int8", "int4"))
        report["int4_prefill_over_int8"] = round(int4 / int8, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    report["peak_rss_bytes"] = peak
    print(json.dumps(report, indent=1))


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


if __name__ == "__main__":
    main()
