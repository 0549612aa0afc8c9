"""Decode latency of full-size Grok-1 decoder layers (int8, as released) against their roofline, as JSON.

    .venv/bin/python -m benchmarks.layer [--layers 1] [--runs 5]

Builds the layers in memory with random int8 weights and the released scale grouping (no
checkpoint needed; ~4.9 GB per layer), measures the read bandwidth in the same process, and times
one decode step per layer at batch 1 and 8. `grok1_tokens_per_s` is what 64 such layers would do
per token on this machine given the memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from benchmarks.decode import experts_touched, read_bandwidth, weight_bytes
from groklm.config import get_preset
from groklm.model import Block, KVCache, rope_tables
from groklm.quant import Int8ExpertLinear, Int8Linear, quantize_int8


def build_layer(seed: int) -> Block:
    config = get_preset("grok-1")
    with torch.device("meta"):
        block = Block(config, torch.bfloat16)
    quantize_int8(
        block, lambda name: None if name.endswith("router") else 8 if name.endswith(("attn.wo", "moe.w2")) else 1
    )
    block.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, (Int8Linear, Int8ExpertLinear)):
                module.weight.random_(-127, 128, generator=gen)
                module.scales.fill_(2e-3)
        block.moe.router.weight.normal_(0, 0.02, generator=gen)
        for norm in (block.attn_norm, block.attn_out_norm, block.moe_norm, block.moe_out_norm):
            norm.weight.fill_(1.0)
    return block.eval().requires_grad_(False)


def step_seconds(blocks: list[Block], batch: int, context: int, runs: int) -> list[float]:
    """Seconds for one decode step through all `blocks`, `runs` times."""
    c = get_preset("grok-1")
    cache = KVCache.allocate(c.replace(num_layers=len(blocks)), batch, context + runs + 2, torch.bfloat16, "cpu")
    cache.key_ok[:, : context + runs + 2] = True
    rows = torch.arange(batch)[:, None]
    gen = torch.Generator().manual_seed(1)
    out = []
    with torch.inference_mode():
        for step in range(runs + 1):  # the first is a warm-up
            pos = torch.full((batch, 1), context + step)
            cos, sin = rope_tables(pos, c.key_size, c.rope_base)
            mask = (torch.arange(cache.slots)[None, None, :] <= pos[:, :, None])[:, None, None]
            h = torch.randn(batch, 1, c.emb_size, generator=gen).bfloat16()
            t = time.perf_counter()
            for i, block in enumerate(blocks):
                h = block(h, cos, sin, mask, (cache.k[i], cache.v[i]), (rows, pos))
            if step:
                out.append(time.perf_counter() - t)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--context", type=int, default=256)
    args = parser.parse_args()

    blocks = [build_layer(seed) for seed in range(args.layers)]
    # The bandwidth drifts on shared machines: measured before and after the batch-1 runs, and the
    # higher of the two sets the roofline (the conservative choice).
    before = read_bandwidth()
    b1 = [s / args.layers for s in step_seconds(blocks, 1, args.context, args.runs)]
    bandwidth = max(before, read_bandwidth())
    with experts_touched([block.moe for block in blocks]) as touched:  # untimed: the hooks cost time
        step_seconds(blocks, 8, args.context, args.runs)
    b8 = [s / args.layers for s in step_seconds(blocks, 8, args.context, args.runs)]
    per_layer = weight_bytes(blocks[0], get_preset("grok-1").num_selected_experts)
    per_layer_b8 = weight_bytes(blocks[0], statistics.mean(touched))
    roofline_s = per_layer / bandwidth
    layers = get_preset("grok-1").num_layers
    print(
        json.dumps(
            {
                "layers_built": args.layers,
                "threads": torch.get_num_threads(),
                "read_bandwidth_GBps": round(bandwidth / 1e9, 2),
                "read_bandwidth_before_b1_GBps": round(before / 1e9, 2),
                "layer_bytes_per_token": round(per_layer),
                "layer_roofline_ms": round(roofline_s * 1e3, 2),
                "layer_b1_ms": {"min": round(min(b1) * 1e3, 2), "median": round(statistics.median(b1) * 1e3, 2)},
                "layer_b8_ms": {"min": round(min(b8) * 1e3, 2), "median": round(statistics.median(b8) * 1e3, 2)},
                "layer_fraction_of_roofline": round(roofline_s / statistics.median(b1), 3),
                "b8_experts_read": round(statistics.mean(touched), 2),
                "layer_b8_roofline_ms": round(per_layer_b8 / bandwidth * 1e3, 2),
                "layer_b8_fraction_of_roofline": round(per_layer_b8 / bandwidth / statistics.median(b8), 3),
                "grok1_tokens_per_s": round(1 / (layers * statistics.median(b1)), 3),
                "grok1_roofline_tokens_per_s": round(1 / (layers * roofline_s), 3),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
