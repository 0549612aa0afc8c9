"""Chat prompts: messages rendered to text by a Jinja2 template.

Grok-1 is a base model and was released without a chat format. The default is the one xAI's model
card gives for Grok-2 and that SGLang and vLLM use for Grok ("Human: ...<|separator|>\\n\\nAssistant:"):

    System: {system}<|separator|>\\n\\nHuman: {user}<|separator|>\\n\\nAssistant: {reply}<|separator|>\\n\\nAssistant:

(user and system contents stripped of surrounding space, as SGLang's template does). A reply ends at
`<|separator|>`, which the server adds as a stop string for chat. `--chat-template FILE` replaces the
template: it sees `messages` (each a `role` and a `content` string; an assistant's `tool_calls`, a
tool's `tool_call_id`), `tools` (the request's, when calls are allowed), `add_generation_prompt`, and
`bos_token` / `eos_token`, as Hugging Face chat templates do.

Whatever the template, the clients' contents are text: `render_spans` says where they lie in the
prompt, and the tokenizer encodes special-token strings there (`<|separator|>` in a user message) as
plain characters, so no message can forge a turn of another role.

With tools, the default template lists them in a system turn and asks for calls in the format of
`groklm.serve.tools`; an assistant's earlier calls are rendered in that format, a tool's result as
"Tool: <tool_response>...</tool_response>". Tools and call arguments go through `tojson`, which
escapes `<` and `>`: no special-token string can come from them either.
"""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

SEPARATOR = "<|separator|>"
_END = SEPARATOR + "{{ '\\n\\n' }}"  # an expression: whitespace control never strips it
_CALLS = (
    "{%- for c in m.tool_calls or [] -%}"
    '<tool_call>{"name": {{ c.function.name | tojson }}, "arguments": {{ c.function.arguments | tojson }}}</tool_call>'
    "{%- endfor -%}"
)
GROK_TEMPLATE = (
    "{%- if tools -%}System: You can call these functions. To call one, answer with "
    '<tool_call>{"name": NAME, "arguments": ARGUMENTS}</tool_call>, one block per call, ARGUMENTS a JSON '
    "object valid against the function's parameters."
    "{%- for t in tools %}\n{{ t.function | tojson }}{%- endfor -%}" + _END + ""
    "{%- endif -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}System: {{ m.content | trim }}" + _END + ""
    "{%- elif m.role == 'user' -%}Human: {{ m.content | trim }}" + _END + ""
    "{%- elif m.role == 'assistant' -%}Assistant: {{ m.content or '' }}" + _CALLS + _END + ""
    "{%- elif m.role == 'tool' -%}Tool: <tool_response>{{ m.content | trim }}</tool_response>" + _END + ""
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}Assistant:{%- endif -%}"
)


class ChatTemplate:
    def __init__(self, source: str = GROK_TEMPLATE, stop: tuple[str, ...] = (SEPARATOR,)) -> None:
        try:
            self.template = ImmutableSandboxedEnvironment(keep_trailing_newline=True).from_string(source)
        except TemplateError as e:
            raise ValueError(f"chat template: {e}") from None
        self.stop = stop

    @classmethod
    def from_file(cls, path: str | Path) -> ChatTemplate:
        try:
            return cls(Path(path).read_text())
        except OSError as e:
            raise ValueError(f"--chat-template {path}: {e.strerror or e}") from None
        except ValueError as e:
            raise ValueError(f"--chat-template {path}: {e}") from None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
               tools: list[dict[str, Any]] | None = None) -> str:  # fmt: skip
        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        bos_token="", eos_token="", tools=tools or None)  # fmt: skip
        except TemplateError as e:
            raise ValueError(f"messages: the chat template failed on them ({e})") from None

    def render_spans(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                     tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
        """The prompt, and the [start, end) spans of it that came from the messages' contents. Found by
        rendering once more with each content's text between two markers no client can guess (outside
        its surrounding space, which `trim` may take); a template that changes the text it is given
        instead has every place where a content's text appears marked."""
        text = self.render(messages, add_generation_prompt, tools)
        nonce = secrets.token_hex(8)
        start, end = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        marked = []
        for m in messages:
            content = m.get("content") or ""
            core = content.strip()
            if core:
                at = content.index(core)
                content = content[:at] + start + core + end + content[at + len(core) :]
            marked.append({**m, "content": content})
        out = self.render(marked, add_generation_prompt, tools)
        pieces, spans, at, length = [], [], 0, 0
        for m in re.finditer(re.escape(start) + "(.*?)" + re.escape(end), out, re.S):
            pieces.append(out[at : m.start()])
            length += m.start() - at
            spans.append((length, length + len(m.group(1))))
            pieces.append(m.group(1))
            length += len(m.group(1))
            at = m.end()
        pieces.append(out[at:])
        if "".join(pieces) == text:
            return text, spans
        cores = {(m.get("content") or "").strip() for m in messages} - {""}
        return text, sorted((f.start(), f.end()) for c in cores for f in re.finditer(re.escape(c), text))
