"""GPU speed of groklm's Triton path against the device's own limits, as JSON (any CUDA machine).

    python benchmarks/gpu.py [--steps 32] [--no-graphs] [--no-layer]

Measured in the same run: the device's read bandwidth (a large reduction) and its bf16 matmul rate (a
large cuBLAS GEMM, the practical peak). Then:
- the int8 matmul alone (a Grok-1 expert's up projection, 6144 -> 32768, and its down projection with
  8 row blocks) at 1 and 16 rows: bytes of weight read / time, over the bandwidth;
- bench-mid (random int8 weights, written once to a temporary directory and loaded as released) decode
  at batch 1, 8 and 32, through CUDA graphs over the static cache (`--no-graphs`: eager), each against
  its roofline: bytes of weights a step reads (the experts its tokens chose, counted) plus the cache
  it reads, over the bandwidth;
- one full-size Grok-1 layer (random int8 weights in memory) decoding at batch 1, against its roofline;
- prefill of 2048 tokens of bench-mid: 2 x active parameters x tokens (plus attention) per second, over
  the measured bf16 rate.

`--device cpu --preset tiny --layer-preset tiny` with GROKLM_KERNELS=triton runs the same code through
Triton's interpreter (slowly; the figures then mean nothing): that checks the script, not the speed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import groklm
from benchmarks.decode import experts_touched, weight_bytes
from groklm import kernels
from groklm.config import get_preset
from groklm.generate import Decode, compile_decode_cuda, decode_one, prefill
from groklm.model import Block, KVCache, rope_tables
from groklm.quant import Int8ExpertLinear, Int8Linear, quantize_int8, quantize_weight
from groklm.runtime import interpret_triton_without_gpu

interpret_triton_without_gpu()  # with GROKLM_KERNELS=triton on a CPU: the kernels run interpreted


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, runs: int = 5) -> float:
    """Best seconds of `runs` calls (after one untimed)."""
    fn()
    best = float("inf")
    for _ in range(runs):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def read_bandwidth(device: torch.device, gib: float) -> float:
    x = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    return x.numel() * 4 / timed(lambda: x.sum(), device)


def bf16_rate(device: torch.device, n: int) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device)


def matmul_alone(device: torch.device, bandwidth: float, full: bool) -> dict[str, float]:
    """The int8 kernel on its own: fraction of the bandwidth its weight bytes take."""
    from groklm.kernels import triton as gpu

    d, f = (6144, 32768) if full else (256, 1024)
    out = {}
    for name, (n, k, groups) in {"up": (f, d, 1), "down": (d, f, 8)}.items():
        q, s = quantize_weight(torch.randn(n, k, device=device), groups, torch.bfloat16)
        for rows in (1, 16):
            x = torch.randn(rows, k, dtype=torch.bfloat16, device=device)
            dt = timed(lambda x=x, q=q, s=s: gpu.matmul(x, q, s, 8), device, runs=20)
            out[f"int8_{name}_{n}x{k}_rows{rows}_fraction_of_bandwidth"] = round(q.numel() / dt / bandwidth, 3)
    return out


def decode_steps(model: groklm.Grok, batch: int, steps: int, decode: Decode, context: int) -> float:
    """Median seconds of a decode step of `batch` rows after `context` cached tokens."""
    device = model.device
    cache = KVCache.allocate(model.config, batch, context + steps + 4, model.dtype, device)
    for k, v in zip(cache.k, cache.v, strict=True):
        k[:, :context].normal_()
        v[:, :context].normal_()
    cache.key_ok[:, :context] = True
    tokens = (torch.arange(batch, device=device) * 17 + 3) % model.config.vocab_size
    positions = torch.full((batch,), context, device=device)
    static = getattr(decode, "static_cache", False)
    seconds = []
    with torch.inference_mode():
        for step in range(steps + 3):  # the first three record / warm the graph
            view = cache if static else cache.prefix(context + step + 1)
            _sync(device)
            t = time.perf_counter()
            tokens = decode(model, tokens, positions, view).argmax(-1)
            _sync(device)
            if step >= 3:
                seconds.append(time.perf_counter() - t)
            positions += 1
    return statistics.median(seconds)


def cache_bytes(config: groklm.GrokConfig, layers: int, batch: int, slots: int) -> float:
    """Bytes of bf16 keys and values a decode step reads over `slots` cached positions."""
    return 2 * layers * batch * slots * config.num_kv_heads * config.key_size * 2


def full_layer(device: torch.device, preset: str, bandwidth: float, context: int) -> dict[str, float]:
    """One decoder layer of `preset` (Grok-1's size by default), random int8 weights, batch 1."""
    config = get_preset(preset)
    with torch.device("meta"):
        block = Block(config, torch.bfloat16)
    quantize_int8(
        block, lambda name: None if name.endswith("router") else 8 if name.endswith(("attn.wo", "moe.w2")) else 1
    )
    block.to_empty(device=device)
    with torch.no_grad():
        for module in block.modules():
            if isinstance(module, (Int8Linear, Int8ExpertLinear)):
                module.weight.random_(-127, 128)
                module.scales.fill_(2e-3)
        block.moe.router.weight.normal_(0, 0.02)
        for norm in (block.attn_norm, block.attn_out_norm, block.moe_norm, block.moe_out_norm):
            norm.weight.fill_(1.0)
    block.eval().requires_grad_(False)
    cache = KVCache.allocate(config.replace(num_layers=1), 1, context + 1, torch.bfloat16, device)
    cache.key_ok[:, : context + 1] = True
    x = torch.randn(1, 1, config.emb_size, dtype=torch.bfloat16, device=device)
    positions = torch.full((1, 1), context, device=device)
    cos, sin = rope_tables(positions, config.key_size, config.rope_base)
    mask = cache.key_ok[:, None, None, None, :]
    rows = torch.zeros(1, 1, dtype=torch.long, device=device)

    def step() -> None:
        with torch.inference_mode():
            block(x, cos, sin, mask, (cache.k[0], cache.v[0]), (rows, positions))

    with experts_touched([block.moe]) as touched:
        step()
    dt = timed(step, device, runs=20)
    read = weight_bytes(block, statistics.mean(touched)) + cache_bytes(config, 1, 1, context + 1)
    return {"layer_b1_ms": round(dt * 1e3, 3), "layer_b1_fraction_of_roofline": round(read / dt / bandwidth, 3)}


def bench_model(args: argparse.Namespace, device: torch.device, bandwidth: float, peak: float) -> dict[str, object]:
    """bench-mid's decode at batch 1, 8, 32 and its prefill, against their limits."""
    report: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        groklm.write_random_checkpoint(tmp, get_preset(args.preset), seed=0, progress=False)
        t = time.perf_counter()
        model = groklm.load(tmp, dtype=torch.bfloat16, device=device, progress=False)
        report["load_s"] = round(time.perf_counter() - t, 1)
    report["triton"] = kernels.use_triton(torch.empty(1, dtype=torch.bfloat16, device=device))
    decode: Decode = decode_one if args.no_graphs or device.type != "cuda" else compile_decode_cuda()
    report["decode"] = "eager" if decode is decode_one else "cuda graphs"
    for batch in (1, 8, 32):
        with experts_touched([layer.moe for layer in model.layers]) as touched:
            decode_steps(model, batch, 1, decode_one, args.context)
        # The attention reads each row's slots in use (a static cache's tail is skipped): ~context + 1.
        read = weight_bytes(model, statistics.mean(touched)) + cache_bytes(
            model.config, model.config.num_layers, batch, args.context + 1
        )
        dt = decode_steps(model, batch, args.steps, decode, args.context)
        report[f"decode_b{batch}_tokens_per_s"] = round(batch / dt, 1)
        report[f"decode_b{batch}_fraction_of_roofline"] = round(read / dt / bandwidth, 3)
    c = model.config
    active = c.emb_size * (c.q_size * 2 + c.kv_size * 2) + c.num_selected_experts * 3 * c.emb_size * c.ffn_size
    flops = 2 * args.prefill * (active * c.num_layers + c.emb_size * c.vocab_size)
    flops += 4 * c.num_layers * c.q_size * args.prefill**2 // 2  # causal attention: q.k and p.v
    cache = KVCache.allocate(c, 1, args.prefill + 1, model.dtype, device)
    prompt = [[(7 * j) % 1000 + 3 for j in range(args.prefill)]]
    with torch.inference_mode():
        dt = timed(lambda: prefill(model, prompt, cache), device, runs=3)
    report |= {"prefill_tokens_per_s": round(args.prefill / dt), "prefill_TFLOPs": round(flops / dt / 1e12, 1),
               "prefill_fraction_of_bf16_matmul": round(flops / dt / peak, 3)}  # fmt: skip
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="bench-mid")
    parser.add_argument("--layer-preset", default="grok-1")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--context", type=int, default=512, help="cached tokens each decode step attends over")
    parser.add_argument("--prefill", type=int, default=2048)
    parser.add_argument("--no-graphs", action="store_true", help="eager decode (no CUDA graphs)")
    parser.add_argument("--no-layer", action="store_true", help="skip the full-size layer (~5 GB)")
    args = parser.parse_args()
    device = torch.device(args.device)
    small = device.type != "cuda"
    report: dict[str, object] = {"device": torch.cuda.get_device_name(device) if not small else "cpu (interpreted)"}

    bandwidth = read_bandwidth(device, 0.0625 if small else 4.0)
    peak = bf16_rate(device, 256 if small else 8192)
    report |= {"read_bandwidth_GBps": round(bandwidth / 1e9, 1), "bf16_matmul_TFLOPs": round(peak / 1e12, 1)}
    report |= matmul_alone(device, bandwidth, full=not small)

    report |= bench_model(args, device, bandwidth, peak)
    if not args.no_layer:
        report |= full_layer(device, args.layer_preset, bandwidth, args.context)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
