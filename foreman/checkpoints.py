"""The foreman's store of tasks' latest checkpoints, within a documented bound.

A worker running a task may send its progress (CHECKPOINT); if the worker is lost, the task's next run, on
another worker, resumes from it. A checkpoint is a pickle that the next worker's task process loads with full
pickle, so only a worker the foreman trusts (``trust_workers``, or a ``[trusted_workers]`` token, or its own local
workers) may have one kept and relayed: the server checks that before :meth:`Checkpoints.keep`. Memory is bounded
twice: at most ``per_worker`` bytes of checkpoints sent by one worker are held, and ``total`` bytes in all; a
checkpoint past either bound is dropped (the task then resumes from its previous checkpoint, or from scratch).
"""

from __future__ import annotations

#: Bytes of checkpoints one worker's tasks may have held at once: about 16 tasks at the 1 MiB limit per
#: checkpoint (``protocol.MAX_CHECKPOINT_SIZE``), many more for the small states checkpoints usually are.
MAX_CHECKPOINT_BYTES_PER_WORKER = 16 * 1024 * 1024
#: Bytes of checkpoints held by the foreman in all.
MAX_CHECKPOINT_BYTES = 256 * 1024 * 1024


class Checkpoints:
    """Latest checkpoint per task in flight: job -> task -> pickled state, with who sent it and its bytes."""

    def __init__(self, per_worker: int = MAX_CHECKPOINT_BYTES_PER_WORKER, total: int = MAX_CHECKPOINT_BYTES) -> None:
        self.per_worker = per_worker
        self.total = total
        self.held = 0  # bytes in all
        self._by_job: dict[int, dict[int, bytes]] = {}
        self._sender: dict[tuple[int, int], str] = {}
        self._held_by: dict[str, int] = {}  # worker -> bytes of the checkpoints it sent that are held

    def keep(self, worker_id: str, job_id: int, task: int, state: bytes) -> bool:
        """Hold ``state`` as the task's latest checkpoint, replacing its last one; False (nothing kept, the last
        one stays) when that would pass the worker's bound or the total."""
        old = self._by_job.get(job_id, {}).get(task)
        old_size = len(old) if old is not None else 0
        old_sender = self._sender.get((job_id, task))
        mine = self._held_by.get(worker_id, 0) - (old_size if old_sender == worker_id else 0)
        if mine + len(state) > self.per_worker or self.held - old_size + len(state) > self.total:
            return False
        self._forget(job_id, task)
        self._by_job.setdefault(job_id, {})[task] = state
        self._sender[(job_id, task)] = worker_id
        self._held_by[worker_id] = self._held_by.get(worker_id, 0) + len(state)
        self.held += len(state)
        return True

    def of_job(self, job_id: int) -> dict[int, bytes]:
        """The job's checkpoints by task (empty when none); read only."""
        return self._by_job.get(job_id, {})

    def get(self, job_id: int, default: dict[int, bytes] | None = None) -> dict[int, bytes] | None:
        """Mapping-style :meth:`of_job` (``checkpoints.get(job)``, ``checkpoints[job]``): the job's checkpoints by
        task, or ``default`` when it has none."""
        return self._by_job.get(job_id, default)

    def __getitem__(self, job_id: int) -> dict[int, bytes]:
        return self._by_job[job_id]

    def drop(self, job_id: int, start: int, count: int) -> None:
        """Tasks ``start .. start+count-1`` are finished: their checkpoints are no longer needed."""
        saved = self._by_job.get(job_id)
        if saved:
            for task in [t for t in saved if start <= t < start + count]:
                self._forget(job_id, task)

    def drop_job(self, job_id: int) -> None:
        for task in list(self._by_job.get(job_id, ())):
            self._forget(job_id, task)

    def _forget(self, job_id: int, task: int) -> None:
        saved = self._by_job.get(job_id)
        if saved is None or task not in saved:
            return
        size = len(saved.pop(task))
        if not saved:
            del self._by_job[job_id]
        sender = self._sender.pop((job_id, task))
        left = self._held_by[sender] - size
        if left:
            self._held_by[sender] = left
        else:
            del self._held_by[sender]
        self.held -= size
