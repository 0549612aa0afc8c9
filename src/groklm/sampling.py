"""The logit processors beside temperature, top-p and top-k: presence, frequency and repetition
penalties, `logit_bias`, and `min_p`, each a row's own setting, applied to a batch's logits at once.

Semantics are vLLM's (OpenAI's for presence, frequency and `logit_bias`): the bias is added first,
then the repetition penalty divides the positive and multiplies the negative logits of every token
seen in the prompt or the output, then frequency (times each output token's count) and presence
(once per token output) are subtracted. `min_p` keeps, after temperature, the tokens whose
probability is at least `min_p` times the top one's. Rows at the defaults are left untouched, bit
for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Penalties:
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), one entry per token

    @property
    def active(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)  # fmt: skip


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def check_penalties(p: Penalties, min_p: float, vocab_size: int) -> None:
    """Raise ValueError, its message starting with the setting's name, for what is out of range."""
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2.0 <= _number(name, getattr(p, name)) <= 2.0:
            raise ValueError(f"{name} must be in -2..2, not {getattr(p, name)}")
    if _number("repetition_penalty", p.repetition_penalty) <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 is off), not {p.repetition_penalty}")
    if not 0.0 <= _number("min_p", min_p) <= 1.0:
        raise ValueError(f"min_p must be in 0..1 (0 is off), not {min_p}")
    seen: set[int] = set()
    for token, bias in p.logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise ValueError(f"logit_bias: token id {token!r} is outside the vocabulary (0..{vocab_size - 1})")
        if token in seen:
            raise ValueError(f"logit_bias: token id {token} is given twice")
        seen.add(token)
        if not -100.0 <= _number("logit_bias", bias) <= 100.0:
            raise ValueError(f"logit_bias: the bias of token {token} must be in -100..100, not {bias}")


def parse_logit_bias(bias: Mapping[str, float] | str | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} or the command line's "ID=BIAS,ID=BIAS" -> ((id, bias), ...);
    ValueError naming `logit_bias` for a key that is not a token id."""
    if not bias:
        return ()
    if isinstance(bias, str):
        items: list[tuple[str, object]] = []
        for part in bias.split(","):
            key, eq, value = part.partition("=")
            try:
                items.append((key, float(value)))
            except ValueError:
                raise ValueError(f"logit_bias: {part.strip()!r} is not ID=BIAS (e.g. 1000=-100)") from None
            if not eq:
                raise ValueError(f"logit_bias: {part.strip()!r} is not ID=BIAS (e.g. 1000=-100)")
    else:
        items = list(bias.items())
    out = []
    for key, value in items:
        key = key.strip()
        if not key.isdigit() or not key.isascii():
            raise ValueError(f"logit_bias: key {key!r} is not a token id (a non-negative integer)")
        out.append((int(key), _number("logit_bias", value)))
    return tuple(out)


def apply_penalties(
    logits: Tensor, settings: Sequence[Penalties], prompts: Sequence[Sequence[int]], outputs: Sequence[Sequence[int]]
) -> Tensor:
    """logits [B, V] fp32 -> the same with each row's bias and penalties applied (a new tensor when
    any row has them; rows without them are left as they are). `prompts` and `outputs`: each row's
    prompt and the tokens it has generated so far."""
    active = [i for i, s in enumerate(settings) if s.active]
    if not active:
        return logits
    device, vocab = logits.device, logits.shape[-1]
    index = torch.tensor(active, device=device)
    sub = logits[index]  # [A, V], a copy
    n = len(active)

    bias = [(r, t, b) for r, i in enumerate(active) for t, b in settings[i].logit_bias]
    if bias:
        rows, ids, values = zip(*bias, strict=True)
        sub.index_put_((torch.tensor(rows, device=device), torch.tensor(ids, device=device)),
                       torch.tensor(values, device=device), accumulate=True)  # fmt: skip

    def column(name: str) -> Tensor:
        return torch.tensor([getattr(settings[i], name) for i in active], device=device)[:, None]

    out_rows = [r for r, i in enumerate(active) for _ in outputs[i]]
    counts = torch.zeros(n, vocab, device=device)
    if out_rows:
        out_ids = torch.tensor([t for i in active for t in outputs[i]], device=device)
        counts.index_put_((torch.tensor(out_rows, device=device), out_ids), torch.ones(len(out_rows), device=device),
                          accumulate=True)  # fmt: skip
    repeat = [r for r, i in enumerate(active) if settings[i].repetition_penalty != 1.0]
    if repeat:
        seen = counts > 0
        rows = [r for r in repeat for _ in prompts[active[r]]]
        ids = [t for r in repeat for t in prompts[active[r]]]
        seen[torch.tensor(rows, device=device), torch.tensor(ids, device=device)] = True
        penalty = column("repetition_penalty")
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    sub = sub - column("frequency_penalty") * counts - column("presence_penalty") * (counts > 0)
    out = logits.clone()
    out[index] = sub
    return out


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Keep the tokens whose probability is at least min_p times the top one's (logits already divided
    by the temperature): p_i >= min_p * p_max exactly when l_i >= l_max + log(min_p)."""
    if min_p <= 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))
