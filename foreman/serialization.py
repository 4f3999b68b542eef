"""Pickling of functions, argument batches, result batches and remote exceptions.

One place decides how user objects become bytes and back, on both sides of the wire. Functions and arguments
use cloudpickle (so lambdas, closures and functions from ``__main__`` travel by value) with pickle protocol 5;
large ``bytes`` and ``bytearray`` arguments travel beside the pickle (out of band), not copied into it.
Results are loaded with :func:`loads_results`; the foreman's trust policy for worker-sent bytes lives there.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import platform
import struct
import sys
import sysconfig
import traceback
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import cloudpickle

from foreman.errors import (
    CannotPickleError,
    CannotUnpickleError,
    CrowdComputeError,
    InitializerError,
    RemoteError,
    RemoteTraceback,
    SerializationError,
)
from foreman.safe_pickle import safe_loads

PICKLE_PROTOCOL = 5

#: A worker must match this to unpickle a job's function (cloudpickle needs the same Python minor version).
ENV_FINGERPRINT = f"py{sys.version_info[0]}.{sys.version_info[1]}/cloudpickle{cloudpickle.__version__.split('.')[0]}"
#: The same, as the foreman's WELCOME tells each worker (``jobs_env``, protocol 4): one that differs says so.
JOBS_ENV = {"python": f"{sys.version_info[0]}.{sys.version_info[1]}",
            "cloudpickle": cloudpickle.__version__.split(".")[0]}


def env_mismatch(jobs_env: Any) -> str | None:
    """Why this process cannot run the jobs of a foreman whose WELCOME says they need ``jobs_env`` (one line, for
    the worker's log and dashboard), or None when it can (or the foreman did not say)."""
    if not isinstance(jobs_env, dict) or jobs_env == JOBS_ENV:
        return None
    python, pickler = str(jobs_env.get("python", "?")), str(jobs_env.get("cloudpickle", "?"))
    return (f"this foreman's jobs need Python {python} with cloudpickle {pickler}.x, and this worker runs "
            f"{describe_env()}: it stays connected but gets no work (run it under Python {python} with "
            f"cloudpickle {pickler}.x)")

_function_cache: weakref.WeakKeyDictionary[Any, tuple[str, bytes]] = weakref.WeakKeyDictionary()


def describe_env() -> str:
    return f"Python {platform.python_version()} with cloudpickle {cloudpickle.__version__}"


def dumps_function(fn: Callable[..., Any]) -> tuple[str, bytes]:
    """Pickle a job's function once; returns (sha256 hex digest, bytes). Cached per function object."""
    if not callable(fn):
        raise TypeError(f"expected a callable, got {type(fn).__name__}")
    try:
        return _function_cache[fn]
    except (KeyError, TypeError):
        pass
    try:
        data = cloudpickle.dumps(fn, protocol=PICKLE_PROTOCOL)
    except Exception as exc:
        raise CannotPickleError(f"cannot pickle function {_name(fn)}: {type(exc).__name__}: {exc}") from exc
    entry = (function_digest(data), data)
    try:
        _function_cache[fn] = entry
    except TypeError:
        pass  # not weak-referenceable (some builtins): pickled again next time
    return entry


def function_digest(function: bytes | memoryview) -> str:
    """The SHA-256 hex digest of a pickled function: the key workers cache functions by. The foreman computes it
    itself from the bytes it ships (a digest a client names is never used), so no client can make its function
    stand in for another's in a worker's cache."""
    return hashlib.sha256(function).hexdigest()


def ship_by_value(fn: Callable[..., Any]) -> None:
    """Make ``fn``'s module travel by value (pickled with the function) when it is a local module: one of the
    user's own files rather than an installed package or the standard library, so workers on other machines,
    which do not have it, can still run ``fn``. Modules that module imports are not shipped: register them with
    ``cloudpickle.register_pickle_by_value(module)``."""
    module = sys.modules.get(getattr(fn, "__module__", None) or "")
    path = getattr(module, "__file__", None)
    if module is None or path is None or module.__name__ == "__main__" or "." in module.__name__:
        return  # __main__ travels by value anyway; submodules of packages are left to the user
    installed = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    if not any(os.path.abspath(path).startswith(os.path.abspath(root) + os.sep) for root in installed):
        cloudpickle.register_pickle_by_value(module)


#: ``bytes`` and ``bytearray`` objects at least this large are pickled out of band by :func:`dumps_items`: sent as
#: they are beside the pickle, and received as their own ``bytes`` in the task process. That saves two copies of
#: them (into the pickle and out of it) and costs a Python call per object pickled, so it is only used where the
#: caller expects large arguments.
OUT_OF_BAND_BYTES = 64 * 1024


class Pickled(NamedTuple):
    """A pickled argument batch: the pickle, and the out-of-band buffers it refers to by index, in order.

    ``framed``: ``data`` is one pickle per task behind a table of their sizes (see :func:`dumps_framed`), not one
    pickled list; such a batch has no out-of-band buffers, and is split by slicing, never by unpickling."""

    data: bytes
    buffers: tuple[bytes, ...] = ()
    framed: bool = False

    @property
    def nbytes(self) -> int:
        return len(self.data) + sum(len(buffer) for buffer in self.buffers)


class _OutOfBandPickler(cloudpickle.Pickler):
    """Pickles large ``bytes`` and ``bytearray`` objects as references to buffers kept beside the pickle."""

    def __init__(self, file: io.BytesIO, buffers: list[bytes]) -> None:
        super().__init__(file, protocol=PICKLE_PROTOCOL)
        self._buffers = buffers
        self._seen: dict[int, int] = {}  # id of a buffered object -> its index (an object sent twice goes once)

    def persistent_id(self, obj: Any) -> tuple[bool, int] | None:
        kind = type(obj)
        if (kind is not bytes and kind is not bytearray) or len(obj) < OUT_OF_BAND_BYTES:
            return None
        index = self._seen.get(id(obj))
        if index is None:
            index = self._seen[id(obj)] = len(self._buffers)
            self._buffers.append(obj if kind is bytes else bytes(obj))  # a bytearray may change after the call
        return (kind is bytearray, index)


class _OutOfBandUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, buffers: Sequence[bytes | memoryview]) -> None:
        super().__init__(io.BytesIO(data))
        self._buffers = buffers
        self._loaded: dict[int, bytes | bytearray] = {}  # an object referred to twice is rebuilt once

    def persistent_load(self, pid: Any) -> bytes | bytearray:
        writable, index = pid
        obj = self._loaded.get(index)
        if obj is None:
            buffer = self._buffers[index]
            obj = self._loaded[index] = bytearray(buffer) if writable else bytes(buffer)  # bytes(b) is b: no copy
        return obj


def dumps_items(items: Sequence[Any], first_index: int = 0, out_of_band: bool = True) -> Pickled:
    """Pickle a batch of task arguments as one list. Names the task whose argument cannot be pickled.

    ``out_of_band``: leave large ``bytes`` and ``bytearray`` objects out of the pickle (see
    :data:`OUT_OF_BAND_BYTES`); False pickles everything in band, faster for many small arguments.
    """
    try:
        if not out_of_band:
            return Pickled(cloudpickle.dumps(items, protocol=PICKLE_PROTOCOL))
        buffers: list[bytes] = []
        with io.BytesIO() as file:
            _OutOfBandPickler(file, buffers).dump(items)
            return Pickled(file.getvalue(), tuple(buffers))
    except Exception:
        for offset, item in enumerate(items):
            try:
                cloudpickle.dumps(item, protocol=PICKLE_PROTOCOL)
            except Exception as exc:
                raise CannotPickleError(f"cannot pickle the argument of task {first_index + offset} "
                                        f"({type(item).__name__}): {type(exc).__name__}: {exc}") from exc
        raise


from foreman.protocol import FRAME_SIZE as _FRAME_SIZE  # noqa: E402 - beside its only use


def dumps_framed(items: Sequence[Any], first_index: int = 0) -> Pickled:
    """Pickle a batch of task arguments one pickle per task, behind a table of their sizes::

        [size of task 0's pickle: u32 big-endian] ... [size of task n-1's pickle] [pickle 0] ... [pickle n-1]

    Each task's argument is its own byte slice, so whoever holds the batch without trusting its sender (the
    foreman, for a remote client's job) can split it, journal it and send its tasks on as opaque slices, never
    unpickling them (:func:`split_framed`). Costs a pickler call per task (about 0.3 us for a small argument,
    against 0.01 us inside one pickled list): used for a remote client's input and stored jobs only.
    """
    with io.BytesIO() as file:
        pickler = cloudpickle.Pickler(file, protocol=PICKLE_PROTOCOL)
        ends = []
        try:
            for item in items:
                pickler.dump(item)
                pickler.clear_memo()  # each pickle stands alone: no reference into another task's
                ends.append(file.tell())
        except Exception as exc:
            index = first_index + len(ends)
            raise SerializationError(f"cannot pickle the argument of task {index} "
                                     f"({type(items[len(ends)]).__name__}): {type(exc).__name__}: {exc}") from exc
        sizes = [end - begin for begin, end in zip([0, *ends], ends)]
        return Pickled(struct.pack(f">{len(sizes)}I", *sizes) + file.getvalue(), framed=True)


def framed_slices(data: bytes | memoryview, count: int) -> list[memoryview]:
    """The ``count`` tasks' pickles of a framed batch, as views of ``data``; ValueError saying what is wrong when
    its table does not describe exactly ``count`` pickles filling the rest of ``data``. Unpickles nothing."""
    view = memoryview(data)
    table = _FRAME_SIZE.size * count
    if view.nbytes < table:
        raise ValueError(f"a framed batch of {count} tasks needs a {table}-byte table of sizes, "
                         f"it has {view.nbytes} bytes in all")
    sizes = struct.unpack_from(f">{count}I", view)
    if table + sum(sizes) != view.nbytes:
        raise ValueError(f"a framed batch's table of sizes adds up to {table + sum(sizes)} bytes, "
                         f"its payload holds {view.nbytes}")
    slices, offset = [], table
    for size in sizes:
        slices.append(view[offset:offset + size])
        offset += size
    return slices


def frame(slices: Sequence[bytes | memoryview]) -> Pickled:
    """A framed batch of these tasks' pickles (slices of framed batches: see :func:`framed_slices`)."""
    sizes = [memoryview(part).nbytes for part in slices]
    return Pickled(b"".join([struct.pack(f">{len(sizes)}I", *sizes), *slices]), framed=True)


def loads_items(data: bytes | memoryview, buffers: Sequence[bytes | memoryview] = (), framed: bool = False,
                count: int | None = None) -> Any:
    """Load an argument batch pickled by :func:`dumps_items` or, ``framed``, by :func:`dumps_framed` (then
    ``count`` is its number of tasks). Trusted input only: unpickling runs code."""
    if framed:
        assert count is not None
        return [pickle.loads(part) for part in framed_slices(data, count)]
    if not buffers:
        return pickle.loads(data)
    return _OutOfBandUnpickler(data, buffers).load()


def split_payload(payload: Pickled, count: int) -> list[Pickled]:
    """A batch of ``count`` arguments as ``count`` single-task batches. A framed batch is cut into its slices,
    unpickling nothing; a pickled list is unpickled and each item pickled again, which only the process that
    pickled it may do (an in-process job of the foreman: its own user's objects)."""
    if payload.framed:
        return [frame([part]) for part in framed_slices(payload.data, count)]
    items = loads_items(payload.data, payload.buffers)
    if len(items) != count:
        raise ValueError(f"payload holds {len(items)} items, expected {count}")
    return [dumps_items([item]) for item in items]


# -- results (worker -> foreman) ------------------------------------------------------------------------------

#: One task's failure: (pickled exception or None, type name, message, traceback text).
ErrorEntry = tuple[bytes | None, str, str, str]


def error_entry(exc: BaseException, skip_frames: int = 0) -> ErrorEntry:
    """Capture an exception raised by a task, on the worker, leaving out ``skip_frames`` of our own frames."""
    tb = exc.__traceback__
    for _ in range(skip_frames):
        tb = tb.tb_next if tb is not None and tb.tb_next is not None else tb
    text = "".join(traceback.format_exception(type(exc), exc, tb))
    try:
        data: bytes | None = cloudpickle.dumps(exc, protocol=PICKLE_PROTOCOL)
    except Exception:
        data = None
    return (data, _qualname(type(exc)), str(exc), text)


def dumps_results(results: list[Any], errors: dict[int, ErrorEntry]) -> bytes:
    """Pickle a batch's outcomes; a result that cannot be pickled becomes that task's error (CannotPickleError,
    or what its pickling raised if that was SystemExit or another BaseException, as ProcessPoolExecutor does)."""
    try:
        return cloudpickle.dumps((results, errors), protocol=PICKLE_PROTOCOL)
    except BaseException:  # noqa: BLE001 - a result's __reduce__ may raise SystemExit: the child must go on
        pass
    for index, value in enumerate(results):
        if index in errors:
            continue
        try:
            cloudpickle.dumps(value, protocol=PICKLE_PROTOCOL)
        except Exception as exc:
            results[index] = None
            failure = CannotPickleError(f"the result of this task ({type(value).__name__}) cannot be pickled: "
                                        f"{type(exc).__name__}: {exc}")
            errors[index] = (None, "foreman.errors.CannotPickleError", str(failure), "")
        except BaseException as exc:  # noqa: BLE001
            results[index] = None
            errors[index] = error_entry(exc)
    return cloudpickle.dumps((results, errors), protocol=PICKLE_PROTOCOL)


def loads_results(payload: bytes | memoryview, count: int,
                  trusted: bool = True) -> tuple[list[Any], dict[int, ErrorEntry]]:
    """Load a batch's outcomes sent by a worker; ``trusted=False`` refuses anything but plain data."""
    if not trusted:
        outcome = safe_loads(payload)
    else:
        try:
            outcome = pickle.loads(payload)
        except BaseException as exc:  # the worker's bytes run here: SystemExit from a __reduce__ is their doing
            raise CannotUnpickleError(f"cannot unpickle a result batch: {type(exc).__name__}: {exc}") from exc
    if not (isinstance(outcome, tuple) and len(outcome) == 2 and isinstance(outcome[0], list)
            and isinstance(outcome[1], dict) and len(outcome[0]) == count):
        raise CannotUnpickleError(f"a worker sent a result batch of the wrong shape (expected {count} results)")
    return outcome


def rebuild_exception(entry: ErrorEntry, trusted: bool = True) -> BaseException:
    """The exception a task raised, with its original type where it unpickles and the remote traceback attached.

    From untrusted workers only built-in exception types are rebuilt; others become RemoteError.
    """
    if not (isinstance(entry, tuple) and len(entry) == 4 and all(isinstance(x, str) for x in entry[1:])
            and isinstance(entry[0], (bytes, type(None)))):
        return SerializationError("a worker sent a malformed error report")
    data, type_name, message, text = entry
    exc: BaseException | None = None
    if data is not None:
        try:
            exc = pickle.loads(data) if trusted else safe_loads(data)
        except BaseException:  # noqa: BLE001 - a worker's bytes: whatever they raise, report the error as text
            exc = None
    if not isinstance(exc, BaseException):
        own = _OWN_ERRORS.get(type_name)
        if own is not None:
            exc = own(message)
        else:
            exc = RemoteError(type_name, message, text)
    if text:
        exc.__cause__ = RemoteTraceback(text)
        try:
            exc.remote_traceback = text  # type: ignore[attr-defined]
        except AttributeError:
            pass  # exception types with __slots__
    return exc


#: Our errors a worker may report by name alone (no pickled exception): rebuilt as themselves.
_OWN_ERRORS: dict[str, type[CrowdComputeError]] = {
    f"foreman.errors.{cls.__name__}": cls
    for cls in (SerializationError, CannotPickleError, CannotUnpickleError, InitializerError)}


def _qualname(cls: type) -> str:
    module = cls.__module__
    return cls.__qualname__ if module == "builtins" else f"{module}.{cls.__qualname__}"


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)
