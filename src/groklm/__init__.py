"""groklm: xAI's Grok-1 and Grok-2 in PyTorch. Load the released checkpoints as they are, and run them
faithfully."""

from groklm.config import PRESETS, GrokConfig, get_preset
from groklm.convert import write_random_checkpoint
from groklm.files import CheckpointError
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
