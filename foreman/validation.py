"""Results a project can trust from strangers: comparing the replicas of a batch, task by task.

A job with ``redundancy`` > 1 (or ``spot_check`` > 0) runs each batch on several workers. Each copy's results are
a *candidate*. :func:`decide` looks at the candidates of one batch and says, per task, which outcome is accepted:

- two outcomes *agree* when both are values and the job's ``comparator(a, b)`` says so (default: same type and
  ``==``, or failing that the same pickled bytes, so NaN agrees with NaN and numpy arrays compare whole), or both
  are errors of the same type and message;
- in a spot-checked batch, the trusted worker's outcome is accepted as it is, and the others must agree with it (the verdict
  waits for copies still running, so that they are checked too);
- otherwise an outcome given by ``quorum`` candidates is accepted.

When a task has no accepted outcome and no copy is still running, another replica is asked for, up to
``max_replicas``; after that the task fails with :class:`~foreman.errors.ValidationError` carrying every candidate.
A candidate agrees with the verdict when it gave the accepted outcome for every decided task; this feeds
:mod:`foreman.reputation`. No I/O: the server feeds candidates in and acts on the :class:`Verdict`.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from foreman.errors import ValidationError
from foreman.serialization import ErrorEntry, rebuild_exception

log = logging.getLogger("crowdcompute.foreman")


@dataclass(frozen=True)
class Policy:
    """A job's validation settings (built and checked by :class:`~foreman.jobs.JobOptions`)."""

    redundancy: int
    quorum: int
    max_replicas: int  # copies in all, not counting a spot check's
    comparator: Callable[[Any, Any], bool] | None = None
    spot_check: float = 0.0


@dataclass(eq=False)
class Candidate:
    """One worker's results for a batch, loaded with the job's loader."""

    worker: str
    results: list[Any]
    errors: dict[int, ErrorEntry]
    trusted: bool = False

    def outcome(self, offset: int) -> tuple[bool, Any]:
        """(failed, value or error entry) of one task of the batch."""
        if offset in self.errors:
            return True, self.errors[offset]
        return False, self.results[offset]


@dataclass(eq=False)
class Verdict:
    """What to do with a batch now.

    ``accepted`` maps task offsets to their accepted candidate; ``failed`` maps offsets to the error to raise.
    ``more`` is how many further replicas to run. ``finished`` means the batch is settled (accepted and failed
    together cover it); then ``agreed`` and ``disagreed`` say which workers' candidates matched the verdict.
    """

    accepted: dict[int, Candidate] = field(default_factory=dict)
    failed: dict[int, ValidationError] = field(default_factory=dict)
    more: int = 0
    finished: bool = False
    agreed: list[str] = field(default_factory=list)
    disagreed: list[str] = field(default_factory=list)


def same(a: Any, b: Any) -> bool:
    """The default comparison: same type and ``==``, else the same pickled bytes."""
    if type(a) is not type(b):
        return False
    try:
        if a == b:
            return True
    except BaseException:  # noqa: BLE001 - numpy arrays refuse bool(); a user __eq__ may raise anything
        pass
    try:
        return pickle.dumps(a) == pickle.dumps(b)
    except BaseException:  # noqa: BLE001 - on the event loop: no user object may stop it
        return False


def _agree(x: tuple[bool, Any], y: tuple[bool, Any], comparator: Callable[[Any, Any], bool]) -> bool:
    (x_failed, x_value), (y_failed, y_value) = x, y
    if x_failed or y_failed:
        return x_failed and y_failed and tuple(x_value[1:3]) == tuple(y_value[1:3])
    try:
        return bool(comparator(x_value, y_value))
    except BaseException:  # noqa: BLE001 - on the event loop: no user code may stop it
        log.exception("the job's comparator raised; the two results count as disagreeing")
        return False


def decide(policy: Policy, candidates: list[Candidate], count: int, outstanding: int, running: int,
           spot_checked: bool, start: int, trusted_loads: bool) -> Verdict:
    """The verdict on a batch of ``count`` tasks (the first is task ``start``) from its ``candidates``, with
    ``outstanding`` copies still to answer, ``running`` of them on a worker now. ``trusted_loads`` rebuilds
    candidates' errors with full pickle (see :func:`~foreman.serialization.rebuild_exception`)."""
    comparator = policy.comparator or same
    verdict = Verdict()
    trusted = [c for c in candidates if c.trusted] if spot_checked else []  # else a trusted copy is one vote
    if spot_checked and (running if trusted else outstanding):
        return verdict  # the trusted copy decides: wait for it, and for the copies it checks
    undecided: list[int] = []
    missing = 0
    for offset in range(count):
        winner = _winner(candidates, trusted, offset, policy.quorum, comparator)
        if winner is not None:
            verdict.accepted[offset] = winner
            continue
        undecided.append(offset)
        best = max(sum(_agree(c.outcome(offset), d.outcome(offset), comparator) for d in candidates)
                   for c in candidates)
        missing = max(missing, policy.quorum - best)
    if undecided:
        if outstanding:
            return Verdict()  # wait for the copies still running
        room = policy.max_replicas + spot_checked - len(candidates)
        if room > 0:
            return Verdict(more=min(missing, room))
        for offset in undecided:
            verdict.failed[offset] = _failure(start + offset, offset, candidates, trusted_loads)
    verdict.finished = True
    for candidate in candidates:
        matches = all(_agree(candidate.outcome(o), winner.outcome(o), comparator) for o, winner in
                      verdict.accepted.items())
        if verdict.accepted:
            (verdict.agreed if matches else verdict.disagreed).append(candidate.worker)
    return verdict


def _winner(candidates: list[Candidate], trusted: list[Candidate], offset: int, quorum: int,
            comparator: Callable[[Any, Any], bool]) -> Candidate | None:
    if trusted:
        return trusted[0]
    for candidate in candidates:
        mine = candidate.outcome(offset)
        if sum(_agree(mine, other.outcome(offset), comparator) for other in candidates) >= quorum:
            return candidate
    return None


def _failure(task: int, offset: int, candidates: list[Candidate], trusted_loads: bool) -> ValidationError:
    given: list[tuple[str, object]] = []
    for candidate in candidates:
        failed, value = candidate.outcome(offset)
        given.append((candidate.worker, rebuild_exception(value, trusted_loads) if failed else value))
    shown = ", ".join(f"{worker}: {value!r}"[:80] for worker, value in given)
    return ValidationError(f"task {task}: {len(candidates)} replicas did not reach a quorum ({shown})", task, given)
