"""What each install gives (issue 21): a plain install is a worker without the web stack; ``[default]`` adds the
dashboards; a built wheel carries its templates and static files; platforms and Pythons are told honestly.

The fast tests hide a package from a real subprocess (``sys.modules[name] = None`` makes its import fail as if it
were not installed); the slow ones build real virtual environments, from the local package index and pip's cache.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import stop_process, wait_until, worker_env
from tasks import square
from websockets.asyncio.client import connect

from foreman import Foreman, protocol
from foreman.addresses import split_token
from foreman.protocol import Kind

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60
WEB_STACK = ("fastapi", "uvicorn", "starlette", "jinja2", "prometheus_client")


def without(modules: tuple[str, ...], module: str, *args: str) -> list[str]:
    """A command line running ``python -m module args`` as if ``modules`` were not installed."""
    code = (f"import runpy, sys\nfor name in {modules!r}:\n    sys.modules[name] = None\n"
            f"sys.argv = [{module!r}, *sys.argv[1:]]\nrunpy.run_module({module!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *args]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in worker_env().items() if not k.startswith("CROWDCOMPUTE_")}


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[Any]]]:
    started: list[subprocess.Popen[Any]] = []
    yield started
    for process in started:
        stop_process(process)


def start_worker(processes: list[subprocess.Popen[Any]], command: list[str], log: Path) -> subprocess.Popen[Any]:
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=clean_env(), stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=ROOT)
    processes.append(process)
    return process


def lines_with(log: Path, text: str) -> list[str]:
    return [line for line in log.read_text().splitlines() if text in line]


# -- without the web stack ---------------------------------------------------------------------------------------

def test_a_worker_without_the_web_stack_joins_computes_and_says_so_in_one_line(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    log = tmp_path / "worker.log"
    with Foreman(port=0, dashboard=False) as fm:
        start_worker(processes, without(WEB_STACK, "worker", fm.address, "--concurrency", "1", "--worker-id",
                                        "headless", "--dashboard-port", "0"), log)
        fm.wait_for_workers(1, timeout=TIMEOUT)
        assert fm.map(square, range(5), timeout=TIMEOUT) == [0, 1, 4, 9, 16]
    notes = lines_with(log, "without a dashboard")
    assert len(notes) == 1, log.read_text()
    assert "crowdcompute[dashboard]" in notes[0] and "Traceback" not in log.read_text()


def test_a_foreman_without_the_web_stack_runs_without_its_dashboard(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    log = tmp_path / "foreman.log"
    with open(log, "w") as err:
        foreman = subprocess.Popen(without(WEB_STACK, "foreman", "--port", "0", "--local-workers", "1"),
                                   env=clean_env(), stdout=subprocess.PIPE, stderr=err, text=True,
                                   stdin=subprocess.DEVNULL)
    processes.append(foreman)
    assert foreman.stdout is not None
    first = foreman.stdout.readline()
    assert first.startswith("foreman ready at ws://127.0.0.1:"), (first, log.read_text())
    address = first.split()[-1]
    lines = [foreman.stdout.readline() for _ in range(2)]  # the worker command, then the client's (made-up) token
    token = re.search(r"token='([^']+)'", lines[1])
    assert lines[1].startswith("clients connect with:") and token, lines
    with Foreman.connect(address, token=token.group(1)) as client:
        assert client.map(square, range(4), timeout=TIMEOUT) == [0, 1, 4, 9]  # its local worker computes
    foreman.terminate()
    out, _ = foreman.communicate(timeout=TIMEOUT)
    assert foreman.returncode == 0, log.read_text()
    assert "dashboard at" not in out
    notes = lines_with(log, "without a dashboard")
    assert len(notes) == 1 and "crowdcompute[dashboard]" in notes[0], log.read_text()
    assert "Traceback" not in log.read_text()


def test_progress_without_tqdm_is_one_clear_error() -> None:
    code = ("import sys; sys.modules['tqdm'] = None; sys.modules['tqdm.auto'] = None\n"
            "from foreman import Foreman\nfrom tasks import square\n"
            "with Foreman(port=0, dashboard=False) as fm:\n"
            "    try:\n        fm.map(square, [1], progress=True)\n"
            "    except ImportError as exc:\n        print('refused:', exc)\n"
            "    print('jobs:', fm.jobs())\n")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert "refused: progress=True draws its bar with tqdm" in result.stdout and "pip install tqdm" in result.stdout


# -- without psutil ----------------------------------------------------------------------------------------------

def test_a_worker_without_psutil_skips_the_rules_that_need_it_and_keeps_the_clocks(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    log = tmp_path / "worker.log"
    with Foreman(port=0, dashboard=False) as fm:
        worker = start_worker(processes, without(
            ("psutil",), "worker", fm.address, "--concurrency", "1", "--no-dashboard", "--max-owner-cpu", "50",
            "--pause-on-battery", "--active-hours", "00:00-00:00", "--sample-interval", "0.2"), log)
        fm.wait_for_workers(1, timeout=TIMEOUT)  # before: exit 2, "the owner's pause rules read ... psutil"
        assert fm.map(square, range(5), timeout=TIMEOUT) == [0, 1, 4, 9, 16]
        assert worker.poll() is None
    warnings = lines_with(log, "psutil is missing")
    assert len(warnings) == 1, log.read_text()
    assert "--max-owner-cpu" in warnings[0] and "--pause-on-battery" in warnings[0]
    assert "--active-hours" not in warnings[0]


def test_without_psutil_the_clock_is_still_read_and_judged() -> None:
    code = ("import sys, datetime; sys.modules['psutil'] = None\n"
            "from worker.readings import MachineSampler\nfrom worker.policy import ActiveHours, Window\n"
            "r = MachineSampler().read()\nnow = datetime.datetime.combine(datetime.date.today(), r.local_time)\n"
            "away = (now + datetime.timedelta(hours=12)).time()\n"
            "closed = ActiveHours((Window(away, (now + datetime.timedelta(hours=13)).time()),))\n"
            "print(r.owner_cpu, r.on_battery, r.cpu_temp, closed.judge(r, False) is not None)\n")
    result = subprocess.run([sys.executable, "-c", code], env=clean_env(), capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["None", "None", "None", "True"]


# -- platforms ---------------------------------------------------------------------------------------------------

def test_the_worker_refuses_a_platform_without_sendmsg_in_one_line() -> None:
    from worker.config import unsupported_platform

    assert unsupported_platform("posix", True) is None
    for os_name, has_sendmsg in (("nt", False), ("posix", False)):
        refusal = unsupported_platform(os_name, has_sendmsg)
        assert refusal is not None and "\n" not in refusal
        assert "Linux and macOS" in refusal and "Windows" in refusal


def test_the_readme_states_the_platforms() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Linux and macOS" in readme and "Windows" in readme
    assert "wherever CPython 3.10+ runs" not in readme


# -- a worker whose Python differs from the foreman's ------------------------------------------------------------

def test_welcome_says_what_the_jobs_need() -> None:
    from foreman.serialization import JOBS_ENV

    async def hello(address: str) -> dict[str, Any]:
        address, token = split_token(address)  # the worker token a foreman without one made up
        async with connect(address) as ws:
            await ws.send(protocol.encode(Kind.HELLO, {
                "protocol": protocol.PROTOCOL_VERSION, "worker_id": "old-python", "token": token,
                "python": "3.9.18", "cloudpickle": "3.1.0", "concurrency": 1, "capabilities": []}))
            return protocol.decode(await asyncio.wait_for(ws.recv(), 20)).header

    with Foreman(port=0, dashboard=False) as fm:
        welcome = asyncio.run(hello(fm.address))
    assert welcome["jobs_env"] == JOBS_ENV == {"python": "%d.%d" % sys.version_info[:2],
                                               "cloudpickle": __import__("cloudpickle").__version__.split(".")[0]}


def test_a_worker_names_the_python_the_jobs_need() -> None:
    from foreman.serialization import JOBS_ENV, env_mismatch

    assert env_mismatch(JOBS_ENV) is None
    assert env_mismatch(None) is None  # a foreman that does not say
    message = env_mismatch({"python": "3.99", "cloudpickle": JOBS_ENV["cloudpickle"]})
    assert message is not None and "\n" not in message
    assert "need Python 3.99" in message and "gets no work" in message
    assert f"Python {'.'.join(map(str, sys.version_info[:3]))}" in message  # and what this worker runs


# -- real environments (slow) ------------------------------------------------------------------------------------

def _pyenv_python(minor: str) -> Path | None:
    """An installed CPython ``minor`` (``3.10``): on PATH as python3.10, or under pyenv."""
    found = shutil.which(f"python{minor}")
    if found and not Path(found).resolve().name.startswith("pyenv"):
        try:
            version = subprocess.run([found, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                     capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            version = ""
        if version == minor:
            return Path(found)
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = sorted(root.glob(f"{minor}.*/bin/python{minor}")) if root.is_dir() else []
    return candidates[-1] if candidates else None


def make_venv(path: Path, python: Path | str, *requirements: str) -> Path:
    """A fresh virtual environment at ``path`` with ``requirements`` installed by pip; its python."""
    subprocess.run([str(python), "-m", "venv", str(path)], check=True, timeout=120)
    bin_python = path / "bin" / "python"
    if requirements:
        done = subprocess.run([str(bin_python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *requirements], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return bin_python


def third_party(python: Path) -> set[str]:
    """The distributions installed in a venv, less pip, setuptools and the project itself."""
    code = ("import importlib.metadata as m, json\n"
            "print(json.dumps(sorted({d.metadata['Name'].lower() for d in m.distributions()})))")
    names = set(json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                                          timeout=60).stdout))
    return names - {"pip", "setuptools", "wheel", "crowdcompute"}


def run_worker(processes: list[subprocess.Popen[Any]], python: Path, log: Path, *args: str,
               cwd: Path) -> subprocess.Popen[Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROWDCOMPUTE_", "PYTHON"))}
    with open(log, "w") as out:
        process = subprocess.Popen([str(python), "-m", "worker", *args], env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd)
    processes.append(process)
    return process


@pytest.mark.slow
def test_the_minimal_install_joins_and_computes(tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    """README's small-device install, in a fresh venv: at most four third-party distributions, and its worker
    joins a foreman (run from this, full, environment), computes, and says in one line it has no dashboard."""
    python = make_venv(tmp_path / "venv", sys.executable, str(ROOT))
    installed = third_party(python)
    assert len(installed) <= 4 and {"websockets", "cloudpickle"} <= installed, installed
    assert not installed & {"fastapi", "uvicorn", "jinja2", "prometheus-client", "pydantic"}, installed
    log = tmp_path / "worker.log"
    with Foreman(port=0, dashboard=False) as fm:
        run_worker(processes, python, log, fm.address, "--concurrency", "1", "--worker-id", "small",
                   "--dashboard-port", "0", cwd=tmp_path)  # not the source tree: the installed package
        fm.wait_for_workers(1, timeout=TIMEOUT)
        # Functions by value: the small venv has no tests/ on its path.
        assert fm.map(lambda x: x * x, range(6), timeout=TIMEOUT) == [0, 1, 4, 9, 16, 25]
    notes = lines_with(log, "without a dashboard")
    assert len(notes) == 1 and "crowdcompute[dashboard]" in notes[0], log.read_text()


@pytest.mark.slow
def test_a_worker_on_another_python_says_which_the_jobs_need(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    here = "%d.%d" % sys.version_info[:2]
    other = next((m for m in ("3.10", "3.13", "3.12", "3.11") if m != here and _pyenv_python(m)), None)
    if other is None:
        pytest.skip(f"no CPython other than {here} found on this machine")
    python = make_venv(tmp_path / "venv", _pyenv_python(other), f"{ROOT}[dashboard]")  # type: ignore[arg-type]
    log = tmp_path / "worker.log"
    with Foreman(port=0, dashboard=False) as fm:
        run_worker(processes, python, log, fm.address, "--concurrency", "1", "--dashboard-port", "0", cwd=tmp_path)
        fm.wait_for_workers(1, timeout=TIMEOUT)
        wait_until(lambda: lines_with(log, "gets no work"), timeout=TIMEOUT)
        url = re.search(r"dashboard at (\S+)", lines_with(log, "dashboard at")[0]).group(1)  # type: ignore[union-attr]
        shown = json.loads(urllib.request.urlopen(url, timeout=TIMEOUT).read())["env_mismatch"]
    (line,) = lines_with(log, "gets no work")
    for said in (line, shown):  # the log, and the dashboard's status (its page shows it by the connection)
        assert f"this foreman's jobs need Python {here}" in said and f"runs Python {other}." in said


@pytest.mark.slow
def test_the_wheel_installs_and_serves_both_dashboards(
        tmp_path: Path, processes: list[subprocess.Popen[Any]]) -> None:
    """``pip wheel .`` builds a wheel with the templates and static files; installed with ``[default]`` in a fresh
    venv, its foreman and its worker both serve their dashboards."""
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = dist.glob("crowdcompute-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    for shipped in ("dashboard/templates/", "dashboard/static/"):
        assert any(name.startswith(shipped) for name in names), (shipped, names)
    python = make_venv(tmp_path / "venv", sys.executable, f"{wheel}[default]")
    version = subprocess.run([str(python.parent / "crowdcompute"), "--version"], capture_output=True, text=True,
                             timeout=TIMEOUT)
    assert version.stdout.split() == ["crowdcompute", __import__("foreman.version").version.VERSION]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CROWDCOMPUTE_", "PYTHON"))}
    with open(tmp_path / "foreman.log", "w") as err:
        foreman = subprocess.Popen([str(python), "-m", "foreman", "--port", "0"], env=env, stdout=subprocess.PIPE,
                                   stderr=err, text=True, stdin=subprocess.DEVNULL, cwd=tmp_path)
    processes.append(foreman)
    assert foreman.stdout is not None
    said = [foreman.stdout.readline() for _ in range(4)]  # address, worker command, client line, dashboard
    address = said[0].split()[-1]
    worker_address = said[1].split()[-1].strip("'")  # carries the worker token the foreman made up
    token = re.search(r"token='([^']+)'", said[2])
    dashboard = said[3].split()[-1]
    assert address.startswith("ws://") and dashboard.startswith("http://") and token, (
        said, (tmp_path / "foreman.log").read_text())
    assert "<html" in urllib.request.urlopen(dashboard, timeout=TIMEOUT).read().decode().lower()

    log = tmp_path / "worker.log"
    run_worker(processes, python, log, worker_address, "--concurrency", "1", "--dashboard-port", "0", cwd=tmp_path)
    wait_until(lambda: lines_with(log, "dashboard at"), timeout=TIMEOUT)
    url = re.search(r"dashboard at (\S+)", lines_with(log, "dashboard at")[0]).group(1)  # type: ignore[union-attr]
    browser = urllib.request.Request(url, headers={"Accept": "text/html"})
    page = urllib.request.urlopen(browser, timeout=TIMEOUT).read().decode()
    assert "<html" in page.lower()
    static = re.search(r'(?:src|href)="/?(static/[^"]+)"', page)
    assert static, page[:500]
    script = urllib.request.urlopen(url.rstrip("/") + "/" + static.group(1), timeout=TIMEOUT)
    assert script.status == 200 and len(script.read()) > 100  # a static file the wheel carries
    with Foreman.connect(address, token=token.group(1)) as client:
        assert client.map(lambda x: x + 1, range(3), timeout=TIMEOUT) == [1, 2, 3]
