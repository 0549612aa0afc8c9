"""The HTTP front door, before any route: who may come in, and a request body read whole, bounded in
size and in time (pure ASGI: it leaves streaming and disconnects alone)."""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Callable
from typing import Any

from groklm.serve.engine import Engine
from groklm.serve.protocol import ApiError

OPEN = ("/health", "/metrics", "/")  # routes without the API key, answered while draining too


class Guard:
    """ASGI middleware in front of every route. While the server drains, new requests get 503. With an
    API key, every route but OPEN needs `Authorization: Bearer KEY` (401 otherwise). Then it reads the
    whole body before the app sees it: over `limit` bytes gets 413 (announced or chunked), a body not
    complete within `timeout` seconds gets 408; the app then reads the buffered body, and later
    `receive` calls (disconnects) go to the server."""

    def __init__(self, app: Any, limit: int, api_key: str | None, timeout: float, engine: Engine) -> None:
        self.app, self.limit, self.api_key, self.timeout, self.engine = app, limit, api_key, timeout, engine

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = self._refuse(scope)
        if error is None and scope["method"] not in ("GET", "HEAD"):
            body, error = await self._read(scope, receive)
            if error is None:
                receive = _replay(body, receive)
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refuse(self, scope: dict[str, Any]) -> ApiError | None:
        path = scope["path"]
        if self.engine.draining and path not in OPEN:
            return ApiError(503, "the server is shutting down", None, "shutting_down", "server_error",
                            {"Retry-After": "5", "Connection": "close"})  # fmt: skip
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if self.api_key and path not in OPEN and not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
            return ApiError(401, "Incorrect API key provided", None, "invalid_api_key")
        return None

    async def _read(self, scope: dict[str, Any], receive: Callable[..., Any]) -> tuple[bytes, ApiError | None]:
        too_big = ApiError(413, f"the request body exceeds {self.limit} bytes", None, "body_too_large",
                           headers={"Connection": "close"})  # fmt: skip
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return b"", too_big
        chunks, seen = [], 0
        deadline = asyncio.get_running_loop().time() + self.timeout
        while True:
            left = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), max(left, 0.001))
            except TimeoutError:
                return b"", ApiError(408, f"the request body did not arrive within {self.timeout:g} s", None,
                                     "body_timeout", headers={"Connection": "close"})  # fmt: skip
            if message["type"] == "http.disconnect":
                return b"", ApiError(400, "the client left before sending its body")
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                return b"", too_big
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _replay(body: bytes, receive: Callable[..., Any]) -> Callable[..., Any]:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return await receive()  # type: ignore[no-any-return]
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
