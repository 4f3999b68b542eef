"""Task functions and objects for tests/test_executor_conformance.py. Workers import this module by reference."""

from __future__ import annotations

import os
import signal
import sys
import time

INITIALIZED: list[object] = []  # in a task process: the initargs of each initializer call there


def init(value: object) -> None:
    INITIALIZED.append(value)


def init_status(_: object = None) -> tuple[int, list[object]]:
    """(pid of this task process, the initializer calls it saw)."""
    return os.getpid(), list(INITIALIZED)


def init_fail() -> None:
    raise ValueError("error in initializer")


def mul(x: int, y: int) -> int:
    return x * y


def capture(*args: object, **kwargs: object) -> tuple[tuple[object, ...], dict[str, object]]:
    return args, kwargs


class Dummy:
    def method(self) -> None:
        pass


def make_dummy(_: object) -> Dummy:
    return Dummy()


def sleep_and_print(seconds: float, message: str) -> None:
    time.sleep(seconds)
    print(message)
    sys.stdout.flush()


def exit_now() -> None:
    sys.exit(1)


def crash() -> None:
    """Kill this task process, as a segfault in a C extension would."""
    os.kill(os.getpid(), signal.SIGKILL)


def identity(x: object) -> object:
    return x


def make(cls: type) -> object:
    return cls()


def _raise(kind: type[BaseException]) -> None:
    raise kind("raised while unpickling")


class ErrorAtPickle:
    def __reduce__(self) -> object:
        from pickle import PicklingError

        raise PicklingError("error in pickle")


class ErrorAtUnpickle:
    def __reduce__(self) -> object:
        from pickle import UnpicklingError

        return _raise, (UnpicklingError,)


class ExitAtPickle:
    def __reduce__(self) -> object:
        sys.exit(1)


class ExitAtUnpickle:
    def __reduce__(self) -> object:
        return sys.exit, (1,)


def set_event(event: object) -> bool:
    """Set a ``multiprocessing.Manager().Event()`` proxy passed in (it connects back to the caller's manager)."""
    event.set()  # type: ignore[attr-defined]
    return True
