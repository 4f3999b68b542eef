"""Runs task batches in child processes, so user code never blocks the worker's event loop.

Each slot owns one child process and the worker's end of a socket pair to it (:class:`_Channel`), which the event
loop reads and writes itself (``add_reader``/``add_writer``): a batch goes from the foreman's message to the task
process, and its results back, without another thread. A crash kills only that child (the slot reports it, and the
next batch starts a new one); a batch to be cancelled is stopped by killing its child, and so is one that overruns
the worker's ``--max-task-seconds`` (the backstop to the timer in the child, see :mod:`worker.limits`).

POSIX only (Linux, macOS): the channel needs ``socket.sendmsg`` and an event loop that watches sockets.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import math
import multiprocessing
import os
import pickle
import signal
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

from foreman.protocol import BATCH_BYTES, STATUS_CRASHED, STATUS_OK
from worker import checkpoints, polling
from worker.child import child_main
from worker.limits import Limits

log = logging.getLogger("crowdcompute.worker")

_COUNT = struct.Struct(">I")
#: A killed task process is reaped within milliseconds; its batch ends then (checked every REAP_POLL seconds),
#: or after REAP_SECONDS if it is stuck in the kernel (its exit code is then unknown).
REAP_POLL = 0.002
REAP_SECONDS = 5.0


@dataclass(eq=False)
class WorkItem:
    """One batch as received from the foreman."""

    job_id: int
    start: int
    count: int
    digest: str
    function: bytes
    call: str
    payload: Sequence[bytes | memoryview]  # the pickled arguments, then the out-of-band buffers they refer to
    session: int  # the connection it arrived on; results of an old session are still worth delivering
    received: float = field(default_factory=time.monotonic)
    started: float = 0.0
    stop_reason: str = ""  # set when the item is to be stopped: its status is reported with it
    task_timeout: float | None = None  # the job's own limit per task (the worker's cap still applies)
    foreman: str = ""  # the session id of the foreman that sent it
    resume: dict[int, bytes] | None = None  # checkpoints to resume tasks from, by task index
    framed: bool = False  # ``payload`` is one pickle per task behind a table of sizes (TASKS ``framed``)


@dataclass
class Outcome:
    """What became of a work item. ``payload`` is pickled results when ``status`` is ok."""

    item: WorkItem
    status: str
    payload: bytes | memoryview = b""
    failed: int = 0  # tasks that raised
    elapsed: float = 0.0
    error: str = ""
    errors: list[list[Any]] = field(default_factory=list)  # [index, type, message] of failed tasks (capped)
    cpu: float = 0.0  # CPU seconds the task process spent on it


class Executor:
    """A fixed set of child processes fed from one queue, all on the worker's event loop.

    Every method must be called on ``loop``; ``on_outcome`` and ``on_checkpoint`` are called on it too (an
    outcome may be reported from within :meth:`stop_items`).

    :param concurrency: child processes, i.e. batches running at once.
    :param on_outcome: called with each :class:`Outcome`.
    :param start_method: multiprocessing start method; ``spawn`` (the default) behaves alike on every platform.
    :param limits: the volunteer's caps on each task's memory and run time.
    :param on_checkpoint: called with (item, task index, pickled state) when a task saves one.
    :param poll: task processes poll for their next batch (see :mod:`worker.polling`).
    """

    def __init__(self, concurrency: int, on_outcome: Callable[[Outcome], None],
                 loop: asyncio.AbstractEventLoop, start_method: str = "spawn", limits: Limits = Limits(),
                 on_checkpoint: Callable[[WorkItem, int, bytes], None] | None = None, poll: bool = False) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.concurrency = concurrency
        self.limits = limits
        self._on_outcome = on_outcome
        self._on_checkpoint = on_checkpoint
        self._loop = loop
        self._context = multiprocessing.get_context(start_method)
        self.pending: dict[tuple[int, int, int], WorkItem] = {}  # queued, not started; oldest first
        self.running: dict[tuple[int, int, int], tuple[WorkItem, _Slot]] = {}
        self._slots = [_Slot(self, i) for i in range(concurrency)]
        self._closed = False
        self.poll = poll

    def start(self) -> None:
        """Start the task processes now, so that the first batch does not wait for one."""
        self.limits.log_unenforced()
        for slot in self._slots:
            try:
                slot.spawn()
            except Exception:
                log.exception("cannot start a task process (the next batch tries again)")

    def submit(self, item: WorkItem) -> None:
        self.pending[_key(item)] = item
        self._dispatch()

    def stop_items(self, reason: str, job_id: int | None = None, start: int | None = None,
                   kill_running: bool = True) -> list[WorkItem]:
        """Stop matching items (all when ``job_id`` is None): queued ones are dropped, running ones killed.

        Queued items are returned to the caller; killed ones report an Outcome with status ``reason``, before
        this returns. Queued items are dropped first, so that none of them starts in a killed item's place.
        """
        def match(item: WorkItem) -> bool:
            return (job_id is None or item.job_id == job_id) and (start is None or item.start == start)

        dropped = [item for item in self.pending.values() if match(item)]
        for item in dropped:
            del self.pending[_key(item)]
        if kill_running:
            for item, slot in [(i, s) for i, s in self.running.values() if match(i)]:
                item.stop_reason = reason
                slot.end()
        return dropped

    @property
    def busy(self) -> int:
        return len(self.running)

    def may_reply_soon(self) -> bool:
        """Whether polling may pay (see :mod:`worker.polling`): a slot runs a batch expected to end within
        :data:`polling.WINDOW` (its previous batch did), or ended one that recently (the foreman may send the next
        at once). Not while every slot runs a longer batch, nor once the slots have been idle for longer."""
        recent = time.monotonic() - polling.WINDOW
        return any(slot.last_elapsed < polling.WINDOW if slot.item is not None else slot.last_ended > recent
                   for slot in self._slots)

    def task_pids(self) -> list[int]:
        """Process ids of the task processes running a batch now."""
        processes = [slot.process for _, slot in self.running.values()]
        return [process.pid for process in processes if process is not None and process.pid is not None]

    def running_items(self) -> list[WorkItem]:
        """The batches running now, oldest first."""
        return sorted((item for item, _ in self.running.values()), key=lambda item: item.started)

    def close(self) -> None:
        """Stop all children; running and queued items are abandoned (no outcome is reported)."""
        self._closed = True
        self.pending.clear()
        self.running.clear()
        for slot in self._slots:
            slot.close()

    def _dispatch(self) -> None:
        """Start queued items on idle slots, oldest first."""
        while self.pending and not self._closed:
            slot = next((s for s in self._slots if s.item is None), None)
            if slot is None:
                return
            key = next(iter(self.pending))
            item = self.pending.pop(key)
            item.started = time.monotonic()
            self.running[key] = (item, slot)
            slot.run(item)

    def _finished(self, outcome: Outcome) -> None:
        """A slot is done with an item: start the next one on it, then report this one."""
        self.running.pop(_key(outcome.item), None)
        if self._closed:
            return
        self._dispatch()
        self._on_outcome(outcome)

    def _checkpoint(self, item: WorkItem, task: int, state: bytes) -> None:
        if self._on_checkpoint is not None:
            self._on_checkpoint(item, task, state)


class _Slot:
    """One child process, the channel to it, and the item it runs (None: idle)."""

    def __init__(self, executor: Executor, index: int) -> None:
        self.executor = executor
        self.index = index
        self.process: Any = None
        self.channel: _Channel | None = None
        self.known: set[str] = set()  # function digests this child has been sent
        self.item: WorkItem | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._overrun = ""  # set when the backstop killed the process: the batch's error
        self._reaping = False  # killed, waiting for the process to be reaped before its batch ends
        self.last_elapsed = math.inf  # how long the slot's previous batch took
        self.last_ended = -math.inf  # when (time.monotonic()) it ended

    def spawn(self) -> None:
        executor = self.executor
        parent, child = socket.socketpair()
        for end in (parent, child):  # a whole batch of large arguments (or results) in one write, where allowed
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCKET_BUFFER)
        conn = Connection(child.detach())
        try:
            channel = _Channel(executor._loop, parent, self._on_message, self._on_closed)
        except BaseException:
            parent.close()
            conn.close()
            raise
        process = executor._context.Process(target=child_main,
                                            args=(conn, os.getpid(), executor.limits, executor.poll),
                                            daemon=True, name=f"crowdcompute-task-{self.index}")
        try:
            process.start()
        except BaseException:
            channel.close()
            raise
        finally:
            conn.close()
        self.process, self.channel, self.known = process, channel, set()

    def run(self, item: WorkItem) -> None:
        self.item = item
        if self.channel is None:
            try:
                self.spawn()
            except Exception as exc:
                log.exception("cannot start a task process")
                self.executor._loop.call_soon(self._finish, Outcome(
                    item, STATUS_CRASHED, error=f"cannot start a task process: {type(exc).__name__}: {exc}"))
                return
        self._send(item, item.digest in self.known)
        allowed = self.executor.limits.for_job(item.task_timeout).batch_seconds(item.count)
        if allowed is not None:
            self._timer = self.executor._loop.call_later(allowed, self._on_overrun, item)

    def end(self) -> None:
        """Kill the task process (if not dead already); its batch, if any, ends with the reason it was stopped,
        the backstop's error, or how the process died, once the process is reaped (polled from the loop, which
        never waits on it). The next batch gets a fresh process."""
        if self._reaping:
            return
        process, channel = self.process, self.channel
        self.process = self.channel = None
        if channel is not None:
            channel.close()
        if process is not None and process.exitcode is None:
            process.kill()
        self._reaping = True
        self._reap(process, time.monotonic() + REAP_SECONDS)

    def _reap(self, process: Any, deadline: float) -> None:
        if process is not None and process.exitcode is None and time.monotonic() < deadline:
            self.executor._loop.call_later(REAP_POLL, self._reap, process, deadline)
            return
        self._reaping = False
        item = self.item
        if item is None:
            return
        elapsed = time.monotonic() - item.started
        if item.stop_reason:
            outcome = Outcome(item, item.stop_reason, elapsed=elapsed, error=f"stopped ({item.stop_reason})")
        else:
            code = process.exitcode if process is not None else None
            outcome = Outcome(item, STATUS_CRASHED, elapsed=elapsed, error=self._overrun or describe_exit(code))
        self._finish(outcome)

    def _on_closed(self) -> None:
        """The child's end closed: it exited or was killed (its exit code is read once it is reaped)."""
        self.end()

    def close(self) -> None:
        """Let the child exit (it sees the channel close), killing it if it does not soon."""
        self.item = None
        process, channel = self.process, self.channel
        self.process = self.channel = None
        if channel is not None:
            channel.close()
        if process is not None:
            process.join(timeout=2)
            if process.exitcode is None:
                process.kill()
                process.join(timeout=5)

    def _send(self, item: WorkItem, child_has_function: bool) -> None:
        assert self.channel is not None
        fn = None if child_has_function else item.function
        request = pickle.dumps((item.digest, fn, item.call, item.start, item.count, item.task_timeout,
                                item.resume, len(item.payload), item.framed), protocol=5)
        self.channel.send(request, *item.payload)
        self.known.add(item.digest)

    def _on_message(self, message: bytes) -> None:
        item = self.item
        if item is None:
            return  # nothing is running: a late reply of a batch already reported, or noise
        kind = message[:1]
        if kind == b"C":
            task, state = checkpoints.parse(message)
            self.executor._checkpoint(item, task, state)
        elif kind == b"N":  # the child dropped the function from its cache: send the batch again, with it
            self._send(item, False)
        else:
            size = _COUNT.unpack_from(message, 1)[0]
            start = 1 + _COUNT.size
            summary = json.loads(message[start:start + size]) if size else {"failed": 0, "errors": []}
            self._finish(Outcome(item, STATUS_OK, memoryview(message)[start + size:], summary["failed"],
                                 time.monotonic() - item.started, errors=summary["errors"],
                                 cpu=summary.get("cpu", 0.0)))

    def _on_overrun(self, item: WorkItem) -> None:
        self._timer = None
        if self.item is item:
            self._overrun = self.executor.limits.for_job(item.task_timeout).overrun(item.count)
            self.end()

    def _finish(self, outcome: Outcome) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.item, self._overrun = None, ""
        self.last_elapsed, self.last_ended = outcome.elapsed, time.monotonic()
        self.executor._finished(outcome)


#: multiprocessing.Connection's framing, which the child reads and writes: a signed 32-bit big-endian length,
#: or -1 followed by a 64-bit one, then the message.
_SHORT = struct.Struct("!i")
_LONG = struct.Struct("!Q")
#: Send buffer asked for on both ends of a channel (the system caps it: Linux at net.core.wmem_max): a whole
#: batch of arguments, so the worker writes one in a single call instead of ping-ponging with the task process;
#: the memory is only taken while data is in flight.
_SOCKET_BUFFER = BATCH_BYTES
#: Bytes read from a channel per readable event. Not more: each read allocates its size, and 256 KiB made every
#: small read cost about 14 us instead of 2 (glibc grows and trims its heap around a block that large).
_READ_SIZE = 64 * 1024
#: Buffers given to one sendmsg call (well under every system's IOV_MAX).
_SEND_PARTS = 64


class _Channel:
    """The worker's end of the socket pair to one task process, read and written by the event loop.

    Messages go out without being joined (``sendmsg`` of the frame headers and the caller's buffers); what the
    socket does not take at once waits, in order, for it to become writable. ``on_closed`` is called once, when
    the child's end closes (it exited or was killed) or the socket fails.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_message: Callable[[bytes], None],
                 on_closed: Callable[[], None]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        self._on_message = on_message
        self._on_closed = on_closed
        self._inbox = bytearray()
        self._outbox: collections.deque[memoryview] = collections.deque()
        self._writing = False
        self.closed = False
        sock.setblocking(False)
        try:
            loop.add_reader(self._fd, self._readable)
        except NotImplementedError:
            raise RuntimeError("the worker's task processes need an event loop that can watch sockets "
                               "(a POSIX system: Linux or macOS)") from None

    def send(self, *messages: bytes | memoryview) -> None:
        """Queue ``messages``, each one Connection message, and write as much as the socket takes now."""
        if self.closed:
            return
        for message in messages:
            view = memoryview(message).cast("B")
            size = view.nbytes
            head = _SHORT.pack(size) if size <= 0x7FFFFFFF else _SHORT.pack(-1) + _LONG.pack(size)
            self._outbox.append(memoryview(head))
            self._outbox.append(view)
        if not self._writing:
            self._flush()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
        self._outbox.clear()
        self._sock.close()

    def _flush(self) -> None:
        outbox = self._outbox
        while outbox:
            try:
                sent = self._sock.sendmsg(list(itertools.islice(outbox, _SEND_PARTS)))
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._loop.call_soon(self._lost)  # reported from the loop, not from within the caller's send
                return
            while sent:
                head = outbox[0]
                if head.nbytes <= sent:
                    sent -= head.nbytes
                    outbox.popleft()
                else:
                    outbox[0] = head[sent:]
                    sent = 0
        if outbox and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not outbox and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        inbox = self._inbox
        inbox += data
        while len(inbox) >= _SHORT.size and not self.closed:
            size = _SHORT.unpack_from(inbox)[0]
            start = _SHORT.size
            if size == -1:
                if len(inbox) < _SHORT.size + _LONG.size:
                    return
                size, start = _LONG.unpack_from(inbox, _SHORT.size)[0], _SHORT.size + _LONG.size
            end = start + size
            if len(inbox) < end:
                return
            with memoryview(inbox) as view:
                message = view[start:end].tobytes()
            del inbox[:end]
            self._on_message(message)

    def _lost(self) -> None:
        if not self.closed:
            self.close()
            self._on_closed()


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
