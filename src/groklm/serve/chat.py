"""Chat prompts: messages rendered to text by a Jinja2 template.

Grok-1 is a base model and was released without a chat format. The default is the one xAI's model
card gives for Grok-2 and that SGLang and vLLM use for Grok ("Human: ...<|separator|>\\n\\nAssistant:"):

    System: {system}<|separator|>\\n\\nHuman: {user}<|separator|>\\n\\nAssistant: {reply}<|separator|>\\n\\nAssistant:

(user and system contents stripped of surrounding space, as SGLang's template does). A reply ends at
`<|separator|>`, which the server adds as a stop string for chat. `--chat-template FILE` replaces the
template: it sees `messages` (each a `role` and a `content` string), `add_generation_prompt`, and
`bos_token` / `eos_token`, as Hugging Face chat templates do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

SEPARATOR = "<|separator|>"
_END = SEPARATOR + "{{ '\\n\\n' }}"  # an expression: whitespace control never strips it
GROK_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}System: {{ m.content | trim }}" + _END + ""
    "{%- elif m.role == 'user' -%}Human: {{ m.content | trim }}" + _END + ""
    "{%- elif m.role == 'assistant' -%}Assistant: {{ m.content }}" + _END + ""
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

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        try:
            return self.template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
            )
        except TemplateError as e:
            raise ValueError(f"messages: the chat template failed on them ({e})") from None
