"""Test helpers for the owner's pause rules: a sampler the test drives, and a real in-process worker using it."""

from __future__ import annotations

import asyncio
import datetime
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from worker import Worker, WorkerConfig
from worker.policy import Readings
from worker.prefs import Prefs

#: Pauses at once when the test says the owner is busy, resumes at once when not.
PROMPT = Prefs(max_owner_cpu=50, pause_after=0, resume_after=0, pause_grace=0.3, sample_interval=0.05)


class Owner:
    """A :class:`worker.policy.Sampler` whose owner's CPU use the test sets: ``busy`` is 90 %, else 1 %."""

    def __init__(self) -> None:
        self.busy = False

    def read(self) -> Readings:
        return Readings(datetime.datetime.now().time(), owner_cpu=90.0 if self.busy else 1.0)


@contextmanager
def running_worker(address: str, worker_id: str, owner: Owner, prefs: Prefs = PROMPT, concurrency: int = 1,
                   dashboard: bool = False) -> Iterator[Worker]:
    """A real :class:`Worker` (its own loop, thread and task processes) reading ``owner``; stopped on exit."""
    worker = Worker(WorkerConfig(foreman_url=address, worker_id=worker_id, max_concurrent_tasks=concurrency,
                                 heartbeat_interval=0.2, prefs=prefs, dashboard=dashboard, dashboard_port=0),
                    sampler=owner)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(worker.run(),), daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        loop.call_soon_threadsafe(worker.stop)
        thread.join(timeout=20)
        loop.close()
