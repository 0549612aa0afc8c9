"""`groklm serve`: the engine (`engine.py`), the OpenAI-compatible API (`api.py`), the playground
(`static/index.html`), run by uvicorn."""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Any

from groklm.serve.api import create_app
from groklm.serve.chat import ChatTemplate
from groklm.serve.engine import Engine


def run(engine: Engine, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        chat: ChatTemplate | None = None, log_level: str = "warning") -> None:  # fmt: skip
    """Serve until SIGTERM or Ctrl-C: then stop admitting (503), finish what is running, and return.
    Prints the URL once the socket is bound (`port` 0 picks a free one)."""
    import uvicorn

    app = create_app(engine, model_name, api_key, chat)

    class Server(uvicorn.Server):
        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets)
            bound = self.servers[0].sockets[0].getsockname() if self.servers else (host, port)
            shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
            print(f"groklm: serving {model_name} at http://{shown}:{bound[1]} (OpenAI API under /v1, playground at /)",
                  flush=True)  # fmt: skip

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            engine.drain()  # new requests get 503 from now on; running ones finish
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=None,
                            lifespan="off", access_log=False)  # fmt: skip
    previous = {s: signal.signal(s, _quiet) for s in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    try:
        Server(config).run()
    finally:
        engine.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        print("groklm: server stopped", file=sys.stderr, flush=True)


def _quiet(sig: int, frame: FrameType | None) -> None:
    """What uvicorn re-raises the stop signal into once it has shut down: nothing more to do."""
