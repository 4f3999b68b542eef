"""Restarts and churn that lose nothing and repeat nothing (issue 18), counted in EXECUTIONS, not only results.

* Foreman restarts: a service foreman (``python -m foreman --data-dir``) is stopped with SIGINT, SIGTERM and
  SIGKILL during a stored job, down for a few seconds each time, and started again on the same data dir. Every
  task appends a line to a file each time it runs. Asserted: exact results; 0 tasks executed twice (no worker dies
  here, so none may be rerun); the workers are back within 1 s of the foreman listening, after every restart.
* Churn: workers killed with kill -9, frozen with SIGSTOP (sometimes past the heartbeat timeout), and added, every
  few hundred results, with tight heartbeats (0.5 s, timeout 3 s), while a job runs next to a real poison task
  (one that kills the worker running it, on every worker). Asserted: no task of the job is declared poison (exact
  results), and the poison task is. The fast tier runs one seed; the slow tier 20 seeds in a row.
"""

from __future__ import annotations

import collections
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from chaos.harness import ROOT, WorkerFleet, worker_env
from chaos.workload import expected, task
from foreman import Foreman
from foreman.addresses import with_token
from foreman.errors import TaskLostError
from service_tasks import executions, logged_square
from tasks import kill_my_worker

# -- foreman restarts ----------------------------------------------------------------------------------------------


class ServiceForeman:
    """``python -m foreman --data-dir`` on one loopback port across restarts; its output lines, time-stamped."""

    #: Tokens of its own: a foreman given none makes up new ones at each start, which its workers would not have.
    WORKER_TOKEN, CLIENT_TOKEN = "chaos-worker-token-1", "chaos-client-token-1"

    def __init__(self, data: Path) -> None:
        self.data = data
        data.mkdir(parents=True, exist_ok=True)
        self.tokens = data / "tokens.toml"
        self.tokens.write_text(f'[workers]\nfleet = "{self.WORKER_TOKEN}"\n\n'
                               f'[clients]\ntester = "{self.CLIENT_TOKEN}"\n')
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.stamps: list[tuple[float, str]] = []
        self.ready_at = 0.0

    @property
    def address(self) -> str:
        """The address workers dial, carrying their token (a client passes its own)."""
        return with_token(f"ws://127.0.0.1:{self.port}", self.WORKER_TOKEN)

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "foreman", "--port", str(self.port), "--no-dashboard", "--data-dir",
             str(self.data), "--token-file", str(self.tokens), "--speculation", "0", "--heartbeat-interval", "0.5",
             "--heartbeat-timeout", "10"],
            env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stamps.append((time.monotonic(), line))
            found = re.search(r"foreman ready at ws://127\.0\.0\.1:(\d+)", line)
            if found:
                self.port = int(found.group(1))
                self.ready_at = time.monotonic()
                break
        else:
            raise AssertionError("the foreman did not start:\n" + self.output())
        threading.Thread(target=self._read, args=(self.process,), daemon=True).start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.stamps.append((time.monotonic(), line))

    def stop(self, sig: int) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        return self.process.wait(timeout=30)

    def joined_since_ready(self) -> dict[str, float]:
        """Worker id -> seconds from this run's "foreman ready" to its "joined" line."""
        return {m.group(1): at - self.ready_at for at, line in list(self.stamps) if at >= self.ready_at
                for m in [re.search(r"worker (\S+) joined", line)] if m}

    def output(self) -> str:
        return "".join(line for _, line in self.stamps)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.mark.slow
def test_foreman_restarts_repeat_no_execution(tmp_path: Path) -> None:
    n, workers, outage = 360, 3, 4.0
    log = str(tmp_path / "executions.log")
    service = ServiceForeman(tmp_path / "data")
    service.start()
    fleet = WorkerFleet(service.address, None, tmp_path)
    back: list[tuple[str, float]] = []
    try:
        ids = [fleet.start().worker_id for _ in range(workers)]
        with Foreman.connect(service.address, token=service.CLIENT_TOKEN) as fm:
            deadline = time.monotonic() + 60
            while len(fm.workers) < workers and time.monotonic() < deadline:
                time.sleep(0.05)
            job_id = fm.submit_job(logged_square, range(n), [log] * n, [0.03] * n, chunksize=4).id
        for number, sig in enumerate((signal.SIGINT, signal.SIGTERM, signal.SIGKILL), start=1):
            goal = number * n // 5
            deadline = time.monotonic() + 60
            while len(executions(log)) < goal and time.monotonic() < deadline:
                time.sleep(0.02)
            code = service.stop(sig)
            assert code == (-signal.SIGKILL if sig == signal.SIGKILL else 0), service.output()[-3000:]
            time.sleep(outage)
            service.start()
            deadline = time.monotonic() + 30
            while set(service.joined_since_ready()) < set(ids) and time.monotonic() < deadline:
                time.sleep(0.02)
            joined = service.joined_since_ready()
            assert set(joined) >= set(ids), f"after {sig.name} not all workers came back: {joined}"
            back.append((sig.name, max(joined[w] for w in ids)))
        with Foreman.connect(service.address, token=service.CLIENT_TOKEN) as fm:
            results = fm.job(job_id).results(timeout=120)
        ran = executions(log)
        repeated = sorted(x for x, c in collections.Counter(ran).items() if c > 1)
        print(f"\nRESTARTS executions={len(ran)} repeated={len(repeated)} back_s="
              + ", ".join(f"{name}={seconds:.2f}" for name, seconds in back))
        assert results == [x * x for x in range(n)]
        assert sorted(set(ran)) == list(range(n))
        assert not repeated, f"{len(repeated)} tasks ran twice across the restarts: {repeated[:20]}"
        assert all(seconds < 1.0 for _, seconds in back), back
    except BaseException:
        print(service.output()[-4000:])
        print(fleet.log_tail())
        raise
    finally:
        fleet.close()
        service.close()


# -- churn -------------------------------------------------------------------------------------------------------

HEARTBEAT_INTERVAL = 0.5
HEARTBEAT_TIMEOUT = 3.0
BASE_WORKERS = 4
MAX_WORKERS = 6


class Churn(threading.Thread):
    """Every 150-400 results: kill -9 a worker, freeze one for 0.5-4 s, or add one. Keeps BASE_WORKERS staying
    (replacing the dead, the poison task's victims included) and at least one running unfrozen."""

    def __init__(self, fleet: WorkerFleet, progress: collections.abc.Callable[[], int], seed: int) -> None:
        super().__init__(name="churn", daemon=True)
        self.fleet = fleet
        self.progress = progress
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.faults: collections.Counter[str] = collections.Counter()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            rng, fleet = self.rng, self.fleet
            next_at = rng.randint(150, 400)
            while not self.stop.is_set():
                fleet.thaw_due(time.monotonic())
                while len(fleet.staying()) < BASE_WORKERS:
                    fleet.start()
                    self.faults["replaced"] += 1
                if self.progress() >= next_at:
                    next_at += rng.randint(150, 400)
                    running = fleet.running()
                    kind = rng.choices(("kill9", "freeze", "extra"), (4, 4, 2))[0]
                    if kind == "extra" and len(fleet.staying()) < MAX_WORKERS:
                        fleet.start()
                    elif kind == "kill9" and len(running) >= 2:
                        fleet.kill9(rng.choice(running))
                    elif kind == "freeze" and len(running) >= 2:
                        fleet.freeze(rng.choice(running), rng.uniform(0.5, 4.0))
                    else:
                        continue
                    self.faults[kind] += 1
                self.stop.wait(0.01)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
        finally:
            self.fleet.thaw_all()


def churn_run(tmp_path: Path, seed: int, n: int) -> str:
    """One seed: a job of ``n`` chaos tasks next to a poison task, under churn. Returns a summary line."""
    fm = Foreman(port=0, local_workers=0, dashboard=False, heartbeat_interval=HEARTBEAT_INTERVAL,
                 heartbeat_timeout=HEARTBEAT_TIMEOUT)
    fleet = WorkerFleet(fm.address, None, tmp_path / f"seed{seed}")
    fleet.log_dir.mkdir()
    churn: Churn | None = None
    try:
        for _ in range(BASE_WORKERS):
            fleet.start()
        fm.wait_for_workers(BASE_WORKERS, timeout=60)
        began = time.monotonic()
        job = fm.imap(task, range(n), timeout=120)
        poison = fm.submit(kill_my_worker, seed)
        churn = Churn(fleet, lambda: job.tasks_done, seed)
        churn.start()
        results = list(job)  # a false poison verdict raises TaskLostError here
        error = poison.exception(timeout=120)
        churn.stop.set()
        churn.join(timeout=30)
        if churn.error is not None:
            raise churn.error
        assert results == expected(n)
        assert isinstance(error, TaskLostError) and "poison" in str(error), error
        return (f"seed={seed} tasks={n} wall_s={time.monotonic() - began:.1f} faults={dict(churn.faults)} "
                f"workers={len(fleet.workers)} poison: {str(error)[:60]}...")
    except BaseException:
        print(fleet.log_tail())
        raise
    finally:
        if churn is not None:
            churn.stop.set()
            churn.join(timeout=30)
        fleet.close()
        fm.close()


def test_churn_one_seed_no_false_poison_and_the_poison_is_caught(tmp_path: Path) -> None:
    print("\nCHURN " + churn_run(tmp_path, seed=1, n=1500))


@pytest.mark.slow
def test_churn_twenty_seeds_in_a_row(tmp_path: Path) -> None:
    for seed in range(100, 120):
        try:
            print("\nCHURN " + churn_run(tmp_path, seed, n=2500), flush=True)
        except TaskLostError as exc:
            raise AssertionError(f"seed {seed}: a false poison verdict: {exc}") from exc
