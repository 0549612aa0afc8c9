"""On-disk formats, one module each: the released pickles (`released`, read by `safe_pickle`) and
groklm's safetensors layout (`native`). Each reads into a model built on the meta device and checks
every name and shape against it."""

from groklm.files import CheckpointError

__all__ = ["CheckpointError"]
