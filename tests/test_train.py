"""Training from scratch: the loss falls well below what context-free prediction can reach, a stopped
run resumes bit for bit, FSDP over two gloo processes follows the single process, the router losses
are what they claim, and the command line trains a model `generate` loads."""

from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from groklm.config import get_preset
from groklm.model import Grok
from groklm.train.common import CheckpointedBlock, checkpoint_layers, loss_fn
from groklm.train.pretrain import TrainConfig, router_losses, train

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
DATA = [str(STDLIB / name) for name in ("argparse.py", "textwrap.py", "string.py", "fnmatch.py")]
SMALL = get_preset("tiny").replace(emb_size=128, num_q_heads=4, num_kv_heads=2, key_size=32, num_layers=2,
                                   embedding_multiplier_scale=128**0.5, attn_output_multiplier=32**-0.5)  # fmt: skip


def _cfg(out: Path, **kw: Any) -> TrainConfig:
    args: dict[str, Any] = {"train_tokenizer": 512, "steps": 16, "batch": 8, "seq_len": 64, "lr": 3e-3, "warmup": 4,
                            "eval_every": 8, "save_every": 8, "progress": False, "max_tokens": 60_000} | kw  # fmt: skip
    return TrainConfig(SMALL, DATA, str(out), **args)


def _losses(out: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


def test_router_losses_are_the_stated_formulas() -> None:
    model = Grok(SMALL.replace(vocab_size=512), torch.float32)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.moe.router.weight)  # uniform probabilities: balanced whatever is picked
    with router_losses(model) as got:
        model.hidden(torch.randint(4, 500, (2, 16)))
    assert len(got) == SMALL.num_layers
    for balance, z in got:
        torch.testing.assert_close(balance, torch.tensor(1.0))  # E x sum f_e / E = 1
        torch.testing.assert_close(z, torch.tensor(torch.log(torch.tensor(8.0)).item() ** 2))  # logsumexp(0) = log E


def test_checkpointed_layers_give_the_same_loss_and_gradients() -> None:
    """Gradient checkpointing swaps in new layer modules holding the same parameters (state-dict names
    unchanged); the loss and every gradient are those of the plain model."""
    torch.manual_seed(0)
    plain = Grok(SMALL.replace(vocab_size=512), torch.float32)
    checked = checkpoint_layers(copy.deepcopy(plain))
    assert all(type(layer) is CheckpointedBlock for layer in checked.layers)
    assert checked.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(4, 500, (2, 16))
    grads = []
    for model in (plain, checked):
        loss_fn(model(tokens[:, :-1]), tokens[:, 1:]).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=0, atol=0, msg=name)


def test_loss_falls_well_below_the_unigram_entropy(tmp_path: Path) -> None:
    summary = train(_cfg(tmp_path / "run", steps=60, warmup=6, eval_every=30, save_every=60))
    # measured: 6.1 (first 10 steps) -> 3.1 (last 10) against a unigram entropy of 5.1 nats
    assert summary["last_loss"] < summary["unigram_entropy"] - 1.0, summary
    assert summary["eval_loss"] < summary["unigram_entropy"], summary
    assert (tmp_path / "run" / "loss.png").stat().st_size > 5000


def test_a_stopped_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    train(_cfg(tmp_path / "whole"))
    train(_cfg(tmp_path / "split", stop_after=9))
    assert len(_losses(tmp_path / "split")) == 9
    train(_cfg(tmp_path / "split", resume=True))
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")
    with pytest.raises(FileExistsError, match="holds a run already"):
        train(_cfg(tmp_path / "whole"))


def _fsdp_rank(rank: int, world: int, port: int, out: str) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    train(_cfg(Path(out), steps=12, aux_coef=0.0))
    torch.distributed.destroy_process_group()


def test_fsdp_over_two_processes_follows_one(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs
    one = tmp_path / "one"
    try:
        train(_cfg(one, steps=12, aux_coef=0.0))
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.start_processes(_fsdp_rank, args=(2, port, str(two)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(max(0.0, deadline - time.monotonic())):
        assert time.monotonic() < deadline, "the FSDP ranks did not finish"
    a, b = _losses(one), _losses(two)
    assert len(a) == len(b) == 12
    # The same global batches; the gradients summed in another order (reduce-scatter): measured max
    # |Δ| 1e-5 over 12 steps (the log rounds to 5 decimals).
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-3, (a, b)


def test_train_command_makes_a_model_generate_loads(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "groklm", "train", "--preset", "tiny", "--data", *DATA[:2],
                        "--train-tokenizer", "512", "--out", str(out), "--steps", "6", "--batch", "4", "--seq-len", "64",
                        "--warmup", "2", "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["steps"] == 6 and (out / "model" / "tokenizer.model").is_file()
    g = subprocess.run([sys.executable, "-m", "groklm", "generate", "--checkpoint", str(out / "model"), "def ",
                        "--max-new-tokens", "8", "--json", "--quiet"], capture_output=True, text=True, cwd=ROOT,
                       timeout=300)  # fmt: skip
    assert g.returncode == 0, g.stderr
    assert len(json.loads(g.stdout)["token_ids"]) == 8
    bad = subprocess.run([sys.executable, "-m", "groklm", "train", "--preset", "tiny", "--data", DATA[0], "--out",
                          str(tmp_path / "x"), "--train-tokenizer", "100"], capture_output=True, text=True, cwd=ROOT,
                         timeout=60)  # fmt: skip
    assert bad.returncode == 2 and "257..131072 pieces" in bad.stderr
