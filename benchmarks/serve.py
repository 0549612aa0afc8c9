"""`groklm serve` on bench-mid over real HTTP: N concurrent streaming clients against the plain batched
decode measured in the same run, and the time to first token with a cached 512-token prefix, as JSON.

    .venv/bin/python benchmarks/serve.py [--clients 1 4 8 16] [--tokens 64] [--runs 2] [--schema] [--preset P]

For each N, N clients start together, each with a prompt of its own length (16-128 tokens, greedy,
`--tokens` new tokens, EOS ignored), streaming. Reported per N:
- `output_tokens_per_s`: all tokens over the wall time (prefill included);
- `decode_tokens_per_s`: tokens received from the moment every client has its first token until the
  first client finishes, over that time: the engine's steady state, all N decoding;
- `plain_decode_tokens_per_s`: `decode_one` at batch N in this process (no HTTP, no scheduler), the
  same model, measured right before; `engine_over_plain` = decode / plain: the engine's own cost;
- time to first token and inter-token latency (p50, p99; one reading per token received).
The plain decode is scored against the read bandwidth measured around it (`roofline_fraction`).
`--schema` puts a JSON schema (SCHEMA: at least 64 short strings, more than `--tokens` can hold, so
no document ends early) on every request: the same figures then include the grammar's cost, each
row's token mask.
Prefix: the time to first token of a 512-token prompt prefilled from nothing, then of one sharing its
first 512 tokens (cached by the first) with 8 more, each alone on the server.

With `--adapters K`, the server holds K random rank-16 attention adapters (`--lora-modules`) and, for
each N, N clients on the base alone are measured against N clients spread round robin over the K
adapters (`decode_tokens_per_s` of each, and `adapters_over_base`); nothing else is run.
`--preset` picks a smaller model where bench-mid does not fit the time or memory at hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

import groklm
from benchmarks.decode import CACHE, decode_steps, experts_touched, read_bandwidth, step_fraction, weight_bytes
from groklm.config import get_preset

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT.parent / "shared" / "tokenizer" / "grok-1" / "tokenizer.model"
SCHEMA = {"type": "object", "required": ["notes"], "additionalProperties": False,
          "properties": {"notes": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 64}}}  # fmt: skip


def start_server(ckpt: Path, max_batch: int, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-m", "groklm", "serve", "--checkpoint", str(ckpt), "--port", "0", "--quiet",
           "--max-batch", str(max_batch), "--max-model-len", "1024", *extra]  # fmt: skip
    if TOKENIZER.is_file():
        cmd += ["--tokenizer", str(TOKENIZER)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT)
    assert proc.stdout is not None
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        m = re.search(r"at (http://[\d.]+:\d+)", proc.stdout.readline())
        if m:
            return proc, m.group(1)
    raise RuntimeError("the server did not start")


def stream(url: str, prompt: list[int], tokens: int, schema: bool = False, model: str | None = None
           ) -> tuple[float, list[float], int]:  # fmt: skip
    """(request start, arrival time of every streamed chunk, completion tokens)."""
    body: dict[str, Any] = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
                            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    if schema:
        body["structured_outputs"] = {"json": SCHEMA}
    if model:
        body["model"] = model
    start, arrivals, used = time.perf_counter(), [], 0
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
    return start, arrivals, used


def concurrent(url: str, n: int, tokens: int, rng: random.Random, schema: bool = False,
               models: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """N streaming clients; client i asks for models[i % len(models)] (default: the base)."""
    prompts = [[rng.randrange(3, 100_000) for _ in range(rng.randint(16, 128))] for _ in range(n)]
    results: list[Any] = [None] * n
    names = [models[i % len(models)] if models else None for i in range(n)]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, stream(url, prompts[i], tokens, schema, names[i])))
        for i in range(n)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    firsts = [arr[0] for _, arr, _ in results]
    lasts = [arr[-1] for _, arr, _ in results]
    window = (max(firsts), min(lasts))
    in_window = sum(sum(window[0] < a <= window[1] for a in arr) for _, arr, _ in results)
    ttft = [arr[0] - start for start, arr, _ in results]
    itl = [b - a for _, arr, _ in results for a, b in itertools.pairwise(arr)]
    q = lambda xs, p: statistics.quantiles(xs, n=100)[p - 1] if len(xs) > 1 else xs[0]  # noqa: E731
    return {
        "output_tokens_per_s": round(sum(u for _, _, u in results) / wall, 2),
        "decode_tokens_per_s": round(in_window / (window[1] - window[0]), 2) if window[1] > window[0] else None,
        "ttft_s": {"p50": round(q(ttft, 50), 3), "p99": round(q(ttft, 99), 3)},
        "itl_s": {"p50": round(q(itl, 50), 4), "p99": round(q(itl, 99), 4)},
    }


def plain_decode(model: groklm.Grok, n: int, steps: int) -> dict[str, float]:
    with experts_touched([layer.moe for layer in model.layers]) as touched:  # experts a step of n tokens reads
        decode_steps(model, n, 2, context=100)
    seconds, probes = decode_steps(model, n, steps, context=100, probe=lambda: read_bandwidth(0.5, 3))
    per_step = weight_bytes(model, statistics.mean(touched))
    return {"plain_decode_tokens_per_s": round(n * len(seconds) / sum(seconds), 2),
            "roofline_fraction": round(step_fraction(per_step, seconds, probes), 3),
            "read_bandwidth_GBps": round(statistics.median(probes) / 1e9, 1)}  # fmt: skip


def ttft_of(url: str, prompt: list[int]) -> float:
    start, arrivals, _ = stream(url, prompt, 2)
    return arrivals[0] - start


def make_adapters(ckpt: Path, k: int) -> list[Path]:
    """K random rank-16 adapters on the attention (B not zero: they change the output), cached."""
    from groklm.train.lora import LoraConfig, adapters, add_lora, save_adapter

    dirs = [ckpt.parent / f"{ckpt.name}-lora-{i}" for i in range(k)]
    if all((d / "adapter_model.safetensors").is_file() for d in dirs):
        return dirs
    lora = LoraConfig(16, 32.0, 0.0, ["attn"]).check()
    model = add_lora(groklm.load(ckpt, dtype=torch.bfloat16, progress=False), lora)
    gen = torch.Generator().manual_seed(0)
    for d in dirs:
        with torch.no_grad():
            for m in adapters(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.01)
        save_adapter(model, lora, d)
    return dirs


def adapters_run(ckpt: Path, args: argparse.Namespace) -> dict[str, Any]:
    dirs = make_adapters(ckpt, args.adapters)
    names = [f"a{i}" for i in range(len(dirs))]
    modules = [f"{n}={d}" for n, d in zip(names, dirs, strict=True)]
    proc, url = start_server(ckpt, max(args.clients), "--lora-modules", *modules)
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "adapters": len(dirs)}
    rng = random.Random(0)
    try:
        stream(url, [5, 6, 7], 4)  # warm up
        stream(url, [5, 6, 7], 4, model=names[0])
        for n in args.clients:
            runs = []
            for _ in range(args.runs):
                base = concurrent(url, n, args.tokens, rng)
                spread = concurrent(url, n, args.tokens, rng, models=names)
                ratio = (spread["decode_tokens_per_s"] / base["decode_tokens_per_s"]
                         if spread["decode_tokens_per_s"] and base["decode_tokens_per_s"] else None)  # fmt: skip
                runs.append({"base": base, "adapters": spread, "adapters_over_base": ratio and round(ratio, 3)})
            report[f"clients_{n}"] = runs
            print(json.dumps({f"clients_{n}": runs}), file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--schema", action="store_true", help="a JSON schema on every request (grammar overhead)")
    parser.add_argument("--adapters", type=int, default=0, help="spread the clients over this many LoRA adapters")
    parser.add_argument("--preset", default="bench-mid", help="the random checkpoint served (mini: a small one)")
    args = parser.parse_args()
    ckpt = CACHE / args.preset
    if not (ckpt / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(ckpt, get_preset(args.preset), seed=0, progress=False)
    if args.adapters:
        print(json.dumps(adapters_run(ckpt, args), indent=1))
        return
    model = groklm.load(ckpt, dtype=torch.bfloat16, progress=False)
    proc, url = start_server(ckpt, max(args.clients))
    report: dict[str, Any] = {"threads": torch.get_num_threads(), "preset": args.preset, "schema": args.schema}
    rng = random.Random(0)
    try:
        stream(url, [5, 6, 7], 4, args.schema)  # warm up (with a schema: the grammar's vocabulary is built once)
        for n in args.clients:
            runs = []
            for _ in range(args.runs):
                plain = plain_decode(model, n, 8)
                served = concurrent(url, n, args.tokens, rng, args.schema)
                ratio = (
                    served["decode_tokens_per_s"] / plain["plain_decode_tokens_per_s"]
                    if served["decode_tokens_per_s"]
                    else None
                )
                runs.append({**served, **plain, "engine_over_plain": ratio and round(ratio, 3)})
            report[f"clients_{n}"] = runs
            print(json.dumps({f"clients_{n}": runs}), file=sys.stderr)
        ttfts = []
        for _ in range(args.runs):
            fresh = [rng.randrange(3, 100_000) for _ in range(512)]
            uncached = ttft_of(url, fresh)
            cached = ttft_of(url, fresh + [rng.randrange(3, 100_000) for _ in range(8)])
            ttfts.append({"uncached_512_s": round(uncached, 3), "cached_512_plus_8_s": round(cached, 3),
                          "speedup": round(uncached / cached, 1)})  # fmt: skip
        report["prefix_cache_ttft"] = ttfts
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
