"""Decode/prefill speed of a `bench-mid` checkpoint against the memory-bandwidth roofline, as JSON.

    .venv/bin/python benchmarks/decode.py [--preset bench-mid] [--runs 3]

The roofline is bytes of weights read per decoded token (from the model as loaded) divided by the
read bandwidth measured in the same process (a large tensor reduction).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch

import groklm
from groklm.config import get_preset
from groklm.generate import decode_one, prefill
from groklm.model import Grok, KVCache

CACHE = Path(__file__).resolve().parent / ".cache"


def read_bandwidth(gib: float = 1.0, runs: int = 5) -> float:
    """Bytes/s of a large reduction: the rate at which this process can stream memory."""
    x = torch.ones(int(gib * 2**30) // 8, dtype=torch.int64)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(runs))
    return x.numel() * 8 / best


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def bytes_per_token(model: Grok) -> int:
    """Weights one decoded token reads: all non-expert weights, the chosen experts' share of the
    expert weights, and the output head (the tied table, or its own int8 copy). The one embedding
    row looked up per token is left out (a few KB)."""
    c = model.config
    tied = not any(True for _ in model.head.buffers())
    total = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        n = t.numel() * t.element_size()
        if name == "embed.weight":
            total += n if tied else 0
        elif ".moe.w1." in name or ".moe.v." in name or ".moe.w2." in name:  # int8 or packed int4 alike
            total += n * c.num_selected_experts // c.num_experts
        else:
            total += n
    return total


def decode_rate(model: Grok, batch: int, steps: int, context: int = 64) -> float:
    """Tokens/s over `steps` decode steps of `batch` rows after a short prefill."""
    cache = KVCache.allocate(model.config, batch, context + steps + 1, model.dtype, model.device)
    prompts = [[(17 * i + j) % 1000 + 3 for j in range(context)] for i in range(batch)]
    with torch.inference_mode():
        logits = prefill(model, prompts, cache)
        tokens = logits.argmax(-1)
        positions = torch.full((batch,), context)
        decode_one(model, tokens, positions, cache)  # warm up
        positions += 1
        t = time.perf_counter()
        for _ in range(steps):
            tokens = decode_one(model, tokens, positions, cache).argmax(-1)
            positions += 1
        dt = time.perf_counter() - t
    return batch * steps / dt


def prefill_rate(model: Grok, length: int) -> tuple[float, float]:
    """(prefill tokens/s for one prompt of `length`, time to first token in s)."""
    cache = KVCache.allocate(model.config, 1, length + 1, model.dtype, model.device)
    prompt = [[(7 * j) % 1000 + 3 for j in range(length)]]
    with torch.inference_mode():
        t = time.perf_counter()
        prefill(model, prompt, cache).argmax(-1)
        dt = time.perf_counter() - t
    return length / dt, dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--checkpoint", help="benchmark this checkpoint (e.g. an int4 one) instead of the preset's")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prefill", type=int, default=512)
    args = parser.parse_args()

    ckpt = Path(args.checkpoint) if args.checkpoint else CACHE / args.preset
    if not args.checkpoint and not (ckpt / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(ckpt, get_preset(args.preset), seed=0, progress=False)
    disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file() and f.name != "tokenizer.model")

    t = time.perf_counter()
    model = groklm.load(ckpt, dtype=torch.bfloat16, progress=False)
    load_s = time.perf_counter() - t

    bandwidth = read_bandwidth()
    per_token = bytes_per_token(model)
    roofline = bandwidth / per_token
    b1 = [decode_rate(model, 1, args.steps) for _ in range(args.runs)]
    b8 = [decode_rate(model, 8, args.steps) for _ in range(args.runs)]
    pre = [prefill_rate(model, args.prefill) for _ in range(max(1, args.runs - 1))]
    ttft = [prefill_rate(model, 32)[1] for _ in range(args.runs)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "threads": torch.get_num_threads(),
                "checkpoint_bytes": disk,
                "load_s": round(load_s, 2),
                "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
                "weight_bytes_per_token": per_token,
                "roofline_tokens_per_s": round(roofline, 2),
                "decode_b1_tokens_per_s": {"min": round(min(b1), 3), "median": round(statistics.median(b1), 3)},
                "decode_b8_tokens_per_s": {"min": round(min(b8), 3), "median": round(statistics.median(b8), 3)},
                "decode_fraction_of_roofline": round(statistics.median(b1) / roofline, 3),
                "b8_over_b1": round(statistics.median(b8) / statistics.median(b1), 2),
                f"prefill_{args.prefill}_tokens_per_s": round(statistics.median(p for p, _ in pre), 1),
                "ttft_32_tokens_s": round(statistics.median(ttft), 3),
                "peak_rss_bytes": peak,
                "peak_rss_over_checkpoint": round(peak / disk, 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
