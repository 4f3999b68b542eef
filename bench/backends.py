"""One small adapter per system under test, all with the same interface.

``start(n_workers)`` starts the system and returns the seconds from "start it" to the first result of one
trivial task; ``map(fn, items)`` returns the results in order; ``roundtrip(fn, arg)`` submits one task and
waits for its result; ``close()`` shuts everything down (workers included) before the next backend starts.

Each backend's package is imported only when that backend runs, so a missing optional package (dask, ray)
skips that backend with a note instead of failing the run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import tasks

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent


def worker_pythonpath() -> str:
    """An import path on which worker processes of every backend find ``tasks`` and the project's packages."""
    parts = [str(BENCH_DIR), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))


class Backend:
    name = "?"
    #: Package whose absence skips this backend.
    requires: str | None = None
    #: Trivial-task count this backend gets in a full run: systems with per-task scheduling get fewer.
    trivial_n = 200_000

    def __init__(self) -> None:
        self.n_workers = 0

    @classmethod
    def missing(cls) -> str | None:
        """Why this backend cannot run here, or None."""
        if cls.requires and importlib.util.find_spec(cls.requires) is None:
            return f"{cls.requires} is not installed (pip install -e .[bench])"
        return None

    def start(self, n_workers: int) -> float:
        raise NotImplementedError

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        raise NotImplementedError

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class CrowdCompute(Backend):
    """``Foreman(port=0, local_workers=n)``: embedded foreman in this process plus n real worker processes."""

    name = "crowdcompute"
    requires = "foreman"

    def __init__(self, chunksize: int | None = None) -> None:
        super().__init__()
        self.fm: Any = None
        self.chunksize = chunksize

    def start(self, n_workers: int) -> float:
        from foreman import Foreman

        self.n_workers = n_workers
        t0 = time.perf_counter()
        self.fm = Foreman(port=0, local_workers=n_workers)
        self.fm.submit(tasks.inc, 1).result(timeout=120)
        elapsed = time.perf_counter() - t0
        # The first result needs one worker; the rest must be connected before anything is timed.
        self.fm.wait_for_workers(n_workers, timeout=120)
        return elapsed

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return self.fm.map(fn, items, chunksize=self.chunksize)

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.fm.submit(fn, arg).result()

    def close(self) -> None:
        if self.fm is not None:
            self.fm.close()
            self.fm = None


class MultiprocessingPool(Backend):
    """``multiprocessing.Pool(n)`` with its default start method and ``map``'s default chunksize."""

    name = "multiprocessing"

    def __init__(self) -> None:
        super().__init__()
        self.pool: Any = None

    def start(self, n_workers: int) -> float:
        import multiprocessing

        self.n_workers = n_workers
        t0 = time.perf_counter()
        self.pool = multiprocessing.Pool(n_workers)
        self.pool.apply(tasks.inc, (1,))
        return time.perf_counter() - t0

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return self.pool.map(fn, items)

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.pool.apply(fn, (arg,))

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


class ProcessPool(Backend):
    """``concurrent.futures.ProcessPoolExecutor(n)``; ``map`` with chunksize 1 (its default)."""

    name = "processpool"
    trivial_n = 20_000

    def __init__(self) -> None:
        super().__init__()
        self.executor: Any = None

    def start(self, n_workers: int) -> float:
        from concurrent.futures import ProcessPoolExecutor

        self.n_workers = n_workers
        t0 = time.perf_counter()
        self.executor = ProcessPoolExecutor(n_workers)
        self.executor.submit(tasks.inc, 1).result()
        return time.perf_counter() - t0

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        return list(self.executor.map(fn, items, chunksize=1))

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.executor.submit(fn, arg).result()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True)
            self.executor = None


class Dask(Backend):
    """``dask.distributed``: ``LocalCluster(n_workers=n, threads_per_worker=1, processes=True)``."""

    name = "dask"
    requires = "distributed"
    trivial_n = 20_000

    def __init__(self) -> None:
        super().__init__()
        self.cluster: Any = None
        self.client: Any = None

    def start(self, n_workers: int) -> float:
        import logging

        from distributed import Client, LocalCluster

        for name in ("distributed", "tornado"):  # keep its shutdown chatter out of the table
            logging.getLogger(name).setLevel(logging.ERROR)
        self.n_workers = n_workers
        os.environ["PYTHONPATH"] = worker_pythonpath()
        t0 = time.perf_counter()
        self.cluster = LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True,
                                    dashboard_address=None)
        self.client = Client(self.cluster)
        self.client.submit(tasks.inc, 1, pure=False).result()
        return time.perf_counter() - t0

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        futures = self.client.map(fn, items, pure=False)
        try:
            return self.client.gather(futures)
        finally:
            del futures

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.client.submit(fn, arg, pure=False).result()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None


class Ray(Backend):
    """Ray on this machine only: ``ray.init(num_cpus=n, include_dashboard=False)``, one CPU per task."""

    name = "ray"
    requires = "ray"
    trivial_n = 20_000

    def __init__(self) -> None:
        super().__init__()
        self.ray: Any = None
        self._remote: dict[Callable[..., Any], Any] = {}

    def start(self, n_workers: int) -> float:
        import logging

        import ray

        self.ray = ray
        self.n_workers = n_workers
        os.environ["PYTHONPATH"] = worker_pythonpath()  # Ray's workers import ``tasks`` by name
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        t0 = time.perf_counter()
        ray.init(num_cpus=n_workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=True)
        ray.get(self._task(tasks.inc).remote(1))
        return time.perf_counter() - t0

    def _task(self, fn: Callable[..., Any]) -> Any:
        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = self.ray.remote(num_cpus=1)(fn)
        return remote

    def map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        remote = self._task(fn)
        return self.ray.get([remote.remote(item) for item in items])

    def roundtrip(self, fn: Callable[[Any], Any], arg: Any) -> Any:
        return self.ray.get(self._task(fn).remote(arg))

    def close(self) -> None:
        if self.ray is not None:
            self.ray.shutdown()
            self.ray = None
            self._remote.clear()


BACKENDS: dict[str, type[Backend]] = {b.name: b for b in (CrowdCompute, MultiprocessingPool, ProcessPool, Dask, Ray)}

#: Accepted spellings on the command line.
ALIASES = {"cc": "crowdcompute", "foreman": "crowdcompute", "pool": "multiprocessing", "mp": "multiprocessing",
           "ppe": "processpool", "processpoolexecutor": "processpool", "concurrent.futures": "processpool",
           "distributed": "dask"}

#: Column headings in the table and chart.
LABELS = {"crowdcompute": "CrowdCompute", "multiprocessing": "multiprocessing.Pool",
          "processpool": "ProcessPoolExecutor", "dask": "Dask distributed", "ray": "Ray local"}


def resolve(names: str) -> list[str]:
    out = []
    for raw in names.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        name = ALIASES.get(name, name)
        if name not in BACKENDS:
            raise SystemExit(f"unknown backend {raw!r}; choose from {', '.join(BACKENDS)}")
        out.append(name)
    return out


def python_info() -> str:
    return sys.version.split()[0]
