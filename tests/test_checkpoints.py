"""Checkpoints: a long task saves progress and resumes from it on another worker when its worker dies."""

from __future__ import annotations

import os
import signal

import pytest

from conftest import wait_until
from foreman import Foreman
from tasks import big_checkpoint, counts_to
from worker import checkpoint, last_checkpoint


def test_outside_a_worker_checkpoints_do_nothing() -> None:
    assert checkpoint({"step": 1}) is False
    assert last_checkpoint() is None
    assert counts_to((3, 0.0))[:2] == (3, 0)


def test_a_task_resumes_from_its_last_checkpoint_after_its_worker_is_killed(spawn_worker) -> None:
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        first = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "first")
        fm.wait_for_workers(1)
        future = fm.submit(counts_to, (40, 0.05))
        wait_until(lambda: fm._server.checkpoints.of_job(1).get(0) is not None
                   and len(fm._server.checkpoints.of_job(1)) == 1 and _saved_step(fm) >= 10, timeout=20)
        saved = _saved_step(fm)
        os.kill(first.pid, signal.SIGKILL)
        second = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "second")
        steps, resumed_from, pid = future.result(timeout=30)
        assert steps == 40 and pid == second.pid
        assert resumed_from >= saved  # not from scratch
        assert fm._server.checkpoints.held == 0 and not fm._server.checkpoints.of_job(1)  # dropped with the result


def test_a_checkpoint_over_the_limit_fails_that_task_clearly(spawn_worker) -> None:
    with Foreman(port=0, local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        with pytest.raises(ValueError, match="over the 1048576-byte limit"):
            fm.submit(big_checkpoint, 1).result(timeout=30)


def _saved_step(fm: Foreman) -> int:
    import pickle

    return pickle.loads(fm._server.checkpoints.of_job(1)[0])
