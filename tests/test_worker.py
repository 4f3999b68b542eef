"""The worker on any device: spawn start method, optional packages missing, reconnecting with backoff."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from urllib.parse import urlsplit

from conftest import stop_process, worker_env
from foreman import Foreman
from tasks import square, whoami
from foreman.retry import backoff_delay
from worker.worker import WorkerConfig

BLOCK_OPTIONAL = (
    "import sys\n"
    "for name in ('psutil', 'pynvml', 'fastapi', 'uvicorn', 'prometheus_client', 'jinja2'):\n"
    "    sys.modules[name] = None  # makes 'import name' raise ImportError\n"
    "from worker.__main__ import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_worker_runs_without_optional_packages() -> None:
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        worker = subprocess.Popen([sys.executable, "-c", BLOCK_OPTIONAL, fm.address, "--concurrency", "2",
                                   "--log-level", "WARNING"], env=worker_env(), stdin=subprocess.DEVNULL)
        try:
            fm.wait_for_workers(1, timeout=30)
            assert fm.map(square, range(500)) == [x * x for x in range(500)]
        finally:
            stop_process(worker)


def test_worker_machine_facts_without_psutil_or_nvml(monkeypatch) -> None:
    from worker import sysinfo

    monkeypatch.setattr(sysinfo, "psutil", None)
    monkeypatch.setitem(sys.modules, "pynvml", None)
    facts = sysinfo.describe()
    assert facts["cpu_count"] >= 1
    assert facts["gpus"] == []  # no NVIDIA GPU here: reported as none, never an error
    assert facts["memory"] is None or facts["memory"] > 0


def test_worker_uses_spawned_task_processes_with_its_concurrency(spawn_worker) -> None:
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        worker = spawn_worker(fm.address, "--concurrency", "2")
        fm.wait_for_workers(1)
        results = fm.map(whoami, range(200), chunksize=1)
        assert {pid for _, pid in results} == {worker.pid}  # children of that worker process
        assert fm._server.scheduler.slots == 2


def test_worker_reconnects_when_the_foreman_comes_back(spawn_worker) -> None:
    fm = Foreman(port=0, token="phoenix-token", heartbeat_interval=0.2, heartbeat_timeout=1.5)
    port = urlsplit(fm.address).port
    worker = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "phoenix", "--token", "phoenix-token")
    fm.wait_for_workers(1)
    fm.close()
    time.sleep(0.5)
    assert worker.poll() is None  # still running, retrying with backoff
    with Foreman(port=port, token="phoenix-token", heartbeat_interval=0.2, heartbeat_timeout=1.5) as again:
        again.wait_for_workers(1, timeout=40)
        assert again.workers == ["phoenix"]
        assert again.map(square, range(10)) == [x * x for x in range(10)]


def test_worker_without_reconnect_exits_when_the_foreman_goes(spawn_worker) -> None:
    fm = Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    worker = spawn_worker(fm.address, "--concurrency", "1", "--no-reconnect")
    fm.wait_for_workers(1)
    fm.close()
    assert worker.wait(timeout=20) == 0


def test_backoff_is_bounded_and_jittered() -> None:
    delays = [backoff_delay(attempt, cap=30.0) for attempt in range(40)]
    assert all(0 <= d <= 30.0 for d in delays)
    assert len(set(delays)) > 30
    assert max(backoff_delay(0, cap=30.0) for _ in range(100)) <= 0.2


def test_worker_config_validates() -> None:
    with pytest.raises(ValueError, match="max_concurrent_tasks"):
        WorkerConfig(max_concurrent_tasks=0)
    with pytest.raises(ValueError, match="ws://"):
        WorkerConfig(foreman_url="http://example.invalid")
    config = WorkerConfig(worker_id="w1", foreman_url="ws://127.0.0.1:9", max_concurrent_tasks=2,
                          auto_restart=False, heartbeat_interval=1.0)
    assert (config.worker_id, config.max_concurrent_tasks, config.auto_restart) == ("w1", 2, False)


def test_worker_api_in_process() -> None:
    """The public Worker class runs inside an asyncio program, as the CLI does."""
    from worker import Worker

    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        worker = Worker(WorkerConfig(foreman_url=fm.address, worker_id="inproc", max_concurrent_tasks=1))

        async def main() -> list[int]:
            running = asyncio.create_task(worker.run())
            while not worker.connected:
                await asyncio.sleep(0.02)
            assert worker.status == "idle"
            results = await asyncio.to_thread(fm.map, square, range(50))
            assert worker.stats.tasks_completed == 50
            worker.stop()
            await asyncio.wait_for(running, 20)
            return results

        assert asyncio.run(main()) == [x * x for x in range(50)]


def test_foreman_shutdown_leaves_no_task_running_on_its_workers(spawn_worker) -> None:
    """A foreman that shuts down tells its workers; they kill its tasks rather than run them for nobody."""
    import psutil

    from tasks import sleep_then

    fm = Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5)
    worker = spawn_worker(fm.address, "--concurrency", "2")
    fm.wait_for_workers(1)
    futures = [fm.submit(sleep_then, 60) for _ in range(2)]
    time.sleep(1.5)  # both tasks are running in the worker's two task processes
    task_processes = [c for c in psutil.Process(worker.pid).children()
                      if "resource_tracker" not in " ".join(c.cmdline())]  # multiprocessing's own helper
    assert len(task_processes) == 2
    fm.close()
    for future in futures:
        assert future.exception(timeout=10) is not None
    gone, alive = psutil.wait_procs(task_processes, timeout=10)
    assert not alive, "a task of the departed foreman is still running"
    assert worker.poll() is None  # the worker itself lives on, waiting for its foreman to come back
