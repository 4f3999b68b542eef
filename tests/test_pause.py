"""A worker paused by its owner's rules: real foreman, real workers, real task processes, a real CPU hog."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import psutil

from conftest import wait_until
from foreman import Foreman, views
from owner import PROMPT, Owner, running_worker
from tasks import counts_to, square


def _status(fm: Foreman, worker_id: str) -> tuple[str, str]:
    record = fm._server.fleet.workers.get(worker_id)
    return (record.status, record.pause_reason) if record is not None else ("gone", "")


def test_a_worker_paused_mid_job_hands_its_tasks_back_and_nothing_is_lost_or_duplicated(spawn_worker) -> None:
    owner = Owner()
    with (Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm,
          running_worker(fm.address, "volunteer", owner, concurrency=2) as volunteer):
        fm.wait_for_workers(1)
        job = fm.imap(counts_to, [(40, 0.05)] * 4, chunksize=1)  # 2 running, 2 prefetched on the volunteer
        saved = fm._server.checkpoints
        wait_until(lambda: len(saved.get(job.id, {})) == 2 and min(map(_step, saved[job.id].values())) >= 5)
        progress = {task: _step(state) for task, state in saved[job.id].items()}

        owner.busy = True
        wait_until(lambda: _status(fm, "volunteer")[0] == "paused")
        assert _status(fm, "volunteer")[1].startswith("the owner's CPU use is 90% (pause above 50%")
        assert volunteer.status == "paused" and volunteer.paused_reason == _status(fm, "volunteer")[1]
        # After the grace, the running tasks are stopped and go back too: the volunteer holds nothing.
        wait_until(lambda: not fm._server.scheduler.workers["volunteer"].batches)

        helper = spawn_worker(fm.address, "--concurrency", "4", "--worker-id", "helper")
        results = list(job)
        assert [steps for steps, _, _ in results] == [40] * 4
        assert {pid for _, _, pid in results} == {helper.pid}
        for task, step in progress.items():
            assert results[task][1] >= step  # resumed from its checkpoint, not from scratch
        assert fm._server.scheduler.duplicates_dropped == 0 and fm._server.fleet.tasks_done == 4

        owner.busy = False
        wait_until(lambda: _status(fm, "volunteer") == ("idle", ""))
        assert not fm._server.scheduler.workers["volunteer"].paused
        kinds = [e["kind"] for e in fm._server.fleet.events if "volunteer" in e["message"]]
        assert kinds[-2:] == ["pause", "resume"]


def test_running_tasks_finish_within_the_grace_and_a_paused_worker_gets_no_new_work() -> None:
    owner = Owner()
    prefs = dataclasses.replace(PROMPT, pause_grace=60)
    with (Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm,
          running_worker(fm.address, "volunteer", owner, prefs) as volunteer):
        fm.wait_for_workers(1)
        running = fm.submit(counts_to, (20, 0.05))
        wait_until(lambda: fm._server.checkpoints.get(1))
        owner.busy = True
        wait_until(lambda: volunteer.status == "paused")
        assert running.result(timeout=30) == (20, 0, os.getpid())  # finished here, within the grace

        waiting = fm.submit(square, 7)
        wait_until(lambda: _status(fm, "volunteer")[0] == "paused" and _totals(fm)["tasks_queued"] == 1)
        assert not fm._server.scheduler.workers["volunteer"].batches and not waiting.done()
        owner.busy = False
        assert waiting.result(timeout=30) == 49


HOG = "import time\nend = time.monotonic() + 25\nwhile time.monotonic() < end:\n    pass\n"


def test_a_real_cpu_hog_pauses_a_real_worker_which_resumes_when_it_ends(spawn_worker) -> None:
    """Every core busy with the owner's program: the worker pauses, and resumes once the program ends."""
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        spawn_worker(fm.address, "--worker-id", "laptop", "--concurrency", "1", "--no-dashboard",
                     "--max-owner-cpu", "75", "--resume-owner-cpu", "60", "--pause-after", "0.5",
                     "--resume-after", "0.5", "--sample-interval", "0.25")
        fm.wait_for_workers(1)
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(psutil.cpu_count() or 1)]
        try:
            wait_until(lambda: _status(fm, "laptop")[0] == "paused", timeout=25)
            assert "the owner's CPU use is" in _status(fm, "laptop")[1]
        finally:
            for hog in hogs:
                hog.kill()
                hog.wait()
        wait_until(lambda: _status(fm, "laptop") == ("idle", ""), timeout=60)
        assert fm.map(square, range(4)) == [0, 1, 4, 9]


def spin(seconds: float) -> int:
    """Keep one core busy for ``seconds``."""
    import time

    end, loops = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        loops += 1
    return loops


def test_the_workers_own_tasks_do_not_count_as_the_owners_cpu_use(spawn_worker) -> None:
    """Every core busy with this worker's tasks: the owner is not using the machine, so no pause."""
    cores = psutil.cpu_count() or 1
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        spawn_worker(fm.address, "--worker-id", "lab", "--concurrency", str(cores), "--no-dashboard",
                     "--max-owner-cpu", "75", "--pause-after", "0.5", "--sample-interval", "0.25")
        fm.wait_for_workers(1)
        assert all(loops > 0 for loops in fm.map(spin, [3.0] * cores, chunksize=1))
        assert [e for e in fm._server.fleet.events if e["kind"] == "pause"] == []


def test_the_cpu_cap_stops_and_continues_task_processes(spawn_worker) -> None:
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        worker = spawn_worker(fm.address, "--concurrency", "1", "--no-dashboard", "--max-cpu", "10")
        fm.wait_for_workers(1)
        future = fm.submit(counts_to, (60, 0.05))
        wait_until(lambda: fm._server.checkpoints.get(1))
        tasks = psutil.Process(worker.pid).children()
        wait_until(lambda: any(p.status() == psutil.STATUS_STOPPED for p in tasks), interval=0.005)
        assert future.result(timeout=60)[0] == 60  # stopped and continued, never stuck


def _totals(fm: Foreman) -> dict:
    return fm._call(lambda: views.totals(fm._server))


def _step(state: bytes) -> int:
    import pickle

    return pickle.loads(state)
