"""The worker's dashboard and HTTP API, served by a real worker process connected to a real foreman."""

from __future__ import annotations

import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect

from conftest import start_worker, stop_process, wait_until, worker_env
from foreman import Foreman
from foreman.addresses import split_token
from tasks import boom, sleep_then, square

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 1.5}
TOKEN = "s3cret-dashboard-token"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dashboard_worker(address: str, *args: str, port: int | None = None,
                     env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], httpx.Client]:
    """A worker process with its dashboard on a free port, and a client for it once it answers."""
    port = port or free_port()
    process = start_worker(address, "--concurrency", "2", "--dashboard-port", str(port), *args, env=env)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10)

    def answers() -> bool:
        try:
            return client.get("/health").status_code in (200, 503)
        except httpx.TransportError:
            return False

    wait_until(answers, timeout=30)
    return process, client


@pytest.fixture
def foreman() -> Iterator[Foreman]:
    with Foreman(port=0, dashboard=False, **FAST) as fm:
        yield fm


@pytest.fixture
def worker(foreman: Foreman) -> Iterator[tuple[subprocess.Popen[str], httpx.Client]]:
    process, client = dashboard_worker(foreman.address)
    try:
        foreman.wait_for_workers(1, timeout=30)
        wait_until(lambda: client.get("/health").status_code == 200)
        yield process, client
    finally:
        client.close()
        stop_process(process)


# -- shapes -------------------------------------------------------------------------------------------------------


def test_status_is_json_for_api_clients(foreman: Foreman, worker) -> None:
    process, api = worker
    response = api.get("/")  # Accept: */*, as requests.get("http://localhost:8001/").json() sends
    assert response.headers["content-type"] == "application/json"
    assert response.headers["vary"] == "Accept"
    status = response.json()
    assert status["worker_id"] == foreman.workers[0]
    assert status["status"] == "idle" and status["connected"] is True
    assert status["foreman_url"] == split_token(foreman.address)[0]  # the token it dialled with is not shown
    assert status["current_tasks"] == [] and status["queued_batches"] == 0
    assert status["pid"] == process.pid and status["version"]
    config = status["config"]
    assert config["concurrency"] == 2 and config["dashboard"]["token_required"] is False
    assert config["dashboard"]["port"] == int(str(api.base_url).rsplit(":", 1)[1])
    assert {"heartbeat_interval", "drain_timeout", "auto_restart", "capabilities", "foreman_token"} <= set(config)


def test_browsers_get_the_page_and_its_files_without_any_cdn(worker) -> None:
    _, api = worker
    page = api.get("/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    status = api.get("/").json()
    assert status["worker_id"] in page.text
    links = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert "static/worker.js" in links and "static/style.css" in links
    assert not [link for link in links if "//" in link]  # relative only: no CDN, works under a path prefix
    for link in links:
        if link.startswith("static/"):
            assert api.get(f"/{link}").status_code == 200, link


def test_stats_shape_and_counters(foreman: Foreman, worker) -> None:
    _, api = worker
    assert foreman.map(square, range(200)) == [x * x for x in range(200)]
    with pytest.raises(Exception, match="bad input 3"):
        foreman.map(boom, range(6), chunksize=2)
    wait_until(lambda: api.get("/stats").json()["stats"]["tasks_failed"] == 1)
    body = api.get("/stats").json()
    assert set(body) == {"stats", "system", "gpus"}
    stats = body["stats"]
    assert set(stats) == {"tasks_completed", "tasks_failed", "total_execution_time", "avg_task_time",
                          "tasks_per_minute", "uptime", "reconnects"}
    assert stats["tasks_completed"] >= 200 and stats["reconnects"] == 0 and stats["uptime"] > 0
    assert stats["total_execution_time"] > 0 and stats["avg_task_time"] > 0
    system = body["system"]
    assert set(system) == {"cpu", "memory", "load", "network", "process"}
    assert len(system["cpu"]["per_core"]) == system["cpu"]["count"] and 0 <= system["cpu"]["percent"] <= 100
    assert system["memory"]["total"] > system["memory"]["used"] > 0
    assert system["process"]["rss"] > 0 and system["process"]["tasks_rss"] > 0  # worker, and its 2 task processes
    assert {"bytes_sent", "bytes_recv", "send_rate", "recv_rate"} <= set(system["network"])
    for gpu in body["gpus"]:  # an empty list on a machine without an NVIDIA GPU
        assert {"index", "name", "utilization", "memory_used", "memory_total", "temperature", "power"} <= set(gpu)


def test_history_lists_recent_batches_with_their_errors(foreman: Foreman, worker) -> None:
    _, api = worker
    with pytest.raises(Exception, match="bad input 3"):
        foreman.map(boom, range(6), chunksize=2)
    wait_until(lambda: len(api.get("/history").json()["batches"]) == 3)
    history = api.get("/history").json()
    assert history["interval"] == 1.0 and history["samples"]
    assert set(history["samples"][0]) == {"time", "cpu", "memory", "gpus", "tasks_completed"}
    batches = {b["start"]: b for b in history["batches"]}
    assert set(batches) == {0, 2, 4}
    failed = batches[2]
    assert (failed["status"], failed["count"], failed["failed"]) == ("ok", 2, 1)
    assert failed["error"].endswith("CustomError: bad input 3")
    assert failed["finished"] >= failed["started"] and failed["duration"] >= 0
    assert batches[0]["error"] == "" and batches[0]["failed"] == 0


def test_metrics_match_stats_in_prometheus_text_format(foreman: Foreman, worker) -> None:
    _, api = worker
    foreman.map(square, range(50))
    wait_until(lambda: api.get("/stats").json()["stats"]["tasks_completed"] == 50)
    response = api.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    completed = families["crowdcompute_worker_tasks_completed"]
    assert completed.type == "counter" and completed.samples[0].value == 50
    status = {s.labels["status"]: s.value for s in families["crowdcompute_worker_status"].samples}
    assert status["idle"] == 1 and sum(status.values()) == 1
    assert families["crowdcompute_worker_connected"].samples[0].value == 1
    assert families["crowdcompute_worker_info"].samples[0].labels["worker_id"] == foreman.workers[0]
    for name in ("crowdcompute_worker_tasks_failed", "crowdcompute_worker_reconnects",
                 "crowdcompute_worker_uptime_seconds", "crowdcompute_system_cpu_percent",
                 "crowdcompute_system_cpu_core_percent", "crowdcompute_system_memory_used_bytes",
                 "crowdcompute_system_load_average", "crowdcompute_worker_resident_bytes"):
        assert name in families, name


def test_live_socket_pushes_a_snapshot_about_every_second(worker) -> None:
    _, api = worker
    url = str(api.base_url).replace("http://", "ws://") + "/ws"
    with ws_connect(url, open_timeout=10) as ws:
        started = time.monotonic()
        first, second, third = (json.loads(ws.recv(timeout=5)) for _ in range(3))
        elapsed = time.monotonic() - started
    assert {"status", "stats", "system", "gpus", "sample", "batches"} <= set(first)
    assert first["status"]["connected"] is True
    assert third["sample"]["time"] > first["sample"]["time"]  # new samples, not the same one resent
    assert 1.0 <= elapsed <= 5.0


def test_health_turns_503_with_a_reason_when_the_foreman_goes_away() -> None:
    fm = Foreman(port=0, dashboard=False, **FAST)
    process, api = dashboard_worker(fm.address)
    try:
        fm.wait_for_workers(1)
        wait_until(lambda: api.get("/health").status_code == 200)
        assert api.get("/health").json()["ok"] is True
        fm.close()
        wait_until(lambda: api.get("/health").status_code == 503, timeout=10)
        health = api.get("/health").json()
        assert health["ok"] is False and health["connected"] is False
        assert health["status"] == "connecting"
        assert health["reason"].startswith(f"not connected to the foreman at {split_token(fm.address)[0]}")
    finally:
        api.close()
        stop_process(process)


def test_get_never_changes_state(foreman: Foreman, worker) -> None:
    process, api = worker
    before = api.get("/").json()
    assert api.get("/restart").status_code == 405
    assert api.get("/restart", params={"hard": "true"}).status_code == 405
    for path in ("/", "/stats", "/history", "/health", "/metrics", "/static/style.css"):
        assert api.get(path).status_code == 200, path
    assert api.get("/login").status_code == 303  # no token: nothing to log in to
    time.sleep(0.5)
    after = api.get("/").json()
    assert api.get("/stats").json()["stats"]["reconnects"] == 0
    assert (after["connected_since"], after["started"], after["pid"]) == (
        before["connected_since"], before["started"], process.pid)


# -- restart ------------------------------------------------------------------------------------------------------


def test_soft_restart_loses_no_task_of_a_running_job(foreman: Foreman, worker) -> None:
    _, api = worker
    inputs = [0.2] * 24
    job = foreman.imap(sleep_then, inputs, chunksize=1)
    results: list[float] = []
    consumer = threading.Thread(target=lambda: results.extend(job))
    consumer.start()
    wait_until(lambda: len(api.get("/").json()["current_tasks"]) == 2)
    response = api.post("/restart")
    assert response.status_code == 202
    assert response.json() == {"worker_id": foreman.workers[0], "restarting": True, "hard": False}
    consumer.join(timeout=60)
    assert not consumer.is_alive()
    assert results == inputs  # every task's result, exactly once, in order
    stats = api.get("/stats").json()["stats"]
    assert stats["reconnects"] == 1
    returned = [b for b in api.get("/history").json()["batches"] if b["status"] == "returned"]
    assert len(returned) == 2  # both running batches were killed, went back to the foreman and ran again


def test_hard_restart_reexecutes_the_process_under_the_same_worker_id(foreman: Foreman, worker) -> None:
    process, api = worker
    before = api.get("/").json()
    worker_id = before["worker_id"]
    assert re.fullmatch(r".+-[0-9a-f]{6}", worker_id)  # a random id, not pinned on the command line
    response = api.post("/restart", params={"hard": "true"})
    assert response.status_code == 202 and response.json()["hard"] is True

    def restarted() -> bool:
        try:
            status = api.get("/").json()
        except httpx.TransportError:
            return False
        return status["started"] > before["started"] and status["connected"]

    wait_until(restarted, timeout=30)
    after = api.get("/").json()
    assert after["worker_id"] == worker_id and after["pid"] == process.pid  # os.execv: same process, new image
    assert process.poll() is None
    assert foreman.workers == [worker_id]
    assert foreman.map(square, range(20)) == [x * x for x in range(20)]


# -- access ---------------------------------------------------------------------------------------------------


def test_token_guards_restart_and_the_live_socket(foreman: Foreman) -> None:
    process, api = dashboard_worker(foreman.address, env=worker_env(CROWDCOMPUTE_DASHBOARD_TOKEN=TOKEN))
    ws_url = str(api.base_url).replace("http://", "ws://") + "/ws"
    try:
        foreman.wait_for_workers(1)
        assert api.get("/").status_code == 200  # read-only JSON stays open on localhost
        assert api.get("/stats").status_code == 200 and api.get("/metrics").status_code == 200
        assert api.get("/").json()["config"]["dashboard"]["token_required"] is True
        assert TOKEN not in api.get("/").text

        missing = api.post("/restart")
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert api.post("/restart", headers={"Authorization": "Bearer wrong"}).status_code == 403
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        cross_site = api.post("/restart", headers={**bearer, "Origin": "http://evil.example"})
        assert cross_site.status_code == 403
        for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(ws_url, additional_headers=headers, open_timeout=10)
            assert refused.value.response.status_code == status
        with ws_connect(ws_url, additional_headers=bearer, open_timeout=10) as ws:
            assert json.loads(ws.recv(timeout=5))["status"]["connected"] is True

        page = api.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 303 and page.headers["location"] == "login"
        assert api.post("/login", data={"token": "wrong"}).status_code == 403
        login = api.post("/login", data={"token": TOKEN})
        assert login.status_code == 303 and login.headers["location"] == "./"
        cookie = login.headers["set-cookie"]
        assert TOKEN not in cookie and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
        # The client now holds the cookie: the page and restart work with it alone.
        assert api.get("/", headers={"Accept": "text/html"}).status_code == 200
        assert api.post("/restart").status_code == 202
        wait_until(lambda: api.get("/stats").json()["stats"]["reconnects"] == 1)
    finally:
        api.close()
        stop_process(process)


def test_requests_from_another_site_cannot_restart_an_open_dashboard(worker) -> None:
    _, api = worker
    assert api.post("/restart", headers={"Origin": "http://evil.example"}).status_code == 403
    host = str(api.base_url).split("//", 1)[1]
    assert api.post("/restart", headers={"Origin": f"http://{host}"}).status_code == 202


def test_beyond_loopback_even_read_only_json_needs_the_token() -> None:
    from starlette.requests import Request

    from worker.access import Access

    def request(headers: dict[str, str]) -> Request:
        raw = [(k.lower().encode(), v.encode()) for k, v in headers.items()]
        return Request({"type": "http", "method": "GET", "path": "/stats", "headers": raw})

    remote = Access(TOKEN, loopback=False, port=8001)
    assert remote.refusal(request({}), control=False).status_code == 401
    assert remote.refusal(request({"Authorization": "Bearer nope"}), control=False).status_code == 403
    assert remote.refusal(request({"Authorization": f"Bearer {TOKEN}"}), control=False) is None
    assert remote.refusal(request({"Cookie": f"{remote.cookie}={remote.session}"}), control=False) is None
    local = Access(TOKEN, loopback=True, port=8001)
    assert local.refusal(request({}), control=False) is None
    assert local.refusal(request({}), control=True).status_code == 401


def test_binding_beyond_loopback_needs_a_token_or_insecure() -> None:
    refused = subprocess.run([sys.executable, "-m", "worker", "ws://127.0.0.1:9", "--dashboard-host", "0.0.0.0"],
                             capture_output=True, text=True, timeout=30, env=worker_env())
    assert refused.returncode == 2
    assert "--dashboard-token" in refused.stderr and "--insecure" in refused.stderr


# -- ports ----------------------------------------------------------------------------------------------------


def test_a_taken_port_moves_the_dashboard_to_the_next_free_one_and_says_where() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = start_worker(f"ws://127.0.0.1:{free_port()}", "--dashboard-port", str(port), "--concurrency", "1",
                               capture=True)
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
        try:
            deadline = time.monotonic() + 30
            match = None
            while match is None and time.monotonic() < deadline:
                try:
                    line = lines.get(timeout=1)
                except queue.Empty:
                    continue
                match = re.search(rf"dashboard port {port} is taken: the dashboard is at "
                                  r"http://127\.0\.0\.1:(\d+)/", line)
            assert match, "no line saying where the dashboard went"
            moved = int(match.group(1))
            assert moved != port
            health = httpx.get(f"http://127.0.0.1:{moved}/health", timeout=10)
            assert health.status_code == 503 and health.json()["status"] == "connecting"  # no foreman there
        finally:
            stop_process(process)


# -- GPUs -----------------------------------------------------------------------------------------------------


class _NotSupported(Exception):
    pass


def _fake_nvml(init_fails: bool = False) -> types.ModuleType:
    """A stand-in for pynvml with one GPU whose board does not report power."""
    nvml = types.ModuleType("pynvml")
    nvml.NVML_TEMPERATURE_GPU = 0

    def init() -> None:
        if init_fails:
            raise _NotSupported("NVML Shared Library Not Found")

    def no_power(handle: object) -> int:
        raise _NotSupported("Not Supported")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda index: ("handle", index)
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA Test GPU"
    nvml.nvmlDeviceGetUtilizationRates = lambda handle: types.SimpleNamespace(gpu=37, memory=12)
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=2 << 30, total=16 << 30, free=14 << 30)
    nvml.nvmlDeviceGetTemperature = lambda handle, sensor: 61
    nvml.nvmlDeviceGetPowerUsage = no_power
    nvml.nvmlDeviceGetEnforcedPowerLimit = no_power
    return nvml


def test_gpu_figures_come_from_nvml_and_unreported_ones_are_null(monkeypatch) -> None:
    from worker.sysinfo import GpuMonitor, gpus

    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml())
    monitor = GpuMonitor()
    assert monitor.sample() == [{"index": 0, "name": "NVIDIA Test GPU", "utilization": 37, "memory_utilization": 12,
                                 "memory_used": 2 << 30, "memory_total": 16 << 30, "temperature": 61,
                                 "power": None, "power_limit": None}]
    monitor.close()
    assert gpus() == [{"index": 0, "name": "NVIDIA Test GPU", "memory_total": 16 << 30}]


@pytest.mark.parametrize("nvml", [None, "no driver"], ids=["no pynvml", "no driver"])
def test_no_gpu_is_an_empty_list_never_an_error(monkeypatch, nvml) -> None:
    from worker.stats import Sampler
    from worker.sysinfo import GpuMonitor

    monkeypatch.setitem(sys.modules, "pynvml", None if nvml is None else _fake_nvml(init_fails=True))
    assert GpuMonitor().sample() == []
    sampler = Sampler(lambda: 0, interval=0.05)
    sampler.start()
    try:
        wait_until(lambda: len(sampler.samples()) >= 3, timeout=5)
        assert sampler.gpus == [] and sampler.samples()[-1].gpus == ()
    finally:
        sampler.close()


def test_drain_over_http_hands_work_back_and_leaves(spawn_worker) -> None:
    """POST /drain: no new tasks, running ones finish, the worker leaves; the job still completes exactly."""
    from foreman import Foreman
    from tasks import slow_whoami

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with Foreman(port=0, local_workers=1, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        leaving = spawn_worker(fm.address, "--concurrency", "1", "--worker-id", "leaving",
                               "--dashboard-port", str(port))
        fm.wait_for_workers(2)
        job = fm.imap(slow_whoami, range(600))
        results = [next(job) for _ in range(100)]
        assert httpx.post(f"http://127.0.0.1:{port}/drain", timeout=10).status_code == 202
        results.extend(job)
        assert [x for x, _ in results] == list(range(600))
        assert leaving.wait(timeout=30) == 0
        assert fm._server.scheduler.workers_lost == 0
