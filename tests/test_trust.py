"""Results from strangers, end to end: real worker processes, one of them a cheater, over real WebSockets and HTTP.

The cheater is an ordinary ``python -m worker`` started with CROWDCOMPUTE_TEST_CHEAT set; the task functions in
tests/tasks.py return a wrong value there.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from conftest import worker_env
from tasks import cheat_square, slow_whoami

from foreman import Foreman
from foreman.errors import ValidationError

CHEAT = {"CROWDCOMPUTE_TEST_CHEAT": "1"}


@pytest.fixture
def fleet(spawn_worker) -> Iterator[Foreman]:
    """A foreman without local workers, and three volunteers: ``cheater``, ``honest1``, ``honest2``."""
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        for name, extra in (("cheater", CHEAT), ("honest1", {}), ("honest2", {})):
            spawn_worker(fm.address, "--worker-id", name, "--no-dashboard", env=worker_env(**extra))
        fm.wait_for_workers(3)
        yield fm


def test_redundancy_outvotes_a_cheater_who_is_then_quarantined(fleet: Foreman) -> None:
    assert fleet.map(cheat_square, range(40), redundancy=2, chunksize=1) == [x * x for x in range(40)]
    with httpx.Client(base_url=fleet.dashboard_url, timeout=10) as api:
        status = api.get("/api/status").json()
        cheater = api.get("/api/workers/cheater").json()
        board = api.get("/api/leaderboard").json()
    assert status["totals"]["replicas_added"] >= 1  # a disagreement asked for a third replica
    assert any(e["kind"] == "replica" for e in status["events"])
    reputation = cheater["reputation"]
    assert reputation["state"] == "quarantined" and reputation["agreements"] == 0
    assert reputation["disagreements"] >= 4 and "quarantined: 0 of" in reputation["reason"]
    honest = {row["worker"]: row for row in board["workers"]}
    # Every task was accepted on the two honest workers' agreeing copies; the cheater earned nothing.
    assert set(honest) == {"honest1", "honest2"}
    assert all(row["tasks"] == row["validated"] == 40 for row in honest.values())
    (volunteer,) = board["volunteers"]
    assert volunteer["volunteer"] == "worker" and volunteer["validated"] == 80 and volunteer["tasks"] == 80
    assert volunteer["cpu_seconds"] == pytest.approx(sum(row["cpu_seconds"] for row in honest.values()), abs=0.01)


def test_without_a_quorum_the_task_fails_with_every_candidate(fleet: Foreman) -> None:
    # quorum 3 of 3 workers, one of whom lies: never reached, and no fourth worker to ask.
    results = fleet.map(cheat_square, [5], redundancy=3, max_replicas=3, return_exceptions=True)
    (error,) = results
    assert isinstance(error, ValidationError) and error.task == 0
    assert sorted(error.candidates) == [("cheater", 26), ("honest1", 25), ("honest2", 25)]


def same_input(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] == b[0]  # (x, pid of the worker): replicas agree on x, their pids differ


def test_a_ban_from_the_api_stops_a_workers_work(spawn_worker) -> None:
    with Foreman(port=0, token="admin-secret", heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        alice, bob = (spawn_worker(fm.address, "--worker-id", name, "--no-dashboard",
                                   env=worker_env(CROWDCOMPUTE_TOKEN="admin-secret")) for name in ("alice", "bob"))
        fm.wait_for_workers(2)
        auth = {"Authorization": "Bearer admin-secret"}
        with httpx.Client(base_url=fm.dashboard_url, timeout=10, headers=auth) as api:
            def tasks_of() -> dict[str, int]:
                return {row["worker"]: row["tasks"] for row in api.get("/api/leaderboard").json()["workers"]}

            # redundancy=2 on two workers: each of them must run every task.
            fm.map(slow_whoami, range(10), [0.001] * 10, redundancy=2, comparator=same_input)
            assert tasks_of() == {"alice": 10, "bob": 10}
            assert httpx.post(f"{fm.dashboard_url}api/workers/bob/ban").status_code == 401
            banned = api.post("/api/workers/bob/ban", params={"reason": "test"}).json()
            assert banned["reputation"]["state"] == "banned"
            assert api.get("/api/workers/bob").json()["reputation"]["reason"] == "banned by the operator: test"
            assert {pid for _, pid in fm.map(slow_whoami, range(20), [0.01] * 20, chunksize=1)} == {alice.pid}
            assert tasks_of() == {"alice": 30, "bob": 10}
            assert api.post("/api/workers/bob/unban").json()["reputation"]["state"] == "ok"
            assert api.post("/api/workers/bob/unban").status_code == 409
            fm.map(slow_whoami, range(10), [0.001] * 10, redundancy=2, comparator=same_input)
            assert tasks_of() == {"alice": 40, "bob": 20}
        assert bob.poll() is None  # banned, not disconnected


def test_a_spot_check_on_a_trusted_local_worker_catches_a_lone_cheater(spawn_worker) -> None:
    with Foreman(port=0, local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        spawn_worker(fm.address, "--worker-id", "stranger", "--no-dashboard", env=worker_env(**CHEAT))
        fm.wait_for_workers(2)
        assert fm.map(cheat_square, range(12), spot_check=1.0, chunksize=1) == [x * x for x in range(12)]
        with httpx.Client(base_url=fm.dashboard_url, timeout=10) as api:
            workers = {w["id"]: w for w in api.get("/api/workers").json()}
        local = next(w for w in workers.values() if w["id"].startswith("local-"))
        assert local["trusted"] and local["volunteer"] == "local" and local["reputation"]["state"] == "ok"
        stranger = workers["stranger"]
        assert not stranger["trusted"] and stranger["reputation"]["disagreements"] >= 4
        assert stranger["reputation"]["state"] == "quarantined"


def test_bad_validation_options_are_refused() -> None:
    """A detached job keeps its options as JSON, so it cannot keep a comparator; a quorum above the
    redundancy is refused."""
    with Foreman(port=0, dashboard=False) as fm:
        with pytest.raises(ValueError, match="a comparator is code"):
            fm.submit_job(cheat_square, range(3), redundancy=2, comparator=same_input)
        with pytest.raises(ValueError, match="quorum must be an int from 1 to redundancy"):
            fm.map(cheat_square, range(3), redundancy=2, quorum=3)
