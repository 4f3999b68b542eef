"""A bounded record of the batches a worker finished, for its dashboard."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from worker.executor import Outcome

#: Batches remembered. Each record is a few hundred bytes, so the history stays under about 100 KB.
HISTORY_SIZE = 200


@dataclass(frozen=True)
class BatchRecord:
    """One finished batch: what ran, how long it took, and how it ended."""

    job: int
    start: int
    count: int
    status: str  # a RESULTS status: ok, crashed, returned or cancelled
    failed: int  # tasks that raised
    duration: float  # seconds
    error: str  # why the batch crashed or was stopped, else the first failed task's "Type: message"
    finished: float  # wall-clock time

    @classmethod
    def of(cls, outcome: Outcome) -> BatchRecord:
        error = outcome.error
        if not error and outcome.errors:
            _, type_name, message = outcome.errors[0]
            error = f"{type_name}: {message}" if message else type_name
        item = outcome.item
        return cls(item.job_id, item.start, item.count, outcome.status, outcome.failed, outcome.elapsed, error,
                   time.time())

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "started": self.finished - self.duration}


class BatchHistory:
    """The last :data:`HISTORY_SIZE` finished batches, newest last."""

    def __init__(self, size: int = HISTORY_SIZE) -> None:
        self._records: deque[BatchRecord] = deque(maxlen=size)

    def add(self, outcome: Outcome) -> None:
        self._records.append(BatchRecord.of(outcome))

    def recent(self, n: int | None = None) -> list[BatchRecord]:
        """The ``n`` most recent records (all when None), newest first."""
        records = list(self._records)[::-1]
        return records if n is None else records[:n]
