"""``ForemanExecutor`` against the behaviours CPython's own executor tests check (Lib/test/test_concurrent_futures
in 3.13: executor.py, test_as_completed.py, test_wait.py, test_shutdown.py, test_deadlock.py, test_init.py),
written here from those behaviours. Each test names the CPython test it follows.

A real foreman and real worker processes on loopback; interpreter-exit behaviours run a real script in a
subprocess. The differences that remain on purpose are listed in the README's API section (and tested at the end).
"""

from __future__ import annotations

import concurrent.futures
import gc
import logging
import multiprocessing
import pickle
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import psutil
import pytest

import conformance_tasks as t
from conftest import wait_until
from foreman import ForemanExecutor
from foreman.errors import CannotPickleError, CannotUnpickleError, InitializerError, RemoteTraceback, TaskLostError

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
SHORT = 60  # seconds: the bound on every wait for a result that should come (a loaded machine is slow)
TESTS = Path(__file__).parent


def _new(max_workers: int = 2, **options: Any) -> ForemanExecutor:
    return ForemanExecutor(max_workers=max_workers, **FAST, **options)


@pytest.fixture(scope="module")
def executor() -> Iterator[ForemanExecutor]:
    ex = _new(2)
    try:
        yield ex
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children()}


def _run_script(body: str) -> subprocess.CompletedProcess[str]:
    """Run a script (with the tests folder on its path) to its end, as a user would."""
    script = "import sys\nsys.path.insert(0, %r)\n" % str(TESTS) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


# -- executor.py -------------------------------------------------------------------------------------------------

def test_submit_keyword_arguments_named_like_submits_own(executor: ForemanExecutor) -> None:
    """test_submit_keyword: ``self`` and ``fn`` are ordinary keyword arguments of the call."""
    assert executor.submit(t.mul, 2, y=8).result(timeout=SHORT) == 16
    assert executor.submit(t.capture, 1, self=2, fn=3).result(timeout=SHORT) == ((1,), {"self": 2, "fn": 3})
    with pytest.raises(TypeError):
        executor.submit(fn=t.capture, arg=1)  # type: ignore[call-arg]


def test_map_several_iterables_and_chunksize(executor: ForemanExecutor) -> None:
    """test_map: like the builtin map, with and without a chunksize."""
    expected = list(map(pow, range(10), range(10)))
    assert list(executor.map(pow, range(10), range(10))) == expected
    assert list(executor.map(pow, range(10), range(10), chunksize=3)) == expected


def test_map_timeout_after_the_results_that_came(executor: ForemanExecutor) -> None:
    """test_map_timeout: the results before the slow one come, then TimeoutError."""
    results = []
    with pytest.raises(concurrent.futures.TimeoutError):
        for value in executor.map(time.sleep, [0, 0, 30], timeout=10):
            results.append(value)
    assert results == [None, None]


def test_map_frees_each_result_once_the_caller_drops_it(executor: ForemanExecutor) -> None:
    """test_free_reference (issue 14406): the iterator keeps no reference to a result it yielded."""
    for obj in executor.map(t.make_dummy, range(10)):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_map_frees_results_in_a_batch_of_several(executor: ForemanExecutor) -> None:
    """The same when results come in batches (chunksize): the rest of a batch does not keep a yielded one."""
    for obj in executor.map(t.make_dummy, range(12), chunksize=4):
        ref = weakref.ref(obj)
        del obj
        gc.collect()
        assert ref() is None


def test_no_stale_reference_to_a_submitted_callable(executor: ForemanExecutor) -> None:
    """test_no_stale_references (issue 16284): a future dropped by the caller does not keep its callable."""
    obj = t.Dummy()
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    executor.submit(obj.method)
    del obj
    assert collected.wait(SHORT), f"still referenced: {ref()}"


# -- test_wait.py / test_as_completed.py --------------------------------------------------------------------------

def test_wait_first_exception_returns_at_the_failure(executor: ForemanExecutor) -> None:
    """test_first_exception: FIRST_EXCEPTION returns once a call fails, before a slow one ends."""
    slow = executor.submit(time.sleep, 8)
    failing = executor.submit(divmod, 2, 0)
    done, not_done = concurrent.futures.wait([slow, failing], timeout=SHORT,
                                             return_when=concurrent.futures.FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    assert isinstance(failing.exception(), ZeroDivisionError)
    slow.result(timeout=SHORT)


def test_as_completed_yields_a_duplicate_future_once(executor: ForemanExecutor) -> None:
    """test_duplicate_futures (issue 20367)."""
    future = executor.submit(time.sleep, 0.5)
    assert list(concurrent.futures.as_completed([future, future, future], timeout=SHORT)) == [future]


# -- test_deadlock.py: what each failure surfaces as ---------------------------------------------------------------

def test_unpicklable_argument_gives_a_future_failing_with_pickling_error(executor: ForemanExecutor) -> None:
    """test_error_at_task_pickle: submit returns; the future's result raises PicklingError (ours says which
    argument)."""
    future = executor.submit(t.identity, t.ErrorAtPickle())
    with pytest.raises(pickle.PicklingError, match="cannot pickle the argument") as raised:
        future.result(timeout=SHORT)
    assert isinstance(raised.value, CannotPickleError)


def test_unpicklable_result_raises_pickling_error(executor: ForemanExecutor) -> None:
    """test_error_during_result_pickle_on_worker."""
    with pytest.raises(pickle.PicklingError, match="cannot be pickled"):
        executor.submit(t.make, t.ErrorAtPickle).result(timeout=SHORT)


@pytest.mark.parametrize("bad", [t.ErrorAtUnpickle, t.ExitAtUnpickle], ids=["error", "SystemExit"])
def test_argument_that_fails_to_unpickle_in_the_worker_is_broken_process_pool(executor: ForemanExecutor,
                                                                              bad: type) -> None:
    """test_error_at_task_unpickle, test_exit_at_task_unpickle: BrokenProcessPool, and the worker goes on."""
    with pytest.raises(BrokenProcessPool, match="cannot unpickle the batch's arguments") as raised:
        executor.submit(t.identity, bad()).result(timeout=SHORT)
    assert isinstance(raised.value, CannotUnpickleError)
    assert executor.submit(t.mul, 6, 7).result(timeout=SHORT) == 42


def test_result_that_fails_to_unpickle_here_is_broken_process_pool(executor: ForemanExecutor) -> None:
    """test_error_during_result_unpickle_in_result_handler."""
    with pytest.raises(BrokenProcessPool, match="cannot unpickle a result"):
        executor.submit(t.make, t.ErrorAtUnpickle).result(timeout=SHORT)
    assert executor.submit(t.mul, 6, 7).result(timeout=SHORT) == 42


def test_system_exit_in_a_task_surfaces_as_system_exit(executor: ForemanExecutor) -> None:
    """test_exit_during_func_exec_on_worker."""
    with pytest.raises(SystemExit):
        executor.submit(t.exit_now).result(timeout=SHORT)


def test_system_exit_while_pickling_a_result_surfaces_as_system_exit(executor: ForemanExecutor) -> None:
    """test_exit_during_result_pickle_on_worker: the task process survives it, and SystemExit comes back."""
    with pytest.raises(SystemExit):
        executor.submit(t.make, t.ExitAtPickle).result(timeout=SHORT)
    assert executor.submit(t.mul, 6, 7).result(timeout=SHORT) == 42


def test_remote_traceback_offers_tb_like_the_stdlib(executor: ForemanExecutor) -> None:
    """ProcessPoolExecutor's ``exc.__cause__`` is a _RemoteTraceback with ``.tb``: ours offers ``.tb`` too."""
    error = executor.submit(divmod, 1, 0).exception(timeout=SHORT)
    assert isinstance(error, ZeroDivisionError)
    assert isinstance(error.__cause__, RemoteTraceback)
    assert "ZeroDivisionError" in error.__cause__.tb and error.__cause__.tb == error.__cause__.traceback


def test_system_exit_while_unpickling_a_result_here_is_broken_process_pool() -> None:
    """test_exit_during_result_unpickle_in_result_handler: BrokenProcessPool, and the executor goes on (before
    the fix, the SystemExit ended the foreman's event loop: the future never settled)."""
    before = _children()
    ex = _new(1)
    workers = _children() - before
    try:
        with pytest.raises(BrokenProcessPool):
            ex.submit(t.make, t.ExitAtUnpickle).result(timeout=20)
        assert ex.submit(t.mul, 6, 7).result(timeout=SHORT) == 42
    finally:
        closer = threading.Thread(target=ex.shutdown, daemon=True)
        closer.start()
        closer.join(timeout=20)
        for pid in workers:  # if the loop died, close() could not stop them
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def test_call_that_kills_its_process_fails_with_broken_process_pool() -> None:
    """test_crash_during_func_exec_on_worker: after its retries on other processes (a fleet's choice), a call
    that kills every process it runs in fails with an instance of BrokenProcessPool, and the fleet goes on."""
    with _new(2, max_task_losses=2) as ex:
        with pytest.raises(BrokenProcessPool) as raised:
            ex.submit(t.crash).result(timeout=SHORT)
        assert isinstance(raised.value, TaskLostError)
        assert ex.submit(t.mul, 6, 7).result(timeout=SHORT) == 42


# -- test_init.py --------------------------------------------------------------------------------------------------

def test_initializer_runs_once_per_task_process() -> None:
    """test_initializer: every call sees the initializer's work, done once in each process."""
    with _new(2, initializer=t.init, initargs=("initialized",)) as ex:
        seen = [ex.submit(t.init_status).result(timeout=SHORT) for _ in range(6)]
        seen += list(ex.map(t.init_status, range(6)))
    for pid, calls in seen:
        assert calls == ["initialized"], (pid, calls)


def test_failing_initializer_breaks_the_executor(caplog: pytest.LogCaptureFixture) -> None:
    """FailingInitializerMixin.test_initializer: the call fails with BrokenProcessPool, the error is logged on
    the ``concurrent.futures`` logger, and from then on submit raises BrokenProcessPool."""
    with caplog.at_level(logging.CRITICAL, logger="concurrent.futures"):
        with _new(2, initializer=t.init_fail) as ex:
            with pytest.raises(BrokenProcessPool) as raised:
                ex.submit(t.init_status).result(timeout=SHORT)
            assert isinstance(raised.value, InitializerError)
            assert "ValueError: error in initializer" in str(raised.value)
            wait_until(lambda: bool(ex._broken), timeout=SHORT)  # as CPython's test reads it
            with pytest.raises(BrokenProcessPool):
                ex.submit(t.init_status)
            with pytest.raises(BrokenProcessPool):
                ex.map(t.init_status, range(3))
    assert any("Exception in initializer" in r.getMessage() and "ValueError: error in initializer" in r.getMessage()
               for r in caplog.records)


# -- test_shutdown.py ----------------------------------------------------------------------------------------------

def test_cancel_futures_cancels_the_queued_and_finishes_the_started() -> None:
    """test_cancel_futures: many cancelled, at least one finished, none left pending."""
    ex = _new(2)
    futures = [ex.submit(time.sleep, 0.1) for _ in range(50)]
    ex.shutdown(cancel_futures=True)
    cancelled = [f for f in futures if f.cancelled()]
    others = [f for f in futures if not f.cancelled()]
    assert len(cancelled) > 20
    assert others, "every call was cancelled: none had started"
    for future in others:
        assert future.done() and future.exception() is None


def test_shutdown_without_wait_still_delivers_map_results() -> None:
    """test_shutdown_no_wait: the results of a map made before shutdown(wait=False) all come."""
    ex = _new(2)
    results = ex.map(abs, range(-5, 5))
    ex.shutdown(wait=False)
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    wait_until(lambda: ex.foreman._closed, timeout=SHORT)


def test_executor_dropped_without_shutdown_shuts_down() -> None:
    """test_del_shutdown: collecting the executor shuts it down (its workers exit) once its work is done, and a
    map made before still gives every result."""
    before = _children()
    ex = _new(2)
    workers = {psutil.Process(pid) for pid in _children() - before}
    assert workers
    results = ex.map(abs, range(-5, 5))
    ref = weakref.ref(ex)
    del ex
    gc.collect()
    assert ref() is None
    assert list(results) == [5, 4, 3, 2, 1, 0, 1, 2, 3, 4]
    gone, alive = psutil.wait_procs(workers, timeout=SHORT)
    assert not alive


def test_pending_work_completes_at_interpreter_exit_silently() -> None:
    """test_interpreter_shutdown: a script that submits and ends gets its call's output, and nothing else."""
    done = _run_script("""
        from foreman import ForemanExecutor
        from conformance_tasks import sleep_and_print
        if __name__ == "__main__":
            ex = ForemanExecutor(3)
            ex.submit(sleep_and_print, 1.0, "apple")
    """)
    assert done.stderr == ""
    assert done.stdout.strip() == "apple"


def test_shutdown_without_wait_at_the_end_of_a_script_still_completes() -> None:
    """test_hang_gh83386: shutdown(wait=False) and the script ends: the call still runs, and nothing hangs."""
    done = _run_script("""
        from foreman import ForemanExecutor
        from conformance_tasks import sleep_and_print
        if __name__ == "__main__":
            ex = ForemanExecutor(3)
            ex.submit(sleep_and_print, 1.0, "apple")
            ex.shutdown(wait=False)
    """)
    assert done.stderr == ""
    assert done.stdout.strip() == "apple"


def test_submit_from_an_atexit_handler_raises_runtime_error() -> None:
    """test_submit_after_interpreter_shutdown: by the time atexit handlers run, the executor takes no work."""
    done = _run_script("""
        import atexit
        @atexit.register
        def run_last():
            try:
                ex.submit(id, None)
            except RuntimeError:
                print("runtime-error")
                raise
        from foreman import ForemanExecutor
        if __name__ == "__main__":
            ex = ForemanExecutor(2)
            ex.submit(id, 42).result()
    """)
    assert "RuntimeError: cannot schedule new futures after interpreter shutdown" in done.stderr
    assert done.stdout.strip() == "runtime-error"


# -- conscious differences (README: API) ---------------------------------------------------------------------------

def test_manager_proxy_works_on_the_executors_own_workers(executor: ForemanExecutor) -> None:
    """test_init's log queue, test_shutdown's semaphore: a Manager proxy passed to a call connects back to this
    process's manager, as from a process pool's children (the executor's local workers hold its authkey)."""
    with multiprocessing.get_context("spawn").Manager() as manager:
        event = manager.Event()
        assert executor.submit(t.set_event, event).result(timeout=SHORT) is True
        assert event.is_set()


def test_manager_proxy_fails_clearly_on_workers_without_the_authkey() -> None:
    """A difference: a fleet's other workers are not this process's children and do not hold its authkey, so a
    proxy does not connect back from them. The call fails at once with BrokenProcessPool saying so, rather than
    hanging; the fleet goes on. (Here: an executor over a foreman not made to share the key.)"""
    from foreman import Foreman

    with Foreman(port=0, local_workers=1, **FAST) as fm, fm.executor() as ex:
        with multiprocessing.get_context("spawn").Manager() as manager:
            future = ex.submit(t.set_event, manager.Event())
            with pytest.raises(BrokenProcessPool, match="cannot unpickle.*AuthenticationError"):
                future.result(timeout=SHORT)
        assert ex.submit(t.mul, 6, 7).result(timeout=SHORT) == 42
