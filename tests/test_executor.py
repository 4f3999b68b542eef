"""``ForemanExecutor``: a drop-in for ``concurrent.futures.ProcessPoolExecutor``, with its semantics exactly.

A real foreman and real worker processes on loopback. Most tests share one module-scoped executor (startup costs
about a second); the shutdown tests make fresh ones. The tests at the end run the same behaviours against both
``ProcessPoolExecutor`` and ``ForemanExecutor``, to show where the semantics match (and where they do not yet).
"""

from __future__ import annotations

import concurrent.futures
import itertools
import multiprocessing
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from conftest import wait_until
from foreman import ForemanExecutor
from tasks import CustomError, add, boom, sleep_then, slow_whoami, span, square, touch, whoami

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
SHORT = 30  # seconds: the bound on every wait for a result that should come


def _foreman_executor(max_workers: int | None = 2) -> ForemanExecutor:
    return ForemanExecutor(max_workers=max_workers, **FAST)


def _process_pool(max_workers: int | None = 2) -> concurrent.futures.ProcessPoolExecutor:
    # spawn, not fork: this process runs foreman threads, and forking a threaded process is unsafe
    return concurrent.futures.ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context("spawn"))


def _kinds(foreman_xfail: str | None = None) -> list[Any]:
    """Parameters for a test run against both executors; ``foreman_xfail`` marks the ForemanExecutor run."""
    marks = [pytest.mark.xfail(strict=True, reason=foreman_xfail)] if foreman_xfail else []
    return [pytest.param(_process_pool, id="ProcessPoolExecutor"),
            pytest.param(_foreman_executor, id="ForemanExecutor", marks=marks)]


def _release(futures: list[concurrent.futures.Future[Any]]) -> None:
    """Tell waiters about cancelled futures nobody notified (see BUG_WAIT_CANCELLED), so a stuck
    ``concurrent.futures.wait`` in a test's background thread returns."""
    for future in futures:
        if future._state == "CANCELLED":  # cancelled, waiters not yet told
            future.set_running_or_notify_cancel()


def _dispose(ex: concurrent.futures.Executor, futures: list[concurrent.futures.Future[Any]] = ()) -> None:
    """Bounded cleanup, whatever state a test left its executor in."""
    if isinstance(ex, ForemanExecutor):
        _release(list(futures))
        ex.foreman.close()
    else:
        ex.shutdown(wait=True, cancel_futures=True)


def _stop(shutting: threading.Thread, futures: list[concurrent.futures.Future[Any]]) -> None:
    """Let a background ``shutdown`` thread finish (unsticking it if needed) before the test cleans up."""
    _release(futures)
    if shutting.ident is not None:
        shutting.join(timeout=10)


def _fill_fleet(ex: concurrent.futures.Executor, n: int, seconds: float) -> list[concurrent.futures.Future[float]]:
    """Submit ``n`` ``sleep_then(seconds)`` tasks, more than the fleet takes at once (running plus prefetched).

    Once this returns, the last of them is queued, so a future submitted now stays unstarted for at least
    ``seconds``.
    """
    blockers = [ex.submit(sleep_then, seconds) for _ in range(n)]
    wait_until(lambda: sum(f.running() for f in blockers) >= 2, timeout=SHORT)
    time.sleep(0.05)
    assert not blockers[-1].running() and not blockers[-1].done(), "the fleet took every blocker at once"
    return blockers


def _worker_pids(fm: Any) -> set[int]:
    """Pids of the local worker processes of ``fm`` (the children of this process that run ``-m worker`` and
    dial its private socket)."""
    pids = set()
    for child in psutil.Process().children():
        try:
            command = child.cmdline()
            if command[1:3] == ["-m", "worker"] and command[3].startswith("unix:"):
                pids.add(child.pid)
        except psutil.Error:
            pass
    return pids


@pytest.fixture(scope="module")
def executor() -> Iterator[ForemanExecutor]:
    ex = _foreman_executor(2)
    try:
        ex.foreman.wait_for_workers(2, timeout=SHORT)
        yield ex
        ex.shutdown(wait=True)
    finally:
        _dispose(ex)


# -- submit ------------------------------------------------------------------------------------------------------

def test_submit_result(executor: ForemanExecutor) -> None:
    future = executor.submit(square, 7)
    assert isinstance(future, concurrent.futures.Future)
    assert future.result(timeout=SHORT) == 49
    assert future.done() and not future.cancelled()


def test_submit_passes_positional_and_keyword_arguments(executor: ForemanExecutor) -> None:
    assert executor.submit(add, 2, b=40).result(timeout=SHORT) == 42
    x, pid = executor.submit(slow_whoami, 5, seconds=0.0).result(timeout=SHORT)
    assert x == 5 and isinstance(pid, int)


def test_submit_exception_keeps_its_type(executor: ForemanExecutor) -> None:
    future = executor.submit(boom, 3)
    assert type(future.exception(timeout=SHORT)) is CustomError
    with pytest.raises(CustomError, match="bad input 3"):
        future.result(timeout=SHORT)


# -- map ---------------------------------------------------------------------------------------------------------

def test_map_returns_lazy_iterator_in_input_order(executor: ForemanExecutor) -> None:
    results = executor.map(square, range(50))
    assert not isinstance(results, list)
    assert isinstance(results, Iterator) and iter(results) is results
    assert list(results) == [x * x for x in range(50)]


def test_map_input_is_consumed_lazily(executor: ForemanExecutor) -> None:
    # An endless input: only as much of it is taken as results are asked for.
    results = executor.map(square, itertools.count())
    try:
        assert list(itertools.islice(results, 5)) == [0, 1, 4, 9, 16]
    finally:
        results.close()  # leaving early cancels the rest


def test_map_several_iterables_stops_at_shortest(executor: ForemanExecutor) -> None:
    assert list(executor.map(add, range(10), range(100, 130))) == [a + 100 + a for a in range(10)]
    assert list(executor.map(add, [1, 2, 3], [10])) == [11]
    assert list(executor.map(square, [])) == []


def test_map_raises_task_exception_only_when_reached(executor: ForemanExecutor) -> None:
    results = executor.map(boom, range(6))  # creating the iterator raises nothing
    assert next(results) == 0
    assert next(results) == 1
    assert next(results) == 2
    with pytest.raises(CustomError, match="bad input 3") as info:
        next(results)
    assert type(info.value) is CustomError
    with pytest.raises(StopIteration):  # like the standard library's, the iterator is finished after raising
        next(results)


def test_map_timeout_raises_timeout_error(executor: ForemanExecutor) -> None:
    started = time.monotonic()
    results = executor.map(sleep_then, [0.05, 3.0], timeout=0.6)
    assert next(results) == 0.05
    with pytest.raises(concurrent.futures.TimeoutError):
        next(results)
    elapsed = time.monotonic() - started
    assert 0.5 <= elapsed < 2.5  # measured from the map call, and long before the slow task would end
    # the abandoned slow task does not hold the fleet: the next work completes quickly
    assert executor.submit(square, 3).result(timeout=SHORT) == 9


@pytest.mark.parametrize("chunksize", [0, -1])
def test_map_chunksize_below_one_raises_value_error(executor: ForemanExecutor, chunksize: int) -> None:
    with pytest.raises(ValueError):
        executor.map(square, range(5), chunksize=chunksize)


@pytest.mark.parametrize("chunksize", [2, 7, 100])
def test_map_chunksize_above_one_gives_correct_results(executor: ForemanExecutor, chunksize: int) -> None:
    assert list(executor.map(square, range(40), chunksize=chunksize)) == [x * x for x in range(40)]
    assert list(executor.map(add, range(15), range(15), chunksize=chunksize)) == [2 * x for x in range(15)]
    results = executor.map(boom, range(10), chunksize=chunksize)
    assert [next(results) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CustomError):
        next(results)


# -- cancellation ------------------------------------------------------------------------------------------------

def test_cancel_queued_future_returns_true_and_it_never_runs(executor: ForemanExecutor, tmp_path: Path) -> None:
    blockers = _fill_fleet(executor, 6, 0.25)
    marker = tmp_path / "ran.txt"
    future = executor.submit(touch, str(marker))
    assert not future.running()
    assert future.cancel() is True
    assert future.cancelled() and future.done()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=0)
    assert [f.result(timeout=SHORT) for f in blockers] == [0.25] * len(blockers)
    # the slot it would have taken serves the next task; the cancelled one never ran
    later = tmp_path / "later.txt"
    assert executor.submit(touch, str(later)).result(timeout=SHORT) == str(later)
    assert later.exists()
    assert not marker.exists()


def test_cancel_running_future_returns_false(executor: ForemanExecutor) -> None:
    future = executor.submit(sleep_then, 0.3)
    wait_until(future.running, timeout=SHORT)
    assert future.cancel() is False
    assert future.result(timeout=SHORT) == 0.3


def test_cancel_right_after_submit_does_not_disturb_workers(tmp_path: Path,
                                                            capfd: pytest.CaptureFixture[str]) -> None:
    ex = _foreman_executor(2)
    try:
        fm = ex.foreman
        fm.wait_for_workers(2, timeout=SHORT)
        fewest = [len(fm.workers)]
        watching = threading.Event()

        def watch() -> None:  # the fewest workers connected at any moment
            while not watching.is_set():
                fewest[0] = min(fewest[0], len(fm.workers))
                time.sleep(0.002)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            markers = [tmp_path / f"cancelled-{i}.txt" for i in range(5)]
            cancelled = []
            for marker in markers:  # the workers are idle: the cancel races the foreman's dispatch
                future = ex.submit(touch, str(marker))
                cancelled.append(future.cancel())
                time.sleep(0.05)
            assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
            time.sleep(0.5)  # time for a worker to drop out, and to come back
        finally:
            watching.set()
            watcher.join(timeout=5)
        assert any(cancelled)
        for marker, was_cancelled in zip(markers, cancelled):
            assert not (was_cancelled and marker.exists()), "a cancelled task ran"
        assert "arrived before its JOB" not in capfd.readouterr().err
        assert fewest[0] == 2, "a worker dropped its connection"
        assert getattr(fm._server.scheduler, "workers_lost", 0) == 0, "the foreman counted a worker lost"
    finally:
        _dispose(ex)


def test_wait_and_as_completed_see_a_cancelled_future(executor: ForemanExecutor) -> None:
    _fill_fleet(executor, 6, 0.2)
    future = executor.submit(square, 1)
    assert future.cancel() and future.done()
    done, _ = concurrent.futures.wait([future], timeout=1.5)
    assert future in done
    assert list(concurrent.futures.as_completed([future], timeout=1.5)) == [future]


# -- shutdown ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_workers", [0, -1])
def test_max_workers_below_one_raises_value_error(max_workers: int) -> None:
    with pytest.raises(ValueError):
        ForemanExecutor(max_workers=max_workers, **FAST)


def test_shutdown_wait_waits_for_outstanding_futures() -> None:
    ex = _foreman_executor(2)
    try:
        futures = [ex.submit(sleep_then, 0.3) for _ in range(3)]
        started = time.monotonic()
        ex.shutdown(wait=True)
        assert all(f.done() for f in futures)
        assert [f.result(timeout=0) for f in futures] == [0.3] * 3
        assert time.monotonic() - started >= 0.25
        with pytest.raises(RuntimeError):
            ex.submit(square, 2)
        with pytest.raises(RuntimeError):
            ex.map(square, range(3))
        ex.shutdown()  # a second shutdown is harmless
    finally:
        _dispose(ex)


def test_shutdown_cancel_futures_cancels_the_not_started() -> None:
    ex = _foreman_executor(2)
    futures: list[concurrent.futures.Future[float]] = []
    shutting = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
    try:
        ex.foreman.wait_for_workers(2, timeout=SHORT)
        futures = [ex.submit(sleep_then, 0.4) for _ in range(10)]
        wait_until(lambda: sum(f.running() for f in futures) >= 2, timeout=SHORT)
        running = [f for f in futures if f.running()]
        # in a thread: it does not return (see test_shutdown_cancel_futures_returns), so bound the wait
        shutting.start()
        wait_until(lambda: any(f.cancelled() for f in futures), timeout=SHORT)
        with pytest.raises(RuntimeError):
            ex.submit(square, 1)
        for future in running:  # those that had started finish normally
            assert future.result(timeout=SHORT) == 0.4
        wait_until(lambda: all(f.done() for f in futures), timeout=SHORT)  # none left pending
        cancelled = [f for f in futures if f.cancelled()]
        finished = [f for f in futures if not f.cancelled()]
        assert cancelled, "no future was cancelled"
        assert len(cancelled) >= 4  # at most 4 are held by 2 workers (running + prefetched), plus slack
        assert set(running) <= set(finished)
        assert [f.result(timeout=0) for f in finished] == [0.4] * len(finished)
        for future in cancelled:
            with pytest.raises(concurrent.futures.CancelledError):
                future.result(timeout=0)
    finally:
        _stop(shutting, futures)
        _dispose(ex)


# -- the same behaviours as ProcessPoolExecutor ------------------------------------------------------------------

@pytest.mark.parametrize("make", _kinds())
def test_same_semantics_as_process_pool(make: Callable[..., concurrent.futures.Executor]) -> None:
    for bad in (0, -1):
        with pytest.raises(ValueError):
            make(bad)
    ex = make(2)
    try:
        assert ex.submit(square, 7).result(timeout=SHORT) == 49
        assert ex.submit(add, 1, b=2).result(timeout=SHORT) == 3
        results = ex.map(add, [1, 2, 3], [10, 20, 30, 40])
        assert not isinstance(results, list)
        assert list(results) == [11, 22, 33]
        failing = ex.submit(boom, 3)
        assert type(failing.exception(timeout=SHORT)) is CustomError
        results = ex.map(boom, range(6))
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(CustomError):
            next(results)
        with pytest.raises(ValueError):
            ex.map(square, range(3), chunksize=0)
        assert list(ex.map(square, range(9), chunksize=4)) == [x * x for x in range(9)]
        ex.shutdown(wait=True)
        with pytest.raises(RuntimeError):
            ex.submit(square, 1)
        with pytest.raises(RuntimeError):
            ex.map(square, range(3))
        ex.shutdown()
    finally:
        _dispose(ex)


def test_context_manager() -> None:
    with _foreman_executor(2) as ex:
        assert isinstance(ex, ForemanExecutor)
        future = ex.submit(sleep_then, 0.2)
        assert list(ex.map(square, range(5))) == [0, 1, 4, 9, 16]
    assert future.done() and future.result(timeout=0) == 0.2  # __exit__ is shutdown(wait=True)
    with pytest.raises(RuntimeError):
        ex.submit(square, 1)
    with pytest.raises(RuntimeError):
        ex.map(square, range(3))


# -- concurrent.futures helpers ----------------------------------------------------------------------------------

def test_wait_and_as_completed(executor: ForemanExecutor) -> None:
    fast = executor.submit(sleep_then, 0.01)
    slow = executor.submit(sleep_then, 0.6)
    done, not_done = concurrent.futures.wait([slow, fast], timeout=SHORT,
                                             return_when=concurrent.futures.FIRST_COMPLETED)
    assert fast in done and slow in not_done
    done, not_done = concurrent.futures.wait([slow, fast], timeout=SHORT)
    assert done == {slow, fast} and not not_done

    futures = {executor.submit(square, x): x for x in range(8)}
    seen = {futures[f]: f.result() for f in concurrent.futures.as_completed(futures, timeout=SHORT)}
    assert seen == {x: x * x for x in range(8)}

    failing = executor.submit(boom, 3)
    done, _ = concurrent.futures.wait([failing], timeout=SHORT, return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {failing} and type(failing.exception()) is CustomError


def test_as_completed_timeout(executor: ForemanExecutor) -> None:
    slow = executor.submit(sleep_then, 0.6)
    with pytest.raises(concurrent.futures.TimeoutError):
        for _ in concurrent.futures.as_completed([slow], timeout=0.2):
            pass
    assert slow.result(timeout=SHORT) == 0.6


# -- an executor over an existing foreman ------------------------------------------------------------------------

def test_foreman_executor_shares_fleet_and_leaves_foreman_usable(executor: ForemanExecutor) -> None:
    fm = executor.foreman
    worker_pids = _worker_pids(fm)
    assert len(worker_pids) == 2
    shared = fm.executor()
    assert isinstance(shared, ForemanExecutor) and shared.foreman is fm
    assert _worker_pids(fm) == worker_pids  # no new workers started
    x, pid = shared.submit(whoami, 1).result(timeout=SHORT)
    assert x == 1 and pid in worker_pids
    assert {pid for _, pid in shared.map(slow_whoami, range(6))} <= worker_pids
    shared.shutdown(wait=True)
    with pytest.raises(RuntimeError):
        shared.submit(square, 1)
    with pytest.raises(RuntimeError):
        shared.map(square, range(3))
    # the foreman, its workers and other executors over it keep going
    assert fm.map(square, range(10)) == [x * x for x in range(10)]
    assert len(fm.workers) == 2 and _worker_pids(fm) == worker_pids
    assert executor.submit(square, 4).result(timeout=SHORT) == 16
    with fm.executor() as again:
        assert again.submit(square, 5).result(timeout=SHORT) == 25
    assert fm.map(square, [6]) == [36]


# -- where ForemanExecutor does not (yet) match ProcessPoolExecutor ----------------------------------------------

@pytest.mark.parametrize("make", _kinds())
def test_map_results_survive_shutdown_wait(make: Callable[..., concurrent.futures.Executor]) -> None:
    # The common idiom: results = ex.map(...) inside the with block, consumed after it.
    ex = make(2)
    try:
        with ex:
            results = ex.map(sleep_then, [0.1] * 4)
        assert list(results) == [0.1] * 4
    finally:
        _dispose(ex)


@pytest.mark.parametrize("make", _kinds())
def test_shutdown_cancel_futures_returns(make: Callable[..., concurrent.futures.Executor]) -> None:
    ex = make(2)
    futures = [ex.submit(sleep_then, 0.2) for _ in range(8)]
    shutting = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True}, daemon=True)
    try:
        wait_until(lambda: any(f.running() or f.done() for f in futures), timeout=SHORT)
        shutting.start()
        shutting.join(timeout=5)
        assert not shutting.is_alive(), "shutdown(wait=True, cancel_futures=True) did not return"
        assert all(f.done() for f in futures)
        assert any(f.cancelled() for f in futures)
    finally:
        _stop(shutting, futures)
        _dispose(ex)


@pytest.mark.parametrize("make", _kinds())
def test_two_tasks_on_two_idle_workers_run_at_once(make: Callable[..., concurrent.futures.Executor]) -> None:
    ex = make(2)
    try:
        list(ex.map(sleep_then, [0.3, 0.3]))  # both workers are up (ProcessPoolExecutor starts them lazily)
        first, second = ex.submit(span, 0.5), ex.submit(span, 0.5)
        (start1, end1), (start2, end2) = first.result(timeout=SHORT), second.result(timeout=SHORT)
        assert max(start1, start2) < min(end1, end2), "the two tasks ran one after the other"
    finally:
        _dispose(ex)
