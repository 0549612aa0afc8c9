"""What a request asks to constrain, read from its fields: OpenAI's `response_format`, vLLM's
`structured_outputs` (and its older `guided_*` names), and `tools` with `tool_choice`. Every error is a
GrammarError (a ValueError) whose message starts with the field's dotted name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from groklm.serve import grammar as g
from groklm.serve.tools import Tool, call_grammar, parse_tools

# vLLM's structured_outputs keys this server takes; its others (whitespace_pattern, structural_tag, ...) get a 400.
STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
# vLLM's names before 0.12, still sent by many clients: each is one structured_outputs key.
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


@dataclass(frozen=True)
class Constraint:
    grammar: str  # llguidance's grammar text
    param: str  # the request field it came from


def output_constraint(response_format: Any, structured_outputs: Any, guided: dict[str, Any]) -> Constraint | None:
    """The grammar the output must follow, if any of these fields asks for one (at most one may)."""
    asked = [(name, value) for name, value in guided.items() if value is not None]
    if structured_outputs is not None:
        asked.append(("structured_outputs", structured_outputs))
    fmt = None if response_format is None else _response_format(response_format)
    if fmt is not None:
        asked.append(("response_format", fmt))
    if len(asked) > 1:
        raise g.GrammarError(f"{asked[1][0]}: give one of response_format, structured_outputs or guided_*, "
                             f"not also {asked[0][0]}")  # fmt: skip
    if not asked:
        return None
    name, value = asked[0]
    if name == "response_format":
        return Constraint(value, name)
    if name == "structured_outputs":
        if not isinstance(value, dict):
            raise g.GrammarError("structured_outputs: an object with one of " + ", ".join(STRUCTURED_KEYS))
        unknown = sorted(set(value) - set(STRUCTURED_KEYS))
        if unknown:
            raise g.GrammarError(f"structured_outputs.{unknown[0]}: not supported (this server takes "
                                 f"{', '.join(STRUCTURED_KEYS)})")  # fmt: skip
        given = [(k, v) for k, v in value.items() if v is not None and v is not False]
        if len(given) != 1:
            raise g.GrammarError("structured_outputs: give exactly one of " + ", ".join(STRUCTURED_KEYS))
        key, v = given[0]
        return Constraint(_structured(key, v, f"structured_outputs.{key}"), name)
    return Constraint(_structured(GUIDED[name], value, name), name)


def _format_type(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in ("text", "json_object", "json_schema"):
        raise g.GrammarError(f"response_format.type: one of text, json_object, json_schema, not {kind!r}")
    return str(kind)


def _response_format(value: dict[str, Any]) -> str | None:
    """The grammar `response_format` asks for; None for text."""
    kind = _format_type(value)
    extra = sorted(set(value) - {"type"} - ({"json_schema"} if kind == "json_schema" else set()))
    if extra:
        raise g.GrammarError(f"response_format.{extra[0]}: unknown field")
    if kind == "text":
        return None
    if kind == "json_object":
        return g.json_schema_grammar({"type": "object"}, "response_format")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise g.GrammarError('response_format.json_schema: {"name": ..., "schema": {...}, "strict": true}')
    extra = sorted(set(spec) - {"name", "schema", "strict", "description"})
    if extra:
        raise g.GrammarError(f"response_format.json_schema.{extra[0]}: unknown field")
    if spec.get("strict") not in (None, True, False):
        raise g.GrammarError("response_format.json_schema.strict: true or false")
    # strict or not, the schema is enforced: the grammar cannot follow it loosely.
    return g.json_schema_grammar(spec.get("schema", {}), "response_format.json_schema.schema")


def _structured(key: str, value: Any, param: str) -> str:
    if key == "json_object":
        return g.json_schema_grammar({"type": "object"}, param)
    if key == "json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise g.GrammarError(f"{param}: not JSON ({e})") from None
        return g.json_schema_grammar(value, param)
    if key == "choice":
        if not isinstance(value, list):
            raise g.GrammarError(f"{param}: a list of strings")
        return g.choice_grammar(value, param)
    if not isinstance(value, str) or not value:
        raise g.GrammarError(f"{param}: a non-empty string")
    return g.regex_grammar(value) if key == "regex" else g.lark_grammar(value, param)


@dataclass(frozen=True)
class ToolUse:
    """How a chat request uses its tools: the ones the template lists, the ones calls are parsed for,
    and the grammar that forces a call ("required" or a named function)."""

    listed: list[dict[str, Any]] | None
    tools: dict[str, Tool]
    forced: Constraint | None
    parallel: bool


def tool_use(tools: list[Any] | None, tool_choice: Any, parallel: bool | None) -> ToolUse | None:
    if tool_choice is not None and not tools and tool_choice != "none":
        raise g.GrammarError("tool_choice: needs tools")
    if not tools:
        return None
    if not all(isinstance(t, dict) for t in tools):
        raise g.GrammarError("tools: a list of tool objects")
    by_name = parse_tools(tools)
    choice = "auto" if tool_choice is None else tool_choice
    if choice == "none":
        return None
    parallel = True if parallel is None else parallel
    if choice == "auto":
        return ToolUse(tools, by_name, None, parallel)
    if choice == "required":
        return ToolUse(tools, by_name, Constraint(call_grammar(list(by_name.values())), "tools"), False)
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(name, str):
        raise g.GrammarError('tool_choice: "none", "auto", "required" or {"type": "function", "function": '
                             '{"name": ...}}')  # fmt: skip
    if name not in by_name:
        raise g.GrammarError(f"tool_choice: no tool is named {name!r}")
    return ToolUse(tools, by_name, Constraint(call_grammar([by_name[name]]), "tools"), False)
