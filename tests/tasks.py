"""Task functions used by the tests. Workers import this module by reference (it is on their PYTHONPATH)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time


def square(x: int) -> int:
    return x * x


def add(a: int, b: int) -> int:
    return a + b


def whoami(x: int) -> tuple[int, int]:
    """(x, pid of the worker process running this task's child)."""
    return x, os.getppid()


def slow_whoami(x: int, seconds: float = 0.005) -> tuple[int, int]:
    time.sleep(seconds)
    return x, os.getppid()


def sleep_then(x: float) -> float:
    time.sleep(x)
    return x


class CustomError(Exception):
    pass


def boom(x: int) -> int:
    if x == 3:
        raise CustomError(f"bad input {x}")
    return x


def kill_my_worker(x: int) -> int:
    """A poison task: kills the worker process that runs it."""
    os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(10)
    return x


def crash_child(x: int) -> int:
    """Kills only the task process (like a segfault in a C extension)."""
    os.kill(os.getpid(), signal.SIGKILL)
    return x


def return_lock(x: int) -> object:
    return threading.Lock()


def exit_task(x: int) -> int:
    raise SystemExit(3)


def touch(path: str, seconds: float = 0.0) -> str:
    """Sleeps ``seconds``, then appends a line to the file at ``path``: a side effect proving the task ran."""
    time.sleep(seconds)
    with open(path, "a") as f:
        f.write(f"ran in {os.getpid()}\n")
    return path


def record_start(args: tuple[str, int]) -> int:
    """Appends the task's index to a file as it starts, then sleeps: which tasks ever started?"""
    path, index = args
    with open(path, "a") as f:
        f.write(f"{index}\n")
    time.sleep(30)
    return index


def span(seconds: float) -> tuple[float, float]:
    """Sleeps ``seconds``; returns its (start, end) wall-clock times, to tell whether tasks ran at the same time."""
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


def flaky(args: tuple[str, int]) -> int:
    """Fails the first ``failures`` calls (counted in a file), then returns the number of calls made."""
    path, failures = args
    with open(path, "a") as f:
        f.write("x")
    with open(path) as f:
        calls = len(f.read())
    if calls <= failures:
        raise ConnectionError(f"flaky failure {calls}")
    return calls


def slow_where_marked(x: int) -> tuple[int, int]:
    """Slow (2 s) on a worker started with CROWDCOMPUTE_TEST_SLOW=1, quick elsewhere: a straggling volunteer."""
    time.sleep(2.0 if os.environ.get("CROWDCOMPUTE_TEST_SLOW") else 0.01)
    return x, os.getppid()


def stalls_where_marked(x: int) -> int:
    """Half a second, or 30 s on a worker started with CROWDCOMPUTE_TEST_SLOW=1: a stalled volunteer."""
    time.sleep(30.0 if os.environ.get("CROWDCOMPUTE_TEST_SLOW") else 0.5)
    return x


def counts_to(args: tuple[int, float]) -> tuple[int, int, int]:
    """Counts to ``n`` one step every ``pause`` seconds, checkpointing each step: (n, first step, worker pid)."""
    from worker import checkpoint, last_checkpoint

    n, pause = args
    resumed = last_checkpoint()
    first = step = 0 if resumed is None else resumed
    while step < n:
        time.sleep(pause)
        step += 1
        checkpoint(step)
    return step, first, os.getppid()


def big_checkpoint(x: int) -> int:
    from worker import checkpoint

    checkpoint(b"x" * (2 * 1024 * 1024))
    return x


def cheat_square(x: int) -> int:
    """``x * x``, except on a worker started with CROWDCOMPUTE_TEST_CHEAT set (a volunteer that lies)."""
    return x * x + 1 if os.environ.get("CROWDCOMPUTE_TEST_CHEAT") else x * x


def describe_buffers(*args: object, **kwargs: object) -> list[tuple[str, int, int]]:
    """(type name, length, first byte) of each argument (bytes-like), keyword arguments last."""
    return [(type(x).__name__, len(x), x[0]) for x in (*args, *kwargs.values())]  # type: ignore[arg-type, index]


def same_object(a: object, b: object) -> bool:
    return a is b


def large_block_faults() -> int:
    """Page faults of this process while it takes and frees three 4 MiB blocks, ten times over."""
    import resource

    blocks = [bytearray(4 << 20) for _ in range(3)]
    del blocks
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [bytearray(4 << 20) for _ in range(3)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _raise_keyboard_interrupt() -> None:
    raise KeyboardInterrupt


class ExitOnLoad:
    """Pickles fine; unpickling it raises SystemExit (or KeyboardInterrupt): a result that attacks its reader."""

    def __init__(self, interrupt: bool = False) -> None:
        self.interrupt = interrupt

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (_raise_keyboard_interrupt, ()) if self.interrupt else (sys.exit, (3,))


def exit_on_load(interrupt: bool) -> ExitOnLoad:
    return ExitOnLoad(interrupt)
