"""Job options on a small fleet: retries, failures returned in place, time limits, priorities, checkpoints.

    python examples/job_options.py
"""

from __future__ import annotations

import random
import time

from foreman import Foreman
from foreman.errors import TaskTimeoutError
from worker import checkpoint, last_checkpoint


def fetch(url_id: int) -> str:
    """Pretend network call: fails one time in three."""
    if random.random() < 1 / 3:
        raise ConnectionError(f"timeout fetching item {url_id}")
    return f"page-{url_id}"


def parse(text: str) -> int:
    if text.endswith("7"):
        raise ValueError(f"cannot parse {text!r}")
    return len(text)


def slow(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def long_sum(n: int) -> int:
    """A long task that saves its progress: if its worker dies, another worker carries on from the checkpoint."""
    i, total = last_checkpoint() or (0, 0)
    while i < n:
        total += i * i
        i += 1
        if i % 100_000 == 0:
            checkpoint((i, total))
    return total


def main() -> None:
    with Foreman(port=0, local_workers=2) as fm:
        pages = fm.map(fetch, range(20), retries=5, retry_on=(ConnectionError,), retry_backoff=0.01)
        print(f"fetched {len(pages)} pages, retrying flaky calls on the workers")

        job = fm.imap(parse, ["page-1", "page-7", "page-12", "page-17"], return_exceptions=True)
        print("parsed:", [r if isinstance(r, int) else f"{type(r).__name__}: {r}" for r in job])
        print("failures:", [(f["task"], f["type"], f["message"]) for f in job.failures])

        timed = fm.map(slow, [0.1, 3.0], task_timeout=1.0, return_exceptions=True)
        print("with task_timeout=1:", [type(r).__name__ if isinstance(r, TaskTimeoutError) else r for r in timed])

        urgent = fm.options(priority=10, requires={"cpu"}).submit(long_sum, 1_000_000)
        print(f"urgent checkpointed sum: {urgent.result()}")


if __name__ == "__main__":
    main()
