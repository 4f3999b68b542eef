"""Shared fixtures: real foremen on loopback ports, real worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from foreman import Foreman

ROOT = Path(__file__).resolve().parent.parent
TESTS = Path(__file__).resolve().parent


def worker_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def start_worker(address: str, *args: str, env: dict[str, str] | None = None,
                 capture: bool = False) -> subprocess.Popen[str]:
    """A real ``python -m worker`` process dialling ``address``."""
    pipe = subprocess.PIPE if capture else None
    return subprocess.Popen([sys.executable, "-m", "worker", address, "--log-level", "WARNING", *args],
                            env=env or worker_env(), stdout=pipe, stderr=pipe, text=True,
                            stdin=subprocess.DEVNULL)


def stop_process(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        try:
            os.kill(process.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        process.kill()
    process.wait(timeout=10)


@pytest.fixture
def spawn_worker() -> Iterator:
    """Start extra worker processes; all are killed at the end of the test."""
    started: list[subprocess.Popen[str]] = []

    def spawn(address: str, *args: str, **kwargs) -> subprocess.Popen[str]:
        process = start_worker(address, *args, **kwargs)
        started.append(process)
        return process

    yield spawn
    for process in started:
        stop_process(process)


@pytest.fixture
def fm() -> Iterator[Foreman]:
    """An embedded foreman with 2 local workers and fast heartbeats."""
    with Foreman(port=0, local_workers=2, heartbeat_interval=0.2, heartbeat_timeout=1.5) as foreman:
        foreman.wait_for_workers(2, timeout=30)
        yield foreman


def wait_until(predicate, timeout: float = 20.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


CHROMIUM = "/usr/bin/chromium"  # Debian's package; .ci/run installs it
ARTIFACTS = TESTS / "artifacts"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember a failed test, so browser fixtures can save a screenshot."""
    outcome = yield
    if outcome.get_result().failed:
        item.test_failed = True


@pytest.fixture
def browser_page(request):
    """A page in headless Chromium (Playwright); saves a screenshot to tests/artifacts/ when the test fails."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        try:
            yield page
        finally:
            if getattr(request.node, "test_failed", False):
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
            browser.close()
