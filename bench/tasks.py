"""Task functions every backend runs. Importable by reference: ``bench/`` is put on each worker's import path.

CPU work is measured in CPU seconds of the running thread (``time.thread_time``), not wall time: a task
that is preempted by another process (the foreman, a second worker on the same core) takes longer, as real
work would, so contention shows up as lost parallel efficiency instead of being hidden by a wall-clock loop.
"""

from __future__ import annotations

import os
import time

#: Fleet workload: a worker started with BENCH_SLOWDOWN=4 does four times the work per task (a slow device).
SLOWDOWN_VARIABLE = "BENCH_SLOWDOWN"


def inc(x: int) -> int:
    return x + 1


def burn(seconds: float) -> float:
    """Spin until this thread has used ``seconds`` of CPU time; returns the CPU time used."""
    clock = time.thread_time
    start = clock()
    end = start + seconds
    now = start
    while now < end:
        for _ in range(200):  # keep the clock calls a small share of the work
            pass
        now = clock()
    return now - start


def busy(seconds: float) -> float:
    """A CPU-bound task of ``seconds`` CPU seconds (busy loop, not sleep)."""
    return burn(seconds)


def stamp() -> float:
    """When the task ran, on the system-wide monotonic clock (comparable across processes on Linux)."""
    return time.monotonic()


def payload_len(data: bytes) -> int:
    return len(data)


def slowdown() -> float:
    return float(os.environ.get(SLOWDOWN_VARIABLE, "1"))


def fleet_task(seconds: float) -> float:
    """``seconds`` of CPU work times this worker's slowdown; returns the slowdown, to count who ran what."""
    factor = slowdown()
    burn(seconds * factor)
    return factor
