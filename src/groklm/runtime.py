"""The checks and the set-up shared by the commands that run a model (generate, serve, analyze, finetune,
train): the device, the threads, torchrun's ranks and the parallel plan, the options a checkpoint's format
allows, the tokenizer's fit and the prompt. Each check runs before any weight is read and raises
`UsageError` naming the option."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from groklm.config import GrokConfig


class UsageError(ValueError):
    """A bad argument, named as its command-line option: `groklm` reports it as `error: ...`, exit status 2."""


def interpret_triton_without_gpu() -> None:
    """With no GPU, Triton's kernels (GROKLM_KERNELS=triton) run only in its interpreter: say so before anything
    imports triton, which reads TRITON_INTERPRET once."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


def torch_dtype(name: str) -> Any:
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


def model_config(checkpoint: str, config: GrokConfig | None = None) -> GrokConfig:
    """The checkpoint's config (`config` given: that one, checked against the checkpoint)."""
    from groklm.load import checkpoint_config

    return checkpoint_config(checkpoint, config)[0]


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


def start_ranks(tp: int, ep: int, device: str, serving: bool = False) -> Ranks:
    """Check --tp/--ep against torchrun's environment and join the process group (cheap: no weights)."""
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
    if device == "cuda":  # one GPU a rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    from groklm import parallel

    rank = parallel.init(device, timeout_s=24 * 3600.0 if serving else None)
    return Ranks(tp, ep, rank, device)


def check_device(name: str) -> None:
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


def check_threads(threads: int | None) -> None:
    if threads is not None and threads < 1:
        raise UsageError(f"--threads must be at least 1, not {threads}")


def set_threads(requested: int | None) -> int:
    import torch

    from groklm import kernels

    # Under torchrun the ranks on one machine share its cores.
    threads = requested or max(1, kernels.choose_threads() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)
    return threads


def check_plan(config: GrokConfig, tp: int, ep: int) -> None:
    from groklm import parallel

    try:
        parallel.plan(config, tp, ep)
    except parallel.ParallelError as e:
        raise UsageError(str(e).replace("tp=", "--tp ").replace("ep=", "--ep ")) from None


def check_placement(checkpoint: str, config: GrokConfig | None, *, device: str, tp: int, ep: int) -> GrokConfig:
    """generate's and serve's first checks: the device, the checkpoint's config, the --tp/--ep plan for it."""
    check_device(device)
    config = model_config(checkpoint, config)
    check_plan(config, tp, ep)
    return config


def check_format_options(checkpoint: str, *, mmap: bool = False, bits: int | None = None) -> None:
    """The options the checkpoint's format must allow (`load.checkpoint_config`, the one check `load` makes
    too): --mmap (groklm's own layout) and --bits (float weights to quantize as they load)."""
    from groklm.load import OptionError, checkpoint_config

    try:
        checkpoint_config(checkpoint, mmap=mmap, bits=bits)
    except OptionError as e:
        raise UsageError(f"{e.flag} {e.reason}") from None


def check_holding(checkpoint: str, config: GrokConfig, *, parallel: bool, mmap: bool, bits: int | None,
                  leader: bool = True) -> None:  # fmt: skip
    """How generate and serve hold the model: the licence notice, then --mmap and --bits."""
    if leader:
        license_notice(config)
    if mmap and parallel:
        raise UsageError("--mmap is for one process (each rank of --tp/--ep reads its own share into memory)")
    check_format_options(checkpoint, mmap=mmap, bits=bits)


def license_of(config: GrokConfig) -> str:
    if config.family == "grok-2":
        from groklm.formats.grok2 import LICENSE

        return LICENSE
    return "Apache-2.0 (Grok-1 weights and reference code, xAI)"


def license_notice(config: GrokConfig) -> None:
    """The one-line notice the commands that load Grok-2 print."""
    if config.family == "grok-2":
        print(f"groklm: licence: {license_of(config)}", file=sys.stderr)


def tokenizer_fits(tokenizer: Any, config: GrokConfig, command: str) -> None:
    """Refuse a tokenizer larger than the model's vocabulary; warn of one far smaller (see `check_vocabulary`)."""
    from groklm.tokenizer import check_vocabulary

    if tokenizer is not None and (warning := check_vocabulary(tokenizer, config.vocab_size)):
        print(f"groklm {command}: warning: {warning}", file=sys.stderr)


def check_at_least(low: int, **values: int) -> None:
    """Each value at least `low`, or a UsageError naming its option."""
    for name, value in values.items():
        if value < low:
            raise UsageError(f"--{name.replace('_', '-')} must be at least {low}, not {value}")


def read_prompt_file(path: str) -> str:
    """The UTF-8 text of `path` (- for stdin)."""
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
        return raw.decode("utf-8")
    except OSError as e:
        raise UsageError(f"--prompt-file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--prompt-file {path}: not UTF-8 text") from None


def parse_ids(text: str) -> list[int]:
    """'1, 2,3' -> [1, 2, 3] (--prompt-ids)."""
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--prompt-ids {text[:60]!r}: not a comma-separated list of integers") from None
    if not ids:
        raise UsageError("--prompt-ids: no token ids given")
    return ids
