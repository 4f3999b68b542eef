"""What the fleet looks like, for people: worker and job records, an event log, and recent throughput.

The scheduler decides; this module only remembers, so the dashboards, the JSON API and the metrics can show
workers that left (and why), jobs that finished, failures by task, and the last few minutes of activity.
No I/O, no clock of its own: callers pass the wall-clock time.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field
from typing import Any

#: Finished jobs and departed workers kept for display; older ones are forgotten.
HISTORY = 200
#: Failures kept per job (all are counted).
MAX_FAILURES = 100
#: Characters of a pause reason kept (workers write it; a long one is cut).
MAX_REASON = 200
#: Upper bounds (seconds) of the task-duration histogram buckets.
DURATION_BUCKETS = (0.0001, 0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 30.0, 120.0, float("inf"))


@dataclass(eq=False)
class WorkerRecord:
    id: str
    hello: dict[str, Any]
    address: str
    connected_at: float
    last_heard: float
    status: str = "idle"
    pause_reason: str = ""  # why its owner's rules paused it, while status is paused
    left_at: float | None = None
    left_reason: str = ""
    tasks_done: int = 0
    tasks_failed: int = 0
    busy_seconds: float = 0.0
    recent: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=120))

    def throughput(self, now: float, window: float = 60.0) -> float:
        """Tasks per second over the last ``window`` seconds (or since it connected, if sooner)."""
        window = max(min(window, now - self.connected_at), 1.0)
        done = sum(count for when, count in self.recent if when >= now - window)
        return done / window

    def to_json(self, now: float, running: int) -> dict[str, Any]:
        hello = self.hello
        return {
            "id": self.id, "status": self.status, "pause_reason": self.pause_reason, "connected": self.left_at is None, "address": self.address,
            "host": hello.get("hostname"), "platform": hello.get("platform"), "machine": hello.get("machine"),
            "python": hello.get("python"), "version": hello.get("version"), "cpu_count": hello.get("cpu_count"),
            "memory": hello.get("memory"), "gpus": hello.get("gpus", []), "concurrency": hello.get("concurrency"),
            "capabilities": hello.get("capabilities", []), "dashboard": hello.get("dashboard"),
            "connected_at": self.connected_at, "left_at": self.left_at, "left_reason": self.left_reason,
            "last_heartbeat_age": round(now - self.last_heard, 3), "tasks_done": self.tasks_done,
            "tasks_failed": self.tasks_failed, "tasks_running": running,
            "throughput": round(self.throughput(now), 3), "busy_seconds": round(self.busy_seconds, 3),
        }


@dataclass(eq=False)
class JobRecord:
    id: int
    name: str
    created: float
    total: int | None = None
    state: str = "running"  # running / done / failed / cancelled
    finished_at: float | None = None
    done: int = 0
    failed: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)
    owner: str = ""  # the principal that submitted it ("" for an embedded foreman's own script)

    def add_failure(self, failure: dict[str, Any]) -> None:
        self.failed += 1
        if len(self.failures) < MAX_FAILURES:
            self.failures.append(failure)

    def to_json(self, now: float, running: int, queued: int) -> dict[str, Any]:
        end = self.finished_at or now
        elapsed = max(end - self.created, 1e-9)
        finished = self.done + self.failed
        rate = finished / elapsed
        remaining = None if self.total is None else max(self.total - finished, 0)
        eta = None if remaining is None or self.finished_at or rate == 0 else remaining / rate
        return {
            "id": self.id, "name": self.name, "owner": self.owner, "state": self.state, "created": self.created,
            "finished_at": self.finished_at, "elapsed": round(elapsed, 3), "total": self.total,
            "done": self.done, "failed": self.failed, "running": running, "queued": queued,
            "throughput": round(rate, 3), "eta": None if eta is None else round(eta, 1),
            "failures": self.failures,
        }


class Fleet:
    """Records of workers (connected and departed), jobs (running and finished), events and activity."""

    def __init__(self, event_log_size: int = 500, series_points: int = 300) -> None:
        self.workers: dict[str, WorkerRecord] = {}
        self.departed: deque[WorkerRecord] = deque(maxlen=HISTORY)
        self.jobs: dict[int, JobRecord] = {}
        self.finished_jobs: deque[JobRecord] = deque(maxlen=HISTORY)
        self.events: deque[dict[str, Any]] = deque(maxlen=event_log_size)
        self.series: deque[tuple[float, float, int]] = deque(maxlen=series_points)  # (time, tasks/s, workers)
        self.tasks_done = 0
        self.tasks_failed = 0
        self.duration_buckets = [0] * len(DURATION_BUCKETS)
        self.duration_sum = 0.0
        self._last_sample: tuple[float, int] | None = None

    def event(self, now: float, kind: str, message: str) -> None:
        self.events.append({"time": now, "kind": kind, "message": message})

    # -- workers ---------------------------------------------------------------------------------------------

    def worker_joined(self, now: float, worker_id: str, hello: dict[str, Any], address: str) -> None:
        self.workers[worker_id] = WorkerRecord(worker_id, hello, address, now, now)
        self.event(now, "join", f"worker {worker_id} joined from {address} ({hello.get('concurrency')} slots)")

    def worker_heard(self, now: float, worker_id: str, status: str | None = None, reason: str | None = None) -> None:
        record = self.workers.get(worker_id)
        if record is not None:
            record.last_heard = now
            if status:
                record.status = status
                record.pause_reason = str(reason or "")[:MAX_REASON] if status == "paused" else ""

    def worker_paused(self, now: float, worker_id: str, paused: bool, reason: str) -> None:
        """The worker's owner paused it (``reason`` says why), or let it resume. Logged when the state changes."""
        record = self.workers.get(worker_id)
        if record is None:
            return
        was = record.status == "paused"
        record.status = "paused" if paused else "idle"
        record.pause_reason = reason[:MAX_REASON] if paused else ""
        if paused != was:
            self.event(now, "pause" if paused else "resume",
                       f"worker {worker_id} paused: {record.pause_reason}" if paused else f"worker {worker_id} resumed")

    def worker_left(self, now: float, worker_id: str, lost: bool, reason: str) -> None:
        record = self.workers.pop(worker_id, None)
        if record is None:
            return
        record.left_at = now
        record.status = "lost" if lost else "left"
        record.left_reason = reason
        self.departed.append(record)
        self.event(now, "loss" if lost else "leave", f"worker {worker_id} {record.status}: {reason}")

    def known_worker(self, worker_id: str) -> WorkerRecord | None:
        return _live_or_remembered(self.workers, self.departed, worker_id)

    # -- jobs and tasks --------------------------------------------------------------------------------------

    def job_added(self, now: float, job_id: int, name: str, total: int | None, owner: str = "") -> None:
        self.jobs[job_id] = JobRecord(job_id, name, now, total, owner=owner)

    def job_finished(self, now: float, job_id: int, cancelled: bool) -> None:
        record = self.jobs.pop(job_id, None)
        if record is None:
            return
        record.finished_at = now
        record.state = "failed" if record.failed else ("cancelled" if cancelled else "done")
        if record.total is None or cancelled:
            record.total = record.total if cancelled else record.done + record.failed
        self.finished_jobs.append(record)
        if record.state != "done" or record.total != 1:  # single submits would flood the log
            self.event(now, "job", f"job {job_id} ({record.name}) {record.state}: {record.done} done, "
                                   f"{record.failed} failed")

    def known_job(self, job_id: int) -> JobRecord | None:
        return _live_or_remembered(self.jobs, self.finished_jobs, job_id)

    def batch_done(self, now: float, worker_id: str, job_id: int, start: int, count: int, elapsed: float,
                   failed: int, errors: list[list[Any]]) -> None:
        """A batch's results were accepted."""
        self.tasks_done += count - failed
        self.tasks_failed += failed
        per_task = elapsed / count
        self.duration_buckets[bisect.bisect_left(DURATION_BUCKETS, per_task)] += count
        self.duration_sum += elapsed
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.tasks_done += count - failed
            worker.tasks_failed += failed
            worker.busy_seconds += elapsed
            worker.recent.append((now, count))
        job = self.jobs.get(job_id)
        if job is None:
            return
        job.done += count - failed
        described = [e for e in errors if isinstance(e, list) and len(e) == 3 and type(e[0]) is int][:failed]
        for index, type_name, message in described:
            job.add_failure({"task": start + int(index), "type": str(type_name), "message": str(message),
                             "worker": worker_id})
        job.failed += failed - len(described)  # counted, not described (the worker summarises a few per batch)

    def task_lost(self, now: float, job_id: int, start: int, count: int, reason: str) -> None:
        """A batch failed for good (poison)."""
        self.tasks_failed += count
        job = self.jobs.get(job_id)
        if job is not None:
            for index in range(start, start + count):
                job.add_failure({"task": index, "type": "foreman.errors.TaskLostError", "message": reason,
                                 "worker": None})
        self.event(now, "poison", reason)

    # -- activity --------------------------------------------------------------------------------------------

    def sample(self, now: float) -> None:
        """Record tasks/s since the last sample and the number of connected workers (call about once a second)."""
        finished = self.tasks_done + self.tasks_failed
        if self._last_sample is not None:
            then, before = self._last_sample
            rate = (finished - before) / max(now - then, 1e-9)
            self.series.append((now, round(rate, 2), len(self.workers)))
        self._last_sample = (now, finished)


def _live_or_remembered(live: dict[Any, Any], history: deque[Any], key: Any) -> Any:
    """The live record under ``key``, else the most recent remembered one with that id, else None."""
    record = live.get(key)
    if record is not None:
        return record
    return next((r for r in reversed(history) if r.id == key), None)
