"""Bad input gets a clear error in the caller, and nothing hangs."""

from __future__ import annotations

import threading
import traceback

import pytest

from foreman import Foreman, ForemanExecutor
from foreman.errors import RemoteError, RemoteTraceback, SerializationError
from tasks import CustomError, boom, exit_on_load, exit_task, return_lock, square


def test_task_exception_is_reraised_with_its_type_and_remote_traceback(fm: Foreman) -> None:
    with pytest.raises(CustomError, match="bad input 3") as info:
        fm.map(boom, range(10))
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in boom" in cause.traceback and "raise CustomError" in cause.traceback
    assert "Remote traceback" in "".join(traceback.format_exception(info.value))


def test_results_before_the_failure_are_yielded_first(fm: Foreman) -> None:
    job = fm.imap(boom, range(10))
    assert [next(job) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(CustomError):
        next(job)


def test_submit_exception(fm: Foreman) -> None:
    error = fm.submit(boom, 3).exception(timeout=30)
    assert isinstance(error, CustomError)
    assert "raise CustomError" in error.remote_traceback


def test_exception_whose_type_cannot_be_rebuilt_becomes_remote_error(fm: Foreman) -> None:
    def raise_unpicklable(x: int) -> int:
        class Local(Exception):
            def __reduce__(self):
                raise TypeError("no pickling me")
        raise Local("weird")

    error = fm.submit(raise_unpicklable, 1).exception(timeout=30)
    assert isinstance(error, RemoteError)
    assert error.type_name.endswith("Local") and error.message == "weird"
    assert "in raise_unpicklable" in error.remote_traceback  # by-value code has no source file to quote


def test_system_exit_in_a_task_is_an_error_not_a_dead_worker(fm: Foreman) -> None:
    assert isinstance(fm.submit(exit_task, 1).exception(timeout=30), SystemExit)
    assert fm._server.scheduler.workers_lost == 0
    assert fm.map(square, [2]) == [4]


def test_unpicklable_function_fails_at_submit_in_the_caller(fm: Foreman) -> None:
    lock = threading.Lock()

    def uses_lock(x: int) -> int:
        with lock:
            return x

    with pytest.raises(SerializationError, match="cannot pickle function .*uses_lock"):
        fm.submit(uses_lock, 1)
    with pytest.raises(SerializationError, match="cannot pickle function"):
        fm.map(uses_lock, [1, 2])


def test_unpicklable_argument_fails_with_the_task_named(fm: Foreman) -> None:
    with pytest.raises(SerializationError, match="argument"):
        fm.submit(square, threading.Lock())
    with pytest.raises(SerializationError, match="argument of task 2"):
        fm.map(square, [1, 2, threading.Lock(), 4])


def test_unpicklable_result_fails_that_task_only(fm: Foreman) -> None:
    def lock_at_two(x: int) -> object:
        return return_lock(x) if x == 2 else x

    job = fm.imap(lock_at_two, range(5))
    assert [next(job), next(job)] == [0, 1]
    with pytest.raises(SerializationError, match="result of this task .*lock.* cannot be pickled"):
        next(job)


def test_an_iterable_that_raises_surfaces_in_order(fm: Foreman) -> None:
    def source():
        yield 1
        yield 2
        raise KeyError("input broke")

    job = fm.imap(square, source())
    assert [next(job), next(job)] == [1, 4]
    with pytest.raises(KeyError, match="input broke"):
        next(job)


def test_an_argument_over_the_message_limit_is_refused() -> None:
    with Foreman(port=0, max_message_size=256 * 1024) as fm:
        with pytest.raises(SerializationError, match="over the .*limit"):
            fm.submit(len, b"x" * 300_000)


def test_not_callable() -> None:
    with Foreman(port=0) as fm, pytest.raises(TypeError, match="callable"):
        fm.submit(42)


def _closes_within(foreman_like: object, seconds: float = 30.0) -> bool:
    """Close (shutdown) in a daemon thread: True if it returned in time (a dead event loop makes it hang)."""
    close = getattr(foreman_like, "shutdown", None) or getattr(foreman_like, "close")
    thread = threading.Thread(target=close, daemon=True)
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


@pytest.mark.parametrize("interrupt", [False, True], ids=["SystemExit", "KeyboardInterrupt"])
def test_a_result_that_raises_systemexit_when_unpickled_fails_only_its_future(interrupt: bool) -> None:
    """Unpickling a result runs the worker's bytes: one whose __reduce__ raises SystemExit or KeyboardInterrupt
    must fail its own future with a clear error, not kill the foreman's event loop (then later submits hang and
    close() never returns)."""
    fm = Foreman(port=0, local_workers=1, dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    try:
        fm.wait_for_workers(1, timeout=30)
        error = fm.submit(exit_on_load, interrupt).exception(timeout=30)
        assert isinstance(error, SerializationError), error
        assert ("SystemExit" if not interrupt else "KeyboardInterrupt") in str(error)
        assert fm.submit(square, 7).result(timeout=30) == 49
        assert list(fm.imap(square, range(5), timeout=30)) == [0, 1, 4, 9, 16]
        with pytest.raises(SerializationError):  # map decodes in the caller's thread: the same clear error
            fm.map(exit_on_load, [interrupt], timeout=30)
    finally:
        assert _closes_within(fm), "close() did not return: the foreman's event loop died"


@pytest.mark.parametrize("interrupt", [False, True], ids=["SystemExit", "KeyboardInterrupt"])
def test_an_executor_survives_a_result_that_raises_when_unpickled(interrupt: bool) -> None:
    executor = ForemanExecutor(max_workers=1, dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    try:
        error = executor.submit(exit_on_load, interrupt).exception(timeout=30)
        assert isinstance(error, SerializationError), error
        assert executor.submit(square, 6).result(timeout=30) == 36
        assert list(executor.map(square, range(3), timeout=30)) == [0, 1, 4]
    finally:
        assert _closes_within(executor), "shutdown() did not return: the foreman's event loop died"
