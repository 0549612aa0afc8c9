"""Tool calls: the format the chat template documents, the grammar that forces a call, and the parser
that finds calls in the model's text (whole or streamed).

The format (Grok's released templates define none): the template lists the tools and tells the model
to answer a call as

    <tool_call>{"name": "NAME", "arguments": {...}}</tool_call>

one block per call. `tool_choice` "auto" parses such blocks out of free text; "required" and a named
function force one block by a grammar whose `arguments` are valid against that function's JSON schema.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from groklm.serve.grammar import GrammarError, compact_schema

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CALL = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.S)


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


def parse_tools(tools: list[dict[str, Any]]) -> dict[str, Tool]:
    """The request's `tools` by name; GrammarError (a ValueError) naming the bad entry."""
    out: dict[str, Tool] = {}
    for i, t in enumerate(tools):
        where = f"tools.{i}"
        fn = t.get("function")
        if t.get("type") != "function" or not isinstance(fn, dict):
            raise GrammarError(f'{where}: a tool is {{"type": "function", "function": {{...}}}}')
        unknown = sorted(set(t) - {"type", "function"}) + sorted(
            set(fn) - {"name", "description", "parameters", "strict"}
        )
        if unknown:
            raise GrammarError(f"{where}: unknown field {unknown[0]!r}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise GrammarError(f"{where}.function.name: 1-64 letters, digits, '_' or '-', not {name!r}")
        if name in out:
            raise GrammarError(f"{where}.function.name: {name!r} is given twice")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise GrammarError(f"{where}.function.parameters: a JSON schema object")
        out[name] = Tool(name, params)
    return out


def call_grammar(tools: list[Tool]) -> str:
    """A Lark grammar (llguidance's) for one call of one of `tools`, its arguments valid against the schema."""
    options = [
        {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]  # fmt: skip
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    try:
        return f'start: "{OPEN}" call "{CLOSE}"\ncall: %json {json.dumps(compact_schema(schema))}\n'
    except RecursionError:
        raise GrammarError("tools: a function's parameters are nested too deeply") from None


def new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(body: str, tools: dict[str, Tool]) -> dict[str, Any] | None:
    """The OpenAI tool call a block's JSON makes, or None if it names no known tool."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict) or data.get("name") not in tools:
        return None
    arguments = data.get("arguments", {})
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return {"id": new_id(), "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(arguments, ensure_ascii=False)}}  # fmt: skip


class ToolParser:
    """Splits the model's text into content and tool calls as it arrives: text that may still begin a
    `<tool_call>` block is held back, a block is parsed once closed; a block that is not a valid call of a
    known tool stays in the content."""

    def __init__(self, tools: dict[str, Tool], parallel: bool = True) -> None:
        self.tools, self.parallel = tools, parallel
        self.pending = ""
        self.calls: list[dict[str, Any]] = []

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content now final, calls now complete)."""
        self.pending += text
        content, calls = "", []
        while True:
            start = self.pending.find(OPEN)
            if start < 0:
                keep = _partial_tail(self.pending, OPEN)
                content += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep :]
                return content, calls
            content += self.pending[:start]
            m = _CALL.match(self.pending, start)
            if m is None:  # the block is not closed yet
                self.pending = self.pending[start:]
                return content, calls
            call = _call(m.group(1).strip(), self.tools)
            if call is None or (self.calls and not self.parallel):
                content += m.group(0) if call is None else ""
            else:
                self.calls.append(call)
                calls.append(call)
            self.pending = self.pending[m.end() :]

    def finish(self) -> str:
        """The rest (an unclosed block stays text)."""
        rest, self.pending = self.pending, ""
        return rest


def _partial_tail(text: str, tag: str) -> int:
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def parse(text: str, tools: dict[str, Tool], parallel: bool = True) -> tuple[str, list[dict[str, Any]]]:
    """The content and tool calls of a whole reply."""
    p = ToolParser(tools, parallel)
    content, calls = p.feed(text)
    return content + p.finish(), calls
