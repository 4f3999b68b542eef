"""A restricted unpickler for results sent by workers the foreman does not trust.

Unpickling runs code: a pickle may name any importable callable and call it (``os.system``, ``eval``...). A
foreman open to strangers therefore loads their results with :func:`safe_loads`, which only rebuilds plain data:
numbers, strings, bytes, containers, a few value types from the standard library, the built-in exception types,
and whatever the operator registers with :func:`register_safe_type` (numpy arrays are registered when numpy is
importable). Anything else is refused with an error naming the type, before any of its code runs.
"""

from __future__ import annotations

import builtins
import io
import pickle
from typing import Any

from foreman.errors import SerializationError

_BUILTIN_DATA = {"list", "dict", "tuple", "set", "frozenset", "bytes", "bytearray", "str", "int", "float",
                 "complex", "bool", "range", "slice", "object"}

_SAFE: set[tuple[str, str]] = {
    ("collections", "OrderedDict"), ("collections", "deque"), ("collections", "Counter"),
    ("datetime", "datetime"), ("datetime", "date"), ("datetime", "time"), ("datetime", "timedelta"),
    ("datetime", "timezone"), ("decimal", "Decimal"), ("fractions", "Fraction"), ("uuid", "UUID"),
    ("foreman.errors", "TaskTimeoutError"),  # raised by the worker's own time limits
    ("copyreg", "_reconstructor"),  # plain-object rebuild; the class it names must itself be allowed
}

#: numpy's pickles name these; registered only when numpy is importable (never imported here).
_NUMPY = [("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
          ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
          ("numpy._core.multiarray", "scalar"), ("numpy", "float64"), ("numpy", "int64")]


def register_safe_type(module: str, name: str) -> None:
    """Allow ``module.name`` in results from untrusted workers. Only register types whose unpickling cannot
    run arbitrary code (plain value classes); a registered callable can be called with attacker-chosen
    arguments."""
    _SAFE.add((module, name))


def _is_builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        allowed = (module == "builtins" and (name in _BUILTIN_DATA or _is_builtin_exception(name))) \
            or (module, name) in _SAFE or ((module, name) in _NUMPY and _numpy_available())
        if not allowed:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: results from untrusted workers may only contain plain data "
                f"(use trust_workers=True for a fleet you trust, or register_safe_type({module!r}, {name!r}) "
                f"for a harmless value type)")
        return super().find_class(module, name)


def safe_loads(data: bytes | memoryview) -> Any:
    """Load a pickle built only from allowed types; SerializationError naming the first refused type."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise SerializationError(str(exc)) from None
    except Exception as exc:
        raise SerializationError(f"cannot unpickle a result: {type(exc).__name__}: {exc}") from exc


def _numpy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None
