"""What a client may send, in one place: the request bodies of the OpenAI API (with vLLM's
extensions), parsed strictly, and the limits a request must meet before any work is done for it.

Every check raises `ApiError`, which the app answers with OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`; a 400's message starts with the field it names.
Types are strict, as the API defines them: token ids and counts are JSON integers (not `1.0`, `true`
or `"3"`); numbers may be integers or floats; text is valid Unicode (no lone surrogates).
A new field goes into its model below; a check that needs the server's settings goes into `Limits`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind, self.headers = (
            status, message, param, code, kind, headers)  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(e: ValueError) -> ApiError:
    """A ValueError from the checks, whose message starts with the setting's name, as a 400 naming it."""
    message = str(e).replace("max_new_tokens", "max_tokens")
    param = message.split(":")[0].split(" ")[0].split(".")[0]
    return ApiError(400, message, param=param if param.isidentifier() else None)


# -- request bodies ---------------------------------------------------------------------------


class _Body(BaseModel):
    """A field the body does not define is a 400 naming it (nothing silently ignored): a new parameter
    is one line in its model, and one in the README's list."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class Sampling(_Body):
    """Fields both endpoints take."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None  # OpenAI's end-user id for abuse monitoring: accepted, no effect
    response_format: dict[str, Any] | None = None  # read by constrain.py, as are the rest
    structured_outputs: dict[str, Any] | None = None  # vLLM's
    guided_json: dict[str, Any] | str | None = None  # vLLM's names before 0.12
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON, as OpenAI sends it


class ToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None  # passed to a custom template; the default one does not show it
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's result answers this call

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Body):
    prompt: str | None = None
    messages: list[Message] | None = None


class DetokenizeRequest(_Body):
    tokens: list[int]


# What a field of several shapes must be, said once (pydantic names each shape that failed).
_SHAPES = {
    "prompt": "must be a string, a list of strings, a list of token ids (integers) or a list of such lists",
    "stop": "must be a string or a list of strings",
    "content": "must be a string or a list of text parts",
}

Body = TypeVar("Body", bound=BaseModel)


def parse(model: type[Body], raw: bytes) -> Body:
    """The JSON body `raw` as `model`, or an ApiError (400) naming the field. Slow for large bodies:
    call it off the event loop."""
    if re.search(rb"\\u[dD][89a-fA-F]", raw):  # a surrogate escape: the JSON parser would not say where
        try:
            _check_text(json.loads(raw), "")
        except ValueError:
            pass  # not JSON: said below
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise _invalid(e) from None


def _check_text(value: Any, where: str) -> None:
    """400 naming the first string in a parsed body that is not valid Unicode (a lone surrogate)."""
    stack = [(where, value)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError as e:
                field = where.split(".")[0] or None
                raise ApiError(400, f"{where or 'body'}: not valid Unicode text (a lone surrogate "
                                    f"{value[e.start]!r} at character {e.start})", field) from None  # fmt: skip
        elif isinstance(value, dict):
            stack += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(f"{where}.{i}" if where else str(i), v) for i, v in enumerate(value)]


def _invalid(e: ValidationError) -> ApiError:
    first = e.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON ({first.get('msg')})")
    loc = [str(p) for p in first.get("loc", ())]
    if not loc:
        return ApiError(400, f"body: {first.get('msg')} (a JSON object)")
    if first.get("type") == "extra_forbidden":
        return ApiError(400, f"{'.'.join(loc)}: unrecognized or unsupported parameter (the README lists each "
                             "route's)", loc[0], "unknown_parameter")  # fmt: skip
    shape = next((i for i, p in enumerate(loc) if p in _SHAPES), None)
    if shape is not None and len(loc) > shape + 1 and not loc[shape + 1].isdigit():  # one of its shapes failed
        return ApiError(400, f"{'.'.join(loc[: shape + 1])}: {_SHAPES[loc[shape]]}", loc[0])
    return ApiError(400, f"{'.'.join(loc)}: {first.get('msg')}", loc[0])


# -- limits -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The server's settings a request must fit, checked before any tokenizing or queueing."""

    capacity: int  # sequences that may wait at once (--max-waiting): more in one request can never be admitted
    max_model_len: int  # tokens per sequence
    max_text: int  # characters of text per sequence (context x the longest token's characters)

    def sequences(self, prompts: int, n: int) -> None:
        if isinstance(n, bool) or not 1 <= n <= self.capacity:
            raise ApiError(400, f"n: must be in 1..{self.capacity} (--max-waiting), not {n}", "n")
        if prompts * n > self.capacity:
            raise ApiError(400, f"prompt: {prompts} prompts x n = {n} make {prompts * n} sequences, more than the "
                                f"{self.capacity} this server can ever queue (--max-waiting)", "prompt")  # fmt: skip

    def text(self, text: str, param: str) -> None:
        if len(text) > self.max_text:
            raise ApiError(400, f"{param}: {len(text)} characters can not fit the context of {self.max_model_len} "
                                "tokens", param)  # fmt: skip

    def ids(self, ids: list[int], param: str, at_most: int | None = None) -> None:
        """A prompt must leave room for one new token; `at_most` ids otherwise."""
        if len(ids) > (self.max_model_len - 1 if at_most is None else at_most):
            raise ApiError(400, f"{param}: {len(ids)} tokens do not fit the context of {self.max_model_len} "
                                "tokens", param)  # fmt: skip

    def completion(self, req: CompletionRequest) -> None:
        """Every prompt's size and the number of sequences, from the body alone."""
        p = req.prompt
        if isinstance(p, str):
            self.sequences(1, req.n)
            self.text(p, "prompt")
        elif p and isinstance(p[0], int):
            self.sequences(1, req.n)
            self.ids(p, "prompt")  # type: ignore[arg-type]
        else:
            self.sequences(len(p), req.n)
            for one in p:
                if isinstance(one, str):
                    self.text(one, "prompt")
                else:
                    self.ids(one, "prompt")  # type: ignore[arg-type]

    def chat(self, req: ChatRequest | TokenizeRequest) -> None:
        if isinstance(req, ChatRequest):
            self.sequences(1, req.n)
        self.text("".join(m.text() for m in req.messages or []), "messages")
