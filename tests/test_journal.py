"""The scheduler's parts for a standalone foreman (owners, journaled ids, adoption after a restart) and the
SQLite journal, driven directly: a fake clock, temporary database files, no sockets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from foreman.journal import Journal, Output
from foreman.scheduler import Scheduler, State
from test_scheduler import ENV, FakeClock, add_many

# -- scheduler -----------------------------------------------------------------------------------------------------


def test_owners_share_workers_round_robin_not_jobs() -> None:
    """alice's three jobs and bob's one: bob gets every other batch, not one in four."""
    s = Scheduler(FakeClock(), prefetch=0)
    s.add_worker("w", slots=8, env=ENV)
    alice = [s.add_job(ENV, owner="alice") for _ in range(3)]
    bob = s.add_job(ENV, owner="bob")
    for job in [*alice, bob]:
        add_many(s, job.id, 10)
    owners = Counter(s.jobs[a.batch.job_id].owner for a in s.dispatch())
    assert owners == {"alice": 4, "bob": 4}


def test_journaled_job_ids_are_kept_and_never_reused() -> None:
    s = Scheduler(FakeClock())
    s.skip_job_ids(41)
    assert s.add_job(ENV).id == 42
    assert s.add_job(ENV, job_id=7).id == 7
    assert s.add_job(ENV).id == 43
    with pytest.raises(ValueError, match="exists"):
        s.add_job(ENV, job_id=7)


def test_held_job_waits_then_runs() -> None:
    clock = FakeClock(100.0)
    s = Scheduler(clock)
    s.add_worker("w", slots=1, env=ENV)
    job = s.add_job(ENV, held_until=110.0)
    add_many(s, job.id, 2)
    assert s.dispatch() == []
    clock.now = 111.0
    assert [a.batch.start for a in s.dispatch()] == [0, 1]


def test_adopted_batch_is_in_flight_on_its_worker_and_its_result_accepted() -> None:
    """A worker back after a restart still runs batch 1: it is not queued for anyone else, its result is
    taken, and the job's function is shipped again before any new batch (the worker forgot it)."""
    s = Scheduler(FakeClock())
    job = s.add_job(ENV, held_until=1e9)
    batches = add_many(s, job.id, 3)
    s.add_worker("w", slots=1, env=ENV)
    assert s.adopt("w", job.id, 1, 1)
    assert not s.adopt("w", job.id, 1, 1)  # already in flight
    assert not s.adopt("w", job.id, 5, 1)  # no such batch
    assert batches[1].state is State.ASSIGNED and batches[1].holders == {"w"}
    s.jobs[job.id].held_until = 0.0
    assignments = s.dispatch()
    assert [a.batch.start for a in assignments] == [0]
    assert assignments[0].ship_function
    assert s.complete("w", job.id, 1, 1) is not None


# -- journal -------------------------------------------------------------------------------------------------------


def test_journal_keeps_jobs_inputs_and_outputs_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    journal = Journal(path)
    session = journal.session()
    journal.add_job(5, "alice", "square", "d1", "one", b"fn", {"priority": 1}, 3, detached=True)
    journal.add_input(5, 0, 2, b"in-0")
    journal.add_input(5, 2, 1, b"in-2")
    journal.add_output(Output(5, 1, 0, 2, "ok", b"out-0", None, 0.5, "w1"))
    journal.worker_joined("w1", "w", "127.0.0.1:5")
    journal.close()

    again = Journal(path)
    assert again.session() == session and again.last_job_id() == 5
    row = again.job(5)
    assert row is not None
    assert (row.fed, row.tasks_done, row.next_seq, row.options, row.detached) == (3, 2, 2, {"priority": 1}, True)
    assert again.inputs(5) == [(2, 1, b"in-2")]  # the answered input is gone
    assert [o.payload for o in again.outputs(5)] == [b"out-0"]
    assert again.connected_workers() == {"w1"}


def test_in_memory_journal_gets_a_new_session_each_time() -> None:
    assert Journal().session() != Journal().session()
    assert not Journal().persistent


def test_acknowledged_outputs_are_dropped_unless_detached(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite")
    for job_id, detached in ((1, False), (2, True)):
        journal.add_job(job_id, "alice", "f", "d", "one", b"", {}, None, detached)
        for seq in (1, 2, 3):
            journal.add_output(Output(job_id, seq, seq, 1, "ok", b"x", None, 0.0, "w"))
        journal.acknowledge(job_id, 2)
    assert [o.seq for o in journal.outputs(1)] == [3]
    assert [o.seq for o in journal.outputs(2)] == [1, 2, 3]


def test_purge_follows_retention(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j.sqlite", retention=100.0)
    journal.add_job(1, "alice", "f", "d", "one", b"", {}, 1, detached=True)
    journal.add_job(2, "alice", "f", "d", "one", b"", {}, 1, detached=False)
    journal.add_job(3, "alice", "f", "d", "one", b"", {}, 1, detached=False)
    journal.add_output(Output(3, 1, 0, 1, "ok", b"x", None, 0.0, "w"))  # not acknowledged yet
    for job_id in (1, 2, 3):
        journal.finish_job(job_id, "done")
    now = journal.job(1).finished  # type: ignore[union-attr]
    assert journal.purge(now + 61) == [2]  # a client's job, all results acknowledged
    assert journal.purge(now + 101) == [1, 3]
    assert journal.jobs() == []


def test_a_failed_write_leaves_nothing_half_done(tmp_path: Path) -> None:
    """add_output is one transaction: a duplicate sequence number changes nothing, inputs included."""
    journal = Journal(tmp_path / "j.sqlite")
    journal.add_job(1, "alice", "f", "d", "one", b"", {}, 2, detached=False)
    journal.add_input(1, 0, 1, b"a")
    journal.add_input(1, 1, 1, b"b")
    journal.add_output(Output(1, 1, 0, 1, "ok", b"x", None, 0.0, "w"))
    with pytest.raises(Exception, match="UNIQUE"):
        journal.add_output(Output(1, 1, 1, 1, "ok", b"y", None, 0.0, "w"))
    assert journal.inputs(1) == [(1, 1, b"b")]
    assert journal.job(1).tasks_done == 1  # type: ignore[union-attr]
