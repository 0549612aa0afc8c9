"""The logprobs objects of OpenAI's two APIs: the completions API's lists (`Logprobs`, built token by token)
and the chat API's entries (`chat_logprob`). A token is shown as its text, its bytes decoded (replacing an
incomplete UTF-8 sequence), or as its id where the server has no tokenizer."""

from __future__ import annotations

from typing import Any


def token_text(tokenizer: Any, token: int) -> str:
    if tokenizer is None:
        return str(token)
    return str(tokenizer.token_bytes(token).decode("utf-8", errors="replace"))


class Logprobs:
    """The completions API's logprobs object, built token by token."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []
        self.offset = 0

    def add(self, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        text = token_text(self.tokenizer, token)
        self.tokens.append(text)
        self.token_logprobs.append(logprob)
        self.top_logprobs.append(None if top is None else {token_text(self.tokenizer, t): lp for t, lp in top})
        self.text_offset.append(self.offset)
        self.offset += len(text)

    def body(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top_logprobs,
                "text_offset": self.text_offset}  # fmt: skip


def chat_logprob(tokenizer: Any, token: int, logprob: float | None, top: list[tuple[int, float]] | None
                 ) -> dict[str, Any]:  # fmt: skip
    """One entry of the chat API's logprobs content: the token, its logprob and bytes, and its top alternatives."""

    def entry(t: int, lp: float | None) -> dict[str, Any]:
        raw = tokenizer.token_bytes(t) if tokenizer else str(t).encode()
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw)}

    return {**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in top or []]}
