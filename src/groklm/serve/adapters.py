"""Several LoRA adapters on one frozen base, chosen per request and never merged: rows of one batch
that use different adapters (or none) run in the same model call.

Each adapted projection becomes a `MultiLoRALinear` holding the A and B of every loaded adapter
stacked, [S, r, in] and [S, out, r] in fp32 (slot 0 is all zeros: the base), ranks padded with
zeros to the largest. Before a model call the engine sets each row's slot (`AdapterSet.rows`); the
projection gathers the rows' A and B and adds base(x) + (x A^T) B^T * scaling with two batched
products, as `train.lora.LoRALinear` computes it for one adapter. A call whose rows all use the base
skips the adapters: it runs the base exactly as an unadapted model does.

Adapters on the attention projections and Grok-2's dense MLP can be chosen per row; the experts and
the router choose a row's computation by token, not by row, so adapters on them are refused here
(merge them with `groklm merge`, or serve one with `--adapter`).

Loading and unloading swap in new stacks between steps (under `lock`, which every adapted model call
holds). An unloaded adapter's weights stay stacked while a sequence still uses it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from groklm.model import Grok
from groklm.train.lora import LINEAR, features, hf_module_names, read_adapter_config

PER_ROW_TARGETS = ("wq", "wk", "wv", "wo", "gate", "up", "down")


@dataclass(eq=False)
class Adapter:
    """One loaded adapter: its A [r, in] and B [out, r] (fp32) per adapted module, by our module name."""

    name: str
    path: str
    scaling: float
    weights: dict[str, tuple[Tensor, Tensor]]
    index: int = 0  # its slot in the stacks, set under the lock (0 is the base)
    retired: bool = False  # unloaded: no new requests, its slot kept while sequences use it


class _Rows:
    ids: Tensor | None = None  # each row's slot for the model call running now; None: all the base


class MultiLoRALinear(nn.Module):
    """base(x) + per row (x A^T) B^T * scaling of that row's adapter; `rows.ids` [B] picks them."""

    def __init__(self, base: nn.Module, rows: _Rows) -> None:
        super().__init__()
        self.base_layer = base
        self.rows = rows
        self.A: Tensor | None = None  # [S, r, in]
        self.B: Tensor | None = None  # [S, out, r]
        self.scaling: Tensor | None = None  # [S]

    @property
    def weight(self) -> Tensor:  # what code asking a linear for its weight (dtype, device) sees
        return self.base_layer.weight

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        ids = self.rows.ids
        if ids is None or self.A is None or self.B is None or self.scaling is None:
            return y
        xs = x.reshape(ids.shape[0], -1, x.shape[-1]).float()  # [B, T, in]: x is [B, T, in] or [B * T, in]
        delta = torch.bmm(torch.bmm(xs, self.A[ids].transpose(1, 2)), self.B[ids].transpose(1, 2))
        return y + (delta * self.scaling[ids][:, None, None]).reshape(y.shape).to(y.dtype)


class AdapterSet:
    """The adapters loaded on `model`, by name. `read` checks an adapter directory (no lock: it reads
    the disk), `add` and `remove` install and drop one between steps, `rows` runs a model call with
    each row's adapter."""

    def __init__(self, model: Grok) -> None:
        self.model = model
        self.lock = threading.Lock()
        self.by_name: dict[str, Adapter] = {}
        self._slots: list[Adapter] = []
        self._rows = _Rows()
        self._modules: dict[str, MultiLoRALinear] = {}

    def names(self) -> list[Adapter]:
        return list(self.by_name.values())

    def get(self, name: str) -> Adapter | None:
        return self.by_name.get(name)

    def read(self, name: str, path: str | Path) -> Adapter:
        """Read and check the adapter at `path` (PEFT's format); ValueError or FileNotFoundError naming
        the file and what is wrong."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not name or not name.strip() or name != name.strip():
            raise ValueError(f"adapter name {name!r}: must be non-empty, without surrounding spaces")
        lora = read_adapter_config(path)
        wrong = [t for t in lora.target_modules if t not in PER_ROW_TARGETS]
        if wrong:
            raise ValueError(f"{Path(path) / 'adapter_config.json'}: adapters on {wrong} cannot be chosen per "
                             f"request (only {list(PER_ROW_TARGETS)}): merge it (`groklm merge`) or serve it with "
                             "--adapter")  # fmt: skip
        file = Path(path) / "adapter_model.safetensors"
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing")
        try:
            stored = load_file(str(file))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
        table = hf_module_names(self.model.config)
        weights: dict[str, tuple[Tensor, Tensor]] = {}
        expected: set[str] = set()
        for module_name, module in self.model.named_modules():
            leaf = module_name.rpartition(".")[2]
            if leaf not in lora.target_modules or not module_name.startswith("layers."):
                continue
            base = module.base_layer if isinstance(module, MultiLoRALinear) else module
            if not isinstance(base, LINEAR):
                continue
            key = f"base_model.model.{table[(f'{module_name}.weight', None)]}"
            expected |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight"}
            in_f, out_f = features(base)
            pair = []
            for which, shape in (("A", (lora.r, in_f)), ("B", (out_f, lora.r))):
                t = stored.get(f"{key}.lora_{which}.weight")
                if t is None:
                    continue
                if tuple(t.shape) != shape or not t.is_floating_point():
                    raise ValueError(f"{file}: {key}.lora_{which}.weight is {t.dtype} {tuple(t.shape)}, expected a "
                                     f"float tensor of shape {shape}")  # fmt: skip
                t = t.float()
                if not torch.isfinite(t).all():
                    raise ValueError(f"{file}: {key}.lora_{which}.weight holds NaN or infinite values")
                pair.append(t.to(self.model.device))
            if len(pair) == 2:
                weights[module_name] = (pair[0], pair[1])
        missing, extra = sorted(expected - set(stored)), sorted(set(stored) - expected)
        if missing or extra or not weights:
            raise ValueError(f"{file}: tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
        return Adapter(name, str(path), lora.lora_alpha / lora.r, weights)

    def add(self, adapter: Adapter, in_use: Iterable[Adapter | None] = ()) -> None:
        """Install `adapter` under its name (ValueError if the name is taken)."""
        with self.lock:
            if adapter.name in self.by_name:
                raise ValueError(f"lora_name: an adapter named {adapter.name!r} is loaded already")
            for module_name in adapter.weights:
                if module_name not in self._modules:
                    parent, _, child = module_name.rpartition(".")
                    wrapped = MultiLoRALinear(self.model.get_submodule(module_name), self._rows)
                    setattr(self.model.get_submodule(parent), child, wrapped)
                    self._modules[module_name] = wrapped
            self.by_name[adapter.name] = adapter
            self._restack(set(in_use))

    def remove(self, name: str, in_use: Iterable[Adapter | None] = ()) -> None:
        """Unload adapter `name` (KeyError if there is none): new requests cannot name it; sequences
        already using it finish with it."""
        with self.lock:
            adapter = self.by_name.pop(name)
            adapter.retired = True
            self._restack(set(in_use))

    def _restack(self, in_use: set[Adapter | None]) -> None:
        kept = [a for a in self._slots if not a.retired or a in in_use]
        for gone in set(self._slots) - set(kept):
            gone.weights = {}  # (a cached prefix's row may still name it: only its identity is kept)
        self._slots = kept
        self._slots += [a for a in self.by_name.values() if a not in self._slots]
        for i, a in enumerate(self._slots, 1):
            a.index = i
        device = self.model.device
        slots = len(self._slots) + 1
        scaling = torch.tensor([0.0] + [a.scaling for a in self._slots], device=device)
        for module_name, module in self._modules.items():
            have = [(a.index, *a.weights[module_name]) for a in self._slots if module_name in a.weights]
            if not have:
                module.A = module.B = module.scaling = None
                continue
            rank = max(a.shape[0] for _, a, _ in have)
            in_f, out_f = have[0][1].shape[1], have[0][2].shape[0]
            A = torch.zeros(slots, rank, in_f, device=device)
            B = torch.zeros(slots, out_f, rank, device=device)
            for i, a, b in have:
                A[i, : a.shape[0]] = a
                B[i, :, : b.shape[1]] = b
            module.A, module.B, module.scaling = A, B, scaling

    @contextlib.contextmanager
    def rows(self, adapters: list[Adapter | None]) -> Iterator[None]:
        """Run a model call whose batch rows use `adapters` (None: the base)."""
        with self.lock:
            if any(a is not None for a in adapters):
                ids = [0 if a is None else a.index for a in adapters]
                self._rows.ids = torch.tensor(ids, device=self.model.device)
            try:
                yield
            finally:
                self._rows.ids = None


def use_adapters(model: Grok, adapters: list[Adapter | None]) -> contextlib.AbstractContextManager[None]:
    """`AdapterSet.rows` of the set installed on `model`; nothing to do where none is."""
    found: AdapterSet | None = getattr(model, "adapter_set", None)
    if found is None:
        return contextlib.nullcontext()
    return found.rows(adapters)


def install(model: Grok) -> AdapterSet:
    """An empty adapter set on `model` (its projections are wrapped as adapters come)."""
    found: AdapterSet | None = getattr(model, "adapter_set", None)
    if found is None:
        found = AdapterSet(model)
        object.__setattr__(model, "adapter_set", found)
    return found
