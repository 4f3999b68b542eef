"""The CrowdCompute foreman: ``Foreman(local_workers=2).map(fn, items)``.

Attributes are imported on first use, so that a worker importing :mod:`foreman.protocol` does not pull in the
foreman's server.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from foreman.client import Foreman, Job
    from foreman.executor import ForemanExecutor

_LAZY = {"Foreman": "foreman.client", "Job": "foreman.client", "ForemanExecutor": "foreman.executor"}

__all__ = ["Foreman", "ForemanExecutor", "Job"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'foreman' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
