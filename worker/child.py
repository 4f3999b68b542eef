"""The child process that runs task batches. One batch at a time; killed and replaced if it hangs or crashes.

Requests (from the parent, one Connection message each): a pickled ``(digest, function bytes or None, call style,
first task index, number of tasks, the job's task_timeout or None, saved checkpoints by task index or None,
number of parts)``, followed by that many messages: the pickled argument list, then the out-of-band buffers it
refers to (see :func:`foreman.serialization.loads_items`), each received as its own ``bytes``, without a copy.
While a batch runs, a task may send ``b"C" + <u64 task index> + <pickled state>`` (see :mod:`worker.checkpoints`).
Replies (``send_bytes``): ``b"N"`` when the function for ``digest`` must be sent again, or
``b"R" + <u32 n> + <n bytes: JSON summary> + <pickled results and errors>``.
The summary (``{"failed": count, "errors": [[index, type, message], ...], "cpu": seconds}``, at most
:data:`MAX_ERRORS_SUMMARY` error entries) lets the foreman list failures without unpickling anything; ``cpu`` is
the CPU time (user + system) this process spent on the batch, for credit.
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import pickle
import select
import signal
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from foreman.errors import CannotUnpickleError
from foreman.protocol import CALL_ONE, CALL_STAR
from foreman.serialization import ErrorEntry, dumps_results, error_entry, loads_items
from worker import checkpoints, malloc, polling
from worker.limits import Limits, TaskGuard

#: Functions kept unpickled per child; older ones are dropped and asked for again if needed.
FUNCTION_CACHE_SIZE = 32

#: Failed tasks described in a batch's JSON summary; the rest are only counted.
MAX_ERRORS_SUMMARY = 20

_COUNT = struct.Struct(">I")
_SHORT = struct.Struct("!i")  # multiprocessing.Connection's framing: a length, or -1 and a 64-bit one
_LONG = struct.Struct("!Q")


def run_batch(fn: Any, call: str, items: list[Any], guard: TaskGuard, start: int = 0, conn: Connection | None = None,
              resume: dict[int, bytes] | None = None) -> tuple[list[Any], dict[int, ErrorEntry]]:
    """Apply ``fn`` to every item under ``guard``; an exception becomes that task's error and the batch goes on.

    Tasks ``start``, ``start + 1``... may save checkpoints over ``conn``; ``resume`` holds saved ones by index.
    """
    results: list[Any] = []
    errors: dict[int, ErrorEntry] = {}
    append = results.append
    resume = resume or {}
    for index, item in enumerate(items, start):
        checkpoints.begin(conn, index, resume.get(index))
        try:
            with guard:
                if call == CALL_ONE:
                    value = fn(item)
                elif call == CALL_STAR:
                    value = fn(*item)
                else:
                    value = fn(*item[0], **item[1])
            append(value)
        except BaseException as exc:  # noqa: BLE001 - SystemExit in a task must not end the child
            errors[len(results)] = error_entry(guard.explain(exc), skip_frames=1)
            append(None)
    return results, errors


def child_main(conn: Connection, parent_pid: int, limits: Limits, poll: bool = False) -> None:
    """Serve batches, each task within the worker's ``limits``, until the parent closes the pipe or dies.

    With ``poll``, wait for the next batch as :mod:`worker.polling` says."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the worker, which stops us itself
    _take_authkey()
    if limits.max_memory is None:  # under a cap, freed memory is handed back rather than kept for the next batch
        malloc.reuse_large_blocks()  # (a process forked from the worker has the worker's setting either way)
    limits.apply_memory_cap()
    guard = TaskGuard(limits)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    functions: OrderedDict[str, Any] = OrderedDict()
    requests = socket.socket(fileno=os.dup(conn.fileno()))  # the same socket, read with MSG_WAITALL
    wait = _poller(requests) if poll else None
    while True:
        try:
            if wait is not None:
                wait()
            digest, fn_bytes, call, start, count, task_timeout, resume, parts, framed = pickle.loads(
                _receive(requests))
            payload = [_receive(requests) for _ in range(parts)]
        except (EOFError, OSError):
            return
        if fn_bytes is not None:
            functions[digest] = _load("the job's function", pickle.loads, fn_bytes)
            while len(functions) > FUNCTION_CACHE_SIZE:
                functions.popitem(last=False)
        fn = functions.get(digest)
        if fn is None:
            conn.send_bytes(b"N")
            continue
        functions.move_to_end(digest)
        items = _load("the batch's arguments", loads_items, payload[0], payload[1:], framed, count)
        failure = next((x for x in (fn, items) if isinstance(x, _LoadFailure)), None)
        cpu = time.process_time()
        if failure is not None:
            results, errors = [None] * count, {i: failure.entry for i in range(count)}
        else:
            guard.for_job(task_timeout)
            results, errors = run_batch(fn, call, items, guard, start, conn, resume)
        summary = _summarise(errors, time.process_time() - cpu)
        conn.send_bytes(b"R" + _COUNT.pack(len(summary)) + summary + dumps_results(results, errors))


def _take_authkey() -> None:
    """A foreman's local worker may hand its task processes the caller's multiprocessing authkey (see
    ``Foreman(local_authkey=...)``): with it, Manager proxies made by the caller connect back from tasks, as from
    a process pool's children. Read from the environment this process inherited, then removed from it."""
    key = os.environ.pop("CROWDCOMPUTE_MP_AUTHKEY", None)
    if key:
        try:
            multiprocessing.current_process().authkey = bytes.fromhex(key)
        except ValueError:
            pass  # not hex: tasks keep this process's own key


def _poller(sock: socket.socket) -> Callable[[], object]:
    """A wait until ``sock`` is readable (or closed) that polls first while the last waits were short."""
    watch = select.poll()
    watch.register(sock, select.POLLIN)
    cadence = polling.Cadence()

    def block(timeout: float | None) -> list[tuple[int, int]]:
        return watch.poll(None if timeout is None else timeout * 1000)

    return lambda: cadence.wait(lambda: watch.poll(0), block)


def _receive(sock: socket.socket) -> bytes:
    """One message in Connection framing, read straight into a bytes object of its size (Connection.recv_bytes
    copies it once more, through a BytesIO)."""
    size = _SHORT.unpack(_read_exactly(sock, _SHORT.size))[0]
    if size == -1:
        size = _LONG.unpack(_read_exactly(sock, _LONG.size))[0]
    return _read_exactly(sock, size)


def _read_exactly(sock: socket.socket, size: int) -> bytes:
    data = sock.recv(size, socket.MSG_WAITALL) if size else b""
    if len(data) == size:
        return data
    parts, got = [data], len(data)  # cut short by a signal
    while got < size:
        if not parts[-1]:
            raise EOFError("the worker closed the pipe")
        parts.append(sock.recv(size - got, socket.MSG_WAITALL))
        got += len(parts[-1])
    return b"".join(parts)


def _summarise(errors: dict[int, ErrorEntry], cpu: float) -> bytes:
    described = [[index, type_name, message[:300]]
                 for index, (_, type_name, message, _) in itertools.islice(errors.items(), MAX_ERRORS_SUMMARY)]
    return json.dumps({"failed": len(errors), "errors": described, "cpu": round(cpu, 6)}).encode()


class _LoadFailure:
    """Stands in for a function or argument batch that would not unpickle here; every task gets its error."""

    def __init__(self, what: str, exc: BaseException) -> None:
        failure = CannotUnpickleError(f"cannot unpickle {what} on this worker: {type(exc).__name__}: {exc}")
        failure.__cause__ = exc
        self.entry = error_entry(failure)


def _load(what: str, load: Callable[..., Any], *args: Any) -> Any:
    try:
        return load(*args)
    except BaseException as exc:  # noqa: BLE001 - user bytes: a SystemExit in a __reduce__ must not end the child
        return _LoadFailure(what, exc)


def _exit_with_parent(parent_pid: int) -> None:
    """A child whose worker was killed must not run on as an orphan."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(1)

