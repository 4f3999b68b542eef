"""A fleet of 200 simulated workers (bench/simfleet.py: the real protocol, many connections per process) on one
foreman: a map over them is exact, and when 50 vanish at once mid-map (killed, or frozen so that only the
heartbeat timeout finds them) their batches are reassigned and the map still completes exactly."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import ROOT, worker_env

from bench.simfleet import SimFleet, slow_square, square
from foreman import Foreman

pytestmark = pytest.mark.slow  # fleets of simulated workers

STAYING, VANISHING = 150, 50


@contextmanager
def fleet_foreman(heartbeat_timeout: float) -> Iterator[tuple[Foreman, SimFleet]]:
    with Foreman(port=0, dashboard=False, heartbeat_interval=0.5, heartbeat_timeout=heartbeat_timeout) as fm:
        fleet = SimFleet(fm.address, {"stay": STAYING, "gone": VANISHING})
        try:
            fleet.wait_ready()
            fm.wait_for_workers(STAYING + VANISHING, timeout=60)
            yield fm, fleet
        finally:
            fleet.close()


def _held_by(fm: Foreman, prefix: str) -> dict[str, int]:
    """Batches in flight on each connected worker whose id starts with ``prefix``."""
    return fm._call(lambda: {w.id: len(w.batches) for w in fm._server.scheduler.workers.values()
                             if w.id.startswith(prefix)})


def _vanish_mid_map(fm: Foreman, vanish) -> list[int]:
    """Start a map of slow tasks, make the doomed group vanish once each of its workers holds some, finish it."""
    job = fm.imap(slow_square, range(1000), chunksize=1, timeout=120)
    deadline = time.monotonic() + 60
    while not all(_held_by(fm, "gone-").values()):
        assert time.monotonic() < deadline, _held_by(fm, "gone-")
        time.sleep(0.02)
    vanish("gone")
    return list(job)


def test_a_map_over_200_simulated_workers_is_exact_and_survives_50_killed() -> None:
    with fleet_foreman(heartbeat_timeout=30.0) as (fm, fleet):  # found by their closed sockets, not the timeout
        assert fm.map(square, range(4000), chunksize=1) == [x * x for x in range(4000)]
        scheduler = fm._server.scheduler
        served = fm._call(lambda: sum(w.tasks_done > 0 for w in scheduler.workers.values()))
        assert served == STAYING + VANISHING  # one-task batches reached every worker

        assert _vanish_mid_map(fm, fleet.kill) == [x * x for x in range(1000)]
        assert fm._call(lambda: scheduler.workers_lost) == VANISHING
        assert sorted(fm.workers) == sorted(fleet.worker_ids("stay"))


def test_50_frozen_workers_are_found_by_the_heartbeat_timeout_and_their_work_redone() -> None:
    with fleet_foreman(heartbeat_timeout=3.0) as (fm, fleet):
        assert _vanish_mid_map(fm, fleet.freeze) == [x * x for x in range(1000)]
        deadline = time.monotonic() + 60
        while _held_by(fm, "gone-"):  # the map may finish (by speculative copies) before they are dropped
            assert time.monotonic() < deadline, sorted(_held_by(fm, "gone-"))
            time.sleep(0.05)
        assert fm._call(lambda: fm._server.scheduler.workers_lost) >= VANISHING


def test_the_fleet_benchmark_runs_end_to_end(tmp_path) -> None:
    """A smoke run of bench/fleet_scale.py on two small fleets (no figure is asserted, only that each is there)."""
    done = subprocess.run([sys.executable, "-m", "bench.fleet_scale", "--sizes", "20,40", "--rest", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=ROOT,
                          env=worker_env(), stdin=subprocess.DEVNULL, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "| workers | CPU at rest |" in done.stdout
    rows = [json.loads(line) for line in (tmp_path / "fleet_scale.jsonl").read_text().splitlines()]
    assert [row["workers"] for row in rows] == [20, 40]
    for row in rows:
        assert "error" not in row and row["map_exact"] and row["loss_exact"]
        assert row["detect_s"] > 0 and row["recover_s"] > 0 and row["cpu_us_per_batch"] > 0
