"""The `groklm` command: each command turns its parsed options (`cli_options.py`) into one call of a typed,
keyword-only function that checks its arguments and does the work (`run.generate`, `serve.serve`,
`checkpoints.*`, `analyze.routing.main`, `train.finetune.main`, `train.pretrain.main`, `sizing.plan_layouts`),
and prints what it returns. A `UsageError` is a bad command line (exit 2), any other error of ours exit 1."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from groklm.cli_options import build_parser, from_args
from groklm.runtime import UsageError, interpret_triton_without_gpu

__all__ = ["COMMANDS", "UsageError", "build_parser", "main"]


def _config_arg(args: argparse.Namespace) -> Any:
    """The config --config or --preset names (None: neither was given)."""
    from groklm.config import GrokConfig, get_preset

    if getattr(args, "config", None):
        return GrokConfig.from_json(args.config)
    if getattr(args, "preset", None):
        return get_preset(args.preset)
    return None


def _options(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    return {name: getattr(args, name) for name in names}


def cmd_generate(args: argparse.Namespace) -> int:
    from groklm.run import generate

    return generate(
        **_options(args, "checkpoint", "prompt", "prompt_file", "prompt_ids", "tokenizer", "max_new_tokens",
                   "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_p", "logit_bias", "stop", "ignore_eos", "no_echo", "dtype", "device",
                   "threads", "bits", "mmap", "compile", "tp", "ep", "adapter", "quiet"),
        config=_config_arg(args), as_json=args.json,
    )  # fmt: skip


def cmd_serve(args: argparse.Namespace) -> int:
    from groklm.serve import serve

    return serve(
        **_options(args, "checkpoint", "host", "port", "max_batch", "max_waiting", "prefill_chunk", "max_model_len",
                   "served_model_name", "api_key", "chat_template", "tokenizer", "body_timeout", "shutdown_timeout",
                   "dtype", "device", "threads", "bits", "mmap", "compile", "tp", "ep", "adapter", "lora_modules",
                   "quiet"),
        config=_config_arg(args),
    )  # fmt: skip


def cmd_init_random(args: argparse.Namespace) -> int:
    from groklm.checkpoints import init_random

    ckpt = init_random(out=args.out, config=_config_arg(args), seed=args.seed, tokenizer=args.tokenizer,
                       force=args.force, progress=not args.quiet)  # fmt: skip
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"wrote {ckpt} ({size / 2**20:.1f} MiB, {len(list(ckpt.iterdir()))} files)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from groklm.checkpoints import quantize

    out = quantize(**_options(args, "checkpoint", "out", "bits", "group_size", "force"), config=_config_arg(args),
                   progress=not args.quiet)  # fmt: skip
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, int{args.bits})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from groklm.checkpoints import convert

    out = convert(**_options(args, "checkpoint", "out", "to", "type", "embedding_type", "bits", "group_size",
                           "force"),
                  config=_config_arg(args), progress=not args.quiet)  # fmt: skip
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.to}{' ' + args.type if args.type else ''})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from groklm.checkpoints import verify, write_manifest

    if args.write_manifest:
        n = write_manifest(checkpoint=args.checkpoint, out=args.write_manifest, progress=not args.quiet)
        print(f"wrote {args.write_manifest} ({n} files)")
        return 0
    report = verify(checkpoint=args.checkpoint, config=_config_arg(args), sha256=args.sha256, progress=not args.quiet)
    if args.json:
        print(json.dumps({"checkpoint": str(report.root), "format": report.format, "files": report.files,
                          "bytes": report.bytes, "ok": report.ok,
                          "problems": [p.to_dict() for p in report.problems]}, indent=1))  # fmt: skip
    else:
        for problem in report.problems:
            print(problem)
        checked = "sha256 and structure" if args.sha256 else "structure"
        summary = "ok" if report.ok else f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}"
        print(
            f"{summary}: {report.root} ({report.format}, {report.files} files, {_bytes(report.bytes)}; {checked} checked)"
        )
    return 0 if report.ok else 1


def _bytes(n: float) -> str:
    """A size in the largest binary unit it fills (a mini model's weights are KiB or MiB, not 0.00 GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} bytes"


def _count(n: int) -> str:
    """A count in billions, millions or thousands as it fills them; exact below a thousand."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(n)


def cmd_info(args: argparse.Namespace) -> int:
    from groklm.checkpoints import info as describe

    source = (f"preset {args.preset}" if args.preset else args.config) if args.preset or args.config else None
    info = describe(checkpoint=args.checkpoint, config=_config_arg(args), source=source)
    for key in ("memory_int8", "memory_int4", "memory_bf16"):
        info[key] = _bytes(info[key])
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"Grok config from {info['source']}")
    for k, v in info["config"].items():
        print(f"  {k:28s} {v}")
    print(f"  {'ffn_size':28s} {info['ffn_size']}")
    total, active = info["parameters_total"], info["parameters_active_per_token"]
    print(f"parameters: {_count(total)} total, {_count(active)} active per token")
    print(f"memory for weights: {info['memory_int8']} as int8, {info['memory_int4']} as int4 (+bf16 embedding), "
          f"{info['memory_bf16']} as bf16")  # fmt: skip
    print(f"license: {info['license']}")
    return 0


def cmd_analyze_routing(args: argparse.Namespace) -> int:
    from groklm.analyze.routing import main as route

    route(**_options(args, "checkpoint", "out", "prompt_file", "prompt", "prompt_ids", "max_tokens", "window",
                     "map_tokens", "tokenizer", "dtype", "device", "threads", "bits", "quiet"),
          config=_config_arg(args))  # fmt: skip
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from groklm.runtime import torch_dtype
    from groklm.train.finetune import FinetuneConfig, main
    from groklm.train.lora import LoraConfig

    cfg = FinetuneConfig(args.checkpoint, args.data, args.out, LoraConfig(**from_args(args, LoraConfig)),
                         bits=args.bits, dtype=torch_dtype(args.dtype), tokenizer=args.tokenizer,
                         config=_config_arg(args), progress=not args.quiet, **from_args(args, FinetuneConfig))  # fmt: skip
    summary = main(cfg, threads=args.threads)
    print(json.dumps(summary) if args.json else
          f"adapter in {summary['out']}: loss {_loss_change(summary, 3)}"
          + (f", evaluation {summary['eval_loss']:.3f}" if summary["eval_loss"] is not None else "")
          + f"; {summary['tokens_per_s']:.0f} tokens/s; plot: {summary['out']}/loss.png")  # fmt: skip
    return 0


def _loss_change(summary: dict[str, Any], digits: int) -> str:
    """How the loss moved, over windows that do not overlap (`loss_ends`); a one-step run has one loss."""
    w, first, last = summary["loss_window"], summary["first_loss"], summary["last_loss"]
    if summary["steps"] < 2:
        return f"{last:.{digits}f} (one step)"
    steps = f"{w} steps" if w > 1 else "step"
    return f"{first:.{digits}f} (first {steps}) -> {last:.{digits}f} (last {steps})"


def cmd_merge(args: argparse.Namespace) -> int:
    from groklm.train.lora import merge_checkpoint

    merge_checkpoint(**_options(args, "checkpoint", "adapter", "out", "force"), config=_config_arg(args),
                     progress=not args.quiet)  # fmt: skip
    if not args.quiet:
        print(f"wrote {args.out}: {args.checkpoint} with {args.adapter} merged, weights quantized as the base's")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from groklm.runtime import torch_dtype
    from groklm.train.pretrain import TrainConfig, main

    config = _config_arg(args)
    if config is None:
        raise UsageError("give the model to train: --preset NAME or --config FILE")
    dtype = None if args.dtype is None else torch_dtype(args.dtype)
    cfg = TrainConfig(config, args.data, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
                      dtype=dtype, device=args.device, progress=not args.quiet, **from_args(args, TrainConfig))  # fmt: skip
    summary = main(cfg, threads=args.threads)
    if summary is not None:
        print(json.dumps(summary) if args.json else
              f"trained {summary['parameters'] / 1e6:.1f} M parameters for {summary['steps']} steps in "
              f"{summary['seconds']:.0f} s: loss {_loss_change(summary, 2)} "
              f"(the data's unigram entropy: {summary['unigram_entropy']:.2f}); "
              f"model in {summary['model']}, plot {summary['out']}/loss.png")  # fmt: skip
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from groklm import sizing
    from groklm.config import get_preset
    from groklm.load import checkpoint_config

    if args.checkpoint:
        config, source = checkpoint_config(args.checkpoint, _config_arg(args))
    else:
        config = _config_arg(args) or get_preset("grok-1")
        source = f"preset {args.preset or 'grok-1'}" if not args.config else args.config
    p = sizing.plan_layouts(
        config, **_options(args, "gpus", "nodes", "gpu", "gpu_memory", "memory_bandwidth", "interconnect",
                           "link_bandwidth", "inter_node_bandwidth", "bits", "context", "batch", "reserve",
                           "efficiency", "all"),
    )  # fmt: skip
    hw, g = p.hardware, 2**30
    if args.json:
        print(json.dumps({"model": source, "gpus": args.gpus, "nodes": args.nodes, "hardware": vars(hw),
                          "context": args.context, "batch": args.batch, "reserve_bytes": p.reserve,
                          "efficiency": args.efficiency, "layouts": [sizing.as_dict(x) for x in p.layouts],
                          "refused": p.refused}, indent=1))  # fmt: skip
        return 0
    print(f"{config.family} ({source}) on {args.gpus} x {args.gpu} ({hw.memory / 1e9:.0f} GB, "
          f"{hw.bandwidth / 1e12:.2f} TB/s) over {args.nodes} machine{'s' if args.nodes > 1 else ''}; "
          f"KV cache for {args.batch} x {args.context} tokens; {p.reserve / g:.1f} GiB reserved a GPU")  # fmt: skip
    print(f"{'tp':>3} {'ep':>3} {'bits':>4}  {'weights':>8} {'KV':>7} {'total':>8}  {'fits':>4}  "
          f"{'read/step':>9} {'t_mem':>7} {'t_comm':>7}  {'tok/s':>7} {'tok/s@1':>7}")  # fmt: skip
    for x in p.layouts:
        print(f"{x.tp:>3} {x.ep:>3} {x.bits:>4}  {x.weight_bytes / g:>7.1f}G {x.kv_bytes / g:>6.1f}G "
              f"{x.total_bytes / g:>7.1f}G  {'yes' if x.fits else 'no':>4}  {x.read_bytes_per_step / g:>8.2f}G "
              f"{x.t_mem_ms:>5.2f}ms {x.t_comm_ms:>5.2f}ms  {x.tokens_per_s:>7.1f} {x.tokens_per_s_batch1:>7.1f}")  # fmt: skip
    if not p.layouts:
        print("no layout fits: try --bits 4, more GPUs, a shorter --context or a smaller --batch (--all shows them)")
    for line in p.refused:
        print(f"  not possible: {line}")
    print("(a model, not a measurement: see `groklm.sizing` and the README for the formula)")
    return 0


def _check_named_files(args: argparse.Namespace) -> None:
    """A file an option names that is not there is a bad command line (exit 2); a bad file is not (exit 1)."""
    for dest in ("config", "tokenizer", "chat_template", "sha256", "data", "adapter"):
        value = getattr(args, dest, None)
        kind = "directory" if dest == "adapter" else "file"
        for path in value if isinstance(value, list) else [value]:  # train --data: files or directories
            if path is None or (Path(path).exists() and isinstance(value, list)):
                continue
            if not Path(path).exists():
                raise UsageError(f"--{dest.replace('_', '-')} {path}: no such {kind}")
            if Path(path).is_dir() != (kind == "directory"):
                raise UsageError(f"--{dest.replace('_', '-')} {path}: not a {kind}")


COMMANDS = {"generate": cmd_generate, "serve": cmd_serve, "init-random": cmd_init_random, "quantize": cmd_quantize,
            "convert": cmd_convert, "verify": cmd_verify, "info": cmd_info, "analyze": cmd_analyze_routing,
            "finetune": cmd_finetune, "merge": cmd_merge, "train": cmd_train, "plan": cmd_plan}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from groklm.files import CheckpointError

    prog = " ".join(filter(None, ("groklm", args.command, getattr(args, "what", None))))
    interpret_triton_without_gpu()
    try:
        _check_named_files(args)
        return int(COMMANDS[args.command](args))
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError, MemoryError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ngroklm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `groklm generate ... | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
