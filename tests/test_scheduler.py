"""Deterministic unit tests of the sans-I/O scheduler core, driven by a fake clock (no sockets, no sleeps)."""

from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest

from foreman import scheduler as sched
from foreman.scheduler import (
    TERMINAL,
    TRANSITIONS,
    Batch,
    Completion,
    Event,
    Failure,
    Scheduler,
    State,
    TransitionError,
)
from foreman.serialization import dumps_items

ENV = "py3.11/cloudpickle3"
OTHER_ENV = "py3.9/cloudpickle2"


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
def s(clock: FakeClock) -> Scheduler:
    return Scheduler(clock, heartbeat_timeout=10.0)


def add(s: Scheduler, job_id: int, start: int, count: int = 1) -> Batch:
    """Add a batch whose items are (job, index) pairs, pickled for real."""
    items = [(job_id, i) for i in range(start, start + count)]
    return s.add_batch(job_id, start, count, dumps_items(items, start))


def add_many(s: Scheduler, job_id: int, n: int, count: int = 1) -> list[Batch]:
    return [add(s, job_id, i * count, count) for i in range(n)]


def done(s: Scheduler, worker_id: str, batch: Batch) -> Completion | None:
    return s.complete(worker_id, *batch.key)


def held(s: Scheduler, worker_id: str) -> list[Batch]:
    return list(s.workers[worker_id].batches.values())


# -- assignment --------------------------------------------------------------------------------------------------


def test_assignment_fills_capacity_and_ships_function_once(s: Scheduler) -> None:
    """A worker gets slots + prefetch batches; the function ships only on its first batch of a job."""
    w = s.add_worker("w", slots=2, env=ENV)
    assert w.capacity == 4  # default prefetch = slots
    job = s.add_job(ENV)
    batches = add_many(s, job.id, 6)

    out = s.dispatch()
    assert [a.batch for a in out] == batches[:4]
    assert {a.worker_id for a in out} == {"w"}
    assert [a.ship_function for a in out] == [True, False, False, False]
    assert all(b.state is State.ASSIGNED and b.holders == {"w"} for b in batches[:4])
    assert s.dispatch() == []  # full

    assert isinstance(done(s, "w", batches[0]), Completion)
    again = s.dispatch()
    assert [(a.worker_id, a.batch, a.ship_function) for a in again] == [("w", batches[4], False)]

    s.add_worker("v", slots=1, env=ENV)
    first = s.dispatch()
    assert [(a.worker_id, a.batch, a.ship_function) for a in first] == [("v", batches[5], True)]

    job2 = s.add_job(ENV)
    add(s, job2.id, 0)
    assert isinstance(done(s, "v", batches[5]), Completion)
    out2 = s.dispatch()
    assert [(a.worker_id, a.ship_function) for a in out2] == [("v", True)]  # a new job ships its function again


def test_explicit_prefetch_sets_capacity(clock: FakeClock) -> None:
    """prefetch=0 means a worker holds exactly its slots; prefetch=n adds n."""
    assert Scheduler(clock, prefetch=0).add_worker("a", 3, ENV).capacity == 3
    assert Scheduler(clock, prefetch=5).add_worker("a", 3, ENV).capacity == 8


def test_round_robin_between_jobs(clock: FakeClock) -> None:
    """Batches from two runnable jobs alternate."""
    s = Scheduler(clock, prefetch=0)
    s.add_worker("w", slots=6, env=ENV)
    j1, j2 = s.add_job(ENV), s.add_job(ENV)
    add_many(s, j1.id, 4)
    add_many(s, j2.id, 4)
    out = s.dispatch()
    assert [(a.batch.job_id, a.batch.start) for a in out] == [
        (j1.id, 0), (j2.id, 0), (j1.id, 1), (j2.id, 1), (j1.id, 2), (j2.id, 2)]


def test_env_mismatch_never_assigned(s: Scheduler) -> None:
    """A job only goes to workers whose environment fingerprint matches."""
    s.add_worker("odd", slots=4, env=OTHER_ENV)
    job = s.add_job(ENV)
    batches = add_many(s, job.id, 3)
    assert s.dispatch() == []
    assert all(b.state is State.QUEUED for b in batches)

    s.add_worker("good", slots=1, env=ENV)
    out = s.dispatch()
    assert {a.worker_id for a in out} == {"good"}
    assert len(out) == 2
    done(s, "good", out[0].batch)
    assert {a.worker_id for a in s.dispatch()} == {"good"}
    assert held(s, "odd") == []
    assert "odd" not in {h for b in batches for h in b.holders}


# -- results -----------------------------------------------------------------------------------------------------


def test_complete_accepts_first_result_once(s: Scheduler) -> None:
    """The first result is accepted; a duplicate returns None and is counted."""
    s.add_worker("w", 1, ENV)
    job = s.add_job(ENV)
    batch = add(s, job.id, 0, count=3)
    s.dispatch()

    result = done(s, "w", batch)
    assert result == Completion(batch, ())
    assert batch.state is State.DONE
    assert job.tasks_done == 3 and s.workers["w"].tasks_done == 3
    assert job.live == {}
    assert held(s, "w") == []

    assert done(s, "w", batch) is None
    assert s.duplicates_dropped == 1
    assert job.tasks_done == 3


def test_stale_results_are_dropped(s: Scheduler) -> None:
    """Results for a queued batch, an unknown job, or a wrong range are dropped and counted."""
    s.add_worker("w", 1, ENV)
    job = s.add_job(ENV)
    queued = add_many(s, job.id, 3)[2]  # capacity 2: this one stays queued
    s.dispatch()
    assert queued.state is State.QUEUED
    assert done(s, "w", queued) is None
    assert s.complete("w", 999, 0, 1) is None
    assert s.complete("w", job.id, 0, 2) is None  # count does not match the live batch
    assert s.complete("w", job.id, 7, 1) is None
    assert s.duplicates_dropped == 4
    assert queued.state is State.QUEUED and job.tasks_done == 0
    assert len(held(s, "w")) == 2  # nothing it holds was released


def test_result_for_reassigned_batch_wins_and_cancels_other_holder(s: Scheduler) -> None:
    """A late result from the lost worker is accepted; the new holder is told to cancel its copy."""
    s.add_worker("a", 1, ENV)
    job = s.add_job(ENV)
    batch = add(s, job.id, 0, count=2)
    s.dispatch()
    s.remove_worker("a", lost=True)
    s.add_worker("b", 1, ENV)
    assert [a.worker_id for a in s.dispatch()] == ["b"]

    result = s.complete("a", job.id, 0, 2)  # "a" is gone, its result arrives anyway
    assert result is not None
    assert result.batch is batch and result.cancel_on == ("b",)
    assert held(s, "b") == [] and not s.workers["b"].exclusive
    assert batch.holders == set() and batch.state is State.DONE
    assert done(s, "b", batch) is None  # b's copy is now the duplicate
    assert s.duplicates_dropped == 1


def test_result_from_reconnected_worker_wins(s: Scheduler) -> None:
    """A worker that reconnected under the same id may still deliver the batch now held elsewhere."""
    s.add_worker("a", 1, ENV)
    job = s.add_job(ENV)
    batch = add(s, job.id, 0)
    s.dispatch()
    s.remove_worker("a", lost=True)
    s.add_worker("b", 1, ENV)
    s.dispatch()
    s.add_worker("a", 1, ENV)
    result = done(s, "a", batch)
    assert result is not None and result.cancel_on == ("b",)
    assert s.workers["a"].tasks_done == 1


# -- heartbeats --------------------------------------------------------------------------------------------------


def test_expiry_allows_for_the_callers_own_lag(s: Scheduler, clock: FakeClock) -> None:
    """A foreman whose loop ran late has not read the heartbeats that came meanwhile: expiry with that lag as
    slack does not count the workers silent for it; a frozen worker is still expired once past timeout + slack."""
    s.add_worker("a", 1, ENV)  # heard at t=100
    clock.now = 112.0  # 12 s of silence, timeout 10: but the loop itself was 3 s late
    assert s.expired() == ["a"]
    assert s.expired(slack=3.0) == []
    clock.now = 113.5
    assert s.expired(slack=3.0) == ["a"]


def test_expired_follows_fake_clock(s: Scheduler, clock: FakeClock) -> None:
    """Silence past the timeout expires a worker; touch keeps it alive; order is least recently heard first."""
    s.add_worker("a", 1, ENV)  # t=100
    clock.now = 101.0
    s.add_worker("b", 1, ENV)
    clock.now = 102.0
    s.add_worker("c", 1, ENV)
    clock.now = 105.0
    s.touch("a")
    s.touch("nobody")  # unknown workers are ignored
    assert s.expired() == []

    clock.now = 112.0  # deadline 102: b (101) is silent too long, c (102) is exactly on it
    assert s.expired() == ["b"]
    clock.now = 112.5
    assert s.expired() == ["b", "c"]
    clock.now = 116.0
    assert s.expired() == ["b", "c", "a"]

    s.touch("b")
    assert s.expired() == ["c", "a"]
    s.remove_worker("c", lost=True)
    assert s.expired() == ["a"]


# -- worker loss, suspects, poison -------------------------------------------------------------------------------


def test_lost_worker_requeues_suspects_that_run_alone(s: Scheduler) -> None:
    """A lost worker's batches get a strike; each suspect runs on an idle worker that then gets nothing else."""
    s.add_worker("a", 1, ENV)
    job = s.add_job(ENV)
    b0, b1, b2, b3 = add_many(s, job.id, 4)
    s.dispatch()
    assert held(s, "a") == [b0, b1]

    assert s.remove_worker("a", lost=True) == []
    assert s.workers_lost == 1 and s.reassigned == 2
    assert b0.strikes == 1 and b0.suspect and b0.state is State.QUEUED
    assert list(job.suspects) == [b0, b1] and list(job.queue) == [b2, b3]
    assert "worker a was lost" in b0.last_loss

    s.add_worker("b", 1, ENV)
    out = s.dispatch()
    assert [(a.worker_id, a.batch) for a in out] == [("b", b0)]  # capacity 2, but a suspect runs alone
    assert s.workers["b"].exclusive and not s.workers["b"].free

    s.add_worker("c", 1, ENV)
    assert [(a.worker_id, a.batch) for a in s.dispatch()] == [("c", b1)]
    add(s, job.id, 4)
    assert s.dispatch() == []  # both workers are exclusive

    assert done(s, "b", b0) is not None
    assert not s.workers["b"].exclusive
    assert [(a.worker_id, a.batch) for a in s.dispatch()] == [("b", b2), ("b", b3)]


def test_suspect_not_given_to_busy_worker(clock: FakeClock) -> None:
    """A worker with something in flight never receives a suspect, even with room to spare."""
    s = Scheduler(clock, prefetch=3)
    s.add_worker("w", 1, ENV)  # capacity 4
    job = s.add_job(ENV)
    b0, b1 = add_many(s, job.id, 2)
    s.dispatch()
    assert s.crashed("w", *b1.key, reason="segfault") is None  # a strike, the worker stays
    assert b1.suspect and held(s, "w") == [b0]
    assert s.dispatch() == []
    assert b1.state is State.QUEUED
    done(s, "w", b0)
    assert [a.batch for a in s.dispatch()] == [b1]
    assert s.workers["w"].exclusive


def test_multi_task_batch_split_after_second_loss(s: Scheduler) -> None:
    """A batch that loses two workers is split into single-task suspects with the right items."""
    job = s.add_job(ENV)
    big = s.add_batch(job.id, 10, 3, dumps_items(["a", "b", "c"], 10))
    s.add_worker("w1", 1, ENV)
    s.dispatch()
    s.remove_worker("w1", lost=True)
    assert big.state is State.QUEUED and big.strikes == 1 and big.count == 3  # one loss: not split yet

    s.add_worker("w2", 1, ENV)
    assert [a.batch for a in s.dispatch()] == [big]
    assert s.remove_worker("w2", lost=True) == []
    assert big.state is State.SPLIT

    singles = [job.live[i] for i in (10, 11, 12)]
    assert sorted(job.live) == [10, 11, 12]
    assert [(b.start, b.count, b.strikes, b.state) for b in singles] == [
        (10, 1, 2, State.QUEUED), (11, 1, 2, State.QUEUED), (12, 1, 2, State.QUEUED)]
    assert list(job.suspects) == singles and not job.queue
    assert [pickle.loads(b.payload.data) for b in singles] == [["a"], ["b"], ["c"]]
    assert job.tasks_total == 3

    s.add_worker("w3", 1, ENV)
    s.add_worker("w4", 1, ENV)
    out = s.dispatch()
    assert sorted((a.worker_id, a.batch.start) for a in out) == [("w3", 11), ("w4", 10)]  # newest filed first
    assert s.complete("w3", job.id, 10, 3) is None  # a stale result for the old, split batch


def test_poison_task_fails_after_max_losses(s: Scheduler, clock: FakeClock) -> None:
    """A single task on three workers that died at once while running it alone, on a fleet that otherwise loses
    few workers, fails, naming the task and job."""
    job = s.add_job(ENV)
    batch = add(s, job.id, 5)
    s.close_input(job.id)
    for n in range(1, 4):
        s.add_worker(f"w{n}", 1, ENV)
        clock.now += 60  # the fleet has been up a while: its loss rate is low
        s.touch(f"w{n}")
        assert [a.batch for a in s.dispatch()] == [batch]
        failures = s.remove_worker(f"w{n}", lost=True)
        if n < 3:
            assert failures == [] and batch.strikes == n
    assert len(failures) == 1
    failure = failures[0]
    assert isinstance(failure, Failure) and failure.batch is batch
    assert f"task 5 of job {job.id}" in failure.reason
    assert "worker w3 was lost" in failure.reason
    assert batch.state is State.FAILED
    assert job.tasks_failed == 1 and job.live == {} and job.finished
    s.add_worker("w4", 1, ENV)
    assert s.dispatch() == []


def test_max_task_losses_one_fails_single_task_immediately(clock: FakeClock) -> None:
    """With max_task_losses=1 the first loss of a single task is fatal."""
    s = Scheduler(clock, max_task_losses=1)
    s.add_worker("w", 1, ENV)
    job = s.add_job(ENV)
    add(s, job.id, 0)
    s.dispatch()
    [failure] = s.remove_worker("w", lost=True)
    assert failure.batch.state is State.FAILED


def test_clean_removal_requeues_at_front_without_strike(clock: FakeClock) -> None:
    """A worker leaving cleanly puts its batch back first in line, with no strike."""
    s = Scheduler(clock, prefetch=0)
    s.add_worker("a", 1, ENV)
    job = s.add_job(ENV)
    b0, b1, b2 = add_many(s, job.id, 3)
    s.dispatch()
    assert s.remove_worker("a", lost=False) == []
    assert b0.strikes == 0 and not b0.suspect and b0.state is State.QUEUED
    assert list(job.queue) == [b0, b1, b2] and not job.suspects
    assert s.workers_lost == 0 and s.reassigned == 0
    s.add_worker("b", 1, ENV)
    assert [a.batch for a in s.dispatch()] == [b0]


def test_hand_back_requeues_at_front_without_strike(clock: FakeClock) -> None:
    """A batch handed back unstarted goes to the front of the queue; others' hand-backs are ignored."""
    s = Scheduler(clock, prefetch=0)
    s.add_worker("b", 1, ENV)
    s.add_worker("a", 1, ENV)  # filed last: served first
    job = s.add_job(ENV)
    b0, b1, b2 = add_many(s, job.id, 3)
    s.dispatch()
    assert held(s, "a") == [b0] and held(s, "b") == [b1]

    s.hand_back("b", *b0.key)  # not b's batch
    s.hand_back("ghost", *b0.key)
    assert b0.state is State.ASSIGNED

    s.drain_worker("a")
    s.hand_back("a", *b0.key)
    assert b0.state is State.QUEUED and b0.strikes == 0 and b0.holders == set()
    assert list(job.queue) == [b0, b2]
    assert s.dispatch() == []  # a is draining, b is full
    done(s, "b", b1)
    assert [(a.worker_id, a.batch) for a in s.dispatch()] == [("b", b0)]


def test_a_paused_worker_gets_nothing_new_until_it_resumes(clock: FakeClock) -> None:
    """Its owner paused a worker: what it hands back goes elsewhere, it is no idle target for suspects, and it
    takes work again on resuming."""
    s = Scheduler(clock, prefetch=1)
    s.add_worker("a", 1, ENV)
    job = s.add_job(ENV)
    b0, b1, b2 = add_many(s, job.id, 3)
    assert [a.batch for a in s.dispatch()] == [b0, b1]
    s.pause_worker("a", True)
    s.hand_back("a", *b1.key)  # the queued one comes back at once
    assert s.dispatch() == []  # the running one may still finish; nothing new meanwhile
    assert done(s, "a", b0) is not None
    assert s.dispatch() == [] and list(job.queue) == [b1, b2]
    s.add_worker("b", 1, ENV)
    assert [(a.worker_id, a.batch) for a in s.dispatch()] == [("b", b1), ("b", b2)]
    s.pause_worker("a", False)
    b3 = add(s, job.id, 3)
    assert [(a.worker_id, a.batch) for a in s.dispatch()] == [("a", b3)]
    s.pause_worker("a", True)
    s.pause_worker("a", True)  # a fresh reason for the same pause changes nothing
    assert not s.workers["a"].free


def _churn(s: Scheduler, clock: FakeClock, losses: int, seconds: float, fleet: int = 4) -> None:
    """Background churn: ``fleet`` idle workers up for ``seconds``, ``losses`` of them lost (and replaced)."""
    ids = [f"bg{i}" for i in range(fleet)]
    for worker_id in ids:
        s.add_worker(worker_id, 1, ENV)
    for n in range(losses):
        clock.now += seconds / max(losses, 1)
        victim = ids[n % fleet]
        s.remove_worker(victim, lost=True)
        ids[n % fleet] = f"{victim}+"
        s.add_worker(ids[n % fleet], 1, ENV)
    if not losses:
        clock.now += seconds
    for worker_id in ids:
        s.remove_worker(worker_id, lost=False)


def _lose_alone(s: Scheduler, clock: FakeClock, batch: Batch, worker_id: str, ran: float) -> list[Failure]:
    """``batch`` runs alone on a fresh worker for ``ran`` seconds (heard from all along), then the worker is lost."""
    s.add_worker(worker_id, 1, ENV)
    assert [a.batch for a in s.dispatch()] == [batch]
    clock.now += ran
    s.touch(worker_id)
    return s.remove_worker(worker_id, lost=True)


def test_split_tasks_are_not_poison_for_losses_of_the_batch_they_were_in(s: Scheduler, clock: FakeClock) -> None:
    """The false verdict of issue 18: a batch of many tasks loses two workers to churn and is split; each single
    task inherits its strikes, and one more worker lost while running one of them declared it poison. Losses of a
    batch say nothing about which task (if any) is at fault: only the task's own losses count."""
    job = s.add_job(ENV)
    big = s.add_batch(job.id, 0, 4, dumps_items(list(range(4)), 0))
    for n in (1, 2):
        s.add_worker(f"w{n}", 1, ENV)
        s.dispatch()
        clock.now += 5
        s.remove_worker(f"w{n}", lost=True)
    assert big.state is State.SPLIT
    single = job.live[0]
    assert single.strikes == 2
    assert _lose_alone(s, clock, single, "w3", ran=2.0) == []
    assert single.state is State.QUEUED and len(single.solo_losses) == 1


def test_a_fleet_that_loses_workers_often_does_not_blame_a_long_task_lost_with_them(s: Scheduler,
                                                                                    clock: FakeClock) -> None:
    """Workers vanish every few seconds; a 20 s task lost three times while running alone is within what that
    churn explains: it is retried, not failed. (Without a bound it would be retried forever: LOSS_CAP.)"""
    _churn(s, clock, losses=40, seconds=100)  # 4 workers, 40 lost in 100 s: one every 10 worker-seconds
    job = s.add_job(ENV)
    batch = add(s, job.id, 0)
    for n in range(3):
        assert _lose_alone(s, clock, batch, f"w{n}", ran=20.0) == []
    assert len(batch.solo_losses) == 3 and batch.state is State.QUEUED
    failures: list[Failure] = []
    n = 3
    while not failures:
        failures = _lose_alone(s, clock, batch, f"w{n}", ran=20.0)
        n += 1
    assert n == sched.LOSS_CAP * s.max_task_losses
    assert "poison" in failures[0].reason


@pytest.mark.parametrize("churn, needed", [(0, 3), (4, 3), (40, 3), (150, 5), (400, 9)])
def test_a_task_that_kills_every_worker_at_once_is_poison_even_under_churn(s: Scheduler, clock: FakeClock,
                                                                           churn: int, needed: int) -> None:
    """Workers lost the moment they run it alone: after max_task_losses (3) of them, on a calm fleet and on one
    that loses a worker every 10 worker-seconds (as heavy as the chaos suite's churn); in a storm where quick losses
    happen to innocent tasks too, after more of them, and at worst after LOSS_CAP times max_task_losses."""
    _churn(s, clock, losses=churn, seconds=100)
    job = s.add_job(ENV)
    batch = add(s, job.id, 7)
    failures: list[Failure] = []
    lost = 0
    while not failures:
        failures = _lose_alone(s, clock, batch, f"w{lost}", ran=0.0)
        lost += 1
    assert lost == needed
    reason = failures[0].reason
    assert f"task 7 of job {job.id}" in reason and f"alone on {needed} workers" in reason and "poison" in reason


def test_the_fleets_loss_rate_leaves_out_the_losses_being_judged(s: Scheduler, clock: FakeClock) -> None:
    _churn(s, clock, losses=4, seconds=100)
    rate = s.loss_rate()
    assert rate == pytest.approx((4 + sched.PRIOR_LOSS) / (400 + sched.PRIOR_SECONDS))
    job = s.add_job(ENV)
    batch = add(s, job.id, 0)
    batch.strikes = 1  # a suspect: its losses while alone are what is judged
    _lose_alone(s, clock, batch, "w", ran=0.0)
    assert s.workers_lost == 5 and s.loss_rate() == pytest.approx(rate, rel=0.01)


def test_crashed_counts_as_strike(s: Scheduler) -> None:
    """A crashed batch gets a strike like a lost worker, and fails as poison after enough of them."""
    s.add_worker("w", 1, ENV)
    job = s.add_job(ENV)
    batch = add(s, job.id, 0)
    assert s.crashed("w", *batch.key, reason="not held yet") is None
    assert batch.strikes == 0
    for n in range(1, 3):
        s.dispatch()
        assert s.crashed("w", *batch.key, reason=f"crash {n}") is None
        assert batch.strikes == n and batch.suspect and batch.last_loss == f"crash {n}"
        assert not s.workers["w"].exclusive
    s.dispatch()
    failure = s.crashed("w", *batch.key, reason="crash 3")
    assert failure is not None and failure.batch is batch
    assert "crash 3" in failure.reason and f"task 0 of job {job.id}" in failure.reason
    assert batch.state is State.FAILED
    assert s.workers_lost == 0 and s.reassigned == 3
    assert s.crashed("w", *batch.key, reason="late") is None


# -- jobs --------------------------------------------------------------------------------------------------------


def test_cancel_job_returns_running_and_clears_queue(s: Scheduler) -> None:
    """Cancelling returns the running (worker, batch) pairs, queues nothing, and finishes the job."""
    s.add_worker("b", 1, ENV)
    s.add_worker("a", 1, ENV)  # filed last: served first
    job = s.add_job(ENV)
    batches = add_many(s, job.id, 6)
    s.dispatch()
    s.remove_worker("b", lost=True)  # b's two batches become suspects
    running = s.cancel_job(job.id)
    assert sorted((w, b.start) for w, b in running) == [("a", 0), ("a", 2)]  # batches are spread: a, b, a, b
    assert job.finished and job.cancelled
    assert not job.queue and not job.suspects and job.live == {}
    assert all(b.state is State.CANCELLED and not b.holders for b in batches)
    assert held(s, "a") == [] and s.workers["a"].free
    assert s.dispatch() == []
    assert s.complete("a", *batches[0].key) is None
    assert s.forget_job(job.id) == ["a"]


def test_dispatch_after_cancel_and_forget(s: Scheduler) -> None:
    """Cancelling a job with queued batches, then forgetting it, leaves dispatch working."""
    s.add_worker("w", 1, ENV)
    job = s.add_job(ENV)
    add_many(s, job.id, 5)  # 2 assigned, 3 queued
    s.dispatch()
    s.cancel_job(job.id)
    s.forget_job(job.id)
    assert s.dispatch() == []


def test_job_finished_after_close_input_and_all_completed(s: Scheduler) -> None:
    """A job is finished only once its input is closed and every batch is done."""
    s.add_worker("w", 2, ENV)
    job = s.add_job(ENV)
    batches = add_many(s, job.id, 2, count=2)
    assert not job.finished
    s.dispatch()
    for b in batches:
        done(s, "w", b)
    assert job.tasks_done == job.tasks_total == 4
    assert not job.finished  # more input may come
    s.close_input(job.id)
    assert job.finished
    with pytest.raises(ValueError):
        add(s, job.id, 4)


def test_forget_job_names_function_holders(s: Scheduler) -> None:
    """forget_job returns the workers that were sent the job's function."""
    s.add_worker("a", 1, ENV)
    s.add_worker("b", 1, ENV)
    s.add_worker("c", 1, OTHER_ENV)
    job = s.add_job(ENV)
    add_many(s, job.id, 3)
    out = s.dispatch()
    for a in out:
        done(s, a.worker_id, a.batch)
    s.close_input(job.id)
    assert job.finished
    assert sorted(s.forget_job(job.id)) == ["a", "b"]
    assert job.id not in s.jobs and not s.workers["a"].jobs


# -- reservation -------------------------------------------------------------------------------------------------


def test_busy_worker_reserved_for_waiting_suspect(s: Scheduler) -> None:
    """With suspects waiting and every worker busy, one worker takes nothing new until empty, then the suspect."""
    s.add_worker("b", 1, ENV)
    s.add_worker("a", 1, ENV)  # filed last: served first
    job = s.add_job(ENV)
    b0, b1, b2, b3, b4, b5 = add_many(s, job.id, 6)
    s.dispatch()
    assert held(s, "a") == [b0, b2] and held(s, "b") == [b1, b3]  # one per worker per pass
    s.crashed("b", *b3.key, reason="boom")  # b3 is a suspect; b still has b1 in flight
    assert b3.suspect and len(held(s, "b")) == 1

    assert s.dispatch() == []  # b has room, but b3 needs an idle worker: b is reserved instead
    done(s, "a", b0)
    assert [(x.worker_id, x.batch) for x in s.dispatch()] == [("a", b4)]  # a is not the reserved one
    done(s, "b", b1)  # b is now empty
    assert [(x.worker_id, x.batch) for x in s.dispatch()] == [("b", b3)]
    assert s.workers["b"].exclusive
    done(s, "b", b3)
    assert [(x.worker_id, x.batch) for x in s.dispatch()] == [("b", b5)]


def test_no_reservation_when_an_idle_worker_takes_the_suspect(s: Scheduler) -> None:
    """A busy worker keeps receiving ordinary batches while an idle worker runs the suspect."""
    s.add_worker("a", 1, ENV)  # capacity 2
    job = s.add_job(ENV)
    b0, b1 = add_many(s, job.id, 2)
    s.dispatch()
    s.crashed("a", *b1.key, reason="boom")  # a: b0 in flight, one free place; b1 is a suspect
    s.add_worker("idle", 1, ENV)
    b2 = add(s, job.id, 2)
    out = [(x.worker_id, x.batch) for x in s.dispatch()]
    assert ("idle", b1) in out
    assert ("a", b2) in out


# -- speculation -------------------------------------------------------------------------------------------------


def _tail_of_a_job(clock: FakeClock, slow_seconds: float, fast_seconds: float = 1.0) -> tuple[Scheduler, Batch]:
    """Run a job of 7 single-task batches on "fast" and "slow" (seconds a task each), without prefetch, up to its
    tail: the queue empty, "slow" holding the last batch and "fast" just gone idle."""
    s = Scheduler(clock, prefetch=0, speculation=3.0)
    pace = {"slow": slow_seconds, "fast": fast_seconds}
    for worker_id in pace:
        s.add_worker(worker_id, slots=1, env=ENV)
    job = s.add_job(ENV)
    add_many(s, job.id, 7)
    s.close_input(job.id)
    held_now = {a.worker_id: (a.batch, clock.now + pace[a.worker_id]) for a in s.dispatch()}
    while job.queue:
        worker_id = min(held_now, key=lambda w: (held_now[w][1], w != "slow"))  # "slow" first on a tie
        batch, clock.now = held_now.pop(worker_id)
        done(s, worker_id, batch)
        held_now.update({a.worker_id: (a.batch, clock.now + pace[a.worker_id]) for a in s.dispatch()})
    if "fast" in held_now:
        batch, clock.now = held_now.pop("fast")
        done(s, "fast", batch)
    (last, _), = held_now.values()
    assert s.workers["slow"].batches == {last.key: last} and s._idle() == {"fast": None}
    return s, last


def test_next_speculation_is_when_a_batch_turns_late(clock: FakeClock) -> None:
    """A batch in flight 3x the typical time is late; next_speculation says when, so the shell can pump then."""
    s, last = _tail_of_a_job(clock, slow_seconds=1.0)
    assert clock.now < last.assigned_at + 3.0
    assert s.dispatch() == []
    due = s.next_speculation()
    assert due == pytest.approx(last.assigned_at + 3.0)
    clock.now = due - 0.01
    assert s.dispatch() == []
    clock.now = due + 0.01
    (copy,) = s.dispatch()
    assert copy.worker_id == "fast" and copy.batch is last and last.speculated
    assert s.next_speculation() is None  # nobody idle, nothing left to copy


def test_a_batch_on_a_known_slow_worker_is_copied_at_once_at_the_tail(clock: FakeClock) -> None:
    """A worker that took 4x the typical time per task holds the last batch: an idle worker copies it now,
    instead of waiting until the batch is 3x the typical age."""
    s, last = _tail_of_a_job(clock, slow_seconds=4.0)
    assert "slow" in s.jobs[last.job_id].slow and clock.now < last.assigned_at + 3.0
    (copy,) = s.dispatch()
    assert copy.worker_id == "fast" and copy.batch is last
    completion = done(s, "fast", last)
    assert completion is not None and completion.cancel_on == ("slow",)


def test_a_slow_workers_batch_is_copied_only_to_save_at_least_the_minimum_age(clock: FakeClock) -> None:
    """Tasks of 0.2 s on "fast" and 0.8 s on "slow": a copy of the last batch needs 0.2 s. While "slow" still
    needs 0.6 s, the copy saves 0.4 s; once it needs only 0.43 s, 0.23 s, under SPECULATION_MIN_AGE (0.25 s),
    which would not pay for replacing the task process the losing copy kills."""
    s, last = _tail_of_a_job(clock, slow_seconds=0.8, fast_seconds=0.2)
    assert "slow" in s.jobs[last.job_id].slow
    still_needs = last.assigned_at + 0.8 - clock.now
    assert still_needs == pytest.approx(0.6)
    clock.now += still_needs - 0.43
    assert s.dispatch() == []
    s, last = _tail_of_a_job(FakeClock(100.0), slow_seconds=0.8, fast_seconds=0.2)
    (copy,) = s.dispatch()
    assert copy.batch is last


def test_tasks_too_short_for_the_clock_make_nobody_slow(clock: FakeClock) -> None:
    """Every batch but the slow worker's first settles without the clock moving (a coarse clock, tiny tasks):
    the typical time is 0, which tells nobody's pace; the tail is left to the late-batch rule."""
    s = Scheduler(clock, prefetch=0, speculation=3.0)
    s.add_worker("fast", slots=1, env=ENV)
    s.add_worker("slow", slots=1, env=ENV)
    job = s.add_job(ENV)
    add_many(s, job.id, 8)
    s.close_input(job.id)
    held_now = {a.worker_id: a.batch for a in s.dispatch()}
    clock.now += 1.0
    done(s, "slow", held_now.pop("slow"))
    held_now.update({a.worker_id: a.batch for a in s.dispatch()})
    while job.queue:
        done(s, "fast", held_now.pop("fast"))
        held_now.update({a.worker_id: a.batch for a in s.dispatch()})
    done(s, "fast", held_now.pop("fast"))
    assert job.typical == 0.0 and not job.slow
    clock.now += 0.1
    assert s.dispatch() == []  # the slow worker's batch is 0.1 s old: not late, and nobody is known to be slow
    clock.now += 0.2
    (copy,) = s.dispatch()
    assert copy.batch is held_now["slow"]


def test_a_worker_of_typical_pace_is_not_slow(clock: FakeClock) -> None:
    s, last = _tail_of_a_job(clock, slow_seconds=1.0)
    assert not s.jobs[last.job_id].slow and s.jobs[last.job_id].pace["slow"] == pytest.approx(1.0)


# -- state table -------------------------------------------------------------------------------------------------


def test_disallowed_transition_raises(s: Scheduler) -> None:
    """_move refuses a transition the table lacks, e.g. assigning a DONE batch."""
    batch = Batch(1, 0, 1, b"", state=State.DONE)
    with pytest.raises(TransitionError, match="cannot assign from done"):
        sched._move(batch, Event.ASSIGN)
    assert batch.state is State.DONE
    queued = Batch(1, 0, 1, b"")
    with pytest.raises(TransitionError):
        sched._move(queued, Event.COMPLETE)


def test_no_transitions_out_of_terminal_states() -> None:
    """Every terminal state refuses every event; every table entry starts from a live state."""
    assert TERMINAL == {State.DONE, State.FAILED, State.SPLIT, State.CANCELLED}
    assert not any(src in TERMINAL for src, _ in TRANSITIONS)
    for state in TERMINAL:
        for event in Event:
            with pytest.raises(TransitionError):
                sched._move(Batch(1, 0, 1, b"", state=state), event)


# -- capacity and validation -------------------------------------------------------------------------------------


def test_capacity_and_slots_track_workers(clock: FakeClock) -> None:
    """Totals grow with add_worker and shrink with remove_worker, lost or not."""
    s = Scheduler(clock, prefetch=1)
    assert (s.capacity, s.slots) == (0, 0)
    s.add_worker("a", 2, ENV)
    s.add_worker("b", 4, OTHER_ENV)
    assert (s.capacity, s.slots) == (3 + 5, 6)
    s.remove_worker("a", lost=True)
    assert (s.capacity, s.slots) == (5, 4)
    s.remove_worker("b", lost=False)
    assert (s.capacity, s.slots) == (0, 0)


def test_validation_errors(clock: FakeClock) -> None:
    """Bad settings and duplicate or slotless workers raise ValueError."""
    with pytest.raises(ValueError):
        Scheduler(clock, heartbeat_timeout=0)
    with pytest.raises(ValueError):
        Scheduler(clock, max_task_losses=0)
    s = Scheduler(clock)
    s.add_worker("a", 1, ENV)
    with pytest.raises(ValueError):
        s.add_worker("a", 1, ENV)
    with pytest.raises(ValueError):
        s.add_worker("b", 0, ENV)
    assert (s.capacity, s.slots) == (2, 1)


# -- randomized property -----------------------------------------------------------------------------------------


def _check_invariants(s: Scheduler) -> None:
    _check_indexes(s)
    assert s.capacity == sum(w.capacity for w in s.workers.values())
    assert s.slots == sum(w.slots for w in s.workers.values())
    for w in s.workers.values():
        for key, batch in w.batches.items():
            assert key == batch.key and batch.state is State.ASSIGNED and w.id in batch.holders
            assert s.jobs[batch.job_id].live[batch.start] is batch
        if any(b.suspect for b in w.batches.values()):
            assert len(w.batches) == 1 and w.exclusive  # a suspect runs alone
        assert len(w.batches) <= w.capacity
    for job in s.jobs.values():
        queued = list(job.queue) + list(job.suspects)
        assert len(queued) == len({id(b) for b in queued})
        assert all(b.strikes == 0 for b in job.queue) and all(b.strikes > 0 for b in job.suspects)
        covered: set[int] = set()
        for start, batch in job.live.items():
            assert batch.start == start and batch.state in (State.QUEUED, State.ASSIGNED)
            assert (batch.state is State.QUEUED) == (any(b is batch for b in queued))
            if batch.state is State.ASSIGNED:
                assert batch.holders and all(s.workers[h].batches.get(batch.key) is batch for h in batch.holders)
            span = set(range(batch.start, batch.start + batch.count))
            assert not covered & span
            covered |= span
        assert all(b.state is State.QUEUED for b in queued)


def _check_indexes(s: Scheduler) -> None:
    """The scheduler's indexes (kept so that no message costs O(workers)) agree with a recount from scratch."""
    assert set(s._idle()) == {w.id for w in s.workers.values() if w.free and not w.batches}
    assert s._free == {w.id: len(w.batches) / w.slots for w in s.workers.values() if w.free}
    assert {(w, load) for load, bucket in s._by_load.items() for w in bucket} == set(s._free.items())
    assert all(s._by_load.values())  # no empty buckets
    for job in s.jobs.values():
        assert s._holders.get(job.id, set()) == {w.id for w in s.workers.values() if job.id in w.jobs}
        flying = [b for b in job.live.values() if b.state is State.ASSIGNED and not b.suspect and not b.speculated]
        assert set(map(id, job.flying.values())) == set(map(id, flying))
        assert all(job.flying[start] is batch for start, batch in job.flying.items() if batch.start == start)
        started = [b.assigned_at for b in job.flying.values()]
        assert started == sorted(started)  # oldest first, which _speculate relies on


@pytest.mark.parametrize("seed, max_losses", [(20240607, 100), (7, 100), (31337, 3)])
def test_random_operations_account_for_every_task_exactly_once(seed: int, max_losses: int) -> None:
    """Random joins, losses, results, crashes, hand-backs and duplicates never lose or double-count a task.

    With max_task_losses=100 nothing fails as poison; with 3, poison failures are counted as the tasks' outcome.
    """
    rng = random.Random(seed)
    clock = FakeClock()
    s = Scheduler(clock, heartbeat_timeout=5.0, max_task_losses=max_losses)
    envs = [ENV, OTHER_ENV]
    jobs = [s.add_job(envs[i % 2]) for i in range(3)]
    next_start = {job.id: 0 for job in jobs}
    accepted: Counter[tuple[int, int]] = Counter()
    failed: Counter[tuple[int, int]] = Counter()
    sent: list[tuple[str, tuple[int, int, int]]] = []  # every (worker, batch key) ever assigned
    seen: dict[int, Batch] = {}
    names = [f"w{i}" for i in range(8)]

    def add_batch(job_id: int) -> None:
        start = next_start[job_id]
        count = rng.randint(1, 4)
        batch = add(s, job_id, start, count)
        seen[id(batch)] = batch
        next_start[job_id] += count

    def record(result: Completion | Failure | None, into: Counter) -> None:
        if result is not None:
            for i in range(result.batch.start, result.batch.start + result.batch.count):
                into[(result.batch.job_id, i)] += 1

    def dispatch() -> None:
        for a in s.dispatch():
            b = a.batch
            seen[id(b)] = b
            assert pickle.loads(b.payload.data) == [(b.job_id, i) for i in range(b.start, b.start + b.count)]
            assert s.workers[a.worker_id].env == s.jobs[b.job_id].env
            sent.append((a.worker_id, b.key))

    def random_held() -> tuple[str, Batch] | None:
        busy = [w for w in s.workers.values() if w.batches]
        if not busy:
            return None
        w = rng.choice(busy)
        return w.id, rng.choice(list(w.batches.values()))

    for job in jobs:
        for _ in range(3):
            add_batch(job.id)

    for step in range(2000):
        clock.now += rng.random()
        op = rng.random()
        if op < 0.10:
            free_names = [n for n in names if n not in s.workers]
            if free_names:
                s.add_worker(rng.choice(free_names), rng.randint(1, 3), rng.choice(envs + ["py3.8/none"]))
        elif op < 0.16 and s.workers:
            for f in s.remove_worker(rng.choice(list(s.workers)), lost=True):
                record(f, failed)
        elif op < 0.20 and s.workers:
            assert s.remove_worker(rng.choice(list(s.workers)), lost=False) == []
        elif op < 0.50:
            if (pick := random_held()) is not None:
                result = s.complete(pick[0], *pick[1].key)
                assert result is not None  # a holder's result is always accepted
                record(result, accepted)
        elif op < 0.56:
            if (pick := random_held()) is not None:
                record(s.crashed(pick[0], *pick[1].key, reason="crash"), failed)
        elif op < 0.62:
            if (pick := random_held()) is not None:
                s.hand_back(pick[0], *pick[1].key)
        elif op < 0.72 and sent:
            worker_id, key = rng.choice(sent)  # duplicate or stale result; may legitimately win
            record(s.complete(worker_id, *key), accepted)
        elif op < 0.80:
            for w in list(s.workers.values()):
                if rng.random() < 0.7:
                    s.touch(w.id)
            for worker_id in s.expired():
                for f in s.remove_worker(worker_id, lost=True):
                    record(f, failed)
        elif step < 1500:
            add_batch(rng.choice(jobs).id)
        dispatch()
        _check_invariants(s)

    for job in jobs:
        s.close_input(job.id)
    for env in envs:
        s.add_worker(f"stable-{env}", 2, env)
    for _ in range(10_000):
        if all(job.finished for job in jobs):
            break
        dispatch()
        for w in list(s.workers.values()):
            for batch in list(w.batches.values()):
                record(s.complete(w.id, *batch.key), accepted)
        _check_invariants(s)
    assert all(job.finished for job in jobs)

    expected = {(job.id, i) for job in jobs for i in range(next_start[job.id])}
    assert set(accepted) | set(failed) == expected
    assert not set(accepted) & set(failed)
    assert all(n == 1 for n in accepted.values()) and all(n == 1 for n in failed.values())
    for job in jobs:
        assert job.live == {} and not job.has_queued
        assert job.tasks_done + job.tasks_failed == job.tasks_total == next_start[job.id]
    assert all(not w.batches for w in s.workers.values())
    assert all(b.state in TERMINAL for b in seen.values())
    # the interesting paths were exercised
    assert s.duplicates_dropped > 0 and s.workers_lost > 0
    assert any(b.state is State.SPLIT for b in seen.values())
    if max_losses >= 100:
        assert not failed
    else:
        assert failed and all(b.count == 1 for b in seen.values() if b.state is State.FAILED)
