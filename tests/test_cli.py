"""The command lines, as real subprocesses: ``python -m foreman``, ``python -m worker`` and ``crowdcompute``.

Every subprocess is bounded by a timeout and cleaned up, whatever the outcome.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import psutil
import pytest

from conftest import stop_process, wait_until, worker_env
from foreman import Foreman
from tasks import square

TIMEOUT = 60  # seconds: the bound on any one subprocess
BIN = Path(sys.executable).parent
CROWDCOMPUTE = BIN / ("crowdcompute.exe" if os.name == "nt" else "crowdcompute")

FOREMAN_FLAGS = ["--host", "--port", "--token", "--local-workers"]
WORKER_FLAGS = ["--token", "--concurrency", "--worker-id", "--capabilities"]


def clean_env(**extra: str) -> dict[str, str]:
    """``worker_env`` (PYTHONPATH for the project and the test tasks), minus any CROWDCOMPUTE_* settings
    inherited from whoever runs the tests, plus ``extra``."""
    env = {k: v for k, v in worker_env().items() if not k.startswith("CROWDCOMPUTE_")}
    env.update(extra)
    return env


def run(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], env=env or clean_env(), capture_output=True, text=True,
                          timeout=TIMEOUT, stdin=subprocess.DEVNULL)


def crowdcompute() -> Path:
    if not CROWDCOMPUTE.exists():
        pytest.skip(f"the crowdcompute console script is not installed in {BIN}")
    return CROWDCOMPUTE


class Lines:
    """Lines of a subprocess's stream, read by a thread so that every wait for one can be bounded."""

    def __init__(self, stream: IO[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def next(self, timeout: float) -> str:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout}s") from None
        if line is None:
            raise AssertionError("the stream ended")
        return line.rstrip("\n")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    """Long-running subprocesses a test starts; killed (with their children) at the end, whatever happened."""
    started: list[subprocess.Popen[Any]] = []
    yield started
    for process in started:
        try:
            children = psutil.Process(process.pid).children(recursive=True)
        except psutil.Error:
            children = []
        stop_process(process)
        for child in children:
            try:
                child.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(children, timeout=10)


# -- help and usage ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command, flags", [
    pytest.param([sys.executable, "-m", "foreman", "--help"], FOREMAN_FLAGS, id="python -m foreman --help"),
    pytest.param([sys.executable, "-m", "worker", "--help"], WORKER_FLAGS, id="python -m worker --help"),
])
def test_module_help(command: list[str], flags: list[str]) -> None:
    result = run(*command)
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout


def test_worker_help_names_environment_variables() -> None:
    result = run(sys.executable, "-m", "worker", "--help")
    assert result.returncode == 0, result.stderr
    for name in ("CROWDCOMPUTE_FOREMAN", "CROWDCOMPUTE_TOKEN", "CROWDCOMPUTE_CONCURRENCY", "CROWDCOMPUTE_WORKER_ID",
                 "CROWDCOMPUTE_CAPABILITIES"):
        assert name in result.stdout


@pytest.mark.parametrize("args, flags", [
    pytest.param(["--help"], ["foreman", "worker", "--port", "--token"], id="--help"),
    pytest.param(["-h"], ["foreman", "worker", "--port", "--token"], id="-h"),
    pytest.param(["foreman", "--help"], FOREMAN_FLAGS, id="foreman --help"),
    pytest.param(["worker", "--help"], WORKER_FLAGS, id="worker --help"),
])
def test_console_script_help(args: list[str], flags: list[str]) -> None:
    result = run(crowdcompute(), *args)
    assert result.returncode == 0, result.stderr
    for flag in flags:
        assert flag in result.stdout


def test_console_script_unknown_command_exits_2() -> None:
    result = run(crowdcompute(), "bogus")
    assert result.returncode == 2
    assert "unknown command 'bogus'" in result.stderr
    assert "usage:" in result.stderr


def test_console_script_without_command_exits_2() -> None:
    result = run(crowdcompute())
    assert result.returncode == 2
    assert "usage:" in result.stdout + result.stderr


# -- refusals ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [
    pytest.param([sys.executable, "-m", "foreman"], id="python -m foreman"),
    pytest.param(["crowdcompute", "foreman"], id="crowdcompute foreman"),
])
def test_foreman_on_public_address_without_token_exits_2(prefix: list[str]) -> None:
    if prefix[0] == "crowdcompute":
        prefix = [str(crowdcompute()), *prefix[1:]]
    result = run(*prefix, "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2
    assert "--token" in result.stderr
    assert "foreman ready" not in result.stdout


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000", "127.0.0.1:9000", "tcp://127.0.0.1:9000"])
def test_worker_with_non_websocket_url_exits_2(url: str) -> None:
    result = run(sys.executable, "-m", "worker", url)
    assert result.returncode == 2
    assert "ws://" in result.stderr and repr(url) in result.stderr
    assert "Traceback" not in result.stderr


def test_worker_with_non_websocket_url_from_environment_exits_2() -> None:
    result = run(sys.executable, "-m", "worker", env=clean_env(CROWDCOMPUTE_FOREMAN="http://127.0.0.1:9000"))
    assert result.returncode == 2
    assert "ws://" in result.stderr and "'http://127.0.0.1:9000'" in result.stderr


def test_worker_with_malformed_environment_value_exits_2() -> None:
    result = run(sys.executable, "-m", "worker", "ws://127.0.0.1:9", env=clean_env(CROWDCOMPUTE_CONCURRENCY="abc"))
    assert "Traceback" not in result.stderr
    assert result.returncode == 2
    assert "CONCURRENCY" in result.stderr.upper()


# -- a running foreman -------------------------------------------------------------------------------------------

def test_standalone_foreman_prints_address_and_stops_on_sigterm(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    log = tmp_path / "foreman.log"
    with open(log, "w") as stderr:
        foreman = subprocess.Popen([sys.executable, "-m", "foreman", "--port", "0", "--local-workers", "1"],
                                   env=clean_env(), stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   stdin=subprocess.DEVNULL)
    processes.append(foreman)
    assert foreman.stdout is not None
    line = Lines(foreman.stdout).next(timeout=TIMEOUT)
    match = re.fullmatch(r"foreman ready at ws://127\.0\.0\.1:(\d+)", line)
    assert match, line
    port = int(match.group(1))
    assert 0 < port < 65536
    socket.create_connection(("127.0.0.1", port), timeout=5).close()  # it listens there

    def local_workers() -> list[psutil.Process]:
        found = []
        for child in psutil.Process(foreman.pid).children(recursive=True):
            try:
                if "worker" in child.cmdline():
                    found.append(child)
            except psutil.Error:
                pass
        return found

    wait_until(lambda: len(local_workers()) == 1, timeout=TIMEOUT)
    wait_until(lambda: "joined" in log.read_text(), timeout=TIMEOUT)  # the local worker dialled in
    children = psutil.Process(foreman.pid).children(recursive=True)

    foreman.send_signal(signal.SIGTERM)
    assert foreman.wait(timeout=TIMEOUT) == 0, log.read_text()
    _, alive = psutil.wait_procs(children, timeout=15)
    assert not alive, f"left running after the foreman stopped: {alive}"


# -- a worker configured by the environment ----------------------------------------------------------------------

def test_worker_flags_from_environment(tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    with Foreman(port=0, token="t0k") as fm:
        env = clean_env(CROWDCOMPUTE_FOREMAN=fm.address, CROWDCOMPUTE_TOKEN="t0k",
                        CROWDCOMPUTE_WORKER_ID="env-worker", CROWDCOMPUTE_CONCURRENCY="1",
                        CROWDCOMPUTE_CAPABILITIES="gpu, high-memory", CROWDCOMPUTE_LOG_LEVEL="WARNING",
                        CROWDCOMPUTE_DASHBOARD_PORT="0")
        with open(tmp_path / "worker.log", "w") as stderr:
            worker = subprocess.Popen([sys.executable, "-m", "worker"], env=env, stdout=stderr, stderr=stderr,
                                      stdin=subprocess.DEVNULL)
        processes.append(worker)
        fm.wait_for_workers(1, timeout=TIMEOUT)
        assert fm.workers == ["env-worker"]
        hello = fm._call(lambda: dict(fm._server.peers["env-worker"].hello))  # what the worker announced
        assert hello["concurrency"] == 1
        assert hello["capabilities"] == ["gpu", "high-memory"]
        assert fm.map(square, range(5), timeout=TIMEOUT) == [0, 1, 4, 9, 16]  # it runs tasks
        assert worker.poll() is None


def test_worker_with_wrong_token_from_environment_exits_2() -> None:
    with Foreman(port=0, token="t0k", dashboard=False) as fm:
        result = run(sys.executable, "-m", "worker",
                     env=clean_env(CROWDCOMPUTE_FOREMAN=fm.address, CROWDCOMPUTE_TOKEN="wrong",
                                   CROWDCOMPUTE_WORKER_ID="bad-token", CROWDCOMPUTE_CONCURRENCY="1",
                                   CROWDCOMPUTE_DASHBOARD_PORT="0"))
        assert result.returncode == 2
        assert "invalid token" in result.stderr
        assert fm.workers == []
