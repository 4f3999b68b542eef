"""Worker processes the chaos tests own: started, killed, frozen and thawed by PID, and always cleaned up.

Each worker is ``python -m worker ADDRESS --concurrency 1 --worker-id ID`` in a session (process group) of its
own, so that a freeze stops the worker and its task process together, as when a machine stalls, and so that
cleanup reaches an orphaned task process too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from foreman.addresses import split_token

CHAOS = Path(__file__).resolve().parent
TESTS = CHAOS.parent
ROOT = TESTS.parent


def worker_env() -> dict[str, str]:
    """This repository, ``tests/`` (for ``chaos.workload`` and ``tasks``) and ``tests/chaos`` on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(ROOT), str(TESTS), str(CHAOS),
                                                    env.get("PYTHONPATH", "")] if p)
    for name in [n for n in env if n.startswith("CROWDCOMPUTE_")]:
        del env[name]  # flags only: a stray CROWDCOMPUTE_WORKER_ID would give every worker the same id
    return env


@dataclass(eq=False)
class WorkerProcess:
    worker_id: str
    via_proxy: bool
    process: subprocess.Popen[bytes]
    log_path: Path
    started: float = field(default_factory=time.monotonic)
    frozen_until: float | None = None  # monotonic time to SIGCONT it
    killed_at: float | None = None  # monotonic time of its SIGKILL
    drained_at: float | None = None  # monotonic time of its SIGTERM (it drains and leaves)
    local_link: bool = False  # dials the foreman's Unix socket

    @property
    def killed(self) -> bool:
        return self.killed_at is not None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self.killed and self.process.poll() is None

    @property
    def frozen(self) -> bool:
        return self.frozen_until is not None


class WorkerFleet:
    """Starts workers that dial the foreman directly or through the proxy, and does violence to them. With a
    ``local_address`` (the foreman's local link), every other worker that dials directly uses it."""

    def __init__(self, foreman_address: str, proxy_address: str | None, log_dir: Path,
                 local_address: str | None = None) -> None:
        # The token a foreman made up rides in its address; the proxy's and the local link's addresses have none,
        # so every worker gets it from the environment instead.
        self.foreman_address, token = split_token(foreman_address)
        self.proxy_address = proxy_address
        self.local_address = local_address
        self.log_dir = log_dir
        self.workers: list[WorkerProcess] = []
        self._env = worker_env()
        if token:
            self._env["CROWDCOMPUTE_TOKEN"] = token
        self.log_level = os.environ.get("CROWDCOMPUTE_CHAOS_WORKER_LOG", "ERROR")  # WARNING shows crashes etc.
        self._serial = 0

    def new_id(self) -> str:
        self._serial += 1
        return f"chaos-{self._serial}"

    def start(self, worker_id: str | None = None, via_proxy: bool = False) -> WorkerProcess:
        worker_id = worker_id or self.new_id()
        if via_proxy and self.proxy_address:
            address = self.proxy_address
        elif self.local_address and len(self.workers) % 2:
            address = self.local_address
        else:
            address = self.foreman_address
        log_path = self.log_dir / f"{worker_id}-{len(self.workers)}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "worker", address, "--concurrency", "1", "--worker-id", worker_id,
                 "--log-level", self.log_level, "--no-dashboard"],
                env=self._env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        worker = WorkerProcess(worker_id, via_proxy and self.proxy_address is not None, process, log_path,
                               local_link=address == self.local_address)
        self.workers.append(worker)
        return worker

    def alive(self) -> list[WorkerProcess]:
        return [w for w in self.workers if w.alive]

    def staying(self) -> list[WorkerProcess]:
        """Alive and not draining."""
        return [w for w in self.workers if w.alive and w.drained_at is None]

    def running(self) -> list[WorkerProcess]:
        """Alive and not frozen."""
        return [w for w in self.workers if w.alive and not w.frozen]

    def kill9(self, worker: WorkerProcess) -> None:
        """SIGKILL the worker process only, as a crash would; its task process notices and exits by itself."""
        try:
            os.kill(worker.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        worker.killed_at = time.monotonic()
        if worker.frozen:  # its task process is stopped with it: let it run, see its parent gone, and exit
            self._signal_group(worker, signal.SIGCONT)
            worker.frozen_until = None
        worker.process.wait(timeout=10)

    def drain(self, worker: WorkerProcess) -> None:
        """SIGTERM: the worker hands back its queued batches, finishes its running one, and leaves."""
        worker.process.send_signal(signal.SIGTERM)
        worker.drained_at = time.monotonic()

    def kill9_task(self, worker: WorkerProcess) -> bool:
        """SIGKILL the worker's task process only (as a segfault would); the worker lives on. False if it has
        none right now."""
        try:
            children = psutil.Process(worker.pid).children()
        except psutil.Error:
            return False
        tasks = [c for c in children if _is_task_process(c)]
        for child in tasks:
            try:
                child.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass
        return bool(tasks)

    def freeze(self, worker: WorkerProcess, seconds: float) -> None:
        """SIGSTOP the worker and its task process; :meth:`thaw_due` resumes them after ``seconds``."""
        self._signal_group(worker, signal.SIGSTOP)
        worker.frozen_until = time.monotonic() + seconds

    def thaw(self, worker: WorkerProcess) -> None:
        self._signal_group(worker, signal.SIGCONT)
        worker.frozen_until = None

    def thaw_due(self, now: float) -> int:
        due = [w for w in self.workers if w.frozen_until is not None and w.frozen_until <= now]
        for worker in due:
            self.thaw(worker)
        return len(due)

    def next_thaw(self) -> float | None:
        times = [w.frozen_until for w in self.workers if w.frozen_until is not None]
        return min(times) if times else None

    def thaw_all(self) -> None:
        for worker in self.workers:
            if worker.frozen:
                self.thaw(worker)

    def close(self) -> None:
        """SIGCONT, then SIGKILL, every worker still running, with its whole process group (its task process)."""
        for worker in self.workers:
            if worker.process.poll() is not None:
                continue  # reaped: its pid may belong to someone else now; its task process exits by itself
            self._signal_group(worker, signal.SIGCONT)
            worker.frozen_until = None
            self._signal_group(worker, signal.SIGKILL)
        for worker in self.workers:
            try:
                worker.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def log_tail(self, lines: int = 5) -> str:
        out = []
        for worker in self.workers:
            try:
                text = worker.log_path.read_text(errors="replace").strip().splitlines()
            except OSError:
                continue
            if text:
                out.append(f"--- {worker.worker_id} (pid {worker.pid}):\n" + "\n".join(text[-lines:]))
        return "\n".join(out)

    @staticmethod
    def _signal_group(worker: WorkerProcess, sig: int) -> None:
        try:
            os.killpg(worker.pid, sig)  # its own session: the group id is its pid
        except (ProcessLookupError, PermissionError):
            pass


def _is_task_process(process: psutil.Process) -> bool:
    """A worker's multiprocessing (spawn) child that runs tasks, not some other helper."""
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:
        return False
    return "spawn_main" in cmdline and "resource_tracker" not in cmdline
