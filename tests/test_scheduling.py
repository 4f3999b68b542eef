"""Job options against real workers: capability routing, waiting jobs, priorities, retries, failures,
speculative copies of stragglers."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import httpx
import pytest

from conftest import wait_until, worker_env
from foreman import Foreman
from tasks import boom, flaky, slow_where_marked, square, stalls_where_marked, whoami


@pytest.fixture
def fleet(spawn_worker):
    """A foreman with one plain worker and one advertising 'gpu' and 'fast-disk'."""
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        plain = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "plain")
        special = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "special",
                               "--capabilities", "gpu,fast-disk")
        fm.wait_for_workers(2)
        yield fm, plain, special


def test_required_capabilities_route_tasks(fleet) -> None:
    fm, plain, special = fleet
    results = fm.map(whoami, range(200), chunksize=5, requires={"gpu"})
    assert {pid for _, pid in results} == {special.pid}
    assert {pid for _, pid in fm.map(whoami, range(200), chunksize=5, requires={"cpu"})} == {plain.pid, special.pid}
    future = fm.options(requires={"fast-disk"}).submit(whoami, 1)
    assert future.result(timeout=30)[1] == special.pid


def test_a_job_no_worker_can_serve_waits_visibly_then_times_out(fleet) -> None:
    fm, _, _ = fleet
    job = fm.imap(square, range(10), requires={"tpu"}, timeout=3.5)
    with httpx.Client(base_url=fm.dashboard_url) as api:
        wait_until(lambda: api.get(f"/api/jobs/{job.id}").json()["state"] == "waiting", timeout=10)
        wait_until(lambda: any("waiting" in e["message"] and "tpu" in e["message"]
                               for e in api.get("/api/status").json()["events"]), timeout=10)
    with pytest.raises(concurrent.futures.TimeoutError):
        list(job)
    with pytest.raises(concurrent.futures.TimeoutError):
        fm.map(square, [1], resources={"memory_gb": 10**6}, timeout=0.5)


def test_higher_priority_jobs_go_first(fleet) -> None:
    fm, _, _ = fleet
    low = fm.imap(slow_where_marked, range(60), chunksize=1, priority=0)
    next(low)
    high = fm.imap(slow_where_marked, range(10), chunksize=1, priority=10)
    assert len(list(high)) == 10
    assert low.progress[0] < 60  # the low-priority job was still waiting for workers
    assert len(list(low)) == 59


def test_retries_in_the_task_process(fleet, tmp_path) -> None:
    fm, _, _ = fleet
    counter = tmp_path / "calls"
    assert fm.map(flaky, [(str(counter), 2)], retries=3, retry_backoff=0.01) == [3]
    counter.unlink()
    with pytest.raises(ConnectionError, match="flaky failure 2") as info:
        fm.map(flaky, [(str(counter), 5)], retries=1, retry_backoff=0.01)
    assert info.value.retry_attempts == 2
    counter.unlink()
    with pytest.raises(ConnectionError, match="flaky failure 1"):  # not a retry_on type: no retry
        fm.options(retries=3, retry_on=(KeyError,)).submit(flaky, (str(counter), 1)).result(timeout=30)
    with pytest.raises(TypeError, match="retry_on"):
        fm.map(square, [1], retries=1, retry_on=("nope",))
    with pytest.raises(TypeError, match="unknown job option"):
        fm.map(square, [1], retrys=1)


def test_return_exceptions_and_failures(fleet) -> None:
    fm, _, _ = fleet
    job = fm.imap(boom, range(6), return_exceptions=True)
    results = list(job)
    assert results[:3] == [0, 1, 2] and results[4:] == [4, 5]
    assert type(results[3]).__name__ == "CustomError" and str(results[3]) == "bad input 3"
    (failure,) = job.failures
    assert failure["task"] == 3 and failure["type"] == "tasks.CustomError" and failure["message"] == "bad input 3"
    assert "raise CustomError" in failure["traceback"] and failure["worker"] in ("plain", "special")


def test_a_straggler_gets_a_speculative_copy(spawn_worker) -> None:
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        fast = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "fast")
        slow = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "slow",
                            env=worker_env(CROWDCOMPUTE_TEST_SLOW="1"))
        fm.wait_for_workers(2)
        started = time.monotonic()
        results = fm.map(slow_where_marked, range(40), chunksize=1)
        elapsed = time.monotonic() - started
        assert [x for x, _ in results] == list(range(40))
        scheduler = fm._server.scheduler
        assert scheduler.speculated >= 1
        # The slow worker's batches were rerun on the fast one; the job did not wait out all of them.
        assert sum(pid == fast.pid for _, pid in results) >= 34, (elapsed, scheduler.speculated)
        assert slow.poll() is None and fm._server.scheduler.workers_lost == 0


def test_the_foreman_copies_a_batch_the_moment_it_turns_late(spawn_worker) -> None:
    """"fast" runs 5 tasks of 0.5 s while "slow" stalls on 2: once "fast" is idle and nothing is queued, the
    foreman has a timer set for when the first stalled batch turns late (3x the typical time), instead of
    leaving the copy to the next event or its once-a-second tick."""
    with Foreman(port=0, heartbeat_interval=5.0) as fm:
        spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "fast")
        spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "slow",
                     env=worker_env(CROWDCOMPUTE_TEST_SLOW="1"))
        fm.wait_for_workers(2)
        server = fm._server
        job = fm.imap(stalls_where_marked, range(7), chunksize=1)

        def timer_at_due() -> tuple[float, float] | None:
            due = server.scheduler.next_speculation()
            timer = server._speculation_timer
            if due is None or "fast" not in server.scheduler._idle() or timer is None:
                return None
            return timer.when(), asyncio.get_running_loop().time() + due - server.scheduler.clock()

        found: list[tuple[float, float]] = []

        def armed() -> bool:
            look = fm._call(timer_at_due)
            if look is not None:
                found.append(look)
            return look is not None

        wait_until(armed, timeout=60, interval=0.01)
        when, due = found[0]
        assert due < when < due + 0.05
        assert list(job) == list(range(7))
        assert server.scheduler.speculated == 2


def test_task_timeout_stops_a_task_and_the_worker_goes_on(fleet) -> None:
    from foreman.errors import TaskTimeoutError
    from tasks import sleep_then

    fm, _, _ = fleet
    started = time.monotonic()
    results = fm.map(sleep_then, [0.01, 5.0, 0.02], task_timeout=1.0, return_exceptions=True, chunksize=3)
    assert time.monotonic() - started < 4
    assert results[0] == 0.01 and results[2] == 0.02
    assert isinstance(results[1], TaskTimeoutError) and "task_timeout of 1 s" in str(results[1])
    assert fm.map(sleep_then, [0.01]) == [0.01]  # no timeout left behind on the worker
    with pytest.raises(ValueError, match="task_timeout"):
        fm.map(square, [1], task_timeout=0)
