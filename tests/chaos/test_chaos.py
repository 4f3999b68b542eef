"""The chaos job (issue 6): 20,000 tasks of mixed duration on a fleet that a seeded loop keeps breaking.

Four workers to begin with, some dialling the foreman directly and some through a loopback proxy. While the job
runs, a bounded loop driven by ``random.Random(seed)`` injects a fault every 0.2-0.5 s:

* ``kill9``: SIGKILL a worker process; a replacement starts if fewer than 4 are left;
* ``kill9-rejoin``: the same, and the replacement rejoins under the dead worker's id at once;
* ``freeze``: SIGSTOP a worker and its task process for 0.5-3 s, then SIGCONT;
* ``cut``: silently partition a proxied worker's connection (no FIN, no RST); the foreman's heartbeat timeout
  and the worker's own watchdog must notice; the time from the cut to the foreman dropping the worker is measured;
* ``extra``: start one more worker (at most 6 alive);
* ``kill9-task``: SIGKILL a worker's task process only, as a segfault in a task would (the batch is ``crashed``);
* ``drain``: SIGTERM a worker: it hands its queued batches back, finishes its running one and leaves.

At least one worker stays alive, unfrozen, connected and uncut at all times. Faults stop once 90% of the tasks
are done or the chaos time is up, so that the job can finish. Same seed, same sequence of choices; what they hit
also depends on timing, so two runs with one seed are alike, not identical.

Asserted: the results equal the serial results exactly (checked as they arrive: result ``i`` is ``(i, value)``;
the values are kept in an array and compared with ``[task(i) for i in range(N)]`` computed here); every task was
delivered exactly once (each batch delivered to the job is recorded: they tile 0..N-1 with no overlap, and
``job.progress == (N, N)``); none failed; the job finished within a bounded time (imap's
timeout, and pytest-timeout); the foreman's state is empty afterwards and it still serves; the foreman's memory
(it is embedded: this process's RSS) stayed within a bound. A summary line is printed (see it with ``-s``).

Short form by default; longer with ``--chaos-seconds``/``CROWDCOMPUTE_CHAOS_SECONDS`` (see ``conftest.py``).
"""

from __future__ import annotations

import array
import collections
import os
import random
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest

from chaos.harness import WorkerFleet, WorkerProcess
from chaos.proxy import LoopbackProxy, Pair
from chaos.workload import expected, task
from chaos.workload import value as task_value
from foreman import Foreman
from foreman.jobs import Job
from foreman.scheduler import Scheduler

pytestmark = pytest.mark.slow  # chaos runs with kills, freezes and cut links

BASE_WORKERS = 4
MAX_WORKERS = 6
HEARTBEAT_INTERVAL = 0.2
HEARTBEAT_TIMEOUT = 1.5
FAULTS = ("kill9", "kill9-rejoin", "freeze", "cut", "extra", "kill9-task", "drain")
WEIGHTS = (20, 10, 25, 30, 15, 8, 7)
MB = 1024 * 1024


@dataclass(eq=False)
class Cut:
    worker: WorkerProcess
    worker_id: str
    peer: Any  # the foreman's Peer for the connection that was cut
    pair: Pair
    at: float  # monotonic
    at_wall: float
    foreman_detect: float | None = None  # seconds from the cut to the foreman dropping that connection
    reason: str = ""

    @property
    def undisturbed(self) -> bool:
        """Not SIGKILLed before the foreman dropped it (a rejoin under its id would end the old connection)."""
        killed = self.worker.killed_at
        return self.foreman_detect is not None and (killed is None or killed > self.at + self.foreman_detect)

    @property
    def worker_detect(self) -> float | None:
        """Seconds from the cut to the worker's own watchdog dropping its side (seen by the proxy); None if it
        was killed first."""
        gone, killed = self.pair.down_gone_at, self.worker.killed_at
        if gone is None or (killed is not None and killed <= gone):
            return None
        return gone - self.at


@dataclass
class Observations:
    rss_start: int = 0
    rss_peak: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)


class Observer(threading.Thread):
    """Samples this process's RSS and watches cut connections until the foreman drops them."""

    def __init__(self, fm: Foreman, obs: Observations) -> None:
        super().__init__(name="chaos-observer", daemon=True)
        self.fm = fm
        self.obs = obs
        self.stop = threading.Event()
        self.pending: list[Cut] = []
        self.lock = threading.Lock()
        self.process = psutil.Process(os.getpid())

    def watch(self, cut: Cut) -> None:
        with self.lock:
            self.pending.append(cut)
            self.obs.cuts.append(cut)

    def sample(self) -> None:
        rss = self.process.memory_info().rss
        self.obs.rss_samples.append((time.monotonic(), rss))
        self.obs.rss_peak = max(self.obs.rss_peak, rss)

    def explain(self, cut: Cut) -> None:
        """The foreman's own record of the drop: its reason, and its timestamp (sharper than polling)."""
        fleet = self.fm._server.fleet

        def departure() -> tuple[float, str] | None:
            return next(((r.left_at, r.left_reason) for r in reversed(fleet.departed)
                         if r.id == cut.worker_id and r.left_at and r.left_at >= cut.at_wall), None)

        found = self.fm._call(departure)
        if found is not None:
            cut.foreman_detect = found[0] - cut.at_wall
            cut.reason = found[1]

    def run(self) -> None:
        next_sample = 0.0
        peers = self.fm._server.peers
        while not self.stop.is_set():
            now = time.monotonic()
            with self.lock:
                for cut in list(self.pending):
                    if peers.get(cut.worker_id) is not cut.peer:  # a single dict read: safe across threads
                        cut.foreman_detect = now - cut.at
                        self.pending.remove(cut)
                        self.explain(cut)
            if now >= next_sample:
                self.sample()
                next_sample = now + 0.2
            self.stop.wait(0.005)


class Chaos(threading.Thread):
    """The bounded, seeded fault loop."""

    def __init__(self, fm: Foreman, proxy: LoopbackProxy, fleet: WorkerFleet, job: Job, total: int,
                 seconds: float, seed: int, observer: Observer) -> None:
        super().__init__(name="chaos", daemon=True)
        self.fm = fm
        self.proxy = proxy
        self.fleet = fleet
        self.job = job
        self.total = total
        self.seconds = seconds
        self.rng = random.Random(seed)
        self.observer = observer
        self.stop = threading.Event()
        self.injected: collections.Counter[str] = collections.Counter()
        self.skipped: collections.Counter[str] = collections.Counter()
        self.started_at = 0.0
        self.ended_at = 0.0
        self.error: BaseException | None = None
        self.cut_workers: dict[str, Cut] = {}

    def run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.ended_at = time.monotonic()
            self.fleet.thaw_all()

    def _loop(self) -> None:
        rng = self.rng
        self.started_at = time.monotonic()
        next_fault = self.started_at + rng.uniform(0.2, 0.5)
        while not self.stop.is_set():
            now = time.monotonic()
            self.fleet.thaw_due(now)
            if now - self.started_at >= self.seconds or self.job.tasks_done >= 0.9 * self.total:
                return
            if now >= next_fault:
                kind = rng.choices(FAULTS, WEIGHTS)[0]
                (self.injected if self._inject(kind) else self.skipped)[kind] += 1
                next_fault = time.monotonic() + rng.uniform(0.2, 0.5)
            wake = min(next_fault, self.fleet.next_thaw() or next_fault)
            self.stop.wait(min(0.05, max(0.001, wake - time.monotonic())))

    def _connected(self) -> set[str]:
        return self.fm._call(lambda: set(self.fm._server.peers))

    def healthy(self) -> list[WorkerProcess]:
        """Alive, not frozen, connected, and not cut off: the workers that are certainly doing work."""
        for worker_id, cut in list(self.cut_workers.items()):
            if cut.foreman_detect is not None:
                del self.cut_workers[worker_id]
        connected = self._connected()
        return [w for w in self.fleet.running() if w.worker_id in connected
                and w.worker_id not in self.cut_workers and w.drained_at is None]

    def _inject(self, kind: str) -> bool:
        rng = self.rng
        fleet = self.fleet
        healthy = self.healthy()
        if kind == "extra":
            if len(fleet.staying()) >= MAX_WORKERS:
                return False
            fleet.start(via_proxy=rng.random() < 0.5)
            return True
        if len(healthy) < 2:
            return False  # one must stay; the others first come back
        if kind in ("kill9", "kill9-rejoin"):
            victim = rng.choice(fleet.running())  # two or more are healthy: one stays
            fleet.kill9(victim)
            if kind == "kill9-rejoin":
                fleet.start(victim.worker_id, via_proxy=victim.via_proxy)
            elif len(fleet.staying()) < BASE_WORKERS:
                fleet.start(via_proxy=rng.random() < 0.5)
            return True
        if kind == "kill9-task":
            return fleet.kill9_task(rng.choice(healthy))
        if kind == "drain":
            fleet.drain(rng.choice(healthy))
            if len(fleet.staying()) < BASE_WORKERS:
                fleet.start(via_proxy=rng.random() < 0.5)
            return True
        if kind == "freeze":
            fleet.freeze(rng.choice(healthy), rng.uniform(0.5, 3.0))
            return True
        if kind == "cut":
            proxied = [w for w in healthy if w.via_proxy]
            if not proxied:
                return False
            victim = rng.choice(proxied)
            return self._cut(victim)
        raise AssertionError(kind)

    def _cut(self, victim: WorkerProcess) -> bool:
        def peer_and_port() -> tuple[Any, int | None]:
            peer = self.fm._server.peers.get(victim.worker_id)
            address = peer.ws.remote_address if peer is not None else None
            return peer, (address[1] if address else None)

        peer, port = self.fm._call(peer_and_port)
        pair = self.proxy.pair_for_upstream_port(port) if port else None
        if peer is None or pair is None:
            return False
        at = self.proxy.cut(pair)
        cut = Cut(victim, victim.worker_id, peer, pair, at, time.time() - (time.monotonic() - at))
        self.cut_workers[victim.worker_id] = cut
        self.observer.watch(cut)
        return True


def _install_recorders(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Record every batch delivered to a job and every failure, and count tasks requeued, without changing
    what the foreman does."""
    record: dict[str, Any] = {"delivered": [], "failed": [], "tasks_reassigned": 0, "tasks_handed_back": 0}
    deliver, fail, requeue = Job.deliver, Job.fail, Scheduler._requeue

    # Signature-agnostic (start and count come first): the foreman's code is being extended alongside.
    def recording_deliver(self: Job, start: int, count: int, *args: Any, **kwargs: Any) -> None:
        record["delivered"].append((self.id, start, count))
        deliver(self, start, count, *args, **kwargs)

    def recording_fail(self: Job, start: int, count: int, error: BaseException, *args: Any, **kwargs: Any) -> None:
        record["failed"].append((self.id, start, count, repr(error)))
        fail(self, start, count, error, *args, **kwargs)

    def counting_requeue(self: Scheduler, batch: Any, strike: bool, *args: Any, **kwargs: Any) -> Any:
        record["tasks_reassigned" if strike else "tasks_handed_back"] += batch.count
        return requeue(self, batch, strike, *args, **kwargs)

    monkeypatch.setattr(Job, "deliver", recording_deliver)
    monkeypatch.setattr(Job, "fail", recording_fail)
    monkeypatch.setattr(Scheduler, "_requeue", counting_requeue)
    return record


def _assert_tiles(delivered: list[tuple[int, int, int]], job_id: int, total: int) -> None:
    """The batches delivered to the job cover 0..total-1, each task exactly once."""
    ranges = sorted((start, count) for jid, start, count in delivered if jid == job_id)
    position = 0
    for start, count in ranges:
        assert start == position, (f"task {position} never delivered" if start > position else
                                   f"tasks {start}..{start + count - 1} delivered twice (overlap at {position})")
        position += count
    assert position == total, f"delivered up to task {position}, expected {total}"


def _fmt(values: list[float]) -> str:
    if not values:
        return "none"
    return (f"n={len(values)} min={min(values):.2f} median={statistics.median(values):.2f} "
            f"max={max(values):.2f}")


@pytest.mark.chaos_job
def test_chaos_job_every_result_exactly_once(chaos_settings, tmp_path, monkeypatch) -> None:
    settings = chaos_settings
    n = settings.tasks
    record = _install_recorders(monkeypatch)
    obs = Observations()
    fleet: WorkerFleet | None = None
    proxy: LoopbackProxy | None = None
    observer: Observer | None = None
    chaos: Chaos | None = None
    fm = Foreman(port=0, local_workers=0, heartbeat_interval=HEARTBEAT_INTERVAL,
                 heartbeat_timeout=HEARTBEAT_TIMEOUT, max_task_losses=50, dashboard=False)
    try:
        proxy = LoopbackProxy(fm._server.port).start()
        # Workers dial through the proxy (WebSocket, cut at will), straight over WebSocket, or over the local link.
        fleet = WorkerFleet(fm.address, proxy.address, tmp_path, fm._call(fm._server.start_local()))
        for index in range(BASE_WORKERS):
            fleet.start(via_proxy=index % 2 == 0)
        fm.wait_for_workers(BASE_WORKERS, timeout=60)

        observer = Observer(fm, obs)
        observer.sample()
        obs.rss_start = obs.rss_peak = obs.rss_samples[-1][1]
        observer.start()

        began = time.monotonic()
        job = fm.imap(task, range(n), timeout=settings.job_timeout)
        chaos = Chaos(fm, proxy, fleet, job, n, settings.seconds, settings.seed, observer)
        chaos.start()
        # Results are checked as they come and kept compactly (8 bytes a task), so that this process's RSS
        # measures the foreman, not a list of N tuples.
        values = array.array("Q")
        misplaced: list[tuple[int, Any]] = []
        rss_at: dict[str, int] = {}
        for position, result in enumerate(job):
            if not (type(result) is tuple and len(result) == 2 and result[0] == position) and len(misplaced) < 10:
                misplaced.append((position, result))
            values.append(result[1] if type(result) is tuple and len(result) == 2 else 0)
            if position + 1 in (n // 4, n // 2):
                rss_at[f"{(position + 1) * 100 // n}%"] = psutil.Process().memory_info().rss
        wall = time.monotonic() - began
        chaos.stop.set()
        chaos.join(timeout=30)
        assert not chaos.is_alive(), "the chaos loop did not stop"
        if chaos.error is not None:
            raise chaos.error
        observer.sample()
        rss_at["100%"] = obs.rss_samples[-1][1]

        # Wait for the foreman to settle cut connections still pending (at most a heartbeat timeout away).
        deadline = time.monotonic() + HEARTBEAT_TIMEOUT + 5
        while observer.pending and time.monotonic() < deadline:
            time.sleep(0.05)
        observer.stop.set()  # RSS sampling ends with the job: what follows is the test's own bookkeeping
        observer.join(timeout=10)
        scheduler = fm._server.scheduler
        server = fm._server
        clean = [c for c in obs.cuts if c.undisturbed]  # the time to detect is measured on these
        detect = [c.foreman_detect for c in clean]
        worker_detect = [c.worker_detect for c in obs.cuts if c.worker_detect is not None]
        reasons = collections.Counter("heartbeat timeout" if "no heartbeat" in c.reason else
                                      "its reconnect" if "replaced" in c.reason else c.reason for c in clean)
        growth = (obs.rss_peak - obs.rss_start) / MB
        summary = (
            f"\nCHAOS seed={settings.seed} tasks={n} chaos_s={chaos.ended_at - chaos.started_at:.1f} "
            f"(limit {settings.seconds:g}) wall_s={wall:.1f}\n"
            f"  faults injected: {sum(chaos.injected.values())} {dict(sorted(chaos.injected.items()))}; "
            f"skipped (no safe target): {dict(sorted(chaos.skipped.items()))}\n"
            f"  workers started={len(fleet.workers)} ({sum(w.via_proxy for w in fleet.workers)} through the proxy, "
            f"{sum(w.local_link for w in fleet.workers)} over the local link) lost={scheduler.workers_lost} | "
            f"batches reassigned="
            f"{scheduler.reassigned} tasks reassigned={record['tasks_reassigned']} tasks handed back="
            f"{record['tasks_handed_back']} | duplicates dropped={scheduler.duplicates_dropped}\n"
            f"  silent cuts={len(obs.cuts)} ({len(obs.cuts) - len(clean)} then killed): foreman detect s "
            f"{_fmt(detect)}, dropped on {dict(reasons)}; worker watchdog s {_fmt(worker_detect)}\n"
            f"  foreman RSS MB start={obs.rss_start / MB:.0f} peak={obs.rss_peak / MB:.0f} growth={growth:.1f} "
            f"at {', '.join(f'{k}={v / MB:.0f}' for k, v in rss_at.items())}")
        print(summary)

        # -- the job's outcome ----------------------------------------------------------------------------------
        assert not record["failed"], f"tasks failed: {record['failed'][:5]}"
        assert not misplaced, f"results out of place: {misplaced}"
        assert len(values) == n
        serial = array.array("Q", map(task_value, range(n)))  # task(i) == (i, task_value(i)), serially here
        assert values == serial, "results differ from the serial results"
        _assert_tiles(record["delivered"], job.id, n)
        assert job.progress == (n, n)
        assert wall < settings.job_timeout

        # -- the chaos did happen -------------------------------------------------------------------------------
        if settings.seconds >= 5:
            assert sum(chaos.injected.values()) >= 10, chaos.injected
            assert scheduler.workers_lost >= 1

        # -- a silent partition is noticed within the heartbeat timeout (plus the foreman's tick and load) ------
        assert all(c.foreman_detect is not None for c in obs.cuts), [c for c in obs.cuts if c.foreman_detect is None]
        assert all(d < HEARTBEAT_TIMEOUT + 1.5 for d in detect), detect

        # -- nothing left behind, and the foreman still serves --------------------------------------------------
        assert fm._call(lambda: (dict(server.jobs), dict(scheduler.jobs))) == ({}, {})
        assert fm._call(lambda: sum(len(w.batches) for w in scheduler.workers.values())) == 0
        connected, known = fm._call(lambda: (len(server.peers), len(scheduler.workers)))
        assert connected == known <= len(fleet.alive()), "the foreman still holds a dead worker"
        assert fm.map(task, range(200), timeout=60) == expected(200)

        # -- bounded memory ---------------------------------------------------------------------------------------
        assert growth < 150, summary
    except BaseException:
        if fleet is not None:
            print(fleet.log_tail())
        raise
    finally:
        if chaos is not None:
            chaos.stop.set()
            chaos.join(timeout=30)
        if observer is not None:
            observer.stop.set()
            observer.join(timeout=10)
        if fleet is not None:
            fleet.close()
        fm.close()
        if proxy is not None:
            proxy.stop()
