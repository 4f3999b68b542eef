"""Polling before sleeping, for the workers a foreman starts on its own machine.

A process that sleeps until a message arrives is woken by the kernel, and on a machine whose cores doze when idle
(virtual machines above all) each wake-up costs tens of microseconds, up to a millisecond on a busy host. A task
round trip wakes the worker and its task process twice each. So when the messages of a worker or a task process
have lately come within :data:`WINDOW` of its starting to wait, it polls for up to that long before it sleeps,
and the next message is seen within microseconds. A longer wait turns polling off until a wait is short again,
so a worker running long tasks, or waiting for work, never spins.

Only a foreman's local workers poll (its own machine, reached over the local link); a volunteer's worker never
spins on the volunteer's CPU, and over a network the wake-up is the least of a round trip's costs.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

#: A wait that ends this soon (seconds) is polled through instead of slept; a longer one turns polling off.
WINDOW = 0.001

T = TypeVar("T")


class Cadence:
    """Whether the last wait ended within ``window`` seconds: then the next one polls first, for up to that long."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self.short = False

    def wait(self, ready: Callable[[], T], block: Callable[[float | None], T], timeout: float | None = None,
             may_poll: bool = True) -> T:
        """``ready()`` (a check that does not block) until it returns something true or the window passes, then
        ``block(timeout left)``, which returns something false on a timeout."""
        started, window = time.monotonic(), self.window
        if self.short and may_poll:
            end = started + (window if timeout is None else min(window, timeout))
            while True:
                got = ready()
                if got:
                    return got
                now = time.monotonic()
                if now >= end:
                    break
                os.sched_yield()  # a process that has work on this core takes it
            if timeout is not None:
                timeout = max(0.0, timeout - (now - started))
        got = block(timeout)
        waited = time.monotonic() - started
        if got or waited >= window:  # a timeout shorter than the window says nothing about the cadence
            self.short = bool(got) and waited < window
        return got


class PollingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """An event loop's selector that polls first while its waits are short and ``may_poll()`` allows."""

    def __init__(self, may_poll: Callable[[], bool]) -> None:
        super().__init__()
        self.may_poll = may_poll
        self.cadence = Cadence()

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is not None and timeout <= 0:
            return super().select(timeout)
        select = super().select
        return self.cadence.wait(lambda: select(0), select, timeout, self.may_poll())


def run(main: Coroutine[Any, Any, T], selector: selectors.BaseSelector) -> T:
    """``asyncio.run(main)`` on an event loop that uses ``selector``."""
    if sys.version_info >= (3, 11):
        with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
            return runner.run(main)
    loop = asyncio.SelectorEventLoop(selector)  # Python 3.10: what asyncio.run does there
    try:
        asyncio.set_event_loop(loop)
        return loop.run_until_complete(main)
    finally:
        try:
            left = asyncio.all_tasks(loop)
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()
