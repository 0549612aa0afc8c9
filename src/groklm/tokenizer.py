"""The Grok-1 SentencePiece tokenizer (`tokenizer.model`, shipped with the checkpoint)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import sentencepiece as spm

from groklm.files import CheckpointError, read_json

MAX_TOKENIZER = 64 << 20  # bytes: Grok-1's tokenizer.model is 2 MB
MAX_PIECES = 1 << 24  # as many as a config's vocabulary may hold


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
        size = self.path.stat().st_size
        if size > MAX_TOKENIZER:
            raise ValueError(f"{self.path}: {size} bytes, more than the {MAX_TOKENIZER} allowed for a tokenizer")
        try:  # SentencePiece checks its model itself (pieces, byte pieces, unk), raising RuntimeError
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{self.path}: not a SentencePiece model ({str(e).strip()[:200]})") from None
        if not 0 < self.sp.get_piece_size() <= MAX_PIECES:
            raise ValueError(f"{self.path}: {self.sp.get_piece_size()} pieces, not in 1..{MAX_PIECES}")
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
        import tiktoken

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.tok.json there")
        try:
            data = read_json(self.path, MAX_TOKENIZER, kind=dict)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        ranks, specials, split, vocab = _tok_json(data, str(self.path))
        self.specials = specials
        self.special_pattern = _special_pattern(list(specials))
        self.known = frozenset(ranks.values()) | frozenset(specials.values())
        try:
            self.enc = tiktoken.Encoding(self.path.name, pat_str=split, mergeable_ranks=ranks,
                                         special_tokens=specials, explicit_n_vocab=vocab)  # fmt: skip
        except (ValueError, AssertionError) as e:
            raise ValueError(f"{self.path}: tiktoken refuses it ({type(e).__name__}: {str(e)[:200]})") from None

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


def _tok_json(data: dict[str, Any], where: str) -> tuple[dict[bytes, int], dict[str, int], str, int | None]:
    """(ranks, special tokens, split pattern, vocab_size) of a tokenizer.tok.json, every value checked as
    tiktoken needs it (it aborts the process, or panics, on a byte over 255, a rank over 2^32, or text
    with a byte that no rank covers)."""

    def tokens(key: str) -> dict[bytes, int]:
        items = data.get(key, [] if key == "special_tokens" else None)
        if not isinstance(items, list) or len(items) > MAX_PIECES:
            raise ValueError(f"{where}: {key} must be a list of at most {MAX_PIECES} tokens")
        out: dict[bytes, int] = {}
        for i, t in enumerate(items):
            b, rank = t.get("bytes") if isinstance(t, dict) else None, t.get("token") if isinstance(t, dict) else None
            if not isinstance(b, list) or not b or any(type(x) is not int or not 0 <= x <= 255 for x in b):
                raise ValueError(f"{where}: {key}[{i}]: bytes must be a non-empty list of values 0..255")
            if type(rank) is not int or not 0 <= rank < MAX_PIECES:
                raise ValueError(f"{where}: {key}[{i}]: token must be an integer in 0..{MAX_PIECES - 1}, not {rank!r}")
            if bytes(b) in out:
                raise ValueError(f"{where}: {key}[{i}]: bytes {bytes(b)!r} appear twice")
            out[bytes(b)] = rank
        return out

    ranks, special = tokens("regular_tokens"), tokens("special_tokens")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise ValueError(f"{where}: regular_tokens cover {256 - len(missing)} of the 256 single bytes (not {missing[:5]})")
    ids = [*ranks.values(), *special.values()]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{where}: a token id is given to two tokens")
    try:
        specials = {b.decode(): rank for b, rank in special.items()}
    except UnicodeDecodeError:
        raise ValueError(f"{where}: special_tokens: a token's bytes are not UTF-8") from None
    split = data.get("pat_str") or {"V1": PAT_STR_B}.get(data.get("word_split"))  # type: ignore[arg-type]
    if not isinstance(split, str) or len(split) > 4096:
        raise ValueError(f"{where}: no split pattern (pat_str, or word_split 'V1')")
    vocab = data.get("vocab_size")
    if vocab is not None and (type(vocab) is not int or vocab != len(ids) or vocab != max(ids) + 1):
        raise ValueError(f"{where}: vocab_size {vocab!r} is not the {len(ids)} tokens it lists, numbered from 0")
    return ranks, specials, split, vocab


def check_vocabulary(tokenizer: AnyTokenizer, vocab_size: int) -> str | None:
    """A tokenizer with more pieces than the model's vocabulary is refused (its ids would index past the
    embedding); one with under a quarter as many is allowed, with the warning returned (a model may reserve ids)."""
    where = getattr(tokenizer, "path", "the tokenizer")
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"{where}: {tokenizer.vocab_size} pieces, more than the model's vocabulary of {vocab_size}: "
                         "a tokenizer of another model?")  # fmt: skip
    if tokenizer.vocab_size * 4 < vocab_size:
        return (f"{where}: {tokenizer.vocab_size} pieces, far fewer than the model's vocabulary of {vocab_size}: "
                "a tokenizer of another model?")  # fmt: skip
    return None


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
