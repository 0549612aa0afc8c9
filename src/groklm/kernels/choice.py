"""Which kernels a quantized layer runs: Triton (`groklm.kernels.triton`) or the native CPU ones, by the
tensor and `select` ($GROKLM_KERNELS)."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
from torch import Tensor

KERNEL_CHOICES = ("auto", "triton", "off")
_kernels = os.environ.get("GROKLM_KERNELS", "auto")


def select(name: str) -> None:
    """Which kernels quantized models use: "auto" (Triton for CUDA tensors when triton is installed, the
    native ones on the CPU), "triton" (Triton for CPU tensors too, interpreted: for tests), "off" (no
    Triton). The default is $GROKLM_KERNELS, else auto."""
    global _kernels
    if name not in KERNEL_CHOICES:
        raise ValueError(f"GROKLM_KERNELS must be one of {', '.join(KERNEL_CHOICES)}, not {name!r}")
    _kernels = name


@functools.cache
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(x: Tensor) -> bool:
    """Whether a quantized layer runs this bf16/fp16 input through the Triton kernels (never with autograd)."""
    if _kernels == "auto":
        return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and not needs_grad(x) and _has_triton()
    if _kernels == "off":
        return False
    if _kernels != "triton":
        select(_kernels)  # raises, naming the bad value
    return x.dtype in (torch.bfloat16, torch.float16) and not needs_grad(x)


def needs_grad(x: Tensor) -> bool:
    return x.requires_grad and torch.is_grad_enabled()
