"""On-disk formats, one module each: the released Grok-1 pickles (`released`, read by `safe_pickle`),
groklm's safetensors layout (`native`), Grok-2's released TP shards (`grok2`), Hugging Face Grok-1
directories (`hf`) and GGUF files (`gguf`), all in one table (`registry`). Each reads a checkpoint as a
source of (our name, tensor) pairs, checked by name and shape before any is read (`common.Source`),
and those that write take the same pairs; none knows the model (`groklm.place` puts them in it)."""

from groklm.files import CheckpointError

__all__ = ["CheckpointError"]
