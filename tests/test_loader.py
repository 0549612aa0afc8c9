"""The released-format loader: refuses code, names the file and parameter on every bad input."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import groklm
from groklm.config import GrokConfig
from groklm.files import CheckpointError, advise_huge_pages
from groklm.formats.released import reference_params
from groklm.formats.safe_pickle import read_record
from tests.conftest import GOLDEN


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """A writable copy of the golden checkpoint."""
    dst = tmp_path / "ckpt-0"
    shutil.copytree(GOLDEN / "ckpt-0", dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    dst.chmod(0o755)
    return dst


def _load(ckpt: Path, config: GrokConfig) -> groklm.Grok:
    return groklm.load(ckpt, config, dtype=torch.float32, progress=False)


class _System:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.cmd,))


class _Eval:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (eval, ("__import__('pathlib').Path('MARK').touch()",))


@pytest.mark.parametrize("index", [0, 5])  # the fp32 embedding file, an int8 weight file
def test_pickle_calling_os_system_is_refused_and_does_not_run(
    ckpt: Path, golden_config: GrokConfig, tmp_path: Path, index: int
) -> None:
    marker = tmp_path / "pwned"
    name = reference_params(golden_config)[index].name
    (ckpt / f"tensor{index:05d}_000").write_bytes(pickle.dumps(_System(f"touch {marker}"), protocol=4))
    with pytest.raises(CheckpointError) as err:
        _load(ckpt, golden_config)
    assert f"tensor{index:05d}_000" in str(err.value) and name in str(err.value)
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert not marker.exists()


def test_code_nested_inside_a_quantized_weight_is_refused(
    ckpt: Path, golden_config: GrokConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)

    class QuantizedWeight8bit:
        pass

    QuantizedWeight8bit.__module__ = "__main__"
    QuantizedWeight8bit.__qualname__ = "QuantizedWeight8bit"
    monkeypatch.setattr(sys.modules["__main__"], "QuantizedWeight8bit", QuantizedWeight8bit, raising=False)
    q = QuantizedWeight8bit()
    q.__dict__.update(weight=np.zeros((2, 2), np.int8), scales=_Eval())
    (ckpt / "tensor00007_000").write_bytes(pickle.dumps(q, protocol=4))
    with pytest.raises(CheckpointError, match=r"tensor00007_000.*builtins\.eval"):
        _load(ckpt, golden_config)
    assert not (tmp_path / "MARK").exists()


def test_truncated_data_names_file_and_parameter(ckpt: Path, golden_config: GrokConfig) -> None:
    f = ckpt / "tensor00002_000"  # decoder_layer_0/moe/linear/w, int8 with data outside pickle frames
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"tensor00002_000.*truncated.*decoder_layer_0/moe/linear/w"):
        _load(ckpt, golden_config)


def test_truncated_header_names_file_and_parameter(ckpt: Path, golden_config: GrokConfig) -> None:
    f = ckpt / "tensor00001_000"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"tensor00001_000.*language_model/rms_norm/scale"):
        _load(ckpt, golden_config)


def test_garbage_file_names_file_and_parameter(ckpt: Path, golden_config: GrokConfig) -> None:
    (ckpt / "tensor00013_000").write_bytes(random.Random(0).randbytes(4096))
    with pytest.raises(CheckpointError, match=r"tensor00013_000.*decoder_layer_0/router/w"):
        _load(ckpt, golden_config)


@pytest.mark.parametrize(
    "opcode, length",
    [
        (pickle.BINUNICODE8, struct.pack("<Q", 2**62)),
        (pickle.BYTEARRAY8, struct.pack("<Q", 2**62)),
        (pickle.BINBYTES8, struct.pack("<Q", 2**62)),
        (pickle.BINUNICODE, struct.pack("<I", 2**31)),
        (pickle.LONG4, struct.pack("<i", 2**31 - 1)),
        (pickle.FRAME, struct.pack("<Q", 2**62)),
    ],
)
def test_huge_lengths_are_refused_without_allocating(tmp_path: Path, opcode: bytes, length: bytes) -> None:
    """A corrupt length must fail as corrupt, not as a MemoryError (or an exabyte allocation)."""
    path = tmp_path / "tensor00000_000"
    path.write_bytes(pickle.PROTO + b"\x04" + opcode + length + b"x" * 64)
    with pytest.raises(CheckpointError, match=r"tensor00000_000: truncated"):
        read_record(path)


def test_random_garbage_is_always_a_checkpoint_error(tmp_path: Path) -> None:
    """Many garbage files (fixed seeds; they once hit a huge length about one run in six), and the
    same behind a valid pickle header: every one is a CheckpointError naming the file."""
    path = tmp_path / "tensor00000_000"
    for seed in range(300):
        rng = random.Random(seed)
        head = pickle.PROTO + b"\x04" if seed % 2 else b""
        path.write_bytes(head + rng.randbytes(rng.choice([16, 512, 4096])))
        with pytest.raises(CheckpointError, match="tensor00000_000"):
            read_record(path)


def test_missing_file_is_reported(ckpt: Path, golden_config: GrokConfig) -> None:
    (ckpt / "tensor00009_000").unlink()
    named = r"tensor00009_000 \(transformer/decoder_layer_0/rms_norm/scale\) missing"
    with pytest.raises(CheckpointError, match=r"145 tensor files.*needs 146; " + named):
        _load(ckpt, golden_config)
    (ckpt / "tensor00200_000").write_bytes(b"")  # right count, wrong names
    with pytest.raises(CheckpointError, match=named + "; unexpected tensor00200_000"):
        _load(ckpt, golden_config)


def test_misshaped_array_names_file_parameter_and_shapes(ckpt: Path, golden_config: GrokConfig) -> None:
    (ckpt / "tensor00009_000").write_bytes(pickle.dumps(np.ones(127, np.float32), protocol=4))
    with pytest.raises(CheckpointError, match=r"tensor00009_000.*decoder_layer_0/rms_norm/scale.*\(127,\).*\(128,\)"):
        _load(ckpt, golden_config)


def test_misshaped_quantized_scales_are_reported(ckpt: Path, golden_config: GrokConfig) -> None:
    rec = read_record(ckpt / "tensor00007_000")  # query/w, scales [1, 128]
    assert rec.scales.shape == (1, 128)  # type: ignore[union-attr]
    data = bytearray((ckpt / "tensor00007_000").read_bytes())
    # Rewrite the scales' shape tuple (1, 128) as (2, 64) in place: same byte count, wrong layout.
    i = data.rindex(b"K\x01K\x80\x86")
    data[i : i + 5] = b"K\x02K\x40\x86"
    (ckpt / "tensor00007_000").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor00007_000.*query/w scales"):
        _load(ckpt, golden_config)


def test_config_with_wrong_layer_count_is_refused(ckpt: Path, golden_config: GrokConfig) -> None:
    with pytest.raises(CheckpointError, match="wrong config"):
        _load(ckpt, golden_config.replace(num_layers=11))


def test_wrong_width_is_refused_by_shape(ckpt: Path, golden_config: GrokConfig) -> None:
    with pytest.raises(CheckpointError, match=r"tensor00000_000.*embeddings.*\(1024, 128\).*\(1024, 256\)"):
        _load(ckpt, golden_config.replace(emb_size=256))


def test_jax_arrays_and_model_module_quantized_weights_load_without_jax(
    ckpt: Path, golden_config: GrokConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pickles as jax writes them (Array -> jax._src.array._reconstruct_array) and with the
    QuantizedWeight8bit class under `model`, built here with stand-in modules, then loaded with
    those stand-ins gone: the loader must not import jax or anything else named."""
    ref = _load(GOLDEN, golden_config)

    fake_array = types.ModuleType("jax._src.array")

    def _reconstruct_array(fun: object, args: object, arr_state: object, aval_state: object) -> None:
        raise AssertionError("must never be called")

    _reconstruct_array.__module__ = "jax._src.array"
    _reconstruct_array.__qualname__ = "_reconstruct_array"
    fake_array._reconstruct_array = _reconstruct_array  # type: ignore[attr-defined]

    class JaxArray:
        def __init__(self, a: np.ndarray) -> None:
            self.a = a

        def __reduce__(self) -> tuple[object, ...]:
            fun, args, state = self.a.__reduce__()
            return (_reconstruct_array, (fun, args, state, {"weak_type": False}))

    fake_model = types.ModuleType("model")

    class QuantizedWeight8bit:
        pass

    QuantizedWeight8bit.__module__ = "model"
    QuantizedWeight8bit.__qualname__ = "QuantizedWeight8bit"
    fake_model.QuantizedWeight8bit = QuantizedWeight8bit  # type: ignore[attr-defined]
    for name, mod in (
        ("jax", types.ModuleType("jax")),
        ("jax._src", types.ModuleType("jax._src")),
        ("jax._src.array", fake_array),
        ("model", fake_model),
    ):
        monkeypatch.setitem(sys.modules, name, mod)

    norm = np.linspace(0.5, 1.5, 128, dtype=np.float32)
    (ckpt / "tensor00009_000").write_bytes(pickle.dumps(JaxArray(norm), protocol=4))
    w = np.ascontiguousarray(ref.layers[0].attn.wq.weight.T.numpy())  # query/w back in the released [in, out] layout
    q = QuantizedWeight8bit()
    q.__dict__.update(weight=JaxArray(w), scales=np.full((1, 128), 0.01, np.float32))  # fp32 scales are cast
    (ckpt / "tensor00007_000").write_bytes(pickle.dumps(q, protocol=4))
    for name in ("jax", "jax._src", "jax._src.array", "model"):
        monkeypatch.delitem(sys.modules, name)

    m = _load(ckpt, golden_config)
    assert "jax" not in sys.modules
    torch.testing.assert_close(m.layers[0].attn_norm.weight, torch.from_numpy(norm))
    assert torch.equal(m.layers[0].attn.wq.weight, ref.layers[0].attn.wq.weight)
    assert torch.all(m.layers[0].attn.wq.scales == 0.01)


def test_int8_weights_stay_int8_and_model_is_about_its_file_size(golden_config: GrokConfig) -> None:
    m = groklm.load(GOLDEN, golden_config, dtype=torch.bfloat16, progress=False)
    wq = m.layers[0].moe.w2
    assert wq.weight.dtype == torch.int8 and tuple(wq.weight.shape) == (8, 8, 128, 22)  # [E, G, out, in/G]: block-major
    assert tuple(wq.scales.shape) == (8, 128, 8)  # [E, out, G]: 8 blocks of 22 input rows
    floats = [
        n
        for n, t in m.named_parameters()
        if t.dtype != torch.int8 and "norm" not in n and "router" not in n and "embed" not in n
    ]
    assert floats == []
    model_bytes = sum(t.numel() * t.element_size() for t in [*m.parameters(), *m.buffers()])
    disk = sum(f.stat().st_size for f in (GOLDEN / "ckpt-0").iterdir())
    # the fp32 embedding is held in bf16, so the loaded model is smaller than the files
    assert model_bytes < disk


def test_embedding_inside_a_pickle_frame_still_loads_in_bf16(tmp_path: Path, golden_config: GrokConfig) -> None:
    """A small table pickled by numpy sits inside a frame (no file offset to map): it is held in memory."""
    config = golden_config.replace(vocab_size=64)
    groklm.write_random_checkpoint(tmp_path, config, seed=1, progress=False)
    table = np.random.default_rng(0).standard_normal((64, 128)).astype(np.float32) * 0.1
    (tmp_path / "ckpt-0" / "tensor00000_000").write_bytes(pickle.dumps(table, protocol=4))
    assert isinstance(read_record(tmp_path / "ckpt-0" / "tensor00000_000").data, bytes)
    bf16 = groklm.load(tmp_path, dtype=torch.bfloat16, progress=False)
    fp32 = groklm.load(tmp_path, dtype=torch.float32, progress=False)
    assert torch.equal(bf16.embed.weight, torch.from_numpy(table).bfloat16())
    tokens = torch.tensor([[5, 9, 33]])
    torch.testing.assert_close(bf16(tokens), fp32(tokens), rtol=0.05, atol=0.1)


def test_output_head_transform_matches_what_the_loader_builds(golden_config: GrokConfig) -> None:
    """quant.quantize_output_head on a built model == the loader's int8 head made from file rows."""
    from groklm.quant import Int8Linear, quantize_output_head

    by_loader = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False, quantize_head=True)
    by_transform = quantize_output_head(groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False))
    assert isinstance(by_loader.head, Int8Linear) and isinstance(by_transform.head, Int8Linear)
    assert torch.equal(by_loader.head.weight, by_transform.head.weight)
    tokens = torch.tensor([[1, 5, 9, 77, 300, 12]])
    assert torch.equal(by_loader(tokens), by_transform(tokens))


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(a, 16) for a in head.split("-"))
            inside = lo <= address < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_large_weights_are_advised_into_huge_pages() -> None:
    """The 2 MB-aligned inside of a large tensor is marked MADV_HUGEPAGE (VmFlags "hg"); the data is
    untouched and a small tensor is left alone."""
    t = torch.arange(16 << 20, dtype=torch.int32).to(torch.int8)  # 16 MB: holds whole 2 MB pages
    before = t.clone()
    small = torch.ones(1000)
    advise_huge_pages([t, small])
    inside = -(-t.data_ptr() // (2 << 20)) * (2 << 20)
    assert "hg" in _vm_flags(inside)
    assert torch.equal(t, before)
    assert torch.equal(small, torch.ones(1000))
