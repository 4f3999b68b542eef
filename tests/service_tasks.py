"""Task functions for the standalone-foreman tests (importable by workers: tests/ is on their PYTHONPATH)."""

from __future__ import annotations

import os
import time


def logged_square(x: int, log: str, seconds: float = 0.0) -> int:
    """Append ``x`` to the file ``log`` when the task starts (one line per execution), then sleep, then x*x."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{x}\n".encode())
    finally:
        os.close(fd)
    time.sleep(seconds)
    return x * x


def nap_square(x: int, seconds: float = 0.02) -> int:
    time.sleep(seconds)
    return x * x


def executions(log: str) -> list[int]:
    """The task indices written by :func:`logged_square`, in order."""
    try:
        with open(log) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


class TaskFailed(Exception):
    pass


def fails_at_3(x: int, later: float = 0.0) -> int:
    """x, except for 3, which raises TaskFailed; tasks after it sleep ``later`` seconds first."""
    if x == 3:
        raise TaskFailed(f"bad input {x}")
    if x > 3:
        time.sleep(later)
    return x
