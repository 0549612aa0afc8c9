"""LoRA fine-tuning on a frozen base held as it loads (int8 as released, int4, or float): the loop behind
`groklm finetune`.

Each step runs a packed batch through the model with gradient checkpointing per layer (activations of a
layer are recomputed in the backward pass) and the output head a chunk of positions at a time, takes
the next-token loss over the counted targets (completions only for prompt/completion data), and steps
AdamW on the adapters alone (fp32), the learning rate warmed up linearly and decayed on a cosine. The
base computes in `dtype`: fp32 by default, since training-sized batches run faster on CPUs in fp32
than in bf16 (emulated where the CPU lacks native bf16 arithmetic); quantized weights stay quantized
either way (bf16 runs the native int8/int4 kernels forward; both dequantize blocks backward). The
adapters' products are fp32.

`out/` receives the adapter (PEFT's format, see `lora`), `state.pt` (adapters, optimizer, schedule,
step, random state: `resume` continues exactly where it stopped), `log.jsonl` and `loss.png`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from groklm.files import progress_bar
from groklm.train.common import (
    check_positive,
    checkpoint_layers,
    chunked_loss,
    cosine_schedule,
    load_state,
    log_line,
    loss_ends,
    option,
    plot_losses,
    read_log,
    rng_state,
    save_state,
    set_rng_state,
    shared_option,
    trainable,
)
from groklm.train.data import pack, read_examples, tokenize
from groklm.train.lora import LoraConfig, adapters, add_lora, save_adapter


@dataclass
class FinetuneConfig:
    checkpoint: str
    data: str
    out: str
    lora: LoraConfig = field(default_factory=LoraConfig)
    steps: int = shared_option("steps", 100)
    batch: int = option(1, "packed windows a step")
    seq_len: int = shared_option("seq_len", 512)
    lr: float = shared_option("lr", 2e-4)
    warmup: int = shared_option("warmup", 10)
    eval_fraction: float = option(0.05, "windows held out for the evaluation loss")
    eval_every: int = shared_option("eval_every", 25)
    save_every: int = shared_option("save_every", 50)
    seed: int = shared_option("seed", 0)
    resume: bool = shared_option("resume", False)
    stop_after: int | None = shared_option("stop_after", None)  # stop (saved) after this step, to resume later
    bits: int | None = None
    dtype: torch.dtype = torch.float32  # the base's compute dtype (see the module docstring)
    grad_checkpoint: bool = shared_option("grad_checkpoint", True)
    tokenizer: str | None = None
    config: Any = None
    progress: bool = True

    def check(self) -> FinetuneConfig:
        check_positive(self, ("steps", "batch", "seq_len", "eval_every", "save_every"))
        if self.warmup < 0 or not self.lr > 0 or not 0 <= self.eval_fraction < 1:
            raise ValueError("warmup must be >= 0, lr > 0 and eval_fraction in [0, 1)")
        self.lora.check()
        return self


def _split(inputs: torch.Tensor, targets: torch.Tensor, fraction: float, seed: int) -> tuple[Any, Any]:
    """The packed windows split into training and evaluation sets (a seeded shuffle)."""
    n = inputs.shape[0]
    n_eval = round(n * fraction) if n > 1 else 0
    n_eval = min(max(n_eval, 1 if fraction > 0 and n > 1 else 0), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    ev, tr = order[:n_eval], order[n_eval:]
    return (inputs[tr], targets[tr]), (inputs[ev], targets[ev])


def _batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The windows of step `step`: epochs of a seeded permutation each, so a resumed run sees the same."""
    idx = []
    for i in range(step * batch, (step + 1) * batch):
        epoch, k = divmod(i, n)
        idx.append(int(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))[k]))
    return torch.tensor(idx)


def evaluate(model: Any, inputs: torch.Tensor, targets: torch.Tensor, batch: int) -> float | None:
    """Mean loss over every counted target of the windows (None if there are none)."""
    if inputs.shape[0] == 0:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, inputs.shape[0], batch):
            x, y = inputs[i : i + batch].to(model.device), targets[i : i + batch].to(model.device)
            n = int((y != -100).sum())
            total += float(chunked_loss(model, model.hidden(x), y)) * n
            count += n
    model.train(was_training)
    return total / count if count else None


def main(cfg: FinetuneConfig, *, threads: int | None = None) -> dict[str, Any]:
    """`groklm finetune`: check the run against the base's config (`UsageError` naming the option), then train
    the adapters; the summary."""
    from groklm.runtime import UsageError, check_format_options, license_notice, model_config, set_threads

    check_format_options(cfg.checkpoint, bits=cfg.bits)
    cfg.config = model_config(cfg.checkpoint, cfg.config)
    license_notice(cfg.config)
    try:
        cfg.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    set_threads(threads)
    torch.manual_seed(cfg.seed)
    return finetune(cfg)


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train LoRA adapters (see the module docstring); returns a summary (losses, speed, where)."""
    from groklm.load import checkpoint_config, load
    from groklm.tokenizer import find_tokenizer

    cfg.check()
    config, _ = checkpoint_config(cfg.checkpoint, cfg.config)
    if cfg.seq_len > config.sequence_len:
        raise ValueError(f"seq_len {cfg.seq_len} exceeds the model's context of {config.sequence_len}")
    out = Path(cfg.out)
    if cfg.resume and not (out / "state.pt").is_file():
        raise FileNotFoundError(f"{out / 'state.pt'}: nothing to resume")
    if not cfg.resume and (out / "state.pt").is_file():
        raise FileExistsError(f"{out}: holds a run already (resume it, or choose another --out)")
    tokenizer = find_tokenizer(cfg.checkpoint, cfg.tokenizer)
    examples = tokenize(read_examples(cfg.data), tokenizer.encode, config.eos_token)
    inputs, targets = pack(examples, cfg.seq_len)
    (train_x, train_y), (eval_x, eval_y) = _split(inputs, targets, cfg.eval_fraction, cfg.seed)

    state = load_state(out / "state.pt") if cfg.resume else None  # read (safely) before the base loads
    torch.manual_seed(cfg.seed)
    model = load(cfg.checkpoint, config, dtype=cfg.dtype, progress=cfg.progress, bits=cfg.bits)
    add_lora(model, cfg.lora)
    if cfg.grad_checkpoint:
        checkpoint_layers(model)
    model.train()
    params = trainable(model)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    schedule = cosine_schedule(optimizer, cfg.warmup, cfg.steps)
    start = 0
    if state is not None:
        model.load_state_dict(state["adapters"], strict=False)
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        set_rng_state(state["rng"])
        start = state["step"]
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if not cfg.resume:
        log_path.unlink(missing_ok=True)

    def save(step: int) -> None:
        names = {f"{n}.{leaf}" for n in adapters(model) for leaf in ("lora_A", "lora_B")}
        lora_state = {k: v for k, v in model.state_dict().items() if k in names}
        save_state(out / "state.pt", {"adapters": lora_state, "optimizer": optimizer.state_dict(),
                                      "schedule": schedule.state_dict(), "rng": rng_state(), "step": step})  # fmt: skip
        save_adapter(model, cfg.lora, out, str(cfg.checkpoint))

    n_params = sum(p.numel() for p in params)
    bar = progress_bar(cfg.steps, f"fine-tuning {n_params / 1e6:.2f} M adapter parameters", cfg.progress,
                       unit="step", initial=start)  # fmt: skip
    t_start, tokens_seen = time.perf_counter(), 0
    for step in range(start, cfg.steps):
        idx = _batch_indices(step, cfg.batch, train_x.shape[0], cfg.seed)
        x, y = train_x[idx].to(model.device), train_y[idx].to(model.device)
        t = time.perf_counter()
        loss = chunked_loss(model, model.hidden(x), y)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        tokens_seen += x.numel()
        record: dict[str, Any] = {"step": step + 1, "loss": round(loss.item(), 5), "grad_norm": round(norm.item(), 4),
                                  "lr": schedule.get_last_lr()[0], "tokens_per_s": round(x.numel() / dt, 1)}  # fmt: skip
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            ev = evaluate(model, eval_x, eval_y, cfg.batch)
            if ev is not None:
                record["eval_loss"] = round(ev, 5)
        log_line(log_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 or step + 1 in (cfg.steps, cfg.stop_after):
            save(step + 1)
        if step + 1 == cfg.stop_after:
            break
    bar.close()
    log = read_log(log_path)
    plot_losses(log, out, f"LoRA fine-tuning of {Path(cfg.checkpoint).name}")
    losses = [r["loss"] for r in log]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    return {
        "out": str(out),
        "steps": len(log),
        "adapter_parameters": n_params,
        **loss_ends(losses),
        "eval_loss": evals[-1] if evals else None,
        "train_windows": int(train_x.shape[0]),
        "eval_windows": int(eval_x.shape[0]),
        "tokens_per_s": round(tokens_seen / max(1e-9, time.perf_counter() - t_start), 1),
    }
