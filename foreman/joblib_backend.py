"""A joblib backend: joblib and scikit-learn work (``n_jobs=...``) runs on a CrowdCompute fleet.

Importing this module registers the backend under the name ``"crowdcompute"``, as ``dask.distributed`` and
``ray.util.joblib`` do::

    import foreman.joblib_backend  # registers "crowdcompute"
    from foreman import Foreman

    with Foreman(local_workers=4) as fm, joblib.parallel_config(backend="crowdcompute", foreman=fm):
        GridSearchCV(model, grid, n_jobs=-1).fit(X, y)

Without ``foreman=``, the backend uses the foreman given to :func:`register`, or else starts an embedded one with a
local worker per core on first use (closed at exit). ``n_jobs=-1`` is every task slot of the connected fleet.

Batching: joblib groups calls into batches that take about 0.2-2 s (its ``AutoBatchingMixin``, as with its own
loky backend), and each batch is one call on the fleet (one task of one submit stream, so the function travels
once). bench/run.py's ``joblib`` workload measured this against one fleet call per joblib call (see
docs/benchmarks.md); ``batching="none"`` gives the latter.
"""

from __future__ import annotations

import atexit
import os
import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from joblib import register_parallel_backend
from joblib._parallel_backends import AutoBatchingMixin, ParallelBackendBase

if TYPE_CHECKING:
    from foreman.client import Foreman

NAME = "crowdcompute"

_default: Foreman | None = None  # the fleet used without foreman=: given to register(), or started on first use
_default_owned = False
_default_lock = threading.Lock()


def register(foreman: Foreman | None = None, make_default: bool = False) -> None:
    """Register the ``"crowdcompute"`` backend (done on import; call again to change its defaults).

    :param foreman: the fleet to use when ``parallel_config`` names none (default: an embedded foreman with a
        local worker per core, started on first use).
    :param make_default: make it joblib's default backend, so ``n_jobs=`` alone uses the fleet.
    """
    global _default, _default_owned
    if foreman is not None:
        with _default_lock:
            if _default_owned and _default is not None:
                _default.close()
            _default, _default_owned = foreman, False
    register_parallel_backend(NAME, CrowdComputeBackend, make_default=make_default)


def _default_foreman() -> Foreman:
    global _default, _default_owned
    with _default_lock:
        if _default is None or _default._closed:
            from foreman.client import Foreman

            workers = os.cpu_count() or 1
            _default, _default_owned = Foreman(port=0, local_workers=workers), True
            _default.wait_for_workers(workers, timeout=60)
            atexit.register(_close_default)
        return _default


def _close_default() -> None:
    with _default_lock:
        if _default_owned and _default is not None:
            _default.close()


def _run(batch: Any) -> Any:
    """What the fleet runs: one joblib batch (a ``BatchedCalls``), which returns the list of its results."""
    return batch()


class CrowdComputeBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's ``ParallelBackendBase`` over a :class:`~foreman.client.Foreman`.

    :param foreman: the fleet (default: see :func:`register`).
    :param batching: ``"joblib"`` (default): joblib's auto-batching; ``"none"``: one fleet call per joblib call.
    :param options: job options for every call (``requires``, ``resources``, ``retries``...; see
        :class:`~foreman.jobs.JobOptions`).
    """

    supports_retrieve_callback = True
    supports_inner_max_num_threads = False
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = -1

    def __init__(self, foreman: Foreman | None = None, batching: str = "joblib", nesting_level: int | None = None,
                 inner_max_num_threads: int | None = None, **options: Any) -> None:
        if batching not in ("joblib", "none"):
            raise ValueError(f"batching must be 'joblib' or 'none', got {batching!r}")
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads)
        self._foreman = foreman
        self._batching = batching
        self._options = options
        self._pending: set[Future[Any]] = set()
        self._lock = threading.Lock()

    @property
    def foreman(self) -> Foreman:
        if self._foreman is None:
            self._foreman = _default_foreman()
        return self._foreman

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        """``n_jobs`` > 0 as given; -1 every task slot of the fleet, -2 all but one, and so on (at least 1)."""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            n_jobs = self.default_n_jobs
        if n_jobs > 0:
            return n_jobs
        return max(self.foreman.slots + 1 + n_jobs, 1)

    def configure(self, n_jobs: int = 1, parallel: Any = None, prefer: str | None = None,
                  require: str | None = None, **backend_kwargs: Any) -> int:
        self.parallel = parallel
        return self.effective_n_jobs(n_jobs)

    def compute_batch_size(self) -> int:
        if self._batching == "none":
            return 1
        return super().compute_batch_size()

    def submit(self, func: Any, callback: Any = None) -> Future[Any]:
        fleet = self.foreman if not self._options else self.foreman.options(**self._options)
        future = fleet.submit(_run, func)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)
        if callback is not None:
            future.add_done_callback(callback)
        return future

    def retrieve_result_callback(self, future: Future[Any]) -> Any:
        return future.result()

    def abort_everything(self, ensure_ready: bool = True) -> None:
        """A call failed: cancel the calls not yet started (running ones finish on their workers)."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.cancel()

    def terminate(self) -> None:
        self.reset_batch_stats()

    def _forget(self, future: Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)


register()
