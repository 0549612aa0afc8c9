"""Tokens/s of `groklm train` and of `groklm finetune` (its default dtype, and each dtype named) on the
same model, alternating in one run, as JSON with the CPU named.

    .venv/bin/python -m benchmarks.train [--preset tiny] [--reps 3] [--steps 6] [--dtypes bf16]

The model is the README's: a preset (`tiny` by default) trained from scratch on the Python standard
library's docstrings with a tokenizer trained on them, as `scripts/demo.sh` does. Its first training
run writes the checkpoint every fine-tuning run starts from (LoRA on the attention, `finetune`'s own
defaults otherwise). Every run is a fresh `groklm` process with the same batch, window length and
threads; a run's figure is the median of its steps' tokens/s, its first step left out (warm-up). Each
round runs `train`, then `finetune` with its default dtype, then with each of --dtypes, so a change
in the machine's speed (it is shared) falls on all of them; `finetune_default_over_train` is the
ratio within each round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from benchmarks import cpu

CACHE = Path(__file__).resolve().parent / ".cache" / "train"


def step_rate(out: Path) -> float:
    """Median tokens/s of a run's steps (from its log.jsonl), its first step left out."""
    steps = [json.loads(line)["tokens_per_s"] for line in (out / "log.jsonl").read_text().splitlines()]
    return statistics.median(steps[1:] if len(steps) > 1 else steps)


def groklm(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "groklm", *args, "--quiet"], check=True, stdout=subprocess.DEVNULL)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--reps", type=int, default=3, help="rounds of train, finetune, finetune --dtype ...")
    parser.add_argument("--steps", type=int, default=6, help="steps a run (the first is not counted)")
    parser.add_argument("--batch", type=int, default=16, help="windows a step, in both")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens a window, in both")
    parser.add_argument("--vocab", type=int, default=2048, help="pieces of the tokenizer trained on the data")
    parser.add_argument(
        "--dtypes", default="bf16", help="finetune dtypes to measure besides its default, comma-separated"
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="compute threads of every run")
    args = parser.parse_args()

    CACHE.mkdir(parents=True, exist_ok=True)
    text = CACHE / "docs.txt"
    if not text.is_file():
        from groklm.train.data import write_docstrings

        write_docstrings(text)
    ft_text = CACHE / "docs-head.txt"  # finetune tokenizes its whole file up front: enough for the runs
    ft_text.write_text(text.read_text()[: 40 * args.batch * args.seq_len * (args.steps + 2)])
    shape = ["--batch", str(args.batch), "--seq-len", str(args.seq_len), "--steps", str(args.steps),
             "--threads", str(args.threads), "--warmup", "1", "--save-every", str(args.steps)]  # fmt: skip
    base = CACHE / f"{args.preset}-base"
    if not (base / "model" / "tokenizer.model").is_file():
        shutil.rmtree(base, ignore_errors=True)
        groklm("train", "--preset", args.preset, "--data", str(text), "--train-tokenizer", str(args.vocab),
               "--out", str(base), "--max-tokens", "400000", *shape)  # fmt: skip
    model = base / "model"

    dtypes = [d for d in args.dtypes.split(",") if d]
    rates: dict[str, list[float]] = {"train": [], "finetune_default": [], **{f"finetune_{d}": [] for d in dtypes}}
    for _ in range(args.reps):
        for name in rates:
            out = CACHE / name
            shutil.rmtree(out, ignore_errors=True)
            if name == "train":
                groklm("train", "--config", str(model / "config.json"), "--data", str(text), "--tokenizer",
                       str(model / "tokenizer.model"), "--out", str(out), "--max-tokens", "400000", *shape)  # fmt: skip
            else:
                dtype = [] if name == "finetune_default" else ["--dtype", name.removeprefix("finetune_")]
                groklm("finetune", "--checkpoint", str(model), "--data", str(ft_text), "--out", str(out), *dtype,
                       *shape)  # fmt: skip
            rates[name].append(step_rate(out))
    ratios = [f / t for f, t in zip(rates["finetune_default"], rates["train"], strict=True)]
    report = {
        "cpu": cpu(),
        "preset": args.preset,
        "tokens_a_step": args.batch * args.seq_len,
        "threads": args.threads,
        "tokens_per_s": {name: spread(r) for name, r in rates.items()},
        "finetune_default_over_train": spread(ratios),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
