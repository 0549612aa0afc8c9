"""The sampling controls (penalties, min_p, logit_bias) and several LoRA adapters in one server, over
real HTTP on 127.0.0.1 with the official `openai` client: every answer equals `groklm.generate` alone
(with `load_adapter` for an adapter, as `groklm generate --adapter` runs), rows with different
settings and adapters share steps, bad values get a 400 naming them, adapters load and unload at run
time behind the API key."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

import groklm
from groklm.sampling import Penalties, apply_penalties, min_p_filter
from groklm.tokenizer import TextStream, Tokenizer
from groklm.train.lora import LoraConfig, adapters, add_lora, load_adapter, save_adapter
from tests.conftest import TOKENIZER
from tests.serving import MODEL, ROOT, Served, serve

KEY = "sesame"
IDS = [422, 3033, 356, 1180]  # greedy repeats tokens after this prompt on the mini model


def _random_adapter(model: groklm.Grok, out: Path, seed: int, rank: int, targets: list[str]) -> Path:
    """A random adapter whose B is not zero, so that it changes the output."""
    gen = torch.Generator().manual_seed(seed)
    lora = LoraConfig(rank, 2.0 * rank, 0.0, targets).check()
    for m in adapters(model).values():
        with torch.no_grad():
            m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=gen) * 0.05)
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=gen) * 0.05)
    return save_adapter(model, lora, out)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, mini_ckpt: Path) -> dict[str, Path]:
    """Five attention adapters (ranks 4 and 8) and one on the experts (which cannot be chosen per row)."""
    tmp = tmp_path_factory.mktemp("loras")
    out = {}
    for rank, names in ((4, ["a1", "a3", "a5"]), (8, ["a2", "a4"])):
        model = add_lora(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), LoraConfig(rank, 1, 0, ["attn"]))
        for name in names:
            out[name] = _random_adapter(model, tmp / name, int(name[1]), rank, ["attn"])
    model = add_lora(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), LoraConfig(4, 1, 0, ["experts"]))
    out["experts"] = _random_adapter(model, tmp / "experts", 9, 4, ["experts"])
    return out


@pytest.fixture(scope="module")
def server(ckpt: Path, loras: dict[str, Path]) -> Iterator[Served]:
    modules = [f"{n}={loras[n]}" for n in ("a1", "a2", "a3", "a4")]
    with serve(ckpt, "--tokenizer", str(TOKENIZER), "--max-batch", "8", "--api-key", KEY,
               "--lora-modules", *modules) as s:  # fmt: skip
        yield s


def client(s: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def alone(
    model: groklm.Grok, tok: Tokenizer, prompt: list[int], max_tokens: int, **sampling: Any
) -> tuple[str, list[int]]:
    new = groklm.generate(model, [prompt], max_new_tokens=max_tokens, **sampling)[0]
    stream = TextStream(tok, prompt)
    return "".join(stream.add(t) for t in new) + stream.finish(), new


def test_penalties_bias_and_min_p_by_the_numbers() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 3.0]] * 3)
    rows = [Penalties(presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((4, -100.0),)), Penalties(),
            Penalties(repetition_penalty=2.0)]  # fmt: skip
    prompts, outputs = [[0], [0], [0, 1]], [[2, 2, 3], [2], [3]]
    out = apply_penalties(logits, rows, prompts, outputs)
    # Row 0: token 2 generated twice (-0.5 - 0.5), token 3 once (-0.5 - 0.25), token 4 biased; its prompt is not penalised.
    assert out[0].tolist() == [2.0, -2.0, 0.0, -0.25, -97.0]
    assert torch.equal(out[1], logits[1])  # no settings: untouched
    # Row 2: the prompt's 0 and 1 and the output's 3, divided when positive, multiplied when negative.
    assert out[2].tolist() == [1.0, -4.0, 1.0, 0.25, 3.0]
    assert torch.equal(logits[0], torch.tensor([2.0, -2.0, 1.0, 0.5, 3.0]))  # the input is not changed
    assert apply_penalties(logits, [Penalties()] * 3, prompts, outputs) is logits
    # min_p 0.3: exp(l - 3) >= 0.3 keeps 3.0 and 2.0 (0.37) only.
    kept = min_p_filter(logits[:1], 0.3)[0]
    assert torch.isfinite(kept).tolist() == [True, False, False, False, True]


def test_logit_bias_bans_a_token_and_penalties_break_a_repeating_greedy_text(
    server: Served, reference: groklm.Grok, tok: Tokenizer
) -> None:
    c = client(server)
    greedy_text, greedy = alone(reference, tok, IDS, 12, temperature=0.0)
    assert len(set(greedy)) < len(greedy)  # the greedy text repeats itself
    r = c.completions.create(model=MODEL, prompt=IDS, max_tokens=12, temperature=0)
    assert r.choices[0].text == greedy_text

    banned = {str(greedy[0]): -100, str(greedy[2]): -100}
    want, new = alone(reference, tok, IDS, 12, temperature=0.0, logit_bias=banned)
    assert greedy[0] not in new and greedy[2] not in new and want != greedy_text
    r = c.completions.create(model=MODEL, prompt=IDS, max_tokens=12, temperature=0, logit_bias=banned)
    assert r.choices[0].text == want

    for settings in ({"frequency_penalty": 2.0}, {"presence_penalty": 1.5}, {"repetition_penalty": 1.3}):
        want, new = alone(reference, tok, IDS, 12, temperature=0.0, **settings)
        assert want != greedy_text and len(set(new)) == len(new), settings
        extra = {"repetition_penalty": settings.pop("repetition_penalty")} if "repetition_penalty" in settings else {}
        r = c.completions.create(model=MODEL, prompt=IDS, max_tokens=12, temperature=0, extra_body=extra, **settings)
        assert r.choices[0].text == want, (settings, extra)

    # Chat takes them too.
    messages = [{"role": "user", "content": "Count: one one one one"}]
    rendered = tok.encode("Human: Count: one one one one<|separator|>\n\nAssistant:")
    want = alone(reference, tok, rendered, 10, temperature=0.0, presence_penalty=2.0, frequency_penalty=1.0)[0]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,  # type: ignore[arg-type]
                                  presence_penalty=2.0, frequency_penalty=1.0)  # fmt: skip
    assert r.choices[0].message.content == want.split("<|separator|>")[0]


def test_min_p_is_applied_and_bad_values_get_a_400_naming_them(
    server: Served, reference: groklm.Grok, tok: Tokenizer
) -> None:
    c = client(server)
    greedy_text, _ = alone(reference, tok, IDS, 10, temperature=0.0)
    hot_text, _ = alone(reference, tok, IDS, 10, temperature=3.0, seed=5)
    assert hot_text != greedy_text
    # min_p 1 keeps only the most likely token: a hot sample becomes the greedy text.
    r = c.completions.create(model=MODEL, prompt=IDS, max_tokens=10, temperature=3.0, seed=5, extra_body={"min_p": 1.0})
    assert r.choices[0].text == greedy_text
    want, _ = alone(reference, tok, IDS, 10, temperature=3.0, seed=5, min_p=0.05)
    r = c.completions.create(
        model=MODEL, prompt=IDS, max_tokens=10, temperature=3.0, seed=5, extra_body={"min_p": 0.05}
    )
    assert r.choices[0].text == want

    bad: list[tuple[dict[str, Any], str]] = [
        ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
        ({"logit_bias": {"99999999": -100}}, "logit_bias"), ({"logit_bias": {"-1": 5}}, "logit_bias"),
    ]  # fmt: skip
    for body, param in bad:
        for route, extra in (
            ("completions", {"prompt": IDS}),
            ("chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
        ):
            r = httpx.post(f"{server.url}/v1/{route}", json={"model": MODEL, "max_tokens": 2, **extra, **body},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=30)  # fmt: skip
            assert r.status_code == 400 and r.json()["error"]["param"] == param, (route, body, r.text)
            assert "\n" not in r.json()["error"]["message"]
    assert c.completions.create(model=MODEL, prompt=IDS, max_tokens=2, temperature=0).choices[0].text


def test_adapters_and_the_base_share_steps_and_each_equals_generate_alone(
    server: Served, reference: groklm.Grok, tok: Tokenizer, mini_ckpt: Path, loras: dict[str, Path]
) -> None:
    c = client(server)
    assert [m.id for m in c.models.list().data] == [MODEL, "a1", "a2", "a3", "a4"]
    refs = {n: load_adapter(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), loras[n])
            for n in ("a1", "a2", "a3", "a4")}  # fmt: skip
    prompts = [IDS, tok.encode("The capital of France is"), tok.encode("Once upon a time there")]
    jobs: list[tuple[str, list[int], dict[str, Any]]] = [
        ("a1", prompts[0], {}), ("a2", prompts[1], {}), ("a3", prompts[2], {}), ("a4", prompts[0], {}),
        ("a1", prompts[1], {"frequency_penalty": 1.0}), (MODEL, prompts[2], {}),
        ("a2", prompts[0], {"temperature": 1.0, "seed": 3, "min_p": 0.1}),
    ]  # fmt: skip
    wants = []
    for name, prompt, settings in jobs:
        model = reference if name == MODEL else refs[name]
        wants.append(alone(model, tok, prompt, 16, **{"temperature": 0.0, **settings})[0])
        if name != MODEL and not settings:  # the adapter changes the text
            assert wants[-1] != alone(reference, tok, prompt, 16, temperature=0.0)[0], name
    base_text = alone(reference, tok, prompts[1], 48, temperature=0.0, stop_at_eos=False)[0]
    # A prompt cached by the base (or another adapter) is prefilled again for an adapter.
    for name in (MODEL, "a1"):
        r = c.completions.create(model=name, prompt=prompts[0], max_tokens=16, temperature=0)
        assert r.choices[0].text == (wants[0] if name == "a1" else alone(reference, tok, prompts[0], 16)[0])

    mixed = server.metric("groklm_lora_mixed_steps_total")
    started = threading.Event()

    def long_base() -> str:  # decoding all along, so every other request shares steps with the base
        text = ""
        for chunk in client(server).completions.create(model=MODEL, prompt=prompts[1], max_tokens=48, temperature=0,
                                                       stream=True, extra_body={"ignore_eos": True}):  # fmt: skip
            text += chunk.choices[0].text if chunk.choices else ""
            started.set()
        return text

    def run(i: int) -> str:
        name, prompt, settings = jobs[i]
        extra = {k: settings[k] for k in ("min_p",) if k in settings}
        plain = {k: v for k, v in settings.items() if k not in extra}
        r = client(server).completions.create(model=name, prompt=prompt, max_tokens=16,
                                              **{"temperature": 0.0, **plain}, extra_body=extra)  # fmt: skip
        assert r.model == name
        return r.choices[0].text

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        base = pool.submit(long_base)
        assert started.wait(120)
        results = list(pool.map(run, range(len(jobs))))
        assert base.result(timeout=300) == base_text
    assert results == wants
    assert server.metric("groklm_lora_mixed_steps_total") > mixed


def test_generate_cli_takes_the_sampling_flags_and_an_adapter(
    server: Served, reference: groklm.Grok, mini_ckpt: Path, loras: dict[str, Path]
) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "groklm", "generate", "--checkpoint", str(mini_ckpt), "--json",
                               "--quiet", "--prompt-ids", ",".join(map(str, IDS)), "--max-new-tokens", "10", *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)  # fmt: skip

    greedy = groklm.generate(reference, [IDS], max_new_tokens=10)[0]
    flags = ["--logit-bias", f"{greedy[0]}=-100,{greedy[1]}=-100", "--frequency-penalty", "0.5",
             "--presence-penalty", "0.5", "--repetition-penalty", "1.1", "--min-p", "0.2"]  # fmt: skip
    want = groklm.generate(reference, [IDS], max_new_tokens=10, logit_bias={greedy[0]: -100, greedy[1]: -100},
                           frequency_penalty=0.5, presence_penalty=0.5, repetition_penalty=1.1, min_p=0.2)[0]  # fmt: skip
    r = cli(*flags)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["token_ids"] == want and greedy[0] not in want

    # `groklm generate --adapter` gives what the server gives for that adapter's name.
    r = cli("--adapter", str(loras["a3"]))
    assert r.returncode == 0, r.stderr
    served = client(server).completions.create(model="a3", prompt=IDS, max_tokens=10, temperature=0)
    stream = TextStream(Tokenizer(TOKENIZER), IDS)
    new = json.loads(r.stdout)["token_ids"]
    assert "".join(stream.add(t) for t in new) + stream.finish() == served.choices[0].text
    assert new != greedy

    for flag, value in (("--min-p", "2"), ("--presence-penalty", "3"), ("--logit-bias", "x=1"),
                        ("--logit-bias", "999999999=-100"), ("--repetition-penalty", "0")):  # fmt: skip
        r = cli(flag, value)
        assert r.returncode == 2 and flag in r.stderr and "Traceback" not in r.stderr, (flag, r.stderr)


def test_load_and_unload_adapters_at_run_time_behind_the_api_key(
    server: Served, mini_ckpt: Path, loras: dict[str, Path], tok: Tokenizer
) -> None:
    url, auth = server.url, {"Authorization": f"Bearer {KEY}"}
    body = {"lora_name": "a5", "lora_path": str(loras["a5"])}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=headers, timeout=30)
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a1"}, headers=headers, timeout=30)
        assert r.status_code == 401
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="a5", prompt=IDS, max_tokens=4)

    r = httpx.post(f"{url}/v1/load_lora_adapter", json=body, headers=auth, timeout=60)
    assert r.status_code == 200, r.text
    assert "a5" in [m.id for m in c.models.list().data]
    want = alone(load_adapter(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), loras["a5"]), tok, IDS,
                 10, temperature=0.0)[0]  # fmt: skip
    assert c.completions.create(model="a5", prompt=IDS, max_tokens=10, temperature=0).choices[0].text == want

    broken = loras["a5"].parent / "broken"  # a config with a file that is not safetensors
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((loras["a5"] / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"\xff" * 64)
    bad = [({"lora_name": "a5", "lora_path": str(loras["a5"])}, 400, "lora_name"),  # taken
           ({"lora_name": MODEL, "lora_path": str(loras["a5"])}, 400, "lora_name"),
           ({"lora_name": "x", "lora_path": "/nonexistent"}, 400, "lora_path"),
           ({"lora_name": "x", "lora_path": str(loras["experts"])}, 400, "lora_path"),
           ({"lora_name": "x"}, 400, "lora_path"),
           ({"lora_name": "x", "lora_path": str(broken)}, 400, "lora_path")]  # fmt: skip
    for payload, status, param in bad:
        r = httpx.post(f"{url}/v1/load_lora_adapter", json=payload, headers=auth, timeout=30)
        assert r.status_code == status and r.json()["error"]["param"] == param, (payload, r.text)

    # Unloaded mid-stream, and another loaded meanwhile: the stream finishes with its adapter, unharmed.
    long_want = alone(load_adapter(groklm.load(mini_ckpt, dtype=torch.bfloat16, progress=False), loras["a5"]), tok,
                      IDS, 32, temperature=0.0, stop_at_eos=False)[0]  # fmt: skip
    text = ""
    for i, chunk in enumerate(c.completions.create(model="a5", prompt=IDS, max_tokens=32, temperature=0, stream=True,
                                                   extra_body={"ignore_eos": True})):  # fmt: skip
        text += chunk.choices[0].text if chunk.choices else ""
        if i == 0:
            r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a5"}, headers=auth, timeout=30)
            assert r.status_code == 200, r.text
            r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "a1b", "lora_path": str(loras["a1"])},
                           headers=auth, timeout=60)  # fmt: skip
            assert r.status_code == 200, r.text
    assert text == long_want
    assert "a5" not in [m.id for m in c.models.list().data]
    a1 = c.completions.create(model="a1", prompt=IDS, max_tokens=8, temperature=0).choices[0].text
    assert c.completions.create(model="a1b", prompt=IDS, max_tokens=8, temperature=0).choices[0].text == a1
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a1b"}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="a5", prompt=IDS, max_tokens=4)
    r = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "a5"}, headers=auth, timeout=30)
    assert r.status_code == 404
    # The others are still there and still right.
    assert c.completions.create(model="a1", prompt=IDS, max_tokens=2, temperature=0).choices[0].text
