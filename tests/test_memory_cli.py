"""Loading peaks at about the model's size; the CLI works as the README says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import groklm
from groklm.config import get_preset
from groklm.tokenizer import Tokenizer
from tests.conftest import TOKENIZER

# A generated checkpoint of about 1 GB: 512 MiB fp32 embedding and ~490 MiB of int8 experts.
GIB_CONFIG = get_preset("mini").replace(
    emb_size=1024, num_q_heads=8, num_kv_heads=2, key_size=128, num_layers=7, widening_factor=4.0
)

_MEASURE = r"""
import json, sys, torch
import groklm
from tests.conftest import status_bytes, peak_rss_since_reset, reset_peak_rss
imports_peak = status_bytes("VmHWM")
before = reset_peak_rss()
model = groklm.load(sys.argv[1], dtype=torch.bfloat16, progress=False)
peak = max(imports_peak, peak_rss_since_reset())
model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"before": before, "peak": peak, "model_bytes": model_bytes}))
"""


def test_loading_a_1gb_checkpoint_peaks_under_1_25x_its_size(tmp_path: Path) -> None:
    ckpt = groklm.write_random_checkpoint(tmp_path, GIB_CONFIG, seed=0, progress=False)
    size = sum(f.stat().st_size for f in ckpt.iterdir())
    assert 0.9e9 < size < 1.2e9
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    m = json.loads(out.stdout)
    assert m["peak"] < 1.25 * size, m
    # And what loading itself adds is the model plus bounded chunks (64 MiB each), no second copy.
    assert m["peak"] - m["before"] < m["model_bytes"] + 160 * 2**20, m


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "groklm.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_init_random_generate_info(tmp_path: Path) -> None:
    out = tmp_path / "mini"
    r = _cli("init-random", "--preset", "mini", "--tokenizer", str(TOKENIZER), "--quiet", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "ckpt-0" / "tensor00049_000").is_file() and (out / "tokenizer.model").is_file()

    r = _cli("generate", "--checkpoint", str(out), "--prompt-ids", "422,3033,356", "--max-new-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    model = groklm.load(out, progress=False)
    want = groklm.generate(model, [[422, 3033, 356]], max_new_tokens=8)[0]
    assert result["token_ids"] == want and result["usage"]["completion_tokens"] == len(want)
    assert result["finish_reason"] == "length" and result["timing"]["decode_tokens_per_s"] > 0
    # With the tokenizer beside the checkpoint, --prompt-ids prints text: the decoded prompt and new tokens,
    # and --json holds the same new text.
    r = _cli("generate", "--checkpoint", str(out), "--prompt-ids", "422,3033,356", "--max-new-tokens", "8", "--quiet")
    assert r.returncode == 0 and r.stdout.startswith("The answer to"), r.stdout
    assert result["text"] and r.stdout == Tokenizer(TOKENIZER).decode([422, 3033, 356]) + result["text"] + "\n"

    r = _cli("generate", "--checkpoint", str(out), "The answer to life", "--max-new-tokens", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("The answer to life") and len(r.stdout.strip()) > len("The answer to life")

    r = _cli("info", "--checkpoint", str(out), "--json")
    info = json.loads(r.stdout)
    assert info["config"]["emb_size"] == 256 and info["license"].startswith("Apache-2.0")
    r = _cli("info", "--preset", "grok-1", "--json")
    info = json.loads(r.stdout)
    assert round(info["parameters_total"] / 1e9) == 316 and round(info["parameters_active_per_token"] / 1e9) == 84


def test_cli_stop_string(mini_ckpt: Path) -> None:
    base = [
        "generate",
        "--checkpoint",
        str(mini_ckpt),
        "--tokenizer",
        str(TOKENIZER),
        "Hello",
        "--max-new-tokens",
        "12",
        "--quiet",
    ]
    full = _cli(*base).stdout.rstrip("\n")[len("Hello") :]
    stop = full[3:6]
    assert stop.strip(), full
    r = _cli(*base, "--stop", stop)
    assert r.stdout.rstrip("\n") == "Hello" + full[: full.index(stop)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--checkpoint", "/nonexistent", "--prompt-ids", "1"], "no such checkpoint"),
        (["info", "--checkpoint", "/nonexistent"], "no such checkpoint"),
    ],
)
def test_cli_errors_are_clear(args: list[str], message: str) -> None:
    r = _cli(*args)
    assert r.returncode == 1 and message in r.stderr and "Traceback" not in r.stderr


def test_decode_rate_leaves_out_the_prefill_and_the_compile() -> None:
    from groklm.run import decode_timing

    # Tokens at 2 s (prefill), 32 s (the first decode step), then one every 0.1 s: 20 tokens in all.
    at = [2.0, 32.0, *(32.0 + 0.1 * i for i in range(1, 19))]
    total = at[-1]
    rate, compile_s = decode_timing(at, total, compiled=True)
    assert compile_s == pytest.approx(30.0) and rate == pytest.approx(10.0)
    rate, compile_s = decode_timing(at, total, compiled=False)  # eager: the second step is a decode step
    assert compile_s is None and rate == pytest.approx(19 / 31.8)
    assert decode_timing([2.0, 32.0], 32.0, compiled=True) == (None, pytest.approx(30.0))
    assert decode_timing([2.0], 2.0, compiled=False) == (None, None)
