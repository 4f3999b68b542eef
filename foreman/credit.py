"""Credit: what each worker, and each volunteer, contributed.

A volunteer is the principal whose token a worker joined with (the name in the token file's ``[workers]`` or
``[trusted_workers]`` table; ``admin`` for the foreman's own token, ``worker`` for the worker token a foreman without one made up, ``local``
for an embedded foreman's local workers). Credit is given for result batches the foreman *used*: accepted
results, and replicas that agreed with the accepted ones. Replicas that disagreed earn nothing.

- ``tasks``: tasks in those batches;
- ``cpu_seconds``: CPU time the task process spent on them (user + system, measured on the worker);
- ``gpu_seconds``: for jobs that ask for a GPU (``requires={"gpu"}``/``{"cuda"}`` or a ``gpu`` resource) run on a
  worker with GPUs, the batch's wall-clock time times the worker's GPU count;
- ``validated``: tasks whose result was checked against another worker's (redundancy or spot check) and agreed.

No I/O; :meth:`Ledger.snapshot` / :meth:`Ledger.restore` carry it across foreman restarts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class Contribution:
    tasks: int = 0
    cpu_seconds: float = 0.0
    gpu_seconds: float = 0.0
    validated: int = 0

    def add(self, tasks: int, cpu_seconds: float, gpu_seconds: float, validated: int) -> None:
        self.tasks += tasks
        self.cpu_seconds += cpu_seconds
        self.gpu_seconds += gpu_seconds
        self.validated += validated


class Ledger:
    """Contributions by worker id and by volunteer name."""

    def __init__(self) -> None:
        self.workers: dict[str, Contribution] = {}
        self.volunteers: dict[str, Contribution] = {}
        self.volunteer_of: dict[str, str] = {}  # worker id -> volunteer name

    def credit(self, worker_id: str, volunteer: str, tasks: int, cpu_seconds: float, gpu_seconds: float = 0.0,
               validated: int = 0) -> None:
        self.volunteer_of[worker_id] = volunteer
        for table, key in ((self.workers, worker_id), (self.volunteers, volunteer)):
            table.setdefault(key, Contribution()).add(tasks, cpu_seconds, gpu_seconds, validated)

    def leaderboard(self, limit: int | None = None) -> dict[str, list[dict[str, Any]]]:
        """Volunteers and workers, most validated results first, then most tasks."""

        def ranked(table: dict[str, Contribution], key: str) -> list[dict[str, Any]]:
            rows = sorted(table.items(), key=lambda item: (-item[1].validated, -item[1].tasks, item[0]))[:limit]
            out = []
            for name, c in rows:
                row = {key: name, "tasks": c.tasks, "cpu_seconds": round(c.cpu_seconds, 3),
                       "gpu_seconds": round(c.gpu_seconds, 3), "validated": c.validated}
                if key == "worker":
                    row["volunteer"] = self.volunteer_of.get(name)
                out.append(row)
            return out

        return {"volunteers": ranked(self.volunteers, "volunteer"), "workers": ranked(self.workers, "worker")}

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state, for :meth:`restore`."""
        return {"workers": {k: asdict(v) for k, v in self.workers.items()},
                "volunteers": {k: asdict(v) for k, v in self.volunteers.items()},
                "volunteer_of": dict(self.volunteer_of)}

    def restore(self, state: dict[str, Any]) -> None:
        self.workers = {k: Contribution(**v) for k, v in state["workers"].items()}
        self.volunteers = {k: Contribution(**v) for k, v in state["volunteers"].items()}
        self.volunteer_of = dict(state["volunteer_of"])
