"""Live figures for the dashboard: a sampler thread that reads the machine once a second, and the JSON documents
the dashboard serves (their shapes are documented in ``docs/worker-api.md``).

psutil and NVML calls can block for milliseconds, so they run only on the sampler's thread; requests read its
cached figures and never wait on them. Without psutil the machine figures are null; without NVML there are no GPUs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker import sysinfo
from worker.sysinfo import GpuMonitor, psutil
from worker.worker import VERSION

if TYPE_CHECKING:
    from worker.worker import Worker

log = logging.getLogger("crowdcompute.worker")

#: Seconds between samples.
SAMPLE_INTERVAL = 1.0
#: Samples kept for the charts: 300 at one a second is the last 5 minutes, about 100 KB.
HISTORY_SAMPLES = 300
#: Batches of the history sent with each live snapshot.
LIVE_BATCHES = 15


@dataclass(frozen=True)
class Sample:
    """One point of the charts."""

    time: float  # wall clock
    cpu: float | None  # percent of all cores
    memory: float | None  # percent of physical memory in use
    gpus: tuple[float | None, ...]  # utilisation percent, per GPU
    tasks_completed: int

    def as_dict(self) -> dict[str, Any]:
        return {"time": round(self.time, 3), "cpu": self.cpu, "memory": self.memory, "gpus": list(self.gpus),
                "tasks_completed": self.tasks_completed}


class Sampler:
    """Reads CPU, memory, load, network, process and GPU figures every ``interval`` seconds on its own thread.

    :param tasks_completed: reads the worker's completed-task counter, sampled with the machine for the rate.
    :param history: samples kept (``interval`` x ``history`` seconds of charts).
    """

    def __init__(self, tasks_completed: Callable[[], int], interval: float = SAMPLE_INTERVAL,
                 history: int = HISTORY_SAMPLES) -> None:
        self.interval = interval
        self.system: dict[str, Any] = {}
        self.gpus: list[dict[str, Any]] = []
        self._tasks_completed = tasks_completed
        self._samples: deque[Sample] = deque(maxlen=history)
        self._gpu: GpuMonitor | None = None
        self._process: Any = None
        self._network: tuple[float, int, int] | None = None  # time, bytes sent, bytes received
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="crowdcompute-sampler", daemon=True)

    def start(self) -> None:
        """Take a first sample, then one every interval on the sampler thread. Blocks ~0.1 s: call it off the loop."""
        self._gpu = GpuMonitor()
        if psutil is not None:
            self._process = psutil.Process()
            psutil.cpu_percent(percpu=True)  # the first call only starts the measurement
            time.sleep(0.1)
        self._sample()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.interval + 1)
        if self._gpu is not None:
            self._gpu.close()

    def samples(self) -> list[Sample]:
        """The samples kept, oldest first."""
        return list(self._samples)

    def tasks_per_minute(self, window: float = 60.0) -> float:
        """Tasks completed per minute over the last ``window`` seconds (or since the first sample)."""
        now = time.time()
        first = next((s for s in self.samples() if s.time >= now - window), None)
        if first is None or now - first.time <= 0:
            return 0.0
        return (self._tasks_completed() - first.tasks_completed) * 60.0 / (now - first.time)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._sample()
            except Exception:  # a sampling bug must not end the live figures for good
                log.exception("dashboard: sampling the machine failed")

    def _sample(self) -> None:
        now = time.time()
        system = self._read_system(now)
        gpus = self._gpu.sample() if self._gpu is not None else []
        self.system, self.gpus = system, gpus
        self._samples.append(Sample(now, system["cpu"]["percent"], system["memory"]["percent"],
                                    tuple(gpu["utilization"] for gpu in gpus), self._tasks_completed()))

    def _read_system(self, now: float) -> dict[str, Any]:
        load = _load_average()
        if psutil is None:
            return {"cpu": {"percent": None, "per_core": [], "count": sysinfo.cpu_count()},
                    "memory": {"total": sysinfo.total_memory(), "used": None, "available": None, "percent": None},
                    "load": load, "network": None, "process": {"pid": os.getpid(), "rss": None, "tasks_rss": None}}
        per_core = psutil.cpu_percent(percpu=True)
        memory = psutil.virtual_memory()
        return {
            "cpu": {"percent": round(sum(per_core) / len(per_core), 1) if per_core else None,
                    "per_core": per_core, "count": sysinfo.cpu_count()},
            "memory": {"total": memory.total, "used": memory.total - memory.available,
                       "available": memory.available, "percent": memory.percent},
            "load": load,
            "network": self._read_network(now),
            "process": self._read_process(),
        }

    def _read_network(self, now: float) -> dict[str, Any] | None:
        try:
            counters = psutil.net_io_counters()
        except (OSError, RuntimeError):
            return None
        if counters is None:  # no network interfaces
            return None
        sent, received = counters.bytes_sent, counters.bytes_recv
        last, self._network = self._network, (now, sent, received)
        elapsed = now - last[0] if last is not None else 0.0
        return {"bytes_sent": sent, "bytes_recv": received,
                "send_rate": round((sent - last[1]) / elapsed, 1) if last is not None and elapsed > 0 else None,
                "recv_rate": round((received - last[2]) / elapsed, 1) if last is not None and elapsed > 0 else None}

    def _read_process(self) -> dict[str, Any]:
        """Resident memory of the worker process and, apart, of its task processes."""
        process = self._process
        tasks_rss = 0
        for child in process.children(recursive=True):
            try:
                tasks_rss += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass  # ended between the listing and the reading
        return {"pid": process.pid, "rss": process.memory_info().rss, "tasks_rss": tasks_rss}


def _load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):  # Windows
        return None


# -- the JSON documents ---------------------------------------------------------------------------------------------


def status(worker: Worker) -> dict[str, Any]:
    """``GET /``: who and where the worker is, what it is doing, and how it is configured."""
    config, executor = worker.config, worker.executor
    now, clock = time.time(), time.monotonic()
    running = executor.running_items() if executor is not None else []
    dashboard = worker.dashboard
    return {
        "worker_id": config.worker_id,
        "status": worker.status,
        "foreman_url": config.foreman_url,
        "connected": worker.connected,
        "connected_since": worker.connected_at if worker.connected else None,
        "last_error": worker.last_error,
        "env_mismatch": worker.env_mismatch if worker.connected else None,
        "pause_reason": worker.paused_reason,
        "current_tasks": [{"job": item.job_id, "start": item.start, "count": item.count,
                           "started": round(now - (clock - item.started), 3),
                           "running_for": round(clock - item.started, 3)} for item in running],
        "queued_batches": len(executor.pending) if executor is not None else 0,
        "config": {
            "concurrency": config.max_concurrent_tasks,
            "capabilities": list(config.capabilities),
            "heartbeat_interval": config.heartbeat_interval,
            "drain_timeout": config.drain_timeout,
            "auto_restart": config.auto_restart,
            "prefs": dataclasses.asdict(config.prefs),
            "foreman_token": config.token is not None,
            "dashboard": {"host": config.dashboard_host,
                          "port": dashboard.port if dashboard is not None else config.dashboard_port,
                          "token_required": config.dashboard_token is not None},
        },
        "version": VERSION,
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "started": worker.stats.started,
    }


def stats(worker: Worker, sampler: Sampler) -> dict[str, Any]:
    """``GET /stats``: the worker's counters, the machine's figures, and the GPUs (an empty list for none)."""
    counters = worker.stats
    tasks = counters.tasks_completed + counters.tasks_failed
    return {
        "stats": {
            "tasks_completed": counters.tasks_completed,
            "tasks_failed": counters.tasks_failed,
            "total_execution_time": round(counters.total_execution_time, 4),
            "avg_task_time": round(counters.total_execution_time / tasks, 6) if tasks else 0.0,
            "tasks_per_minute": round(sampler.tasks_per_minute(), 2),
            "uptime": round(time.time() - counters.started, 3),
            "reconnects": counters.reconnects,
        },
        "system": sampler.system,
        "gpus": sampler.gpus,
    }


def history(worker: Worker, sampler: Sampler) -> dict[str, Any]:
    """``GET /history``: the chart samples kept (oldest first) and the recent batches (newest first)."""
    return {"interval": sampler.interval, "samples": [s.as_dict() for s in sampler.samples()],
            "batches": [record.as_dict() for record in worker.history.recent()]}


def live(worker: Worker, sampler: Sampler) -> dict[str, Any]:
    """One message of ``WS /ws``: status, stats, the newest chart sample and the latest batches."""
    samples = sampler.samples()
    return {"status": status(worker), **stats(worker, sampler),
            "sample": samples[-1].as_dict() if samples else None,
            "batches": [record.as_dict() for record in worker.history.recent(LIVE_BATCHES)]}
