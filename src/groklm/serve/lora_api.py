"""vLLM's routes for adapters at run time: POST /v1/load_lora_adapter {"lora_name", "lora_path"} and
POST /v1/unload_lora_adapter {"lora_name"}. They read server-side paths, so they answer only on a
server started with an API key (403 otherwise); `guard.Guard` then checks the key as for every /v1 route."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from groklm.serve.adapters import Adapter, AdapterSet
from groklm.serve.engine import Engine
from groklm.serve.protocol import ApiError, parse

MAX_LORAS = 64  # adapters loaded at once, so that a client cannot fill the memory with them


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str


class UnloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_int_id: int | None = None  # vLLM's, accepted and unused


def add_adapter_routes(app: FastAPI, engine: Engine, model_name: str, api_key: str | None,
                       adapters: AdapterSet | None) -> None:  # fmt: skip
    """The two routes, over the server's engine (for the adapters its requests hold) and its adapter set (None:
    this server cannot load adapters)."""

    def usable() -> AdapterSet:
        if adapters is None:
            raise ApiError(400, "this server cannot load adapters (started with --adapter, --compile, --tp or --ep)",
                           None, "adapters_unsupported")  # fmt: skip
        if not api_key:
            raise ApiError(403, "loading adapters at run time needs a server started with --api-key",
                           None, "forbidden", "permission_error")  # fmt: skip
        return adapters

    def in_use() -> set[Adapter | None]:
        return {s.params.adapter for s in list(engine.by_id.values())}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request) -> PlainTextResponse:
        loaded = usable()
        req = parse(LoadRequest, await request.body())
        if req.lora_name == model_name or loaded.get(req.lora_name) is not None:
            raise ApiError(400, f"lora_name: the name {req.lora_name!r} is taken", "lora_name")
        if len(loaded.names()) >= MAX_LORAS:
            raise ApiError(400, f"lora_name: {MAX_LORAS} adapters are loaded, the most this server holds", "lora_name")
        try:
            adapter = await asyncio.to_thread(loaded.read, req.lora_name, req.lora_path)
            # Installed on the event loop's thread, as requests pick their adapter: none is half-chosen now.
            loaded.add(adapter, in_use())
        except (ValueError, OSError) as e:
            message = str(e) if str(e).startswith("lora_name") else f"lora_path: {e}"
            raise ApiError(400, message, message.split(":")[0]) from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload(request: Request) -> PlainTextResponse:
        loaded = usable()
        req = parse(UnloadRequest, await request.body())
        if loaded.get(req.lora_name) is None:
            raise ApiError(404, f"lora_name: no adapter named {req.lora_name!r} is loaded", "lora_name",
                           "model_not_found")  # fmt: skip
        loaded.remove(req.lora_name, in_use())
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")
