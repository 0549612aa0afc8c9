"""Training data: examples from text and JSON Lines files, packed to a context with a loss mask; token
shards on disk (memory-mapped uint32) sampled in seeded windows; a SentencePiece tokenizer trained on
the text itself.

Fine-tuning files: `.jsonl` with one object a line, {"text": ...} (loss on every token) or {"prompt":
..., "completion": ...} (loss on the completion only); anything else is read as one plain text. Each
example ends with the end-of-sequence token, and examples are packed back to back into windows of the
context length (a window's tokens attend across example boundaries, as in most packed training).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from groklm.files import CheckpointError, parse_json

IGNORE = -100  # targets the loss skips


def read_examples(path: str | Path) -> list[tuple[str, str | None]]:
    """(prompt or text, completion or None) for every example of a file (see the module docstring)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such data file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not UTF-8 text") from None
    if path.suffix != ".jsonl":
        if not raw.strip():
            raise ValueError(f"{path}: empty")
        return [(raw, None)]
    out: list[tuple[str, str | None]] = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line, f"{path}:{n}", limit=len(line.encode()))
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{n}: expected an object with 'text', or 'prompt' and 'completion'")
        if isinstance(obj.get("text"), str):
            out.append((obj["text"], None))
        elif isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
            out.append((obj["prompt"], obj["completion"]))
        else:
            raise ValueError(f"{path}:{n}: expected a string 'text', or string 'prompt' and 'completion'")
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def tokenize(examples: Iterable[tuple[str, str | None]], encode: Any, eos: int) -> list[tuple[list[int], list[bool]]]:
    """(token ids, which ones the loss counts) of each example, the EOS appended (and counted)."""
    out = []
    for text, completion in examples:
        if completion is None:
            ids = [*encode(text), eos]
            out.append((ids, [True] * len(ids)))
        else:
            prompt, done = encode(text), [*encode(completion), eos]
            out.append(([*prompt, *done], [False] * len(prompt) + [True] * len(done)))
    return out


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int) -> tuple[Tensor, Tensor]:
    """Inputs [N, seq_len] and targets [N, seq_len] (IGNORE where the loss does not count), the examples
    laid end to end in windows of seq_len + 1 tokens overlapping by one; a short last window padded."""
    ids = [t for x, _ in examples for t in x]
    counted = [c for _, m in examples for c in m]
    n = max(1, math.ceil((len(ids) - 1) / seq_len))
    total = n * seq_len + 1
    ids_t = torch.zeros(total, dtype=torch.long)
    tgt = torch.full((total,), IGNORE, dtype=torch.long)
    ids_t[: len(ids)] = torch.tensor(ids)
    tgt[: len(ids)] = torch.where(torch.tensor(counted), torch.tensor(ids), IGNORE)
    starts = torch.arange(n) * seq_len
    window = starts[:, None] + torch.arange(seq_len)[None]
    return ids_t[window], tgt[window + 1]


# -- token shards (training from scratch) ------------------------------------------------------------------


def text_files(paths: Iterable[str | Path]) -> list[Path]:
    """The files named, and the .txt/.md/.py/.rst files under the directories named, in sorted order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in (".txt", ".md", ".py", ".rst"))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    if not out:
        raise ValueError(f"no text files in {[str(p) for p in paths]}")
    return out


def write_shard(files: list[Path], encode: Any, eos: int, out: Path, max_tokens: int | None = None) -> int:
    """Tokenize the files (each ends with EOS) into one uint32 token file; returns its length."""
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(out, "wb") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            ids = np.asarray([*encode(text), eos], dtype=np.uint32)
            if max_tokens is not None:
                ids = ids[: max_tokens - n]
            f.write(ids.tobytes())
            n += len(ids)
            if max_tokens is not None and n >= max_tokens:
                break
    return n


class TokenShard:
    """A uint32 token file, memory-mapped; `batch` draws seeded random windows of it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.tokens = np.memmap(self.path, dtype=np.uint32, mode="r")

    def __len__(self) -> int:
        return len(self.tokens)

    def batch(self, size: int, seq_len: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """(inputs, targets) [size, seq_len]: windows at uniformly random starts."""
        if len(self.tokens) <= seq_len + 1:
            raise ValueError(f"{self.path}: {len(self.tokens)} tokens, fewer than a window of {seq_len + 1}")
        starts = torch.randint(0, len(self.tokens) - seq_len - 1, (size,), generator=generator).tolist()
        rows = np.stack([self.tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64)
        t = torch.from_numpy(rows)
        return t[:, :-1], t[:, 1:]

    def windows(self, seq_len: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Every whole window in order (for evaluation)."""
        for s in range(0, len(self.tokens) - seq_len - 1, seq_len):
            t = torch.from_numpy(self.tokens[s : s + seq_len + 1].astype(np.int64))
            yield t[None, :-1], t[None, 1:]


def unigram_entropy(tokens: np.ndarray, vocab: int) -> float:
    """The entropy (nats per token) of the data's token frequencies: what a model that ignores context
    can reach at best."""
    counts = np.bincount(tokens.astype(np.int64), minlength=vocab).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def train_tokenizer(files: list[Path], vocab: int, out_prefix: Path, max_bytes: int = 20 << 20) -> Path:
    """A SentencePiece BPE model of `vocab` pieces trained on the files (up to `max_bytes` of them), with
    Grok-1's special ids: pad 0, bos 1, eos 2, unk 3; byte fallback, so any text encodes."""
    import sentencepiece as spm

    out_prefix.parent.mkdir(parents=True, exist_ok=True)
    corpus = out_prefix.with_suffix(".corpus.txt")
    size = 0
    with open(corpus, "w", encoding="utf-8") as f:
        for path in files:
            text = path.read_text(encoding="utf-8", errors="replace")
            f.write(text + "\n")
            size += len(text)
            if size >= max_bytes:
                break
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out_prefix), vocab_size=vocab, model_type="bpe", pad_id=0, bos_id=1,
        eos_id=2, unk_id=3, byte_fallback=True, character_coverage=1.0, split_digits=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", max_sentence_length=1 << 16,
        input_sentence_size=1000000, shuffle_input_sentence=False, num_threads=2, minloglevel=2,
        user_defined_symbols=["\n"],
    )  # fmt: skip
    corpus.unlink()
    return out_prefix.with_suffix(".model")


def write_docstrings(out: str | Path, root: str | Path | None = None) -> int:
    """The docstrings of the Python standard library's modules, classes and functions (English prose
    about code, on every machine with Python, no download) into one text file, one per paragraph
    block; returns its size in bytes. `root`: another source tree."""
    import ast
    import sysconfig

    root = Path(root or sysconfig.get_paths()["stdlib"])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    with open(out, "w", encoding="utf-8") as f:
        for path in sorted(root.rglob("*.py")):
            if any(part in ("test", "tests", "site-packages", "idlelib", "lib2to3") for part in path.parts):
                continue
            try:
                tree = ast.parse(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) > 40:
                        f.write(doc.strip() + "\n\n")
                        size += len(doc) + 2
    return size
