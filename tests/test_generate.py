"""Generation over the KV cache: cached equals uncached, batched equals one by one, sampling semantics."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import groklm
from groklm import kernels
from groklm.config import get_preset
from groklm.generate import compile_decode, decode_one, generate, prefill, sample, top_k_filter, top_p_filter
from groklm.model import Block, KVCache, RMSNorm, recast, rope_tables
from groklm.quant import QuantizedMoE, quantize_int4, quantize_int8
from groklm.quant.fused import NativeRMSNorm
from groklm.quant.fused_step import QuantizedBlock, QuantizedGrok, QuantizedLayers
from groklm.quant.linear import Int4Linear, Int8Linear
from tests.conftest import not_under_lowered_capability


def test_cached_decoding_equals_uncached_recomputation(mini_fp32: groklm.Grok) -> None:
    seq = torch.tensor([[422, 3033, 356, 1180, 333, 9072, 360, 2175, 391, 359, 1805, 17]])
    full = mini_fp32(seq)  # [1, T, V], no cache
    cache = KVCache.allocate(mini_fp32.config, 1, 16, mini_fp32.dtype, "cpu")
    start = 0
    for size in (5, 1, 3, 1, 1, 1):  # prefill, decode, a multi-token chunk, more decodes
        chunk = seq[:, start : start + size]
        positions = torch.arange(start, start + size)[None]
        logits = mini_fp32(chunk, cache, positions)
        torch.testing.assert_close(logits, full[:, start : start + size], rtol=1e-5, atol=1e-4)
        start += size
    assert start == seq.shape[1]


def test_batched_generation_equals_one_by_one(mini_fp32: groklm.Grok) -> None:
    prompts = [[422, 3033, 356, 1180, 333, 9072, 360, 2175, 391], [17], [5000, 6000, 7000, 8]]
    for kwargs in ({"temperature": 0.0}, {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 7}):
        together = groklm.generate(mini_fp32, prompts, max_new_tokens=12, stop_at_eos=False, **kwargs)  # type: ignore[arg-type]
        alone = [groklm.generate(mini_fp32, [p], max_new_tokens=12, stop_at_eos=False, **kwargs)[0] for p in prompts]  # type: ignore[arg-type]
        assert together == alone
        assert all(len(t) == 12 for t in together)
    assert len(set(together[0])) > 3  # a random model must not just repeat itself


def test_random_model_is_not_degenerate(mini_fp32: groklm.Grok) -> None:
    out = groklm.generate(mini_fp32, [[422, 3033, 356], [1, 17, 245, 999]], max_new_tokens=32, stop_at_eos=False)
    assert all(len(set(o)) >= 8 for o in out), out


def test_seed_reproduces_and_differs(mini_fp32: groklm.Grok) -> None:
    def run(seed: int) -> list[int]:
        return groklm.generate(mini_fp32, [[422, 3033]], max_new_tokens=10, temperature=1.0, seed=seed)[0]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_stop_at_eos(mini_fp32: groklm.Grok) -> None:
    prompt = [422, 3033, 356]
    free = groklm.generate(mini_fp32, [prompt], max_new_tokens=6, stop_at_eos=False)[0]
    eos = free[2]
    config = mini_fp32.config
    object.__setattr__(config, "eos_token", eos)  # pretend the third token is EOS
    try:
        stopped = groklm.generate(mini_fp32, [prompt], max_new_tokens=6, stop_at_eos=True)[0]
    finally:
        object.__setattr__(config, "eos_token", 2)
    assert stopped == free[: free.index(eos) + 1]


def test_top_p_keeps_smallest_set_reaching_p_with_ties() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    # (exact boundaries such as p = 0.5 here depend on float rounding of the cumulative sum)
    assert kept(0.45) == [True, False, False, False]  # 0.5 alone reaches 0.45
    assert kept(0.6) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(0.97) == [True, True, True, True]
    assert kept(1.0) == [True, True, True, True]
    tied = torch.tensor([[0.4, 0.2, 0.2, 0.2]]).log()
    assert torch.isfinite(top_p_filter(tied, 0.5))[0].tolist() == [True, True, True, True]  # ties kept


def test_top_k_and_greedy() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isfinite(top_k_filter(logits, 2))[0].tolist() == [False, True, True, False]
    assert sample(logits, 0.0, 1.0, 0, None).tolist() == [1]
    tied = torch.tensor([[0.0, 2.0, 1.0, 2.0], [float("nan"), 0.0, float("nan"), 5.0]])
    assert sample(tied, 0.0, 1.0, 0, None).tolist() == [1, 0]  # the first maximum, NaN above all, as argmax
    assert sample(tied.bfloat16(), 0.0, 1.0, 0, None).tolist() == [1, 0]  # torch's path, not numpy's
    with torch.inference_mode():
        wide = torch.randn(8, 131072)
        wide[3, [7, 9]] = float("nan")
        wide[5, [30, 10, 20]] = 100.0
        got = sample(wide, 0.0, 1.0, 0, None)
        assert torch.equal(got, wide.max(dim=-1).indices) and got[3] == 7 and got[5] == 10
    draws = {sample(logits, 1.0, 1.0, 2, [torch.Generator().manual_seed(s)]).item() for s in range(40)}
    assert draws == {1, 2}


def test_bad_requests_raise_clear_errors(mini_fp32: groklm.Grok) -> None:
    with pytest.raises(ValueError, match="at least one token"):
        groklm.generate(mini_fp32, [[]], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        groklm.generate(mini_fp32, [[5, 131072]], max_new_tokens=2)
    with pytest.raises(ValueError, match="exceeds the context length"):
        groklm.generate(mini_fp32, [[5]], max_new_tokens=mini_fp32.config.sequence_len)


def test_moe_runs_only_the_chosen_experts(mini_fp32: groklm.Grok) -> None:
    calls: list[tuple[int, int, int]] = []
    handles = []
    for i, layer in enumerate(mini_fp32.layers):

        def hook(_m: torch.nn.Module, args: tuple[torch.Tensor, int], _out: torch.Tensor, i: int = i) -> None:
            calls.append((i, args[1], args[0].shape[0]))

        handles.append(layer.moe.w1.register_forward_hook(hook))
    try:
        tokens = torch.tensor([[422, 3033, 356, 1180, 333]])
        mini_fp32(tokens)
    finally:
        for h in handles:
            h.remove()
    k = mini_fp32.config.num_selected_experts
    for i in range(mini_fp32.config.num_layers):
        rows = [n for layer, _e, n in calls if layer == i]
        assert sum(rows) == tokens.numel() * k  # every (token, chosen expert) pair once, nothing else
        assert len(rows) <= mini_fp32.config.num_experts
    one = []
    handle = mini_fp32.layers[0].moe.w1.register_forward_hook(lambda _m, a, _o: one.append(a[1]))
    try:
        mini_fp32(torch.tensor([[422]]))
    finally:
        handle.remove()
    assert len(one) == k  # a single token touches exactly its two experts


@not_under_lowered_capability
def test_compiled_decode_equals_eager(mini_ckpt: Path) -> None:
    """torch.compile of the decode step (bf16, native kernels as opaque ops): no graph breaks, the
    same logits as eager mode, the same greedy tokens, and no recompiling per request."""
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    assert isinstance(model.layers[0].moe, QuantizedMoE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = compile_decode()
    prompts = [[422, 3033, 356, 1180, 333], [7, 8, 9]]
    with torch.inference_mode():  # as generate allocates: its cache, too, is made of inference tensors
        cache = KVCache.allocate(model.config, 2, 11, model.dtype, model.device)  # as generate(.., 6) allocates
        tokens = prefill(model, prompts, cache).argmax(-1)
        positions = torch.tensor([5, 3])
        eager_cache = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v], cache.key_ok.clone())
        got = compiled(model, tokens, positions, cache.prefix(6))  # the slots in use, as generate passes
        want = decode_one(model, tokens, positions, eager_cache.prefix(6))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())
    torch.testing.assert_close(torch.stack(cache.k), torch.stack(eager_cache.k), rtol=0, atol=0)
    assert generate(model, prompts, 6, decode=compiled) == generate(model, prompts, 6)
    # One graph from the first call on (the cache's length dynamic from the start), reused by
    # another cache size and more steps.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert generate(model, prompts, 9, decode=compiled) == generate(model, prompts, 9)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def _decode_twice(model: groklm.Grok) -> tuple[torch.Tensor, torch.Tensor, KVCache, KVCache]:
    """One decode step of two prompts at different positions, fused, then with the model as plain Grok,
    every block as plain Block and every norm as plain RMSNorm (same weights, same cache before the step):
    (fused logits, plain logits, their caches)."""
    prompts = [[422, 3033, 356, 1180, 333], [7, 8, 9]]
    with torch.inference_mode():
        cache = KVCache.allocate(model.config, 2, 11, model.dtype, model.device)
        tokens = prefill(model, prompts, cache).argmax(-1)
        positions = torch.tensor([5, 3])
        plain_cache = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v], cache.key_ok.clone())
        fused = decode_one(model, tokens, positions, cache.prefix(6))
        blocks = list(model.layers)
        norms = [(name, m) for name, m in model.named_modules() if type(m) is NativeRMSNorm]
        for i, layer in enumerate(blocks):
            model.layers[i] = recast(layer, Block)
        for name, m in norms:
            model.set_submodule(name, recast(m, RMSNorm))
        try:
            plain = decode_one(recast(model, groklm.Grok), tokens, positions, plain_cache.prefix(6))
        finally:
            for i, layer in enumerate(blocks):
                model.layers[i] = layer
            for name, m in norms:
                model.set_submodule(name, m)
    return fused, plain, cache, plain_cache


def _int4_mini(mini_ckpt: Path) -> groklm.Grok:
    model = groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False)
    return quantize_int4(model, group_size=32)  # type: ignore[return-value]


def _int8_mini(**changes: object) -> groklm.Grok:
    """A random mini (with `changes` to its config), int8 with one scale a row (the router left fp32): the
    released checkpoints' attention output projection has 8 scale groups, which mini's 256 columns make
    too narrow for the native kernel."""
    torch.manual_seed(0)
    model = groklm.Grok(dataclasses.replace(get_preset("mini"), **changes), dtype=torch.bfloat16)
    return quantize_int8(model, lambda name: None if name.endswith("router") else 1)  # type: ignore[return-value]


def _count_block_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The layers each `kernels.blocks` or `kernels.decode` call runs, call by call, from now on (a
    decode call's negative: it ran the whole step)."""
    calls: list[int] = []
    blocks, decode = kernels.blocks, kernels.decode
    monkeypatch.setattr(kernels, "blocks", lambda *a, **k: calls.append(len(a[4])) or blocks(*a, **k))
    monkeypatch.setattr(kernels, "decode", lambda *a, **k: calls.append(-len(a[9])) or decode(*a, **k))
    return calls


@pytest.mark.parametrize("make", ["int8", "int4", "grok2-like", "int8 head", "int4 head", "grok2-like head"])
def test_fused_decode_blocks_give_the_blocks_bits(mini_ckpt: Path, monkeypatch: pytest.MonkeyPatch, make: str) -> None:
    """Eager decode runs a whole step as one native call (kernels.decode: the embedding, mask and RoPE, all
    the layers, the final norm, and an int8 or int4 head where the model has its own): norms, RoPE, the
    cache writes and the residuals between the kernels give exactly the logits and cache of the plain
    model."""
    if not kernels.supports_blocks():
        pytest.skip("the C++ ops are not built here")
    # Grok-2's attention temperature (from position 2 on), router soft-cap, erf GELU and unrounded scores
    grok2 = {"attn_temperature_len": 2, "router_softcap": 30.0, "gelu": "erf", "jax_rounding": False}
    untied = {"tie_embeddings": False}

    def int4_untied() -> groklm.Grok:
        torch.manual_seed(0)
        model = groklm.Grok(dataclasses.replace(get_preset("mini"), **untied), dtype=torch.bfloat16)
        return quantize_int4(model, group_size=32)  # type: ignore[return-value]

    makers = {"int8": _int8_mini, "int4": lambda: _int4_mini(mini_ckpt), "grok2-like": lambda: _int8_mini(**grok2),
              "int8 head": lambda: _int8_mini(**untied), "int4 head": int4_untied,
              "grok2-like head": lambda: _int8_mini(**grok2, **untied, final_softcap=5.0)}  # fmt: skip
    model = makers[make]()
    assert type(model) is QuantizedGrok and type(model.layers) is QuantizedLayers and type(model.norm) is NativeRMSNorm
    assert all(type(layer) is QuantizedBlock for layer in model.layers)
    calls = _count_block_calls(monkeypatch)
    heads: list[bool] = []
    decode, unembed = kernels.decode, kernels.unembed
    monkeypatch.setattr(kernels, "decode", lambda *a, **k: heads.append(k.get("head") is not None) or decode(*a, **k))
    monkeypatch.setattr(kernels, "unembed", lambda *a, **k: heads.append(False) or unembed(*a, **k))
    fused, plain, cache, plain_cache = _decode_twice(model)
    assert calls == [-model.config.num_layers]  # the whole step ran as one native call
    native_head = type(model.head) in (Int8Linear, Int4Linear)
    assert native_head == (make != "int8" and make != "grok2-like")  # mini's tied head is quantized by int4 only
    assert heads[-1] is native_head  # the step's one call ran the head too, where it is int8 or int4
    assert torch.equal(cache.key_ok, plain_cache.key_ok)
    assert torch.equal(fused, plain)
    assert torch.equal(torch.stack(cache.k), torch.stack(plain_cache.k))
    assert torch.equal(torch.stack(cache.v), torch.stack(plain_cache.v))


def test_fused_decode_sees_what_changes_after_its_plan_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layers' plan is made once and kept while nothing in the blocks changes: a hook registered on a
    part afterwards runs (that block decodes as plain Block), and a weight replaced afterwards is the one
    read."""
    if not kernels.supports_blocks():
        pytest.skip("the C++ ops are not built here")
    model = _int8_mini()
    layers = model.config.num_layers
    calls = _count_block_calls(monkeypatch)
    before, _, _, _ = _decode_twice(model)
    assert calls == [-layers]  # the plan is made, and kept
    seen: list[int] = []
    handle = model.layers[0].moe.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[1]))
    try:
        fused, plain, _, _ = _decode_twice(model)
    finally:
        handle.remove()
    assert seen == [5, 1, 1] and calls == [-layers, *[1] * (layers - 1)] and torch.equal(fused, plain)
    wo = model.layers[1].attn.wo
    wo.weight = torch.zeros_like(wo.weight)
    fused, plain, _, _ = _decode_twice(model)
    assert calls[-1] == -layers and torch.equal(fused, plain) and not torch.equal(fused, before)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("changes", [{}, {"final_softcap": 5.0, "jax_rounding": False}])
def test_fused_unembed_gives_unembeds_bits(monkeypatch: pytest.MonkeyPatch, bits: int, changes: dict) -> None:
    """An int8 or int4 head gives its logits in one native call (output multiplier, Grok-2's final cap)
    with Grok.unembed's bits; a hook on the head runs, through the plain path."""
    if not kernels.supports_blocks():
        pytest.skip("the C++ ops are not built here")
    torch.manual_seed(0)
    model = groklm.Grok(dataclasses.replace(get_preset("mini"), tie_embeddings=False, **changes), dtype=torch.bfloat16)
    model = (
        quantize_int8(model, lambda name: None if name.endswith("router") else 1)
        if bits == 8
        else quantize_int4(model, 32)
    )
    calls: list[int] = []
    unembed = kernels.unembed
    monkeypatch.setattr(kernels, "unembed", lambda *a: calls.append(a[0]) or unembed(*a))
    h = torch.randn(3, 2, 256, dtype=torch.bfloat16) * 3
    with torch.inference_mode():
        want = recast(model, groklm.Grok).unembed(h)
        assert torch.equal(model.unembed(h), want) and calls == [bits]
        handle = model.head.register_forward_hook(lambda module, args, out: calls.append(0))
        try:
            assert torch.equal(model.unembed(h), want) and calls == [bits, 0]
        finally:
            handle.remove()


def test_fused_decode_rope_rows_are_rope_tables() -> None:
    """A fused decode step reads its rows' RoPE tables from tables made once per doubling of the cache:
    their rows are the numbers rope_tables gives a step for each position alone."""
    model = _int8_mini()
    assert type(model) is QuantizedGrok
    cos, sin = model._rope(70)
    assert cos.shape == sin.shape == (128, model.config.key_size) and model._rope(100)[0] is cos
    for p in (0, 5, 63, 64, 127):
        want = rope_tables(torch.tensor([[p]]), model.config.key_size, model.config.rope_base)
        assert torch.equal(cos[p], want[0][0, 0]) and torch.equal(sin[p], want[1][0, 0])
    assert model._rope(129)[0].shape[0] == 256


def test_native_rms_norm_gives_rmsnorms_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantized model's norms are normed in one native call where the input is bf16 on the CPU and no
    gradient is wanted, with RMSNorm's bits; where a gradient is wanted (the input's or the weight's), or
    the input is fp32, torch's path runs."""
    if not kernels.supports_blocks():
        pytest.skip("the C++ ops are not built here")
    torch.manual_seed(0)
    norm = RMSNorm(256, 1e-5)
    norm.weight.data = torch.randn(256)
    native = recast(RMSNorm(256, 1e-5), NativeRMSNorm)
    native.weight.data = norm.weight.data.clone()
    calls: list[torch.Size] = []
    rms_norm = kernels.rms_norm
    monkeypatch.setattr(kernels, "rms_norm", lambda x, *a: calls.append(x.shape) or rms_norm(x, *a))
    for shape in ((1, 1, 256), (2, 5, 256), (40, 256)):  # 40 rows: split between the threads
        x = torch.randn(*shape, dtype=torch.bfloat16) * 4
        with torch.no_grad():
            assert torch.equal(native(x), norm(x))
    assert calls == [(1, 256), (10, 256), (40, 256)]
    x = torch.randn(3, 256, dtype=torch.bfloat16)
    native(x).float().sum().backward()  # the weight's gradient wanted
    assert native.weight.grad is not None and native.weight.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(native(x.float()), norm(x.float()), rtol=0, atol=0)
    assert len(calls) == 3
    with pytest.raises(ValueError, match=r"rms_norm takes contiguous bf16 CPU rows \[N, D\], not Float"):
        rms_norm(torch.zeros(2, 256), norm.weight.detach(), 1e-5)
    with pytest.raises(ValueError, match=r"the weight must be a contiguous fp32 \[128\]"):
        rms_norm(torch.zeros(2, 128, dtype=torch.bfloat16), norm.weight.detach(), 1e-5)


def test_fused_decode_runs_the_blocks_and_parts_hooks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hook on a part of a block (the routing analysis', a benchmark's) runs: that block decodes as
    plain Block, the others one native call each. A hook on a block itself runs too: the blocks then
    decode one call each. Hooks on the embedding and the final norm run. All give the same logits."""
    if not kernels.supports_blocks():
        pytest.skip("the C++ ops are not built here")
    model = _int8_mini()
    layers = model.config.num_layers
    seen: list[tuple[str, torch.Size]] = []
    for target, name in ((model.layers[1].moe, "moe"), (model.layers[1], "block")):
        calls = _count_block_calls(monkeypatch)
        handle = target.register_forward_pre_hook(lambda module, args, name=name: seen.append((name, args[0].shape)))
        try:
            fused, plain, _, _ = _decode_twice(model)
        finally:
            handle.remove()
        assert calls == [1] * (layers - 1 if name == "moe" else layers)
        assert torch.equal(fused, plain)
    decoded = [(2, 5, 256), (2, 1, 256), (2, 1, 256)]  # prefill, fused decode, plain decode
    assert seen == [("moe", torch.Size(s)) for s in decoded] + [("block", torch.Size(s)) for s in decoded]
    # The embedding runs as a module before the one native call of a step, hooks and all; a hook on the
    # final norm (or on the layers) leaves the layers one call and the rest torch's.
    for target, name, ran in ((model.embed, "embed", -layers), (model.norm, "norm", layers)):
        calls = _count_block_calls(monkeypatch)
        handle = target.register_forward_hook(lambda module, args, out, name=name: seen.append((name, out.shape)))
        try:
            fused, plain, _, _ = _decode_twice(model)
        finally:
            handle.remove()
        assert calls == [ran] and torch.equal(fused, plain)
        assert seen[-3:] == [(name, torch.Size(s)) for s in decoded]


def test_commands_that_do_not_compile_never_import_dynamo(mini_ckpt: Path) -> None:
    """torch._dynamo doubles a command's start-up: only compiling may import it (the kernels mark
    `available` as torch.compiler.assume_constant_result does, and building on meta skips the inits
    that run through torch._refs)."""
    code = (
        "import sys; from groklm.cli import main; "
        f"main(['generate', '--checkpoint', {str(mini_ckpt)!r}, '--prompt-ids', '1,2', '--max-new-tokens', '2', "
        "'--quiet']); assert 'torch._dynamo' not in sys.modules, 'torch._dynamo imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    import torch._dynamo  # what the kernels rely on: the attribute that torch sets

    def marked() -> None: ...

    assert torch.compiler.assume_constant_result(marked)._dynamo_marked_constant  # type: ignore[attr-defined]
    from groklm import kernels

    assert kernels.available._dynamo_marked_constant  # type: ignore[attr-defined]
