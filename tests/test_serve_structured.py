"""Structured outputs and tool calls through `groklm serve` with the official `openai` client: on random
weights only the grammar can make the output valid JSON, a forced call's arguments valid against their
schema. Unknown fields get a 400 naming them; a constrained and a free request share the engine's steps."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import torch

import groklm
from groklm.serve.chat import ChatTemplate
from groklm.serve.constrain import output_constraint
from groklm.serve.grammar import GrammarError, Grammars, _SentencePiece
from groklm.serve.tools import ToolParser, parse_tools
from groklm.tokenizer import Tokenizer, find_tokenizer
from tests.conftest import SHARED, TOKENIZER
from tests.serving import MODEL, Served, serve
from tests.test_serve import alone, client

# Small and bounded: every document the grammar allows fits in well under MAX tokens (strings by a
# pattern of at most 8 ASCII letters, numbers by their range), so the grammar, not max_tokens, ends it.
CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "rank": {"type": "integer", "minimum": 0, "maximum": 99},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "rank", "sunny"],
    "additionalProperties": False,
}
UNIT = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"],
        "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": CITY}},
    {"type": "function", "function": {"name": "set_unit", "parameters": UNIT}},
]
SCHEMAS = {"get_weather": CITY, "set_unit": UNIT}
MAX = 120
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(ckpt: Path) -> Iterator[Served]:
    with serve(ckpt, "--tokenizer", str(TOKENIZER), "--max-batch", "4", "--max-model-len", "512") as s:
        yield s


def test_json_schema_output_parses_and_validates(server: Served) -> None:
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    for seed in range(3):
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX, temperature=1.0, seed=seed,  # type: ignore[arg-type]
                                      response_format=fmt)  # type: ignore[arg-type]  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY)
    # vLLM's structured_outputs on completions, greedy; and its older guided_* names.
    r = c.completions.create(model=MODEL, prompt="Weather:", max_tokens=MAX, temperature=0,
                             extra_body={"structured_outputs": {"json": CITY}})  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), CITY)
    r = c.completions.create(model=MODEL, prompt="Pick:", max_tokens=MAX, temperature=1.0, seed=1,
                             extra_body={"structured_outputs": {"choice": ["yes", "no", "maybe so"]}})  # fmt: skip
    assert r.choices[0].text in ("yes", "no", "maybe so") and r.choices[0].finish_reason == "stop"
    r = c.completions.create(model=MODEL, prompt="Code:", max_tokens=MAX, temperature=1.0, seed=2,
                             extra_body={"guided_regex": "[A-Z]{3}-[0-9]{2}"})  # fmt: skip
    assert re.fullmatch("[A-Z]{3}-[0-9]{2}", r.choices[0].text), r.choices[0].text
    r = c.completions.create(model=MODEL, prompt="Say:", max_tokens=MAX, temperature=1.0, seed=3,
                             extra_body={"structured_outputs": {"grammar": 'start: "a" ("b" | "c")+ "."'}})  # fmt: skip
    assert re.fullmatch("a[bc]+\\.", r.choices[0].text) or r.choices[0].finish_reason == "length"
    # Too few tokens for the document: it stops at max_tokens, and says so.
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=3, temperature=0, response_format=fmt)  # type: ignore[arg-type]
    assert r.choices[0].finish_reason == "length" and (r.choices[0].message.content or "").startswith("{")
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0,  # type: ignore[arg-type]
                                  response_format={"type": "json_object"})  # fmt: skip
    assert (r.choices[0].message.content or "").startswith("{")


def test_forced_and_required_tool_calls_validate(server: Served) -> None:
    c = client(server)
    named = {"type": "function", "function": {"name": "get_weather"}}
    for choice, seed in ((named, 0), ("required", 1), ("required", 2), ("required", 5)):
        r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX, temperature=1.0, seed=seed,  # type: ignore[arg-type]
                                      tools=TOOLS, tool_choice=choice)  # type: ignore[arg-type]  # fmt: skip
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and len(message.tool_calls or []) == 1, message
        call = message.tool_calls[0]  # type: ignore[index]
        assert call.type == "function" and call.id.startswith("call_")
        assert choice == "required" or call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    # The call and its result sent back: the next turn renders both and may call again.
    history = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}]  # fmt: skip
    r = c.chat.completions.create(model=MODEL, messages=history, max_tokens=MAX, temperature=0, tools=TOOLS,  # type: ignore[arg-type]
                                  tool_choice="required")  # type: ignore[arg-type]  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    # tool_choice none: no tools in the prompt, plain text back.
    r = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=4, temperature=0, tools=TOOLS,  # type: ignore[arg-type]
                                  tool_choice="none")  # type: ignore[arg-type]  # fmt: skip
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_is_assembled_by_the_client(server: Served) -> None:
    c = client(server)
    named = {"type": "function", "function": {"name": "set_unit"}}
    with c.chat.completions.stream(model=MODEL, messages=ASK, max_tokens=MAX, temperature=1.0, seed=4,  # type: ignore[arg-type]
                                   tools=TOOLS, tool_choice=named) as stream:  # type: ignore[arg-type]  # fmt: skip
        deltas = [e for e in stream if e.type == "chunk" and e.chunk.choices and e.chunk.choices[0].delta.tool_calls]
        final = stream.get_final_completion()
    assert len(deltas) >= 2  # the id and name, then the arguments
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls[0].function.name == "set_unit"  # type: ignore[index]
    jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments), UNIT)  # type: ignore[index]
    # Streamed JSON mode: the pieces join to a valid document.
    chunks = c.chat.completions.create(model=MODEL, messages=ASK, max_tokens=MAX, temperature=1.0, seed=9, stream=True,  # type: ignore[arg-type]
                                       response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}})  # fmt: skip
    jsonschema.validate(json.loads("".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)), CITY)


def test_a_constrained_and_a_free_request_share_steps(server: Served, reference: groklm.Grok) -> None:
    tok = Tokenizer(TOKENIZER)
    c = client(server)
    prompts = ["The capital of France is", "Once upon a time", "Numbers: one two"]

    def free(p: str) -> str:
        return c.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text

    def constrained(seed: int) -> str:
        return c.completions.create(model=MODEL, prompt="Weather:", max_tokens=MAX, temperature=1.0, seed=seed,
                                    extra_body={"structured_outputs": {"json": CITY}}).choices[0].text  # fmt: skip

    with ThreadPoolExecutor(6) as pool:
        frees = [pool.submit(free, p) for p in prompts]
        docs = [pool.submit(constrained, s) for s in range(3)]
        for p, f in zip(prompts, frees, strict=True):
            assert f.result() == alone(reference, tok, tok.encode(p), 24, temperature=0.0)[0]
        for d in docs:
            jsonschema.validate(json.loads(d.result()), CITY)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/completions", {"prompt": "hi", "bogus_field": 1}, "bogus_field"),
    ("/v1/chat/completions", {"messages": ASK, "bogus_field": 1}, "bogus_field"),
    ("/v1/chat/completions", {"messages": ASK, "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": ASK, "stream_options": {"include_usage": True, "x": 1}}, "stream_options"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "xml"}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "text", "schema": {}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"type": "bogus"}}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": {
        "schema": CITY, "surprise": 1}}}, "response_format"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "[a-"}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"json": {"type": "object", "properties": {
        f"p{i}": {"type": "string"} for i in range(20000)}}}}, "structured_outputs"),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "a", "response_format": {"type": "json_object"}},
     "response_format"),
    ("/v1/completions", {"prompt": "hi", "guided_decoding_backend": "xgrammar"}, "guided_decoding_backend"),
    ("/v1/completions", {"prompt": "hi", "tools": TOOLS}, "tools"),
    ("/v1/chat/completions", {"messages": ASK, "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": ASK, "tools": TOOLS, "tool_choice": {"type": "function",
                              "function": {"name": "nope"}}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
    ("/v1/chat/completions", {"messages": ASK, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "wat"}}}}}],
        "tool_choice": "required"}, "tools"),
    ("/v1/chat/completions", {"messages": [*ASK, {"role": "tool", "content": "42"}]}, "messages"),
    ("/v1/chat/completions", {"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function",
                              "function": {"name": "f", "arguments": "{oops"}}]}]}, "messages"),
    ("/tokenize", {"prompt": "hi", "add_special_tokens": True}, "add_special_tokens"),
]  # fmt: skip


@pytest.mark.parametrize("path, body, param", BAD, ids=[f"{b[0]} {b[2]}" for b in BAD])
def test_unknown_and_unsupported_fields_get_a_400_naming_them(
    server: Served, path: str, body: dict[str, Any], param: str
) -> None:
    r = httpx.post(server.url + path, json=body, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"], error
    good = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert good.status_code == 200


@pytest.mark.parametrize("tokenizer", ["grok-1", "grok-2"])
def test_masks_on_both_vocabularies_give_valid_json(tokenizer: str) -> None:
    """Grok-1's SentencePiece and Grok-2's tiktoken vocabularies, with a model vocabulary larger than
    the tokenizer's (as Grok-2's is): random logits, masked, always give a valid document."""
    tok = Tokenizer(TOKENIZER) if tokenizer == "grok-1" else find_tokenizer(SHARED / "golden" / "grok2-tiny")
    vocab = tok.vocab_size + 64
    constraint = output_constraint(None, {"json": CITY}, {})
    assert constraint is not None
    grammar = Grammars(tok, vocab, tok.eos_id).compile(constraint.grammar, constraint.param)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        m, out = grammar.start(), []
        for _ in range(MAX):
            logits = m.mask(torch.randn(vocab, generator=gen))
            assert torch.isinf(logits[tok.vocab_size :]).all()  # ids the tokenizer lacks are never allowed
            token = int(torch.multinomial(logits.softmax(-1), 1, generator=gen))
            m.accept(token)
            out.append(token)
            if m.done:
                break
        assert m.done and m.error is None
        jsonschema.validate(json.loads(tok.decode(out)), CITY)
    bad = output_constraint(None, {"regex": "("}, {})
    assert bad is not None
    with pytest.raises(GrammarError, match=r"^structured_outputs: .*regex"):
        Grammars(tok, vocab, tok.eos_id).compile(bad.grammar, bad.param)


def test_sentencepiece_as_llguidance_sees_it_encodes_text_without_the_dummy_prefix() -> None:
    tok = Tokenizer(TOKENIZER)
    wrapper = _SentencePiece(tok, tok.vocab_size, tok.eos_id)
    for text in ("test", " test", '{"a": 1}', "", "\n", "\n\nx", "\n\n\n", "  two", "héllo 日本語", "a\tb"):
        assert b"".join(tok.token_bytes(t) for t in wrapper(text)) == text.encode(), text


def test_auto_tool_calls_are_parsed_from_streamed_text_and_the_template_renders_them() -> None:
    tools = parse_tools(TOOLS)
    text = ('Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "paris", "rank": 1, "sunny": true}}'
            '</tool_call><tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_ca')  # fmt: skip
    for size in (1, 3, 7, len(text)):
        p = ToolParser(tools)
        content, calls = "", []
        for i in range(0, len(text), size):
            more, new = p.feed(text[i : i + size])
            content, calls = content + more, calls + new
        content += p.finish()
        assert [c["function"]["name"] for c in calls] == ["get_weather"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "paris", "rank": 1, "sunny": True}
        # An unknown tool's block and an unfinished tag stay text.
        assert content == 'Let me check. <tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_ca'
    # As the server hands them to templates (Hugging Face's convention): arguments parsed.
    call = {"id": "call_1", "type": "function", "function": {"name": "set_unit", "arguments": {"unit": "<|x|>"}}}
    messages = [{"role": "user", "content": "Use celsius"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "ok"}]  # fmt: skip
    prompt = ChatTemplate().render(messages, True, TOOLS)
    assert prompt.startswith("System: You can call these functions.")
    assert json.loads(prompt.split("\n")[2].split("<|separator|>")[0])["name"] == "set_unit"
    assert prompt.endswith(
        'Human: Use celsius<|separator|>\n\nAssistant: <tool_call>{"name": "set_unit", "arguments": {"unit": '
        '"\\u003c|x|\\u003e"}}'  # tojson escapes < and >: no special-token string comes from a call
        "</tool_call><|separator|>\n\nTool: <tool_response>ok</tool_response><|separator|>\n\nAssistant:"
    )


def test_grok2_tiktoken_server_gives_valid_json_and_tool_calls() -> None:
    with serve(SHARED / "golden" / "grok2-tiny", "--max-batch", "2") as s:
        c = client(s)
        fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY}}
        r = c.chat.completions.create(model="grok2-tiny", messages=ASK, max_tokens=MAX, temperature=1.0, seed=0,  # type: ignore[arg-type]
                                      response_format=fmt)  # type: ignore[arg-type]  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY)
        r = c.chat.completions.create(model="grok2-tiny", messages=ASK, max_tokens=MAX, temperature=0, tools=TOOLS,  # type: ignore[arg-type]
                                      tool_choice="required")  # type: ignore[arg-type]  # fmt: skip
        call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_generate_takes_matchers_too(reference: groklm.Grok) -> None:
    """`groklm.generate` with a matcher on one row: that row is a valid document, the free row unchanged."""
    tok = Tokenizer(TOKENIZER)
    config = reference.config
    constraint = output_constraint({"type": "json_schema", "json_schema": {"schema": CITY}}, None, {})
    assert constraint is not None
    grammar = Grammars(tok, config.vocab_size, config.eos_token).compile(constraint.grammar, constraint.param)
    prompts = [tok.encode("Weather:"), tok.encode("Once upon a time")]
    free = groklm.generate(reference, prompts[1:], max_new_tokens=60)[0]
    doc, same = groklm.generate(reference, prompts, max_new_tokens=60, matchers=[grammar.start(), None])
    jsonschema.validate(json.loads(tok.decode(doc)), CITY)
    assert same == free
    with pytest.raises(ValueError, match="matchers: one per prompt"):
        groklm.generate(reference, prompts, max_new_tokens=4, matchers=[None])
