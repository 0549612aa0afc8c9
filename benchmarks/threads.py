"""Decode speed with the default thread count against every `--threads` setting, while another process
keeps one core busy, and without it, as JSON.

    .venv/bin/python benchmarks/threads.py [--presets mini bench-mid] [--runs 2]

Each figure is `groklm generate --json`'s decode tokens/s in a fresh process (the default thread count
is chosen at start-up, with the competitor already running), the median of `--runs`. The competitor
is a Python busy loop. `default_over_best` is the default's speed over the best setting's in the same
condition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import groklm
from groklm.config import get_preset

CACHE = Path(__file__).resolve().parent / ".cache"


def decode_rate(ckpt: Path, threads: int | None, tokens: int) -> tuple[float, int]:
    cmd = [sys.executable, "-m", "groklm", "generate", "--checkpoint", str(ckpt), "--prompt-ids", "422,3033,356",
           "--max-new-tokens", str(tokens), "--ignore-eos", "--json", "--quiet"]  # fmt: skip
    if threads is not None:
        cmd += ["--threads", str(threads)]
    out = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=1800).stdout)
    return out["timing"]["decode_tokens_per_s"], out["threads"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--presets", nargs="+", default=["mini", "bench-mid"])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    report: dict[str, object] = {"cpus": cpus}
    for preset in args.presets:
        ckpt = CACHE / preset
        if not (ckpt / "ckpt-0").is_dir():
            groklm.write_random_checkpoint(ckpt, get_preset(preset), seed=0, progress=False)
        tokens = 128 if preset == "mini" else 32
        for condition in ("one core busy", "quiet"):
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if condition != "quiet" else None
            try:
                rows = {}
                for setting in [None, *range(1, cpus + 1)]:
                    runs = [decode_rate(ckpt, setting, tokens) for _ in range(args.runs)]
                    rows["default" if setting is None else f"threads={setting}"] = {
                        "tok_s": round(statistics.median(r for r, _ in runs), 1),
                        "runs": [round(r, 1) for r, _ in runs],
                        "threads_used": sorted({t for _, t in runs}),
                    }
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
            best = max(v["tok_s"] for k, v in rows.items() if k != "default")
            report[f"{preset}, {condition}"] = {**rows, "default_over_best": round(rows["default"]["tok_s"] / best, 3)}
            print(json.dumps({f"{preset}, {condition}": report[f"{preset}, {condition}"]}), file=sys.stderr)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
