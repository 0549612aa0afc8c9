"""What fine-tuning and training share: the loss, the learning-rate schedule, gradient checkpointing per
layer (a transform), resumable state, the loss log and its plot."""

from __future__ import annotations

import json
import math
import pickle
import random
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from groklm.model import Block, Grok, recast
from groklm.train.data import IGNORE


def option_metadata(
    help: str, flag: str | None = None, metavar: str | None = None, negatable: bool = False, cli_default: Any = None
) -> dict[str, Any]:
    """What makes a config field a command-line option (`cli_options.config_options` adds it, `from_args` reads
    it back): its help; its flag where not --FIELD-NAME; a flag/--no-flag pair if `negatable`; the parser's
    default where the field's differs in form (--targets attn for a list of names)."""
    return {"help": help, "flag": flag, "metavar": metavar, "negatable": negatable, "cli_default": cli_default}


def option(default: Any, *how: Any) -> Any:
    """A config field with this default that is also a command-line option (see `option_metadata`)."""
    return field(default=default, metadata=option_metadata(*how))


# The options fine-tuning and training share: (help, flag, metavar, negatable).
_SHARED = {
    "steps": ("optimizer steps",),
    "seq_len": ("tokens a window",),
    "lr": ("peak learning rate (AdamW)",),
    "warmup": ("linear warmup steps, then cosine decay to 0.1 x",),
    "eval_every": ("steps between evaluations on held-out data",),
    "save_every": ("steps between saves (state.pt, and the result)",),
    "seed": ("seeds the initialization, the data order and dropout",),
    "resume": ("continue the run in --out from its state.pt",),
    "stop_after": ("stop (saved) after this step; --resume goes on", None, "STEP"),
    "grad_checkpoint": ("recompute each layer's activations in the backward pass (less memory, more compute)",
                        "--checkpointing", None, True),
}  # fmt: skip


def shared_option(name: str, default: Any) -> Any:
    """A run option fine-tuning and training share, with its one help text (see `option`)."""
    return option(default, *_SHARED[name])


def check_positive(config: Any, names: tuple[str, ...]) -> None:
    """Raise ValueError naming the first of these fields of a run's config that is not a positive integer."""
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive integer, not {v!r}")


def loss_ends(losses: list[float]) -> dict[str, Any]:
    """The mean loss of the first and of the last `loss_window` steps: 10, or half a shorter run, so the two
    windows never overlap (one step: the same loss, window 1)."""
    w = max(1, min(10, len(losses) // 2))
    return {"loss_window": w, "first_loss": float(np.mean(losses[:w])) if losses else None,
            "last_loss": float(np.mean(losses[-w:])) if losses else None}  # fmt: skip


def loss_fn(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (nats) over the targets that count."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE)


def chunked_loss(model: Grok, h: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """The loss of hidden states h [B, T, D], the output head run `chunk` positions at a time under
    checkpointing: the [T, V] logits are never all held (they dominate memory with Grok's 131k vocabulary)."""
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    count = (targets != IGNORE).sum()
    for t0 in range(0, h.shape[1], chunk):
        hs, ts = h[:, t0 : t0 + chunk], targets[:, t0 : t0 + chunk]

        def part(x: Tensor, t: Tensor) -> Tensor:
            logits = model.unembed(x)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), t.reshape(-1), ignore_index=IGNORE,
                                   reduction="sum")  # fmt: skip

        total = total + (checkpoint(part, hs, ts, use_reentrant=False) if torch.is_grad_enabled() else part(hs, ts))
    return total / count.clamp_min(1)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int, floor: float = 0.1) -> Any:
    """Linear warmup over `warmup` steps, then cosine decay to `floor` x the peak at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class CheckpointedBlock(Block):
    """A decoder layer whose activations are recomputed in the backward pass instead of kept."""

    def forward(self, *args: Any) -> Tensor:  # type: ignore[override]
        if not torch.is_grad_enabled():
            return super().forward(*args)
        return checkpoint(super().forward, *args, use_reentrant=False)


def checkpoint_layers(model: Grok) -> Grok:
    """Gradient checkpointing per layer, as a transform (same parameters and names)."""
    for i, layer in enumerate(model.layers):
        if type(layer) is Block:
            model.layers[i] = recast(layer, CheckpointedBlock)
    return model


def rng_state() -> dict[str, Any]:
    """The generators' states as tensors and plain values only, so that `load_state` can read them with
    weights_only=True (numpy's key array is held as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss))
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def save_state(path: Path, state: dict[str, Any]) -> None:
    """torch.save, written beside and moved into place (a crash mid-write leaves the last state whole)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def load_state(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training state to resume from")
    try:  # tensors and plain values only: a run directory from elsewhere cannot run code
        return torch.load(path, weights_only=True)  # type: ignore[no-any-return]
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{path}: not a training state groklm can read safely ({str(e).splitlines()[0][:200]})") from None


def log_line(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []


def plot_losses(log: list[dict[str, Any]], out: Path, title: str, baseline: float | None = None) -> Path:
    """loss.png: the training loss per step (and a moving average), the evaluation loss where measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        steps, losses = zip(*train, strict=True)
        ax.plot(steps, losses, lw=0.7, alpha=0.5, label="train")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"train, mean of {k}")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="evaluation")
    if baseline is not None:
        ax.axhline(baseline, color="grey", ls="--", lw=1, label="unigram entropy of the data")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=title)
    ax.legend()
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
