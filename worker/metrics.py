"""``GET /metrics``: the figures of ``GET /stats`` in the Prometheus text format.

A collector reads one live snapshot per scrape, so the numbers always match the JSON API and nothing is
registered in prometheus-client's global registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

#: Values of the status gauge, one series each (1 for the current status).
STATUSES = ("connecting", "idle", "busy", "paused", "draining", "disconnected")


class WorkerCollector(Collector):
    """Turns a :func:`worker.stats.live` snapshot into metric families."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        status, counters, system = snap["status"], snap["stats"], snap["system"]
        yield _info(status)
        state = GaugeMetricFamily("crowdcompute_worker_status", "1 for the worker's current status",
                                  labels=["status"])
        for name in STATUSES:
            state.add_metric([name], 1.0 if status["status"] == name else 0.0)
        yield state
        yield _gauge("crowdcompute_worker_connected", "1 while connected to the foreman", status["connected"])
        yield _gauge("crowdcompute_worker_running_batches", "batches running now", len(status["current_tasks"]))
        yield _gauge("crowdcompute_worker_queued_batches", "batches received, not started",
                     status["queued_batches"])
        yield _counter("crowdcompute_worker_tasks_completed", "tasks that returned a result",
                       counters["tasks_completed"])
        yield _counter("crowdcompute_worker_tasks_failed", "tasks that raised or whose process crashed",
                       counters["tasks_failed"])
        yield _counter("crowdcompute_worker_execution_seconds", "time spent running batches",
                       counters["total_execution_time"])
        yield _counter("crowdcompute_worker_reconnects", "connections to the foreman after the first",
                       counters["reconnects"])
        yield _gauge("crowdcompute_worker_avg_task_seconds", "mean task time", counters["avg_task_time"])
        yield _gauge("crowdcompute_worker_tasks_per_minute", "tasks completed per minute, last minute",
                     counters["tasks_per_minute"])
        yield _gauge("crowdcompute_worker_uptime_seconds", "seconds since the worker process started",
                     counters["uptime"])
        yield from _system(system)
        yield from _gpus(snap["gpus"])


def registry(snapshot: Callable[[], dict[str, Any]]) -> CollectorRegistry:
    """A registry of its own holding one :class:`WorkerCollector`."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(WorkerCollector(snapshot))
    return reg


def _info(status: dict[str, Any]) -> InfoMetricFamily:
    info = InfoMetricFamily("crowdcompute_worker", "who this worker is")
    info.add_metric([], {"worker_id": status["worker_id"], "version": status["version"],
                         "foreman_url": status["foreman_url"], "hostname": status["hostname"]})
    return info


def _system(system: dict[str, Any]) -> Iterator[Metric]:
    cpu, memory = system["cpu"], system["memory"]
    if cpu["percent"] is not None:
        yield _gauge("crowdcompute_system_cpu_percent", "CPU use, all cores", cpu["percent"])
        cores = GaugeMetricFamily("crowdcompute_system_cpu_core_percent", "CPU use per core", labels=["core"])
        for index, value in enumerate(cpu["per_core"]):
            cores.add_metric([str(index)], value)
        yield cores
    for key in ("total", "used", "available"):
        if memory[key] is not None:
            yield _gauge(f"crowdcompute_system_memory_{key}_bytes", f"physical memory, {key}", memory[key])
    if system["load"] is not None:
        load = GaugeMetricFamily("crowdcompute_system_load_average", "run-queue length", labels=["period"])
        for period, value in zip(("1m", "5m", "15m"), system["load"]):
            load.add_metric([period], value)
        yield load
    network = system["network"]
    if network is not None:
        yield _counter("crowdcompute_system_network_sent_bytes", "bytes sent, all interfaces",
                       network["bytes_sent"])
        yield _counter("crowdcompute_system_network_received_bytes", "bytes received, all interfaces",
                       network["bytes_recv"])
    process = system["process"]
    if process["rss"] is not None:
        rss = GaugeMetricFamily("crowdcompute_worker_resident_bytes", "resident memory", labels=["process"])
        rss.add_metric(["worker"], process["rss"])
        rss.add_metric(["tasks"], process["tasks_rss"])
        yield rss


_GPU_FIGURES = (  # key in the GPU dict, metric name, help
    ("utilization", "crowdcompute_gpu_utilization_percent", "GPU busy time"),
    ("memory_used", "crowdcompute_gpu_memory_used_bytes", "GPU memory in use"),
    ("memory_total", "crowdcompute_gpu_memory_total_bytes", "GPU memory"),
    ("temperature", "crowdcompute_gpu_temperature_celsius", "GPU temperature"),
    ("power", "crowdcompute_gpu_power_watts", "GPU power draw"),
)


def _gpus(gpus: list[dict[str, Any]]) -> Iterator[Metric]:
    for key, name, help_text in _GPU_FIGURES:
        family = GaugeMetricFamily(name, help_text, labels=["gpu", "name"])
        for gpu in gpus:
            if gpu[key] is not None:
                family.add_metric([str(gpu["index"]), gpu["name"]], gpu[key])
        if family.samples:
            yield family


def _gauge(name: str, help_text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help_text, value=float(value))


def _counter(name: str, help_text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, help_text, value=float(value))
