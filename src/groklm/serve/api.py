"""The OpenAI-compatible HTTP API over an `Engine`: FastAPI routes, Server-Sent Events for streams.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
POST /tokenize, POST /detokenize, GET /metrics (Prometheus), GET / (the playground). Request and
response shapes are the OpenAI API's, with vLLM's extensions (`top_k`, `ignore_eos`,
`stop_token_ids`, `structured_outputs`); structured outputs and tool calls are read by `constrain.py`,
enforced by `grammar.py` and parsed by `tools.py`. A field a body does not define is a 400 naming it.
Errors are OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: 400 with the field named
for a bad request (`protocol.py` parses and bounds every body), 401 for a wrong
API key, 404 for an unknown model, 408 for a body too slow and 413 for one too big (`guard.py`), 500
for a request whose generation failed (that request alone), 503 with Retry-After when the wait queue
is full or the server is stopping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from groklm.sampling import Penalties, parse_logit_bias
from groklm.serve import tools as tool_calls
from groklm.serve.adapters import Adapter, AdapterSet
from groklm.serve.chat import ChatTemplate
from groklm.serve.constrain import Constraint, ToolUse, output_constraint, tool_use
from groklm.serve.engine import Draining, Engine, Event, FinishEvent, Params, PromptLogprobs, QueueFull, TokenEvent
from groklm.serve.grammar import Grammar, GrammarError, Grammars
from groklm.serve.guard import Guard
from groklm.serve.logprobs import Logprobs, chat_logprob
from groklm.serve.lora_api import add_adapter_routes
from groklm.serve.offload import off_loop, on_heavy_thread
from groklm.serve.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    DetokenizeRequest,
    Limits,
    Message,
    Sampling,
    TokenizeRequest,
    bad,
    parse,
)

MAX_BODY = 8 << 20
BODY_TIMEOUT = 30.0
T = TypeVar("T")


# -- the app -----------------------------------------------------------------------------------


class Server:
    """Everything a request handler needs: the engine, the tokenizer, the names, the limits."""

    def __init__(self, engine: Engine, model_name: str, api_key: str | None, chat: ChatTemplate,
                 adapters: AdapterSet | None = None) -> None:  # fmt: skip
        self.engine, self.model_name, self.api_key, self.chat = engine, model_name, api_key, chat
        self.adapters = adapters
        self.tokenizer = engine.tokenizer
        self.created = int(time.time())
        tok = self.tokenizer
        longest = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size)) if tok is not None else 1
        self.limits = Limits(max(1, engine.max_waiting), engine.max_model_len, engine.max_model_len * max(1, longest))
        config = engine.model.config
        self.grammars = Grammars(self.tokenizer, config.vocab_size, config.eos_token)

    def _encoder(self, param: str) -> Any:
        if self.tokenizer is None:
            raise ApiError(400, f"{param}: text needs a tokenizer and this server has none; send token ids", param)
        return self.tokenizer

    async def encode(self, text: str, param: str) -> list[int]:
        return await off_loop(len(text), self._encoder(param).encode, text)

    async def encode_all(self, texts: list[str], param: str) -> list[list[int]]:
        tok = self._encoder(param)
        return await off_loop(sum(map(len, texts)), lambda: [tok.encode(t) for t in texts])

    async def encode_chat(self, messages: list[Message], add_generation_prompt: bool,
                          tools: list[dict[str, Any]] | None = None) -> list[int]:  # fmt: skip
        """The chat prompt's ids; the clients' contents are text (special-token strings in them too)."""
        tok = self._encoder("messages")

        def run() -> list[int]:
            text, spans = _render(self, messages, add_generation_prompt, tools)
            return tok.encode(text, spans)  # type: ignore[no-any-return]

        return await off_loop(sum(len(m.text()) for m in messages) + len(json.dumps(tools or [])), run)

    async def grammar(self, constraint: Constraint | None) -> Grammar | None:
        """The compiled grammar, 400 naming the field. On the heavy-work thread: the first builds the
        vocabulary (about half a second), a large one takes up to a second."""
        if constraint is None:
            return None
        try:
            return await on_heavy_thread(self.grammars.compile, constraint.grammar, constraint.param)
        except GrammarError as e:
            raise bad(e) from None

    def check_model(self, model: str | None) -> Adapter | None:
        """The adapter a request's `model` names (None: the base); 404 for a name the server does not serve."""
        if model is None or model == self.model_name:
            return None
        adapter = self.adapters.get(model) if self.adapters is not None else None
        if adapter is None:
            served = [self.model_name, *(a.name for a in self.adapters.names())] if self.adapters else [self.model_name]
            raise ApiError(404, f"The model `{model}` does not exist (this server serves {', '.join(map(repr, served))})",
                           "model", "model_not_found")  # fmt: skip
        return adapter

    def params(
        self, req: Sampling, logprobs: int | None, prompt_logprobs: bool, chat: bool, default_max: int
    ) -> Params:
        try:
            penalties = Penalties(req.presence_penalty or 0.0, req.frequency_penalty or 0.0,
                                  1.0 if req.repetition_penalty is None else req.repetition_penalty,
                                  parse_logit_bias(req.logit_bias))  # fmt: skip
        except ValueError as e:
            raise bad(e) from None
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise ApiError(400, "stop: at most 16 stop strings", "stop")
        if chat:
            stop += [s for s in self.chat.stop if s not in stop]
        max_tokens = getattr(req, "max_completion_tokens", None)
        max_tokens = req.max_tokens if max_tokens is None else max_tokens
        return Params(
            max_tokens=default_max if max_tokens is None else max_tokens,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=0 if req.top_k is None else req.top_k,
            seed=req.seed,
            stop=tuple(stop),
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            penalties=penalties,
            min_p=0.0 if req.min_p is None else req.min_p,
        )


def create_app(engine: Engine, model_name: str, api_key: str | None = None, chat: ChatTemplate | None = None,
               max_body: int = MAX_BODY, body_timeout: float = BODY_TIMEOUT, adapters: AdapterSet | None = None
               ) -> FastAPI:  # fmt: skip
    server = Server(engine, model_name, api_key, chat or ChatTemplate(), adapters)
    app = FastAPI(title="groklm", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, limit=max_body, api_key=api_key, timeout=body_timeout, engine=engine)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return ApiError(e.status_code, str(e.detail), None, None).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, "internal_error",
                        "server_error").response()  # fmt: skip

    async def body(request: Request, model: type[T]) -> T:
        raw = await request.body()
        return await off_loop(len(raw), parse, model, raw)  # type: ignore[arg-type, no-any-return]

    @app.get("/health")
    async def health() -> JSONResponse:
        draining = engine.draining
        return JSONResponse({"status": "stopping" if draining else "ok"}, status_code=503 if draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": server.created, "owned_by": "groklm",
                "max_model_len": engine.max_model_len}  # fmt: skip
        loras = [{**card, "id": a.name, "root": a.path, "parent": model_name} for a in adapters.names()] if adapters else []
        return {"object": "list", "data": [card, *loras]}

    add_adapter_routes(app, engine, model_name, api_key, adapters)

    @app.get("/", response_class=HTMLResponse)
    async def playground() -> str:
        return resources.files("groklm.serve").joinpath("static/index.html").read_text()

    @app.post("/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        req = await body(request, TokenizeRequest)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give one of prompt or messages", "prompt")
        if req.prompt is not None:
            server.limits.text(req.prompt, "prompt")
            ids = await server.encode(req.prompt, "prompt")
        else:
            server.limits.chat(req)
            ids = await server.encode_chat(req.messages or [], True)
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len}

    @app.post("/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        req = await body(request, DetokenizeRequest)
        server.limits.ids(req.tokens, "tokens", at_most=engine.max_model_len)
        vocab = engine.model.config.vocab_size
        bad_ids = [t for t in req.tokens if not 0 <= t < vocab]
        if bad_ids:
            raise ApiError(400, f"tokens: ids {bad_ids[:5]} are outside the vocabulary (0..{vocab - 1})", "tokens")
        if server.tokenizer is None:
            raise ApiError(400, "tokens: this server has no tokenizer", "tokens")
        return {"prompt": await off_loop(len(req.tokens), server.tokenizer.decode, req.tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = await body(request, CompletionRequest)
        server.check_model(req.model)
        if req.suffix:
            raise ApiError(400, "suffix: not supported", "suffix")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of: only best_of = n is supported", "best_of")
        if req.logprobs is not None and not 0 <= req.logprobs <= 5:
            raise ApiError(400, f"logprobs: must be in 0..5, not {req.logprobs}", "logprobs")
        server.limits.completion(req)
        params = server.params(req, req.logprobs, req.echo and req.logprobs is not None, chat=False, default_max=16)
        params = dataclasses.replace(params, grammar=await server.grammar(_output_constraint(req)))
        prompts = await _prompts(server, req.prompt)
        run = _Run(server, prompts, params, req.n, request, req.model)
        if req.stream:
            return _sse(_completion_chunks(run, req))
        return JSONResponse(await _completion_body(run, req))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = await body(request, ChatRequest)
        server.check_model(req.model)
        if req.top_logprobs is not None and not (req.logprobs and 0 <= req.top_logprobs <= 20):
            raise ApiError(400, "top_logprobs: needs logprobs true and a value in 0..20", "top_logprobs")
        server.limits.chat(req)
        for i, m in enumerate(req.messages):
            if m.role == "user" and not m.text():
                raise ApiError(400, f"messages.{i}.content: a user message needs content", "messages")
        try:
            use = tool_use(req.tools, req.tool_choice, req.parallel_tool_calls)
        except GrammarError as e:
            raise bad(e) from None
        if use is not None:
            server.limits.text(json.dumps(use.listed), "tools")
        constraint = _output_constraint(req)
        if use is not None and use.forced is not None and constraint is not None:
            raise ApiError(400, f"tool_choice: a forced tool call cannot also follow {constraint.param}", "tool_choice")
        prompt = await server.encode_chat(req.messages, req.add_generation_prompt, use.listed if use else None)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        rest = max(1, engine.max_model_len - len(prompt))  # no limit given: the rest of the context, as vLLM does
        params = server.params(req, logprobs, False, chat=True, default_max=rest)
        forced = use.forced if use is not None else None
        params = dataclasses.replace(params, grammar=await server.grammar(forced or constraint))
        run = _Run(server, [prompt], params, req.n, request, req.model)
        if req.stream:
            return _sse(_chat_chunks(run, req, use))
        return JSONResponse(await _chat_body(run, req, use))

    return app


def _output_constraint(req: Sampling) -> Constraint | None:
    guided = {name: getattr(req, name) for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")}
    try:
        return output_constraint(req.response_format, req.structured_outputs, guided)
    except GrammarError as e:
        raise bad(e) from None


def _render(server: Server, messages: list[Message], add_generation_prompt: bool,
            tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    plain = []
    for i, m in enumerate(messages):
        if (m.tool_calls and m.role != "assistant") or (m.tool_call_id is not None and m.role != "tool"):
            raise ApiError(400, f"messages.{i}: tool_calls belong to assistant messages, tool_call_id to tool ones",
                           "messages")  # fmt: skip
        if m.role == "tool" and m.tool_call_id is None:
            raise ApiError(400, f"messages.{i}.tool_call_id: a tool message answers a call: give its id", "messages")
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        message.update(m.model_dump(include={"name", "tool_call_id"}, exclude_none=True))
        if m.tool_calls:
            message["tool_calls"] = [_call(i, j, c.model_dump()) for j, c in enumerate(m.tool_calls)]
        plain.append(message)
    try:
        return server.chat.render_spans(plain, add_generation_prompt, tools)
    except ValueError as e:
        raise bad(e) from None


def _call(i: int, j: int, call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call as templates take it (Hugging Face's): its arguments parsed."""
    try:
        arguments = json.loads(call["function"]["arguments"])
    except json.JSONDecodeError:
        raise ApiError(400, f"messages.{i}.tool_calls.{j}.function.arguments: not JSON", "messages") from None
    return {**call, "function": {**call["function"], "arguments": arguments}}


async def _prompts(server: Server, prompt: str | list[str] | list[int] | list[list[int]]) -> list[list[int]]:
    if isinstance(prompt, str):
        return [await server.encode(prompt, "prompt")]
    if not prompt:
        raise ApiError(400, "prompt: empty", "prompt")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # type: ignore[arg-type]
    if isinstance(prompt[0], str):
        return await server.encode_all(prompt, "prompt")  # type: ignore[arg-type]
    return [list(p) for p in prompt]  # type: ignore[union-attr]


class _Run:
    """The sequences of one request (n choices for each prompt), their events on one asyncio queue."""

    def __init__(self, server: Server, prompts: list[list[int]], params: Params, n: int, request: Request,
                 model: str | None = None) -> None:  # fmt: skip
        engine = server.engine
        self.model = model or server.model_name  # the name asked for, as the answer's `model`
        # The adapter is picked here, where the request is queued with no await between: one unloaded
        # meanwhile is never half-chosen (see lora_api).
        params = dataclasses.replace(params, adapter=server.check_model(model))
        self.server, self.prompts, self.params, self.request = server, prompts, params, request
        self.id = uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.queue: asyncio.Queue[tuple[int, Event | None]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        for p in prompts:
            try:
                engine.check(p, params)
            except ValueError as e:
                raise bad(e) from None
        self.seq_ids: list[int] = []
        try:
            for choice in range(len(prompts) * n):
                prompt = prompts[choice // n]
                seeded = params if params.seed is None else dataclasses.replace(params, seed=params.seed + choice % n)
                self.seq_ids.append(engine.submit(prompt, seeded, self._emitter(loop, choice)))
        except QueueFull as e:
            self.abort()
            raise ApiError(
                503, f"the server is busy: {e}", None, "queue_full", "server_error", {"Retry-After": "1"}
            ) from None
        except Draining:
            self.abort()
            raise ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                           {"Retry-After": "5"}) from None  # fmt: skip
        except ValueError as e:
            self.abort()
            raise bad(e) from None
        self.choices = len(self.seq_ids)

    def _emitter(self, loop: asyncio.AbstractEventLoop, choice: int) -> Callable[[Event], None]:
        def emit(event: Event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (choice, event))
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        return emit

    def abort(self) -> None:
        for seq_id in self.seq_ids:
            self.server.engine.abort(seq_id)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """Every event of every choice, until all have finished; aborts them as soon as the client
        leaves (streaming or not: the server's `receive` says so the moment the connection closes)."""
        left = len(self.seq_ids)
        watch = asyncio.create_task(self._watch())
        try:
            while left:
                choice, event = await self.queue.get()
                if event is None:  # the client left
                    return
                if isinstance(event, FinishEvent):
                    left -= 1
                yield choice, event
        finally:
            watch.cancel()
            if left:
                self.abort()

    async def _watch(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass
        self.abort()
        self.queue.put_nowait((-1, None))

    def usage(self, finishes: list[FinishEvent]) -> dict[str, Any]:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(f.completion_tokens for f in finishes)
        cached = sum(f.cached_tokens for f in finishes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}  # fmt: skip


def _finish_reason(f: FinishEvent) -> str:
    if f.reason == "error":
        raise ApiError(500, f"generation failed: {f.error}", None, "engine_error", "server_error")
    return f.reason if f.reason in ("stop", "length") else "abort"


def _echo_text(run: _Run, choice: int) -> str:
    prompt = run.prompts[choice // (run.choices // len(run.prompts))]
    return run.server.tokenizer.decode(prompt) if run.server.tokenizer else ""


def _prompt_logprobs(run: _Run, choice: int, lp: Logprobs, event: PromptLogprobs) -> None:
    prompt = run.prompts[choice // (run.choices // len(run.prompts))]
    start = len(lp.tokens)
    for i, (logprob, top) in enumerate(zip(event.logprobs, event.top_logprobs, strict=True)):
        lp.add(prompt[start + i], logprob, top)


async def _completion_body(run: _Run, req: CompletionRequest) -> dict[str, Any]:
    texts = [_echo_text(run, c) if req.echo else "" for c in range(run.choices)]
    lps = [Logprobs(run.server.tokenizer) for _ in range(run.choices)]
    finishes: list[FinishEvent | None] = [None] * run.choices
    async for choice, event in run.events():
        if isinstance(event, TokenEvent):
            texts[choice] += event.text
            if req.logprobs is not None and event.token >= 0:
                lps[choice].add(event.token, event.logprob, event.top_logprobs)
        elif isinstance(event, PromptLogprobs):
            _prompt_logprobs(run, choice, lps[choice], event)
        else:
            finishes[choice] = event
    if any(f is None for f in finishes):  # the client left
        raise ApiError(499, "client closed the request")
    done = [f for f in finishes if f is not None]
    choices = [
        {"index": c, "text": texts[c], "logprobs": lps[c].body() if req.logprobs is not None else None,
         "finish_reason": _finish_reason(f)}
        for c, f in enumerate(done)
    ]  # fmt: skip
    return {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created,
            "model": run.model, "choices": choices, "usage": run.usage(done)}  # fmt: skip


async def _completion_chunks(run: _Run, req: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
    head = {"id": f"cmpl-{run.id}", "object": "text_completion", "created": run.created, "model": run.model}
    finishes: list[FinishEvent] = []
    if req.echo and req.logprobs is None:
        for c in range(run.choices):
            yield {
                **head,
                "choices": [{"index": c, "text": _echo_text(run, c), "logprobs": None, "finish_reason": None}],
            }
    async for choice, event in run.events():
        if isinstance(event, FinishEvent):
            finishes.append(event)
            reason = _finish_reason(event)
            yield {**head, "choices": [{"index": choice, "text": "", "logprobs": None, "finish_reason": reason}]}
            continue
        lp = Logprobs(run.server.tokenizer)
        text = ""
        if isinstance(event, PromptLogprobs):
            _prompt_logprobs(run, choice, lp, event)
            text = _echo_text(run, choice)
        elif event.token >= 0 and req.logprobs is not None:
            lp.add(event.token, event.logprob, event.top_logprobs)
        if isinstance(event, TokenEvent):
            text = event.text
        if text or lp.tokens:
            logprobs = lp.body() if req.logprobs is not None else None
            yield {**head, "choices": [{"index": choice, "text": text, "logprobs": logprobs, "finish_reason": None}]}
    if req.stream_options and req.stream_options.include_usage and len(finishes) == run.choices:
        yield {**head, "choices": [], "usage": run.usage(finishes)}


async def _chat_body(run: _Run, req: ChatRequest, use: ToolUse | None) -> dict[str, Any]:
    texts = [""] * run.choices
    lps: list[list[dict[str, Any]]] = [[] for _ in range(run.choices)]
    finishes: list[FinishEvent | None] = [None] * run.choices
    async for choice, event in run.events():
        if isinstance(event, TokenEvent):
            texts[choice] += event.text
            if req.logprobs and event.token >= 0:
                lps[choice].append(chat_logprob(run.server.tokenizer, event.token, event.logprob, event.top_logprobs))
        elif isinstance(event, FinishEvent):
            finishes[choice] = event
    if any(f is None for f in finishes):
        raise ApiError(499, "client closed the request")
    done = [f for f in finishes if f is not None]
    choices = []
    for c, f in enumerate(done):
        message: dict[str, Any] = {"role": "assistant", "content": texts[c]}
        reason = _finish_reason(f)
        if use is not None:
            content, calls = tool_calls.parse(texts[c], use.tools, use.parallel)
            if calls:
                message = {"role": "assistant", "content": content or None, "tool_calls": calls}
                reason = "tool_calls" if reason == "stop" else reason
        choices.append({"index": c, "message": message, "logprobs": {"content": lps[c]} if req.logprobs else None,
                        "finish_reason": reason})  # fmt: skip
    return {"id": f"chatcmpl-{run.id}", "object": "chat.completion", "created": run.created,
            "model": run.model, "choices": choices, "usage": run.usage(done)}  # fmt: skip


async def _chat_chunks(run: _Run, req: ChatRequest, use: ToolUse | None) -> AsyncIterator[dict[str, Any]]:
    head = {"id": f"chatcmpl-{run.id}", "object": "chat.completion.chunk", "created": run.created,
            "model": run.model}  # fmt: skip
    for c in range(run.choices):
        yield {**head, "choices": [{"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]}  # fmt: skip
    finishes: list[FinishEvent] = []
    parsers = [tool_calls.ToolParser(use.tools, use.parallel) if use else None for _ in range(run.choices)]

    def delta(choice: int, body: dict[str, Any], logprobs: Any = None) -> dict[str, Any]:
        return {**head, "choices": [{"index": choice, "delta": body, "logprobs": logprobs, "finish_reason": None}]}

    async for choice, event in run.events():
        parser = parsers[choice]
        if isinstance(event, FinishEvent):
            finishes.append(event)
            reason = _finish_reason(event)
            if parser is not None:
                rest = parser.finish()
                if rest:
                    yield delta(choice, {"content": rest})
                reason = "tool_calls" if parser.calls and reason == "stop" else reason
            yield {**head, "choices": [{"index": choice, "delta": {}, "logprobs": None, "finish_reason": reason}]}
        elif isinstance(event, TokenEvent) and (event.text or (req.logprobs and event.token >= 0)):
            logprobs = None
            if req.logprobs and event.token >= 0:
                entry = chat_logprob(run.server.tokenizer, event.token, event.logprob, event.top_logprobs)
                logprobs = {"content": [entry]}
            text, calls = (event.text, []) if parser is None else parser.feed(event.text)
            if text or logprobs:
                yield delta(choice, {"content": text}, logprobs)
            for call in calls:  # as vLLM streams one: its id and name first, then its arguments
                index = len(parser.calls) - len(calls) + calls.index(call)  # type: ignore[union-attr]
                fn = call["function"]
                yield delta(choice, {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                     "function": {"name": fn["name"], "arguments": ""}}]})  # fmt: skip
                yield delta(choice, {"tool_calls": [{"index": index, "function": {"arguments": fn["arguments"]}}]})
    if req.stream_options and req.stream_options.include_usage and len(finishes) == run.choices:
        yield {**head, "choices": [], "usage": run.usage(finishes)}


def _sse(chunks: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except ApiError as e:  # after the stream began: an error event, as vLLM sends
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
