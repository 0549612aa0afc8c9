"""The `groklm` command: generate, init-random, info."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from groklm.config import PRESETS, GrokConfig, get_preset
from groklm.formats.common import CheckpointError, parameter_bytes
from groklm.formats.released import find_ckpt_dir, find_config, write_random_checkpoint
from groklm.generate import compile_decode, decode_one, generate_stream, stream_text
from groklm.load import load
from groklm.tokenizer import find_tokenizer

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def _config_from_args(args: argparse.Namespace) -> GrokConfig | None:
    if getattr(args, "config", None):
        return GrokConfig.from_json(args.config)
    if getattr(args, "preset", None):
        return get_preset(args.preset)
    return None


def cmd_generate(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    t0 = time.perf_counter()
    model = load(
        args.checkpoint, config, dtype=DTYPES[args.dtype], device=args.device, progress=not args.quiet, mmap=args.mmap
    )
    load_s = time.perf_counter() - t0
    sampling = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
        stop_at_eos=not args.ignore_eos,
        decode=compile_decode() if args.compile else decode_one,
    )
    t1 = time.perf_counter()
    count = 0
    if args.prompt_ids is not None:
        ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        for step in generate_stream(model, [ids], **sampling):  # type: ignore[arg-type]
            if step[0] is None:
                break
            count += 1
            print(step[0], end=" ", flush=True)
        print()
    else:
        if args.prompt is None:
            print("error: give a text prompt or --prompt-ids", file=sys.stderr)
            return 2
        tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
        ids = tokenizer.encode(args.prompt)
        print(args.prompt, end="", flush=True)
        for piece in stream_text(model, tokenizer, ids, stop=args.stop, **sampling):
            count += 1
            print(piece, end="", flush=True)
        print()
    if not args.quiet:
        dt = time.perf_counter() - t1
        print(f"[load {load_s:.1f} s, {count} pieces in {dt:.2f} s]", file=sys.stderr)
    return 0


def cmd_init_random(args: argparse.Namespace) -> int:
    config = _config_from_args(args) or get_preset("mini")
    ckpt = write_random_checkpoint(args.out, config, seed=args.seed, progress=not args.quiet)
    if args.tokenizer:
        shutil.copy(args.tokenizer, Path(args.out) / "tokenizer.model")
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"wrote {ckpt} ({size / 2**20:.1f} MiB, {len(list(ckpt.iterdir()))} files)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from groklm.formats.native import convert

    convert(args.input, args.output, args.bits, args.group_size, _config_from_args(args), progress=not args.quiet)
    src = Path(args.input)
    for tok in (src / "tokenizer.model", src.parent / "tokenizer.model"):
        if tok.is_file():
            shutil.copy(tok, Path(args.output) / "tokenizer.model")
            break
    size = sum(f.stat().st_size for f in Path(args.output).glob("*.safetensors"))
    print(f"wrote {args.output} ({size / 2**20:.1f} MiB, int{args.bits})")
    return 0


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def cmd_info(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    source = args.preset or args.config
    if config is None:
        if not args.checkpoint:
            config, source = get_preset("grok-1"), "grok-1"
        else:
            config = find_config(find_ckpt_dir(args.checkpoint)) or get_preset("grok-1")
            source = args.checkpoint
    total, active = config.param_counts()
    with torch.device("meta"):
        from groklm.model import Grok
        from groklm.quant import quantize_int8

        bf16 = parameter_bytes(Grok(config, torch.bfloat16))
        int8 = parameter_bytes(
            quantize_int8(Grok(config, torch.bfloat16), lambda name: None if name.endswith("router") else 1)
        )
    info = {
        "source": source,
        "config": config.to_dict(),
        "ffn_size": config.ffn_size,
        "parameters_total": total,
        "parameters_active_per_token": active,
        "memory_int8": _gib(int8),
        "memory_bf16": _gib(bf16),
        "license": "Apache-2.0 (Grok-1 weights and reference code, xAI)",
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"Grok config from {source}")
        for k, v in config.to_dict().items():
            print(f"  {k:28s} {v}")
        print(f"  {'ffn_size':28s} {config.ffn_size}")
        print(f"parameters: {total / 1e9:.2f} B total, {active / 1e9:.2f} B active per token")
        print(f"memory for weights: {_gib(int8)} as int8 (+bf16 embedding), {_gib(bf16)} as bf16")
        print(f"license: {info['license']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="groklm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a checkpoint, streamed to stdout")
    g.add_argument("prompt", nargs="?", help="text prompt (needs tokenizer.model)")
    g.add_argument("--checkpoint", required=True, help="directory with ckpt-0/ (or ckpt-0/ itself)")
    g.add_argument("--prompt-ids", help="comma-separated token ids instead of a text prompt")
    g.add_argument("--tokenizer", help="tokenizer.model (default: found next to the checkpoint)")
    g.add_argument("--config", help="config JSON (reference field names); default: config.json in the checkpoint")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named config instead of config.json")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus p, the reference's semantics")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past EOS, as the reference does")
    g.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    g.add_argument("--device", default="cpu")
    g.add_argument(
        "--mmap", action="store_true", help="page weights in from disk on use (groklm's layout: see quantize)"
    )
    g.add_argument(
        "--compile", action="store_true", help="torch.compile the decode step (pays off after the first ~30 s)"
    )
    g.add_argument("--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("init-random", help="write a random-weight checkpoint in the released format")
    r.add_argument("out", help="output directory (gets ckpt-0/ and config.json)")
    r.add_argument("--preset", choices=sorted(PRESETS), default="mini")
    r.add_argument("--config", help="config JSON instead of a preset")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--tokenizer", help="copy this tokenizer.model into the output directory")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=cmd_init_random)

    q = sub.add_parser("quantize", help="write a checkpoint in groklm's safetensors layout, int8 or int4")
    q.add_argument("input", help="a released-format or groklm checkpoint")
    q.add_argument("output", help="output directory")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4, help="8 keeps the released int8 weights as they are")
    q.add_argument(
        "--group-size",
        type=int,
        default=64,
        help="int4: input columns per scale (multiple of 16; 32 for the fast kernel)",
    )
    q.add_argument("--config", help="config JSON, if the input has none")
    q.add_argument("--preset", choices=sorted(PRESETS))
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("info", help="config, parameter counts, memory needed, licence")
    i.add_argument("--checkpoint", help="read config.json from this checkpoint")
    i.add_argument("--preset", choices=sorted(PRESETS))
    i.add_argument("--config")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"groklm: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
