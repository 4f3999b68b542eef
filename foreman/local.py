"""Worker processes a foreman starts on its own machine: ``python -m worker``, exactly as a volunteer would."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from foreman.local_link import is_local

log = logging.getLogger("crowdcompute.foreman")

#: The environment variable that hands a local worker's task processes their multiprocessing authkey.
AUTHKEY_VARIABLE = "CROWDCOMPUTE_MP_AUTHKEY"


class LocalWorkers:
    """Starts and stops real worker processes that dial the embedded foreman.

    Each runs one task at a time, so ``n`` local workers use ``n`` cores, like ``multiprocessing.Pool(n)``.
    They inherit this process's import path, so functions pickled by reference (from importable modules) load.
    They dial the foreman's private Unix socket (``unix:`` address) where it has one; over ``wss://``, with a
    ``fingerprint`` (the foreman's certificate), they pin it: no CA or hostname needed.
    """

    def __init__(self, token: str | None, heartbeat_interval: float, fingerprint: str | None = None,
                 authkey: bytes | None = None) -> None:
        self.token = token
        self.authkey = authkey  # multiprocessing's, for their task processes (see Foreman's local_authkey)
        self.heartbeat_interval = heartbeat_interval
        self.fingerprint = fingerprint
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, address: str, n: int) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        env.pop("CROWDCOMPUTE_TOKEN", None)  # the secret goes down a pipe (below), never in the environment
        if self.authkey is not None:
            env[AUTHKEY_VARIABLE] = self.authkey.hex()
        for _ in range(n):
            index = len(self.processes)
            command = [sys.executable, "-m", "worker", address, "--concurrency", "1",
                       "--worker-id", f"local-{os.getpid()}-{index}", "--parent-pid", str(os.getpid()),
                       "--heartbeat-interval", str(self.heartbeat_interval), "--log-level", "WARNING",
                       "--no-dashboard"]
            if self.fingerprint and not is_local(address):
                command += ["--fingerprint", self.fingerprint]
            if self.token is None:
                self.processes.append(subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL))
                continue
            # The secret goes down a pipe the worker reads once and closes: never in its environment or on its
            # command line, where its task processes (anyone's code) could read it (/proc/<worker>/environ).
            process = subprocess.Popen([*command, "--token-stdin"], env=env, stdin=subprocess.PIPE)
            assert process.stdin is not None
            try:
                process.stdin.write(self.token.encode() + b"\n")
                process.stdin.close()
            except BrokenPipeError:  # it died at once: its exit is reported like any local worker's
                pass
            self.processes.append(process)

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM (the worker drains, then leaves), then SIGKILL what is still running after ``timeout``."""
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("local worker %s did not stop in %.0fs: killing it", process.pid, timeout)
                process.kill()
                process.wait()
        self.processes.clear()
