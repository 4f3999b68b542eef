"""Starting and stopping the foreman and the worker: signals, last words, a ticker that survives its own errors,
and messages that say what is really wrong (issue 18). Real processes, real signals, loopback only."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, start_worker, stop_process, wait_until, worker_env
from foreman import Foreman
from foreman.addresses import with_token
from foreman.auth import Authenticator
from foreman.journal import Journal
from foreman.server import ForemanServer
from tasks import square


def _ignoring_sigint() -> None:
    """What a shell does to a command started with ``&``: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _wait_for_line(process: subprocess.Popen[str], pattern: str, lines: list[str], timeout: float = 60) -> str:
    assert process.stdout is not None
    deadline = time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return line
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no line matching {pattern!r}:\n" + "".join(lines))


def test_a_foreman_started_with_sigint_ignored_still_stops_on_sigint(tmp_path: Path) -> None:
    """A foreman started in the background from a shell script inherits an ignored SIGINT; it must still stop
    gracefully on SIGINT (as the worker does), and say so."""
    process = subprocess.Popen([sys.executable, "-m", "foreman", "--port", "0", "--no-dashboard",
                                "--data-dir", str(tmp_path / "data")],
                               env=worker_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, preexec_fn=_ignoring_sigint)
    lines: list[str] = []
    try:
        _wait_for_line(process, r"foreman ready at", lines)
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=30)
        lines.append(out)
        assert process.returncode == 0, "".join(lines)
        assert "foreman stopped" in out, "".join(lines)
        assert "Traceback" not in out
    finally:
        stop_process(process)


def test_a_worker_stopped_with_sigint_says_it_stopped_and_what_it_handed_back() -> None:
    with Foreman(port=0, local_workers=0, dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        worker = start_worker(fm.address, "--concurrency", "1", "--no-dashboard", "--worker-id", "leaver",
                              "--log-level", "INFO", capture=True)
        try:
            fm.wait_for_workers(1, timeout=30)
            assert fm.map(square, range(5), timeout=30) == [0, 1, 4, 9, 16]
            worker.send_signal(signal.SIGINT)
            _, err = worker.communicate(timeout=60)
        finally:
            stop_process(worker)
    last = err.strip().splitlines()[-1]
    assert "draining" in err
    assert re.search(r"stopped: handed back \d+ unstarted batch\(es\); every result was handed in", last), err


def _silent_job_waits(fm: Foreman, caplog: pytest.LogCaptureFixture, **options: object) -> str:
    caplog.set_level(logging.WARNING, logger="crowdcompute.foreman")
    future = fm.options(**options).submit(square, 3) if options else fm.submit(square, 3)
    wait_until(lambda: "is waiting" in caplog.text, timeout=20)
    future.cancel()
    return next(r.getMessage() for r in caplog.records if "is waiting" in r.getMessage())


def test_a_foreman_without_workers_says_no_worker_is_connected(caplog: pytest.LogCaptureFixture) -> None:
    with Foreman(port=0, local_workers=0, dashboard=False) as fm:
        message = _silent_job_waits(fm, caplog)
    assert "no worker is connected" in message, message
    assert "py3" not in message  # not a version problem


def test_a_foreman_whose_workers_cannot_serve_a_job_says_what_they_lack(caplog: pytest.LogCaptureFixture) -> None:
    with Foreman(port=0, local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=30)
        message = _silent_job_waits(fm, caplog, requires={"quantum"})
    assert "no connected worker has" in message and "quantum" in message, message


class LockedJournal(Journal):
    """A journal whose database another process holds locked (an operator's backup, say): every purge fails as
    SQLite fails then. Everything else is the real journal."""

    def purge(self, now: float | None = None) -> list[int]:
        raise sqlite3.OperationalError("database is locked")


@pytest.mark.asyncio
async def test_an_exception_in_the_tick_does_not_stop_heartbeat_expiry(tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """One exception in the foreman's periodic tick must not end it: a worker that froze afterwards is still
    declared lost, and the error is logged once, not once a tick."""
    caplog.set_level(logging.ERROR, logger="crowdcompute.foreman")
    auth = Authenticator.generated()
    server = ForemanServer(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5, auth=auth,
                           journal=LockedJournal(tmp_path / "journal.sqlite"))
    await server.start()
    worker = start_worker(with_token(server.address, auth.worker_token), "--concurrency", "1", "--no-dashboard",
                          "--worker-id", "frozen")
    try:
        deadline = time.monotonic() + 30
        while "frozen" not in server.peers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert "frozen" in server.peers
        await asyncio.sleep(1.0)  # several ticks, each failing its purge
        os.kill(worker.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        while server.scheduler.workers_lost == 0 and time.monotonic() - frozen_at < 15:
            await asyncio.sleep(0.05)
        assert server.scheduler.workers_lost == 1, "the frozen worker was never declared lost"
        assert time.monotonic() - frozen_at < 1.5 + 3.0
        failures = [r for r in caplog.records if "journal purge failed" in r.getMessage()]
        assert len(failures) == 1, [r.getMessage() for r in caplog.records]
    finally:
        stop_process(worker)
        await server.close()
