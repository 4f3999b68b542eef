"""Retrying a task where it runs: shipped in place of the job's function when ``retries=`` is given.

Retries happen in the task process, with exponential backoff, so a flaky call (a network fetch, a busy
resource) gets another chance without a round trip to the foreman. Losing the worker is a different matter,
handled by the foreman's poison-task rule. Imported by task processes: keep it to the standard library.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

from foreman.errors import TaskTimeoutError


def backoff_delay(attempt: int, cap: float, base: float = 0.2) -> float:
    """Seconds to wait before reconnection ``attempt`` (from 0): exponential backoff with full jitter, so a
    fleet (or the clients) that lost its foreman does not return in lockstep."""
    return random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))


class Retrying:
    """Call ``fn``; on an exception of a ``retry_on`` type, wait ``backoff * 2**attempt`` seconds (at most
    ``max_backoff``) and call it again, up to ``retries`` more times. The last exception is raised with a
    ``retry_attempts`` attribute saying how many calls were made."""

    def __init__(self, fn: Callable[..., Any], retries: int, retry_on: tuple[type[BaseException], ...] = (Exception,),
                 backoff: float = 0.1, max_backoff: float = 60.0) -> None:
        if retries < 0:
            raise ValueError("retries must be >= 0")
        if not retry_on or not all(isinstance(t, type) and issubclass(t, BaseException) for t in retry_on):
            raise TypeError("retry_on must be a tuple of exception types")
        self.fn = fn
        self.retries = retries
        self.retry_on = tuple(retry_on)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.__qualname__ = getattr(fn, "__qualname__", repr(fn))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        attempt = 0
        while True:
            try:
                return self.fn(*args, **kwargs)
            except self.retry_on as exc:
                if attempt == self.retries or isinstance(exc, TaskTimeoutError):  # the time is used up
                    try:
                        exc.retry_attempts = attempt + 1  # type: ignore[attr-defined]
                    except AttributeError:
                        pass
                    raise
                time.sleep(min(self.backoff * 2 ** attempt, self.max_backoff))
                attempt += 1
