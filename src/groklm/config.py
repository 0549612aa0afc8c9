"""Grok-1 hyper-parameters: one dataclass, named presets, and the reference's field names."""

from __future__ import annotations

import dataclasses
import json
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
    pad_token: int = 0
    eos_token: int = 2
    embedding_multiplier_scale: float = 78.38367176906169
    output_multiplier_scale: float = 0.5773502691896257
    attn_output_multiplier: float = 0.08838834764831845
    # Fixed in the reference code, named here so nothing is a magic number.
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    attn_softcap: float = 30.0

    def __post_init__(self) -> None:
        """Every field checked for type and range, so that a bad config fails here, by name, and
        not as a shape error (or a silently wrong model) after a long load."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if type(value) is not int:
                    raise ValueError(f"config field {f.name} must be an integer, not {value!r}")
            elif f.type == "float":
                if type(value) is int:
                    object.__setattr__(self, f.name, float(value))
                elif type(value) is not float or not math.isfinite(value):
                    raise ValueError(f"config field {f.name} must be a finite number, not {value!r}")
        positive = [f.name for f in dataclasses.fields(self) if f.name not in ("pad_token", "eos_token")]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"config field {name} must be positive, not {getattr(self, name)}")
        for name in ("pad_token", "eos_token"):
            if not 0 <= getattr(self, name) < self.vocab_size:
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
        """(total, active per token). The output embedding is tied, so it counts once."""
        d, f, e = self.emb_size, self.ffn_size, self.num_experts
        attn = 2 * d * self.q_size + 2 * d * self.kv_size
        per_layer_fixed = attn + 4 * d + d * e
        expert = 3 * d * f
        shared = self.vocab_size * d + d
        total = shared + self.num_layers * (per_layer_fixed + e * expert)
        active = shared + self.num_layers * (per_layer_fixed + self.num_selected_experts * expert)
        return total, active

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
        missing = sorted(known - set(d) - _FIXED_IN_REFERENCE)
        if missing:
            raise ValueError(
                f"config fields missing: {missing} (no defaults are assumed; `groklm info --preset grok-1 --json` "
                "prints a complete one)"
            )
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> GrokConfig:
        """Read a config file; every error names the file."""
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ValueError(f"{path}: no such config file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: cannot read the config ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
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


def get_preset(name: str) -> GrokConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None
