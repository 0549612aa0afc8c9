"""Large parsing and tokenizing jobs, run off the event loop so that no request stalls the others' streams."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

OFF_LOOP = 16 << 10  # bodies and texts larger than this (bytes, characters) are parsed and tokenized off the loop
T = TypeVar("T")
# One thread for the large jobs: they wait for each other, never for the loop, and the memory they
# take comes back to one allocator arena (trimmed after each), not one arena per worker thread.
_HEAVY = ThreadPoolExecutor(1, thread_name_prefix="groklm-heavy")


def _trim_after(fn: Callable[..., T], *args: Any) -> T:
    try:
        return fn(*args)
    finally:
        with contextlib.suppress(OSError, AttributeError):  # glibc only: give freed memory back to the system
            ctypes.CDLL("libc.so.6").malloc_trim(0)


async def off_loop(size: int, fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the heavy-work thread when the input is large, so that no request stalls the event loop
    (and with it the others' streams)."""
    if size <= OFF_LOOP:
        return fn(*args)
    return await asyncio.get_running_loop().run_in_executor(_HEAVY, _trim_after, fn, *args)


async def on_heavy_thread(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) on the heavy-work thread, whatever its input's size."""
    return await asyncio.get_running_loop().run_in_executor(_HEAVY, fn, *args)
