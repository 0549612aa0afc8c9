"""Grok-1 hyper-parameters: one dataclass, named presets, and the reference's field names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Fields of the reference's LanguageModelConfig / TransformerConfig that do not change the
# forward pass (sharding, initialisation, naming). A config file may carry them; we drop them.
_IGNORED_REFERENCE_FIELDS = frozenset(
    {
        "name",
        "model_size",
        "model_type",
        "fprop_dtype",
        "init_scale",
        "init_scale_override",
        "embedding_init_scale",
        "shard_activations",
        "shard_embeddings",
        "data_axis",
        "model_axis",
        "bos_token",
        "model",
        "_initialized",
        "case",
    }
)


# Values the reference fixes in its code rather than its config: a config file may leave them out.
_FIXED_IN_REFERENCE = frozenset({"rope_base", "norm_eps", "attn_softcap"})
# Grok-2's optional parts: left out, they are off.
_GROK2_PARTS = frozenset({"dense_ffn_size", "router_softcap", "gelu", "attn_temperature_len", "final_softcap",
                          "tie_embeddings", "jax_rounding"})  # fmt: skip
# Upper bounds far above any Grok (about 16x Grok-2's sizes): a crafted config fails here, by name, rather than
# building a billion layers on the meta device or sizing an exabyte of memory.
LIMITS = {"vocab_size": 1 << 24, "emb_size": 1 << 17, "key_size": 4096, "num_q_heads": 4096, "num_kv_heads": 4096,
          "num_layers": 1024, "num_experts": 1024, "sequence_len": 1 << 24, "dense_ffn_size": 1 << 20}  # fmt: skip
MAX_FFN = 1 << 20
MAX_PARAMETERS = 1 << 43  # about 30 times Grok-1's


@dataclass(frozen=True)
class GrokConfig:
    """Field names are the reference implementation's, so its config dicts load unchanged."""

    vocab_size: int = 131072
    emb_size: int = 6144
    key_size: int = 128
    num_q_heads: int = 48
    num_kv_heads: int = 8
    num_layers: int = 64
    widening_factor: float = 8.0
    num_experts: int = 8
    num_selected_experts: int = 2
    sequence_len: int = 8192
    pad_token: int | None = 0  # masked as an attention key (None: no token is; Grok-2)
    eos_token: int = 2
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    attn_output_multiplier: float = 0.08838834764831845
    # Fixed in the reference code, named here so nothing is a magic number.
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attn_softcap: float = 30.0
    # Grok-2's differences, each off (Grok-1's behaviour) by default; `grok2_config` sets them from a
    # Grok-2 config.json (see shared/spec/grok2.md, SGLang's computation).
    dense_ffn_size: int | None = None  # residual MoE: a dense GELU MLP beside the MoE, their sum / sqrt 2
    router_softcap: float | None = None  # the router's logits capped: cap * tanh(l / cap)
    gelu: str = "tanh"  # the experts' (and dense MLP's) GELU: "tanh" (Grok-1's, JAX's default) or "erf"
    attn_temperature_len: int | None = None  # L: capped scores x log2(p) / log2(L) for query positions p > L
    final_softcap: float | None = None  # the logits capped after the output multiplier
    tie_embeddings: bool = True  # the output head is the input embedding (Grok-1), or its own weight
    # bf16 roundings as the JAX reference makes them (Grok-1: a Python-float multiplier rounded to the
    # compute dtype first, attention logits rounded before the cap), or as SGLang's torch and Triton
    # code does (Grok-2: in fp32). fp32 runs are the same either way.
    jax_rounding: bool = True

    def __post_init__(self) -> None:
        """Every field checked for type and range, so that a bad config fails here, by name, and
        not as a shape error (or a silently wrong model) after a long load."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            optional = f.type.endswith(" | None")
            kind = f.type.removesuffix(" | None")
            if value is None and optional:
                continue
            if kind == "int":
                if type(value) is not int:
                    raise ValueError(f"config field {f.name} must be an integer, not {value!r}")
            elif kind == "float":
                if type(value) is int:
                    object.__setattr__(self, f.name, float(value))
                elif type(value) is not float or not math.isfinite(value):
                    raise ValueError(f"config field {f.name} must be a finite number, not {value!r}")
            elif kind == "bool" and type(value) is not bool:
                raise ValueError(f"config field {f.name} must be true or false, not {value!r}")
        numbers = [f.name for f in dataclasses.fields(self) if f.type.removesuffix(" | None") in ("int", "float")]
        for name in numbers:
            if name not in ("pad_token", "eos_token") and getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, not {getattr(self, name)}")
        for name, limit in LIMITS.items():
            if getattr(self, name) is not None and getattr(self, name) > limit:
                raise ValueError(f"config field {name} = {getattr(self, name)} is over the limit of {limit}")
        if self.ffn_size > MAX_FFN:
            raise ValueError(f"widening_factor {self.widening_factor} at width {self.emb_size} gives an expert hidden "
                             f"size over the limit of {MAX_FFN}")  # fmt: skip
        if self.param_counts()[0] > MAX_PARAMETERS:
            raise ValueError(f"config gives {self.param_counts()[0]:.3g} parameters, over the limit of {MAX_PARAMETERS:.3g}")
        if self.gelu not in ("tanh", "erf"):
            raise ValueError(f"config field gelu must be 'tanh' or 'erf', not {self.gelu!r}")
        if self.attn_temperature_len is not None and self.attn_temperature_len < 2:
            raise ValueError(f"config field attn_temperature_len must be at least 2, not {self.attn_temperature_len}")
        for name in ("pad_token", "eos_token"):
            if getattr(self, name) is not None and not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(
                    f"config field {name} = {getattr(self, name)} is outside the vocabulary 0..{self.vocab_size - 1}"
                )
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(f"num_q_heads {self.num_q_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.key_size % 2:
            raise ValueError(f"key_size {self.key_size} must be even for rotate-half RoPE")
        if not 0 < self.num_selected_experts <= self.num_experts:
            raise ValueError(f"num_selected_experts {self.num_selected_experts} not in 1..{self.num_experts}")
        if self.ffn_size <= 0:
            raise ValueError(
                f"widening_factor {self.widening_factor} gives no expert hidden units at width {self.emb_size}"
            )

    @property
    def ffn_size(self) -> int:
        """The reference's rule: two thirds of widening * width, rounded up to a multiple of 8."""
        size = int(self.widening_factor * self.emb_size) * 2 // 3
        return size + (8 - size) % 8

    @property
    def q_size(self) -> int:
        return self.num_q_heads * self.key_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.key_size

    def param_counts(self) -> tuple[int, int]:
        """(total, active per token). A tied output embedding counts once."""
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attn = 2 * d * self.q_size + 2 * d * self.kv_size
        per_layer_fixed = attn + 4 * d + d * e + 3 * d * (self.dense_ffn_size or 0)
        expert = 3 * d * f
        shared = self.vocab_size * d * (1 if self.tie_embeddings else 2) + d
        total = shared + self.num_layers * (per_layer_fixed + e * expert)
        active = shared + self.num_layers * (per_layer_fixed + self.num_selected_experts * expert)
        return total, active

    @property
    def family(self) -> str:
        """ "grok-2" where Grok-2's parts are on, else "grok-1" (for messages and the licence notice)."""
        return "grok-2" if self.dense_ffn_size is not None or not self.tie_embeddings else "grok-1"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GrokConfig:
        """Accepts our fields, or the reference's `config` object (as in the golden case.json).

        Every field the reference's config carries must be there: a missing one is an error, not
        Grok-1's value (the reference's own defaults are not Grok-1's either). Only the values the
        reference fixes in code (`rope_base`, `norm_eps`, `attn_softcap`) may be left out."""
        if not isinstance(d, dict):
            raise ValueError(f"a config must be a JSON object, not {type(d).__name__}")
        if "config" in d and isinstance(d["config"], dict):
            d = d["config"]
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known - _IGNORED_REFERENCE_FIELDS
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        missing = sorted(known - set(d) - _FIXED_IN_REFERENCE - _GROK2_PARTS)
        if missing:
            raise ValueError(
                f"config fields missing: {missing} (no defaults are assumed; `groklm info --preset grok-1 --json` "
                "prints a complete one)"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> GrokConfig:
        """Read a config file; every error names the file."""
        from groklm.files import CheckpointError, read_json

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no such config file")
        try:
            data = read_json(path)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        try:
            return cls.from_dict(data)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None

    def replace(self, **changes: Any) -> GrokConfig:
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, GrokConfig] = {
    # The released model.
    "grok-1": GrokConfig(),
    # A CPU-sized benchmark model: decode reads ~1.6 GB per token, like a slice of Grok-1.
    "bench-mid": GrokConfig(
        emb_size=2048,
        num_q_heads=16,
        num_kv_heads=4,
        key_size=128,
        num_layers=8,
        widening_factor=7.5,
        sequence_len=1024,
    ),
    # Grok-2 ("Grok 2.5", xai-org/grok-2), the values of its config.json.
    "grok-2": GrokConfig(
        emb_size=8192,
        key_size=128,
        num_q_heads=64,
        num_kv_heads=8,
        num_layers=64,
        widening_factor=3.0,
        sequence_len=131072,
        pad_token=None,
        eos_token=2,
        embedding_multiplier_scale=90.50966799187809,
        output_multiplier_scale=0.5,
        attn_output_multiplier=128**-0.5,
        rope_base=208533496.0,
        dense_ffn_size=32768,
        router_softcap=30.0,
        gelu="erf",
        attn_temperature_len=1024,
        final_softcap=50.0,
        tie_embeddings=False,
        jax_rounding=False,
    ),
    # A Grok-1-shaped model small enough to train on a laptop CPU in minutes (`groklm train`, the demo):
    # 4 layers of 8 experts (top 2), a 2048-piece vocabulary trained with it, the multipliers Grok-1's
    # rules give at this width (embedding sqrt(D), attention 1/sqrt(head size)).
    "tiny": GrokConfig(
        vocab_size=2048,
        emb_size=256,
        num_q_heads=4,
        num_kv_heads=2,
        key_size=64,
        num_layers=4,
        widening_factor=2.0,
        sequence_len=512,
        embedding_multiplier_scale=16.0,
        attn_output_multiplier=0.125,
    ),
    # The demo and test model: Grok-1's real vocabulary, everything else small (ffn 512, so every
    # int8/int4 kernel path applies).
    "mini": GrokConfig(
        emb_size=256,
        num_q_heads=8,
        num_kv_heads=2,
        key_size=32,
        num_layers=4,
        widening_factor=3.0,
        sequence_len=2048,
    ),
}


def need_ints(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Those of `keys` that `d` holds are positive integers: checked before a foreign config's values are
    divided or multiplied, so a zero or a string is an error naming the key, not a ZeroDivisionError."""
    for key in keys:
        value = d.get(key)
        if value is not None and (type(value) is not int or value <= 0):
            raise ValueError(f"{where}: {key} must be a positive integer, not {str(value)[:40]!r}")


def need_numbers(d: dict[str, Any], keys: tuple[str, ...], where: str) -> None:
    """Those of `keys` that `d` holds (and not as null) are finite numbers."""
    for key in keys:
        value = d.get(key)
        if value is not None and (type(value) not in (int, float) or not math.isfinite(value)):
            raise ValueError(f"{where}: {key} must be a finite number, not {str(value)[:40]!r}")


def grok2_config(d: dict[str, Any], where: str = "config.json") -> GrokConfig:
    """Our config from a Grok-2 `config.json` (the release's keys), with what SGLang fixes in code: the
    router's cap of 30 whatever the file says, the attention scale head_dim^-0.5, erf GELU, an untied
    head, pad tokens not masked, `<|eos|>` = 2 (the tokenizer's; the file names none)."""

    def need(key: str) -> Any:
        if key not in d:
            raise ValueError(f"no {key}")
        return d[key]

    if not isinstance(d, dict):
        raise ValueError(f"{where}: must hold a JSON object, not {type(d).__name__}")
    need_ints(d, ("hidden_size", "head_dim", "moe_intermediate_size"), where)
    need_numbers(d, ("rope_theta", "embedding_multiplier_scale", "output_multiplier_scale", "final_logit_softcapping",
                     "rms_norm_eps", "attn_logit_softcapping", "attn_temperature_len"), where)  # fmt: skip
    rope_type = d.get("rope_type", "original")
    if rope_type != "original" or d.get("rope_scaling"):
        raise ValueError(f"{where}: rope_type {rope_type!r}: only Grok-2's 'original' (no scaling) is supported")
    try:
        config = _grok2(d, need)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if config.ffn_size != d["moe_intermediate_size"]:
        raise ValueError(f"{where}: moe_intermediate_size {d['moe_intermediate_size']} is not a multiple of 8")
    return config


def _grok2(d: dict[str, Any], need: Any) -> GrokConfig:
    hidden, head_dim, moe = need("hidden_size"), d.get("head_dim", 128), need("moe_intermediate_size")
    return GrokConfig(
        vocab_size=need("vocab_size"),
        emb_size=hidden,
        key_size=head_dim,
        num_q_heads=need("num_attention_heads"),
        num_kv_heads=need("num_key_value_heads"),
        num_layers=need("num_hidden_layers"),
        widening_factor=moe * 3 / (2 * hidden),
        num_experts=need("num_local_experts"),
        num_selected_experts=need("num_experts_per_tok"),
        sequence_len=need("max_position_embeddings"),
        pad_token=None,
        eos_token=2,
        embedding_multiplier_scale=float(need("embedding_multiplier_scale")),
        output_multiplier_scale=float(need("output_multiplier_scale")),
        attn_output_multiplier=head_dim**-0.5,
        rope_base=float(int(need("rope_theta"))),  # SGLang: int(rope_theta)
        norm_eps=float(d.get("rms_norm_eps", 1e-5)),
        attn_softcap=float(d.get("attn_logit_softcapping", 30.0)),
        dense_ffn_size=need("intermediate_size") if d.get("residual_moe", False) else None,
        router_softcap=30.0,  # hard-coded in SGLang (grok.py), whatever router_logit_softcapping says
        gelu="erf",
        attn_temperature_len=d["attn_temperature_len"] if d.get("attn_temperature_len", -1) > 0 else None,
        final_softcap=float(d["final_logit_softcapping"]) if d.get("final_logit_softcapping") else None,
        tie_embeddings=False,
        jax_rounding=False,
    )


def get_preset(name: str) -> GrokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
