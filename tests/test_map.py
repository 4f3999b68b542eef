"""map / imap / submit end to end: a real foreman, real worker processes, real WebSockets on loopback."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import time
from urllib.parse import urlsplit

import psutil
import pytest
from conftest import wait_until
from tasks import add, sleep_then, square, whoami

from foreman import Foreman
from foreman.errors import ForemanClosedError


def test_map_10000_tasks_in_order(fm: Foreman) -> None:
    assert fm.map(square, range(10_000)) == [x * x for x in range(10_000)]


def test_map_uses_both_workers(fm: Foreman) -> None:
    results = fm.map(whoami, range(2_000), chunksize=10)
    assert [x for x, _ in results] == list(range(2_000))
    assert len({pid for _, pid in results}) == 2


def test_map_several_iterables_stops_at_shortest(fm: Foreman) -> None:
    assert fm.map(add, range(100), range(0, 1000, 10)) == [a + b for a, b in zip(range(100), range(0, 1000, 10))]
    assert fm.map(add, [1, 2, 3], [10]) == [11]


def test_map_of_empty_input(fm: Foreman) -> None:
    assert fm.map(square, []) == []


def test_map_lambda_and_closure_travel_by_value(fm: Foreman) -> None:
    offset = 7
    assert fm.map(lambda x: x + offset, range(5)) == [7, 8, 9, 10, 11]


def test_submit_and_as_completed(fm: Foreman) -> None:
    futures = [fm.submit(square, i) for i in range(50)]
    done = {f.result(timeout=30) for f in concurrent.futures.as_completed(futures, timeout=30)}
    assert done == {i * i for i in range(50)}
    assert fm.submit(divmod, 17, b=5).exception(timeout=30) is not None  # kwargs reach the function
    assert fm.submit(pow, 2, 10).result(timeout=30) == 1024


def test_submits_share_one_job_that_closes_once_idle_for_a_second(fm: Foreman) -> None:
    def live_jobs() -> set[int]:
        return fm._call(lambda: set(fm._server.fleet.jobs))

    before = live_jobs()
    assert [fm.submit(square, i).result(timeout=30) for i in range(5)] == [0, 1, 4, 9, 16]
    (stream,) = live_jobs() - before
    for i in range(4):  # calls 0.4 s apart keep it open past its one-second idle limit
        time.sleep(0.4)
        assert fm.submit(square, i).result(timeout=30) == i * i
        assert live_jobs() - before == {stream}
    wait_until(lambda: stream not in live_jobs(), timeout=5)
    assert fm.submit(square, 3).result(timeout=30) == 9
    assert len(live_jobs() - before - {stream}) == 1  # a new stream


def test_submit_with_kwargs(fm: Foreman) -> None:
    assert fm.submit(sorted, [3, 1, 2], reverse=True).result(timeout=30) == [3, 2, 1]


def test_imap_unordered_yields_every_result(fm: Foreman) -> None:
    assert sorted(fm.imap_unordered(square, range(3_000))) == [x * x for x in range(3_000)]


def test_imap_streams_a_huge_generator_with_bounded_memory(fm: Foreman) -> None:
    """10,000,000 inputs: only a bounded window is ever pulled ahead of what was consumed."""
    pulled = itertools.count()

    def source():
        for i in range(10_000_000):
            next(pulled)
            yield i

    job = fm.imap(square, source())
    me = psutil.Process(os.getpid())
    results = iter(job)
    for i in range(200_000):
        assert next(results) == i * i
    rss_early = me.memory_info().rss
    for i in range(200_000, 600_000):
        assert next(results) == i * i
    ahead = next(pulled) - 600_000
    rss_late = me.memory_info().rss
    job.close()
    assert ahead < 300_000, f"the feeder ran {ahead} items ahead of the consumer"
    assert rss_late - rss_early < 50 * 1024 * 1024, "memory grew with the number of items consumed"


def test_imap_close_cancels_the_rest(fm: Foreman) -> None:
    job = fm.imap(sleep_then, [0.01] * 10_000)
    assert next(job) == 0.01
    job.close()
    assert fm.map(square, range(10)) == [x * x for x in range(10)]  # the fleet is free again


def test_job_cancel_from_another_thread_raises_cancelled(fm: Foreman) -> None:
    job = fm.imap(sleep_then, [0.05] * 200)
    next(job)
    job.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        list(job)


def test_job_timeout(fm: Foreman) -> None:
    job = fm.imap(sleep_then, [5.0, 5.0], timeout=0.5)
    with pytest.raises(concurrent.futures.TimeoutError):
        next(job)


def test_job_progress_counts_done_tasks(fm: Foreman) -> None:
    job = fm.imap(square, range(1_000))
    assert list(job) == [x * x for x in range(1_000)]
    assert job.progress == (1_000, 1_000)


def test_closing_the_foreman_fails_unfinished_work() -> None:
    foreman = Foreman(port=0, local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    future = foreman.submit(sleep_then, 30)
    foreman.close()
    with pytest.raises(ForemanClosedError):
        future.result(timeout=10)
    with pytest.raises(ForemanClosedError):
        foreman.map(square, [1])


def test_a_busy_port_is_a_clear_error(fm: Foreman) -> None:
    port = urlsplit(fm.address).port
    with pytest.raises(OSError):
        Foreman(port=port)
