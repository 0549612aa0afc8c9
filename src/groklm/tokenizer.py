"""The Grok-1 SentencePiece tokenizer (`tokenizer.model`, shipped with the checkpoint)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm


class AnyTokenizer(Protocol):
    """What generation and the server need of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...
    @property
    def eos_id(self) -> int: ...
    def encode(self, text: str, plain: Sequence[tuple[int, int]] = ()) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...


Spans = Sequence[tuple[int, int]]  # [start, end) character offsets


def _special_pattern(specials: Sequence[str]) -> re.Pattern[str]:
    return re.compile("|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) or "(?!)")


def _untrusted(text: str, pattern: re.Pattern[str], plain: Spans) -> list[re.Match[str]]:
    """The special-token strings in `text`, leftmost first, that overlap a span of `plain`."""
    return [m for m in pattern.finditer(text) if any(s < m.end() and m.start() < e for s, e in plain)]


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.model there")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        # The user-defined pieces SentencePiece matches anywhere in text (`<|separator|>`, `<|mask|>`,
        # `<|controlN|>`); its control pieces ([BOS], [EOS]) never come from text.
        pieces = {str(self.sp.id_to_piece(i)): i for i in range(int(self.sp.get_piece_size()))}
        self.specials = {p: i for p, i in pieces.items() if re.fullmatch(r"<\|[^|\s]+\|>", p)
                         and not self.sp.is_control(i) and not self.sp.is_unknown(i)}  # fmt: skip
        self.special_pattern = _special_pattern(list(self.specials))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str, plain: Spans = ()) -> list[int]:
        """No BOS is added: the reference does not add one. Special-token strings overlapping a span of
        `plain` (a client's text in a chat prompt) become the plain characters they are, never the special
        piece. (SentencePiece matches its special pieces as atoms: each one there is swapped for one
        chosen marker piece, which segments its neighbours exactly as the original would, and each marker
        id is then swapped for the characters' ids.)"""
        hits = _untrusted(text, self.special_pattern, plain) if plain else []
        if not hits:
            return list(self.sp.encode(text))
        marker = "<|separator|>" if "<|separator|>" in self.specials else next(iter(self.specials))
        marked, swaps, at = [], [], 0  # swaps: per marker in the marked text, the surface it stands for (or None)
        for m in hits:
            marked += [text[at : m.start()], marker]
            swaps += [None] * text.count(marker, at, m.start()) + [m.group()]
            at = m.end()
        marked.append(text[at:])
        swaps += [None] * text.count(marker, at)
        out: list[int] = []
        pending = iter(swaps)
        for t in self.sp.encode("".join(marked)):
            surface = next(pending, None) if t == self.specials[marker] else None
            out += [t] if surface is None else self._plain(surface)
        return out

    def _plain(self, text: str) -> list[int]:
        """Ids of `text` one character at a time (a byte piece where no plain piece has it)."""
        out = []
        for c in text:
            t = int(self.sp.piece_to_id(c))
            if t == self.sp.unk_id() or c in self.specials:
                out += [int(self.sp.piece_to_id(f"<0x{b:02X}>")) for b in c.encode()]
            else:
                out.append(t)
        return out

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids))

    def token_bytes(self, token: int) -> bytes:
        """One token's own bytes, for logprobs: a byte piece's byte, a word piece with its space, a
        control piece's name ("[EOS]")."""
        piece = str(self.sp.id_to_piece(token))
        if self.sp.is_byte(token):
            return bytes([int(piece[3:5], 16)])
        if self.sp.is_control(token) or self.sp.is_unknown(token):
            return piece.encode()
        return piece.replace("\u2581", " ").encode()


# Grok-2's split pattern (SGLang's PAT_STR_B, selected by "word_split": "V1"; single digits split).
PAT_STR_B = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""


class TiktokenTokenizer:
    """Grok-2's `tokenizer.tok.json`, read into a tiktoken Encoding as SGLang builds it: the regular
    tokens as BPE ranks, the special ones by name, the split pattern the file names (`pat_str`, or
    PAT_STR_B for "word_split": "V1"). Encoding allows the file's special tokens in the text (the
    chat template's `<|separator|>`), as SGLang's patched encode does; no BOS is added."""

    def __init__(self, path: str | Path) -> None:
        import json

        import tiktoken

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.tok.json there")
        try:
            data = json.loads(self.path.read_text())
            ranks = {bytes(t["bytes"]): int(t["token"]) for t in data["regular_tokens"]}
            specials = {bytes(t["bytes"]).decode(): int(t["token"]) for t in data.get("special_tokens", [])}
            split = data.get("pat_str") or {"V1": PAT_STR_B}[data["word_split"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{self.path}: not a Grok-2 tokenizer.tok.json ({type(e).__name__}: {e})") from None
        self.specials = specials
        self.special_pattern = _special_pattern(list(specials))
        self.known = frozenset(ranks.values()) | frozenset(specials.values())
        self.enc = tiktoken.Encoding(
            self.path.name, pat_str=split, mergeable_ranks=ranks, special_tokens=specials,
            explicit_n_vocab=data.get("vocab_size"),
        )  # fmt: skip

    @property
    def vocab_size(self) -> int:
        return int(self.enc.n_vocab)

    @property
    def eos_id(self) -> int:
        return self.specials.get("<|eos|>", 2)

    def encode(self, text: str, plain: Spans = ()) -> list[int]:
        """Special-token strings overlapping a span of `plain` (a client's text in a chat prompt) are
        encoded as plain text; tiktoken encodes the text between two special tokens on its own, so the
        other tokens are the ones a plain encode gives."""
        hits = {m.start() for m in _untrusted(text, self.special_pattern, plain)} if plain else set()
        if not hits:
            return list(self.enc.encode(text, allowed_special=set(self.specials), disallowed_special=()))
        out, at = [], 0
        for m in self.special_pattern.finditer(text):
            if m.start() not in hits:
                out += [*self.enc.encode_ordinary(text[at : m.start()]), self.specials[m.group()]]
                at = m.end()
        return out + self.enc.encode_ordinary(text[at:])

    def decode(self, ids: list[int]) -> str:
        """The text of these ids; ids the file does not define (a model's vocabulary may be larger than
        its tokenizer's, as in the golden case) decode to nothing."""
        return str(self.enc.decode([t for t in ids if t in self.known]))

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.enc.decode_single_token_bytes(token)) if token in self.known else b""


def find_tokenizer(checkpoint: str | Path | None, explicit: str | Path | None = None) -> Tokenizer | TiktokenTokenizer:
    """An explicit path (tokenizer.model or tokenizer.tok.json), else `tokenizer.model` (Grok-1) or
    `tokenizer.tok.json` (Grok-2) in the checkpoint directory, its ckpt-0/ or its parent."""
    if explicit is not None:
        return TiktokenTokenizer(explicit) if str(explicit).endswith(".json") else Tokenizer(explicit)
    if checkpoint is not None:
        root = Path(checkpoint)
        for directory in (root, root / "ckpt-0", root.parent):
            if (directory / "tokenizer.model").is_file():
                return Tokenizer(directory / "tokenizer.model")
            if (directory / "tokenizer.tok.json").is_file():
                return TiktokenTokenizer(directory / "tokenizer.tok.json")
    raise FileNotFoundError(
        f"no tokenizer.model (or tokenizer.tok.json) found in or next to {checkpoint}; give its path (it comes with "
        "the checkpoint download)"
    )


class TextStream:
    """The text of a stream of new token ids, as it becomes final, and stop strings in it.

    Decoding token by token is wrong for SentencePiece (a piece's leading space is dropped at the
    start of a decode) and for byte-level pieces (a character may span tokens), and decoding the
    whole list each time costs O(n) a token. So each step decodes a short window that starts a few
    tokens back (the prompt's last ones at first) and emits what the new token added, once it is
    not a partial character (vLLM's incremental detokenization). Text that could still grow into
    a stop string is held back; at a stop string the text ends before it and `stopped` is set.
    """

    WINDOW = 5

    def __init__(self, tokenizer: AnyTokenizer, prompt_ids: Sequence[int] = (), stop: Sequence[str] = ()) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.ids = list(prompt_ids[-self.WINDOW :])
        self.prefix = 0  # the window starts here in self.ids
        self.read = len(self.ids)  # what lies before this has been emitted (or held)
        self.text = ""  # all final text so far, held-back tail included
        self.sent = 0  # how much of self.text has been handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Take one new token; return the text that is now final (may be "")."""
        if self.stopped:
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, held-back text and an unfinished character included (at the end of a stream)."""
        if not self.stopped and self.read < len(self.ids):
            before = self.tokenizer.decode(self.ids[self.prefix : self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix :])[len(before) :]
            self.read = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            final = True
        safe = len(self.text)
        if not final:  # hold back a tail that is the start of a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        out = self.text[self.sent : safe]
        self.sent = max(self.sent, safe)
        return out
