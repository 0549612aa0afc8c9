"""Training a Grok-architecture model from scratch: the loop behind `groklm train`.

The model is the same `Grok` module, any size (a preset or a config file), initialised here
(`init_weights`). Each optimizer step draws `batch` windows of `seq_len` tokens at seeded random places
of the training shard, in `grad_accum` micro-batches, and minimises

    loss = cross-entropy + aux_coef x sum over layers of E x sum_e f_e P_e + z_coef x sum over layers of mean z^2

where, per MoE layer, f_e is the fraction of the (token, slot) choices that went to expert e, P_e the
mean router probability of e, and z the logsumexp of a token's router logits: the load-balancing loss
of Switch Transformer (generalised to top-k as in Mixtral/HF: E x sum f P is 1 when balanced), default
coefficient 0.01, and ST-MoE's router z-loss, off by default (1e-3 is its usual value). Both are read
from the router by hooks; the model's forward is unchanged. AdamW (betas 0.9/0.95, weight decay on
matrices only), warmup then cosine decay, gradients clipped at 1.0; fp32 weights, with bf16 autocast
where asked (the default on CUDA).

Under torchrun the model is sharded with FSDP2 (`parallel.parallelize` over a "dp" mesh): every rank
draws the same global batch and takes its own rows of it, so the run follows the single process's.
`out/` receives state.pt (model, optimizer, schedule, batch generator, step: `resume` continues bit for
bit on the same machine), log.jsonl, loss.png (with the data's unigram entropy for scale) and model/, a
checkpoint in groklm's layout with its tokenizer, which `groklm generate` loads.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import init_device_mesh

from groklm.config import GrokConfig
from groklm.files import progress_bar
from groklm.model import Grok, MoE, capped
from groklm.parallel import parallelize
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
    save_state,
    shared_option,
)
from groklm.train.data import TokenShard, text_files, train_tokenizer, unigram_entropy, write_shard


@dataclass
class TrainConfig:
    model: GrokConfig
    data: list[str]
    out: str
    tokenizer: str | None = None  # a SentencePiece model, or None with train_tokenizer
    train_tokenizer: int | None = None  # train one of this many pieces on the data
    steps: int = shared_option("steps", 1000)
    batch: int = option(16, "windows a step (the global batch)")
    seq_len: int = shared_option("seq_len", 256)
    grad_accum: int = option(1, "micro-batches a step")
    lr: float = shared_option("lr", 3e-3)
    warmup: int = shared_option("warmup", 50)
    weight_decay: float = option(0.1, "on matrices only")
    aux_coef: float = option(0.01, "load-balancing loss coefficient", "--aux-loss")
    z_coef: float = option(0.0, "router z-loss coefficient (ST-MoE uses 1e-3)", "--z-loss")
    eval_fraction: float = 0.02
    eval_every: int = shared_option("eval_every", 100)
    eval_windows: int = 16
    save_every: int = shared_option("save_every", 200)
    seed: int = shared_option("seed", 0)
    resume: bool = shared_option("resume", False)
    stop_after: int | None = shared_option("stop_after", None)
    max_tokens: int | None = option(None, "use at most this many tokens of the data")
    time_limit_s: float | None = option(None, "stop (saved) after the step that passes this", "--time-limit",
                                        "SECONDS")  # fmt: skip
    dtype: torch.dtype | None = None  # autocast dtype; None: bf16 on CUDA, fp32 on CPU
    device: str = "cpu"
    grad_checkpoint: bool = shared_option("grad_checkpoint", False)
    progress: bool = True

    def check(self) -> TrainConfig:
        check_positive(self, ("steps", "batch", "seq_len", "grad_accum", "eval_every", "save_every", "eval_windows"))
        if self.batch % self.grad_accum:
            raise ValueError(f"batch {self.batch} does not split into {self.grad_accum} micro-batches")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise ValueError("give a tokenizer, or the vocabulary size of one to train on the data (not both)")
        if self.train_tokenizer is not None and not 256 < self.train_tokenizer <= 1 << 17:
            raise ValueError(f"a trained tokenizer needs 257..131072 pieces, not {self.train_tokenizer}")
        if self.seq_len > self.model.sequence_len:
            raise ValueError(f"seq_len {self.seq_len} exceeds the model's context of {self.model.sequence_len}")
        if not self.lr > 0 or self.warmup < 0 or self.aux_coef < 0 or self.z_coef < 0:
            raise ValueError("lr must be > 0; warmup, aux_coef and z_coef >= 0")
        if not 0 < self.eval_fraction < 0.5:
            raise ValueError(f"eval_fraction must be in (0, 0.5), not {self.eval_fraction}")
        return self


def init_weights(model: Grok, seed: int = 0) -> Grok:
    """Fan-in normal initialisation: every projection N(0, 1/in), the ones writing into the residual
    stream (attention output, expert and MLP down projections) further scaled by 1/sqrt(2 x layers);
    the embedding N(0, 1/multiplier^2), so the scaled input has unit variance; norms 1."""
    gen = torch.Generator().manual_seed(seed)
    c = model.config
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rpartition(".")[0].rpartition(".")[2]
            if name == "embed.weight":
                std = 1.0 / c.embedding_multiplier_scale
            elif p.dim() == 1:
                p.fill_(1.0)
                continue
            else:
                std = p.shape[-1] ** -0.5 * ((2 * c.num_layers) ** -0.5 if leaf in ("wo", "w2", "down") else 1.0)
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@contextlib.contextmanager
def router_losses(model: nn.Module) -> Iterator[list[tuple[Tensor, Tensor]]]:
    """(load-balancing, z) losses of every MoE call made inside, from its router (see the docstring)."""
    out: list[tuple[Tensor, Tensor]] = []

    def pre(moe: MoE, args: tuple[Tensor, ...]) -> None:
        xs = args[0].reshape(-1, args[0].shape[-1])
        logits = moe.router(xs.float()).float()
        if moe.router_softcap is not None:
            logits = capped(logits, moe.router_softcap)
        probs = logits.softmax(-1)
        chosen = probs.topk(moe.top_k, dim=-1).indices
        e = probs.shape[-1]
        f = torch.bincount(chosen.flatten(), minlength=e).float() / chosen.numel()
        balance = e * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, -1).square().mean()
        out.append((balance, z))

    handles = [m.register_forward_pre_hook(pre) for m in model.modules() if isinstance(m, MoE)]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _prepare(cfg: TrainConfig, out: Path, rank: int) -> tuple[Path, Path, Path]:
    """The tokenizer and the train/eval token shards under out/ (made once, by rank 0)."""
    data = out / "data"
    tok = out / "tokenizer.model" if cfg.train_tokenizer else Path(cfg.tokenizer)  # type: ignore[arg-type]
    train, evals = data / "train.bin", data / "eval.bin"
    if rank == 0 and not (train.is_file() and evals.is_file() and tok.is_file()):
        import sentencepiece as spm

        files = text_files(cfg.data)
        if cfg.train_tokenizer:
            train_tokenizer(files, cfg.train_tokenizer, out / "tokenizer")
        sp = spm.SentencePieceProcessor(model_file=str(tok))
        n = write_shard(files, sp.encode, cfg.model.eos_token, data / "all.bin", cfg.max_tokens)
        tokens = np.memmap(data / "all.bin", dtype=np.uint32, mode="r")
        cut = n - max(cfg.seq_len + 2, int(n * cfg.eval_fraction))
        if cut < cfg.seq_len + 2:
            raise ValueError(f"{n} tokens of data: too few for windows of {cfg.seq_len}")
        tokens[:cut].tofile(train)
        tokens[cut:].tofile(evals)
        del tokens
        (data / "all.bin").unlink()
    if dist.is_initialized():
        dist.barrier()
    return tok, train, evals


def _state_dicts(model: Grok, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict[str, Any], Any]:
    if not sharded:
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_dicts(model: Grok, optimizer: torch.optim.Optimizer, state: dict[str, Any], sharded: bool) -> None:
    if not sharded:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))  # fmt: skip


def main(cfg: TrainConfig, *, threads: int | None = None) -> dict[str, Any] | None:
    """`groklm train`: check the run (`UsageError` naming the option), join torchrun's ranks when there are
    several (FSDP over all), train; rank 0's summary (None on the other ranks)."""
    import os

    from groklm.runtime import UsageError, check_device, set_threads

    check_device(cfg.device)
    try:
        cfg.check()
    except ValueError as e:
        raise UsageError(str(e)) from None
    rank, world = 0, int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: FSDP over every rank
        from groklm import parallel

        cfg.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if cfg.device == "cuda" else cfg.device
        rank = parallel.init(cfg.device)
    set_threads(threads)
    try:
        summary = train(cfg)
    finally:
        if world > 1:
            dist.destroy_process_group()
    return summary if rank == 0 else None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (see the module docstring); returns a summary."""
    cfg.check()
    rank, world = _world()
    if cfg.batch % (world * cfg.grad_accum):
        raise ValueError(f"batch {cfg.batch} does not split over {world} ranks x {cfg.grad_accum} micro-batches")
    out = Path(cfg.out)
    if cfg.resume and not (out / "state.pt").is_file():
        raise FileNotFoundError(f"{out / 'state.pt'}: nothing to resume")
    if not cfg.resume and (out / "state.pt").is_file():
        raise FileExistsError(f"{out}: holds a run already (resume it, or choose another --out)")
    out.mkdir(parents=True, exist_ok=True)
    tok_path, train_path, eval_path = _prepare(cfg, out, rank)
    import sentencepiece as spm

    vocab = spm.SentencePieceProcessor(model_file=str(tok_path)).vocab_size()
    config = cfg.model
    if cfg.train_tokenizer:
        config = config.replace(vocab_size=vocab)
    elif vocab > config.vocab_size:
        raise ValueError(f"{tok_path} has {vocab} pieces, more than the model's vocabulary of {config.vocab_size}")
    shard, held_out = TokenShard(train_path), TokenShard(eval_path)
    device = torch.device(cfg.device)
    dtype = cfg.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)

    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = init_weights(Grok(config, torch.float32), cfg.seed)
    if cfg.grad_checkpoint:
        checkpoint_layers(model)
    sharded = world > 1
    if sharded:
        model = parallelize(model, init_device_mesh(device.type, (world,), mesh_dim_names=("dp",)))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))  # fmt: skip
    schedule = cosine_schedule(optimizer, cfg.warmup, cfg.steps)
    batches = torch.Generator().manual_seed(cfg.seed)
    start = 0
    log_path = out / "log.jsonl"
    if cfg.resume:
        state = load_state(out / "state.pt")
        _load_dicts(model, optimizer, state, sharded)
        schedule.load_state_dict(state["schedule"])
        batches.set_state(state["batches"])
        start = state["step"]
    elif rank == 0:
        log_path.unlink(missing_ok=True)

    def save(step: int) -> None:
        model_sd, optim_sd = _state_dicts(model, optimizer, sharded)
        if rank == 0:
            save_state(out / "state.pt", {"model": model_sd, "optimizer": optim_sd, "schedule": schedule.state_dict(),
                                          "batches": batches.get_state(), "step": step,
                                          "config": config.to_dict()})  # fmt: skip

    def evaluate() -> float:
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad(), _autocast(device, dtype):
            for i, (x, y) in enumerate(held_out.windows(cfg.seq_len)):
                if i >= cfg.eval_windows:
                    break
                total += float(chunked_loss(model, model.hidden(x.to(device)), y.to(device)))
                n += 1
        model.train()
        return total / max(1, n)

    n_params = sum(p.numel() for p in model.parameters())
    bar = progress_bar(cfg.steps, f"training {n_params / 1e6:.1f} M parameters", cfg.progress and rank == 0,
                       unit="step", initial=start)  # fmt: skip
    micro = cfg.batch // (world * cfg.grad_accum)
    t_run = time.perf_counter()
    step, step_seconds = start, 0.0
    model.train()
    for step in range(start, cfg.steps):
        t = time.perf_counter()
        x_all, y_all = shard.batch(cfg.batch, cfg.seq_len, batches)  # the global batch, the same on every rank
        x_rank, y_rank = x_all.view(world, -1, cfg.seq_len)[rank], y_all.view(world, -1, cfg.seq_len)[rank]
        ce_sum = aux_sum = z_sum = 0.0
        for m in range(cfg.grad_accum):
            x = x_rank[m * micro : (m + 1) * micro].to(device)
            y = y_rank[m * micro : (m + 1) * micro].to(device)
            with router_losses(model) as router, _autocast(device, dtype):
                ce = chunked_loss(model, model.hidden(x), y)
            aux = torch.stack([b for b, _ in router]).sum()
            z = torch.stack([z for _, z in router]).sum()
            loss = (ce + cfg.aux_coef * aux + cfg.z_coef * z) / cfg.grad_accum
            loss.backward()
            ce_sum, aux_sum, z_sum = ce_sum + ce.item(), aux_sum + aux.item(), z_sum + z.item()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        stats = torch.tensor([ce_sum, aux_sum, z_sum], dtype=torch.float64) / cfg.grad_accum
        if sharded:
            dist.all_reduce(stats)
            stats /= world
        dt = time.perf_counter() - t
        step_seconds += dt
        record: dict[str, Any] = {"step": step + 1, "loss": round(stats[0].item(), 5),
                                  "aux_loss": round(stats[1].item() / config.num_layers, 5),
                                  "z_loss": round(stats[2].item() / config.num_layers, 4),
                                  "grad_norm": round(float(norm), 4), "lr": schedule.get_last_lr()[0],
                                  "tokens_per_s": round(cfg.batch * cfg.seq_len / dt, 1)}  # fmt: skip
        last = step + 1 == cfg.steps or step + 1 == cfg.stop_after
        late = cfg.time_limit_s is not None and time.perf_counter() - t_run > cfg.time_limit_s
        if (step + 1) % cfg.eval_every == 0 or last or late:
            record["eval_loss"] = round(evaluate(), 5)
        if rank == 0:
            log_line(log_path, record)
        bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (step + 1) % cfg.save_every == 0 or last or late:
            save(step + 1)
        if last or late:
            break
    bar.close()
    steps_done = step + 1
    model_dir = out / "model"
    model_sd, _ = _state_dicts(model, optimizer, sharded)
    summary: dict[str, Any] = {}
    if rank == 0:
        _write_model(model_sd, config, tok_path, model_dir)
        log = read_log(log_path)
        baseline = unigram_entropy(np.asarray(shard.tokens), config.vocab_size)
        plot_losses(log, out, f"training a {n_params / 1e6:.1f} M-parameter Grok", baseline)
        losses = [r["loss"] for r in log]
        evals = [r["eval_loss"] for r in log if "eval_loss" in r]
        ends = loss_ends(losses)
        summary = {"out": str(out), "model": str(model_dir), "steps": steps_done, "parameters": n_params,
                   "train_tokens": len(shard), "unigram_entropy": round(baseline, 4),
                   **ends, "eval_loss": evals[-1] if evals else None,
                   "seconds": round(time.perf_counter() - t_run, 1),
                   "tokens_per_s": round((steps_done - start) * cfg.batch * cfg.seq_len / max(1e-9, step_seconds), 1),
                   "loss_nats_per_token_vs_unigram": round(ends["last_loss"] - baseline, 4)}  # fmt: skip
    if sharded:
        dist.barrier()  # every rank leaves together: tearing the group down under a peer's pending work aborts it
    return summary


def _autocast(device: torch.device, dtype: torch.dtype) -> Any:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _write_model(state: dict[str, Tensor], config: GrokConfig, tokenizer: Path, out: Path) -> None:
    """The trained weights as a groklm checkpoint (bf16, groklm's layout) with its tokenizer."""
    from groklm.convert import save_native

    with torch.device("meta"):
        model = Grok(config, torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()}, assign=True)
    if out.exists():
        shutil.rmtree(out)
    save_native(model, out, progress=False)
    shutil.copy(tokenizer, out / "tokenizer.model")
