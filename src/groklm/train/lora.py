"""LoRA as a transform: `add_lora(model, targets, rank, alpha, dropout) -> model` wraps the chosen
projections (attention q/k/v/o, the experts' w1/v/w2 one adapter per expert, the router, Grok-2's dense
MLP) so that each computes base(x) + dropout(x) A^T B^T * alpha / rank, with A [rank, in] (Kaiming
uniform, as PEFT) and B [out, rank] (zeros) in fp32; the base stays frozen and as it is (int8, int4 or
float). Quantized bases are differentiable with respect to their input (`quant`): a QLoRA-style
fine-tune never holds a dequantized copy of the model.

Adapters are saved in PEFT's format: `adapter_config.json` and `adapter_model.safetensors` with keys
`base_model.model.<module>.lora_A.weight` / `lora_B.weight`, where <module> is the Hugging Face name
of the wrapped projection (Grok-1: the hpcai layout vLLM reads, experts one module each,
`model.layers.N.moe_block.experts.E.linear`; Grok-2: its release's names). `merge` folds an adapter
into the weights and quantizes them again with the base's own grouping.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from groklm import kernels
from groklm.config import GrokConfig
from groklm.files import CheckpointError, read_json
from groklm.formats.safetensors_io import read_header, read_tensor
from groklm.model import ExpertLinear, Grok
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    Int8ExpertLinear,
    Int8Linear,
    dense_weight,
    is_panels,
    quantize_weight,
    quantize_weight_int4,
    scales_to_panels,
    to_panels,
)
from groklm.train.common import option, option_metadata

# Our module leaf -> what `--targets` calls it; the groups `--targets` also takes.
TARGETS = {"wq": "wq", "wk": "wk", "wv": "wv", "wo": "wo", "router": "router", "w1": "w1", "v": "v", "w2": "w2",
           "gate": "gate", "up": "up", "down": "down"}  # fmt: skip
GROUPS = {"attn": ["wq", "wk", "wv", "wo"], "experts": ["w1", "v", "w2"], "mlp": ["gate", "up", "down"]}
LINEAR = (nn.Linear, Int8Linear, Int4Linear)
MAX_RANK = 1 << 16
_EXPERTS = (ExpertLinear, Int8ExpertLinear, Int4ExpertLinear)


def parse_targets(spec: str | list[str]) -> list[str]:
    """'attn,router' -> ['wq', 'wk', 'wv', 'wo', 'router']; names checked."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in (x.strip() for x in items):
        names = GROUPS.get(item, [item])
        for name in names:
            if name not in TARGETS:
                raise ValueError(f"unknown LoRA target {item!r}: choose from {sorted(TARGETS) + sorted(GROUPS)}")
            if name not in out:
                out.append(name)
    if not out:
        raise ValueError("no LoRA targets given")
    return out


def features(base: nn.Module) -> tuple[int, int]:
    """(in, out) of a linear or stacked-expert module, quantized or not."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features
    w = base.weight
    if isinstance(base, (Int8Linear, Int8ExpertLinear, Int4Linear, Int4ExpertLinear)):
        return kernels.in_features(w, base.scales), base.scales.shape[-2]
    return w.shape[-1], w.shape[-2]


class LoRALinear(nn.Module):
    """base(x) + dropout(x) A^T B^T * scaling; A, B fp32 and trainable, base frozen."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_f, out_f = features(base)
        device = base.weight.device if hasattr(base, "weight") else None
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, in_f, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_f, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> Tensor:  # what code asking a linear for its weight (dtype, device) sees
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T) @ self.lora_B.T
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self) -> Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling  # [out, in]


class LoRAExpertLinear(nn.Module):
    """Stacked experts, one adapter each: A [E, rank, in], B [E, out, rank]; `forward(x, e)`."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        in_f, out_f = features(base)
        experts = base.weight.shape[0]
        device = base.weight.device
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(experts, rank, in_f, device=device))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_f, rank, device=device))
        for a in self.lora_A:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    def forward(self, x: Tensor, expert: int) -> Tensor:
        y = self.base_layer(x, expert)
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A[expert].T) @ self.lora_B[expert].T
        return y + (delta * self.scaling).to(y.dtype)

    def delta_weight(self, expert: int) -> Tensor:
        return (self.lora_B[expert] @ self.lora_A[expert]) * self.scaling


@dataclass
class LoraConfig:
    """What PEFT's adapter_config.json holds (the fields groklm reads back)."""

    r: int = option(16, "LoRA rank r", "--rank")
    lora_alpha: float = option(32.0, "LoRA alpha (the update is scaled by alpha / r)", "--alpha")
    lora_dropout: float = option(0.05, "dropout on the adapters' input", "--dropout")
    target_modules: list[str] = field(
        default_factory=lambda: ["wq", "wk", "wv", "wo"],
        metadata=option_metadata("comma-separated: attn (wq,wk,wv,wo), experts (w1,v,w2), router, mlp (Grok-2), "
                                 "or single names", "--targets", cli_default="attn"),
    )  # fmt: skip

    def check(self) -> LoraConfig:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or not 1 <= self.r <= MAX_RANK:
            raise ValueError(f"LoRA rank must be an integer in 1..{MAX_RANK}, not {self.r!r}")
        if not self.lora_alpha > 0:
            raise ValueError(f"LoRA alpha must be positive, not {self.lora_alpha!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), not {self.lora_dropout!r}")
        self.target_modules = parse_targets(self.target_modules)
        return self


def add_lora(model: Grok, lora: LoraConfig) -> Grok:
    """Wrap every target projection of `model` with a LoRA adapter and freeze everything else."""
    lora.check()
    model.requires_grad_(False)
    found = 0
    for name, module in list(model.named_modules()):
        leaf = name.rpartition(".")[2]
        if leaf not in lora.target_modules or not name.startswith("layers."):
            continue
        if isinstance(module, _EXPERTS):
            new: nn.Module = LoRAExpertLinear(module, lora.r, lora.lora_alpha, lora.lora_dropout)
        elif isinstance(module, LINEAR):
            new = LoRALinear(module, lora.r, lora.lora_alpha, lora.lora_dropout)
        else:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)
        found += 1
    if not found:
        raise ValueError(f"no module of this model matches the LoRA targets {lora.target_modules}")
    return model


def adapters(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExpertLinear))}


# -- PEFT's format ----------------------------------------------------------------------------------------


def hf_module_names(config: GrokConfig) -> dict[tuple[str, int | None], str]:
    """(our parameter, expert) -> the Hugging Face module holding it (Grok-1: hpcai; Grok-2: its release)."""
    if config.family == "grok-2":
        from groklm.formats.grok2 import names

        return {(ours, e): theirs.removesuffix(".weight") for ours, theirs, e, _ in names(config)}
    from groklm.formats.hf import names as hf_names

    return {(n.ours, n.expert): n.theirs.removesuffix(".weight") for n in hf_names(config)}


def _peft_tensors(model: Grok) -> dict[str, Tensor]:
    table = hf_module_names(model.config)
    out: dict[str, Tensor] = {}
    for name, m in adapters(model).items():
        if isinstance(m, LoRAExpertLinear):
            for e in range(m.lora_A.shape[0]):
                key = f"base_model.model.{table[(f'{name}.weight', e)]}"
                out[f"{key}.lora_A.weight"] = m.lora_A[e].detach().contiguous()
                out[f"{key}.lora_B.weight"] = m.lora_B[e].detach().contiguous()
        else:
            key = f"base_model.model.{table[(f'{name}.weight', None)]}"
            out[f"{key}.lora_A.weight"] = m.lora_A.detach().contiguous()
            out[f"{key}.lora_B.weight"] = m.lora_B.detach().contiguous()
    return out


def save_adapter(model: Grok, lora: LoraConfig, out: str | Path, base: str = "") -> Path:
    """adapter_config.json and adapter_model.safetensors (PEFT's names, see the module docstring)."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = hf_module_names(model.config)
    targets = sorted({table[k].rpartition(".")[2] for k in table if k[0].split(".")[-2] in lora.target_modules})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": lora.r,
        "lora_alpha": lora.lora_alpha,
        "lora_dropout": lora.lora_dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "groklm": {"target_modules": lora.target_modules, "family": model.config.family},
    }
    save_file(_peft_tensors(model), str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / "adapter_model.safetensors", 0o666 & ~umask)  # safetensors writes 0600 (a temporary file)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return out


def read_adapter_config(path: str | Path) -> LoraConfig:
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no adapter here (expected adapter_config.json)")
    try:
        d: dict[str, Any] = read_json(file, kind=dict)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    ours = d["groklm"].get("target_modules") if isinstance(d.get("groklm"), dict) else None
    if ours is None:  # a PEFT adapter written elsewhere: map its Hugging Face leaf names back to ours
        back = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate": "router", "linear": "w1",
                "linear_v": "v", "linear_1": "w2", "w1": "w1", "w3": "v", "w2": "w2", "gate_proj": "gate",
                "up_proj": "up", "down_proj": "down"}  # fmt: skip
        theirs = d.get("target_modules", [])
        if not isinstance(theirs, list) or not all(isinstance(t, str) for t in theirs):
            raise ValueError(f"{file}: target_modules must be a list of module names")
        unknown = [t for t in theirs if t not in back]
        if unknown:
            raise ValueError(f"{file}: target modules {unknown[:5]} are not Grok projections")
        ours = [back[t] for t in theirs]
    if not isinstance(ours, list) or not all(isinstance(t, str) for t in ours):
        raise ValueError(f"{file}: groklm.target_modules must be a list of module names")
    for key in ("r", "lora_alpha", "lora_dropout"):
        if key in d and (type(d[key]) not in (int, float) or not math.isfinite(d[key])):
            raise ValueError(f"{file}: {key} must be a number, not {str(d[key])[:40]!r}")
    try:
        return LoraConfig(d["r"], float(d["lora_alpha"]), float(d.get("lora_dropout", 0.0)), ours).check()
    except KeyError as e:
        raise ValueError(f"{file}: no {e.args[0]}") from None
    except ValueError as e:
        raise ValueError(f"{file}: {e}") from None


def _features_of(config: GrokConfig, leaf: str) -> tuple[int, int]:
    """(in, out) of a projection of this config, from the config alone (no model built)."""
    d, q, kv, f, dense = config.emb_size, config.q_size, config.kv_size, config.ffn_size, config.dense_ffn_size or 0
    return {"wq": (d, q), "wk": (d, kv), "wv": (d, kv), "wo": (q, d), "router": (d, config.num_experts),
            "w1": (d, f), "v": (d, f), "w2": (f, d), "gate": (d, dense), "up": (d, dense), "down": (dense, d)}[leaf]  # fmt: skip


def check_adapter(path: str | Path, config: GrokConfig) -> LoraConfig:
    """An adapter's config and its tensors' names and shapes (from the file's header) against the base's
    config, before the base is loaded: a wrong base, or a crafted rank, is found without reading a weight."""
    lora = read_adapter_config(path)
    file = Path(path) / "adapter_model.safetensors"
    if not file.is_file():
        raise FileNotFoundError(f"{file}: missing")
    if lora.r > config.emb_size:
        raise ValueError(f"{Path(path) / 'adapter_config.json'}: rank {lora.r} exceeds the base's width {config.emb_size}")
    table = hf_module_names(config)
    expected: dict[str, tuple[int, ...]] = {}
    for (ours, _), module in table.items():
        leaf = ours.split(".")[-2]
        if leaf in lora.target_modules and ours.startswith("layers."):
            in_f, out_f = _features_of(config, leaf)
            expected[f"base_model.model.{module}.lora_A.weight"] = (lora.r, in_f)
            expected[f"base_model.model.{module}.lora_B.weight"] = (out_f, lora.r)
    if not expected:
        raise ValueError(f"{Path(path) / 'adapter_config.json'}: no module of this {config.family} model matches the "
                         f"LoRA targets {lora.target_modules}")  # fmt: skip
    entries, _ = read_header(file)
    missing, extra = sorted(set(expected) - set(entries)), sorted(set(entries) - set(expected))
    if missing or extra:
        raise ValueError(f"{file}: tensors do not match the base ({config.family}, {config.num_layers} layers): "
                         f"missing {missing[:3]}, unexpected {extra[:3]}")  # fmt: skip
    for name, shape in expected.items():
        if entries[name].shape != shape or not entries[name].dtype.is_floating_point:
            raise ValueError(f"{entries[name].where()}: {entries[name].dtype_name} {entries[name].shape}, "
                             f"expected a float {shape} for this base")  # fmt: skip
    return lora


def check_adapter_option(path: str, config: GrokConfig, parallel: bool) -> None:
    """--adapter for generate and serve: one process, and an adapter that fits `config`."""
    from groklm.runtime import UsageError

    if parallel:
        raise UsageError("--adapter runs in one process: merge it first (`groklm merge`), then split the result")
    try:
        check_adapter(path, config)
    except (FileNotFoundError, ValueError, CheckpointError) as e:
        raise UsageError(f"--adapter {e}") from None


def load_adapter(model: Grok, path: str | Path) -> Grok:
    """Wrap `model` with the adapter saved at `path` (dropout off) and load its weights; every tensor
    is checked by name and shape."""
    lora = check_adapter(path, model.config)
    lora.lora_dropout = 0.0
    add_lora(model, lora)
    file = Path(path) / "adapter_model.safetensors"
    entries, _ = read_header(file)
    stored = {name: read_tensor(entry) for name, entry in entries.items()}
    table = {v: k for k, v in hf_module_names(model.config).items()}
    with torch.no_grad():
        for key, value in stored.items():
            module, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
            (ours, expert) = table[module]
            m = model.get_submodule(ours.removesuffix(".weight"))
            target = getattr(m, "lora_" + which.removesuffix(".weight"))
            target = target if expert is None else target[expert]
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{file}: {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
            target.copy_(value)
    return model.eval()


# -- merging ----------------------------------------------------------------------------------------------


def merge(model: Grok) -> Grok:
    """Fold every adapter into its base weight and unwrap it: float bases in place, int8 and int4 bases
    dequantized, summed in fp32 and quantized again with their own grouping (so the merged model is
    laid out, and as large, as the base)."""
    with torch.no_grad():
        for name, m in adapters(model).items():
            base = m.base_layer
            stacked = isinstance(m, LoRAExpertLinear)
            for e in range(base.weight.shape[0]) if stacked else [None]:
                delta = m.delta_weight(e) if stacked else m.delta_weight()  # type: ignore[call-arg]
                w = dense_weight(base, e).float() + delta.float()
                if isinstance(base, (Int8Linear, Int8ExpertLinear)):
                    scales = base.scales if e is None else base.scales[e]
                    q, s = quantize_weight(w, scales.shape[-1], scales.dtype)
                    weight = base.weight if e is None else base.weight[e]
                    if weight.dim() == scales.dim() + 1:  # block-major
                        q = q.unflatten(-1, (scales.shape[-1], -1)).movedim(-2, -3)
                    weight.copy_(q)
                    scales.copy_(s)
                elif isinstance(base, (Int4Linear, Int4ExpertLinear)):
                    scales = base.scales if e is None else base.scales[e]
                    q, s = quantize_weight_int4(w, w.shape[-1] // scales.shape[-1], scales.dtype)
                    weight = base.weight if e is None else base.weight[e]
                    panels = is_panels(weight, scales)
                    weight.copy_(to_panels(q) if panels else q)
                    scales.copy_(scales_to_panels(s) if panels else s)
                else:
                    (base.weight if e is None else base.weight[e]).copy_(w)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)
    return model


def merge_checkpoint(*, checkpoint: str, adapter: str, out: str, config: GrokConfig | None = None,
                     force: bool = False, progress: bool = True) -> Path:  # fmt: skip
    """`groklm merge`: the checkpoint with the adapter folded in, written in groklm's layout (quantized again as
    the base was) with the base's tokenizer. The adapter is checked against the base's config before the base
    is read."""
    from groklm.checkpoints import copy_tokenizer
    from groklm.convert import save_native
    from groklm.files import output_dir
    from groklm.load import checkpoint_config, load

    config, _ = checkpoint_config(checkpoint, config)
    check_adapter(adapter, config)
    with output_dir(out, force) as tmp:
        model = load(checkpoint, config, dtype=torch.bfloat16, progress=progress)
        merge(load_adapter(model, adapter))
        save_native(model, tmp, progress=progress)
    copy_tokenizer(Path(checkpoint), Path(out))
    return Path(out)
