"""groklm: run xAI's Grok models from their released checkpoints (`groklm COMMAND --help` for each
command). Every argument and the checkpoint's config are checked before any weights are read."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from groklm.cli_options import build_parser


class UsageError(ValueError):
    """A bad command line: reported as `groklm: error: ...`, exit status 2."""


def _torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def _config_arg(args: argparse.Namespace) -> Any:
    from groklm.config import GrokConfig, get_preset

    if getattr(args, "config", None):
        return GrokConfig.from_json(args.config)
    if getattr(args, "preset", None):
        return get_preset(args.preset)
    return None


class Ranks:
    """This process's place under torchrun (one process: rank 0 of 1)."""

    def __init__(self, tp: int = 1, ep: int = 1, rank: int = 0, device: str = "cpu") -> None:
        self.tp, self.ep, self.rank, self.device = tp, ep, rank, device

    @property
    def parallel(self) -> bool:
        return self.tp * self.ep > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if not self.parallel:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        import torch.distributed as dist

        if self.parallel and dist.is_initialized():
            dist.destroy_process_group()


def _start_ranks(args: argparse.Namespace) -> Ranks:
    """Check --tp/--ep against torchrun's environment and join the process group (cheap: no weights)."""
    tp, ep = args.tp, args.ep
    if tp * ep == 1:
        return Ranks()
    world = os.environ.get("WORLD_SIZE")
    if "RANK" not in os.environ or world is None:
        raise UsageError(
            f"--tp {tp} --ep {ep} runs as {tp * ep} processes: start it with "
            f"`torchrun --nproc-per-node {tp * ep} -m groklm ...` (no torchrun environment found)"
        )
    if int(world) != tp * ep:
        raise UsageError(f"--tp {tp} x --ep {ep} = {tp * ep} ranks, but torchrun started {world} (--nproc-per-node)")
    device = args.device
    if device == "cuda":  # one GPU a rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    from groklm import parallel

    rank = parallel.init(device, timeout_s=None if args.command != "serve" else 24 * 3600.0)
    return Ranks(tp, ep, rank, device)


def _check_adapter(args: argparse.Namespace, parallel: bool, config: Any) -> None:
    if not args.adapter:
        return
    if parallel:
        raise UsageError("--adapter runs in one process: merge it first (`groklm merge`), then split the result")
    from groklm.files import CheckpointError
    from groklm.train.lora import check_adapter

    try:
        check_adapter(args.adapter, config)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UsageError(f"--adapter {e}") from None


def _tokenizer_fits(tokenizer: Any, config: Any, command: str) -> None:
    """Refuse a tokenizer larger than the model's vocabulary; warn of one far smaller (see `check_vocabulary`)."""
    from groklm.tokenizer import check_vocabulary

    if tokenizer is not None and (warning := check_vocabulary(tokenizer, config.vocab_size)):
        print(f"groklm {command}: warning: {warning}", file=sys.stderr)


def _check_plan(config: Any, tp: int, ep: int) -> None:
    from groklm import parallel

    try:
        parallel.plan(config, tp, ep)
    except parallel.ParallelError as e:
        raise UsageError(str(e).replace("tp=", "--tp ").replace("ep=", "--ep ")) from None


def _check_device(name: str) -> None:
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available to this torch (a CPU build?)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise UsageError(f"--device {name}: groklm runs on cpu or cuda")


def _set_threads(requested: int | None) -> int:
    import torch

    from groklm import kernels

    # Under torchrun the ranks on one machine share its cores.
    threads = requested or max(1, kernels.choose_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def _read_prompt(args: argparse.Namespace) -> str | None:
    given = [name for name, v in (("PROMPT", args.prompt), ("--prompt-file", args.prompt_file),
                                  ("--prompt-ids", args.prompt_ids)) if v is not None]  # fmt: skip
    if len(given) != 1:
        raise UsageError(
            "give one prompt: a text PROMPT, --prompt-file FILE (- for stdin) or --prompt-ids"
            + (f" (got {' and '.join(given)})" if given else "")
        )
    return _read_prompt_file(args.prompt_file) if args.prompt_file is not None else args.prompt


def _read_prompt_file(path: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return raw.decode("utf-8")
    except OSError as e:
        raise UsageError(f"--prompt-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {path}: not UTF-8 text") from None


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--prompt-ids {text[:60]!r}: not a comma-separated list of integers") from None
    if not ids:
        raise UsageError("--prompt-ids: no token ids given")
    return ids


def cmd_generate(args: argparse.Namespace) -> int:
    # Everything that can be wrong with the request is found before the weights are read.
    from groklm.load import checkpoint_config

    _check_device(args.device)
    _check_plan(checkpoint_config(args.checkpoint, _config_arg(args))[0], args.tp, args.ep)
    ranks = _start_ranks(args)
    try:
        return _generate(args, ranks)
    finally:
        ranks.close()


def decode_timing(at: list[float], total_s: float, compiled: bool) -> tuple[float | None, float | None]:
    """(decode tokens/s, compile seconds or None) from the times `at` each new token came (from the start
    of generation) and the total. The rate counts the tokens after the first (the prefill's); compiled,
    after the second: the first decode step is the one that compiles (tens of seconds), reported apart."""
    compile_s = at[1] - at[0] if compiled and len(at) > 1 else None
    skip = 1 if compile_s is None else 2
    if len(at) <= skip or total_s <= at[skip - 1]:
        return None, compile_s
    return (len(at) - skip) / (total_s - at[skip - 1]), compile_s


def _processors(args: argparse.Namespace) -> dict[str, Any]:
    """generate's penalties, --min-p and --logit-bias, checked (ValueError naming the option)."""
    from groklm.sampling import Penalties, check_penalties, parse_logit_bias

    bias = parse_logit_bias(args.logit_bias)
    p = Penalties(args.presence_penalty, args.frequency_penalty, args.repetition_penalty, bias)
    check_penalties(p, args.min_p, 1 << 62)  # the vocabulary is checked once the config is read
    return {"presence_penalty": p.presence_penalty, "frequency_penalty": p.frequency_penalty,
            "repetition_penalty": p.repetition_penalty, "min_p": args.min_p, "logit_bias": list(bias)}  # fmt: skip


def _generate(args: argparse.Namespace, ranks: Ranks) -> int:
    from groklm.generate import check_sampling, decoder, generate_stream
    from groklm.load import checkpoint_config, detect_format, load
    from groklm.tokenizer import TextStream, find_tokenizer

    stdin = args.prompt_file == "-"
    text = ranks.share(_read_prompt(args) if ranks.leader or not stdin else None)  # (stdin is rank 0's)
    try:
        check_sampling(args.temperature, args.top_p, args.top_k, args.seed, args.max_new_tokens)
        processors = _processors(args)
    except ValueError as e:
        raise UsageError(f"--{str(e).replace('_', '-')}") from None
    if any(s == "" for s in args.stop):
        raise UsageError("--stop: a stop string must not be empty")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, not {args.threads}")
    config, _ = checkpoint_config(args.checkpoint, _config_arg(args))
    if ranks.leader:
        _license_notice(config)
    if args.mmap and ranks.parallel:
        raise UsageError("--mmap is for one process (each rank of --tp/--ep reads its own share into memory)")
    _check_adapter(args, ranks.parallel, config)
    if args.mmap and detect_format(args.checkpoint) != "native":
        raise UsageError("--mmap needs groklm's own layout (the released files store [in, out]): write it once "
                         "with `groklm quantize --bits 8 --checkpoint IN --out OUT`")  # fmt: skip
    if args.bits and detect_format(args.checkpoint) not in ("hf", "gguf", "grok2"):
        raise UsageError("--bits is for Grok-2, Hugging Face and GGUF checkpoints (write int4 with `groklm quantize`)")
    tokenizer = None
    if text is not None or args.stop:
        try:
            tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
        except FileNotFoundError as e:
            need = "--stop" if text is None else "a text prompt"
            raise UsageError(f"{e} (--tokenizer PATH); {need} needs it") from None
    else:  # --prompt-ids: decode the output where a tokenizer is at hand
        try:
            tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
        except FileNotFoundError:
            if args.tokenizer:
                raise
    _tokenizer_fits(tokenizer, config, "generate")
    ids = tokenizer.encode(text) if text is not None else _parse_ids(args.prompt_ids)  # type: ignore[union-attr]
    if not ids:
        raise UsageError("the prompt is empty: it encodes to no tokens")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        what = "--prompt-ids: token ids" if text is None else f"the tokenizer {tokenizer.path} gave token ids"  # type: ignore[union-attr]
        raise UsageError(f"{what} {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    bad = [t for t, _ in processors["logit_bias"] if not 0 <= t < config.vocab_size]
    if bad:
        raise UsageError(f"--logit-bias: token ids {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    processors["logit_bias"] = {str(t): b for t, b in processors["logit_bias"]}
    if len(ids) + args.max_new_tokens > config.sequence_len:
        raise UsageError(
            f"the prompt ({len(ids)} tokens) + --max-new-tokens {args.max_new_tokens} exceed the context of "
            f"{config.sequence_len} tokens"
        )
    threads = _set_threads(args.threads)
    seed = args.seed
    if ranks.parallel and seed is None and args.temperature > 0:  # every rank must draw the same tokens
        import random

        seed = ranks.share(random.getrandbits(63))

    t0 = time.perf_counter()
    model = load(args.checkpoint, config, dtype=_torch_dtype(args.dtype), device=ranks.device if ranks.parallel
                 else args.device, progress=not args.quiet and ranks.leader, mmap=args.mmap, bits=args.bits,
                 tp=ranks.tp, ep=ranks.ep)  # fmt: skip
    if args.adapter:
        from groklm.train.lora import load_adapter

        load_adapter(model, args.adapter)
    load_s = time.perf_counter() - t0
    if args.compile and not args.quiet:
        print("groklm: compiling the decode step (the first token waits tens of seconds)", file=sys.stderr)
    stream = TextStream(tokenizer, ids, args.stop) if tokenizer is not None else None
    show = not args.json and ranks.leader
    if show and not args.no_echo:
        print(text if text is not None else (tokenizer.decode(ids) if tokenizer else " ".join(map(str, ids))),
              end="" if tokenizer else " ", flush=True)  # fmt: skip
    new: list[int] = []
    pieces: list[str] = []

    def should_stop(_row: int, produced: list[int]) -> bool:
        if stream is None:
            return False
        pieces.append(stream.add(produced[-1]))
        return stream.stopped

    steps = generate_stream(
        model, [ids], max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, seed=seed, stop_at_eos=not args.ignore_eos, should_stop=should_stop,
        decode=decoder(args.compile, model.device), **processors,
    )  # fmt: skip
    t1 = time.perf_counter()
    at: list[float] = []  # seconds from t1 to each new token
    for step in steps:
        if step[0] is None:
            break
        at.append(time.perf_counter() - t1)
        new.append(step[0])
        if show:
            piece = pieces.pop() if pieces else ""
            print(piece if stream else step[0], end="" if stream else " ", flush=True)
    tail = stream.finish() if stream else ""
    total_s = time.perf_counter() - t1
    if show:
        print(tail)
    stopped = (stream is not None and stream.stopped) or (new and new[-1] == config.eos_token and not args.ignore_eos)
    finish = "stop" if stopped else "length"
    first_s = at[0] if at else None
    rate, compile_s = decode_timing(at, total_s, args.compile)
    if not ranks.leader:
        return 0
    if args.json:
        result = {
            "prompt": text,
            "prompt_ids": ids,
            "text": stream.text if stream else None,
            "token_ids": new,
            "finish_reason": finish,
            "usage": {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)},
            "timing": {"load_s": round(load_s, 3), "first_token_s": round(first_s or 0.0, 3),
                       "total_s": round(total_s, 3), "decode_tokens_per_s": rate and round(rate, 2),
                       **({"compile_s": round(compile_s, 3)} if compile_s is not None else {})},
            "threads": threads,
            **({"tp": ranks.tp, "ep": ranks.ep} if ranks.parallel else {}),
        }  # fmt: skip
        print(json.dumps(result, ensure_ascii=False))
    elif not args.quiet:
        after = "the first" if compile_s is None else f"the second (the compile took {compile_s:.1f} s)"
        speed = f", {rate:.1f} tok/s after {after}" if rate else ""
        print(
            f"[load {load_s:.1f} s · prompt {len(ids)} tokens, first token after {first_s or 0:.2f} s · "
            f"{len(new)} tokens in {total_s:.2f} s{speed} · {finish} · {threads} threads"
            + (f" · tp {ranks.tp} x ep {ranks.ep}]" if ranks.parallel else "]"),
            file=sys.stderr,
        )
    return 0


def cmd_init_random(args: argparse.Namespace) -> int:
    from groklm.config import get_preset
    from groklm.formats.released import write_random_checkpoint

    config = _config_arg(args) or get_preset("mini")
    ckpt = write_random_checkpoint(args.out, config, seed=args.seed, progress=not args.quiet, force=args.force)
    if args.tokenizer:
        shutil.copy(args.tokenizer, Path(args.out) / "tokenizer.model")
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    print(f"wrote {ckpt} ({size / 2**20:.1f} MiB, {len(list(ckpt.iterdir()))} files)")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from groklm.formats.native import convert

    if args.bits == 8 and args.group_size != 64:
        raise UsageError("--group-size is for --bits 4 (int8 keeps the released scale groups)")
    convert(args.checkpoint, args.out, args.bits, args.group_size, _config_arg(args), progress=not args.quiet,
            force=args.force)  # fmt: skip
    _copy_tokenizer(Path(args.checkpoint), Path(args.out))
    size = sum(f.stat().st_size for f in Path(args.out).glob("*.safetensors"))
    print(f"wrote {args.out} ({size / 2**20:.1f} MiB, int{args.bits})")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from groklm.formats.convert import convert

    if args.to != "native" and (args.bits != 8 or args.group_size != 64):
        raise UsageError("--bits and --group-size are for --to native (hf and gguf take --type)")
    if args.to == "native" and args.type:
        raise UsageError("--type is for --to hf or gguf (native takes --bits)")
    if args.type:
        from groklm.formats.gguf import TYPES

        types = {"hf": ("bf16", "f32"), "gguf": TYPES}[args.to]
        if args.type not in types:
            raise UsageError(f"--type for --to {args.to} must be one of {', '.join(types)}, not {args.type!r}")
    out = convert(args.checkpoint, args.out, args.to, args.type, args.bits, args.group_size, _config_arg(args),
                  progress=not args.quiet, force=args.force)  # fmt: skip
    size = sum(f.stat().st_size for f in ([out] if out.is_file() else out.rglob("*")) if f.is_file())
    print(f"wrote {out} ({size / 2**20:.1f} MiB, {args.to}{' ' + args.type if args.type else ''})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from groklm.formats.verify import verify, write_manifest

    if args.write_manifest:
        n = write_manifest(Path(args.checkpoint), Path(args.write_manifest), progress=not args.quiet)
        print(f"wrote {args.write_manifest} ({n} files)")
        return 0
    manifest = Path(args.sha256) if args.sha256 else None
    report = verify(args.checkpoint, _config_arg(args), manifest, progress=not args.quiet)
    if args.json:
        print(json.dumps({"checkpoint": str(report.root), "format": report.format, "files": report.files,
                          "bytes": report.bytes, "ok": report.ok,
                          "problems": [p.to_dict() for p in report.problems]}, indent=1))  # fmt: skip
    else:
        for problem in report.problems:
            print(problem)
        checked = "sha256 and structure" if manifest else "structure"
        summary = "ok" if report.ok else f"{len(report.problems)} problem{'s' * (len(report.problems) != 1)}"
        print(
            f"{summary}: {report.root} ({report.format}, {report.files} files, {_bytes(report.bytes)}; {checked} checked)"
        )
    return 0 if report.ok else 1


def _license(config: Any) -> str:
    if config.family == "grok-2":
        from groklm.formats.grok2 import LICENSE

        return LICENSE
    return "Apache-2.0 (Grok-1 weights and reference code, xAI)"


def _license_notice(config: Any) -> None:
    """The one-line notice `generate` and `serve` print when they load Grok-2."""
    if config.family == "grok-2":
        print(f"groklm: licence: {_license(config)}", file=sys.stderr)


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
    import torch

    from groklm.config import get_preset
    from groklm.files import parameter_bytes
    from groklm.load import checkpoint_config
    from groklm.model import Grok
    from groklm.quant import quantize_int4, quantize_int8, released_groups

    if args.checkpoint:
        config, source = checkpoint_config(args.checkpoint, _config_arg(args))
    elif args.preset or args.config:
        config, source = _config_arg(args), f"preset {args.preset}" if args.preset else args.config
    else:
        config, source = get_preset("grok-1"), "preset grok-1"
    total, active = config.param_counts()
    with torch.device("meta"):
        bf16 = parameter_bytes(Grok(config, torch.bfloat16))
        int8 = parameter_bytes(quantize_int8(Grok(config, torch.bfloat16), released_groups))
        int4 = parameter_bytes(quantize_int4(Grok(config, torch.bfloat16), 64))
    info = {
        "source": source,
        "model": config.family,
        "config": config.to_dict(),
        "ffn_size": config.ffn_size,
        "parameters_total": total,
        "parameters_active_per_token": active,
        "memory_int8": _bytes(int8),
        "memory_int4": _bytes(int4),
        "memory_bf16": _bytes(bf16),
        "license": _license(config),
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"Grok config from {source}")
        for k, v in config.to_dict().items():
            print(f"  {k:28s} {v}")
        print(f"  {'ffn_size':28s} {config.ffn_size}")
        print(f"parameters: {_count(total)} total, {_count(active)} active per token")
        print(
            f"memory for weights: {_bytes(int8)} as int8, {_bytes(int4)} as int4 (+bf16 embedding), {_bytes(bf16)} as bf16"
        )
        print(f"license: {info['license']}")
    return 0


def cmd_analyze_routing(args: argparse.Namespace) -> int:
    from groklm.analyze.routing import analyze, summarize, write_report
    from groklm.load import checkpoint_config, detect_format, load
    from groklm.tokenizer import find_tokenizer

    given = [n for n, v in (("--prompt-file", args.prompt_file), ("--prompt", args.prompt),
                            ("--prompt-ids", args.prompt_ids)) if v]  # fmt: skip
    if len(given) != 1:
        raise UsageError("give one input: --prompt-file FILE (- for stdin), --prompt TEXT or --prompt-ids"
                         + (f" (got {' and '.join(given)})" if given else ""))  # fmt: skip
    for name in ("max_tokens", "window", "map_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    _check_device(args.device)
    config, _ = checkpoint_config(args.checkpoint, _config_arg(args))
    if args.bits and detect_format(args.checkpoint) not in ("hf", "gguf", "grok2"):
        raise UsageError("--bits is for Grok-2, Hugging Face and GGUF checkpoints")
    tokenizer = None
    if args.prompt_ids:
        ids = _parse_ids(args.prompt_ids)
    else:
        try:
            tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
        except FileNotFoundError as e:
            raise UsageError(f"{e} (--tokenizer PATH); a text input needs it") from None
        _tokenizer_fits(tokenizer, config, "analyze")
        ids = tokenizer.encode(_read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt)
    ids = ids[: args.max_tokens]
    if not ids:
        raise UsageError("the input encodes to no tokens")
    bad = [t for t in ids if not 0 <= t < config.vocab_size]
    if bad:
        raise UsageError(f"token ids {bad[:5]} are outside the vocabulary (0..{config.vocab_size - 1})")
    _set_threads(args.threads)
    t0 = time.perf_counter()
    model = load(args.checkpoint, config, dtype=_torch_dtype(args.dtype), device=args.device,
                 progress=not args.quiet, bits=args.bits)  # fmt: skip
    t1 = time.perf_counter()
    experts, _gates, probs = analyze(model, ids, args.window)
    labels = [tokenizer.decode([t]) for t in ids[: args.map_tokens]] if tokenizer else None
    stats = summarize(experts, probs, ids, labels, args.map_tokens)
    report = write_report(stats, args.out, f"Routing of {Path(args.checkpoint).name}: {len(ids)} tokens")
    if not args.quiet:
        print(f"routed {len(ids)} tokens in {time.perf_counter() - t1:.1f} s (load {t1 - t0:.1f} s); wrote {report} "
              f"and routing.json, load.png, coselection.png, consistency.png, route_map.png beside it")  # fmt: skip
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    import torch

    from groklm.load import checkpoint_config, detect_format
    from groklm.train.finetune import FinetuneConfig, finetune
    from groklm.train.lora import LoraConfig

    if args.bits and detect_format(args.checkpoint) not in ("hf", "gguf", "grok2"):
        raise UsageError("--bits is for Grok-2, Hugging Face and GGUF checkpoints (the released one is int8 already)")
    config, _ = checkpoint_config(args.checkpoint, _config_arg(args))
    _license_notice(config)
    try:
        cfg = FinetuneConfig(
            args.checkpoint, args.data, args.out, LoraConfig(args.rank, args.alpha, args.dropout, args.targets),
            steps=args.steps, batch=args.batch, seq_len=args.seq_len, lr=args.lr, warmup=args.warmup,
            eval_fraction=args.eval_fraction, eval_every=args.eval_every, save_every=args.save_every, seed=args.seed,
            resume=args.resume, stop_after=args.stop_after, bits=args.bits, dtype=_torch_dtype(args.dtype), grad_checkpoint=args.checkpointing,
            tokenizer=args.tokenizer, config=config, progress=not args.quiet,
        ).check()  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    _set_threads(args.threads)
    torch.manual_seed(args.seed)
    summary = finetune(cfg)
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
    import torch

    from groklm.files import output_dir
    from groklm.formats.native import save_native
    from groklm.load import checkpoint_config, load
    from groklm.train.lora import check_adapter, load_adapter, merge

    config, _ = checkpoint_config(args.checkpoint, _config_arg(args))
    check_adapter(args.adapter, config)  # checked against the base's config before the base is read
    with output_dir(args.out, args.force) as tmp:
        model = load(args.checkpoint, config, dtype=torch.bfloat16, progress=not args.quiet)
        merge(load_adapter(model, args.adapter))
        save_native(model, tmp, progress=not args.quiet)
    _copy_tokenizer(Path(args.checkpoint), Path(args.out))
    if not args.quiet:
        print(f"wrote {args.out}: {args.checkpoint} with {args.adapter} merged, weights quantized as the base's")
    return 0


def _copy_tokenizer(src: Path, out: Path) -> None:
    for name in ("tokenizer.model", "tokenizer.tok.json"):
        for tok in (src / name, src.parent / name):
            if tok.is_file():
                shutil.copy(tok, out / name)
                return


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from groklm.train.pretrain import TrainConfig, train

    config = _config_arg(args)
    if config is None:
        raise UsageError("give the model to train: --preset NAME or --config FILE")
    _check_device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[args.dtype]
    try:
        cfg = TrainConfig(
            config, args.data, args.out, tokenizer=args.tokenizer, train_tokenizer=args.train_tokenizer,
            steps=args.steps, batch=args.batch, seq_len=args.seq_len, grad_accum=args.grad_accum, lr=args.lr,
            warmup=args.warmup, weight_decay=args.weight_decay, aux_coef=args.aux_loss, z_coef=args.z_loss,
            eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, resume=args.resume,
            stop_after=args.stop_after, max_tokens=args.max_tokens, time_limit_s=args.time_limit, dtype=dtype,
            device=args.device, grad_checkpoint=args.checkpointing, progress=not args.quiet,
        ).check()  # fmt: skip
    except ValueError as e:
        raise UsageError(str(e)) from None
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: FSDP over every rank
        from groklm import parallel

        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else args.device
        cfg.device = device
        rank = parallel.init(device)
    _set_threads(args.threads)
    try:
        summary = train(cfg)
    finally:
        if world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()
    if rank == 0:
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
    for name in ("gpus", "nodes", "context", "batch"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1, not {getattr(args, name)}")
    if args.gpus % args.nodes:
        raise UsageError(f"--gpus {args.gpus} do not split evenly over --nodes {args.nodes}")
    if not 0 < args.efficiency <= 1:
        raise UsageError(f"--efficiency must be in (0, 1], not {args.efficiency}")
    if args.context > config.sequence_len:
        raise UsageError(f"--context {args.context} exceeds the model's {config.sequence_len} tokens")
    memory, bandwidth = sizing.GPUS[args.gpu]
    link, latency = sizing.LINKS[args.interconnect or ("nvlink3" if args.gpu.startswith("a100") else "nvlink")]

    def size(option: str, default: float) -> float:
        text = getattr(args, option.replace("-", "_"))
        try:
            return default if text is None else sizing.parse_size(text)
        except ValueError as e:
            raise UsageError(f"--{option} {e}") from None

    hw = sizing.Hardware(size("gpu-memory", memory), size("memory-bandwidth", bandwidth), size("link-bandwidth", link),
                         latency, size("inter-node-bandwidth", 50e9))  # fmt: skip
    reserve = size("reserve", 4 * 2**30)
    bits = [args.bits] if args.bits else [8, 4]
    found, refused = sizing.layouts(config, hw, args.gpus, bits, args.gpus // args.nodes, args.context, args.batch,
                                    reserve, args.efficiency)  # fmt: skip
    shown = [x for x in found if x.fits or args.all]
    if args.json:
        print(json.dumps({"model": source, "gpus": args.gpus, "nodes": args.nodes, "hardware": vars(hw),
                          "context": args.context, "batch": args.batch, "reserve_bytes": reserve,
                          "efficiency": args.efficiency, "layouts": [sizing.as_dict(x) for x in shown],
                          "refused": refused}, indent=1))  # fmt: skip
        return 0
    g = 2**30
    print(f"{config.family} ({source}) on {args.gpus} x {args.gpu} ({hw.memory / 1e9:.0f} GB, "
          f"{hw.bandwidth / 1e12:.2f} TB/s) over {args.nodes} machine{'s' if args.nodes > 1 else ''}; "
          f"KV cache for {args.batch} x {args.context} tokens; {reserve / g:.1f} GiB reserved a GPU")  # fmt: skip
    print(f"{'tp':>3} {'ep':>3} {'bits':>4}  {'weights':>8} {'KV':>7} {'total':>8}  {'fits':>4}  "
          f"{'read/step':>9} {'t_mem':>7} {'t_comm':>7}  {'tok/s':>7} {'tok/s@1':>7}")  # fmt: skip
    for x in shown:
        print(f"{x.tp:>3} {x.ep:>3} {x.bits:>4}  {x.weight_bytes / g:>7.1f}G {x.kv_bytes / g:>6.1f}G "
              f"{x.total_bytes / g:>7.1f}G  {'yes' if x.fits else 'no':>4}  {x.read_bytes_per_step / g:>8.2f}G "
              f"{x.t_mem_ms:>5.2f}ms {x.t_comm_ms:>5.2f}ms  {x.tokens_per_s:>7.1f} {x.tokens_per_s_batch1:>7.1f}")  # fmt: skip
    if not shown:
        print("no layout fits: try --bits 4, more GPUs, a shorter --context or a smaller --batch (--all shows them)")
    for line in refused:
        print(f"  not possible: {line}")
    print("(a model, not a measurement: see `groklm.sizing` and the README for the formula)")
    return 0


def _lora_modules(args: argparse.Namespace) -> list[tuple[str, str]]:
    """--lora-modules NAME=DIR ...: checked (names unique, not the model's, each directory an adapter's)
    before the model loads."""
    from groklm.train.lora import read_adapter_config

    out: list[tuple[str, str]] = []
    for item in args.lora_modules or []:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or not path:
            raise UsageError(f"--lora-modules {item!r}: give NAME=DIR")
        if name in (n for n, _ in out):
            raise UsageError(f"--lora-modules: the name {name!r} is given twice")
        try:
            read_adapter_config(path)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--lora-modules {item}: {e}") from None
        out.append((name, path))
    if out and (args.adapter or args.compile or args.tp * args.ep > 1):
        raise UsageError("--lora-modules runs adapters per request in one eager process: not with --adapter, "
                         "--compile, --tp or --ep")  # fmt: skip
    return out


def cmd_serve(args: argparse.Namespace) -> int:
    from groklm.generate import decoder
    from groklm.load import checkpoint_config, detect_format, load
    from groklm.serve import run
    from groklm.serve.chat import ChatTemplate
    from groklm.serve.engine import Engine, Runner
    from groklm.serve.ranks import LeaderRunner, follow
    from groklm.tokenizer import find_tokenizer

    for name in ("max_batch", "prefill_chunk", "port", "max_waiting"):
        low = 0 if name in ("port", "max_waiting") else 1
        if getattr(args, name) < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, not {getattr(args, name)}")
    if args.port > 65535:
        raise UsageError(f"--port {args.port}: not a port")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be at least 1, not {args.threads}")
    for name in ("body_timeout", "shutdown_timeout"):
        if not 0 < getattr(args, name) < 1e6:
            raise UsageError(f"--{name.replace('_', '-')} must be a positive number of seconds, "
                             f"not {getattr(args, name)}")  # fmt: skip
    _check_device(args.device)
    config, _ = checkpoint_config(args.checkpoint, _config_arg(args))
    _check_plan(config, args.tp, args.ep)
    _license_notice(config)
    if args.mmap and args.tp * args.ep > 1:
        raise UsageError("--mmap is for one process (each rank of --tp/--ep reads its own share into memory)")
    _check_adapter(args, args.tp * args.ep > 1, config)
    loras = _lora_modules(args)
    if args.mmap and detect_format(args.checkpoint) != "native":
        raise UsageError(
            "--mmap needs groklm's own layout: write it once with `groklm quantize --bits 8 --checkpoint IN --out OUT`"
        )
    if args.bits and detect_format(args.checkpoint) not in ("hf", "gguf", "grok2"):
        raise UsageError("--bits is for Grok-2, Hugging Face and GGUF checkpoints (write int4 with `groklm quantize`)")
    max_model_len = args.max_model_len or config.sequence_len
    if not 2 <= max_model_len <= config.sequence_len:
        raise UsageError(
            f"--max-model-len must be in 2..{config.sequence_len} (the model's context), not {max_model_len}"
        )
    chat = ChatTemplate.from_file(args.chat_template) if args.chat_template else ChatTemplate()
    try:
        tokenizer = find_tokenizer(args.checkpoint, args.tokenizer)
    except FileNotFoundError as e:
        if args.tokenizer:
            raise
        print(f"groklm serve: warning: {e}; serving token ids only (no text prompts, chat or stop strings)",
              file=sys.stderr)  # fmt: skip
        tokenizer = None
    _tokenizer_fits(tokenizer, config, "serve")
    api_key = args.api_key or os.environ.get("GROKLM_API_KEY") or None
    name = args.served_model_name or Path(os.path.abspath(args.checkpoint)).name
    if name in (n for n, _ in loras):
        raise UsageError(f"--lora-modules: {name!r} is the base model's name (--served-model-name)")
    socks = _bind(args.host, args.port) if os.environ.get("RANK", "0") == "0" else []  # rank 0 serves
    ranks = _start_ranks(args)
    try:
        threads = _set_threads(args.threads)
        model = load(args.checkpoint, config, dtype=_torch_dtype(args.dtype), device=ranks.device if ranks.parallel
                     else args.device, progress=not args.quiet and ranks.leader, mmap=args.mmap, bits=args.bits,
                     tp=ranks.tp, ep=ranks.ep)  # fmt: skip
        if args.adapter:
            from groklm.train.lora import load_adapter

            load_adapter(model, args.adapter)
        adapters = None
        if not (args.adapter or args.compile or ranks.parallel):  # per-row adapters run in eager, one-process steps
            from groklm.serve.adapters import install

            adapters = install(model)
            for lora_name, lora_dir in loras:
                try:
                    adapters.add(adapters.read(lora_name, lora_dir))
                except (ValueError, FileNotFoundError) as e:
                    raise UsageError(f"--lora-modules {lora_name}={lora_dir}: {e}") from None
        decode = decoder(args.compile, model.device)
        if not ranks.leader:
            import signal

            # torchrun passes a stop signal to every rank: rank 0 drains, then tells the others to stop.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            follow(model, args.max_batch, max_model_len, decode)  # rank 0's steps, until it stops
            return 0
        engine = Engine(model, tokenizer, max_batch=args.max_batch, max_waiting=args.max_waiting,
                        prefill_chunk=args.prefill_chunk, max_model_len=max_model_len, decode=decode,
                        runner=LeaderRunner if ranks.parallel else Runner)  # fmt: skip
        if not args.quiet:
            print(f"groklm serve: {args.max_batch} rows of {max_model_len} tokens, {threads} threads"
                  + (f", tp {ranks.tp} x ep {ranks.ep}" if ranks.parallel else "")
                  + (", API key required" if api_key else ""), file=sys.stderr)  # fmt: skip
        run(engine, name, args.host, args.port, api_key, chat, body_timeout=args.body_timeout,
            shutdown_timeout=args.shutdown_timeout, socks=socks, adapters=adapters)  # fmt: skip
        return 0
    finally:
        for sock in socks:
            sock.close()
        ranks.close()


def _bind(host: str, port: int) -> list[Any]:
    """The server's sockets, bound before any weight is read: a port in use costs a second, not the load."""
    import socket

    from groklm.serve import bind

    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return bind(host, port)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    except OSError as e:
        raise ValueError(f"cannot listen on {where}: {e.strerror or e} (--host, --port)") from None


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
