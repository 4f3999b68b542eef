"""The volunteer's caps on one task: memory (``--max-memory``) and run time (``--max-task-seconds``).

They are the worker's own settings, enforced in its task processes; nothing the foreman sends can raise them.
Memory is capped with ``RLIMIT_AS`` on the whole task process (POSIX). Time is capped per task by a timer in the
task process (:class:`TaskGuard`) and, for code that never returns to the interpreter, by the slot that feeds
the process, which kills it when a batch overruns (:meth:`Limits.batch_seconds`).
"""

from __future__ import annotations

import logging
import re
import signal
from dataclasses import dataclass
from types import FrameType, TracebackType

from foreman.errors import TaskTimeoutError

log = logging.getLogger("crowdcompute.worker")

#: Seconds a batch may run past ``count`` × ``max_task_seconds`` before its process is killed: room for the
#: in-process timer to fire and its report to arrive, and for unpickling the function.
BACKSTOP_GRACE = 2.0

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """Bytes from ``"1073741824"``, ``"512M"``, ``"2G"``, ``"1.5GiB"`` (K, M, G, T are powers of 1024)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([kmgt]?)(?:i?b)?\s*", text, re.IGNORECASE)
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()]) if match else 0
    if size <= 0:
        raise ValueError(f"not a memory size: {text!r}; give bytes or a number with K, M, G or T (e.g. 512M, 2G)")
    return size


def format_size(size: int) -> str:
    """``"512 MiB"``, ``"1.5 GiB"``, ``"100 bytes"``."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:.4g} {unit}"
    return f"{size} bytes"


@dataclass(frozen=True)
class Limits:
    """A worker's per-task caps; None: no cap."""

    max_task_seconds: float | None = None
    max_memory: int | None = None
    time_source: str = "the worker's cap"  # whose time limit max_task_seconds is, for error messages

    def for_job(self, task_timeout: float | None) -> Limits:
        """These caps tightened by a job's own ``task_timeout`` (which can only lower the worker's cap)."""
        if task_timeout is None or (self.max_task_seconds is not None and self.max_task_seconds <= task_timeout):
            return self
        return Limits(task_timeout, self.max_memory, "the job's task_timeout")

    @property
    def time_cap(self) -> str:
        flag = " (--max-task-seconds)" if self.time_source == "the worker's cap" else ""
        return f"{self.time_source} of {self.max_task_seconds:g} s{flag}"

    def batch_seconds(self, count: int) -> float | None:
        """How long a batch of ``count`` tasks may run before the slot kills its process."""
        return None if self.max_task_seconds is None else count * self.max_task_seconds + BACKSTOP_GRACE

    def overrun(self, count: int) -> str:
        """Why a batch's process was killed by the backstop."""
        cap = self.time_cap
        if count == 1:
            return f"the task ran longer than {cap} and did not stop: its process was killed"
        return f"the batch of {count} tasks ran longer than {count} × {cap}: its process was killed"

    def apply_memory_cap(self) -> None:
        """Cap this process's address space (call in the task process, before any task runs)."""
        if self.max_memory is None:
            return
        try:
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            cap = self.max_memory if hard == resource.RLIM_INFINITY else min(self.max_memory, hard)
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))  # hard too: task code cannot raise it back
        except (ImportError, AttributeError, OSError, ValueError) as exc:
            log.warning("--max-memory is not enforced in this task process: %s", exc)

    def log_unenforced(self) -> None:
        """Say once, in the worker, which caps this platform cannot enforce."""
        if self.max_memory is not None and not _has_rlimit_as():
            log.warning("--max-memory is not enforced on this platform (it has no RLIMIT_AS)")
        if self.max_task_seconds is not None and not hasattr(signal, "setitimer"):
            log.warning("this platform has no per-task timer: --max-task-seconds is enforced only by killing a "
                        "batch's process once the whole batch overruns")


class TaskGuard:
    """Wraps each task in a task process: stops it with :class:`TaskTimeoutError` once it outlives the time cap,
    and makes a MemoryError under the memory cap say so.

    The time cap is a wall-clock timer (``ITIMER_REAL``) armed for each task, raising in the task process's main
    thread. Not ``RLIMIT_CPU``: that counts the CPU time of the process's whole life, across every task and
    batch it runs, and ends the process with a signal, so it can neither cap one task nor fail only that one.
    Not a CPU-time timer either (``ITIMER_PROF``): a task that sleeps or waits would never trip it; wall-clock
    time bounds CPU time too. Code stuck in C that never returns to the interpreter does not see the exception:
    the slot's backstop kills its process.
    """

    def __init__(self, limits: Limits) -> None:
        self.worker_limits = limits
        self.limits = limits
        self.seconds: float | None = None
        self._armed = False
        if hasattr(signal, "setitimer"):
            signal.signal(signal.SIGALRM, self._expired)
        self.for_job(None)

    def for_job(self, task_timeout: float | None) -> None:
        """Guard the next batch's tasks with the worker's caps tightened by the job's ``task_timeout``."""
        self.limits = self.worker_limits.for_job(task_timeout)
        self.seconds = self.limits.max_task_seconds if hasattr(signal, "setitimer") else None

    def __enter__(self) -> None:
        if self.seconds is not None:
            self._armed = True
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.seconds is not None:
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._armed = False

    def explain(self, exc: BaseException) -> BaseException:
        """A task's exception; a MemoryError under a memory cap names the cap."""
        cap = self.limits.max_memory
        if not isinstance(exc, MemoryError) or cap is None:
            return exc
        detail = f": {exc}" if str(exc) else ""
        return MemoryError(f"task exceeded the worker's memory cap of {format_size(cap)} (--max-memory){detail}"
                           ).with_traceback(exc.__traceback__)

    def _expired(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:  # a signal that lands after the task returned is ignored
            self._armed = False
            raise TaskTimeoutError(f"task ran longer than {self.limits.time_cap}")


def _has_rlimit_as() -> bool:
    try:
        import resource
    except ImportError:
        return False
    return hasattr(resource, "RLIMIT_AS")
