"""`groklm serve`: the engine (`engine.py`), the OpenAI-compatible API (`api.py`), the playground
(`static/index.html`), run by uvicorn."""

from __future__ import annotations

import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

from groklm.serve.adapters import AdapterSet
from groklm.serve.api import BODY_TIMEOUT, create_app
from groklm.serve.chat import ChatTemplate
from groklm.serve.engine import Engine

SHUTDOWN_TIMEOUT = 60.0


def bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of host (as asyncio's create_server binds them) at port (0: a free
    one), not yet listening: `groklm serve` binds before it loads the model, so a port in use is found in
    a second, and hands them to `run`."""
    socks: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(
            socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        ):
            socks.append(socket.socket(family, kind, proto))
            socks[-1].setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, not a listener
            if family == socket.AF_INET6:  # "::" and "0.0.0.0" side by side, as asyncio does
                socks[-1].setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            socks[-1].bind(address)
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks


def run(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        chat: ChatTemplate | None = None, log_level: str = "warning", body_timeout: float = BODY_TIMEOUT,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT, socks: list[socket.socket] | None = None,
        adapters: AdapterSet | None = None) -> None:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C: then answer new requests 503 (the socket stays open), let running
    ones finish for up to `shutdown_timeout` s, abort what is left, and return; a second signal stops
    at once. A client has `body_timeout` s to send its request body (408 after). Listens on `socks` (from
    `bind`), else on host:port; prints the URL once listening (`port` 0 picks a free one)."""
    import uvicorn

    app = create_app(engine, model_name, api_key, chat, body_timeout=body_timeout, adapters=adapters)

    class Server(uvicorn.Server):
        draining = False

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            print(f"groklm: serving {model_name} at http://{shown}:{bound[1]} (OpenAI API under /v1, playground at /)",
                  flush=True)  # fmt: skip

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining:
                super().handle_exit(sig, frame)
                return
            self.draining = True
            engine.drain()  # new requests get 503 from now on; running ones finish
            threading.Thread(target=self._drain, name="groklm-drain", daemon=True).start()

        def _drain(self) -> None:
            deadline = time.monotonic() + shutdown_timeout
            if not engine.wait_idle(shutdown_timeout):
                engine.abort_all()
                engine.wait_idle(5.0)
            # What is left (a response still being written, a body being read) gets the rest of the time.
            self.config.timeout_graceful_shutdown = max(1, int(deadline - time.monotonic()))
            self.should_exit = True

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off", access_log=False,
                            timeout_graceful_shutdown=max(1, int(shutdown_timeout)))  # fmt: skip
    socks = socks or bind(host, port)
    previous = {s: signal.signal(s, _quiet) for s in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    try:
        Server(config).run(sockets=socks)
    finally:
        engine.stop(timeout=0)
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("groklm: server stopped", file=sys.stderr, flush=True)


def _quiet(sig: int, frame: FrameType | None) -> None:
    """What uvicorn re-raises the stop signal into once it has shut down: nothing more to do."""
