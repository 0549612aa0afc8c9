"""groklm: xAI's Grok-1 in PyTorch. Load the released checkpoint as it is, and run it faithfully."""

import os

import torch

if not torch.cuda.is_available():  # Triton kernels can then only be interpreted; triton reads this once, on import
    os.environ.setdefault("TRITON_INTERPRET", "1")

from groklm.config import PRESETS, GrokConfig, get_preset
from groklm.files import CheckpointError
from groklm.formats.released import write_random_checkpoint
from groklm.generate import generate, generate_stream
from groklm.load import load
from groklm.model import Grok, KVCache
from groklm.tokenizer import Tokenizer, find_tokenizer

__all__ = [
    "PRESETS",
    "CheckpointError",
    "Grok",
    "GrokConfig",
    "KVCache",
    "Tokenizer",
    "find_tokenizer",
    "generate",
    "generate_stream",
    "get_preset",
    "load",
    "write_random_checkpoint",
]
