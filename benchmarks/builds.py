"""Kernel builds against each other in one process, as JSON: each build's matvec, alternating call by
call on the same weight, each call after a plain read (a torch sum) that it is scored against.

    .venv/bin/python -m benchmarks.builds [--bits 8] [--k 2048] [--groups 1] -- "-DROW_PREFETCH=2048" ""

Each argument after `--` is a set of extra compiler flags (as `GROKLM_CFLAGS` takes them; "" is the
source as it is). This machine's memory jumps between speeds every few seconds, so builds run in
separate processes are not comparable; here every call of every build meets the same levels. The
weight is far larger than the caches, read once a call: a decode step's access pattern (`--rows`
activation rows: 1 for batch 1, more for a batch).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import time

import torch

from benchmarks import cpu
from groklm.kernels.build import compile_kernels
from groklm.kernels.isa import BASE_FLAGS, ISA_FLAGS, candidates
from groklm.quant.linear import block_major, scales_to_panels, to_panels


def load(flags: list[str], isa: str) -> ctypes.CDLL:
    """The kernel library built with these extra flags (cached as the package caches its own build)."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("builds.py: no C compiler")
    path = compile_kernels(compiler, [*BASE_FLAGS, *ISA_FLAGS[isa], *flags])
    if path is None:
        raise SystemExit(f"builds.py: the kernels did not compile with {flags}")
    lib = ctypes.CDLL(str(path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.groklm_linear.argtypes, lib.groklm_linear.restype = [i, p, i, i, i, i, p, p, i, p, p, i, i], i
    lib.groklm_chunk.argtypes, lib.groklm_chunk.restype = [i, i, i], i
    return lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("builds", nargs="+", help='extra compiler flags of each build ("" for none)')
    parser.add_argument("--bits", type=int, choices=(8, 4), default=8)
    parser.add_argument("--k", type=int, default=2048, help="input columns (a weight row)")
    parser.add_argument("--groups", type=int, default=1, help="scale groups a row (int4: 32-column multiples)")
    parser.add_argument("--block-major", action="store_true", help="int8 block-major (int4 is always in panels)")
    parser.add_argument("--mb", type=int, default=512, help="weight size")
    parser.add_argument("--rows", type=int, default=1, help="activation rows (a batch): 1 is a decode step's")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--isa", choices=sorted(ISA_FLAGS), default=candidates()[0][0])
    args = parser.parse_args()
    k, groups = args.k, args.groups
    if k % groups or (k // groups) % (64 if args.bits == 8 else 32) or args.mb < 1 or args.threads < 1 or args.rows < 1:
        parser.error("--k must split into --groups of 64 columns (int8) or 32 (int4); --mb, --threads, --rows >= 1")
    torch.set_num_threads(args.threads)
    libs = [load(b.split(), args.isa) for b in args.builds]

    row = k if args.bits == 8 else k // 2
    n = args.mb * 2**20 // row // 64 * 64
    gen = torch.Generator().manual_seed(0)
    scales = torch.rand(n, groups, generator=gen).to(torch.bfloat16)
    if args.bits == 8:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        blocked = args.block_major
        if blocked:
            weight = block_major(weight, groups)
    else:
        weight = to_panels(torch.randint(0, 256, (n, row), dtype=torch.uint8, generator=gen))
        scales, blocked = scales_to_panels(scales), True
    x = torch.randn(args.rows, k, generator=gen).to(torch.bfloat16)
    y = torch.empty(args.rows, n, dtype=torch.bfloat16)
    probe = torch.ones(256 * 2**20 // 8, dtype=torch.int64)
    wp, sp = (ctypes.c_void_p * 1)(weight.data_ptr()), (ctypes.c_void_p * 1)(scales.data_ptr())
    rows = (ctypes.c_int * 1)(n)

    def call(lib: ctypes.CDLL) -> None:
        chunk = lib.groklm_chunk(args.bits, k, k // groups)
        if lib.groklm_linear(args.bits, x.data_ptr(), args.rows, k, chunk, 1, wp, sp, groups, rows, y.data_ptr(), 1,
                             int(blocked)):  # fmt: skip
            raise SystemExit("builds.py: out of memory")

    for lib in libs:
        call(lib)
    nbytes = weight.numel() * weight.element_size() + scales.numel() * 2
    seen: list[list[tuple[float, float]]] = [[] for _ in libs]
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        for lib, out in zip(libs, seen, strict=True):
            t = time.perf_counter()
            probe.sum()
            read = time.perf_counter() - t
            t = time.perf_counter()
            call(lib)
            out.append((nbytes / (time.perf_counter() - t), probe.numel() * 8 / read))

    def spread(values: list[float]) -> dict[str, float]:
        return {
            "min": round(min(values), 3),
            "median": round(statistics.median(values), 3),
            "max": round(max(values), 3),
        }

    report = {
        "cpu": cpu(),
        "isa": args.isa,
        "weight": {
            "bits": args.bits,
            "rows": n,
            "k": k,
            "groups": groups,
            "layout": "block-major" if blocked and args.bits == 8 else "panels" if args.bits == 4 else "rows",
            "bytes": nbytes,
        },
        "threads": args.threads,
        "activation_rows": args.rows,
        "calls_each": len(seen[0]),
        "builds": {
            flags or "(source as it is)": {
                "GBps": spread([g / 1e9 for g, _ in out]),
                "plain_read_GBps": spread([r / 1e9 for _, r in out]),
                "over_plain_read": spread([g / r for g, r in out]),
            }
            for flags, out in zip(args.builds, seen, strict=True)
        },
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
