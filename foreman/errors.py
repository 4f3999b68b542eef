"""The exceptions CrowdCompute raises. Each message says what happened and what to do about it."""

from __future__ import annotations

import errno
import json
import pickle
from concurrent.futures.process import BrokenProcessPool
from typing import Any


class CrowdComputeError(Exception):
    """Base class of every CrowdCompute error."""


class PortInUseError(CrowdComputeError, OSError):
    """A port the foreman was to listen on is taken by another program: choose another port (``port=`` /
    ``http_port=``; ``--port`` / ``--http-port`` on the command line), or stop that program. ``role`` says which
    port: ``"port"`` (the workers' WebSocket port) or ``"http_port"`` (the dashboard's)."""

    def __init__(self, role: str, host: str, port: int) -> None:
        what = "the dashboard's port" if role == "http_port" else "the port workers dial"
        super().__init__(errno.EADDRINUSE, f"port {port} on {host} ({what}) is already in use by another program")
        self.role, self.host, self.port = role, host, port

    def __str__(self) -> str:
        return str(self.strerror)


class ProtocolError(CrowdComputeError):
    """A message broke the wire protocol (malformed, oversized, out of order). The connection is closed."""


class AuthenticationError(CrowdComputeError):
    """The foreman refused this peer's token. Check the --token given to the worker or client."""


class VersionMismatchError(CrowdComputeError):
    """The two sides speak different protocol versions. Upgrade the older side."""


class SerializationError(CrowdComputeError):
    """A function, argument or result could not be pickled or unpickled."""


class CannotPickleError(SerializationError, pickle.PicklingError):
    """A function, argument or result could not be pickled. A ``pickle.PicklingError``, the type
    ``ProcessPoolExecutor`` raises there. Make the object picklable (a module-level function or class, no open
    files, locks or sockets in it), or build it inside the task."""


class CannotUnpickleError(SerializationError, BrokenProcessPool):
    """A task's argument would not unpickle on the worker, or its result would not unpickle here (the class is
    missing on one side, or its ``__reduce__`` raised). A ``BrokenProcessPool``, the type ``ProcessPoolExecutor``
    raises there; unlike its pool, the fleet goes on. Install the same code on both sides."""


class RemoteError(CrowdComputeError):
    """A task raised an exception whose type cannot be rebuilt here; it carries the remote details."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = traceback


class RemoteTraceback(Exception):
    """Set as ``__cause__`` of a re-raised task exception, so the remote traceback prints with it.
    ``.traceback`` is its text, also as ``.tb`` (the name ``ProcessPoolExecutor``'s ``_RemoteTraceback`` uses)."""

    def __init__(self, traceback: str) -> None:
        super().__init__(traceback)
        self.traceback = traceback

    @property
    def tb(self) -> str:
        return self.traceback

    def __str__(self) -> str:
        return f'\n"""\nRemote traceback:\n{self.traceback}"""'


class TaskLostError(CrowdComputeError, BrokenProcessPool):
    """A task was in flight on too many workers that died (a poison task: it crashes its process, or the
    workers that ran it vanished). It is not retried again. A ``BrokenProcessPool``, the type
    ``ProcessPoolExecutor`` raises when a call kills its process; unlike its pool, the fleet goes on."""


class InitializerError(CrowdComputeError, BrokenProcessPool):
    """The ``initializer`` of a :class:`~foreman.executor.ForemanExecutor` raised in a task process. That process
    runs none of the executor's calls, and the executor takes no more work (``submit`` raises BrokenProcessPool),
    as ``ProcessPoolExecutor`` does. The message and the remote traceback say what the initializer raised."""


class ForemanClosedError(CrowdComputeError):
    """The foreman was shut down (or the connection to it lost) before the work finished."""


class TaskTimeoutError(CrowdComputeError):
    """A task ran longer than the worker's ``--max-task-seconds`` cap and was stopped. Make the task shorter,
    or run it on workers with a higher cap."""


def describe_failure(error: BaseException) -> str:
    """A foreman-side failure (a lost task, a shutdown) as JSON, for a client to rebuild (never pickle)."""
    return json.dumps({"type": type(error).__name__, "message": str(error)})


def rebuild_failure(described: Any) -> BaseException:
    """The exception :func:`describe_failure` described: CrowdCompute's own types come back as themselves."""
    try:
        info = json.loads(described)
        name, message = str(info["type"]), str(info["message"])
    except (TypeError, ValueError, KeyError):
        return RemoteError("unknown", f"the foreman reported a failure it did not describe: {described!r}", "")
    cls = globals().get(name)
    if isinstance(cls, type) and issubclass(cls, CrowdComputeError) and cls is not RemoteError:
        return cls(message)
    return RemoteError(name, message, "")


class ValidationError(CrowdComputeError):
    """Replicas of a task (``redundancy`` / ``spot_check``) did not agree often enough to accept any result.

    ``candidates`` lists every result given, as ``(worker id, value or exception)`` pairs. Either the task is not
    deterministic (pass a ``comparator`` that accepts close results, e.g. for floats) or workers are lying
    (see their reputation on the dashboard).
    """

    def __init__(self, message: str, task: int, candidates: list[tuple[str, object]]) -> None:
        super().__init__(message)
        self.task = task
        self.candidates = candidates

    def __reduce__(self) -> tuple[type[ValidationError], tuple[str, int, list[tuple[str, object]]]]:
        return (type(self), (str(self), self.task, self.candidates))
