"""Per-worker reputation: how often a worker's checked results agreed, disagreed, or could not be used.

A *check* is one batch of a validated job (``redundancy`` or ``spot_check``) whose verdict was reached with this
worker's results among the candidates: it counts as an agreement when the worker gave the accepted outcome for
every task, else as a disagreement. An *error* is a result batch that could not be used (its task process
crashed, or its bytes would not load). A worker with at least ``min_checks`` checks whose score
(agreements / (agreements + disagreements + errors)) falls below ``threshold`` is quarantined: it stays
connected but gets no work. Workers the operator marked trusted are never quarantined. An operator may ban any
worker (by id) and unban it; unbanning also lifts a quarantine. No I/O: the server asks and acts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: Checks a worker must have had before it can be quarantined: one unlucky disagreement is not enough.
MIN_CHECKS = 4
#: Score below which a worker is quarantined.
THRESHOLD = 0.5


@dataclass
class Record:
    agreements: int = 0
    disagreements: int = 0
    errors: int = 0
    quarantined: bool = False
    banned: bool = False
    reason: str = ""

    @property
    def score(self) -> float | None:
        checks = self.agreements + self.disagreements + self.errors
        return self.agreements / checks if checks else None

    @property
    def state(self) -> str:
        return "banned" if self.banned else "quarantined" if self.quarantined else "ok"


class Reputation:
    """Reputation records by worker id.

    :param min_checks: checks (agreements, disagreements and errors) before a worker may be quarantined.
    :param threshold: a worker whose score falls below this is quarantined.
    """

    def __init__(self, min_checks: int = MIN_CHECKS, threshold: float = THRESHOLD) -> None:
        if min_checks < 1 or not 0.0 <= threshold <= 1.0:
            raise ValueError("need min_checks >= 1 and 0 <= threshold <= 1")
        self.min_checks = min_checks
        self.threshold = threshold
        self.records: dict[str, Record] = {}

    def get(self, worker_id: str) -> Record:
        return self.records.setdefault(worker_id, Record())

    def barred(self, worker_id: str) -> str:
        """Why this worker gets no work ("" if it may work)."""
        record = self.records.get(worker_id)
        return record.reason if record is not None and (record.banned or record.quarantined) else ""

    def agreed(self, worker_id: str) -> None:
        self.get(worker_id).agreements += 1

    def disagreed(self, worker_id: str, trusted: bool = False) -> bool:
        """Count a disagreement; True if the worker is quarantined by it."""
        self.get(worker_id).disagreements += 1
        return self._judge(worker_id, trusted)

    def error(self, worker_id: str, trusted: bool = False) -> bool:
        """Count an unusable result; True if the worker is quarantined by it."""
        self.get(worker_id).errors += 1
        return self._judge(worker_id, trusted)

    def ban(self, worker_id: str, reason: str) -> None:
        record = self.get(worker_id)
        record.banned, record.reason = True, reason

    def unban(self, worker_id: str) -> bool:
        """Lift a ban or quarantine; False if the worker had neither."""
        record = self.records.get(worker_id)
        if record is None or not (record.banned or record.quarantined):
            return False
        record.banned = record.quarantined = False
        record.reason = ""
        return True

    def _judge(self, worker_id: str, trusted: bool) -> bool:
        record = self.records[worker_id]
        score = record.score
        checks = record.agreements + record.disagreements + record.errors
        if trusted or record.banned or record.quarantined or checks < self.min_checks or score is None \
                or score >= self.threshold:
            return False
        record.quarantined = True
        record.reason = (f"quarantined: {record.agreements} of {checks} checked results agreed "
                         f"(below {self.threshold:.0%})")
        return True

    def to_json(self, worker_id: str) -> dict[str, Any]:
        record = self.records.get(worker_id) or Record()
        score = record.score
        return {**asdict(record), "score": None if score is None else round(score, 3), "state": record.state}

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state, for :meth:`restore`."""
        return {"records": {worker_id: asdict(record) for worker_id, record in self.records.items()}}

    def restore(self, state: dict[str, Any]) -> None:
        self.records = {worker_id: Record(**fields) for worker_id, fields in state["records"].items()}
