"""Client-side jobs: feeding input to the foreman in batches and handing results back in order.

A :class:`Job` spans three threads. A feeder thread pulls the user's iterable, cuts it into batches whose size is
learnt from observed task times (:class:`Batcher`), pickles them and passes them to the event loop, pausing when
enough batches are outstanding (bounded memory for unbounded input). The event loop delivers result batches back
through a queue. The user's thread iterates the job, decoding and re-ordering results as it goes.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import operator
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from foreman import protocol
from foreman.errors import SerializationError
from foreman.retry import Retrying
from foreman.serialization import (
    OUT_OF_BAND_BYTES,
    Pickled,
    dumps_function,
    dumps_framed,
    dumps_items,
    loads_results,
    rebuild_exception,
)
from foreman.validation import Policy

if TYPE_CHECKING:
    from foreman.client import Foreman

_FINISHED = object()
_ABORTED = object()


class Batcher:
    """Adaptive batch sizes: small while task times are unknown, then about ``target_seconds`` of work each.

    :param chunksize: a fixed size instead (tasks per batch).
    :param target_seconds: work per batch once task times are known. Larger amortises per-batch overhead
        better; smaller loses less when a worker dies. The end of a job is balanced by sizing batches to what
        remains (see :meth:`next_size`), and a slow worker's batch by speculative copies (see the scheduler).
    :param max_items: cap on tasks per batch.
    :param target_bytes: cap on pickled arguments per batch, so large arguments stream rather than pile up.
    """

    def __init__(self, chunksize: int | None = None, target_seconds: float = 0.5, max_items: int = 10_000,
                 target_bytes: int = protocol.BATCH_BYTES) -> None:
        if chunksize is not None and chunksize < 1:
            raise ValueError("chunksize must be >= 1")
        self.chunksize = chunksize
        self.target_seconds = target_seconds
        self.max_items = max_items
        self.target_bytes = target_bytes
        self.seconds_per_task: float | None = None
        self.bytes_per_task: float | None = None

    def observe_time(self, count: int, elapsed: float) -> None:
        """A batch of ``count`` tasks ran in ``elapsed`` seconds (called from the event loop)."""
        sample = max(elapsed, 1e-7) / count
        old = self.seconds_per_task
        self.seconds_per_task = sample if old is None else 0.7 * old + 0.3 * sample

    def observe_bytes(self, count: int, nbytes: int) -> None:
        self.bytes_per_task = nbytes / count

    def next_size(self, remaining: int | None, slots: int) -> int:
        if self.chunksize is not None:
            return self.chunksize
        per_task = self.seconds_per_task
        if per_task is None:
            return 1
        size = min(self.max_items, max(1, int(self.target_seconds / per_task)))
        if self.bytes_per_task:
            size = min(size, max(1, int(self.target_bytes / self.bytes_per_task)))
        if remaining is not None:  # leave enough batches to share the end of the job between workers
            size = min(size, max(1, -(-remaining // (2 * max(slots, 1)))))
        return size


@dataclass(frozen=True)
class JobOptions:
    """How a job runs; given as keyword arguments to ``map``/``imap``/``imap_unordered`` or ``fm.options()``.

    :param requires: capabilities a worker must advertise (``{"gpu"}``; every worker has ``cpu``; workers with an
        NVIDIA GPU have ``gpu`` and ``cuda``, with 32 GiB or more ``high-memory``; others come from
        ``--capabilities``).
    :param resources: minimum amounts a worker must have: ``cpu``, ``memory_gb``, ``gpu``, ``gpu_memory_gb``.
    :param priority: higher runs first; jobs of equal priority share the fleet round-robin.
    :param retries: calls of a task that raises (a ``retry_on`` type) are retried this many times in the task
        process, with exponential backoff from ``retry_backoff`` seconds. Lost workers count separately
        (poison-task rule).
    :param return_exceptions: yield a failed task's exception in its place instead of raising it.
    :param task_timeout: seconds one task may run: a timer in the task process raises TaskTimeoutError in the
        task, and a task stuck where it cannot (in C code) has its process killed (then it counts as a crash and
        reruns elsewhere, up to the poison-task rule). A worker's own ``--max-task-seconds`` still applies.
    :param redundancy: run each task on this many distinct workers (distinct hosts while enough hosts are
        connected) and accept a result only when ``quorum`` of them agree (see :mod:`foreman.validation`).
    :param quorum: agreeing results needed to accept a task (default: ``redundancy``).
    :param max_replicas: on disagreement, more replicas run, up to this many in all (default:
        ``redundancy + 2``); a task still without a quorum then fails with ValidationError.
    :param comparator: ``comparator(a, b) -> bool`` decides whether two results agree (e.g. floats within a
        tolerance); it runs on the foreman. Default: same type and ``==``, or the same pickled bytes.
    :param spot_check: this fraction of batches also runs on a trusted worker, whose result must agree.
    """

    requires: frozenset[str] = frozenset()
    resources: dict[str, float] = field(default_factory=dict)
    priority: int = 0
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    retry_backoff: float = 0.1
    return_exceptions: bool = False
    task_timeout: float | None = None
    redundancy: int = 1
    quorum: int | None = None
    max_replicas: int | None = None
    comparator: Callable[[Any, Any], bool] | None = None
    spot_check: float = 0.0

    def __post_init__(self) -> None:
        if type(self.redundancy) is not int or self.redundancy < 1:
            raise ValueError(f"redundancy must be an int >= 1, got {self.redundancy!r}")
        quorum = self.redundancy if self.quorum is None else self.quorum
        if type(quorum) is not int or not 1 <= quorum <= self.redundancy:
            raise ValueError(f"quorum must be an int from 1 to redundancy ({self.redundancy}), got {quorum!r}")
        if self.max_replicas is not None and (type(self.max_replicas) is not int
                                              or self.max_replicas < self.redundancy):
            raise ValueError(f"max_replicas must be an int >= redundancy ({self.redundancy}), "
                             f"got {self.max_replicas!r}")
        if self.comparator is not None and not callable(self.comparator):
            raise TypeError(f"comparator must be callable, got {type(self.comparator).__name__}")
        if not isinstance(self.spot_check, (int, float)) or not 0.0 <= self.spot_check <= 1.0:
            raise ValueError(f"spot_check must be a fraction from 0 to 1, got {self.spot_check!r}")

    def validation(self) -> Policy | None:
        """The job's validation policy, or None when results are taken as they come."""
        if self.redundancy == 1 and not self.spot_check:
            return None
        return Policy(self.redundancy, self.redundancy if self.quorum is None else self.quorum,
                      self.redundancy + 2 if self.max_replicas is None else self.max_replicas,
                      self.comparator, float(self.spot_check))

    def shipped(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """What the workers run: ``fn`` itself, or ``fn`` wrapped to retry."""
        return Retrying(fn, self.retries, self.retry_on, self.retry_backoff) if self.retries else fn

    def placement(self) -> dict[str, Any]:
        """Keywords for ``add_job``; ``validation`` only when asked for (an embedded foreman takes it)."""
        placement = {"requires": frozenset(self.requires), "resources": dict(self.resources),
                     "priority": self.priority, "task_timeout": self.task_timeout}
        validation = self.validation()
        if validation is not None:
            placement["validation"] = validation
        return placement


def placement_to_json(placement: dict[str, Any]) -> dict[str, Any]:
    """A job's placement (:meth:`JobOptions.placement`) as JSON, for a stored job (SUBMIT, the journal).
    ValueError for a comparator: it is code, and code from clients never runs in a standalone foreman."""
    options: dict[str, Any] = {"requires": sorted(placement["requires"]), "resources": dict(placement["resources"]),
                               "priority": placement["priority"]}
    if placement["task_timeout"] is not None:
        options["task_timeout"] = placement["task_timeout"]
    policy = placement.get("validation")
    if policy is not None:
        if policy.comparator is not None:
            raise ValueError("a comparator is code, and a stored job (a remote client's, or a detached one) cannot "
                             "send code for the foreman to run: use the default comparison (equal results) or "
                             "round the results in the task")
        options.update(redundancy=policy.redundancy, quorum=policy.quorum, max_replicas=policy.max_replicas,
                       spot_check=policy.spot_check)
    return options


def placement_from_json(options: dict[str, Any]) -> dict[str, Any]:
    """The placement keywords of ``add_job`` from :func:`placement_to_json`'s JSON, checked as JobOptions checks
    them (ValueError or TypeError saying what is wrong)."""
    unknown = set(options) - STORED_OPTIONS
    if unknown:
        raise ValueError(f"unknown job options {sorted(unknown)}")
    requires = options.get("requires", [])
    if not isinstance(requires, list) or not all(isinstance(r, str) for r in requires):
        raise ValueError("requires must be a list of capability names")
    resources = options.get("resources", {})
    if not isinstance(resources, dict) or not all(isinstance(v, (int, float)) for v in resources.values()):
        raise ValueError("resources must map names to numbers")
    if type(options.get("priority", 0)) is not int:
        raise ValueError("priority must be an integer")
    task_timeout = options.get("task_timeout")
    if task_timeout is not None and not isinstance(task_timeout, (int, float)):
        raise ValueError("task_timeout must be a number of seconds")
    return JobOptions(**{**options, "requires": frozenset(requires)}).placement()


#: The options a stored job keeps as JSON (the rest act in the client, or inside the shipped function).
STORED_OPTIONS = frozenset({"requires", "resources", "priority", "task_timeout", "redundancy", "quorum",
                            "max_replicas", "spot_check"})


class Job:
    """A running ``map``: iterate it for results; ``cancel()`` stops it. Returned by ``Foreman.imap``.

    ``failures`` lists the tasks that failed so far (as iteration reaches them): index, exception type,
    message, remote traceback and worker.
    """

    def __init__(self, foreman: Foreman, fn: Callable[..., Any], iterables: tuple[Iterable[Any], ...],
                 chunksize: int | None = None, ordered: bool = True, timeout: float | None = None,
                 progress: bool = False, options: JobOptions = JobOptions()) -> None:
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        if progress:
            _tqdm()  # before anything is submitted: without tqdm, progress=True fails here, in one clear line
        digest, function = dumps_function(options.shipped(fn))
        self.name = getattr(fn, "__qualname__", repr(fn))
        self.options = options
        self.failures: list[dict[str, Any]] = []
        self._foreman = foreman
        self._ordered = ordered
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._batcher = Batcher(chunksize)
        if len(iterables) == 1:
            call, source = protocol.CALL_ONE, iter(iterables[0])
            self.total: int | None = _known_length(iterables[0])
        else:
            call, source = protocol.CALL_STAR, zip(*iterables)
            lengths = [_known_length(it) for it in iterables]
            self.total = None if None in lengths else min(lengths)  # type: ignore[type-var]
        self._source = source
        self._outcomes: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._room = threading.Condition()
        self._outstanding = 0  # batches fed and not yet consumed
        self._cancelled = False
        self._finished = False
        self._abort_error: BaseException | None = None
        self._failure: str | None = None  # why iteration stopped on a failed task: the job is failed, not cancelled
        self.tasks_done = 0
        self.id: int = foreman._call(functools.partial(foreman._backend.add_job, digest, function, call, self,
                                                       self.name, self.total, **options.placement()))
        self._feeder = threading.Thread(target=self._feed, name=f"crowdcompute-feeder-{self.id}", daemon=True)
        self._feeder.start()
        self._progress = progress
        self._trusted = foreman._backend.trust_workers
        self._iterator = self._iterate()

    # -- the user's side -------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        return next(self._iterator)

    def close(self) -> None:
        """Stop iterating; unfinished work is cancelled."""
        self._iterator.close()

    def cancel(self) -> None:
        """Queued tasks never run, running ones are killed; iterating further raises CancelledError."""
        if self._finished or self._cancelled:
            return
        self._cancelled = True
        with self._room:
            self._room.notify_all()
        self._foreman._post(functools.partial(self._foreman._backend.cancel_job, self.id, failed=self._failure))

    @property
    def progress(self) -> tuple[int, int | None]:
        """(tasks done, total tasks or None when the input's length is unknown)."""
        return self.tasks_done, self.total

    def _iterate(self) -> Iterator[Any]:
        buffered: dict[int, tuple[int, int, Any, BaseException | None, str | None]] = {}
        next_index = 0
        finished = False
        bar = _progress_bar(self.name, self.total) if self._progress else None
        try:
            while True:
                if self._ordered:
                    entry = buffered.pop(next_index, None)
                elif buffered:
                    entry = buffered.pop(next(iter(buffered)))
                else:
                    entry = None
                if entry is None:
                    if finished:
                        if self._cancelled:
                            raise concurrent.futures.CancelledError(f"job {self.id} was cancelled")
                        return
                    outcome = self._next_outcome()
                    if outcome is _FINISHED:
                        finished = True
                    elif outcome is _ABORTED:
                        assert self._abort_error is not None
                        raise self._abort_error
                    else:
                        start, count, payload, error, worker = outcome
                        buffered[start] = (start, count, payload, error, worker)
                    continue
                start, count, payload, error, worker = entry
                self._consumed()
                if bar is not None:
                    bar.update(count)
                if error is not None:
                    if count == 0:  # the input itself failed (the iterable raised, an argument won't pickle)
                        raise error
                    for index in range(start, start + count):
                        yield self._failed(index, error, worker)
                else:
                    results, errors = loads_results(payload, count, self._trusted)
                    # Popped as yielded, never held in a local across a yield: a result the caller drops is freed
                    # at once (as ProcessPoolExecutor.map does), not kept alive by this frame until the next one.
                    results.reverse()
                    if not errors:  # the common case, popped in C: a Python loop per result cost trivial maps ~10 %
                        yield from map(list.pop, itertools.repeat(results, len(results)))
                    offset = 0
                    while results:  # a batch with failed tasks
                        if offset in errors:
                            results.pop()
                            yield self._failed(start + offset, rebuild_exception(errors[offset], self._trusted),
                                               worker)
                        else:
                            yield results.pop()
                        offset += 1
                next_index += count
        finally:
            if bar is not None:
                bar.close()
            if not self._finished:
                self.cancel()

    def _failed(self, index: int, error: BaseException, worker: str | None) -> BaseException:
        """Record a failed task; raise its error, or return it in place with ``return_exceptions``."""
        self.failures.append({"task": index, "type": f"{type(error).__module__}.{type(error).__qualname__}",
                              "message": str(error), "traceback": getattr(error, "remote_traceback", ""),
                              "worker": worker})
        if self.options.return_exceptions:
            return error
        self._failure = f"task {index} failed: {type(error).__name__}: {error}"[:500]
        raise error

    def _next_outcome(self) -> Any:
        if self._deadline is None:
            return self._outcomes.get()
        try:
            return self._outcomes.get(timeout=max(0.0, self._deadline - time.monotonic()))
        except queue.Empty:
            raise concurrent.futures.TimeoutError(f"job {self.id} timed out") from None

    def _consumed(self) -> None:
        with self._room:
            self._outstanding -= 1
            self._room.notify()

    # -- the feeder thread -----------------------------------------------------------------------------------

    def _window(self) -> int:
        """Batches allowed out at once: enough to keep every worker busy while the oldest batch (which
        ordered results wait for) is held up on a slow worker, and no more. Until the first result tells how
        long a task takes, one single-task batch per slot: probes, rather than a window of batches cut blind."""
        backend = self._foreman._backend
        if self._batcher.seconds_per_task is None and self._batcher.chunksize is None:
            return max(2, backend.slots)
        return max(16, 4 * backend.capacity + 4)

    def _feed(self) -> None:
        index = 0
        limit = self._foreman._backend.max_message_size - protocol.MAX_HEADER_SIZE
        try:
            while not self._cancelled:
                with self._room:
                    while self._outstanding >= self._window() and not self._cancelled:
                        self._room.wait(0.25)
                remaining = None if self.total is None else self.total - index
                size = self._batcher.next_size(remaining, self._foreman._backend.slots)
                items = list(itertools.islice(self._source, size))
                if not items or self._cancelled:
                    break
                per_task = self._batcher.bytes_per_task
                out_of_band = self._foreman._backend.out_of_band and (per_task is None
                                                                       or per_task >= OUT_OF_BAND_BYTES)
                for start, count, payload in _pickle_fitting(items, index, limit, out_of_band,
                                                             self._foreman._backend.framed_input):
                    self._batcher.observe_bytes(count, payload.nbytes)
                    with self._room:
                        self._outstanding += 1
                    self._foreman._post(self._foreman._backend.add_batch, self.id, start, count, payload)
                index += len(items)
        except BaseException as exc:  # the iterable raised, or an argument would not pickle
            with self._room:
                self._outstanding += 1
            self._outcomes.put((index, 0, None, exc, None))
        finally:
            try:
                self._foreman._post(self._foreman._backend.close_input, self.id)
            except RuntimeError:
                pass  # the foreman is closed

    # -- the event loop's side (JobSink) ---------------------------------------------------------------------

    def deliver(self, start: int, count: int, payload: bytes | memoryview, elapsed: float, worker: str) -> None:
        self._batcher.observe_time(count, elapsed)
        self.tasks_done += count
        self._outcomes.put((start, count, payload, None, worker))

    def fail(self, start: int, count: int, error: BaseException) -> None:
        self.tasks_done += count
        self._outcomes.put((start, count, None, error, None))

    def aborted(self, error: BaseException) -> None:
        self._abort_error = error
        self._outcomes.put(_ABORTED)

    def starting(self, start: int) -> bool:
        return True

    def finished(self, cancelled: bool) -> None:
        self._cancelled = self._cancelled or cancelled
        self._finished = True
        self._outcomes.put(_FINISHED)


#: Seconds a submit stream's job stays open with nothing in flight before it is closed (the next ``submit``
#: of that function opens a new one). Longer keeps the function on the workers across pauses in a submit loop.
STREAM_IDLE_SECONDS = 1.0


class SubmitStream:
    """Every ``submit()`` of one function with one set of options, as one job with a one-task batch per call.

    One job rather than a job per call: the function is shipped once, the scheduler looks at one job however
    many calls wait (a job per call made each dispatch walk every waiting call), and the dashboard shows one job.
    The job closes after :data:`STREAM_IDLE_SECONDS` with nothing in flight. Every method runs on the foreman's
    event loop; user threads reach it with ``Foreman._post``.
    """

    def __init__(self, foreman: Foreman, key: tuple[str, int], digest: str, function: bytes, name: str,
                 options: JobOptions) -> None:
        self._foreman = foreman
        self._key = key
        self.options = options  # also keeps the key's id() from being reused
        backend = foreman._backend
        self.id = backend.add_job(digest, function, protocol.CALL_FULL, self, name, None, **options.placement())
        self._futures: dict[int, concurrent.futures.Future[Any]] = {}
        self._next = 0
        self._open = True
        self._idle: Any = None  # the pending check that closes the job once idle long enough
        self._idle_since = 0.0  # loop time at which the last call in flight ended

    @property
    def open(self) -> bool:
        return self._open

    def add(self, future: concurrent.futures.Future[Any], payload: Pickled) -> None:
        """Run one call: its arguments are ``payload``, its result goes to ``future``."""
        index = self._next
        self._next += 1
        self._futures[index] = future
        future.add_done_callback(lambda f: self._on_done(f, index))
        self._foreman._backend.add_batch(self.id, index, 1, payload)

    def _on_done(self, future: concurrent.futures.Future[Any], index: int) -> None:
        """Any thread: a future was cancelled by its user (or settled: nothing to do)."""
        if future.cancelled():
            try:
                self._foreman._post(self._cancel, index)
            except RuntimeError:  # the foreman is closed
                _notify_cancelled(future)

    def _cancel(self, index: int) -> None:
        future = self._futures.pop(index, None)
        if future is not None:
            _notify_cancelled(future)
            self._foreman._backend.cancel_batch(self.id, index)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        """Nothing in flight: close after :data:`STREAM_IDLE_SECONDS` unless a call comes. One pending check at a
        time, which looks again if calls came meanwhile (not a timer set and cancelled per call)."""
        if not self._futures and self._open:
            loop = self._foreman._loop
            self._idle_since = loop.time()
            if self._idle is None:
                self._idle = loop.call_later(STREAM_IDLE_SECONDS, self._close)

    def _close(self) -> None:
        self._idle = None
        if self._futures or not self._open:
            return  # busy again: the end of its last call checks anew
        loop = self._foreman._loop
        left = self._idle_since + STREAM_IDLE_SECONDS - loop.time()
        if left > 0:
            self._idle = loop.call_later(left, self._close)
            return
        self._open = False
        self._foreman._streams.pop(self._key, None)
        self._foreman._backend.close_input(self.id)

    def end_input(self) -> None:
        """No more calls (its foreman client is closing): the foreman ends the job once the calls made are done,
        instead of after :data:`STREAM_IDLE_SECONDS` or its client's grace period."""
        if not self._open:
            return
        self._open = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._foreman._streams.pop(self._key, None)
        self._foreman._backend.close_input(self.id)

    # -- JobSink ---------------------------------------------------------------------------------------------

    def deliver(self, start: int, count: int, payload: bytes | memoryview, elapsed: float, worker: str) -> None:
        future = self._futures.pop(start, None)
        if future is not None:
            if self._foreman._backend.trust_workers:
                _settle_from(future, payload, True)
            else:  # the restricted loader never runs on the event loop
                _decoder().submit(_settle_from, future, bytes(payload), False)
        self._maybe_idle()

    def fail(self, start: int, count: int, error: BaseException) -> None:
        for index in range(start, start + count):
            future = self._futures.pop(index, None)
            if future is not None:
                _settle(future, error, failed=True)
        self._maybe_idle()

    def aborted(self, error: BaseException) -> None:
        self._end(error, cancel_pending=False)

    def starting(self, start: int) -> bool:
        future = self._futures.get(start)
        if future is None:
            return False
        if future.set_running_or_notify_cancel():  # False if cancelled just now, from another thread
            return True
        self._futures.pop(start, None)
        return False

    def finished(self, cancelled: bool) -> None:
        self._end(concurrent.futures.CancelledError(f"job {self.id} was cancelled"), cancel_pending=True)

    def _end(self, error: BaseException, cancel_pending: bool) -> None:
        """The job is over: calls still waiting get ``error`` (cancelled instead, if not started and
        ``cancel_pending``)."""
        self._open = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._foreman._streams.get(self._key) is self:
            del self._foreman._streams[self._key]
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if cancel_pending and future.cancel():
                _notify_cancelled(future)
            else:  # a running future cannot be marked cancelled
                _settle(future, error, failed=True)


def _notify_cancelled(future: concurrent.futures.Future[Any]) -> None:
    """Move a cancelled future to CANCELLED_AND_NOTIFIED, so wait() and as_completed() see it done."""
    try:
        future.set_running_or_notify_cancel()
    except RuntimeError:
        pass  # already notified


def _settle(future: concurrent.futures.Future[Any], value: Any, failed: bool) -> None:
    if future.done():
        return
    try:
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass  # cancelled meanwhile by its caller's thread (results are settled off the loop too)


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm  # terminal or notebook, whichever this is
    except ImportError:
        raise ImportError("progress=True draws its bar with tqdm, which is not installed: pip install tqdm "
                          "(or 'crowdcompute[default]')", name="tqdm") from None
    return tqdm


def _progress_bar(name: str, total: int | None) -> Any:
    return _tqdm()(total=total, desc=name, unit="task", dynamic_ncols=True)


def _known_length(iterable: Iterable[Any]) -> int | None:
    """The input's length if it says so cheaply (a list, a range), else None. Never consumes it."""
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        hint = operator.length_hint(iterable, -1)
        return hint if hint >= 0 else None


_DECODER: concurrent.futures.ThreadPoolExecutor | None = None


def _decoder() -> concurrent.futures.ThreadPoolExecutor:
    """One thread that loads untrusted results of ``submit`` calls, off the event loop."""
    global _DECODER
    if _DECODER is None:
        _DECODER = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="crowdcompute-decode")
    return _DECODER


def _settle_from(future: concurrent.futures.Future[Any], payload: bytes | memoryview, trusted: bool) -> None:
    """Settle one call's future with the result (or raised exception) in a one-task result batch."""
    try:  # on the event loop when trusted: nothing a result's bytes raise may escape (loads_results wraps it all)
        results, errors = loads_results(payload, 1, trusted)
        value = rebuild_exception(errors[0], trusted) if errors else results[0]
    except BaseException as exc:  # noqa: BLE001 - belt and braces: one future fails, the loop (or decoder) lives
        error = exc if isinstance(exc, SerializationError) else SerializationError(
            f"cannot load a call's result: {type(exc).__name__}: {exc}")
        _settle(future, error, failed=True)
    else:
        _settle(future, value, failed=bool(errors))


def _pickle_fitting(items: list[Any], start: int, limit: int, out_of_band: bool = True,
                    framed: bool = False) -> Iterator[tuple[int, int, Pickled]]:
    """Pickle items as one batch, halving it until each piece fits in a message. ``out_of_band``: see
    :func:`~foreman.serialization.dumps_items` (the feeder turns it off once arguments prove small).
    ``framed``: one pickle per task (:func:`~foreman.serialization.dumps_framed`), for a remote foreman or a
    stored job."""
    payload = dumps_framed(items, start) if framed else dumps_items(items, start, out_of_band)
    size = payload.nbytes  # the header's list of buffer sizes fits its own limit: buffers are >= 64 KiB each
    if size <= limit:
        yield start, len(items), payload
        return
    if len(items) == 1:
        raise SerializationError(f"the argument of task {start} pickles to {size} bytes, over the "
                                 f"{limit}-byte limit for one task (to send it, raise the foreman's "
                                 "max_message_size, python -m foreman --max-message-size, and its workers' "
                                 "python -m worker --max-message-size)")
    half = len(items) // 2
    yield from _pickle_fitting(items[:half], start, limit, out_of_band, framed)
    yield from _pickle_fitting(items[half:], start + half, limit, out_of_band, framed)
