"""Replicas, verdicts, reputation and credit as units: the scheduler with a fake clock, and the pure modules."""

from __future__ import annotations

import json
import math
import pickle
import random

import pytest

from foreman.credit import Ledger
from foreman.errors import ValidationError
from foreman.jobs import JobOptions
from foreman.reputation import Reputation
from foreman.scheduler import Scheduler, State
from foreman.serialization import Pickled, error_entry
from foreman.validation import Candidate, Policy, decide, same

ENV = "env"


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def replicated(copies: int = 2, spot_check: float = 0.0, batches: int = 1) -> tuple[Scheduler, int]:
    scheduler = Scheduler(FakeClock(), speculation=None, rng=random.Random(1))
    job = scheduler.add_job(ENV, copies=copies, spot_check=spot_check)
    for start in range(batches):
        scheduler.add_batch(job.id, start, 1, Pickled(pickle.dumps([start])))
    return scheduler, job.id


# -- scheduler ------------------------------------------------------------------------------------------------


def test_copies_go_to_distinct_hosts_while_there_are_enough() -> None:
    scheduler, _ = replicated(batches=2)
    scheduler.add_worker("a1", 2, ENV, host="hostA")
    scheduler.add_worker("a2", 2, ENV, host="hostA")
    scheduler.add_worker("b1", 2, ENV, host="hostB")
    hosts: dict[int, set[str]] = {}
    for assignment in scheduler.dispatch():
        hosts.setdefault(assignment.batch.start, set()).add(assignment.worker_id[0])
    assert hosts == {0: {"a", "b"}, 1: {"a", "b"}}  # never both copies on host A


def test_with_fewer_hosts_than_copies_distinct_workers_suffice() -> None:
    scheduler, _ = replicated(copies=2)
    scheduler.add_worker("a1", 2, ENV, host="hostA")
    scheduler.add_worker("a2", 2, ENV, host="hostA")
    assert sorted(a.worker_id for a in scheduler.dispatch()) == ["a1", "a2"]


def test_answers_wait_for_the_verdict_and_disagreement_asks_for_a_third_copy() -> None:
    scheduler, job_id = replicated(copies=2)
    for name in ("a", "b", "c"):
        scheduler.add_worker(name, 1, ENV)
    first, second = scheduler.dispatch()
    batch = first.batch
    assert scheduler.answer(first.worker_id, job_id, 0, 1) is batch
    assert batch.state is State.ASSIGNED and not scheduler.jobs[job_id].finished
    assert scheduler.answer(first.worker_id, job_id, 0, 1) is None  # a second answer from the same worker
    assert scheduler.answer(second.worker_id, job_id, 0, 1) is batch
    scheduler.add_copies(batch, 1)  # the caller found the two answers disagreeing
    (third,) = scheduler.dispatch()
    assert third.worker_id not in (first.worker_id, second.worker_id)  # the third worker
    assert third.batch is batch and scheduler.replicas_added == 1
    scheduler.answer(third.worker_id, job_id, 0, 1)
    done = scheduler.settle(batch)
    assert batch.state is State.DONE and done.cancel_on == () and scheduler.jobs[job_id].tasks_done == 1


def test_a_lost_copy_is_placed_again_and_the_answer_is_kept() -> None:
    scheduler, job_id = replicated(copies=2)
    for name in ("a", "b", "c"):
        scheduler.add_worker(name, 1, ENV)
    first, second = scheduler.dispatch()
    scheduler.answer(first.worker_id, job_id, 0, 1)
    assert scheduler.remove_worker(second.worker_id, lost=True) == []
    (again,) = scheduler.dispatch()
    assert again.worker_id not in (first.worker_id, second.worker_id)  # the worker that had no copy
    assert again.batch.answered == {first.worker_id}


def test_a_spot_check_keeps_its_last_copy_for_a_trusted_worker() -> None:
    scheduler, _ = replicated(copies=1, spot_check=1.0)
    scheduler.add_worker("stranger1", 1, ENV)
    scheduler.add_worker("stranger2", 1, ENV)
    (first,) = scheduler.dispatch()  # the other stranger may not take the trusted copy
    assert first.batch.spot_check and first.batch.copies == 2
    scheduler.add_worker("lab", 1, ENV, trusted=True)
    (check,) = scheduler.dispatch()
    assert check.worker_id == "lab"


def test_a_barred_worker_gets_no_work_and_hands_back_what_it_held() -> None:
    scheduler, _ = replicated(copies=1, batches=3)
    scheduler.add_worker("mallory", 2, ENV)
    held = scheduler.dispatch()
    assert len(held) == 3  # 2 slots + 2 prefetch
    returned = scheduler.bar("mallory", "banned")
    assert len(returned) == 3 and all(b.state is State.QUEUED for b in returned)
    assert scheduler.dispatch() == []
    scheduler.add_worker("honest", 1, ENV)
    assert {a.worker_id for a in scheduler.dispatch()} == {"honest"}
    scheduler.unbar("mallory")
    assert {a.worker_id for a in scheduler.dispatch()} == {"mallory"}


def test_a_worker_that_joins_barred_gets_nothing() -> None:
    scheduler, _ = replicated(copies=1)
    scheduler.add_worker("mallory", 1, ENV, barred="banned by the operator")
    assert scheduler.dispatch() == []


# -- verdicts -------------------------------------------------------------------------------------------------

POLICY = Policy(redundancy=2, quorum=2, max_replicas=3)


def candidate(worker: str, *values: object, trusted: bool = False, errors: dict | None = None) -> Candidate:
    return Candidate(worker, list(values), errors or {}, trusted)


def test_two_agreeing_replicas_are_accepted() -> None:
    verdict = decide(POLICY, [candidate("a", 1, 4), candidate("b", 1, 4)], 2, 0, 0, False, 0, True)
    assert verdict.finished and set(verdict.accepted) == {0, 1} and verdict.agreed == ["a", "b"]


def test_the_first_replica_waits_for_the_second() -> None:
    verdict = decide(POLICY, [candidate("a", 1)], 1, 1, 1, False, 0, True)
    assert not verdict.finished and verdict.more == 0


def test_disagreement_asks_for_one_more_then_the_majority_wins() -> None:
    assert decide(POLICY, [candidate("a", 1), candidate("b", 2)], 1, 0, 0, False, 0, True).more == 1
    verdict = decide(POLICY, [candidate("a", 1), candidate("b", 2), candidate("c", 1)], 1, 0, 0, False, 0, True)
    assert verdict.finished and verdict.accepted[0].results == [1]
    assert verdict.agreed == ["a", "c"] and verdict.disagreed == ["b"]


def test_no_quorum_within_max_replicas_fails_the_task_with_every_candidate() -> None:
    candidates = [candidate("a", 1, 7), candidate("b", 2, 7), candidate("c", 3, 7)]
    verdict = decide(POLICY, candidates, 2, 0, 0, False, 10, True)
    assert verdict.finished and set(verdict.accepted) == {1}
    error = verdict.failed[0]
    assert isinstance(error, ValidationError) and error.task == 10
    assert error.candidates == [("a", 1), ("b", 2), ("c", 3)]
    assert "task 10: 3 replicas did not reach a quorum" in str(error)
    assert pickle.loads(pickle.dumps(error)).candidates == error.candidates


def test_a_comparator_decides_agreement_of_floats() -> None:
    close = Policy(2, 2, 3, comparator=lambda a, b: math.isclose(a, b, rel_tol=1e-9))
    floats = [candidate("a", 0.1 + 0.2), candidate("b", 0.3)]
    assert decide(close, floats, 1, 0, 0, False, 0, True).finished
    assert decide(POLICY, floats, 1, 0, 0, False, 0, True).more == 1


def test_errors_agree_when_type_and_message_match() -> None:
    failing = {0: error_entry(ValueError("bad"))}
    verdict = decide(POLICY, [candidate("a", None, errors=failing), candidate("b", None, errors=dict(failing))],
                     1, 0, 0, False, 0, True)
    assert verdict.finished and 0 in verdict.accepted[0].errors
    assert decide(POLICY, [candidate("a", None, errors=failing), candidate("b", 5)], 1, 0, 0, False, 0, True).more


def test_a_trusted_result_is_the_reference_of_a_spot_check() -> None:
    single = Policy(1, 1, 3, spot_check=1.0)
    assert not decide(single, [candidate("s", 9)], 1, 1, 0, True, 0, True).finished  # waits for the trusted copy
    checking = [candidate("lab", 4, trusted=True)]
    assert not decide(single, checking, 1, 1, 1, True, 0, True).finished  # and for the copy it checks
    assert decide(single, checking, 1, 1, 0, True, 0, True).finished  # unless that copy has no worker now
    verdict = decide(single, [candidate("s", 9), candidate("lab", 4, trusted=True)], 1, 0, 0, True, 0, True)
    assert verdict.accepted[0].worker == "lab" and verdict.disagreed == ["s"]
    outside = decide(POLICY, [candidate("lab", 4, trusted=True)], 1, 1, 1, False, 0, True)
    assert not outside.finished  # outside a spot check, a trusted copy is one vote of the quorum


def test_same_handles_nan_type_and_arrays() -> None:
    assert same(float("nan"), float("nan")) and not same(1, 1.0) and same([1, "a"], [1, "a"])
    numpy = pytest.importorskip("numpy")
    assert same(numpy.arange(3), numpy.arange(3)) and not same(numpy.arange(3), numpy.arange(1, 4))


def test_job_options_check_their_values() -> None:
    assert JobOptions().validation() is None
    policy = JobOptions(redundancy=3, quorum=2).validation()
    assert (policy.redundancy, policy.quorum, policy.max_replicas) == (3, 2, 5)
    for bad, message in [({"redundancy": 0}, "redundancy"), ({"redundancy": 2, "quorum": 3}, "quorum"),
                         ({"redundancy": 2, "max_replicas": 1}, "max_replicas"), ({"spot_check": 1.5}, "spot_check"),
                         ({"comparator": 3}, "comparator")]:
        with pytest.raises((ValueError, TypeError), match=message):
            JobOptions(**bad)


# -- reputation and credit ------------------------------------------------------------------------------------


def test_quarantine_after_enough_checks_below_the_threshold() -> None:
    reputation = Reputation(min_checks=4, threshold=0.5)
    reputation.agreed("w")
    assert not reputation.disagreed("w") and not reputation.disagreed("w")  # 3 checks: too few to judge
    assert reputation.disagreed("w")  # 1 of 4 agreed
    assert "quarantined: 1 of 4" in reputation.barred("w")
    for _ in range(5):
        assert not reputation.disagreed("lab", trusted=True)
    assert reputation.barred("lab") == ""
    assert reputation.unban("w") and reputation.barred("w") == "" and not reputation.unban("w")


def test_reputation_and_ledger_survive_a_snapshot_round_trip() -> None:
    reputation = Reputation()
    reputation.agreed("a")
    reputation.error("b")
    reputation.ban("c", "banned by the operator")
    copy = Reputation()
    copy.restore(json.loads(json.dumps(reputation.snapshot())))
    assert copy.snapshot() == reputation.snapshot() and copy.barred("c") == "banned by the operator"

    ledger = Ledger()
    ledger.credit("w1", "alice", 10, 2.5, 0.0, 10)
    ledger.credit("w2", "alice", 5, 1.0, 3.0, 0)
    ledger.credit("w3", "bob", 7, 0.5)
    restored = Ledger()
    restored.restore(json.loads(json.dumps(ledger.snapshot())))
    assert restored.leaderboard() == ledger.leaderboard()
    board = ledger.leaderboard()
    assert board["volunteers"][0] == {"volunteer": "alice", "tasks": 15, "cpu_seconds": 3.5, "gpu_seconds": 3.0,
                                      "validated": 10}
    assert [row["worker"] for row in board["workers"]] == ["w1", "w3", "w2"]
