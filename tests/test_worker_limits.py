"""The volunteer's caps: ``--max-memory`` and ``--max-task-seconds``, on a real worker process.

A task over a cap fails alone, with a message naming the cap; the worker goes on serving.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from conftest import start_worker, stop_process, worker_env
from foreman import Foreman
from foreman.errors import TaskLostError, TaskTimeoutError
from tasks import sleep_then, square
from worker.config import WorkerConfig
from worker.limits import format_size, parse_size

posix = pytest.mark.skipif(os.name != "posix", reason="RLIMIT_AS and the per-task timer are POSIX")


def allocate(n: int) -> int:
    return len(bytearray(n))


def stuck_in_c(n: int) -> int:
    return sum(range(n))  # one C call: the interpreter never gets to run the timer's handler


@pytest.fixture
def capped() -> Iterator[Foreman]:
    """A foreman with one worker capped at 300 MiB and 1 s per task; a crash fails a task at once."""
    with Foreman(port=0, dashboard=False, max_task_losses=1, heartbeat_interval=0.2,
                 heartbeat_timeout=3) as fm:
        worker = start_worker(fm.address, "--no-dashboard", "--concurrency", "1", "--max-memory", "300M",
                              "--max-task-seconds", "1")
        try:
            fm.wait_for_workers(1, timeout=30)
            yield fm
        finally:
            stop_process(worker)


@posix
def test_a_task_over_the_memory_cap_gets_memory_error_and_the_worker_goes_on(capped: Foreman) -> None:
    with pytest.raises(MemoryError, match=r"exceeded the worker's memory cap of 300 MiB \(--max-memory\)"):
        capped.submit(allocate, 10**9).result(timeout=30)
    assert capped.submit(allocate, 10**8).result(timeout=30) == 10**8
    assert capped.map(square, range(10)) == [x * x for x in range(10)]


@posix
def test_a_task_over_the_time_cap_fails_with_task_timeout_error(capped: Foreman) -> None:
    started = time.monotonic()
    with pytest.raises(TaskTimeoutError, match=r"longer than the worker's cap of 1 s \(--max-task-seconds\)"):
        capped.submit(sleep_then, 5).result(timeout=30)
    assert time.monotonic() - started < 2.5
    assert capped.submit(sleep_then, 0.1).result(timeout=30) == 0.1


def test_a_task_stuck_in_c_code_is_killed_by_the_backstop(capped: Foreman) -> None:
    started = time.monotonic()
    with pytest.raises(TaskLostError, match=r"cap of 1 s \(--max-task-seconds\) and did not stop"):
        capped.submit(stuck_in_c, 10**13).result(timeout=30)
    assert time.monotonic() - started < 6
    assert capped.map(square, range(10)) == [x * x for x in range(10)]
    assert capped.workers  # the worker itself lived through it


def test_the_caps_are_usage_checked() -> None:
    with pytest.raises(ValueError, match="max_task_seconds"):
        WorkerConfig(max_task_seconds=0)
    with pytest.raises(ValueError, match="max_memory"):
        WorkerConfig(max_memory=-1)
    assert WorkerConfig(max_task_seconds=2, max_memory=2**30).limits.batch_seconds(3) > 6



@pytest.mark.parametrize("variable, value, message", [
    ("CROWDCOMPUTE_MAX_MEMORY", "12Q", "not a memory size"),
    ("CROWDCOMPUTE_MAX_TASK_SECONDS", "0", "seconds > 0"),
])
def test_a_malformed_cap_is_a_usage_error(variable: str, value: str, message: str) -> None:
    result = subprocess.run([sys.executable, "-m", "worker", "--no-dashboard"], env=worker_env(**{variable: value}),
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and message in result.stderr


@pytest.mark.parametrize("text, size", [
    ("1073741824", 2**30), ("512M", 512 * 2**20), ("512m", 512 * 2**20), ("2G", 2 * 2**30), ("2GB", 2 * 2**30),
    ("1.5GiB", 3 * 2**29), ("64K", 65536), ("1T", 2**40), (" 300M ", 300 * 2**20), ("100B", 100),
])
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "M", "-1G", "0", "12Q", "1e9", "two gigs", "0.0000001K"])
def test_parse_size_refuses_what_is_not_a_size(text: str) -> None:
    with pytest.raises(ValueError, match="not a memory size.*512M"):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (100, 300 * 2**20, 3 * 2**29)] == ["100 bytes", "300 MiB", "1.5 GiB"]
