"""A restricted unpickler for results sent by workers the foreman does not trust.

Unpickling runs code: a pickle may name any importable callable and call it (``os.system``, ``eval``...). A
foreman open to strangers therefore loads their results with :func:`safe_loads`, which only rebuilds plain data:
numbers, strings, bytes, containers, a few value types from the standard library, the built-in exception types,
and whatever the operator registers with :func:`register_safe_type` (numpy arrays are registered when numpy is
importable). Anything else is refused with an error naming the type, before any of its code runs.

Plain data can still be a bomb: ``bytearray(10**8)`` or ``list(range(10**8))`` is a 47-byte pickle. Every call
a pickle makes to a container or byte-string constructor is therefore charged against a budget before it runs:
its size in bytes (8 per element of a container, 1 per byte or character). One load may build at most
``max(MIN_BUILD_BUDGET, BUILD_BUDGET_PER_BYTE x the pickle's size)`` bytes through such calls; a pickle that asks
for more is refused at once, having allocated nothing large. (What a pickle builds with its own opcodes is
bounded by its size already.)
"""

from __future__ import annotations

import builtins
import io
import pickle
from collections.abc import Callable
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


#: Bytes one load may build through constructor calls, at least (see the module docstring): bounds the memory a
#: small pickle from an untrusted worker can make the loader allocate.
MIN_BUILD_BUDGET = 1024 * 1024
#: ...and per byte of the pickle, so that a large honest result (a list rebuilt by ``list(...)``) still loads.
BUILD_BUDGET_PER_BYTE = 8

#: Constructors whose calls are charged: what one element or unit of their result costs, in bytes.
_CHARGED: dict[tuple[str, str], int] = {
    ("builtins", "bytes"): 1, ("builtins", "bytearray"): 1, ("builtins", "str"): 1,
    ("builtins", "list"): 8, ("builtins", "tuple"): 8, ("builtins", "set"): 8, ("builtins", "frozenset"): 8,
    ("builtins", "dict"): 8, ("collections", "OrderedDict"): 8, ("collections", "deque"): 8,
    ("collections", "Counter"): 8,
}
_SIZED_TYPES = (str, bytes, bytearray, list, tuple, dict, set, frozenset, range)


def register_safe_type(module: str, name: str) -> None:
    """Allow ``module.name`` in results from untrusted workers. Only register types whose unpickling cannot
    run arbitrary code (plain value classes); a registered callable can be called with attacker-chosen
    arguments."""
    _SAFE.add((module, name))


def _is_builtin_exception(name: str) -> bool:
    value = getattr(builtins, name, None)
    return isinstance(value, type) and issubclass(value, BaseException)


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes | memoryview) -> None:
        super().__init__(io.BytesIO(data))
        self.budget = max(MIN_BUILD_BUDGET, BUILD_BUDGET_PER_BYTE * memoryview(data).nbytes)

    def find_class(self, module: str, name: str) -> Any:
        allowed = (module == "builtins" and (name in _BUILTIN_DATA or _is_builtin_exception(name))) \
            or (module, name) in _SAFE or ((module, name) in _NUMPY and _numpy_available())
        if not allowed:
            raise pickle.UnpicklingError(
                f"refused to load {module}.{name}: results from untrusted workers may only contain plain data "
                f"(use trust_workers=True for a fleet you trust, or register_safe_type({module!r}, {name!r}) "
                f"for a harmless value type)")
        found = super().find_class(module, name)
        unit = _CHARGED.get((module, name))
        return found if unit is None else self._charged(found, unit)

    def _charged(self, constructor: Callable[..., Any], unit: int) -> Callable[..., Any]:
        """``constructor``, charging each call's size to the budget before it runs. Only sized arguments (and,
        for bytes and bytearray, a length) are let through: an iterator's size is unknown until it has run."""
        def build(*args: Any) -> Any:
            size = 0
            for arg in args:
                if isinstance(arg, _SIZED_TYPES):
                    try:
                        size += len(arg)
                    except OverflowError:  # a range longer than sys.maxsize
                        size = self.budget + 1
                elif isinstance(arg, int) and not isinstance(arg, bool) and unit == 1:
                    size += max(arg, 0)  # bytes(n), bytearray(n): n zero bytes
                elif arg is not None and not isinstance(arg, (int, float)):
                    raise pickle.UnpicklingError(f"refused to call {constructor.__name__} on a "
                                                 f"{type(arg).__name__}: results from untrusted workers may only "
                                                 "build containers from sized data")
            cost = size * unit
            if cost > self.budget:
                raise pickle.UnpicklingError(f"refused to build {cost} bytes with {constructor.__name__}: over what "
                                             f"this result may build ({self.budget} bytes left)")
            self.budget -= cost
            return constructor(*args)

        return build


def safe_loads(data: bytes | memoryview) -> Any:
    """Load a pickle built only from allowed types, within a budget of what it may build (see the module
    docstring); SerializationError naming the first refused type or call."""
    try:
        return _RestrictedUnpickler(data).load()
    except pickle.UnpicklingError as exc:
        raise SerializationError(str(exc)) from None
    except Exception as exc:
        raise SerializationError(f"cannot unpickle a result: {type(exc).__name__}: {exc}") from exc


def _numpy_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None
