"""The foreman's HTTP side against a real foreman with real workers: JSON API, control, metrics, access rules."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import wait_until
from foreman import Foreman
from tasks import boom, record_start, slow_whoami, square


@pytest.fixture
def api(fm: Foreman) -> httpx.Client:
    """The admin's API client: the foreman made up its token, ``fm.token``."""
    with httpx.Client(base_url=fm.dashboard_url, timeout=10,
                      headers={"Authorization": f"Bearer {fm.token}"}) as client:
        yield client


def test_workers_and_health(fm: Foreman, api: httpx.Client) -> None:
    assert api.get("/health").json() == {"status": "ok", "workers": 2, "jobs": 0}
    workers = api.get("/api/workers").json()
    assert sorted(w["id"] for w in workers) == sorted(fm.workers)
    worker = workers[0]
    for key in ("host", "platform", "cpu_count", "memory", "gpus", "capabilities", "status", "tasks_done",
                "tasks_failed", "tasks_running", "throughput", "last_heartbeat_age", "connected"):
        assert key in worker
    assert worker["connected"] is True and worker["gpus"] == [] and worker["last_heartbeat_age"] < 2
    one = api.get(f"/api/workers/{worker['id']}").json()
    assert one["id"] == worker["id"]
    missing = api.get("/api/workers/nobody")
    assert missing.status_code == 404 and "nobody" in missing.json()["detail"]


def test_jobs_progress_and_failures(fm: Foreman, api: httpx.Client) -> None:
    fm.map(square, range(500))
    with pytest.raises(Exception):
        fm.map(boom, range(10))
    jobs = api.get("/api/jobs").json()
    failed, done = jobs[0], jobs[1]
    assert (done["name"], done["state"], done["done"], done["total"], done["failed"]) == ("square", "done", 500,
                                                                                             500, 0)
    assert failed["name"] == "boom" and failed["state"] == "failed"
    assert failed["failures"][0] == {"task": 3, "type": "tasks.CustomError", "message": "bad input 3",
                                     "worker": failed["failures"][0]["worker"]}
    assert api.get(f"/api/jobs/{done['id']}").json()["done"] == 500
    assert api.get("/api/jobs/999").status_code == 404


def test_running_job_shows_progress(fm: Foreman, api: httpx.Client) -> None:
    job = fm.imap(slow_whoami, range(400), chunksize=5)
    next(job)
    view = api.get(f"/api/jobs/{job.id}").json()
    assert view["state"] == "running" and view["total"] == 400 and view["running"] > 0
    assert view["queued"] + view["running"] + view["done"] <= 400
    list(job)
    wait_until(lambda: api.get(f"/api/jobs/{job.id}").json()["state"] == "done")


def test_cancel_a_running_job(fm: Foreman, api: httpx.Client, tmp_path) -> None:
    """Queued tasks never run, running ones are stopped, the caller gets CancelledError."""
    marks = tmp_path / "started.txt"
    job = fm.imap(record_start, [(str(marks), i) for i in range(20)], chunksize=1)
    outcome: dict = {}

    def consume() -> None:
        try:
            list(job)
        except BaseException as exc:  # noqa: BLE001
            outcome["error"] = exc

    consumer = threading.Thread(target=consume)
    consumer.start()
    wait_until(lambda: marks.exists() and len(marks.read_text().split()) == 2)  # one running per worker
    response = api.post(f"/api/jobs/{job.id}/cancel")
    assert response.json() == {"job": job.id, "cancelled": True}
    consumer.join(timeout=20)
    assert isinstance(outcome.get("error"), concurrent.futures.CancelledError)
    started = time.monotonic()
    assert fm.map(square, range(10)) == [x * x for x in range(10)]  # running tasks were killed: workers free
    assert time.monotonic() - started < 10
    assert len(marks.read_text().split()) == 2  # nothing queued ever started
    assert api.get(f"/api/jobs/{job.id}").json()["state"] == "cancelled"
    assert api.post(f"/api/jobs/{job.id}/cancel").status_code == 409


def test_restart_is_relayed_to_the_worker_over_its_own_socket(fm: Foreman, api: httpx.Client) -> None:
    target = fm.workers[0]
    job = fm.imap(slow_whoami, range(600))
    results = [next(job) for _ in range(50)]
    assert api.post(f"/api/workers/{target}/restart").json()["sent"] is True
    results.extend(job)
    assert [x for x, _ in results] == list(range(600))  # nothing lost, nothing twice
    wait_until(lambda: target in fm.workers)
    events = api.get("/api/status").json()["events"]
    assert any(e["kind"] == "restart" and target in e["message"] for e in events)
    assert api.post("/api/workers/nobody/restart").status_code == 404


def test_metrics_are_prometheus_text(fm: Foreman, api: httpx.Client) -> None:
    fm.map(square, range(100))
    families = {f.name: f for f in text_string_to_metric_families(api.get("/metrics").text)}
    done = {s.labels.get("state"): s.value for s in families["crowdcompute_tasks"].samples
            if s.name == "crowdcompute_tasks_total"}
    assert done["done"] >= 100
    assert families["crowdcompute_workers_connected"].samples[0].value == 2
    for name in ("crowdcompute_tasks_queued", "crowdcompute_task_duration_seconds", "crowdcompute_bytes",
                 "crowdcompute_reassignments"):
        assert name in families


def test_the_websocket_port_redirects_browsers_to_the_dashboard(fm: Foreman) -> None:
    response = httpx.get(fm.address.replace("ws://", "http://") + "/", follow_redirects=False)
    assert response.status_code == 302
    assert response.headers["location"] == fm.dashboard_url


def test_control_needs_the_token() -> None:
    with Foreman(port=0, token="tok", local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        fm.wait_for_workers(1)
        worker = fm.workers[0]
        with httpx.Client(base_url=fm.dashboard_url, timeout=10) as api:
            assert api.get("/api/workers").status_code == 200  # read-only stays open on loopback
            assert api.post(f"/api/workers/{worker}/restart").status_code == 401
            assert api.post(f"/api/workers/{worker}/restart",
                            headers={"Authorization": "Bearer nope"}).status_code == 403
            assert api.post("/api/jobs/1/cancel").status_code == 401
            ok = api.post(f"/api/workers/{worker}/restart", headers={"Authorization": "Bearer tok"})
            assert ok.status_code == 200
            assert api.post("/login", content="token=nope",
                            headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 401
            login = api.post("/login", content="token=tok", follow_redirects=False,
                             headers={"content-type": "application/x-www-form-urlencoded"})
            cookie = login.headers["set-cookie"]
            assert login.status_code == 303 and "HttpOnly" in cookie and "samesite=strict" in cookie.lower()
            assert "tok" not in cookie.split(";")[0].split("=", 1)[1]  # a digest, never the token itself
            assert api.post(f"/api/workers/{worker}/restart").status_code == 200  # the cookie now authorises


def test_progress_bar(fm: Foreman, capsys) -> None:
    assert fm.map(square, range(300), progress=True) == [x * x for x in range(300)]
    assert "300/300" in capsys.readouterr().err


def test_dashboard_can_be_disabled() -> None:
    with Foreman(port=0, dashboard=False) as fm:
        assert fm.dashboard_url is None
        response = httpx.get(fm.address.replace("ws://", "http://") + "/")
        assert response.status_code == 426
