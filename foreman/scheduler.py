"""The scheduler core: who runs what, with no I/O, no threads and no wall clock.

The server feeds it events (a worker joined, a message arrived, a batch was added, the clock moved) and acts on
what it returns (send these batches there, close that connection, fail those tasks). Everything is deterministic
given the injected clock, so tests drive it directly with a fake clock and never open a socket.

The unit of assignment is a :class:`Batch`: a contiguous range of one job's tasks. Per-batch, not per-task,
bookkeeping keeps the hot path cheap. A batch's life is one table, :data:`TRANSITIONS`; :func:`_move` is the
only place a state changes.

Worker loss and poison tasks. When a worker vanishes, or a batch's task process crashes, the batch gets a strike
and is requeued as a *suspect*. A suspect runs alone: on a worker with nothing else in flight, which gets nothing
else until it is done, so that what happens next can be blamed on it. A multi-task batch with a second strike is
split into single tasks (each still a suspect). Graceful hand-backs (draining, restart) requeue without a strike.

A task is declared poison only on evidence that points at it (:func:`poison_verdict`), as BOINC tells error
results from no-replies. Its task process crashed while the worker lived, ``max_task_losses`` times: that is its
doing. A lost worker (heartbeat timeout, dropped connection, the whole worker killed) is weak evidence, as volunteers
vanish all the time: a loss counts only if the task ran *alone* on that worker (a single task, nothing else held),
and the losses must be more than the fleet's own loss rate explains: each counted loss has the odds that a worker
of this fleet is lost within the time it ran the task (:meth:`Scheduler.loss_rate`, measured over the fleet's
worker-seconds), and the task is poison once ``max_task_losses`` such losses have combined odds below
:data:`POISON_ODDS`, or after ``LOSS_CAP`` times ``max_task_losses`` of them whatever the odds.

Replicas. A job with ``copies`` > 1 (redundancy, spot checks) runs each batch on that many distinct workers, on
distinct hosts while at least that many hosts are connected. After its first assignment a batch that still
wants copies waits in its job's ``replicas`` (ahead of new batches) until enough workers took it. Its copies'
results are *answers* (:meth:`Scheduler.answer`); the caller compares them (:mod:`foreman.validation`) and then
either finishes the batch (:meth:`Scheduler.settle`) or asks for more copies (:meth:`Scheduler.add_copies`).
A spot-checked batch keeps one of its copies for a trusted worker. A *barred* worker (quarantined or banned)
gets no work.
"""

from __future__ import annotations

import enum
import itertools
import math
import random
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from foreman.serialization import Pickled, split_payload


class State(enum.Enum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    DONE = "done"
    FAILED = "failed"
    SPLIT = "split"  # replaced by single-task batches
    CANCELLED = "cancelled"


class Event(enum.Enum):
    ASSIGN = "assign"
    COMPLETE = "complete"
    REQUEUE = "requeue"  # lost its last worker, or handed back
    FAIL = "fail"
    SPLIT = "split"
    CANCEL = "cancel"


#: Every allowed (state, event) -> new state. Anything else is a bug and raises.
TRANSITIONS: dict[tuple[State, Event], State] = {
    (State.QUEUED, Event.ASSIGN): State.ASSIGNED,
    (State.QUEUED, Event.CANCEL): State.CANCELLED,
    (State.ASSIGNED, Event.ASSIGN): State.ASSIGNED,  # a second copy (speculation, or reassignment race)
    (State.ASSIGNED, Event.COMPLETE): State.DONE,
    (State.ASSIGNED, Event.REQUEUE): State.QUEUED,
    (State.ASSIGNED, Event.FAIL): State.FAILED,
    (State.ASSIGNED, Event.SPLIT): State.SPLIT,
    (State.ASSIGNED, Event.CANCEL): State.CANCELLED,
}

#: Seconds a batch must have been in flight before a speculative copy is considered: below this, killing and
#: restarting a task process costs more than waiting.
SPECULATION_MIN_AGE = 0.25
#: A worker whose seconds per task on a job are this many times the job's typical is slow for that job: at the
#: job's tail, a batch it holds is copied onto an idle worker as soon as the copy would finish first.
SLOW_PACE = 2.0

#: Combined odds under which a single task's solo losses are blamed on it: the chance that an innocent task, at the
#: fleet's measured loss rate, loses that many workers that quickly.
POISON_ODDS = 1e-3
#: The fleet's loss rate before it is measured: one worker lost per ten worker-minutes, with the weight of that much
#: observation (a fleet's measured losses outweigh it after some minutes of a few workers).
PRIOR_LOSS = 1.0
PRIOR_SECONDS = 600.0
#: A task that lost this many times ``max_task_losses`` workers while running alone is poison whatever the odds
#: (a fleet that loses workers to it also raises its own loss rate; this bounds the workers it can take).
LOSS_CAP = 3

TERMINAL = frozenset({State.DONE, State.FAILED, State.SPLIT, State.CANCELLED})


class TransitionError(RuntimeError):
    """The core was asked for a transition its table does not allow: a bug in the caller or the core."""


@dataclass(eq=False)
class Batch:
    """Tasks ``start .. start+count-1`` of one job, with their pickled arguments."""

    job_id: int
    start: int
    count: int
    payload: Pickled
    state: State = State.QUEUED
    strikes: int = 0  # workers lost or task processes crashed while this batch was in flight: makes it a suspect
    crashes: int = 0  # its task process died while the worker lived (evidence against it)
    solo_losses: list[float] = field(default_factory=list)  # odds of each loss of a worker running it alone
    attempts: int = 0  # times assigned
    holders: set[str] = field(default_factory=set)  # workers it is in flight on
    assigned_at: float = 0.0
    last_loss: str = ""
    speculated: bool = False  # a second copy was started on another worker
    copies: int = 1  # results wanted from distinct workers (replicas)
    spot_check: bool = False  # one copy must run on a trusted worker
    answered: set[str] = field(default_factory=set)  # workers that returned a replica's results
    hosts: dict[str, str] = field(default_factory=dict)  # holder or answerer -> its host
    trusted_by: set[str] = field(default_factory=set)  # trusted holders and answerers

    @property
    def pending(self) -> int:
        """Copies wanted that no worker holds or answered yet."""
        return self.copies - len(self.holders) - len(self.answered)

    @property
    def suspect(self) -> bool:
        return self.strikes > 0

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.job_id, self.start, self.count)


def _move(batch: Batch, event: Event) -> None:
    """Apply ``event`` to ``batch``: the only place a batch changes state."""
    new = TRANSITIONS.get((batch.state, event))
    if new is None:
        raise TransitionError(f"batch {batch.key} cannot {event.value} from {batch.state.value}")
    batch.state = new


@dataclass(eq=False)
class Job:
    """The core's view of a job: its live batches, in queue or in flight."""

    id: int
    env: str  # environment fingerprint a worker must match to receive this job's function
    created: float
    requires: frozenset[str] = frozenset()  # capabilities a worker must advertise
    resources: dict[str, float] = field(default_factory=dict)  # minimum amounts a worker must have
    priority: int = 0  # higher first; equal priorities share workers round-robin, by owner then by job
    owner: str = ""  # who submitted it: owners of equal priority get turns in round-robin
    held_until: float = 0.0  # recovered after a restart: its queue waits for its workers to reconnect until then
    queue: deque[Batch] = field(default_factory=deque)  # ordinary batches, in order
    suspects: deque[Batch] = field(default_factory=deque)  # batches that lost a worker; run alone
    live: dict[int, Batch] = field(default_factory=dict)  # start -> batch, queued or assigned
    # start -> batch for first copies in flight that may still be speculated on, oldest first (see _speculate)
    flying: dict[int, Batch] = field(default_factory=dict)
    input_closed: bool = False  # no more batches will be added
    cancelled: bool = False
    tasks_total: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    durations: deque[float] = field(default_factory=lambda: deque(maxlen=64))  # recent batch run times
    typical: float | None = None  # the median of durations, once there are 5
    pace: dict[str, float] = field(default_factory=dict)  # worker -> its recent seconds per task on this job
    slow: dict[str, None] = field(default_factory=dict)  # workers at SLOW_PACE times the typical or slower (ordered)
    copies: int = 1  # workers each batch runs on (redundancy)
    spot_check: float = 0.0  # fraction of batches that also run on a trusted worker
    replicas: dict[int, Batch] = field(default_factory=dict)  # start -> assigned batch wanting more copies

    @property
    def finished(self) -> bool:
        return self.cancelled or (self.input_closed and not self.live)

    @property
    def has_queued(self) -> bool:
        return bool(self.queue or self.suspects or self.replicas)


@dataclass(eq=False)
class Worker:
    """The core's view of a connected worker."""

    id: str
    slots: int  # tasks it runs at once
    env: str
    capacity: int  # batches it may hold: slots plus prefetch
    last_seen: float
    capabilities: frozenset[str] = frozenset()
    resources: dict[str, float] = field(default_factory=dict)
    host: str = ""  # machine it runs on (workers on one host count as one for replicas)
    trusted: bool = False  # marked by the operator: may run spot checks, never quarantined
    barred: str = ""  # why it gets no work (quarantined, banned); "" if it may work
    batches: dict[tuple[int, int, int], Batch] = field(default_factory=dict)
    jobs: set[int] = field(default_factory=set)  # jobs whose function it has been sent
    exclusive: bool = False  # running a suspect batch: gets nothing else
    draining: bool = False
    paused: bool = False  # its owner's rules paused it: it gets nothing new until it resumes
    tasks_done: int = 0
    joined: float = 0.0  # clock time it connected (the fleet's worker-seconds, for its loss rate)

    @property
    def free(self) -> bool:
        return (not self.draining and not self.paused and not self.exclusive and not self.barred
                and len(self.batches) < self.capacity)


@dataclass(frozen=True)
class Assignment:
    """Send ``batch`` to ``worker``; first send the job's function if ``ship_function``."""

    worker_id: str
    batch: Batch
    ship_function: bool


@dataclass(frozen=True)
class Completion:
    """A batch's first result was accepted; ``cancel_on`` still run copies of it."""

    batch: Batch
    cancel_on: tuple[str, ...]


@dataclass(frozen=True)
class Evidence:
    """Why a copy of a batch stopped without results: ``crash`` (its task process died, the worker lived), or a
    lost worker, ``solo`` if the batch was a single task and all the worker held, ``odds`` the chance that a
    worker of this fleet is lost within the time it ran the batch."""

    crash: bool = False
    solo: bool = False
    odds: float = 1.0


def poison_verdict(batch: Batch, max_task_losses: int) -> str | None:
    """Why a single task is poison, or None while the evidence does not point at it (see the module's notes)."""
    if batch.count != 1:
        return None
    where = f"task {batch.start} of job {batch.job_id}"
    if max_task_losses == 1 and batch.strikes:  # asked for: a task is not retried after any loss
        return (f"{where} was in flight on a worker that was lost or crashed ({batch.last_loss}); with "
                f"max_task_losses=1 it is not retried")
    if batch.crashes >= max_task_losses:
        return (f"{where} crashed its task process on {batch.crashes} workers that lived on (last: "
                f"{batch.last_loss}); it looks like a poison task and is not retried")
    losses = batch.solo_losses
    if len(losses) < max_task_losses:
        return None
    odds = 1.0
    for chance in losses:
        odds *= chance
    if odds <= POISON_ODDS or len(losses) >= LOSS_CAP * max_task_losses:
        return (f"{where} was in flight alone on {len(losses)} workers that died while running it (last: "
                f"{batch.last_loss}); at this fleet's loss rate the odds of that for an innocent task are "
                f"{odds:.1g}: it looks like a poison task and is not retried")
    return None


@dataclass(frozen=True)
class Failure:
    """A batch failed for good (poison task); its tasks get ``reason`` as their error."""

    batch: Batch
    reason: str


class Scheduler:
    """Task states, queues, assignment, heartbeat deadlines, reassignment and retry counting.

    :param clock: returns the current time in seconds (``time.monotonic`` in production, a fake in tests).
    :param heartbeat_timeout: a worker silent for this long is declared lost. Shorter detects a frozen machine
        sooner; too short declares slow links dead and reruns their work.
    :param prefetch: batches queued on a worker beyond its running slots, so it never waits for its next batch.
        Each costs memory on the worker and work redone if the worker is lost.
    :param max_task_losses: a task is failed as poison after its task process crashed on this many workers, or
        after this many workers running it alone were lost, more than the fleet's loss rate explains (see
        :func:`poison_verdict`). 1: a single task is not retried after any loss or crash.
    :param speculation: when a job has no queued batch for an idle worker (its tail, or an ordered job held up
        by its oldest batch), a batch in flight for longer than this many times the job's typical time (and at
        least :data:`SPECULATION_MIN_AGE`) is also started on the idle worker, and so is, at once, a batch held
        by a worker whose own pace on the job is :data:`SLOW_PACE` times the typical or worse, when a typical
        worker would finish it in half the time the holder still needs; the first result wins and the other copy
        is cancelled. Costs duplicate work at the tail of a job, saves waiting for its slowest volunteer.
        :meth:`next_speculation` says when the next batch turns late. None turns it off.
    :param rng: draws which batches are spot-checked (seed it in tests).
    """

    def __init__(self, clock: Callable[[], float], heartbeat_timeout: float = 30.0, prefetch: int | None = None,
                 max_task_losses: int = 3, speculation: float | None = 3.0,
                 rng: random.Random | None = None) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be > 0")
        if max_task_losses < 1:
            raise ValueError("max_task_losses must be >= 1")
        self.clock = clock
        self.heartbeat_timeout = heartbeat_timeout
        self.prefetch = prefetch
        self.max_task_losses = max_task_losses
        self.loss_resolution = heartbeat_timeout / 6  # how well a worker's last sign of life is known (a heartbeat)
        self.speculation = speculation
        self.rng = rng or random.Random()
        self.jobs: dict[int, Job] = {}
        self.workers: dict[str, Worker] = {}
        self._by_last_seen: OrderedDict[str, None] = OrderedDict()  # least recently heard from first
        # Workers that may take a batch now, each also filed under its load (batches held / slots), so that a
        # dispatch pass visits the least loaded first without sorting the fleet. Both change only in _refile.
        self._free: dict[str, float] = {}  # worker -> its load
        self._by_load: dict[float, dict[str, None]] = {}  # load -> the free workers at it (ordered sets)
        self._holders: dict[int, set[str]] = {}  # job -> workers that were sent its function
        self._runnable: deque[int] = deque()  # jobs with queued batches, round-robin order
        self._reserved: str | None = None  # worker being emptied to run a waiting suspect
        self.next_job_id = 1
        self._turns = itertools.count()  # a clock of owner turns, for round-robin between owners
        self._owner_turn: dict[str, int] = {}  # owner -> the turn it was last served at
        self.capacity = 0  # batches all workers may hold; read by feeder threads, so a plain int
        self.slots = 0  # tasks all workers run at once
        self.reassigned = 0
        self.speculated = 0
        self.duplicates_dropped = 0
        self.workers_lost = 0
        self._worker_seconds = 0.0  # connected time of the workers that left (see loss_rate)
        self._background_lost = 0  # workers lost while not running a single suspect task alone
        self.replicas_added = 0  # copies asked for beyond a job's redundancy, after disagreements
        self._hosts: Counter[str] = Counter()  # connected workers per host

    # -- workers ---------------------------------------------------------------------------------------------

    def add_worker(self, worker_id: str, slots: int, env: str, capabilities: frozenset[str] = frozenset(),
                   resources: dict[str, float] | None = None, host: str = "", trusted: bool = False,
                   barred: str = "") -> Worker:
        """Register a connected worker; ``host`` "" means unknown (it then counts as a host of its own)."""
        if worker_id in self.workers:
            raise ValueError(f"worker {worker_id!r} is already connected")
        if slots < 1:
            raise ValueError("a worker needs at least one slot")
        prefetch = slots if self.prefetch is None else self.prefetch
        worker = Worker(worker_id, slots, env, slots + prefetch, self.clock(), frozenset(capabilities),
                        dict(resources or {}), host or f"worker:{worker_id}", trusted, barred, joined=self.clock())
        self.workers[worker_id] = worker
        self._hosts[worker.host] += 1
        self.capacity += worker.capacity
        self.slots += slots
        self._by_last_seen[worker_id] = None
        self._refile(worker)
        return worker

    def touch(self, worker_id: str) -> None:
        """Any message from a worker proves it alive."""
        worker = self.workers.get(worker_id)
        if worker is not None:
            worker.last_seen = self.clock()
            self._by_last_seen.move_to_end(worker_id)

    def expired(self, slack: float = 0.0) -> list[str]:
        """Workers silent for longer than the heartbeat timeout (plus ``slack``: how late the caller's own loop
        may be in reading their messages). The caller removes them."""
        deadline = self.clock() - self.heartbeat_timeout - slack
        out = []
        for worker_id in self._by_last_seen:
            if self.workers[worker_id].last_seen >= deadline:
                break
            out.append(worker_id)
        return out

    def drain_worker(self, worker_id: str) -> None:
        """The worker takes no new batches; those it holds finish or come back by :meth:`hand_back`."""
        worker = self.workers[worker_id]
        worker.draining = True
        self._refile(worker)

    def pause_worker(self, worker_id: str, paused: bool) -> None:
        """The worker's owner paused it (it takes no new batches; those it holds finish or come back by
        :meth:`hand_back`), or let it resume."""
        worker = self.workers[worker_id]
        worker.paused = paused
        self._refile(worker)

    def remove_worker(self, worker_id: str, lost: bool) -> list[Failure]:
        """Forget a worker and requeue what it held: with a strike if ``lost``, without if it left cleanly."""
        worker = self.workers.pop(worker_id)
        now = self.clock()
        self._worker_seconds += max(0.0, now - worker.joined)
        self.capacity -= worker.capacity
        self.slots -= worker.slots
        self._hosts[worker.host] -= 1
        if not self._hosts[worker.host]:
            del self._hosts[worker.host]
        if self._reserved == worker_id:
            self._reserved = None
        self._by_last_seen.pop(worker_id, None)
        self._refile(worker)
        for job_id in worker.jobs:
            self._holders.get(job_id, set()).discard(worker_id)
            job = self.jobs.get(job_id)
            if job is not None:
                job.pace.pop(worker_id, None)
                job.slow.pop(worker_id, None)
        solo = len(worker.batches) == 1
        judged = solo and any(b.count == 1 and b.suspect for b in worker.batches.values())
        if lost:
            self.workers_lost += 1
            if not judged:  # a worker lost while running a suspect alone is what is being judged, not the fleet
                self._background_lost += 1
        failures = []
        rate = self.loss_rate() if lost else 0.0
        for batch in worker.batches.values():
            evidence = None
            if lost:  # the odds that a worker is lost within the time this one ran the batch, heard alive
                ran = max(0.0, worker.last_seen - batch.assigned_at) + self.loss_resolution
                evidence = Evidence(solo=solo and batch.count == 1, odds=1.0 - math.exp(-rate * ran))
            failure = self._drop_copy(batch, worker_id, strike=lost, reason=f"worker {worker_id} was lost",
                                      evidence=evidence)
            if failure:
                failures.append(failure)
        return failures

    def loss_rate(self) -> float:
        """Workers lost per worker-second connected over this run, leaving out those lost while running a
        single suspect task alone (the losses being judged): the fleet's own loss rate, which a task's losses
        are judged against. It starts from a prior of :data:`PRIOR_LOSS` lost per :data:`PRIOR_SECONDS`, so that
        a young fleet's first loss does not read as a storm."""
        now = self.clock()
        seconds = self._worker_seconds + sum(now - w.joined for w in self.workers.values())
        return (self._background_lost + PRIOR_LOSS) / (seconds + PRIOR_SECONDS)

    def bar(self, worker_id: str, reason: str) -> list[Batch]:
        """The worker gets no more work (quarantined, banned); returns the batches it held, requeued without a
        strike, to be cancelled there."""
        worker = self.workers[worker_id]
        worker.barred = reason
        if self._reserved == worker_id:
            self._reserved = None
        held = list(worker.batches.values())
        for batch in held:
            self._release(worker, batch.key)
            self._drop_copy(batch, worker_id, strike=False, reason="")
        self._refile(worker)
        return held

    def unbar(self, worker_id: str) -> None:
        worker = self.workers[worker_id]
        worker.barred = ""
        self._refile(worker)

    # -- jobs ------------------------------------------------------------------------------------------------

    def add_job(self, env: str, requires: frozenset[str] = frozenset(), resources: dict[str, float] | None = None,
                priority: int = 0, owner: str = "", job_id: int | None = None, held_until: float = 0.0,
                copies: int = 1, spot_check: float = 0.0) -> Job:
        """A new job. ``job_id`` recreates a journaled one (new ids then start above it); ``held_until`` keeps its
        queue for the workers that held its batches until that time (see :meth:`adopt`). Each of its batches
        runs on ``copies`` distinct workers, and a ``spot_check`` fraction of them on one more, trusted, worker."""
        if copies < 1 or not 0.0 <= spot_check <= 1.0:
            raise ValueError("need copies >= 1 and 0 <= spot_check <= 1")
        if job_id is None:
            job_id = self.next_job_id
        elif job_id in self.jobs:
            raise ValueError(f"job {job_id} exists")
        self.next_job_id = max(self.next_job_id, job_id + 1)
        job = Job(job_id, env, self.clock(), frozenset(requires), dict(resources or {}), priority, owner,
                  held_until, copies=copies, spot_check=spot_check)
        self.jobs[job.id] = job
        return job

    def skip_job_ids(self, last: int) -> None:
        """New jobs get ids above ``last`` (ids journaled by an earlier run of the foreman)."""
        self.next_job_id = max(self.next_job_id, last + 1)

    def adopt(self, worker_id: str, job_id: int, start: int, count: int) -> bool:
        """A reconnecting worker still holds a queued batch (it ran on, or finished, while the foreman
        restarted): the batch is in flight there again rather than run twice. False if it is not queued."""
        batch = self._live_batch(job_id, start, count)
        worker = self.workers.get(worker_id)
        if batch is None or worker is None or batch.state is not State.QUEUED:
            return False
        job = self.jobs[job_id]
        (job.suspects if batch.suspect else job.queue).remove(batch)  # O(queue): after a restart only
        if not job.has_queued and job.id in self._runnable:
            self._runnable.remove(job.id)
        had_function = job_id in worker.jobs
        self._assign(worker, batch)
        if not had_function:
            worker.jobs.discard(job_id)  # the worker dropped the function on reconnecting: ship it again
            self._holders[job_id].discard(worker_id)
        return True

    def add_batch(self, job_id: int, start: int, count: int, payload: Pickled) -> Batch:
        job = self.jobs[job_id]
        if job.input_closed:
            raise ValueError(f"job {job_id} input is closed")
        batch = Batch(job_id, start, count, payload, copies=job.copies)
        if job.spot_check and self.rng.random() < job.spot_check:
            batch.spot_check = True
            batch.copies += 1
        job.live[start] = batch
        job.tasks_total += count
        job.queue.append(batch)
        self._mark_runnable(job)
        return batch

    def close_input(self, job_id: int) -> None:
        """No more batches will be added to this job."""
        self.jobs[job_id].input_closed = True

    def cancel_job(self, job_id: int) -> list[tuple[str, Batch]]:
        """Cancel every live batch; returns the (worker, batch) pairs still running, to be killed there."""
        job = self.jobs[job_id]
        job.cancelled = True
        running = []
        for batch in job.live.values():
            for worker_id in batch.holders:
                running.append((worker_id, batch))
                self._release(self.workers[worker_id], batch.key)
            batch.holders.clear()
            _move(batch, Event.CANCEL)
        job.live.clear()
        job.flying.clear()
        job.queue.clear()
        job.suspects.clear()
        job.replicas.clear()
        if job_id in self._runnable:
            self._runnable.remove(job_id)
        return running

    def cancel_batch(self, job_id: int, start: int) -> list[str]:
        """Cancel one live batch (one ``submit`` call); returns the workers running it, to be killed there."""
        job = self.jobs.get(job_id)
        batch = job.live.get(start) if job is not None else None
        if job is None or batch is None:
            return []
        running = sorted(batch.holders)
        for worker_id in running:
            self._release(self.workers[worker_id], batch.key)
        batch.holders.clear()
        if batch.state is State.QUEUED:
            (job.suspects if batch.suspect else job.queue).remove(batch)  # O(queue): a user's cancel
        job.flying.pop(start, None)
        job.replicas.pop(start, None)
        self._refresh_runnable(job)
        _move(batch, Event.CANCEL)
        del job.live[start]
        job.tasks_total -= batch.count
        return running

    def forget_job(self, job_id: int) -> list[str]:
        """Drop a finished job; returns the workers holding its function, to be told they may forget it."""
        self.jobs.pop(job_id)
        holders = self._holders.pop(job_id, set())
        for worker_id in holders:
            self.workers[worker_id].jobs.discard(job_id)
        return list(holders)

    # -- results ---------------------------------------------------------------------------------------------

    def complete(self, worker_id: str, job_id: int, start: int, count: int,
                 holders_only: bool = False) -> Completion | None:
        """A worker returned a batch's results. None if they are stale or a duplicate: drop them.

        A result from a worker that does not hold the batch (one that reconnected, and finished work it was
        given before) is accepted unless ``holders_only``: a foreman that does not trust its workers takes a
        batch's results only from a worker it sent that batch to.
        """
        batch = self._live_batch(job_id, start, count)
        worker = self.workers.get(worker_id)
        if worker is not None:
            self._release(worker, (job_id, start, count))
        if (batch is None or batch.state is not State.ASSIGNED or batch.copies > 1
                or (holders_only and worker_id not in batch.holders)):
            self.duplicates_dropped += 1
            return None
        if worker is not None:
            worker.tasks_done += count
        return self.settle(batch, exclude=worker_id)

    def answer(self, worker_id: str, job_id: int, start: int, count: int) -> Batch | None:
        """A worker returned its copy of a replicated batch: it becomes one of the batch's answers (the caller
        compares them). None if stale, or if that worker does not hold the batch: drop the results."""
        batch = self._live_batch(job_id, start, count)
        worker = self.workers.get(worker_id)
        if worker is not None:
            self._release(worker, (job_id, start, count))
        if batch is None or batch.state is not State.ASSIGNED or worker_id not in batch.holders:
            self.duplicates_dropped += 1
            return None
        batch.holders.discard(worker_id)
        batch.answered.add(worker_id)
        if worker is not None:
            worker.tasks_done += count
        return batch

    def add_copies(self, batch: Batch, n: int) -> None:
        """The answers disagree: run ``n`` more copies of the batch, on workers that have not run it."""
        batch.copies += n
        self.replicas_added += n
        self._offer_copy(batch)

    def settle(self, batch: Batch, exclude: str = "") -> Completion:
        """The batch is finished (its result accepted, or its validation given up); copies still running on
        workers other than ``exclude`` are to be cancelled."""
        _move(batch, Event.COMPLETE)
        ran_it = exclude in batch.holders and not batch.speculated  # a copy is timed from the first one's start
        others = tuple(w for w in batch.holders if w != exclude)
        for other in others:
            self._release(self.workers[other], batch.key)
        batch.holders.clear()
        job = self.jobs[batch.job_id]
        del job.live[batch.start]
        job.flying.pop(batch.start, None)
        job.replicas.pop(batch.start, None)
        job.tasks_done += batch.count
        per_task = (self.clock() - batch.assigned_at) / batch.count
        job.durations.append(per_task)
        if self.speculation is not None:
            self._observe_pace(job, per_task, exclude if ran_it else "")
        batch.payload = Pickled(b"")
        self._refresh_runnable(job)
        return Completion(batch, others)

    def hand_back(self, worker_id: str, job_id: int, start: int, count: int) -> None:
        """The worker returned a batch unstarted (draining, restarting): requeue it without a strike."""
        batch = self._live_batch(job_id, start, count)
        worker = self.workers.get(worker_id)
        if batch is None or worker is None or worker_id not in batch.holders:
            return
        self._release(worker, batch.key)
        self._drop_copy(batch, worker_id, strike=False, reason="")

    def crashed(self, worker_id: str, job_id: int, start: int, count: int, reason: str) -> Failure | None:
        """The process running a batch died while the worker lived: a strike, as for a lost worker."""
        batch = self._live_batch(job_id, start, count)
        worker = self.workers.get(worker_id)
        if batch is None or worker is None or worker_id not in batch.holders:
            return None
        self._release(worker, batch.key)
        return self._drop_copy(batch, worker_id, strike=True, reason=reason, evidence=Evidence(crash=True))

    # -- assignment ------------------------------------------------------------------------------------------

    def dispatch(self) -> list[Assignment]:
        """Fill free workers from the queues, one batch per worker per pass, least loaded first, so an idle
        worker is served before a busy one gets its prefetch. Call after anything that frees a worker or adds
        work."""
        out: list[Assignment] = []
        while self._runnable and self._free:
            assigned = 0
            for worker_id in self._least_loaded_first():
                worker = self.workers[worker_id]
                batch = self._next_batch_for(worker) if worker.free else None
                if batch is not None:
                    out.append(self._assign(worker, batch))
                    assigned += 1
                if not self._runnable:
                    break
            if not assigned:
                break
        if self.speculation is not None:
            out.extend(self._speculate())
        return out

    def _least_loaded_first(self) -> Iterator[str]:
        """The free workers for one dispatch pass, least loaded first, each once. Loads are few (batches held
        per slot), so only they are sorted; a bucket is listed when the pass reaches it, and the pass stops
        when the queues are empty, so the fleet's size does not enter a pass that assigns a few batches.
        Idle workers come the most recently filed first, which is usually the one that just finished a batch:
        the likeliest to be awake (a local worker polls for a moment after a short batch, see
        :mod:`worker.polling`), which shortens a round trip. Calls one after the other then stay on one worker."""
        visited: set[str] = set()  # a worker given a batch moves to a fuller bucket: not visited twice
        for load in sorted(self._by_load):
            bucket = self._by_load.get(load, {})
            for worker_id in list(reversed(bucket) if load == 0.0 else bucket):
                if worker_id not in visited:
                    visited.add(worker_id)
                    yield worker_id

    def _idle(self) -> dict[str, None]:
        """Free workers holding nothing (an ordered set; do not change it)."""
        return self._by_load.get(0.0, {})

    def next_speculation(self) -> float | None:
        """When (on ``clock``) the next batch in flight turns late while a worker is idle to copy it onto, or
        None. Call :meth:`dispatch` then: without that, a late batch would wait for the next event or tick."""
        if self.speculation is None or not self._idle():
            return None
        now = self.clock()
        soonest: float | None = None
        for job, typical, youngest_late in self._copyable():
            for batch in job.flying.values():
                if soonest is not None and batch.assigned_at + youngest_late >= soonest:
                    break  # this batch and every later one turn late later still
                due = batch.assigned_at + self._late_after(typical, batch.count)
                if due > now and (soonest is None or due < soonest):
                    soonest = due
        return soonest

    def _copyable(self) -> Iterator[tuple[Job, float, float]]:
        """(job, typical seconds per task, the age at which a one-task batch is late) for each job whose batches
        may be copied now: nothing left queued for idle workers, and its task time known."""
        for job in self.jobs.values():
            if self.speculation is not None and job.typical is not None and job.flying and not job.has_queued:
                yield job, job.typical, self._late_after(job.typical, 1)

    def _late_after(self, typical: float, count: int) -> float:
        """Seconds in flight after which a batch of ``count`` tasks is late."""
        assert self.speculation is not None
        return max(typical * count * self.speculation, SPECULATION_MIN_AGE)

    def _speculate(self) -> list[Assignment]:
        """Start second copies of late batches on idle workers, at the tail of jobs with nothing queued.

        Only each job's oldest first copies are looked at (``Job.flying`` is in the order they were assigned,
        and the walk stops at the first batch too young to be late), the batches its slow workers hold, and idle
        workers only once some batch is late: a dispatch with nothing to speculate on costs O(jobs) plus the
        batches of workers known to be slow.
        """
        if not self._idle():
            return []
        now = self.clock()
        late: list[tuple[float, Batch, Job]] = []
        for job, typical, youngest_late in self._copyable():
            job_late = []
            for batch in job.flying.values():
                age = now - batch.assigned_at
                if age <= youngest_late:
                    break  # this batch and every later one started too recently to be late
                lateness = age / self._late_after(typical, batch.count)
                if lateness > 1.0:
                    job_late.append((lateness, batch, job))
            if job.slow and typical > 0:  # (a clock too coarse to time the tasks tells nobody's pace)
                job_late.extend(self._held_by_slow(job, typical, now, {id(b) for _, b, _ in job_late}))
            late.extend(job_late)
        if not late:
            return []
        late.sort(key=lambda entry: -entry[0])  # the latest first
        out: list[Assignment] = []
        for worker_id in list(self._idle()):
            worker = self.workers[worker_id]
            chosen = next((i for i, (_, _, job) in enumerate(late) if can_run(worker, job)), None)
            if chosen is None:
                continue
            _, batch, job = late.pop(chosen)
            batch.speculated = True
            del job.flying[batch.start]
            self.speculated += 1
            out.append(self._assign(worker, batch))
            if not late:
                break
        return out

    def _held_by_slow(self, job: Job, typical: float, now: float, seen: set[int]) -> list[tuple[float, Batch, Job]]:
        """The job's first copies held by workers known to be slow at it, which a typical worker would finish
        in half the time the holder still needs (by its own pace), with how many times over. Only when the
        copy would save :data:`SPECULATION_MIN_AGE` or more: less does not pay for the task process it kills."""
        out = []
        for worker_id in job.slow:
            worker = self.workers.get(worker_id)
            pace = job.pace.get(worker_id, 0.0)
            for batch in worker.batches.values() if worker is not None else ():
                if batch.job_id != job.id or job.flying.get(batch.start) is not batch or id(batch) in seen:
                    continue
                still_needs = batch.assigned_at + pace * batch.count - now
                copy_needs = typical * batch.count
                if still_needs > max(2 * copy_needs, copy_needs + SPECULATION_MIN_AGE):
                    out.append((still_needs / copy_needs, batch, job))
        return out

    def _observe_pace(self, job: Job, per_task: float, worker_id: str) -> None:
        """What speculation learns from a settled batch: the job's typical time per task and, if ``worker_id``
        ran the batch (not "": a copy, or a result from elsewhere), that worker's pace."""
        if len(job.durations) >= 5:
            job.typical = sorted(job.durations)[len(job.durations) // 2]
        if worker_id:
            old = job.pace.get(worker_id)
            job.pace[worker_id] = per_task if old is None else (old + per_task) / 2
            self._classify_pace(job, (worker_id,))
        if len(job.durations) == 5:  # the job's typical time is known from now on: judge everyone seen so far
            self._classify_pace(job, list(job.pace))

    def _classify_pace(self, job: Job, worker_ids: Iterable[str]) -> None:
        if not job.typical:  # unknown yet, or too short for this clock to tell workers apart
            return
        limit = SLOW_PACE * job.typical
        for worker_id in worker_ids:
            if job.pace[worker_id] >= limit:
                job.slow[worker_id] = None
            else:
                job.slow.pop(worker_id, None)

    def _next_batch_for(self, worker: Worker) -> Batch | None:
        """Round-robin over runnable jobs this worker can serve.

        Suspects go only to an idle worker. When suspects wait and no worker is idle, one worker is reserved:
        it gets nothing new until it has emptied, then takes a suspect. Without this, a steady stream of
        ordinary batches could keep every worker busy and the suspects waiting forever.
        """
        now = self.clock()
        eligible = [self.jobs[j] for j in self._runnable
                    if self.jobs[j].held_until <= now and can_run(worker, self.jobs[j])]
        # Stable: among equal priorities, the owner served longest ago first, then round-robin order of jobs.
        eligible.sort(key=lambda job: (-job.priority, self._owner_turn.get(job.owner, -1)))
        waiting = [job for job in eligible if job.suspects]
        if worker.id == self._reserved:
            if worker.batches and waiting:
                return None
            self._reserved = None
        for job in eligible:
            for batch in job.replicas.values():
                if self._may_copy(worker, batch) and not (batch.suspect and worker.batches):
                    return batch
        if not worker.batches:
            for job in waiting:
                return self._pop(job, job.suspects)
        elif self._reserved is None and waiting and not self._idle_worker_for(waiting[0]):
            self._reserved = worker.id
            return None
        for job in eligible:
            if job.queue:
                self._runnable.remove(job.id)
                self._runnable.append(job.id)  # round-robin: this job goes to the back
                self._owner_turn[job.owner] = next(self._turns)
                return self._pop(job, job.queue)
        return None

    def _may_copy(self, worker: Worker, batch: Batch) -> bool:
        """Whether ``worker`` may take (another copy of) ``batch``: not one it holds or answered, not on a host
        that has it while enough hosts are connected, and the last copy of a spot check only if trusted."""
        if batch.copies == 1:
            return True
        if worker.id in batch.holders or worker.id in batch.answered:
            return False
        if len(self._hosts) >= batch.copies and worker.host in batch.hosts.values():
            return False
        return not (batch.spot_check and not batch.trusted_by and not worker.trusted and batch.pending <= 1)

    def _idle_worker_for(self, job: Job) -> bool:
        return any(can_run(self.workers[w], job) for w in self._idle())

    def can_be_served(self, job: Job) -> bool:
        """Whether any connected worker could run this job (else it waits for one to join)."""
        return any(can_run(w, job) for w in self.workers.values())

    def _pop(self, job: Job, queue: deque[Batch]) -> Batch:
        batch = queue.popleft()
        self._refresh_runnable(job)
        return batch

    def _refresh_runnable(self, job: Job) -> None:
        if not job.has_queued and job.id in self._runnable:
            self._runnable.remove(job.id)

    def _assign(self, worker: Worker, batch: Batch) -> Assignment:
        if batch.state is State.QUEUED:  # a speculative second copy keeps the first copy's start time
            batch.assigned_at = self.clock()
            if not batch.suspect and not batch.speculated and batch.copies == 1:
                self.jobs[batch.job_id].flying[batch.start] = batch
        _move(batch, Event.ASSIGN)
        batch.holders.add(worker.id)
        batch.hosts[worker.id] = worker.host
        if worker.trusted:
            batch.trusted_by.add(worker.id)
        batch.attempts += 1
        worker.batches[batch.key] = batch
        if batch.suspect:
            worker.exclusive = True
        self._refile(worker)
        ship = batch.job_id not in worker.jobs
        if ship:
            worker.jobs.add(batch.job_id)
            self._holders.setdefault(batch.job_id, set()).add(worker.id)
        job = self.jobs[batch.job_id]
        if batch.pending > 0:
            self._offer_copy(batch)
        elif job.replicas.pop(batch.start, None) is not None:
            self._refresh_runnable(job)
        return Assignment(worker.id, batch, ship)

    # -- internals -------------------------------------------------------------------------------------------

    def _live_batch(self, job_id: int, start: int, count: int) -> Batch | None:
        job = self.jobs.get(job_id)
        batch = job.live.get(start) if job else None
        return batch if batch is not None and batch.count == count else None

    def _release(self, worker: Worker, key: tuple[int, int, int]) -> None:
        batch = worker.batches.pop(key, None)
        if batch is not None and batch.suspect:
            worker.exclusive = False
        self._refile(worker)

    def _refile(self, worker: Worker) -> None:
        """File a worker whose state changed: in ``_free`` and under its load if it may take a batch, else
        nowhere. The only place these two change."""
        old = self._free.pop(worker.id, None)
        if old is not None:
            bucket = self._by_load[old]
            del bucket[worker.id]
            if not bucket:
                del self._by_load[old]
        if worker.free and worker.id in self.workers:
            load = len(worker.batches) / worker.slots
            self._by_load.setdefault(load, {})[worker.id] = None
            self._free[worker.id] = load

    def _offer_copy(self, batch: Batch) -> None:
        """An assigned batch wants another copy: let free workers find it."""
        job = self.jobs[batch.job_id]
        job.replicas[batch.start] = batch
        self._mark_runnable(job)

    def _drop_copy(self, batch: Batch, worker_id: str, strike: bool, reason: str,
                   evidence: Evidence | None = None) -> Failure | None:
        """One copy of ``batch`` stopped without results (lost, crashed, handed back)."""
        batch.holders.discard(worker_id)
        batch.hosts.pop(worker_id, None)
        batch.trusted_by.discard(worker_id)
        if batch.answered:  # a replicated batch with answers stays assigned, waiting for another copy
            self._offer_copy(batch)
            return None
        if batch.holders:  # another copy still runs
            if batch.copies > 1:
                self._offer_copy(batch)
            return None
        job = self.jobs[batch.job_id]
        if job.replicas.pop(batch.start, None) is not None:
            self._refresh_runnable(job)
        if evidence is not None and batch.count == 1:
            if evidence.crash:
                batch.crashes += 1
            elif evidence.solo:
                batch.solo_losses.append(evidence.odds)
        return self._requeue(batch, strike, reason)

    def _requeue(self, batch: Batch, strike: bool, reason: str) -> Failure | None:
        job = self.jobs[batch.job_id]
        job.flying.pop(batch.start, None)
        if not strike:
            _move(batch, Event.REQUEUE)
            (job.suspects if batch.suspect else job.queue).appendleft(batch)
            self._mark_runnable(job)
            return None
        batch.strikes += 1
        batch.last_loss = reason
        self.reassigned += 1
        verdict = poison_verdict(batch, self.max_task_losses)
        if verdict is not None:
            _move(batch, Event.FAIL)
            del job.live[batch.start]
            job.tasks_failed += 1
            return Failure(batch, verdict)
        if batch.count > 1 and batch.strikes >= 2:
            _move(batch, Event.SPLIT)
            singles = list(_split(batch))
            del job.live[batch.start]
            for single in singles:
                job.live[single.start] = single
            job.suspects.extend(singles)
        else:
            _move(batch, Event.REQUEUE)
            job.suspects.append(batch)
        self._mark_runnable(job)
        return None

    def _mark_runnable(self, job: Job) -> None:
        if job.id not in self._runnable:
            self._runnable.append(job.id)


def can_run(worker: Worker, job: Job) -> bool:
    """A worker may run a job: same environment, every required capability, at least the resources asked."""
    return (worker.env == job.env and job.requires <= worker.capabilities
            and all(worker.resources.get(name, 0) >= amount for name, amount in job.resources.items()))


def _split(batch: Batch) -> Iterable[Batch]:
    """Cut a batch into single-task batches, keeping its strikes."""
    for offset, payload in enumerate(split_payload(batch.payload, batch.count)):
        yield Batch(batch.job_id, batch.start + offset, 1, payload, strikes=batch.strikes,
                    last_loss=batch.last_loss, copies=batch.copies, spot_check=batch.spot_check)
