"""The kernels as torch ops, groklm::linear, groklm::moe and groklm::attend: their schemas, their fake
(meta) implementations, and their CPU implementations, C++ (`csrc/ops.cpp`) where that builds, else
the Python ones `native` hands over; and, C++ only, groklm::blocks (decoder layers' decode step around
them), groklm::decode (a whole decode step's hidden states or logits), groklm::unembed and groklm::rms_norm, for
eager mode (compiled decode fuses the same glue itself). torch.compile always calls the ops; eager mode calls the
C++ ones too (`NATIVE_OPS`), or else the Python functions directly.

The kernels are ops, opaque to torch.compile (which fuses what lies between them). Decode calls them ~25
times a token, each time with caches its weights have just swept, where every Python and torch call
around a kernel costs microseconds: so their CPU implementations are C++, and they are defined with a
plain torch.library.Library, not custom_op, whose Python wrapping costs more (benchmarks/NOTES.md, "ops")."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from groklm.kernels.build import build_cpp_ops
from groklm.kernels.layout import Expert, Weight

NATIVE_OPS = False
"""Whether the ops' CPU implementations are the C++ ones: eager mode then calls the ops too."""

_OPS = torch.library.Library("groklm", "DEF")
_OPS.define("linear(int bits, Tensor x, Tensor[] weights, bool fp32) -> Tensor")
_OPS.define(
    "moe(Tensor x, Tensor router, int topk, int bits, Tensor[] weights, float router_cap, int gelu_erf) -> Tensor"
)
_OPS.define(
    "attend(Tensor q, Tensor k, Tensor v, Tensor mask, float multiplier, float softcap, float masked, "
    "Tensor? scale, bool round_scores=True) -> Tensor"
)

_OPS.define(
    "blocks(Tensor h, Tensor cos, Tensor sin, Tensor mask, Tensor(a!)[] cache_k, Tensor(b!)[] cache_v, "
    "Tensor positions, Tensor[] norms, Tensor[] weights, Tensor[] routers, int bits, float eps, float multiplier, "
    "float softcap, float masked, Tensor? scale, bool round_scores, int topk, float router_cap, int gelu_erf) -> Tensor"
)

_OPS.define("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor")
_OPS.define(
    "unembed(int bits, Tensor x, Tensor[] weights, float multiplier, bool jax_rounding, float final_cap) -> Tensor"
)
_OPS.define(
    "decode(Tensor tokens, Tensor positions, Tensor embedded, bool lookup, float embed_multiplier, "
    "bool jax_rounding, int pad, Tensor(c!) key_ok, Tensor cos, Tensor sin, Tensor(a!)[] cache_k, "
    "Tensor(b!)[] cache_v, Tensor[] norms, Tensor[] weights, Tensor[] routers, Tensor final_norm, int bits, "
    "float eps, float multiplier, float softcap, float masked, Tensor? scale, bool round_scores, int topk, "
    "float router_cap, int gelu_erf, Tensor[] head, int head_bits, float output_multiplier, "
    "float final_cap) -> Tensor"
)


@torch.library.register_fake("groklm::linear")
def _(bits: int, x: Tensor, weights: list[Tensor], fp32: bool) -> Tensor:
    dtype = torch.float32 if fp32 else torch.bfloat16
    return x.new_empty(x.shape[0], sum(s.shape[0] for s in weights[1::2]), dtype=dtype)


@torch.library.register_fake("groklm::moe")
def _(
    x: Tensor, router: Tensor, topk: int, bits: int, weights: list[Tensor], router_cap: float, gelu_erf: int
) -> Tensor:
    return x.new_empty(x.shape, dtype=torch.bfloat16)


@torch.library.register_fake("groklm::attend")
def _(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, multiplier: float, softcap: float, masked: float,
      scale: Tensor | None, round_scores: bool = True) -> Tensor:  # fmt: skip
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@torch.library.register_fake("groklm::unembed")
def _(bits: int, x: Tensor, weights: list[Tensor], multiplier: float, jax_rounding: bool, final_cap: float) -> Tensor:
    return x.new_empty(x.shape[0], weights[1].shape[0], dtype=torch.float32)


@torch.library.register_fake("groklm::rms_norm")
def _(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def cpp_ops() -> ctypes.CDLL | None:
    """The C++ implementations, built and loaded (which registers them), or None where they do not build
    or `GROKLM_CPP_OPS=0` chooses Python. Call once: `native` does."""
    global NATIVE_OPS
    lib = build_cpp_ops() if os.environ.get("GROKLM_CPP_OPS", "1") != "0" else None
    NATIVE_OPS = lib is not None
    return lib


LinearFn = Callable[[int, Tensor, Sequence[Weight], torch.dtype], Tensor]
MoEFn = Callable[[Tensor, Tensor, int, int, Expert, Expert, Expert, float, bool], Tensor]
AttendFn = Callable[[Tensor, Tensor, Tensor, Tensor, float, float, float, "Tensor | None", bool], Tensor]


def use_python(linear: LinearFn, moe: MoEFn, attend: AttendFn) -> None:
    """Registers these Python functions as the ops' CPU implementations (once: where cpp_ops is None)."""

    def linear_op(bits: int, x: Tensor, weights: list[Tensor], fp32: bool) -> Tensor:
        parts = list(zip(weights[::2], weights[1::2], strict=True))
        return linear(bits, x, parts, torch.float32 if fp32 else torch.bfloat16)

    def moe_op(x: Tensor, router: Tensor, topk: int, bits: int, weights: list[Tensor], router_cap: float,
               gelu_erf: int) -> Tensor:  # fmt: skip
        w1, s1, v, sv, w2, s2 = weights
        return moe(x, router, topk, bits, (w1, s1), (v, sv), (w2, s2), router_cap, bool(gelu_erf))

    _OPS.impl("linear", linear_op, "CPU")
    _OPS.impl("moe", moe_op, "CPU")
    _OPS.impl("attend", attend, "CPU")
