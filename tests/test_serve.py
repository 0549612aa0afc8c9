"""`groklm serve` over real HTTP on 127.0.0.1, with the official `openai` client: results equal
`groklm.generate` alone, under concurrency; bad requests get their 4xx and do not hurt the next one;
disconnects, a full queue and SIGTERM behave; the playground works in headless Chromium."""

from __future__ import annotations

import random
import shutil
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import groklm
from groklm.tokenizer import TextStream, Tokenizer
from tests.conftest import TOKENIZER
from tests.serving import MODEL, Served, finished_by_length, serve, stop, streaming


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[Served]:
    # 4 rows for up to 16 requests: most wait and join a busy batch mid-flight; 16-token prefill
    # chunks, so longer prompts are prefilled in several steps between decode steps.
    with serve(ckpt, "--tokenizer", str(TOKENIZER), "--max-batch", "4", "--prefill-chunk", "16") as s:
        yield s


def alone(model: groklm.Grok, tok: Tokenizer, prompt: list[int], max_tokens: int, **sampling: Any) -> tuple[str, int]:
    """What `groklm.generate` gives this prompt alone: the text the server should send, and its token count."""
    new = groklm.generate(model, [prompt], max_new_tokens=max_tokens, **sampling)[0]
    stream = TextStream(tok, prompt)
    return "".join(stream.add(t) for t in new) + stream.finish(), len(new)


def client(s: Served, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.url}/v1", api_key=key, max_retries=0, timeout=120)


def test_openai_client_completions_and_chat(server: Served, reference: groklm.Grok, tok: Tokenizer) -> None:
    c = client(server)
    prompt = "The answer to life the universe and everything is of course"
    want, n = alone(reference, tok, tok.encode(prompt), 12, temperature=0.0)
    r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.choices[0].finish_reason in ("length", "stop")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(tok.encode(prompt)), n)
    pieces = list(c.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces if p.choices) == want
    assert pieces[-1].usage.completion_tokens == n and pieces[-2].choices[0].finish_reason == "length"

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is your name?"}]
    rendered = "System: Be brief.<|separator|>\n\nHuman: What is your name?<|separator|>\n\nAssistant:"
    want, n = alone(reference, tok, tok.encode(rendered), 10, temperature=0.0)
    want = want.split("<|separator|>")[0]
    r = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)  # type: ignore[arg-type]
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(tok.encode(rendered))
    chunks = list(c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True))  # type: ignore[arg-type]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert [m.id for m in c.models.list().data] == [MODEL]


def test_logprobs_echo_n_and_token_id_prompts(server: Served, reference: groklm.Grok, tok: Tokenizer) -> None:
    c = client(server)
    ids = [422, 3033, 356, 1180]
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0, logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(tok.decode(ids))
    assert len(lp.tokens) == len(ids) + 5 and lp.token_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 3 for t in lp.top_logprobs[1:])
    # Greedy: each chosen token is the top alternative.
    assert all(
        max(t.values()) == pytest.approx(v)
        for t, v in zip(lp.top_logprobs[len(ids) :], lp.token_logprobs[len(ids) :], strict=True)
    )
    # n = 2 with a seed: choice i samples with seed + i, as generate alone does with that seed.
    r = c.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=1.0, seed=11, n=2)
    for i in range(2):
        assert r.choices[i].text == alone(reference, tok, ids, 8, temperature=1.0, seed=11 + i)[0]
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 2 for t in content)
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "The answer"}, timeout=30).json()
    assert r["tokens"] == tok.encode("The answer") and r["count"] == 2
    assert (
        httpx.post(f"{server.url}/detokenize", json={"tokens": r["tokens"]}, timeout=30).json()["prompt"]
        == "The answer"
    )
    assert httpx.get(f"{server.url}/health", timeout=30).json() == {"status": "ok"}


def test_16_staggered_concurrent_streams_equal_generate_alone(
    server: Served, reference: groklm.Grok, tok: Tokenizer
) -> None:
    rng = random.Random(0)
    words = "the of and a to in is you that it he was for on are as with his they at be this from".split()
    jobs = []
    for i in range(16):
        prompt = " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))  # 1-60 words: 1-4 prefill chunks
        settings: dict[str, Any] = (
            {"temperature": 0.0} if i % 2 == 0
            else {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 100 + i}
        )  # fmt: skip
        jobs.append((prompt, rng.randint(4, 40), settings))

    def run(i: int) -> tuple[str, int, str | None]:
        prompt, max_tokens, settings = jobs[i]
        time.sleep(0.07 * i)  # staggered: later ones join a busy batch
        extra = {"top_k": settings.pop("top_k")} if "top_k" in settings else {}
        stream = client(server).completions.create(
            model=MODEL, prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True},
            extra_body=extra, **settings,
        )  # fmt: skip
        if extra:
            settings["top_k"] = extra["top_k"]
        text, usage, reason = "", 0, None
        for chunk in stream:
            if chunk.usage:
                usage = chunk.usage.completion_tokens
            for ch in chunk.choices:
                text += ch.text
                reason = ch.finish_reason or reason
        return text, usage, reason

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    for (prompt, max_tokens, settings), (text, usage, reason) in zip(jobs, results, strict=True):
        want, n = alone(reference, tok, tok.encode(prompt), max_tokens, **settings)
        assert (text, usage) == (want, n), (prompt, settings)
        assert reason == ("length" if n == max_tokens else "stop")
    assert server.metric("groklm_requests_running") == 0


def test_a_cached_prefix_is_reused_and_gives_the_same_tokens(
    server: Served, reference: groklm.Grok, tok: Tokenizer
) -> None:
    system = "You are a helpful assistant. " * 12
    c = client(server)
    before = server.metric("groklm_prefix_cache_hit_tokens_total")
    for question in ("What is the capital of France?", "And of Italy?"):
        prompt = system + question
        r = c.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0)
        assert r.choices[0].text == alone(reference, tok, tok.encode(prompt), 6, temperature=0.0)[0]
    reused = server.metric("groklm_prefix_cache_hit_tokens_total") - before
    assert reused >= len(tok.encode(system)) - 1
    assert r.usage.prompt_tokens_details.cached_tokens >= len(tok.encode(system)) - 1


BAD: list[tuple[str, str, dict[str, Any] | str, int, str | None]] = [
    ("post", "/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": []}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": [[]]}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": [5, 999999]}, 400, "prompt"),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens"),
    ("post", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("post", "/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("post", "/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("post", "/v1/completions", {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("post", "/v1/completions", {"prompt": "hi", "top_k": -3}, 400, "top_k"),
    ("post", "/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("post", "/v1/completions", {"prompt": "hi", "logprobs": 9}, 400, "logprobs"),
    ("post", "/v1/completions", {"prompt": "hi", "stop": ""}, 400, "stop"),
    ("post", "/v1/completions", {"prompt": "hi", "seed": -5}, 400, "seed"),
    ("post", "/v1/completions", {"prompt": "hi", "model": "grok-9"}, 404, "model"),
    ("post", "/v1/completions", {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    ("post", "/v1/completions", {"prompt": "hi", "logit_bias": {"5": -101}}, 400, "logit_bias"),
    ("post", "/v1/completions", {"prompt": "hi", "suffix": "end"}, 400, "suffix"),
    ("post", "/v1/completions", "{not json", 400, None),
    ("post", "/v1/completions", {"prompt": "x" * (9 << 20)}, 413, None),
    ("post", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, 400, "top_logprobs"),
    ("post", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ("post", "/tokenize", {}, 400, "prompt"),
    ("post", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/tmp"}, 403, None),  # no --api-key: refused
    ("post", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("get", "/v1/nothing-here", {}, 404, None),
]  # fmt: skip


@pytest.mark.parametrize("method, path, body, status, param", BAD, ids=[f"{b[1]} {str(b[2])[:40]}" for b in BAD])
def test_bad_requests_get_their_4xx_and_the_next_request_works(
    server: Served, method: str, path: str, body: dict[str, Any] | str, status: int, param: str | None
) -> None:
    kwargs: dict[str, Any] = (
        {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, str) else {"json": body}
    )
    r = httpx.request(method.upper(), server.url + path, timeout=60, **(kwargs if method == "post" else {}))
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    if param is not None:
        assert error["param"] == param and param in error["message"], error
    good = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, "temperature": 0}, timeout=60
    )
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 2


def test_a_client_that_leaves_mid_stream_frees_its_row_within_a_step(server: Served) -> None:
    aborted = server.metric("groklm_requests_finished_total", 'reason="abort"')
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                      json={"prompt": "Once", "max_tokens": 1900, "ignore_eos": True, "stream": True}) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(10):
            next(lines)
        assert server.metric("groklm_requests_running") == 1
    deadline = time.monotonic() + 30
    while server.metric("groklm_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.metric("groklm_requests_running") == 0
    assert server.metric("groklm_requests_finished_total", 'reason="abort"') == aborted + 1
    # Released at the first step after the server learnt of it, not later.
    assert server.metric("groklm_abort_release_steps_bucket", 'le="1.0"') == server.metric(
        "groklm_abort_release_steps_count"
    )
    good = client(server).completions.create(model=MODEL, prompt="Hi", max_tokens=3)
    assert good.usage.completion_tokens <= 3


@pytest.fixture(scope="module")
def small(ckpt: Path) -> Iterator[Served]:
    with serve(
        ckpt, "--tokenizer", str(TOKENIZER), "--max-batch", "1", "--max-waiting", "1", "--api-key", "sesame"
    ) as s:
        yield s


def test_a_full_queue_gets_503_with_retry_after(small: Served) -> None:
    headers = {"Authorization": "Bearer sesame"}
    body = {"prompt": "Once", "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{small.url}/v1/completions", json=body, headers=headers, timeout=60) as first:
        lines = first.iter_lines()  # (kept: an iterator dropped closes the connection, and the server aborts)
        next(lines)  # running: holds the only row
        with httpx.stream("POST", f"{small.url}/v1/completions", json=body, headers=headers, timeout=60) as second:
            deadline = time.monotonic() + 30
            while small.metric("groklm_requests_waiting") < 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            r = httpx.post(
                f"{small.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers, timeout=60
            )
            assert (
                r.status_code == 503 and r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full"
            )
            assert second.status_code == 200
            assert small.metric("groklm_requests_finished_total", 'reason="abort"') == 0
    deadline = time.monotonic() + 30
    while (
        small.metric("groklm_requests_running") or small.metric("groklm_requests_waiting")
    ) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{small.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=headers, timeout=60)
    assert r.status_code == 200


def test_api_key(small: Served) -> None:
    for key, status in (("wrong", 401), ("", 401), ("sesame", 200)):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(
            f"{small.url}/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers=headers, timeout=60
        )
        assert r.status_code == status, r.text
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(small, "wrong").models.list()
    assert client(small, "sesame").models.list().data[0].id == MODEL
    assert httpx.get(f"{small.url}/health", timeout=30).status_code == 200  # outside /v1: open


def test_sigterm_finishes_in_flight_streams_then_exits(ckpt: Path) -> None:
    with serve(ckpt, "--tokenizer", str(TOKENIZER)) as s:
        reader, got = streaming(s, 300)
        s.process.send_signal(signal.SIGTERM)
        reader.join(timeout=120)
        code = stop(s.process, timeout=60)
    assert finished_by_length(got)
    assert code == 0, "".join(s.stderr)[-2000:]


@pytest.mark.skipif(
    shutil.which("chromedriver") is None, reason="needs Debian's chromium-driver (scripts/test.sh installs it)"
)
def test_playground_streams_into_the_page_in_headless_chromium(
    server: Served, reference: groklm.Grok, tok: Tokenizer
) -> None:
    assert shutil.which("chromedriver"), "needs Debian's chromium and chromium-driver: scripts/test.sh installs them"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.set_page_load_timeout(60)
        driver.get(server.url + "/")
        WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "model").text == MODEL)
        prompt = "The answer to life the universe and everything is of course"
        driver.find_element(By.ID, "prompt").send_keys(prompt)
        for field, value in (("max_tokens", "12"), ("temperature", "0")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        driver.find_element(By.ID, "send").click()
        WebDriverWait(driver, 60).until(lambda d: d.find_element(By.ID, "stats").text.startswith("done"))
        answer = driver.find_element(By.CSS_SELECTOR, "#output .answer").get_attribute("textContent")
        assert answer == alone(reference, tok, tok.encode(prompt), 12, temperature=0.0)[0]
        stats = driver.find_element(By.ID, "stats").text
        assert "12 tokens" in stats and "tokens/s" in stats, stats
        assert driver.find_element(By.ID, "error").text == ""
    finally:
        driver.quit()
