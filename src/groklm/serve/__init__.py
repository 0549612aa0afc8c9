"""`groklm serve`: the engine (`engine.py`), the OpenAI-compatible API (`api.py`), the playground
(`static/index.html`), run by uvicorn. `serve(checkpoint=..., port=...)` is the command as a function: it
checks every argument and binds the port before a weight is read, then loads the model and serves."""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from groklm.config import GrokConfig
from groklm.runtime import UsageError
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


def bind_option(host: str, port: int) -> list[socket.socket]:
    """`bind`, its errors named as --host and --port: the sockets are bound before any weight is read, so a port
    in use costs a second, not the load."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        return bind(host, port)
    except socket.gaierror as e:
        raise UsageError(f"--host {host}: {e.strerror}") from None
    except OSError as e:
        raise ValueError(f"cannot listen on {where}: {e.strerror or e} (--host, --port)") from None


def check_lora_modules(
    items: list[str], *, adapter: str | None, compile: bool, parallel: bool
) -> list[tuple[str, str]]:
    """--lora-modules NAME=DIR ...: checked (names unique, each directory an adapter's) before the model loads."""
    from groklm.train.lora import read_adapter_config

    out: list[tuple[str, str]] = []
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name.strip() or not path:
            raise UsageError(f"--lora-modules {item!r}: give NAME=DIR")
        if name in (n for n, _ in out):
            raise UsageError(f"--lora-modules: the name {name!r} is given twice")
        try:
            read_adapter_config(path)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--lora-modules {item}: {e}") from None
        out.append((name, path))
    if out and (adapter or compile or parallel):
        raise UsageError("--lora-modules runs adapters per request in one eager process: not with --adapter, "
                         "--compile, --tp or --ep")  # fmt: skip
    return out


def check_serving(*, max_batch: int, prefill_chunk: int, port: int, max_waiting: int, threads: int | None,
                  body_timeout: float, shutdown_timeout: float) -> None:  # fmt: skip
    """serve's own numbers: the batch, the chunk, the port, the queue, the threads, the timeouts."""
    from groklm.runtime import check_at_least, check_threads

    check_at_least(1, max_batch=max_batch, prefill_chunk=prefill_chunk)
    check_at_least(0, port=port, max_waiting=max_waiting)
    if port > 65535:
        raise UsageError(f"--port {port}: not a port")
    check_threads(threads)
    for name, value in (("body-timeout", body_timeout), ("shutdown-timeout", shutdown_timeout)):
        if not 0 < value < 1e6:
            raise UsageError(f"--{name} must be a positive number of seconds, not {value}")


def serve(*, checkpoint: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8, max_waiting: int = 64,
          prefill_chunk: int = 256, max_model_len: int | None = None, served_model_name: str | None = None,
          api_key: str | None = None, chat_template: str | None = None, tokenizer: str | None = None,
          body_timeout: float = 30.0, shutdown_timeout: float = SHUTDOWN_TIMEOUT, config: GrokConfig | None = None,
          dtype: str = "bf16", device: str = "cpu", threads: int | None = None, bits: int | None = None,
          mmap: bool = False, compile: bool = False, tp: int = 1, ep: int = 1, adapter: str | None = None,
          lora_modules: list[str] | None = None, quiet: bool = False) -> int:  # fmt: skip
    """Serve the checkpoint until SIGTERM (see `run`); under torchrun with tp x ep > 1, rank 0 serves and the
    others follow its steps. Every argument is checked, and the port bound, before the weights are read
    (`UsageError` naming the option). `api_key` None: GROKLM_API_KEY's. Returns the exit status."""
    from groklm.generate import decoder
    from groklm.run import load_model
    from groklm.runtime import check_holding, check_placement, set_threads, start_ranks, tokenizer_fits
    from groklm.serve.engine import Runner
    from groklm.serve.ranks import LeaderRunner, follow
    from groklm.tokenizer import find_tokenizer

    check_serving(max_batch=max_batch, prefill_chunk=prefill_chunk, port=port, max_waiting=max_waiting,
                  threads=threads, body_timeout=body_timeout, shutdown_timeout=shutdown_timeout)  # fmt: skip
    model_config = check_placement(checkpoint, config, device=device, tp=tp, ep=ep)
    parallel = tp * ep > 1
    check_holding(checkpoint, model_config, parallel=parallel, mmap=mmap, bits=bits)
    if adapter:
        from groklm.train.lora import check_adapter_option

        check_adapter_option(adapter, model_config, parallel)
    loras = check_lora_modules(lora_modules or [], adapter=adapter, compile=compile, parallel=parallel)
    max_model_len = max_model_len or model_config.sequence_len
    if not 2 <= max_model_len <= model_config.sequence_len:
        raise UsageError(
            f"--max-model-len must be in 2..{model_config.sequence_len} (the model's context), not {max_model_len}"
        )
    chat = ChatTemplate.from_file(chat_template) if chat_template else ChatTemplate()
    try:
        tok = find_tokenizer(checkpoint, tokenizer)
    except FileNotFoundError as e:
        if tokenizer:
            raise
        print(f"groklm serve: warning: {e}; serving token ids only (no text prompts, chat or stop strings)",
              file=sys.stderr)  # fmt: skip
        tok = None
    tokenizer_fits(tok, model_config, "serve")
    api_key = api_key or os.environ.get("GROKLM_API_KEY") or None
    name = served_model_name or Path(os.path.abspath(checkpoint)).name
    if name in (n for n, _ in loras):
        raise UsageError(f"--lora-modules: {name!r} is the base model's name (--served-model-name)")
    socks = bind_option(host, port) if os.environ.get("RANK", "0") == "0" else []  # rank 0 serves
    ranks = start_ranks(tp, ep, device, serving=True)
    try:
        n_threads = set_threads(threads)
        model = load_model(checkpoint, model_config, ranks, dtype=dtype, device=device, progress=not quiet, mmap=mmap,
                           bits=bits, adapter=adapter)  # fmt: skip
        adapters = None
        if not (adapter or compile or ranks.parallel):  # per-row adapters run in eager, one-process steps
            from groklm.serve.adapters import install

            adapters = install(model)
            for lora_name, lora_dir in loras:
                try:
                    adapters.add(adapters.read(lora_name, lora_dir))
                except (ValueError, FileNotFoundError) as e:
                    raise UsageError(f"--lora-modules {lora_name}={lora_dir}: {e}") from None
        decode = decoder(compile, model.device)
        if not ranks.leader:
            # torchrun passes a stop signal to every rank: rank 0 drains, then tells the others to stop.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
            follow(model, max_batch, max_model_len, decode)  # rank 0's steps, until it stops
            return 0
        engine = Engine(model, tok, max_batch=max_batch, max_waiting=max_waiting, prefill_chunk=prefill_chunk,
                        max_model_len=max_model_len, decode=decode, runner=LeaderRunner if ranks.parallel else Runner)  # fmt: skip
        if not quiet:
            print(f"groklm serve: {max_batch} rows of {max_model_len} tokens, {n_threads} threads"
                  + (f", tp {ranks.tp} x ep {ranks.ep}" if ranks.parallel else "")
                  + (", API key required" if api_key else ""), file=sys.stderr)  # fmt: skip
        run(engine, name, host, port, api_key, chat, body_timeout=body_timeout, shutdown_timeout=shutdown_timeout,
            socks=socks, adapters=adapters)  # fmt: skip
        return 0
    finally:
        for sock in socks:
            sock.close()
        ranks.close()
