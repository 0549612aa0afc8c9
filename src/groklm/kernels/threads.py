"""How many compute threads to use: the CPUs this process may use, less those other processes keep busy."""

from __future__ import annotations

import os
import time
from pathlib import Path


def busy_cores(seconds: float = 0.2) -> float:
    """How many of the CPUs this process may use other processes keep busy: their non-idle time in
    /proc/stat over `seconds`, while this process sleeps. 0.0 where /proc/stat is not there."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))

    def sample() -> tuple[int, int]:
        total = idle = 0
        for line in Path("/proc/stat").read_text().splitlines():
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                values = [int(v) for v in fields[:8]]
                total += sum(values)
                idle += values[3] + values[4]  # idle, iowait
        return total, idle

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError):
        return 0.0
    if total1 <= total0:
        return 0.0
    return len(cpus) * (1 - (idle1 - idle0) / (total1 - total0))


def choose_threads() -> int:
    """The number of compute threads to use: the CPUs this process may use, less those other
    processes keep busy (`busy_cores`), at least 1; `OMP_NUM_THREADS`, where set, decides instead.

    Every kernel splits its work evenly across its threads and waits for the last, so a thread that
    shares its core with a busy process holds all of them back (benchmarks/NOTES.md, "threads";
    `benchmarks/threads.py` measures it)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cpus - round(busy_cores()))
