"""Quotas of remote clients: how many stored jobs a principal may run at once, and how many bytes of input it may
have waiting for results. Pure accounting (no I/O), used by :mod:`foreman.clients` and :mod:`foreman.stored`.

Limits, and the memory each bounds (see docs/security.md, "Limits"):

- :data:`MAX_RUNNING_JOBS`: running stored jobs per principal. A SUBMIT over it is refused (ACCEPTED with an
  error). Bounds the per-job state (a job's function, its scheduler entry) one token can make the foreman hold.
- :data:`MAX_QUEUED_INPUT`: bytes of input per principal not yet answered by a result. The foreman keeps queued
  input in memory for its scheduler (and in the journal on disk); an INPUT that would go over fails its job with
  a reason that says so. An honest client's feeder stays far below: it keeps a window of batches out, a few per
  worker slot, and waits for their results.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

MAX_RUNNING_JOBS = 1000
MAX_QUEUED_INPUT = 1 << 30


@dataclass
class _Job:
    owner: str
    starts: list[int] = field(default_factory=list)  # input batches not yet all answered, by first task
    batches: dict[int, list[int]] = field(default_factory=dict)  # start -> [count, tasks unanswered, bytes]


class ClientQuota:
    """Running jobs and unanswered input bytes, per principal (by name)."""

    def __init__(self, max_running_jobs: int | None = None, max_queued_input: int | None = None) -> None:
        self.max_running_jobs = MAX_RUNNING_JOBS if max_running_jobs is None else max_running_jobs
        self.max_queued_input = MAX_QUEUED_INPUT if max_queued_input is None else max_queued_input
        self._jobs: dict[int, _Job] = {}
        self._running: dict[str, int] = {}
        self._queued: dict[str, int] = {}

    def running(self, owner: str) -> int:
        return self._running.get(owner, 0)

    def queued(self, owner: str) -> int:
        """Bytes of ``owner``'s input waiting for results."""
        return self._queued.get(owner, 0)

    def submit_refusal(self, owner: str) -> str | None:
        """Why ``owner`` may not start another job now, or None."""
        if self.running(owner) >= self.max_running_jobs:
            return (f"{owner} already runs {self.max_running_jobs} stored jobs, the most one token may: wait for "
                    "some to finish, or cancel them")
        return None

    def input_refusal(self, owner: str, size: int) -> str | None:
        """Why ``owner`` may not queue ``size`` more bytes of input now, or None."""
        if self.queued(owner) + size > self.max_queued_input:
            return (f"input quota exceeded: {owner} would have {self.queued(owner) + size} bytes of input waiting "
                    f"for results, over the limit of {self.max_queued_input}; send input as results come back "
                    "(Foreman.map does)")
        return None

    def job_started(self, job_id: int, owner: str) -> None:
        if job_id not in self._jobs:
            self._jobs[job_id] = _Job(owner)
            self._running[owner] = self.running(owner) + 1

    def input_added(self, job_id: int, start: int, count: int, size: int) -> None:
        """A batch of input is queued (counted even if over the quota: resumed jobs bring theirs back)."""
        job = self._jobs.get(job_id)
        if job is None or start in job.batches:
            return
        bisect.insort(job.starts, start)
        job.batches[start] = [count, count, size]
        self._queued[job.owner] = self.queued(job.owner) + size

    def answered(self, job_id: int, start: int, count: int) -> None:
        """Tasks ``start`` to ``start + count`` have their outcome: an input batch all answered no longer counts."""
        job = self._jobs.get(job_id)
        if job is None:
            return
        end = start + count
        i = max(0, bisect.bisect_right(job.starts, start) - 1)
        while i < len(job.starts) and job.starts[i] < end:
            first = job.starts[i]
            entry = job.batches[first]
            overlap = min(end, first + entry[0]) - max(start, first)  # tasks of this batch answered now
            if overlap > 0:
                entry[1] -= overlap
            if entry[1] <= 0:
                self._release(job, entry[2])
                del job.batches[first]
                del job.starts[i]
            else:
                i += 1

    def job_over(self, job_id: int) -> None:
        job = self._jobs.pop(job_id, None)
        if job is None:
            return
        self._release(job, sum(entry[2] for entry in job.batches.values()))
        left = self._running[job.owner] - 1
        if left:
            self._running[job.owner] = left
        else:
            del self._running[job.owner]

    def _release(self, job: _Job, size: int) -> None:
        left = self._queued.get(job.owner, 0) - size
        if left > 0:
            self._queued[job.owner] = left
        else:
            self._queued.pop(job.owner, None)
