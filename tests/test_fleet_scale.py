"""A fleet of 200 simulated workers (bench/simfleet.py: the real protocol, many connections per process) on one
foreman: a map over them is exact, and when 50 vanish at once mid-map their batches are reassigned and the map
still completes exactly."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from bench.simfleet import SimFleet, slow_square, square
from foreman import Foreman

STAYING, VANISHING = 150, 50


@pytest.fixture
def fleet_foreman() -> Iterator[tuple[Foreman, SimFleet]]:
    with Foreman(port=0, dashboard=False, heartbeat_interval=1.0, heartbeat_timeout=30.0) as fm:
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


def test_a_map_over_200_simulated_workers_is_exact_and_survives_50_vanishing(fleet_foreman) -> None:
    fm, fleet = fleet_foreman
    assert fm.map(square, range(4000), chunksize=1) == [x * x for x in range(4000)]
    served = fm._call(lambda: sum(w.tasks_done > 0 for w in fm._server.scheduler.workers.values()))
    assert served == STAYING + VANISHING  # one-task batches reached every worker

    job = fm.imap(slow_square, range(1000), chunksize=1, timeout=120)
    deadline = time.monotonic() + 60
    while not all(_held_by(fm, "gone-").values()):  # every doomed worker holds work when it goes
        assert time.monotonic() < deadline, _held_by(fm, "gone-")
        time.sleep(0.02)
    fleet.kill("gone")
    assert list(job) == [x * x for x in range(1000)]
    scheduler = fm._server.scheduler
    assert fm._call(lambda: scheduler.workers_lost) == VANISHING
    assert fm._call(lambda: scheduler.reassigned) >= VANISHING  # each held at least one batch
    assert sorted(fm.workers) == sorted(fleet.worker_ids("stay"))
