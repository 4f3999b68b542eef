"""Detached jobs: ``fm.submit_job(fn, items)`` returns a :class:`JobHandle` at once; any process of the same
owner may later take it up with ``Foreman.connect(...).job(job_id)`` and read its results, wait, or cancel it.

A handle is a job sink: it receives the job's stored results (all that the foreman kept, then new ones) and its
end, from a remote foreman over the client connection or from an embedded one in-process (:class:`LocalSubscriber`).
"""

from __future__ import annotations

import concurrent.futures
import threading
from typing import TYPE_CHECKING, Any

from foreman import protocol
from foreman.errors import ForemanClosedError, rebuild_failure
from foreman.journal import JobRow, Output
from foreman.serialization import loads_results, rebuild_exception

if TYPE_CHECKING:
    from foreman.client import Foreman


class JobHandle:
    """A stored job, submitted now or earlier. Its results arrive in the background once it is attached.

    ``results()`` waits for the end and returns every task's result in input order (raising the first failed
    task's exception, with its remote traceback, unless ``return_exceptions=True``).
    """

    def __init__(self, foreman: Foreman, job_id: int) -> None:
        self.id = job_id
        self._foreman = foreman
        self._outcomes: dict[int, tuple[int, Any, BaseException | None]] = {}  # start -> (count, payload, error)
        self._end = threading.Event()
        self._cancelled = False
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<JobHandle {self.id}>"

    # -- the user's side -------------------------------------------------------------------------------------

    @property
    def progress(self) -> tuple[int, int | None]:
        """(tasks done, total tasks or None when unknown), as the foreman counts them now."""
        info = self.info()
        return info["done"] + info["failed"], info["total"]

    @property
    def state(self) -> str:
        """``running``, ``done``, ``cancelled`` or ``failed``."""
        return str(self.info()["state"])

    def info(self) -> dict[str, Any]:
        """The foreman's record of the job: name, owner, state, counts, times."""
        return self._foreman._job_info(self.id)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job is over; False if ``timeout`` passed first."""
        return self._end.wait(timeout)

    def done(self) -> bool:
        return self._end.is_set()

    def results(self, timeout: float | None = None, return_exceptions: bool = False) -> list[Any]:
        """Every task's result in input order, once the job is over."""
        if not self._end.wait(timeout):
            raise concurrent.futures.TimeoutError(f"job {self.id} not over after {timeout}s")
        if self._error is not None:
            raise self._error
        if self._cancelled:
            raise concurrent.futures.CancelledError(f"job {self.id} was cancelled")
        trusted = self._foreman._backend.trust_workers
        out: list[Any] = []
        with self._lock:
            outcomes = sorted(self._outcomes.items())
        for start, (count, payload, error) in outcomes:
            if start != len(out):
                raise RuntimeError(f"job {self.id}: results from task {len(out)} are missing")
            if error is not None:
                if not return_exceptions:
                    raise error
                out.extend([error] * count)
                continue
            results, errors = loads_results(payload, count, trusted)
            for offset in sorted(errors):  # a task's raised exception, not one it returned as its value
                results[offset] = rebuild_exception(errors[offset], trusted)
                if not return_exceptions:
                    raise results[offset]
            out.extend(results)
        return out

    def cancel(self) -> None:
        """Queued tasks never run; running ones are killed."""
        self._foreman._post(self._foreman._backend.cancel_job, self.id)

    # -- JobSink ---------------------------------------------------------------------------------------------

    def deliver(self, start: int, count: int, payload: bytes | memoryview, elapsed: float, worker: str) -> None:
        with self._lock:
            self._outcomes[start] = (count, bytes(payload), None)

    def fail(self, start: int, count: int, error: BaseException) -> None:
        with self._lock:
            self._outcomes[start] = (count, None, error)

    def aborted(self, error: BaseException) -> None:
        self._error = error
        self._end.set()

    def starting(self, start: int) -> bool:
        return True

    def finished(self, cancelled: bool) -> None:
        self._cancelled = cancelled
        self._end.set()


class LocalSubscriber:
    """Feeds a stored job of an embedded foreman to a job sink in the same process."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink

    def output(self, output: Output, fed: int) -> None:
        if output.status == protocol.STATUS_OK:
            self.sink.deliver(output.start, output.count, output.payload, output.elapsed, output.worker or "")
        else:
            self.sink.fail(output.start, output.count, rebuild_failure(output.error))

    def ended(self, job: JobRow) -> None:
        if job.state == protocol.JOB_FAILED_STATE:
            self.sink.aborted(ForemanClosedError(f"job {job.id} failed on the foreman: {job.error}"))
        else:
            self.sink.finished(job.state == protocol.JOB_CANCELLED_STATE)

