"""Serving a tensor/expert-parallel model under torchrun: rank 0 runs the HTTP server and the engine;
each step's model calls (`engine.Runner`: prefill a chunk, decode a batch, move KV rows) are sent to
the other ranks first, which run the same calls on their shards. Only rank 0 samples; every rank
holds the same full logits, and the workers drop theirs.

A call goes as one `broadcast_object_list` of (method, arguments): a few hundred bytes a step, next
to the model's own collectives. While the server is idle, rank 0 sends a no-op every `HEARTBEAT_S`
seconds, so that no rank waits in a collective long enough to time out.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from groklm.generate import Decode
from groklm.model import Grok
from groklm.serve.engine import Runner

HEARTBEAT_S = 60.0


def _send(call: tuple[str, tuple[Any, ...]]) -> None:
    dist.broadcast_object_list([call], src=0)


class LeaderRunner(Runner):
    """Rank 0's runner: each call is sent to the other ranks, then run here."""

    def __init__(self, model: Grok, max_batch: int, max_model_len: int, decode: Decode) -> None:
        super().__init__(model, max_batch, max_model_len, decode)
        self.sent = time.monotonic()

    def _tell(self, name: str, *args: Any) -> None:
        _send((name, args))
        self.sent = time.monotonic()

    def prefill(self, row: int, start: int, tokens: list[int], all_logits: bool, last_logits: bool
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
        self._tell("prefill", row, start, tokens, all_logits, last_logits)
        return super().prefill(row, start, tokens, all_logits, last_logits)

    def decode(self, tokens: list[int], positions: list[int]) -> torch.Tensor:
        self._tell("decode", tokens, positions)
        return super().decode(tokens, positions)

    def copy_rows(self, src: list[int], dst: list[int], slots: int) -> None:
        self._tell("copy_rows", src, dst, slots)
        super().copy_rows(src, dst, slots)

    def idle(self) -> None:
        if time.monotonic() - self.sent > HEARTBEAT_S:
            self._tell("idle")

    def close(self) -> None:
        self._tell("close")


def follow(model: Grok, max_batch: int, max_model_len: int, decode: Decode) -> None:
    """A worker rank's loop: run rank 0's calls on this rank's shard until it closes."""
    runner = Runner(model, max_batch, max_model_len, decode)
    calls = {"prefill": runner.prefill, "decode": runner.decode, "copy_rows": runner.copy_rows,
             "idle": runner.idle}  # fmt: skip
    with torch.inference_mode():
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0)
            name, args = box[0]
            if name == "close":
                return
            calls[name](*args)
