"""Checkpoints for long tasks: save progress, and pick it up again on another worker if this one is lost.

Inside a task::

    from worker import checkpoint, last_checkpoint

    def simulate(run):
        state = last_checkpoint() or {"step": 0, "total": 0.0}    # resumed, or from scratch
        while state["step"] < 10_000:
            state = advance(state)
            if state["step"] % 100 == 0:
                checkpoint(state)                                # sent to the foreman
        return state["total"]

The foreman keeps each task's latest checkpoint until the task's result arrives; when the task's worker is lost,
the task's next run starts with it. Outside a task process (a plain call), ``checkpoint`` does nothing and
``last_checkpoint`` returns None, so the same function runs serially too.
"""

from __future__ import annotations

import struct
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from foreman.protocol import MAX_CHECKPOINT_SIZE

_HEADER = struct.Struct(">Q")

_conn: Connection | None = None
_task: int | None = None
_resume: bytes | None = None


def checkpoint(state: Any) -> bool:
    """Save ``state`` (picklable, at most MAX_CHECKPOINT_SIZE bytes pickled) as this task's progress.

    Returns False when not running on a worker. Raises ValueError if the state is too large.
    """
    if _conn is None or _task is None:
        return False
    data = cloudpickle.dumps(state)
    if len(data) > MAX_CHECKPOINT_SIZE:
        raise ValueError(f"a checkpoint of {len(data)} bytes is over the {MAX_CHECKPOINT_SIZE}-byte limit: "
                         "save less state (an index or a small summary, not the data)")
    _conn.send_bytes(b"C" + _HEADER.pack(_task) + data)
    return True


def last_checkpoint() -> Any:
    """The state this task saved before its previous worker was lost, or None (first run, or not on a worker)."""
    return None if _resume is None else cloudpickle.loads(_resume)


def begin(conn: Connection, task: int, resume: bytes | None) -> None:
    """Set the context for the next task (called by the task process)."""
    global _conn, _task, _resume
    _conn, _task, _resume = conn, task, resume


def parse(message: bytes) -> tuple[int, bytes]:
    """(task index, pickled state) from a checkpoint message sent by :func:`checkpoint`."""
    return _HEADER.unpack_from(message, 1)[0], message[1 + _HEADER.size:]
