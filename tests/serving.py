"""Starting and stopping `groklm serve` processes for the tests, every wait bounded; the fixtures the
server tests share (a pytest plugin of conftest's)."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch

import groklm
from groklm.tokenizer import Tokenizer
from tests.conftest import TOKENIZER

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mini"


@dataclass
class Served:
    url: str
    process: subprocess.Popen[str]
    stderr: list[str] = field(default_factory=list)

    def metric(self, name: str, labels: str = "") -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        pattern = re.escape(name + (("{" + labels + "}") if labels else "")) + r" ([0-9.e+-]+)"
        m = re.search(r"^" + pattern + r"$", text, re.M)
        return float(m.group(1)) if m else 0.0


@contextlib.contextmanager
def serve(checkpoint: Path, *args: str, startup_timeout: float = 180, launcher: list[str] | None = None
          ) -> Iterator[Served]:  # fmt: skip
    """`groklm serve --port 0` on 127.0.0.1 (run by `launcher`, e.g. torchrun); yields once it prints its
    URL; stopped (SIGTERM, then SIGKILL after 30 s) on exit."""
    cmd = [*(launcher or [sys.executable, "-m", "groklm"]), "serve", "--checkpoint", str(checkpoint), "--port", "0",
           "--quiet", *args]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    served = Served("", proc)
    threading.Thread(target=lambda: served.stderr.extend(proc.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + startup_timeout
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the server exited: {''.join(served.stderr)[-3000:]}")
            m = re.search(r"at (http://[\d.]+:\d+)", line)
            if m:
                served.url = m.group(1)
                break
        else:
            raise AssertionError("the server did not start in time")
        yield served
    finally:
        stop(proc)


def stop(proc: subprocess.Popen[str], timeout: float = 30) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def streaming(s: Served, max_tokens: int) -> tuple[threading.Thread, list[str]]:
    """A streamed completion read on a thread, its SSE lines gathered, returned once the server has
    generated 5 tokens (waiting at most 60 s)."""
    got: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{s.url}/v1/completions", timeout=120,
                          json={"prompt": "Once", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
            got.extend(line for line in r.iter_lines() if line)

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 60
    while s.metric("groklm_generation_tokens_total") < 5 and time.monotonic() < deadline:
        time.sleep(0.02)
    return reader, got


def finished_by_length(got: list[str]) -> bool:
    """Whether a stream's SSE lines end in [DONE] after a last choice finished by its length."""
    finishes = [json.loads(line[6:])["choices"][0]["finish_reason"] for line in got[:-1] if '"choices": [{' in line]
    return got[-1] == "data: [DONE]" and finishes[-1] == "length"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, mini_ckpt: Path) -> Path:
    """The mini checkpoint under the name the server reports, with its tokenizer beside it."""
    out = tmp_path_factory.mktemp("served") / MODEL
    out.symlink_to(mini_ckpt)
    return out


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def reference(mini_ckpt: Path) -> groklm.Grok:
    return groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
