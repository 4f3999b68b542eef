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


# -- versions, names and help (issue 21) -------------------------------------------------------------------------

def _version() -> str:
    from foreman.version import VERSION
    return VERSION


@pytest.mark.parametrize("command", [
    pytest.param(["crowdcompute", "--version"], id="crowdcompute --version"),
    pytest.param([sys.executable, "-m", "foreman", "--version"], id="python -m foreman --version"),
    pytest.param([sys.executable, "-m", "worker", "--version"], id="python -m worker --version"),
    pytest.param(["crowdcompute", "worker", "--version"], id="crowdcompute worker --version"),
])
def test_version(command: list[str]) -> None:
    if command[0] == "crowdcompute":
        command = [str(crowdcompute()), *command[1:]]
    result = run(*command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() [-1] == _version()


def test_the_version_is_defined_once() -> None:
    from importlib.metadata import version

    from worker.worker import VERSION
    root = Path(__file__).parent.parent
    assert "version = attr: foreman.version.VERSION" in (root / "setup.cfg").read_text()
    assert not re.search(r"^VERSION = ", (root / "worker" / "worker.py").read_text(), re.MULTILINE)
    assert VERSION == _version() == version("crowdcompute")


@pytest.mark.parametrize("command", ["foreman", "worker", "jobs"])
def test_console_script_help_names_the_command_typed(command: str) -> None:
    result = run(crowdcompute(), command, "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: crowdcompute {command}")
    assert "python -m" not in result.stdout.splitlines()[0]


def test_foreman_help_shows_defaults_and_that_the_token_serves_clients() -> None:
    result = run(sys.executable, "-m", "foreman", "--help")
    text = " ".join(result.stdout.split())
    for shown in ("default 9000", "seconds between worker heartbeats (default 5)", "(default 30)",
                  "this machine (default 0)", "--max-message-size"):
        assert shown in text, shown
    assert "scripts connect with it as clients" in text


def test_worker_help_names_every_environment_variable_and_default() -> None:
    text = " ".join(run(sys.executable, "-m", "worker", "--help").stdout.split())
    for name in ("CROWDCOMPUTE_HEARTBEAT_INTERVAL", "CROWDCOMPUTE_DRAIN_TIMEOUT", "CROWDCOMPUTE_MAX_MESSAGE_SIZE",
                 "CROWDCOMPUTE_LOG_LEVEL", "CROWDCOMPUTE_MAX_TASK_SECONDS"):
        assert name in text
    for shown in ("default 5)", "default 30)", "default: CPU count", "default ws://127.0.0.1:9000", "default INFO",
                  "Linux and macOS"):
        assert shown in text, shown


def test_quickstart_documents_only_flags_it_has() -> None:
    source = (Path(__file__).parent.parent / "examples" / "quickstart.py").read_text()
    usage = source.split('"""')[1]
    documented = set(re.findall(r"--[a-z-]+", usage))
    assert documented and documented <= set(re.findall(r'add_argument\("(--[a-z-]+)"', source))


# -- busy ports --------------------------------------------------------------------------------------------------

def _listening_pair() -> tuple[int, socket.socket | None]:
    """A port P with P + 1 free too (for the dashboard), found by binding both."""
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port, None
        except OSError:
            continue
    pytest.skip("no two adjacent free ports on loopback")


@pytest.mark.parametrize("taken, flags", [
    pytest.param(0, ["--port"], id="the workers' port"),
    pytest.param(1, ["--http-port", "--no-dashboard"], id="the dashboard's port"),
])
def test_foreman_on_a_busy_port_says_which_in_one_line(taken: int, flags: list[str]) -> None:
    port, _ = _listening_pair()
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port + taken))
        squatter.listen()
        result = run(sys.executable, "-m", "foreman", "--port", str(port))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert f"port {port + taken} " in lines[0] and "in use" in lines[0]
    for flag in flags:
        assert flag in lines[0]
    assert "listening" not in result.stdout + result.stderr
    assert "foreman ready" not in result.stdout


def test_foreman_rejects_a_tiny_max_message_size() -> None:
    result = run(sys.executable, "-m", "foreman", "--port", "0", "--max-message-size", "1k")
    assert result.returncode == 2
    assert "--max-message-size" in result.stderr and "Traceback" not in result.stderr


# -- crowdcompute jobs: the user's mistakes, one line each -------------------------------------------------------

@pytest.fixture(scope="module")
def service() -> Iterator[Foreman]:
    with Foreman(port=0, token="t0k", local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=TIMEOUT)
        yield fm


# The clients below use service_tasks, not tasks: a client registers its functions' module to travel by value for
# the rest of this process, which would change the remote tracebacks of later tests that use tasks.

def jobs(service: Foreman, *args: str, token: str | None = "t0k") -> subprocess.CompletedProcess[str]:
    """``crowdcompute jobs ARGS --address A [--token T]``: the connection flags after the command."""
    return run(crowdcompute(), "jobs", *args, "--address", service.address, *(["--token", token] if token else []))


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("crowdcompute jobs: "), lines[0]
    return lines[0]


def test_jobs_flags_after_the_command(service: Foreman) -> None:
    result = jobs(service, "list")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:2] == ["id", "state"]


@pytest.mark.parametrize("token, reason", [("wrong", "invalid token"), (None, "token required")])
def test_jobs_with_a_wrong_or_missing_token_is_one_line(service: Foreman, token: str | None, reason: str) -> None:
    result = jobs(service, "list", token=token)
    assert result.returncode == 2
    assert reason in one_line_error(result)


def test_jobs_with_an_http_address_is_one_line(service: Foreman) -> None:
    address = service.address.replace("ws://", "http://")
    result = run(crowdcompute(), "jobs", "list", "--address", address, "--token", "t0k")
    assert result.returncode == 2
    assert repr(address) in one_line_error(result)


def test_a_client_given_an_http_address_raises_a_clear_error() -> None:
    with pytest.raises(ValueError, match="ws://HOST:PORT"):
        Foreman.connect("http://127.0.0.1:9", token="t")


def test_a_client_cannot_set_the_foremans_message_limit(service: Foreman) -> None:
    with pytest.raises(ValueError, match="--max-message-size"):
        Foreman.connect(service.address, token="t0k", max_message_size=256 << 20)


def test_jobs_on_a_finished_and_a_cancelled_job(service: Foreman) -> None:
    from service_tasks import nap_square

    with Foreman.connect(service.address, token="t0k") as client:
        finished = client.submit_job(nap_square, range(3))
        assert finished.results(timeout=TIMEOUT) == [0, 1, 4]
        running = client.submit_job(nap_square, [1], [30.0])
    result = jobs(service, "cancel", str(finished.id))
    assert result.returncode == 1
    assert f"job {finished.id} is already done" in one_line_error(result)
    assert "cancelled" not in result.stdout

    result = jobs(service, "cancel", str(running.id))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"job {running.id} cancelled"
    result = jobs(service, "results", str(running.id), "--timeout", "30")
    assert result.returncode == 1
    assert f"job {running.id} was cancelled" in one_line_error(result)


# -- a script's jobs end when it does (issue 21) -----------------------------------------------------------------

def _state(service: Foreman, job_id: int) -> str:
    """The job's state as the admin lists it (not through ``admin.job(id)``: attaching a handle ends the input)."""
    with Foreman.connect(service.address, token="t0k") as admin:
        (job,) = [job for job in admin.jobs() if job["id"] == job_id]
        return str(job["state"])


def test_a_submit_job_is_done_as_soon_as_its_script_closes(service: Foreman) -> None:
    from service_tasks import nap_square

    with Foreman.connect(service.address, token="t0k") as client:
        assert client.submit(nap_square, 7, 0.0).result(timeout=TIMEOUT) == 49
    # The script ends here, within the second its submit stream would idle before it ended the job's input.
    # Before: 'running 1 ?' until the client's grace (5 minutes) ran out.
    with Foreman.connect(service.address, token="t0k") as admin:
        job_id = max(job["id"] for job in admin.jobs())
    wait_until(lambda: _state(service, job_id) == "done", timeout=10, interval=0.2)


def test_a_map_that_raised_is_failed_not_cancelled(service: Foreman) -> None:
    from service_tasks import TaskFailed, fails_at_3

    with Foreman.connect(service.address, token="t0k", trust_workers=True) as client:  # its own local worker
        with pytest.raises(TaskFailed):
            # The tasks after the failure take a while, so the job still runs when the map raises (one whose
            # tasks had all finished first ends 'done': every task ran).
            client.map(fails_at_3, range(10), [2.0] * 10, chunksize=1)
        job_id = max(job["id"] for job in client.jobs())
    wait_until(lambda: _state(service, job_id) != "running", timeout=TIMEOUT, interval=0.2)
    with Foreman.connect(service.address, token="t0k") as admin:
        (info,) = [job for job in admin.jobs() if job["id"] == job_id]
    assert info["state"] == "failed"
    assert "task 3 failed" in info["error"] and "bad input 3" in info["error"]
    listing = jobs(service, "list", "--state", "failed")
    assert any(line.split()[0] == str(job_id) for line in listing.stdout.splitlines()[1:])
