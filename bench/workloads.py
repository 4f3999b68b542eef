"""The workloads. Each returns a list of records (plain dicts) that ``run.py`` prints, stores and draws.

Shared workloads run on every backend through the adapter interface; ``imap``, ``scaling`` and ``fleet``
exercise CrowdCompute only (they need its ``imap``, its worker command line or its batching knobs).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any

import tasks
from backends import BENCH_DIR, Backend, CrowdCompute, worker_pythonpath

SHARED = ("startup", "trivial", "roundtrip", "cpu", "payload")
CROWDCOMPUTE_ONLY = ("imap", "scaling", "fleet", "joblib")
ALL = SHARED + CROWDCOMPUTE_ONLY

MB = 1_000_000  # payload sizes and MB/s are decimal megabytes; RSS is reported in MiB


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: the full run's, or ``--quick``'s."""

    quick: bool
    workers: int = 2
    startup_repeats: int = 3
    trivial_scale: float = 1.0  # times each backend's trivial_n
    trivial_repeats: int = 3  # for backends whose one run is short
    roundtrip_calls: int = 300  # per round
    roundtrip_warmup: int = 20
    cpu_tasks: int = 200
    cpu_seconds: float = 0.020
    payload_tasks: int = 200
    payload_bytes: int = 1 * MB
    payload_warmup: int = 20  # untimed tasks first: a process's first megabytes pay for growing its memory
    #: Round-trip rounds, CPU jobs and payload jobs measured per backend; the figure is their median (round
    #: trips: of every call), so one unlucky second of a shared host does not decide it.
    repeats: int = 3
    imap_lengths: tuple[int, ...] = (1_000_000, 10_000_000)
    scaling_workers: tuple[int, ...] = (1, 2, 4, 8)
    scaling_tiny: int = 200_000
    scaling_cpu_tasks: int = 100
    fleet_slowdown: float = 4.0
    fleet_tiny_tasks: int = 20_000
    fleet_tiny_seconds: float = 0.0001
    fleet_cpu_tasks: int = 200
    joblib_tiny_tasks: int = 20_000
    joblib_cpu_tasks: int = 200
    joblib_cpu_seconds: float = 0.020
    workload_timeout: float = 600.0

    @classmethod
    def for_run(cls, quick: bool) -> Sizes:
        if not quick:
            return cls(quick=False)
        return cls(quick=True, startup_repeats=1, trivial_scale=0.1, trivial_repeats=1, roundtrip_calls=50,
                   roundtrip_warmup=5, cpu_tasks=20, payload_tasks=20, payload_warmup=2, repeats=1,
                   imap_lengths=(100_000, 1_000_000), scaling_tiny=20_000, scaling_cpu_tasks=16,
                   fleet_tiny_tasks=2_000, fleet_cpu_tasks=30, joblib_tiny_tasks=2_000, joblib_cpu_tasks=30,
                   workload_timeout=150.0)


def record(workload: str, metric: str, value: float | None, unit: str, backend: str = "crowdcompute",
           n: int | None = None, **extra: Any) -> dict[str, Any]:
    return {"backend": backend, "workload": workload, "metric": metric, "value": value, "unit": unit, "n": n,
            **extra}


# -- shared workloads -----------------------------------------------------------------------------------------

def startup(backend_cls: type[Backend], first: float, sizes: Sizes) -> list[dict[str, Any]]:
    """Start-up to the first result: the run's own start plus ``startup_repeats - 1`` fresh starts."""
    samples = [first]
    for _ in range(sizes.startup_repeats - 1):
        backend = backend_cls()
        try:
            samples.append(backend.start(sizes.workers))
        finally:
            backend.close()
    return [record("startup", "startup_s", statistics.median(samples), "s", backend_cls.name, n=sizes.workers,
                   samples=samples)]


def trivial(backend: Backend, sizes: Sizes) -> list[dict[str, Any]]:
    """Throughput of ``inc`` over N items through ``map``."""
    n = max(100, int(backend.trivial_n * sizes.trivial_scale))
    items = list(range(n))
    samples = []
    spent = 0.0
    while len(samples) < sizes.trivial_repeats and (not samples or spent < 5.0):
        t0 = time.perf_counter()
        results = backend.map(tasks.inc, items)
        elapsed = time.perf_counter() - t0
        if len(results) != n or results[0] != 1 or results[-1] != n:
            raise RuntimeError(f"{backend.name}: wrong results from map(inc, range({n}))")
        samples.append(n / elapsed)
        spent += elapsed
    return [record("trivial", "tasks_per_s", statistics.median(samples), "tasks/s", backend.name, n=n,
                   samples=samples)]


def roundtrip(backend: Backend, sizes: Sizes) -> list[dict[str, Any]]:
    """Latency of one task: submit ``inc(1)`` and wait for its result, in a loop (``repeats`` rounds of
    ``roundtrip_calls``); the median and p99 are of every call, and each round's median is recorded."""
    for _ in range(sizes.roundtrip_warmup):
        backend.roundtrip(tasks.inc, 1)
    latencies: list[float] = []
    rounds = []
    for _ in range(sizes.repeats):
        these = []
        for i in range(sizes.roundtrip_calls):
            t0 = time.perf_counter()
            result = backend.roundtrip(tasks.inc, i)
            these.append(time.perf_counter() - t0)
            if result != i + 1:
                raise RuntimeError(f"{backend.name}: inc({i}) returned {result!r}")
        rounds.append(1000 * statistics.median(these))
        latencies.extend(these)
    latencies.sort()
    ms = [x * 1000 for x in latencies]
    n = len(ms)
    return [record("roundtrip", "median_ms", statistics.median(ms), "ms", backend.name, n=n, round_medians=rounds),
            record("roundtrip", "p99_ms", percentile(ms, 99), "ms", backend.name, n=n),
            record("roundtrip", "max_ms", ms[-1], "ms", backend.name, n=n)]


def cpu(backend: Backend, sizes: Sizes) -> list[dict[str, Any]]:
    """Parallel efficiency of CPU-bound tasks: (tasks x CPU seconds each / workers) / measured time, the median
    of ``repeats`` jobs.

    Also reports the CPU the system itself used during that job (this process and all its descendants, less the
    tasks' own CPU): on a machine with as many cores as workers, every such CPU second is taken from the tasks.
    """
    items = [sizes.cpu_seconds] * sizes.cpu_tasks
    jobs = []
    for _ in range(sizes.repeats):
        cpu0 = tree_cpu()
        t0 = time.perf_counter()
        used = backend.map(tasks.busy, items)
        elapsed = time.perf_counter() - t0
        overhead = tree_cpu() - cpu0 - sum(used)
        ideal = sum(used) / backend.n_workers
        jobs.append((100 * ideal / elapsed, elapsed, ideal, 1000 * overhead / len(used)))
    efficiency, elapsed, ideal, overhead_ms = sorted(jobs)[len(jobs) // 2]  # the median job, whole
    return [record("cpu", "efficiency_pct", efficiency, "%", backend.name, n=sizes.cpu_tasks,
                   seconds=elapsed, ideal_seconds=ideal, task_seconds=sizes.cpu_seconds,
                   samples=[job[0] for job in jobs]),
            record("cpu", "overhead_cpu_ms_per_task", overhead_ms, "ms", backend.name, n=sizes.cpu_tasks,
                   samples=[job[3] for job in jobs])]


def tree_cpu() -> float:
    """CPU seconds used so far by this process and its living descendants."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for process in [me, *me.children(recursive=True)]:
        try:
            if any(arg.endswith("load.py") for arg in process.cmdline()):
                continue  # the benchmark's own load watcher, not the system under test
            times = process.cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def payload(backend: Backend, sizes: Sizes) -> list[dict[str, Any]]:
    """Bandwidth for large arguments: N distinct 1 MB ``bytes`` objects, each task returns ``len``; the median of
    ``repeats`` jobs. An untimed job of a few such tasks comes first, as the round trips' warm-up: every backend's
    processes grow their memory for messages this large once."""
    size = sizes.payload_bytes
    items = [bytes([i % 256]) * size for i in range(sizes.payload_tasks)]  # distinct objects: no pickle memo
    backend.map(tasks.payload_len, items[:sizes.payload_warmup])
    samples = []
    for _ in range(sizes.repeats):
        t0 = time.perf_counter()
        results = backend.map(tasks.payload_len, items)
        elapsed = time.perf_counter() - t0
        if results != [size] * len(items):
            raise RuntimeError(f"{backend.name}: wrong results from map(len, payloads)")
        samples.append(len(items) * size / MB / elapsed)
    return [record("payload", "mb_per_s", statistics.median(samples), "MB/s", backend.name, n=len(items),
                   bytes_each=size, samples=samples)]


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- CrowdCompute only ----------------------------------------------------------------------------------------

def imap_rss(sizes: Sizes) -> list[dict[str, Any]]:
    """Peak RSS of the foreman's process while ``imap`` streams N items, for two N (see ``imap_rss.py``)."""
    command = [sys.executable, str(BENCH_DIR / "imap_rss.py"), *map(str, sizes.imap_lengths)]
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    done = subprocess.run(command, capture_output=True, text=True, timeout=sizes.workload_timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"imap_rss.py exited with {done.returncode}: {done.stderr.strip()[-2000:]}")
    data = json.loads(done.stdout.strip().splitlines()[-1])
    runs = data["runs"]
    out = [record("imap", "peak_rss_mb", data["peak_mb"], "MiB", n=runs[-1]["n"], rss_start_mb=data["rss_start_mb"],
                  rss_ready_mb=data["rss_ready_mb"], runs=runs)]
    for run in runs:
        out.append(record("imap", "peak_rss_mb_at_n", run["peak_mb"], "MiB", n=run["n"]))
        out.append(record("imap", "tasks_per_s", run["tasks_per_s"], "tasks/s", n=run["n"]))
    out.append(record("imap", "rss_growth_mb", runs[-1]["peak_mb"] - runs[0]["peak_mb"], "MiB",
                      n=runs[-1]["n"], from_n=runs[0]["n"]))
    if done.stderr.strip():
        out[0]["stderr"] = done.stderr.strip()[-2000:]
    return out


def scaling(sizes: Sizes) -> list[dict[str, Any]]:
    """CrowdCompute with 1, 2, 4, 8 local workers: start-up, tiny-task throughput, CPU-task speed-up."""
    out: list[dict[str, Any]] = []
    cores = os.cpu_count() or 1
    base_seconds = None
    for n in sizes.scaling_workers:
        backend = CrowdCompute()
        try:
            started = backend.start(n)
            out.append(record("scaling", "startup_s", started, "s", workers=n))
            items = list(range(sizes.scaling_tiny))
            t0 = time.perf_counter()
            backend.map(tasks.inc, items)
            elapsed = time.perf_counter() - t0
            out.append(record("scaling", "tiny_tasks_per_s", sizes.scaling_tiny / elapsed, "tasks/s",
                              n=sizes.scaling_tiny, workers=n))
            t0 = time.perf_counter()
            used = backend.map(tasks.busy, [sizes.cpu_seconds] * sizes.scaling_cpu_tasks)
            elapsed = time.perf_counter() - t0
            if base_seconds is None:
                base_seconds = elapsed
            ideal = sum(used) / min(n, cores)
            out.append(record("scaling", "cpu_seconds", elapsed, "s", n=sizes.scaling_cpu_tasks, workers=n))
            out.append(record("scaling", "cpu_speedup", base_seconds / elapsed, "x", n=sizes.scaling_cpu_tasks,
                              workers=n, vs_workers=sizes.scaling_workers[0]))
            out.append(record("scaling", "cpu_efficiency_pct", 100 * ideal / elapsed, "%",
                              n=sizes.scaling_cpu_tasks, workers=n, cores=cores,
                              note="ideal time uses min(workers, cores)"))
        finally:
            backend.close()
    return out


def fleet(sizes: Sizes) -> list[dict[str, Any]]:
    """A fast and a slow worker (BENCH_SLOWDOWN) on one foreman: adaptive batching vs fixed chunksizes.

    Two ``python -m worker --concurrency 1`` processes dial an embedded foreman with no local workers; the
    slow one does ``fleet_slowdown`` times the work per task. The ideal job time splits the work in
    proportion to speed: ``N x t / (1 + 1/slowdown)``. Each job runs with adaptive batching (the default),
    with chunksize 1, and with the chunksize ``multiprocessing.Pool.map`` would pick, ``ceil(N / (4 x 2))``.
    """
    from foreman import Foreman

    out: list[dict[str, Any]] = []
    env = dict(os.environ, PYTHONPATH=worker_pythonpath())
    flags = worker_flags(env)
    with Foreman(port=0, local_workers=0) as fm:
        processes = []
        try:
            for worker_id, factor in (("bench-fast", 1.0), ("bench-slow", sizes.fleet_slowdown)):
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "worker", fm.address, "--concurrency", "1", "--worker-id", worker_id,
                     "--parent-pid", str(os.getpid()), "--log-level", "WARNING", *flags],
                    env=dict(env, **{tasks.SLOWDOWN_VARIABLE: str(factor)}), stdin=subprocess.DEVNULL))
            fm.wait_for_workers(2, timeout=120)
            fm.map(tasks.inc, range(10))  # both workers have started their task processes
            speed = 1.0 + 1.0 / sizes.fleet_slowdown  # fast-worker task rates the fleet is worth
            for kind, n, seconds in (("tiny", sizes.fleet_tiny_tasks, sizes.fleet_tiny_seconds),
                                     ("cpu20ms", sizes.fleet_cpu_tasks, sizes.cpu_seconds)):
                ideal = n * seconds / speed
                for label, chunksize in (("adaptive", None), ("chunksize=1", 1),
                                         (f"chunksize={math.ceil(n / 8)}", math.ceil(n / 8))):
                    t0 = time.perf_counter()
                    factors = fm.map(tasks.fleet_task, [seconds] * n, chunksize=chunksize)
                    elapsed = time.perf_counter() - t0
                    slow_share = sum(1 for f in factors if f != 1.0) / n
                    out.append(record("fleet", "seconds", elapsed, "s", n=n, tasks=kind, batching=label,
                                      task_seconds=seconds, slowdown=sizes.fleet_slowdown, ideal_seconds=ideal,
                                      efficiency_pct=100 * ideal / elapsed, slow_share=slow_share,
                                      ideal_slow_share=(1 / sizes.fleet_slowdown) / speed))
        finally:
            for process in processes:
                if process.poll() is None:
                    process.terminate()  # drains: nothing is queued by now, so it leaves at once
            for process in processes:
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    return out


def worker_flags(env: dict[str, str]) -> list[str]:
    """Optional ``python -m worker`` flags this version knows: no per-worker dashboard in a benchmark."""
    try:
        done = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True,
                              timeout=60, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return ["--no-dashboard"] if "--no-dashboard" in done.stdout else []


def joblib_backends(sizes: Sizes) -> list[dict[str, Any]]:
    """``joblib.Parallel`` over the fleet (joblib's auto-batching, and one fleet call per joblib call) beside
    joblib's own loky backend and Dask's joblib backend (when dask.distributed is installed), with the same
    worker count: tiny calls (``inc``: batching decides) and CPU calls (``burn``: parallelism decides).
    """
    import joblib

    import foreman.joblib_backend  # noqa: F401 - registers "crowdcompute"
    from foreman import Foreman

    workers = sizes.workers
    out: list[dict[str, Any]] = []

    def measure(label: str, **config: Any) -> None:
        with joblib.parallel_config(n_jobs=workers, **config):
            joblib.Parallel()(joblib.delayed(tasks.inc)(i) for i in range(100))  # warm: workers up, code loaded
            t0 = time.perf_counter()
            joblib.Parallel()(joblib.delayed(tasks.inc)(i) for i in range(sizes.joblib_tiny_tasks))
            tiny = time.perf_counter() - t0
            t0 = time.perf_counter()
            joblib.Parallel()(joblib.delayed(tasks.burn)(sizes.joblib_cpu_seconds)
                              for _ in range(sizes.joblib_cpu_tasks))
            cpu = time.perf_counter() - t0
        ideal = sizes.joblib_cpu_tasks * sizes.joblib_cpu_seconds / workers
        out.append(record("joblib", "tiny_tasks_per_s", sizes.joblib_tiny_tasks / tiny, "tasks/s", backend=label,
                          n=sizes.joblib_tiny_tasks))
        out.append(record("joblib", "cpu_efficiency", ideal / cpu, "fraction", backend=label,
                          n=sizes.joblib_cpu_tasks, seconds=cpu))

    with Foreman(port=0, local_workers=workers) as fm:
        fm.wait_for_workers(workers, timeout=60)
        measure("crowdcompute-joblib-batching", backend="crowdcompute", foreman=fm, batching="joblib")
        measure("crowdcompute-no-batching", backend="crowdcompute", foreman=fm, batching="none")
    measure("loky", backend="loky")
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        out.append(record("joblib", "skipped", None, "", backend="dask", why="dask.distributed is not installed"))
    else:
        with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True) as cluster, Client(cluster):
            measure("dask", backend="dask")
    return out
