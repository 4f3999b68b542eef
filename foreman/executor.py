"""``ForemanExecutor``: a ``concurrent.futures.Executor`` backed by a CrowdCompute fleet.

A drop-in for ``ProcessPoolExecutor``: same ``submit``/``map``/``shutdown`` semantics, including ``map``'s lazy
result iterator with ``timeout``, ``shutdown(cancel_futures=True)`` and RuntimeError after shutdown.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from foreman.client import Foreman
    from foreman.jobs import Job


class ForemanExecutor(concurrent.futures.Executor):
    """Runs calls on CrowdCompute workers.

    ``ForemanExecutor(max_workers=4)`` starts its own embedded foreman with 4 local workers (shut down with the
    executor); ``ForemanExecutor(foreman=fm)`` shares an existing foreman's fleet (left running).
    Extra keyword arguments go to :class:`~foreman.client.Foreman`.
    """

    def __init__(self, max_workers: int | None = None, *, foreman: Foreman | None = None, **options: Any) -> None:
        if foreman is None:
            from foreman.client import Foreman

            if max_workers is None:
                max_workers = os.cpu_count() or 1
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            options.setdefault("port", 0)
            foreman = Foreman(local_workers=max_workers, **options)
            self._owns_foreman = True
        else:
            self._owns_foreman = False
        self._foreman = foreman
        self._lock = threading.Lock()
        self._shutdown = False
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._maps: weakref.WeakSet[_MapResults] = weakref.WeakSet()  # unfinished map() iterators

    @property
    def foreman(self) -> Foreman:
        return self._foreman

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            future = self._foreman.submit(fn, *args, **kwargs)
            self._futures.add(future)
        future.add_done_callback(self._forget)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Lazy results in input order; a task's exception is raised when its result is reached, and
        TimeoutError once ``timeout`` seconds have passed since this call. ``chunksize`` > 1 fixes the batch
        size; 1 (the default) lets the foreman size batches adaptively.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            results = _MapResults(self._foreman.imap(fn, *iterables, chunksize=None if chunksize == 1 else chunksize,
                                                     timeout=timeout))
            self._maps.add(results)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shutdown = True
            futures = list(self._futures)
        if cancel_futures:
            for future in futures:
                future.cancel()
        if wait:
            concurrent.futures.wait(futures)
            for results in list(self._maps):
                results.fetch_all()  # as with ProcessPoolExecutor, map results outlive shutdown(wait=True)
            if self._owns_foreman:
                self._foreman.close()
        elif self._owns_foreman:
            threading.Thread(target=self._close_when_done, args=(futures,), daemon=True).start()

    def _close_when_done(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        concurrent.futures.wait(futures)
        self._foreman.close()

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._futures.discard(future)


class _MapResults:
    """The lazy iterator ``map`` returns. Leaving early (an exception, or dropping it) cancels what is left;
    :meth:`fetch_all` pulls every remaining result into memory, so iteration can finish after shutdown."""

    def __init__(self, job: Job) -> None:
        self._job = job
        self._fetched: deque[Any] = deque()
        self._error: BaseException | None = None
        self._done = False

    def __iter__(self) -> _MapResults:
        return self

    def __next__(self) -> Any:
        if self._fetched:
            return self._fetched.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            self._done = True
            raise error
        if self._done:
            raise StopIteration
        try:
            return next(self._job)
        except BaseException:
            self._done = True
            raise

    def fetch_all(self) -> None:
        if self._done or self._error is not None:
            return
        try:
            self._fetched.extend(self._job)
        except Exception as exc:  # raised when iteration reaches it, as it would have been
            self._error = exc
        self._done = not self._fetched and self._error is None

    def close(self) -> None:
        """Stop early: what is left is cancelled."""
        self._done = True
        self._fetched.clear()
        self._job.close()

    def __del__(self) -> None:
        self._job.close()
