"""Tensor and expert parallel on the CPU: bench-mid over gloo in 2 ranks, each layout against one process,
as JSON.

    .venv/bin/python benchmarks/parallel.py [--steps 16] [--layouts 1x1 2x1 1x2] [--formats released native]

For each layout (tp x ep) and checkpoint format, every rank (a fresh process) reports: its peak RSS while
loading (VmHWM, torch included) against the checkpoint's size, the bytes it holds, the decode step time
(batch 1, bf16), the part of it spent in the collectives (`parallel.Stats`: all-reduces and the logits'
all-gather) and the bytes they move per token. The roofline: the bytes the ranks read per step (their
shares of the weights, each rank the experts it holds of the two a token chose) over the memory bandwidth
the ranks measure together in the same run (a large reduction on every rank at once). One process uses
all the cores; the ranks split them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import groklm
from benchmarks.decode import CACHE, decode_steps, read_bandwidth, weight_bytes
from groklm.config import get_preset


def _status(field: str) -> int:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _rank(rank: int, world: int, port: int, tp: int, ep: int, path: str, steps: int, threads: int, out: str) -> None:
    from groklm import parallel

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(threads)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    t = time.perf_counter()
    model = groklm.load(path, progress=False, tp=tp, ep=ep)
    load_s = time.perf_counter() - t
    load_peak = _status("VmHWM")
    held = sum(x.numel() * x.element_size() for x in [*model.parameters(), *model.buffers()])
    experts_local = model.config.num_experts // ep if world > 1 else model.config.num_experts
    step_bytes = weight_bytes(model, 2 * experts_local / get_preset("bench-mid").num_experts)

    def probe() -> float:  # every rank at once: the bandwidth the ranks share
        if world > 1:
            dist.barrier()
        return read_bandwidth(0.5, runs=2)

    decode_steps(model, 1, 2)  # warm
    parallel.Stats.seconds, parallel.Stats.bytes, parallel.Stats.calls = 0.0, 0, 0
    seconds, readings = decode_steps(model, 1, steps, probe=probe)
    calls = steps + 1  # (decode_steps runs one untimed step first)
    comm_s, comm_bytes = parallel.Stats.seconds / calls, parallel.Stats.bytes // calls
    collectives = parallel.Stats.calls / calls
    latency = 0.0
    if world > 1:  # the floor: an all-reduce of one token's activations with both ranks already there
        x = torch.zeros(model.config.emb_size)
        times = []
        for _ in range(50):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        latency = statistics.median(times)
    result = {
        "rank": rank,
        "load_s": round(load_s, 1),
        "rss_before_load": before,
        "load_peak_rss": load_peak,
        "held_bytes": held,
        "step_ms": round(1e3 * statistics.median(seconds), 2),
        "comm_ms_per_step": round(1e3 * comm_s, 2),
        "comm_bytes_per_token": comm_bytes,
        "collectives_per_step": collectives,
        "all_reduce_latency_us": round(1e6 * latency, 1),
        "read_bytes_per_step": int(step_bytes),
        "bandwidth": statistics.median(readings),
    }
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    if world > 1:
        dist.destroy_process_group()


def run(tp: int, ep: int, path: Path, steps: int, tmp: Path) -> dict[str, Any]:
    world, cores = tp * ep, os.cpu_count() or 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / f"r{tp}x{ep}"
    threads = max(1, cores // world)
    mp.start_processes(_rank, args=(world, port, tp, ep, str(path), steps, threads, str(out)), nprocs=world,
                       start_method="spawn")  # fmt: skip
    ranks = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    step = max(r["step_ms"] for r in ranks) / 1e3
    bandwidth = sum(r["bandwidth"] for r in ranks)
    read = sum(r["read_bytes_per_step"] for r in ranks)
    return {
        "tp": tp,
        "ep": ep,
        "threads_per_rank": threads,
        "checkpoint_bytes": size,
        "load_peak_rss_over_checkpoint": round(max(r["load_peak_rss"] for r in ranks) / size, 3),
        "held_bytes_per_rank": [r["held_bytes"] for r in ranks],
        "decode_tokens_per_s": round(1 / step, 2),
        "step_ms": step * 1e3,
        "comm_ms_per_step": max(r["comm_ms_per_step"] for r in ranks),
        "comm_bytes_per_token": ranks[0]["comm_bytes_per_token"],
        "all_reduce_latency_us": ranks[0]["all_reduce_latency_us"],
        "collectives_per_step": ranks[0]["collectives_per_step"],
        "read_bytes_per_step_all_ranks": read,
        "bandwidth_all_ranks": round(bandwidth / 1e9, 2),
        "roofline_fraction": round(read / step / bandwidth, 3),
        "ranks": ranks,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="tp x ep")
    parser.add_argument("--formats", nargs="+", default=["released", "native"], choices=["released", "native"])
    args = parser.parse_args()
    released = CACHE / "bench-mid"
    if not (released / "ckpt-0").is_dir():
        groklm.write_random_checkpoint(released, get_preset("bench-mid"), seed=0, progress=False)
    native = CACHE / "bench-mid-native"
    if "native" in args.formats and not (native / "config.json").is_file():
        from groklm.convert import to_native as convert

        convert(released, native, 8, progress=False)
    tmp = CACHE / "parallel"
    tmp.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"cores": os.cpu_count(), "results": []}
    for fmt in args.formats:
        for layout in args.layouts:
            tp, ep = (int(x) for x in layout.split("x"))
            r = run(tp, ep, released if fmt == "released" else native, args.steps, tmp)
            report["results"].append({"format": fmt, **r})
            print(json.dumps({k: v for k, v in r.items() if k != "ranks"} | {"format": fmt}), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
