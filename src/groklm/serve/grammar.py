"""Structured outputs: grammars compiled by llguidance, one matcher per sequence, its token mask applied
to that sequence's row of logits inside the engine's batched step (so constrained and free rows share
steps).

llguidance over xgrammar (measured on Grok-1's 131072-piece vocabulary and on a tiktoken one of the
same size; the README gives the figures): masks cost the same few microseconds a token, but llguidance
compiles a JSON schema in under a millisecond where xgrammar takes tens, and it installs as one 8 MB
wheel with no dependencies where xgrammar imports transformers (about 190 MB more).

JSON is compact (`, ` and `: ` between items, no other whitespace), so a complete document ends the
grammar: only EOS is allowed next, and a model that would never choose EOS (random weights) still stops.
"""

from __future__ import annotations

import copy
import json
import threading
from typing import Any

import llguidance as llg
import numpy as np
import torch
from torch import Tensor

from groklm.tokenizer import AnyTokenizer, TiktokenTokenizer

# Compact JSON, as json.dumps writes it: no free whitespace that a model could repeat forever.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A grammar, schema or regex the engine cannot compile; the message names the request field."""


def json_schema_grammar(schema: Any, param: str) -> str:
    """llguidance's grammar for documents valid against `schema` (True or {} for any JSON object)."""
    if schema is True or schema == {}:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"{param}: a JSON schema must be an object, not {type(schema).__name__}")
    try:
        return str(llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), overrides=JSON_OPTIONS))  # type: ignore[arg-type]
    except (ValueError, TypeError) as e:
        raise GrammarError(f"{param}: {e}") from None
    except RecursionError:
        raise GrammarError(f"{param}: nested too deeply") from None


def compact_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's compact-JSON options, for a schema embedded in a Lark grammar."""
    out = copy.deepcopy(schema)
    out["x-guidance"] = {**out.get("x-guidance", {}), **JSON_OPTIONS}
    return out


def regex_grammar(pattern: str) -> str:
    return str(llg.grammar_from("regex", pattern))


def choice_grammar(choices: list[str], param: str) -> str:
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError(f"{param}: give a non-empty list of non-empty strings")
    return str(llg.grammar_from("choice", json.dumps(choices)))


def lark_grammar(text: str, param: str) -> str:
    """A Lark grammar (llguidance's dialect) or a llama.cpp GBNF one, as vLLM's `grammar` takes."""
    try:
        return str(llg.grammar_from("grammar", text))
    except ValueError as e:
        raise GrammarError(f"{param}: {e}") from None


class Vocabulary:
    """A tokenizer as llguidance sees it: every id's bytes, control pieces marked special, EOS the model's."""

    def __init__(self, tokenizer: AnyTokenizer, vocab_size: int, eos: int) -> None:
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        if isinstance(tokenizer, TiktokenTokenizer):
            enc = tokenizer.enc
            self.ll = llg.LLTokenizer.from_tiktoken(  # type: ignore[attr-defined]
                encoder=enc._mergeable_ranks, special_tokens=enc._special_tokens, pattern=enc._pat_str,
                eos_token=eos, n_vocab=vocab_size,
            )  # fmt: skip
        else:
            self.ll = llg.LLTokenizer(llg.TokenizerWrapper(_SentencePiece(tokenizer, vocab_size, eos)))


class _SentencePiece:
    """What llguidance's TokenizerWrapper reads of a SentencePiece tokenizer."""

    def __init__(self, tok: Any, vocab_size: int, eos: int) -> None:
        self.tok, self.eos_token_id, self.bos_token_id = tok, eos, None
        sp, n = tok.sp, tok.vocab_size
        self.special_token_ids = [t for t in range(n) if sp.is_control(t) or sp.is_unknown(t)]
        special = set(self.special_token_ids)
        # llguidance marks a special token by a leading 0xff byte; ids past the tokenizer's are never allowed.
        self.tokens = [b"\xff" + tok.token_bytes(t) if t in special else tok.token_bytes(t) for t in range(n)]
        self.tokens += [b""] * (vocab_size - n)
        self.byte_ids = [int(sp.piece_to_id(f"<0x{b:02X}>")) for b in range(256)]

    def __call__(self, text: str | bytes) -> list[int]:
        # SentencePiece puts a space before the text ("dummy prefix"): encode it after a newline, drop the
        # pieces of " \n", and spell out in byte pieces what a piece straddling them adds.
        text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
        ids, head = self.tok.encode("\n" + text), b""
        for i, t in enumerate(ids):
            head += self.tok.token_bytes(t)
            if len(head) >= 2:
                return [self.byte_ids[b] for b in head[2:]] + ids[i + 1 :]
        return []


class Grammar:
    """A compiled, checked grammar: `start()` gives each sequence its own matcher (a cheap copy)."""

    def __init__(self, vocab: Vocabulary, grammar: str, param: str) -> None:
        self.vocab, self.param = vocab, param
        self._proto = llg.LLMatcher(vocab.ll, grammar, log_level=0)
        if self._proto.is_error():
            raise GrammarError(f"{param}: {_first_line(self._proto.get_error())}")

    def start(self) -> Matcher:
        return Matcher(self._proto.deep_copy(), self.vocab)


class Matcher:
    """One sequence's place in its grammar (used by the engine's thread only)."""

    def __init__(self, matcher: Any, vocab: Vocabulary) -> None:
        self.m, self.vocab = matcher, vocab
        self.bitmask = np.empty(vocab.words, dtype=np.int32)

    def mask(self, logits: Tensor) -> Tensor:
        """These logits [V] with every token the grammar forbids next at -inf (a new tensor)."""
        self.m.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        if self.m.is_error() or not self.bitmask.any():
            return logits  # no token would do (an all -inf row cannot be sampled): the row ends with the error
        # In numpy, one thread (bit j of word i is token 32 i + j): torch splits a 131072-wide op over its
        # threads, which costs milliseconds when they are contended.
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: logits.shape[-1]].view(np.bool_)
        if logits.device.type == "cpu":
            return torch.from_numpy(np.where(allowed, logits.float().numpy(), np.float32(-np.inf)))
        return torch.where(torch.from_numpy(allowed).to(logits.device), logits, float("-inf"))

    def accept(self, token: int) -> None:
        self.m.consume_token(token)

    @property
    def done(self) -> bool:
        """The grammar is complete: EOS was taken, or nothing but EOS may follow."""
        return bool(self.m.is_stopped())

    @property
    def error(self) -> str | None:
        return _first_line(self.m.get_error()) if self.m.is_error() else None


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "grammar error"


class Grammars:
    """The server's grammar compiler: the vocabulary built once (about half a second), on first use."""

    def __init__(self, tokenizer: AnyTokenizer | None, vocab_size: int, eos: int) -> None:
        self.tokenizer, self.vocab_size, self.eos = tokenizer, vocab_size, eos
        self._vocab: Vocabulary | None = None
        self._lock = threading.Lock()

    def compile(self, grammar: str, param: str) -> Grammar:
        """Raises GrammarError naming `param`. Blocking (up to a second for a huge grammar): call it off the
        event loop."""
        if self.tokenizer is None:
            raise GrammarError(f"{param}: structured outputs need a tokenizer, and this server has none")
        with self._lock:
            if self._vocab is None:
                self._vocab = Vocabulary(self.tokenizer, self.vocab_size, self.eos)
        return Grammar(self._vocab, grammar, param)
