"""Running an executor's ``initializer`` once per task process: shipped in place of the function when
``ForemanExecutor(initializer=...)`` is given.

No change to the workers or the wire: the first call of the executor's work in a task process runs
``initializer(*initargs)`` there, and later calls in that process skip it. A task process that is replaced (after
a crash or a hung task) runs it again, as a new ``ProcessPoolExecutor`` process does. An initializer that raises
leaves that process broken for the executor: every call of the executor's work there raises
:class:`~foreman.errors.InitializerError` (a ``BrokenProcessPool``) without running the initializer again, and the
executor that sees one stops taking work. Imported by task processes: keep it to the standard library.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from foreman.errors import InitializerError

#: In a task process: executor token -> None once its initializer ran, or the one-line reason it failed.
_done: dict[str, str | None] = {}


class Initialized:
    """Call ``fn``, after ``initializer(*initargs)`` has run once in this process for the executor ``token``."""

    def __init__(self, fn: Callable[..., Any], initializer: Callable[..., Any], initargs: tuple[Any, ...],
                 token: str) -> None:
        self.fn = fn
        self.initializer = initializer
        self.initargs = initargs
        self.token = token
        self.__qualname__ = getattr(fn, "__qualname__", repr(fn))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.token not in _done:
            try:
                self.initializer(*self.initargs)
            except BaseException as exc:  # noqa: BLE001 - a SystemExit in the initializer breaks it too
                _done[self.token] = f"{type(exc).__name__}: {exc}"
                name = getattr(self.initializer, "__qualname__", repr(self.initializer))
                raise InitializerError(f"the executor's initializer {name} raised in this worker's task process: "
                                       f"{_done[self.token]}; the executor is broken (fix the initializer)") from exc
            _done[self.token] = None
        failed = _done[self.token]
        if failed is not None:
            raise InitializerError(f"the executor's initializer failed earlier in this task process ({failed}); "
                                   f"the executor is broken (fix the initializer)")
        return self.fn(*args, **kwargs)
