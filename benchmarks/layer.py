"""Decode latency of full-size Grok-1 decoder layers (int8, as released, or int4) against their
roofline, as JSON.

    .venv/bin/python -m benchmarks.layer [--layers 1] [--runs 5] [--bits 4 [--group-size 64]]

Builds the layers in memory with random weights: int8 with the released scale grouping (~4.9 GB per
layer), or int4 as `groklm quantize --bits 4` lays it out and `groklm.load` holds it (in the CPU
kernel's panels; ~2.6 GB per layer); no checkpoint needed. Measures the read bandwidth in the same process, and times
one decode step per layer at batch 1 and 8, each step against the bandwidth read on either side of
it. `grok1_tokens_per_s` is what 64 such layers would do per token on this machine given the memory
(at the median bandwidth).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from benchmarks.decode import experts_touched, read_bandwidth, step_fraction, weight_bytes
from groklm.config import get_preset
from groklm.files import advise_huge_pages
from groklm.model import Block, KVCache, rope_tables
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    pack_int4,
    quantize_int4,
    quantize_int8,
)


def build_layer(seed: int, bits: int = 8, group_size: int = 64) -> Block:
    config = get_preset("grok-1")
    with torch.device("meta"):
        block = Block(config, torch.bfloat16)
    if bits == 8:
        quantize_int8(
            block, lambda name: None if name.endswith("router") else 8 if name.endswith(("attn.wo", "moe.w2")) else 1
        )
    else:
        quantize_int4(block, group_size)
    block.to_empty(device="cpu")
    advise_huge_pages([*block.parameters(), *block.buffers()])  # as the loaders do
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, (Int8Linear, Int8ExpertLinear)):
                module.weight.random_(-127, 128, generator=gen)
                module.scales.fill_(2e-3)
            elif isinstance(module, (Int4Linear, Int4ExpertLinear)):
                module.weight.random_(0, 256, generator=gen)  # two nibbles a byte
                module.scales.fill_(3e-2)
        block.moe.router.weight.normal_(0, 0.02, generator=gen)
        for norm in (block.attn_norm, block.attn_out_norm, block.moe_norm, block.moe_out_norm):
            norm.weight.fill_(1.0)
    return pack_int4(block).eval().requires_grad_(False)  # (as groklm.load leaves int4 weights)


def step_seconds(
    blocks: list[Block], batch: int, context: int, runs: int, probe: Callable[[], float] | None = None
) -> tuple[list[float], list[float]]:
    """Seconds for one decode step through all `blocks`, `runs` times; `probe`, if given, runs untimed
    before every timed step and once after the last, and its readings are returned too."""
    c = get_preset("grok-1")
    cache = KVCache.allocate(c.replace(num_layers=len(blocks)), batch, context + runs + 2, torch.bfloat16, "cpu")
    cache.key_ok[:, : context + runs + 2] = True
    rows = torch.arange(batch)[:, None]
    gen = torch.Generator().manual_seed(1)
    out: list[float] = []
    readings: list[float] = []
    with torch.inference_mode():
        for step in range(runs + 1):  # the first is a warm-up
            pos = torch.full((batch, 1), context + step)
            cos, sin = rope_tables(pos, c.key_size, c.rope_base)
            mask = (torch.arange(cache.slots)[None, None, :] <= pos[:, :, None])[:, None, None]
            h = torch.randn(batch, 1, c.emb_size, generator=gen).bfloat16()
            if step and probe:
                readings.append(probe())
            t = time.perf_counter()
            for i, block in enumerate(blocks):
                h = block(h, cos, sin, mask, (cache.k[i], cache.v[i]), (rows, pos))
            if step:
                out.append(time.perf_counter() - t)
    if probe:
        readings.append(probe())
    return out, readings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8)
    parser.add_argument("--group-size", type=int, default=64, help="int4: input columns per scale")
    args = parser.parse_args()

    blocks = [build_layer(seed, args.bits, args.group_size) for seed in range(args.layers)]
    c = get_preset("grok-1")
    with experts_touched([block.moe for block in blocks]) as touched:  # untimed: the hooks cost time
        step_seconds(blocks, 8, args.context, 2)
    per_step = {
        1: weight_bytes(blocks[0], c.num_selected_experts),
        8: weight_bytes(blocks[0], statistics.mean(touched)),
    }
    # The bandwidth jumps between levels every few seconds on shared machines: it is read before
    # and after every step, and each step is scored against the mean of the two readings.
    seconds, fractions, bandwidths = {}, {}, []
    for batch in (1, 8):
        secs, probes = step_seconds(blocks, batch, args.context, args.runs, probe=lambda: read_bandwidth(0.5, 3))
        seconds[batch] = [s / args.layers for s in secs]
        fractions[batch] = step_fraction(per_step[batch], seconds[batch], probes)
        bandwidths.extend(probes)
    b1, b8 = seconds[1], seconds[8]
    per_layer = per_step[1]
    bandwidth = statistics.median(bandwidths)
    roofline_s = per_layer / bandwidth
    layers = c.num_layers
    print(
        json.dumps(
            {
                "layers_built": args.layers,
                "bits": args.bits,
                "threads": torch.get_num_threads(),
                "read_bandwidth_GBps": {
                    "min": round(min(bandwidths) / 1e9, 2),
                    "median": round(bandwidth / 1e9, 2),
                    "max": round(max(bandwidths) / 1e9, 2),
                },
                "layer_bytes_per_token": round(per_layer),
                "layer_roofline_ms": round(roofline_s * 1e3, 2),
                "layer_b1_ms": {"min": round(min(b1) * 1e3, 2), "median": round(statistics.median(b1) * 1e3, 2)},
                "layer_b8_ms": {"min": round(min(b8) * 1e3, 2), "median": round(statistics.median(b8) * 1e3, 2)},
                "layer_fraction_of_roofline": round(fractions[1], 3),
                "b8_experts_read": round(statistics.mean(touched), 2),
                "layer_b8_bytes_per_step": round(per_step[8]),
                "layer_b8_fraction_of_roofline": round(fractions[8], 3),
                "grok1_tokens_per_s": round(1 / (layers * statistics.median(b1)), 3),
                "grok1_roofline_tokens_per_s": round(1 / (layers * roofline_s), 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
