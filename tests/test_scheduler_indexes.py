"""The scheduler's indexes for large fleets: idle workers served first, speculation on the latest batches first, and
function holders known without a walk over all workers. Fake clock, no sockets."""

from __future__ import annotations

from test_scheduler import ENV, OTHER_ENV, FakeClock, _check_indexes, add, done

from foreman.scheduler import Scheduler


def _job_with_known_task_time(s: Scheduler, clock: FakeClock) -> int:
    """A job whose five first one-task batches each took 1 s on worker w0 (so its typical task time is 1 s)."""
    s.add_worker("w0", 1, ENV)
    job = s.add_job(ENV)
    for start in range(5):
        add(s, job.id, start)
        (assignment,) = s.dispatch()
        clock.now += 1.0
        done(s, "w0", assignment.batch)
    return job.id


def test_idle_workers_get_the_latest_batches_first_and_young_ones_none() -> None:
    clock = FakeClock(100.0)
    s = Scheduler(clock, prefetch=0, speculation=3.0)
    job_id = _job_with_known_task_time(s, clock)
    s.add_worker("a", 1, ENV)
    s.add_worker("b", 1, ENV)
    for start, count, at in ((10, 3, 200.0), (13, 1, 203.0), (14, 1, 210.0)):  # w0, a and b each take one
        clock.now = at
        add(s, job_id, start, count)
        assert len(s.dispatch()) == 1
    # At 210.5 the 3-task batch is 10.5 s old against 9 s expected (3 tasks x 1 s x 3), the next 7.5 s against
    # 3 s: the later one is the later, and goes first. The last, 0.5 s old, is not late.
    clock.now = 210.5
    s.add_worker("c", 1, ENV)
    s.add_worker("d", 1, ENV)
    s.add_worker("e", 1, ENV)
    out = s.dispatch()
    assert [(a.worker_id, a.batch.start) for a in out] == [("c", 13), ("d", 10)]
    assert s.speculated == 2 and list(s.jobs[job_id].flying) == [14]
    _check_indexes(s)


def test_speculation_skips_workers_that_cannot_run_the_late_job() -> None:
    clock = FakeClock(100.0)
    s = Scheduler(clock, prefetch=0, speculation=3.0)
    job_id = _job_with_known_task_time(s, clock)
    add(s, job_id, 10)
    s.dispatch()
    clock.now += 100
    s.add_worker("elsewhere", 1, OTHER_ENV)
    assert s.dispatch() == []
    s.add_worker("here", 1, ENV)
    assert [(a.worker_id, a.batch.start) for a in s.dispatch()] == [("here", 10)]


def test_idle_workers_are_served_before_busy_ones_the_last_filed_first() -> None:
    clock = FakeClock(100.0)
    s = Scheduler(clock, prefetch=1, speculation=None)
    job = s.add_job(ENV)
    for name in ("a", "b", "c"):
        s.add_worker(name, 1, ENV)
    first = add(s, job.id, 0)
    assert [a.worker_id for a in s.dispatch()] == ["c"]  # c has room for a prefetch but a and b are idle
    add(s, job.id, 1)
    add(s, job.id, 2)
    add(s, job.id, 3)
    assert [a.worker_id for a in s.dispatch()] == ["b", "a", "c"]
    done(s, "c", first)
    _check_indexes(s)


def test_the_worker_that_finished_last_gets_the_next_batch() -> None:
    """Of idle workers, the one that finished most recently is served first: its processes are the likeliest to
    be awake (a local worker polls for a moment after a short batch, see worker.polling)."""
    clock = FakeClock(100.0)
    s = Scheduler(clock, prefetch=0, speculation=None)
    job = s.add_job(ENV)
    for name in ("a", "b"):
        s.add_worker(name, 1, ENV)
    first, second = add(s, job.id, 0), add(s, job.id, 1)
    assert {a.worker_id: a.batch for a in s.dispatch()} == {"b": first, "a": second}
    done(s, "b", first)
    done(s, "a", second)  # a, filed first, finished last
    for i in range(2, 6):
        batch = add(s, job.id, i)
        (assignment,) = s.dispatch()
        assert assignment.worker_id == "a"  # a runs every call, one after the other, and b stays idle
        done(s, "a", batch)
    _check_indexes(s)


def test_forget_job_tells_only_connected_holders() -> None:
    clock = FakeClock(100.0)
    s = Scheduler(clock, prefetch=0, speculation=None)
    job = s.add_job(ENV)
    for name in ("a", "b", "c"):
        s.add_worker(name, 1, ENV)
    batches = [add(s, job.id, i) for i in range(3)]
    s.dispatch()
    s.remove_worker("b", lost=False)  # its batch goes back to the queue, and to a or c later
    for batch in batches:
        for holder in list(batch.holders):
            done(s, holder, batch)
    for assignment in s.dispatch():
        done(s, assignment.worker_id, assignment.batch)
    s.close_input(job.id)
    assert sorted(s.forget_job(job.id)) == ["a", "c"]
    _check_indexes(s)


def test_pausing_draining_and_adopting_keep_the_indexes() -> None:
    """Every way a worker's freedom or its function set changes goes through the indexes."""
    clock = FakeClock(100.0)
    s = Scheduler(clock, speculation=None)
    job = s.add_job(ENV, held_until=150.0)
    batches = [add(s, job.id, i) for i in range(4)]
    for name in ("a", "b", "c"):
        s.add_worker(name, 1, ENV)
    assert s.adopt("a", job.id, 1, 1)  # a forgot the function: it is no holder until it is shipped again
    _check_indexes(s)
    s.pause_worker("b", True)
    s.drain_worker("c")
    _check_indexes(s)
    clock.now = 200.0
    assert [(x.worker_id, x.batch.start, x.ship_function) for x in s.dispatch()] == [("a", 0, True)]
    _check_indexes(s)
    s.pause_worker("b", False)
    assert [(x.worker_id, x.batch.start) for x in s.dispatch()] == [("b", 2), ("b", 3)]
    _check_indexes(s)
    for batch in batches:
        done(s, next(iter(batch.holders)), batch)
    s.close_input(job.id)
    assert sorted(s.forget_job(job.id)) == ["a", "b"]
    _check_indexes(s)
