"""groklm's safetensors layout (int8 and int4) and the int4 transform."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import groklm
from groklm import kernels
from groklm.config import GrokConfig
from groklm.convert import save_native
from groklm.convert import to_native as convert
from groklm.files import CheckpointError
from groklm.quant import (
    Int4ExpertLinear,
    Int4Linear,
    dequantize_weight,
    dequantize_weight_int4,
    from_panels,
    is_panels,
    pack_int4,
    quantize_int4,
    quantize_weight,
    quantize_weight_int4,
    scales_from_panels,
    scales_to_panels,
    to_panels,
)
from tests.conftest import GOLDEN


@pytest.mark.parametrize("group_size", [16, 32, 64])
def test_int4_round_trip_error_is_bounded(group_size: int) -> None:
    w = torch.randn(40, 256)
    q, s = quantize_weight_int4(w, group_size, torch.bfloat16)
    assert q.dtype == torch.uint8 and q.shape == (40, 128) and s.shape == (40, 256 // group_size)
    err = (dequantize_weight_int4(q, s) - w).abs()
    amax = w.view(40, -1, group_size).abs().amax(-1).repeat_interleave(group_size, dim=1)
    assert torch.all(err <= amax / 7 * 0.5 * (1 + 2**-7) + amax * 2**-8)  # half a step (+ bf16 scale rounding)


def int4_kernel_reference(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What the native int4 kernel is specified to compute, in float64, and how far activation rounding may
    take it from x @ W.T. Activations go to int8 per segment of columns (the scale group, or its largest
    part of 256, 128, 64 or 32 columns beyond 256): step max|x| / 127, rounded to nearest even; each
    segment's integer sum is exact; the fold is out = out + float(sum) * float(scale * step), in order."""
    m, k = x.shape
    n, groups = s.shape
    kg = k // groups
    seg = kg if kg <= 256 else next(c for c in (256, 128, 64, 32) if kg % c == 0)
    ints = dequantize_weight_int4(q, torch.ones_like(s), torch.float64)  # the integers -8..7
    xf = x.float().view(m, k // seg, seg)
    amax = xf.abs().amax(-1)  # fp32, as the kernel
    inv = torch.where(amax > 0, (127.0 / amax.double()).float(), 0.0)  # IEEE division (torch's fp32 one is not)
    xq = torch.round(xf * inv[..., None]).double()  # half to even
    step = (amax.double() / 127.0).float()
    sums = torch.einsum("mcs,ncs->mnc", xq, ints.view(n, k // seg, seg))  # exact
    factor = (s.float().repeat_interleave(kg // seg, dim=1)[None] * step[:, None, :]).double()  # fp32 products
    out = torch.zeros(m, n, dtype=torch.float64)
    for c in range(k // seg):
        out = (out + sums[..., c] * factor[..., c]).float().double()  # fused multiply-add, rounded to fp32
    w = dequantize_weight_int4(q, s, torch.float64)
    bound = w.abs() @ step.double().repeat_interleave(seg, dim=1).T / 2  # |sum w (x - x_q * step)|
    return out, bound.T


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 9, 17, 65])
@pytest.mark.parametrize("group_size, out_features", [(32, 48), (64, 37), (96, 16), (128, 65), (512, 33)])
def test_int4_kernel_is_its_specified_arithmetic(rows: int, group_size: int, out_features: int) -> None:
    """The kernel against a float64 model of its arithmetic (tight), and against x @ W.T within the bound
    activation rounding allows: one row (rows read in place), several (weight panels), tails of rows."""
    g = torch.Generator().manual_seed(rows + group_size)
    k = 1536 if 1536 % group_size == 0 else 2048
    q, s = quantize_weight_int4(torch.randn(out_features, k, generator=g), group_size, torch.bfloat16)
    assert kernels.supports_int4(q, s)
    x = torch.randn(rows, k, generator=g).bfloat16()
    x[0, :100] *= 40  # an outlier stretch: segments take their own steps
    model, bound = int4_kernel_reference(x, q, s)
    got = kernels.int4_matmul(x, q, s, torch.float32).double()
    torch.testing.assert_close(got, model, rtol=0, atol=1e-6 * model.abs().max().item())
    exact = x.double() @ dequantize_weight_int4(q, s, torch.float64).T
    assert torch.all((got - exact).abs() <= bound * 1.001 + 1e-6 * exact.abs().max())
    assert torch.equal(got[: min(rows, 3)], kernels.int4_matmul(x[: min(rows, 3)], q, s, torch.float32).double())


@pytest.mark.parametrize("group_size", [32, 64, 256])
def test_int4_panels_hold_the_rows_rearranged_and_give_the_same_bits(group_size: int) -> None:
    """Weights laid out in the kernel's panels at load (`pack_int4`) are the rows' bytes rearranged, read
    by the same arithmetic: every result equals the rows' bit for bit, one activation row or many."""
    g = torch.Generator().manual_seed(group_size)
    q, s = quantize_weight_int4(torch.randn(64, 1536, generator=g), group_size, torch.bfloat16)
    p, ps = to_panels(q), scales_to_panels(s)
    assert p.shape == (4, 48, 256) and is_panels(p, ps) and not is_panels(q, s)
    assert torch.equal(from_panels(p), q) and torch.equal(scales_from_panels(ps), s) and ps.shape == s.shape
    # row 17, byte 37 (block 2, dword 1, byte 1): panel 1, block 2, run 1, row 1 of the panel, byte 1
    assert p[1, 2, 1 * 64 + 1 * 4 + 1] == q[17, 37]
    # row 17's scale of group 2: panel 1, group 2, row 1 of the panel
    assert ps.view(4, -1, 16)[1, 2, 1] == s[17, 2] and not torch.equal(ps, s)
    assert kernels.supports_int4(p, ps) and kernels.in_features(p, ps) == 1536
    assert torch.equal(dequantize_weight_int4(p, ps), dequantize_weight_int4(q, s))
    for rows in (1, 2, 3, 4, 9, 17, 65):
        x = torch.randn(rows, 1536, generator=g).bfloat16()
        assert torch.equal(kernels.int4_matmul(x, p, ps, torch.float32), kernels.int4_matmul(x, q, s, torch.float32))
    q2, s2 = quantize_weight_int4(torch.randn(32, 1536, generator=g), group_size, torch.bfloat16)
    x = torch.randn(5, 1536, generator=g).bfloat16()
    together = kernels.linear(4, x, [(p, ps), (to_panels(q2), scales_to_panels(s2))], torch.float32)
    alone = kernels.linear(4, x, [(q, s), (q2, s2)], torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))


@pytest.mark.parametrize("tokens", [1, 3, 40])
def test_fused_int4_moe_in_panels_equals_in_rows(tokens: int) -> None:
    g = torch.Generator().manual_seed(tokens)
    e, d, f = 4, 256, 512
    w1, v, w2 = (quantize_weight_int4(torch.randn(e, *shape, generator=g), 64, torch.bfloat16)
                 for shape in ((f, d), (f, d), (d, f)))  # fmt: skip
    router = torch.randn(e, d, generator=g)
    x = torch.randn(tokens, d, generator=g).bfloat16()
    rows = kernels.moe(x, router, 2, 4, w1, v, w2)
    panels = kernels.moe(x, router, 2, 4, *[(to_panels(w), scales_to_panels(s)) for w, s in (w1, v, w2)])
    assert torch.equal(rows, panels)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernels_give_the_same_bits_however_threads_share_the_rows(bits: int) -> None:
    """The rows of a linear and of the MoE's experts are shared between threads that take them as they
    finish (groklm_linear, groklm_moe): 1 thread or 7 on these cores (oversubscribed, so they run
    unevenly and take from each other's shares, at odd share boundaries), the same bits, every row
    written. The int4 weights in panels (taken in chunks of panels) and in rows (taken a block at a time)."""
    g = torch.Generator().manual_seed(bits)
    e, d, f, n = 6, 256, 2560, 4112  # n: rows past one block (4096) in rows, 257 panels
    quant = (lambda w: quantize_weight_int4(w, 64, torch.bfloat16)) if bits == 4 else (
        lambda w: quantize_weight(w, 2, torch.bfloat16))  # fmt: skip
    layouts = [lambda w: w]
    if bits == 4:
        layouts.append(lambda w: (to_panels(w[0]), scales_to_panels(w[1])))
    lin = [quant(torch.randn(rows, d, generator=g)) for rows in (n, 48)]
    w1, v, w2 = (quant(torch.randn(e, *shape, generator=g)) for shape in ((f, d), (f, d), (d, f)))
    router = torch.randn(e, d, generator=g)
    threads = torch.get_num_threads()
    try:
        for layout in layouts:
            for tokens in (1, 5):
                x = torch.randn(tokens, d, generator=g).bfloat16()
                results = []
                for t in (1, 7, 7, 3):
                    torch.set_num_threads(t)
                    ys = kernels.linear(bits, x, [layout(w) for w in lin], torch.float32)
                    results.append((*ys, kernels.moe(x, router, 2, bits, *map(layout, (w1, v, w2)))))
                for other in results[1:]:
                    assert all(torch.equal(a, b) for a, b in zip(results[0], other, strict=True))
    finally:
        torch.set_num_threads(threads)


def test_quantize_int4_from_int8_modules(golden_config: GrokConfig) -> None:
    model = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False)
    w2 = model.layers[0].moe.w2
    dense = dequantize_weight(w2.weight[3], w2.scales[3])
    quantize_int4(model, group_size=16)
    new = model.layers[0].moe.w2
    assert isinstance(new, Int4ExpertLinear)
    q, s = quantize_weight_int4(dense, 16, torch.bfloat16)
    assert torch.equal(new.weight[3], q) and torch.equal(new.scales[3], s)
    assert isinstance(model.layers[0].moe.router, torch.nn.Linear)  # the router stays fp32


def test_native_int8_is_the_released_model_exactly(tmp_path: Path, golden_config: GrokConfig) -> None:
    released = groklm.load(GOLDEN, golden_config, dtype=torch.bfloat16, progress=False)
    save_native(released, tmp_path / "n8")
    native = groklm.load(tmp_path / "n8", dtype=torch.bfloat16, progress=False)
    tokens = torch.tensor([[1, 5, 9, 77, 300, 12, 1000]])
    assert torch.equal(native(tokens), released(tokens))
    assert json.loads((tmp_path / "n8" / "config.json").read_text()) == golden_config.to_dict()


@pytest.mark.parametrize("mmap", [False, True])
def test_native_int8_written_row_major_loads_block_major(tmp_path: Path, golden_config: GrokConfig, mmap: bool) -> None:
    """Files from before int8 row blocks were held block-major store [.., out, in]: they load, re-laid out."""
    released = groklm.load(GOLDEN, golden_config, dtype=torch.bfloat16, progress=False)
    save_native(released, tmp_path / "n8")
    moved = 0
    for shard in sorted((tmp_path / "n8").glob("model-*.safetensors")):
        tensors = load_file(str(shard))
        for name, t in tensors.items():
            if t.dtype == torch.int8 and t.dim() == tensors[name[: -len("weight")] + "scales"].dim() + 1:
                tensors[name] = t.movedim(-3, -2).flatten(-2).contiguous()  # [.., G, out, in/G] -> [.., out, in]
                moved += 1
        save_file(tensors, str(shard))
    assert moved == 2 * golden_config.num_layers  # each layer's attention output and expert down projection
    native = groklm.load(tmp_path / "n8", dtype=torch.bfloat16, progress=False, mmap=mmap)
    for name, t in released.state_dict().items():
        assert torch.equal(native.state_dict()[name], t), name


def _fake_int4(model: groklm.Grok, group_size: int) -> None:
    """An independent int4: per-group absmax/7 scales (rounded to bf16), weights rounded in float."""
    from groklm.quant import Int8ExpertLinear, Int8Linear

    for module in list(model.modules()):
        if isinstance(module, (Int8Linear, Int8ExpertLinear)):
            d = dequantize_weight(module.weight, module.scales)
            blocks = d.reshape(*d.shape[:-1], -1, group_size)
            step = (blocks.abs().amax(-1, keepdim=True) / 7).bfloat16().float()
            fq = ((blocks / step).round().clamp(-8, 7) * step).reshape(d.shape)
            module.forward = (lambda w: lambda x, *e: torch.nn.functional.linear(x, w[e[0]] if e else w))(fq)


def test_int4_kernels_in_bf16_are_as_near_fp32_as_bf16_itself(mini_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A model in int4 (mini, group 64): bf16 on the native kernels (int8 activations, panels) is about
    as far from the same int4 weights computed in fp32 as bf16 through torch's matmuls is: measured
    0.090 against 0.087 mean |diff| (logits of std 1.0). Activation rounding adds little to bf16's own."""
    tokens = torch.tensor([[422, 3033, 356, 1180, 333, 9072, 360, 2175, 17, 900, 4000, 12]])

    def int4(dtype: torch.dtype) -> torch.Tensor:
        model = quantize_int4(groklm.load(mini_ckpt, dtype=dtype, progress=False), group_size=64)
        return pack_int4(model)(tokens)[0].double()

    exact, kernel = int4(torch.float32), int4(torch.bfloat16)
    monkeypatch.setattr(kernels, "supports_int4", lambda *_: False)
    plain = int4(torch.bfloat16)
    assert (kernel - exact).abs().mean() <= 1.15 * (plain - exact).abs().mean()


def test_int4_model_equals_an_independent_fake_quantization(golden_config: GrokConfig) -> None:
    tokens = torch.tensor([[1, 5, 9, 77, 300, 12, 1000, 4, 18]])
    ours = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False)
    quantize_int4(ours, group_size=16)
    theirs = groklm.load(GOLDEN, golden_config, dtype=torch.float32, progress=False)
    _fake_int4(theirs, 16)
    torch.testing.assert_close(ours(tokens), theirs(tokens), rtol=1e-4, atol=1e-3)


def test_native_int4_round_trip_and_about_half_the_size(tmp_path: Path, mini_ckpt: Path) -> None:
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    save_native(model, tmp_path / "n8")
    quantize_int4(model, group_size=64)
    save_native(model, tmp_path / "n4")
    loaded = groklm.load(tmp_path / "n4", dtype=torch.bfloat16, progress=False)
    int4 = [m for m in loaded.modules() if isinstance(m, (Int4Linear, Int4ExpertLinear))]
    assert int4 and all(is_panels(m.weight, m.scales) for m in int4)  # laid out for the CPU kernel
    tokens = torch.tensor([[422, 3033, 356, 1180, 333, 9072, 360, 2175]])
    assert torch.equal(loaded(tokens), model(tokens))  # (model: rows, quantized in memory)
    mapped = groklm.load(tmp_path / "n4", dtype=torch.bfloat16, progress=False, mmap=True)
    assert not any(is_panels(m.weight, m.scales) for m in mapped.modules() if isinstance(m, Int4Linear))
    assert torch.equal(mapped(tokens), model(tokens))
    save_native(loaded, tmp_path / "again")  # panels are written back in rows
    assert all(torch.equal(t, _shards(tmp_path / "n4")[name]) for name, t in _shards(tmp_path / "again").items())

    def layer_bytes(d: Path) -> int:
        return sum(f.stat().st_size for f in d.glob("model-*.safetensors") if not f.name.endswith("00000.safetensors"))

    assert 0.45 < layer_bytes(tmp_path / "n4") / layer_bytes(tmp_path / "n8") < 0.6


def test_native_checkpoint_with_wrong_names_or_shapes_is_refused(tmp_path: Path, golden_config: GrokConfig) -> None:
    save_native(groklm.load(GOLDEN, golden_config, dtype=torch.bfloat16, progress=False), tmp_path)
    shard = tmp_path / "model-00001.safetensors"
    tensors = load_file(str(shard))
    tensors["layers.0.attn.wq.weightt"] = tensors.pop("layers.0.attn.wq.weight")
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError,
        match=r"missing \['layers.0.attn.wq.weight'\].*unexpected \[.*'layers.0.attn.wq.weightt \(in model-00001.safetensors\)'\]",
    ):
        groklm.load(tmp_path, progress=False)
    tensors["layers.0.attn.wq.weight"] = tensors.pop("layers.0.attn.wq.weightt")[:, :64].contiguous()
    save_file(tensors, str(shard))
    with pytest.raises(
        CheckpointError,
        match=r"model-00001.safetensors: tensor layers.0.attn.wq.weight: shape \(128, 64\), expected \(128, 128\)",
    ):
        groklm.load(tmp_path, progress=False)


_MMAP_RSS = r"""
import json, sys, torch, groklm
def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096
groklm.load(sys.argv[1], dtype=torch.bfloat16, mmap=True, progress=False)  # pay one-time costs (imports) first
before = rss()
model = groklm.load(sys.argv[1], dtype=torch.bfloat16, mmap=True, progress=False)
after_load = rss()
logits = model(torch.tensor([[422, 3033, 356]]))
model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
print(json.dumps({"loaded": after_load - before, "model_bytes": model_bytes, "logits": logits[0, -1, :8].tolist()}))
"""


def test_mmap_loading_pages_weights_in_on_use(tmp_path: Path, mini_ckpt: Path) -> None:
    import subprocess
    import sys

    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    save_native(model, tmp_path / "n8")
    copied = groklm.load(tmp_path / "n8", dtype=torch.bfloat16, progress=False)
    out = subprocess.run(
        [sys.executable, "-c", _MMAP_RSS, str(tmp_path / "n8")], capture_output=True, text=True, check=True
    )
    m = json.loads(out.stdout)
    assert m["loaded"] < 0.2 * m["model_bytes"], m  # nothing read yet: the maps are paged in on use
    expected = copied(torch.tensor([[422, 3033, 356]]))[0, -1, :8]
    assert torch.equal(torch.tensor(m["logits"]), expected)
    with pytest.raises(ValueError, match="mmap loading needs groklm's own layout"):
        groklm.load(mini_ckpt, mmap=True, progress=False)


def _shards(d: Path) -> dict[str, torch.Tensor]:
    return {name: t for shard in sorted(d.glob("model-*.safetensors")) for name, t in load_file(str(shard)).items()}


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_layer_by_layer_equals_the_whole_model_path(tmp_path: Path, mini_ckpt: Path, bits: int) -> None:
    """`convert` (the quantize command) streams one layer at a time; its files equal those of loading
    the whole model, quantizing it and saving it, tensor for tensor and bit for bit. From groklm's
    int8 layout too."""
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    if bits == 4:
        quantize_int4(model, group_size=64)
    save_native(model, tmp_path / "whole")
    want = _shards(tmp_path / "whole")
    convert(mini_ckpt, tmp_path / "streamed", bits, group_size=64, progress=False)
    sources = [tmp_path / "streamed"]
    if bits == 4:  # int8 layout -> int4, from the memory maps
        convert(mini_ckpt, tmp_path / "n8", 8, progress=False)
        convert(tmp_path / "n8", tmp_path / "from-native", 4, group_size=64, progress=False)
        sources.append(tmp_path / "from-native")
    for d in sources:
        got = _shards(d)
        assert sorted(got) == sorted(want)
        for name, t in want.items():
            assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
        assert (d / "config.json").read_text() == (tmp_path / "whole" / "config.json").read_text()
    if bits == 4:
        with pytest.raises(ValueError, match="is int4: int8 cannot be recovered"):
            convert(tmp_path / "streamed", tmp_path / "back", 8, progress=False)


_CONVERT_RSS = r"""
import json, sys, torch
from groklm.convert import to_native as convert
from tests.conftest import peak_rss_since_reset, reset_peak_rss
before = reset_peak_rss()  # after the imports' own transient peak
convert(sys.argv[1], sys.argv[2], int(sys.argv[3]), progress=False)
print(json.dumps({"before": before, "peak": peak_rss_since_reset()}))
"""


def test_convert_holds_one_layer_not_the_model(tmp_path: Path) -> None:
    """Six layers of ~100 MiB of int8 experts (a small vocabulary, so the layers are the model): what
    converting adds to the process's memory peaks at 1-3 layers for int8 (the layer, and safetensors'
    serialized copy of it) and about 3 for int4 (float temporaries, the int4 result); loading the
    model first adds 6 and 11 (measured)."""
    import subprocess
    import sys

    config = groklm.get_preset("mini").replace(
        vocab_size=1024, emb_size=1024, num_q_heads=8, num_kv_heads=2, key_size=128, num_layers=6, widening_factor=6.0
    )
    groklm.write_random_checkpoint(tmp_path / "src", config, seed=0, progress=False)
    layer = sum(f.stat().st_size for f in (tmp_path / "src" / "ckpt-0").iterdir()) / config.num_layers
    assert layer > 90 * 2**20
    for bits in (8, 4):
        out = subprocess.run(
            [sys.executable, "-c", _CONVERT_RSS, str(tmp_path / "src"), str(tmp_path / f"n{bits}"), str(bits)],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parents[1],
        )
        m = json.loads(out.stdout)
        assert m["peak"] - m["before"] < (3 if bits == 8 else 4.5) * layer, (bits, m, layer)
