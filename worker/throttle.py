"""The owner's cap on CPU use (``max_cpu``): task processes are stopped and continued in turn (SIGSTOP/SIGCONT).

Over each ``period`` a task process runs for ``duty`` of it and is stopped for the rest, so ``slots`` busy task
processes on ``cpus`` cores use about ``duty * slots / cpus`` of the machine. Stopped processes keep their memory;
a task's time limit keeps running while it is stopped. POSIX only.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterable

#: Seconds of one run-and-stop cycle: short enough that the owner sees smooth load, long enough to cost nothing.
PERIOD = 0.1


def duty_for(max_cpu: float, slots: int, cpus: int) -> float:
    """The share of each period a task process may run so that ``slots`` of them use ``max_cpu`` % of ``cpus``."""
    return min(1.0, max_cpu / 100 * cpus / slots)


class Throttle:
    """Runs the processes ``pids()`` names for ``duty`` of every ``period``; :meth:`run` until cancelled."""

    def __init__(self, pids: Callable[[], Iterable[int]], duty: float, period: float = PERIOD) -> None:
        if not 0 < duty <= 1:
            raise ValueError(f"duty must be in (0, 1], got {duty}")
        if not hasattr(signal, "SIGSTOP"):
            raise RuntimeError("max_cpu stops and continues task processes, which needs POSIX signals")
        self.duty = duty
        self.period = period
        self._pids = pids
        self._stopped: set[int] = set()

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.period * self.duty)
                self._stopped = set(self._pids())
                _signal(self._stopped, signal.SIGSTOP)
                await asyncio.sleep(self.period * (1 - self.duty))
                self._continue()
        finally:
            self._continue()  # never leave a task stopped

    def _continue(self) -> None:
        # Only processes still running a task: one that ended may have been reaped and its pid reused.
        _signal(self._stopped & set(self._pids()), signal.SIGCONT)
        self._stopped = set()


def _signal(pids: Iterable[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it ended: a task process is replaced after a crash or a kill
