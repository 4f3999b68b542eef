"""Runs task batches in child processes, so user code never blocks the worker's event loop.

Each slot is a thread that owns one child process: it takes the next batch from a shared queue, hands it to its
child over a pipe, and waits for the reply while the event loop stays free. A crash kills only that child (the
slot reports it and starts a new one); a batch to be cancelled is stopped by killing its child, and so is one
that overruns the worker's ``--max-task-seconds`` (the backstop to the timer in the child, see :mod:`worker.limits`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import queue
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from foreman.protocol import STATUS_CRASHED, STATUS_OK
from worker import checkpoints
from worker.child import child_main
from worker.limits import Limits

log = logging.getLogger("crowdcompute.worker")

_COUNT = struct.Struct(">I")


@dataclass(eq=False)
class WorkItem:
    """One batch as received from the foreman."""

    job_id: int
    start: int
    count: int
    digest: str
    function: bytes
    call: str
    payload: bytes | memoryview
    session: int  # the connection it arrived on; results of an old session are still worth delivering
    received: float = field(default_factory=time.monotonic)
    started: float = 0.0
    stop_reason: str = ""  # set when the item is to be stopped: its status is reported with it
    task_timeout: float | None = None  # the job's own limit per task (the worker's cap still applies)
    foreman: str = ""  # the session id of the foreman that sent it
    resume: dict[int, bytes] | None = None  # checkpoints to resume tasks from, by task index


@dataclass
class Outcome:
    """What became of a work item. ``payload`` is pickled results when ``status`` is ok."""

    item: WorkItem
    status: str
    payload: bytes = b""
    failed: int = 0  # tasks that raised
    elapsed: float = 0.0
    error: str = ""
    errors: list[list[Any]] = field(default_factory=list)  # [index, type, message] of failed tasks (capped)
    cpu: float = 0.0  # CPU seconds the task process spent on it


class Executor:
    """A fixed set of child processes fed from one queue.

    :param concurrency: child processes, i.e. batches running at once.
    :param on_outcome: called on the event loop with each :class:`Outcome`.
    :param start_method: multiprocessing start method; ``spawn`` (the default) behaves alike on every platform.
    :param limits: the volunteer's caps on each task's memory and run time.
    :param on_checkpoint: called on the event loop with (item, task index, pickled state) when a task saves one.
    """

    def __init__(self, concurrency: int, on_outcome: Callable[[Outcome], None],
                 loop: asyncio.AbstractEventLoop, start_method: str = "spawn", limits: Limits = Limits(),
                 on_checkpoint: Callable[[WorkItem, int, bytes], None] | None = None) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self.limits = limits
        self._on_outcome = on_outcome
        self._on_checkpoint = on_checkpoint
        self._loop = loop
        self._context = multiprocessing.get_context(start_method)
        self._queue: queue.SimpleQueue[WorkItem | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.pending: dict[tuple[int, int, int], WorkItem] = {}  # queued, not started
        self.running: dict[tuple[int, int, int], tuple[WorkItem, _Slot]] = {}
        self._slots = [_Slot(self, i) for i in range(concurrency)]

    def start(self) -> None:
        self.limits.log_unenforced()
        for slot in self._slots:
            slot.thread.start()

    def submit(self, item: WorkItem) -> None:
        with self._lock:
            self.pending[_key(item)] = item
        self._queue.put(item)

    def stop_items(self, reason: str, job_id: int | None = None, start: int | None = None,
                   kill_running: bool = True) -> list[WorkItem]:
        """Stop matching items (all when ``job_id`` is None): queued ones are dropped, running ones killed.

        Queued items are returned to the caller; killed ones report an Outcome with status ``reason``.
        """
        def match(item: WorkItem) -> bool:
            return (job_id is None or item.job_id == job_id) and (start is None or item.start == start)

        with self._lock:
            dropped = [item for item in self.pending.values() if match(item)]
            for item in dropped:
                del self.pending[_key(item)]
            # Killed under the lock: while an item is in ``running`` its slot cannot take the next one (that
            # needs the lock), so the process killed is the one that ran this item, never the next item's.
            for item, slot in [(i, s) for i, s in self.running.values() if kill_running and match(i)]:
                item.stop_reason = reason
                slot.kill()
        return dropped

    @property
    def busy(self) -> int:
        return len(self.running)

    def task_pids(self) -> list[int]:
        """Process ids of the task processes running a batch now."""
        with self._lock:
            processes = [slot.process for _, slot in self.running.values()]
        return [process.pid for process in processes if process is not None and process.pid is not None]

    def running_items(self) -> list[WorkItem]:
        """The batches running now, oldest first."""
        with self._lock:
            items = [item for item, _ in self.running.values()]
        return sorted(items, key=lambda item: item.started)

    def close(self) -> None:
        """Stop all slots and their children; running items are abandoned."""
        for _ in self._slots:
            self._queue.put(None)
        with self._lock:
            self.pending.clear()
        for slot in self._slots:
            slot.kill()
        for slot in self._slots:
            slot.thread.join(timeout=5)

    def _take(self, slot: _Slot) -> WorkItem | None:
        """Block for the next item to run, and mark it running on ``slot`` (None: exit). Called by slot threads.

        Queued to running happens under the lock, so :meth:`stop_items` always finds an item in one or the other.
        """
        while True:
            item = self._queue.get()
            if item is None:
                return None
            with self._lock:
                if self.pending.pop(_key(item), None) is None:
                    continue  # dropped while queued
                item.started = time.monotonic()
                self.running[_key(item)] = (item, slot)
                return item

    def _checkpoint(self, item: WorkItem, task: int, state: bytes) -> None:
        if self._on_checkpoint is not None:
            try:
                self._loop.call_soon_threadsafe(self._on_checkpoint, item, task, state)
            except RuntimeError:
                pass  # the loop is closed: the worker is exiting

    def _report(self, outcome: Outcome) -> None:
        with self._lock:
            self.running.pop(_key(outcome.item), None)
        try:
            self._loop.call_soon_threadsafe(self._on_outcome, outcome)
        except RuntimeError:
            pass  # the loop is closed: the worker is exiting


class _Slot:
    """One thread and the child process it feeds."""

    def __init__(self, executor: Executor, index: int) -> None:
        self.executor = executor
        self.index = index
        self.process: Any = None
        self.conn: Connection | None = None
        self.known: set[str] = set()  # function digests this child has been sent
        self.doomed = False  # killed: do not send it another batch
        self.thread = threading.Thread(target=self._run, name=f"crowdcompute-slot-{index}", daemon=True)

    def _spawn(self) -> None:
        context = self.executor._context
        parent, child = context.Pipe()
        process = context.Process(target=child_main, args=(child, os.getpid(), self.executor.limits),
                                  daemon=True, name=f"crowdcompute-task-{self.index}")
        process.start()
        child.close()
        if self.conn is not None:
            self.conn.close()  # the pipe of the process this one replaces
        self.process, self.conn, self.known, self.doomed = process, parent, set(), False

    def kill(self) -> None:
        """Kill the task process; the next batch gets a fresh one (a killed process may still look alive)."""
        process = self.process
        self.doomed = True
        if process is not None and process.is_alive():
            process.kill()

    def _run(self) -> None:
        try:
            self._spawn()
        except Exception:
            log.exception("cannot start a task process")
            return
        while True:
            item = self.executor._take(self)
            if item is None:
                self._shutdown()
                return
            self.executor._report(self._execute(item))

    def _execute(self, item: WorkItem) -> Outcome:
        try:
            if self.process is None or self.doomed or not self.process.is_alive():
                if self.process is not None:
                    self.process.join(timeout=5)
                self._spawn()
            reply = self._ask(item, item.digest in self.known)
            if reply == b"N":
                reply = self._ask(item, False)
        except (EOFError, OSError, BrokenPipeError):
            return self._died(item)
        except _Overrun:
            self.kill()
            return self._died(item, self.executor.limits.for_job(item.task_timeout).overrun(item.count))
        elapsed = time.monotonic() - item.started
        size = _COUNT.unpack_from(reply, 1)[0]
        start = 1 + _COUNT.size
        summary = json.loads(reply[start:start + size]) if size else {"failed": 0, "errors": []}
        return Outcome(item, STATUS_OK, reply[start + size:], summary["failed"], elapsed, errors=summary["errors"],
                       cpu=summary.get("cpu", 0.0))

    def _ask(self, item: WorkItem, child_has_function: bool) -> bytes:
        assert self.conn is not None
        fn = None if child_has_function else item.function
        self.conn.send((item.digest, fn, item.call, item.start, item.count, item.payload, item.task_timeout,
                        item.resume))
        self.known.add(item.digest)
        allowed = self.executor.limits.for_job(item.task_timeout).batch_seconds(item.count)
        while True:
            if allowed is not None and not self.conn.poll(max(0.0, item.started + allowed - time.monotonic())):
                raise _Overrun
            reply = self.conn.recv_bytes()
            if reply[:1] != b"C":
                return reply
            task, state = checkpoints.parse(reply)
            self.executor._checkpoint(item, task, state)

    def _died(self, item: WorkItem, error: str | None = None) -> Outcome:
        process = self.process
        if process is not None:
            process.join(timeout=5)
        self.process = None
        elapsed = time.monotonic() - item.started
        if item.stop_reason:
            status = item.stop_reason
            return Outcome(item, status, elapsed=elapsed, error=f"stopped ({status})")
        code = process.exitcode if process is not None else None
        return Outcome(item, STATUS_CRASHED, elapsed=elapsed, error=error or describe_exit(code))

    def _shutdown(self) -> None:
        if self.conn is not None:
            self.conn.close()
        if self.process is not None:
            self.process.join(timeout=2)
            self.kill()


class _Overrun(Exception):
    """A batch outlived ``count`` × ``--max-task-seconds`` plus a grace: its process is to be killed."""


def describe_exit(code: int | None) -> str:
    """A person-readable account of how a task process ended."""
    if code is None:
        return "the task process vanished"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the task process was killed by {name}"
    return f"the task process exited with code {code}"


def _key(item: WorkItem) -> tuple[int, int, int]:
    return (item.job_id, item.start, item.count)

