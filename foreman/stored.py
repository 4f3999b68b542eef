"""Stored jobs: jobs whose results the foreman keeps in its journal until their client has them.

A remote client's job, and any detached job, is a :class:`StoredJob`: the job sink the server reports outcomes to.
Each result batch gets the next sequence number of its job, is committed to the journal, and only then is
forwarded to the clients attached to the job (:class:`Subscriber`). A client that reconnects attaches again with
the last sequence number it has, and gets the rest: results are neither lost nor delivered twice.
"""

from __future__ import annotations

import logging
from typing import Protocol

from foreman import protocol
from foreman.errors import describe_failure
from foreman.journal import JobRow, Journal, Output
from foreman.quota import ClientQuota

log = logging.getLogger("crowdcompute.foreman")


class Subscriber(Protocol):
    """A client attached to a stored job."""

    def output(self, output: Output, fed: int) -> None: ...

    def ended(self, job: JobRow) -> None: ...


class StoredJob:
    """The server-side sink of a stored job (see :class:`foreman.server.JobSink`)."""

    def __init__(self, row: JobRow, journal: Journal, quota: ClientQuota | None = None) -> None:
        self.id = row.id
        self.owner = row.owner
        self.detached = row.detached
        self.fed = row.fed
        self.input_closed = row.input_closed
        self.journal = journal
        self.subscribers: list[Subscriber] = []
        self.orphaned_at: float | None = None  # when its last subscriber went away (for the orphan rule)
        self.over = False  # its end is journaled and told: a later end (cancelling an aborted job) changes nothing
        self.failure: str | None = None  # set before cancelling it (a task failed, a quota): it ends failed
        self._next_seq = max(row.next_seq, journal.seq_floor)  # never a number handed out before a power loss
        self.quota = quota or ClientQuota()  # its owner's: counts this job and its unanswered input
        self.quota.job_started(self.id, self.owner)

    def add_input(self, start: int, count: int, payload: bytes | memoryview) -> bool:
        """Journal a batch of input; False for a batch already received (a client resending after a reconnect)."""
        if start < self.fed:
            return False
        if start > self.fed:
            raise ValueError(f"job {self.id}: input from task {start} but only {self.fed} tasks received")
        self.journal.add_input(self.id, start, count, payload)
        self.fed = start + count
        self.quota.input_added(self.id, start, count, len(payload))
        return True

    def resumed_input(self, start: int, count: int, size: int) -> None:
        """A batch of input brought back from the journal after a restart (counted in its owner's quota)."""
        self.quota.input_added(self.id, start, count, size)

    def close_input(self) -> None:
        self.journal.close_input(self.id)
        self.input_closed = True

    # -- JobSink ---------------------------------------------------------------------------------------------

    def deliver(self, start: int, count: int, payload: bytes | memoryview, elapsed: float, worker: str) -> None:
        self._store(Output(self.id, self._next_seq, start, count, protocol.STATUS_OK, bytes(payload), None,
                           elapsed, worker))

    def fail(self, start: int, count: int, error: BaseException) -> None:
        self._store(Output(self.id, self._next_seq, start, count, protocol.STATUS_FAILED, b"",
                           describe_failure(error), 0.0, None))

    def aborted(self, error: BaseException) -> None:
        """The foreman shuts down. A persistent journal keeps the job for the next run; else it is failed."""
        if not self.journal.persistent:
            self.journal.finish_job(self.id, protocol.JOB_FAILED_STATE, str(error))
            self._ended()

    def starting(self, start: int) -> bool:
        return True

    def finished(self, cancelled: bool) -> None:
        if self.over:
            return
        if self.failure is not None:
            self.journal.finish_job(self.id, protocol.JOB_FAILED_STATE, self.failure)
        else:
            self.journal.finish_job(self.id, protocol.JOB_CANCELLED_STATE if cancelled else protocol.JOB_DONE_STATE)
        self._ended()

    # -- subscribers -----------------------------------------------------------------------------------------

    def attach(self, subscriber: Subscriber, after: int) -> None:
        """Send ``subscriber`` the stored results after ``after``, then everything new."""
        for output in self.journal.outputs(self.id, after):
            subscriber.output(output, self.fed)
        self.subscribers.append(subscriber)
        self.orphaned_at = None

    def detach(self, subscriber: Subscriber, now: float) -> None:
        if subscriber in self.subscribers:
            self.subscribers.remove(subscriber)
            if not self.subscribers:
                self.orphaned_at = now

    def _store(self, output: Output) -> None:
        self.journal.add_output(output)  # committed before any client hears of it
        self._next_seq += 1
        self.quota.answered(self.id, output.start, output.count)
        for subscriber in list(self.subscribers):
            subscriber.output(output, self.fed)

    def _ended(self) -> None:
        self.over = True
        self.quota.job_over(self.id)
        row = self.journal.job(self.id)
        if row is not None:
            for subscriber in list(self.subscribers):
                subscriber.ended(row)
        self.subscribers.clear()
