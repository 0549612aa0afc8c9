"""The options of every `groklm` command (`cli.py` runs them). An option that several commands take is
defined once here, so its name, help and default are the same wherever it appears."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from typing import Any

DTYPES = ("bf16", "fp32")
DESCRIPTION = """groklm: run xAI's Grok models from their released checkpoints (`groklm COMMAND --help` for each
command). Every argument and the checkpoint's config are checked before any weights are read."""


def _version() -> str:
    try:
        return version("groklm")
    except PackageNotFoundError:
        return "unknown"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default once: after the help, unless the help already says it or
    there is none to show (None, False, an empty list); descriptions keep their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            not action.option_strings
            or "default" in text
            or action.default is argparse.SUPPRESS
            or action.default is None
            or action.default is False
            or action.default == []
        ):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Its own usage and one `error:` line (exit 2) for any mistake on its command line, an unknown option
    included: argparse leaves those to the top-level parser, which would show the top-level usage.

    `aliases` names options that may instead be given as paths in this order, the older spelling
    (`groklm quantize IN OUT` for `--checkpoint IN --out OUT`): the paths fill those not given as options."""

    aliases: tuple[str, ...] = ()

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._require_aliases(False)  # required, but perhaps given as paths: checked below
        ns, extra = super().parse_known_args(args, namespace)
        open_ = [n for n in self.aliases if getattr(ns, n, None) is None]
        if any(a.startswith("-") and a != "-" for a in extra):
            self.error(f"unrecognized arguments: {' '.join(extra)}")
        if len(extra) > len(open_):
            self.error(f"unrecognized arguments: {' '.join(extra[len(open_) :])}")
        for name, path in zip(open_, extra, strict=False):
            setattr(ns, name, path)
        missing = open_[len(extra) :]
        if missing:
            self.error(f"the following arguments are required: {', '.join('--' + n for n in missing)}")
        return ns, []

    def _require_aliases(self, required: bool) -> None:
        for a in self._actions:
            if a.dest in self.aliases:
                a.required = required

    def format_usage(self) -> str:
        self._require_aliases(True)  # shown as required: they are, as options or as paths
        try:
            return super().format_usage()
        finally:
            self._require_aliases(False)

    def format_help(self) -> str:
        self._require_aliases(True)
        try:
            return super().format_help()
        finally:
            self._require_aliases(False)


def _presets() -> list[str]:
    from groklm.config import PRESETS

    return sorted(PRESETS)


def _gpus() -> list[str]:
    from groklm.sizing import GPUS

    return sorted(GPUS)


def _links() -> list[str]:
    from groklm.sizing import LINKS

    return sorted(LINKS)


# Options that several commands share.


def checkpoint(p: argparse.ArgumentParser, help: str, required: bool = True) -> None:
    p.add_argument("--checkpoint", required=required, metavar="PATH", help=help)


def out(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--out", required=True, metavar="PATH", help=help)


def quiet(p: argparse.ArgumentParser, help: str = "no progress bars or statistics on stderr") -> None:
    p.add_argument("--quiet", action="store_true", help=help)


def force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help="replace an existing output")


def json_(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def config(p: argparse.ArgumentParser, what: str = "for a checkpoint without config.json (default: Grok-1's)") -> None:
    group = p.add_mutually_exclusive_group()
    group.add_argument("--config", metavar="FILE", help=f"config JSON (reference field names) {what}")
    group.add_argument("--preset", choices=_presets(), help=f"a named config {what}")


def tokenizer(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.model or tokenizer.tok.json (default: found in or next to the checkpoint)")  # fmt: skip


def compute(p: argparse.ArgumentParser, dtype_help: str = "compute dtype", device: bool = True) -> None:
    """--dtype, --device and --threads."""
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help=dtype_help)
    if device:
        p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, metavar="N",
                   help="compute threads (default: the CPUs not kept busy by other processes)")  # fmt: skip


def bits(p: argparse.ArgumentParser,
         help: str = "quantize a Grok-2, Hugging Face or GGUF checkpoint's float weights as they load") -> None:  # fmt: skip
    p.add_argument("--bits", type=int, choices=[4, 8], help=help)


def serving(p: argparse.ArgumentParser) -> None:
    """How generate and serve hold the model: --mmap, --compile, --tp, --ep, --adapter."""
    p.add_argument(
        "--mmap", action="store_true", help="page weights in from disk on use (groklm's layout: see quantize)"
    )
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step (pays off after the first ~30 s)")  # fmt: skip
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (under torchrun: --nproc-per-node tp x ep)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (whole experts a rank)")
    p.add_argument("--adapter", metavar="DIR", help="apply this LoRA adapter (from `groklm finetune`, PEFT's format)")


def _flag(f: dataclasses.Field[Any]) -> str:
    return f.metadata["flag"] or "--" + f.name.replace("_", "-")


def config_options(p: argparse.ArgumentParser, cls: type, *names: str) -> None:
    """Add these fields of config dataclass `cls` as options, each as its field defines it (`train.common.option`):
    flag, help, default, type and metavar; the field and the option are one definition."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names:
        f = fields[name]
        m = f.metadata
        default = f.default if m["cli_default"] is None else m["cli_default"]
        kind = str(f.type).removesuffix(" | None")
        if kind == "bool":
            action = argparse.BooleanOptionalAction if m["negatable"] else "store_true"
            p.add_argument(_flag(f), action=action, default=default, help=m["help"])
        else:
            type_ = {"int": int, "float": float}.get(kind)  # anything else: the string itself
            p.add_argument(_flag(f), type=type_, default=default, metavar=m["metavar"], help=m["help"])


def from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values of `cls`'s fields that are options of this command line, by field name (`config_options`'s
    inverse): `cls(**from_args(args, cls), ...)`."""
    out = {}
    for f in dataclasses.fields(cls):
        dest = _flag(f)[2:].replace("-", "_") if "help" in f.metadata else None
        if dest is not None and hasattr(args, dest):
            out[f.name] = getattr(args, dest)
    return out


# A training run's options, shared by finetune and train (their fields in FinetuneConfig and TrainConfig).
RUN_OPTIONS = ("steps", "batch", "seq_len", "lr", "warmup", "eval_every", "save_every", "seed", "resume", "stop_after",
               "grad_checkpoint")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    from groklm.train.finetune import FinetuneConfig
    from groklm.train.lora import LoraConfig
    from groklm.train.pretrain import TrainConfig

    parser = Parser(prog="groklm", description=DESCRIPTION, formatter_class=Formatter)
    parser.add_argument("--version", action="version", version=f"groklm {_version()}", help="print the version")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    def command(name: str, help: str, aliases: tuple[str, ...] = (), note: str = "") -> Parser:
        p = sub.add_parser(name, help=help, description=help + note, formatter_class=Formatter)
        p.aliases = aliases
        return p

    g = command("generate", "generate text from a checkpoint, streamed to stdout")
    g.add_argument("prompt", nargs="?", help="text prompt (needs the tokenizer)")
    checkpoint(g, "checkpoint directory (with ckpt-0/, or groklm's layout) or GGUF file")
    g.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (- for stdin)")
    g.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids instead of a text prompt")
    tokenizer(g)
    config(g)
    g.add_argument("--max-new-tokens", type=int, default=100, metavar="N", help="at most this many new tokens")
    g.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus p in (0, 1], the reference's semantics; 1 is off")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 is off")
    g.add_argument("--seed", type=int, help="fixes the sampling (0..2^63-1)")
    g.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted once from each token already generated (-2..2, OpenAI's)")  # fmt: skip
    g.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per time a token was generated (-2..2, OpenAI's)")  # fmt: skip
    g.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="> 0: divides the positive, multiplies the negative logits of tokens in the prompt or "
                        "output (vLLM's); 1 is off")  # fmt: skip
    g.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this times as likely as the top one (0..1, vLLM's); 0 is off")  # fmt: skip
    g.add_argument("--logit-bias", metavar="ID=BIAS,...",
                   help="add BIAS (-100..100) to token ID's logit; -100 bans it")  # fmt: skip
    g.add_argument("--stop", action="append", default=[], metavar="STR", help="stop string (repeatable); not printed")
    g.add_argument("--ignore-eos", action="store_true", help="keep going past EOS, as the reference does")
    g.add_argument("--no-echo", action="store_true", help="print only the new text, not the prompt")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    compute(g)
    bits(g)
    serving(g)
    quiet(g)

    s = command("serve", "an OpenAI-compatible HTTP server with continuous batching and a playground")
    checkpoint(s, "checkpoint directory (any format groklm reads)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free one; the URL is printed)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together (KV cache rows)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests that may wait for a row; more get 503")
    s.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens prefilled per step")
    s.add_argument("--max-model-len", type=int, metavar="N", help="context per request (default: the model's)")
    s.add_argument("--served-model-name", metavar="NAME",
                   help="the model's name in the API (default: the checkpoint's directory)")  # fmt: skip
    s.add_argument("--api-key", metavar="KEY",
                   help="require `Authorization: Bearer KEY` on /v1 and /(de)tokenize (or GROKLM_API_KEY)")  # fmt: skip
    s.add_argument("--chat-template", metavar="FILE", help="Jinja2 chat template (default: Grok's Human/Assistant)")
    tokenizer(s)
    s.add_argument("--body-timeout", type=float, default=30.0, help="seconds a client has to send its body (408 after)")
    s.add_argument("--shutdown-timeout", type=float, default=60.0,
                   help="seconds SIGTERM lets running requests finish before aborting them")  # fmt: skip
    config(s)
    compute(s)
    bits(s)
    serving(s)
    s.add_argument("--lora-modules", nargs="+", metavar="NAME=DIR",
                   help="adapters a request picks by `model` (the base stays servable by its own name); "
                        "attention or dense-MLP targets only")  # fmt: skip
    quiet(s, "no progress bar or start-up line on stderr")

    r = command("init-random", "write a random-weight checkpoint in the released format", ("out",),
                "\n\nThe output may also be given as a path: `groklm init-random OUT`.")  # fmt: skip
    out(r, "output directory (gets ckpt-0/ and config.json); must be new or empty")
    config(r, "(default: the mini preset)")
    r.add_argument("--seed", type=int, default=0, help="seeds the random weights")
    r.add_argument("--tokenizer", metavar="PATH", help="copy this tokenizer.model into the output directory")
    force(r)
    quiet(r)

    q = command("quantize", "write a checkpoint in groklm's safetensors layout, int8 or int4", ("checkpoint", "out"),
                "\n\nThe two paths may also be given in order: `groklm quantize IN OUT`.")  # fmt: skip
    checkpoint(q, "a released-format or groklm checkpoint")
    out(q, "output directory; must be new or empty")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4, help="8 keeps the released int8 weights as they are")
    q.add_argument("--group-size", type=int, default=64,
                   help="int4: input columns per scale (a multiple of 16; of 32 for the fast kernel)")  # fmt: skip
    config(q, "if the input has no config.json")
    force(q)
    quiet(q)

    c = command(
        "convert",
        "convert a checkpoint to another format, streaming (about one layer in memory)",
        ("checkpoint", "out"),
        "\n\nThe two paths may also be given in order: `groklm convert IN OUT --to ...`.",
    )
    checkpoint(c, "a checkpoint groklm reads (released, groklm's layout, Hugging Face, GGUF)")
    out(c, "output directory (hf, native) or file (gguf); must be new or empty")
    from groklm.formats.registry import WRITABLE

    c.add_argument("--to", required=True, choices=WRITABLE, help="the format to write")
    c.add_argument("--type", help="hf: bf16 or f32; gguf: q8_0, f16, bf16 or q4_0 (default: the first)")
    from groklm.formats.gguf import EMBEDDING_TYPES

    c.add_argument("--embedding-type", choices=EMBEDDING_TYPES,
                   help="gguf: the embedding's type (also the tied head llama.cpp reads every token; "
                        "default f32, as released)")  # fmt: skip
    c.add_argument("--bits", type=int, choices=[4, 8], default=8, help="native: int8 as released, or int4")
    c.add_argument("--group-size", type=int, default=64, help="native int4: input columns per scale")
    config(c, "if the input has none")
    force(c)
    quiet(c)

    v = command("verify", "check a checkpoint's files (and their sha256) before loading it", ("checkpoint",),
                "\n\nThe checkpoint may also be given as a path: `groklm verify PATH`.")  # fmt: skip
    checkpoint(v, "checkpoint directory (or GGUF file)")
    config(v)
    v.add_argument("--sha256", metavar="MANIFEST", help="check each file against these `sha256sum` lines")
    v.add_argument("--write-manifest", metavar="FILE", help="write `sha256sum` lines for every file instead")
    json_(v, "the report")
    quiet(v, "no progress bar on stderr")

    i = command("info", "config, parameter counts, memory needed, licence")
    checkpoint(i, "read the config of this checkpoint", required=False)
    config(i, "(default: grok-1)")
    json_(i, "everything")

    an = command("analyze", "study a model: routing statistics and plots")
    an_sub = an.add_subparsers(dest="what", required=True, metavar="WHAT", parser_class=Parser)
    ro = an_sub.add_parser("routing", help="which experts the tokens of a text choose: JSON, PNG plots, an HTML report",
                           description="Run a text through the model and report what its experts do.",
                           formatter_class=Formatter)  # fmt: skip
    checkpoint(ro, "checkpoint directory (any format groklm reads)")
    ro.add_argument("--prompt-file", "--text", metavar="FILE", help="a UTF-8 text file to route (- for stdin)")
    ro.add_argument("--prompt", help="a text to route")
    ro.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids to route")
    ro.add_argument("--out", required=True, metavar="DIR",
                    help="directory for routing.json, the PNG plots and report.html")  # fmt: skip
    ro.add_argument("--max-tokens", type=int, default=2000, help="route at most this many tokens of the input")
    ro.add_argument("--window", type=int, default=512, help="tokens run together (each window from position 0)")
    ro.add_argument("--map-tokens", type=int, default=48, help="tokens shown in the route map")
    tokenizer(ro)
    config(ro)
    compute(ro)
    bits(ro, "quantize a float checkpoint as it loads")
    quiet(ro)

    ft = command("finetune", "train LoRA adapters on a frozen base (int8, int4 or float), saved in PEFT's format")
    checkpoint(ft, "the base checkpoint (any format groklm reads)")
    ft.add_argument("--data", required=True, metavar="FILE",
                    help=".jsonl ({'text'} or {'prompt', 'completion'} a line) or a text file")  # fmt: skip
    out(ft, "directory for the adapter, state.pt, log.jsonl and loss.png")
    config_options(ft, LoraConfig, "target_modules", "r", "lora_alpha", "lora_dropout")
    config_options(ft, FinetuneConfig, *RUN_OPTIONS, "eval_fraction")
    bits(ft, "hold a float base quantized (QLoRA-style)")
    tokenizer(ft)
    config(ft)
    compute(ft, "the base's compute dtype (default: fp32, faster than bf16 for training on the CPU; a float base "
            "takes twice bf16's memory in it)", device=False)  # fmt: skip
    ft.set_defaults(dtype="fp32")
    json_(ft, "the summary")
    quiet(ft)

    mg = command("merge", "fold a LoRA adapter into a checkpoint, quantized again as the base was")
    checkpoint(mg, "the base checkpoint")
    mg.add_argument("--adapter", required=True, metavar="DIR",
                    help="the adapter directory (adapter_config.json, adapter_model.safetensors)")  # fmt: skip
    out(mg, "output directory (groklm's layout); must be new or empty")
    config(mg)
    force(mg)
    quiet(mg)

    tr = command("train", "train a Grok-architecture model from scratch (FSDP2 under torchrun)")
    config(tr, "to train")
    tr.add_argument("--data", nargs="+", required=True, metavar="PATH",
                    help="text files, or directories of .txt/.md/.py/.rst files")  # fmt: skip
    out(tr, "directory for state.pt, log.jsonl, loss.png and model/")
    tk = tr.add_mutually_exclusive_group(required=True)
    tk.add_argument("--tokenizer", metavar="PATH", help="a SentencePiece tokenizer.model (e.g. Grok-1's)")
    tk.add_argument("--train-tokenizer", type=int, metavar="VOCAB", help="train a SentencePiece BPE of VOCAB pieces")
    config_options(tr, TrainConfig, *RUN_OPTIONS, "grad_accum", "weight_decay", "aux_coef", "z_coef", "time_limit_s",
                   "max_tokens")  # fmt: skip
    compute(tr, "autocast dtype (default: bf16 on CUDA, fp32 on CPU)")
    tr.set_defaults(dtype=None)
    json_(tr, "the summary")
    quiet(tr)

    pl = command("plan", "the tensor/expert-parallel layouts that fit a set of GPUs, and their decode speed")
    checkpoint(pl, "plan for this checkpoint's config", required=False)
    config(pl, "(default: grok-1)")
    pl.add_argument("--gpus", type=int, required=True, help="GPUs in all (tp x ep)")
    pl.add_argument("--nodes", type=int, default=1, help="machines they are spread over, evenly")
    pl.add_argument("--gpu", choices=_gpus(), default="h100", help="memory and bandwidth of a GPU")
    pl.add_argument("--gpu-memory", help="memory a GPU (e.g. 80GB, 141GB), instead of --gpu's")
    pl.add_argument("--memory-bandwidth", help="memory bandwidth a GPU (e.g. 3.35TB/s), instead of --gpu's")
    pl.add_argument("--interconnect", choices=_links(),
                    help="link between a machine's GPUs (default: nvlink; nvlink3 for a100)")  # fmt: skip
    pl.add_argument("--link-bandwidth", help="collective bandwidth a GPU within a machine, instead of --interconnect's")
    pl.add_argument("--inter-node-bandwidth", help="bandwidth a GPU between machines (default: 50GB/s, 400 Gb/s)")
    pl.add_argument("--bits", type=int, choices=[4, 8], help="weight width (default: both)")
    pl.add_argument("--context", type=int, default=8192, help="tokens of KV cache a sequence")
    pl.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    pl.add_argument("--reserve", help="memory a GPU kept for activations, CUDA and the allocator (default: 4GiB)")
    pl.add_argument("--efficiency", type=float, default=0.75, help="fraction of the memory bandwidth reached")
    pl.add_argument("--all", action="store_true", help="show the layouts that do not fit too")
    json_(pl, "the layouts")
    return parser
