"""``ForemanExecutor``: a ``concurrent.futures.Executor`` backed by a CrowdCompute fleet.

A drop-in for ``ProcessPoolExecutor``, checked against the behaviours of CPython's own executor tests
(tests/test_executor_conformance.py): ``submit``/``map``/``shutdown`` semantics, including ``map``'s lazy result
iterator with ``timeout``, ``shutdown(cancel_futures=True)``, ``initializer``/``initargs``, the stdlib's exception
types (``PicklingError``, ``BrokenProcessPool``), RuntimeError after shutdown, pending work finished at
interpreter exit and a shutdown when the executor is garbage collected. The README lists the differences left.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import multiprocessing
import os
import threading
import uuid
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any

from foreman.errors import CannotPickleError, InitializerError

if TYPE_CHECKING:
    from foreman.client import Foreman
    from foreman.jobs import Job

log = logging.getLogger("crowdcompute.foreman")

#: Seconds a new executor waits for its local workers to connect (then it goes on, and work waits for them).
WORKERS_TIMEOUT = 60.0

#: Executors not yet shut down (and those shutting down in the background), finished by :func:`_python_exit`.
_live: set[_State] = set()
_live_lock = threading.Lock()
_interpreter_exiting = False


def _python_exit() -> None:
    """At interpreter exit, before ``atexit`` handlers run (as ``concurrent.futures`` does): refuse new work and
    let every executor's pending work finish, then close the foremen they own, so a script that submits and
    ends gets its work done and leaves no worker behind."""
    global _interpreter_exiting
    with _live_lock:
        _interpreter_exiting = True
        states = list(_live)
    for state in states:
        state.shutdown(wait=True)


try:
    threading._register_atexit(_python_exit)  # type: ignore[attr-defined]
except AttributeError:  # not CPython: atexit handlers registered after this one run before it
    atexit.register(_python_exit)


class ForemanExecutor(concurrent.futures.Executor):
    """Runs calls on CrowdCompute workers.

    ``ForemanExecutor(max_workers=4)`` starts its own embedded foreman with 4 local workers (shut down with the
    executor); ``ForemanExecutor(foreman=fm)`` shares an existing foreman's fleet (left running).
    ``initializer(*initargs)`` runs once in each task process before the first of this executor's calls there;
    if it raises, the executor is broken: ``submit`` raises BrokenProcessPool (see :mod:`foreman.initializer`).
    Extra keyword arguments go to :class:`~foreman.client.Foreman`.
    """

    def __init__(self, max_workers: int | None = None, *, foreman: Foreman | None = None,
                 initializer: Callable[..., Any] | None = None, initargs: tuple[Any, ...] = (),
                 **options: Any) -> None:
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if foreman is None:
            from foreman.client import Foreman

            if max_workers is None:
                max_workers = os.cpu_count() or 1
            if max_workers <= 0:
                raise ValueError("max_workers must be greater than 0")
            options.setdefault("port", 0)
            # Its workers run only this process's work: they may hold its multiprocessing authkey, so that
            # Manager proxies passed to calls work, as in a process pool's children.
            options.setdefault("local_authkey", bytes(multiprocessing.current_process().authkey))
            foreman = Foreman(local_workers=max_workers, **options)
            owns = True
            # Ready when constructed, as a process pool is: work submitted now is taken at once (and counts as
            # running, so shutdown(cancel_futures=True) right after keeps it, as ProcessPoolExecutor does).
            try:
                foreman.wait_for_workers(max_workers, timeout=WORKERS_TIMEOUT)
            except TimeoutError as exc:
                log.warning("%s: going on; work waits for them", exc)
        else:
            owns = False
        self._foreman = foreman
        self._initializer = initializer
        self._initargs = tuple(initargs)
        self._token = uuid.uuid4().hex  # names this executor's initializer in the task processes
        self._state = _State(foreman, owns, initializer is not None)
        with _live_lock:
            _live.add(self._state)
        # Dropped without shutdown: shut down in the background, as ProcessPoolExecutor does on collection.
        weakref.finalize(self, self._state.shutdown, False).atexit = False

    @property
    def foreman(self) -> Foreman:
        return self._foreman

    @property
    def _broken(self) -> str | bool:
        """False, or why the executor takes no more work (the attribute name ``ProcessPoolExecutor`` uses)."""
        return self._state.broken

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """As ``ProcessPoolExecutor.submit``: a function or argument that cannot be pickled gives a future that
        fails with CannotPickleError (a ``pickle.PicklingError``)."""
        state = self._state
        with state.lock:
            state.check_open()
            try:
                future = self._foreman.submit(self._shipped(fn), *args, **kwargs)
            except CannotPickleError as exc:
                failed: concurrent.futures.Future[Any] = concurrent.futures.Future()
                failed.set_running_or_notify_cancel()
                failed.set_exception(exc)
                return failed
            state.futures.add(future)
        future.add_done_callback(state.forget)
        return future

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], timeout: float | None = None,
            chunksize: int = 1) -> Iterator[Any]:
        """Lazy results in input order; a task's exception is raised when its result is reached, and
        TimeoutError once ``timeout`` seconds have passed since this call. ``chunksize`` > 1 fixes the batch
        size; 1 (the default) lets the foreman size batches adaptively. A result is freed as soon as the caller
        drops it. Results still come after ``shutdown(wait=False)``.
        """
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        state = self._state
        with state.lock:
            state.check_open()
            results = _MapResults(self._foreman.imap(self._shipped(fn), *iterables,
                                                     chunksize=None if chunksize == 1 else chunksize,
                                                     timeout=timeout), state)
            state.maps.add(results)
        return results

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._state.shutdown(wait, cancel_futures)

    def _shipped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self._initializer is None:
            return fn
        from foreman.initializer import Initialized

        return Initialized(fn, self._initializer, self._initargs, self._token)


class _State:
    """What an executor's shutdown needs, apart from the executor itself, so that the executor can be collected
    (and its finalizer shut this down) while work is pending."""

    def __init__(self, foreman: Foreman, owns: bool, initialized: bool) -> None:
        self.foreman = foreman
        self.owns = owns  # close the foreman at shutdown
        self.initialized = initialized  # calls run after an initializer: an InitializerError breaks the executor
        self.lock = threading.Lock()
        self.shutting_down = False
        self.broken: str | bool = False
        self.futures: set[concurrent.futures.Future[Any]] = set()
        self.maps: weakref.WeakSet[_MapResults] = weakref.WeakSet()  # unfinished map() iterators
        self._closing = threading.Lock()  # held while the foreman closes: a second shutdown waits for it
        self._closed = False

    def check_open(self) -> None:
        """Called with ``lock`` held, before taking work."""
        if self.broken:
            raise BrokenProcessPool(self.broken)
        if _interpreter_exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if self.shutting_down:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self.lock:
            self.futures.discard(future)
        if self.initialized and not future.cancelled() and isinstance(future.exception(), InitializerError):
            self.break_(future.exception())  # type: ignore[arg-type]

    def break_(self, error: BaseException) -> None:
        """An initializer failed: take no more work, and log why as ProcessPoolExecutor does."""
        with self.lock:
            if self.broken:
                return
            self.broken = f"a task process's initializer failed, the executor is not usable any more: {error}"
        logging.getLogger("concurrent.futures").critical(
            "Exception in initializer:\n%s", getattr(error, "remote_traceback", "") or repr(error))

    def shutdown(self, wait: bool, cancel_futures: bool = False) -> None:
        with self.lock:
            if self._closed and not self.futures:
                return  # done already (a collected executor that was shut down)
            self.shutting_down = True
            futures = list(self.futures)
        if cancel_futures:
            self._let_fleet_take_work()
            for future in futures:
                future.cancel()
        if wait:
            self._finish(futures)
        else:
            threading.Thread(target=self._finish, args=(futures,), name="crowdcompute-executor-shutdown",
                             daemon=True).start()

    def _let_fleet_take_work(self) -> None:
        """Wait until the foreman's loop has handled every call submitted so far, so that those an idle worker
        takes are running (not cancelled), whatever the thread scheduling: ProcessPoolExecutor likewise keeps
        the calls already in its call queue."""
        foreman = self.foreman
        if foreman._closed or not foreman._thread.is_alive():
            return
        try:
            foreman._call(_nothing)
        except RuntimeError:
            pass  # closed meanwhile

    def _finish(self, futures: list[concurrent.futures.Future[Any]]) -> None:
        """Let pending work end (map results are pulled into memory, so iteration can finish after shutdown, as
        with ProcessPoolExecutor), then close an owned foreman. Safe to run twice, from two threads. Stops waiting
        if the foreman's event loop has died (nothing would settle the futures: exit must not hang on them)."""
        while concurrent.futures.wait(futures, timeout=0.5).not_done:
            if not self.foreman._thread.is_alive():
                return
        for results in list(self.maps):
            results.fetch_all()
        with self._closing:
            if not self._closed:
                self._closed = True
                if self.owns:
                    self.foreman.close()
        with _live_lock:
            _live.discard(self)


def _nothing() -> None:
    pass


class _MapResults:
    """The lazy iterator ``map`` returns. Leaving early (an exception, or dropping it) cancels what is left;
    :meth:`fetch_all` pulls every remaining result into memory, so iteration can finish after shutdown."""

    def __init__(self, job: Job, state: _State) -> None:
        self._job = job
        self._state = state
        self._lock = threading.Lock()  # the user's thread and a shutdown's both pull from the job
        self._fetched: deque[Any] = deque()
        self._error: BaseException | None = None
        self._done = False

    def __iter__(self) -> _MapResults:
        return self

    def __next__(self) -> Any:
        with self._lock:
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
            except InitializerError as exc:
                self._done = True
                if self._state.initialized:
                    self._state.break_(exc)
                raise
            except BaseException:
                self._done = True
                raise

    def fetch_all(self) -> None:
        with self._lock:
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
