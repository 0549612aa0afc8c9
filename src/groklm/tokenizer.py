"""The Grok-1 SentencePiece tokenizer (`tokenizer.model`, shipped with the checkpoint)."""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no tokenizer.model there")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.path))

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        return int(self.sp.eos_id())

    def encode(self, text: str) -> list[int]:
        """No BOS is added: the reference does not add one."""
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return str(self.sp.decode(ids))


def find_tokenizer(checkpoint: str | Path | None, explicit: str | Path | None = None) -> Tokenizer:
    """An explicit path, else `tokenizer.model` in the checkpoint directory, its ckpt-0/ or its parent."""
    if explicit is not None:
        return Tokenizer(explicit)
    if checkpoint is not None:
        root = Path(checkpoint)
        for candidate in (
            root / "tokenizer.model",
            root / "ckpt-0" / "tokenizer.model",
            root.parent / "tokenizer.model",
        ):
            if candidate.is_file():
                return Tokenizer(candidate)
    raise FileNotFoundError(
        f"no tokenizer.model found next to {checkpoint}; pass --tokenizer PATH (it comes with the checkpoint download)"
    )
