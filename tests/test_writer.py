"""`init-random` writes exactly the released format: standard pickle + numpy + ml_dtypes read it."""

from __future__ import annotations

import dataclasses
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import groklm
from groklm.config import GrokConfig
from groklm.formats.released import reference_params
from groklm.formats.safe_pickle import SafeUnpickler
from groklm.quant import dequantize_weight
from tests.conftest import GOLDEN


def _globals(path: Path) -> set[tuple[str, str]]:
    """The globals a pickle asks for, recorded as it is parsed (safely)."""
    found: set[tuple[str, str]] = set()

    class Recorder(SafeUnpickler):
        def find_class(self, module: str, name: str) -> object:
            found.add((module, name))
            return super().find_class(module, name)

    with open(path, "rb") as f:
        Recorder(f, path.stat().st_size).load()
    return found


@pytest.fixture(scope="module")
def tiny_written(tmp_path_factory: pytest.TempPathFactory, golden_config: GrokConfig) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    groklm.write_random_checkpoint(out, golden_config, seed=3, progress=False)
    return out


def test_written_files_name_the_same_globals_as_the_release(tiny_written: Path, golden_config: GrokConfig) -> None:
    for p in reference_params(golden_config)[:14]:
        ours, theirs = _globals(tiny_written / "ckpt-0" / p.file), _globals(GOLDEN / "ckpt-0" / p.file)
        theirs = {
            ("numpy.core.multiarray", n) if m.startswith("numpy") and n == "_reconstruct" else (m, n) for m, n in theirs
        }
        assert ours == theirs, p.name


def test_standard_unpickling_reads_what_we_wrote(
    tiny_written: Path, golden_config: GrokConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trusted path the reference uses (plain pickle.load with numpy and ml_dtypes)."""
    pytest.importorskip("ml_dtypes")

    @dataclasses.dataclass
    class QuantizedWeight8bit:
        weight: np.ndarray
        scales: np.ndarray

    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit, raising=False)
    model = groklm.load(tiny_written, dtype=torch.float32, progress=False)
    params = {p.name: p for p in reference_params(golden_config)}
    for name, module, check in [
        ("transformer/decoder_layer_1/multi_head_attention/linear/w", model.layers[1].attn.wo, "int8"),
        ("transformer/decoder_layer_0/moe/linear_1/w", model.layers[0].moe.w2, "int8"),
        ("transformer/decoder_layer_0/router/w", model.layers[0].moe.router, "router"),
        ("language_model/in_out_embed/embeddings", model.embed, "embed"),
    ]:
        with open(tiny_written / "ckpt-0" / params[name].file, "rb") as f:
            obj = pickle.load(f)  # trusted here: we wrote it
        if check == "int8":
            assert obj.weight.dtype == np.int8 and str(obj.scales.dtype) == "bfloat16"
            assert obj.weight.shape == params[name].shape and obj.scales.shape[-2] == params[name].groups
            released = obj.weight.astype(np.float32) * np.repeat(
                obj.scales.astype(np.float32), obj.weight.shape[-2] // obj.scales.shape[-2], axis=-2
            )
            ours = dequantize_weight(module.weight, module.scales).transpose(-1, -2)  # back to [.., in, out]
            np.testing.assert_array_equal(ours.numpy(), released)
        elif check == "router":
            np.testing.assert_array_equal(module.weight.T.numpy(), obj)
        else:
            assert obj.dtype == np.float32
            np.testing.assert_array_equal(module.weight.numpy(), obj)


def test_config_json_is_written_and_read_back(tiny_written: Path, golden_config: GrokConfig) -> None:
    assert GrokConfig.from_json(tiny_written / "config.json") == golden_config
    model = groklm.load(tiny_written, dtype=torch.float32, progress=False)
    assert model.config == golden_config
