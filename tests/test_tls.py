"""TLS: ``wss://`` between foreman and workers, verified against a CA or by a pinned certificate fingerprint.

A worker that cannot verify its foreman exits with status 2 without sending anything: a recording server with a
certificate the worker does not trust shows that no HELLO, and so no token, ever reaches it.
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import trustme
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request

from conftest import start_worker, stop_process, worker_env
from foreman import Foreman
from foreman.protocol import CloseCode
from foreman.tls import certificate_fingerprint, parse_fingerprint, server_context
from tasks import square
from worker.config import WorkerConfig

TOKEN = "tls-s3cret"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A CA and a server certificate for 127.0.0.1 and localhost, and a CA that signed nothing here."""
    folder = tmp_path_factory.mktemp("pki")
    ca, stranger = trustme.CA(), trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    paths = SimpleNamespace(ca=folder / "ca.pem", other_ca=folder / "other-ca.pem", cert=folder / "cert.pem",
                            key=folder / "key.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    stranger.cert_pem.write_to_path(str(paths.other_ca))
    server.private_key_pem.write_to_path(str(paths.key))
    paths.cert.write_bytes(b"".join(pem.bytes() for pem in server.cert_chain_pems))
    paths.fingerprint = certificate_fingerprint(paths.cert)
    return paths


@pytest.fixture(scope="module")
def secure(pki: SimpleNamespace) -> Iterator[Foreman]:
    with Foreman(port=0, token=TOKEN, certfile=str(pki.cert), keyfile=str(pki.key), heartbeat_interval=0.2,
                 heartbeat_timeout=3) as fm:
        yield fm


class RecordingServer:
    """A wss:// server with the test certificate that records every request and message it gets, and refuses
    whoever gets as far as a message (close 4001), so a worker that does send its HELLO exits too."""

    def __init__(self, pki: SimpleNamespace) -> None:
        self.context = server_context(str(pki.cert), str(pki.key))
        self.requests: list[str] = []
        self.messages: list[bytes] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RecordingServer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        self.address = f"wss://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.close()
        asyncio.run_coroutine_threadsafe(self._server.wait_closed(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    async def _start(self) -> Server:
        return await serve(self._handle, "127.0.0.1", 0, ssl=self.context, process_request=self._request)

    def _request(self, connection: ServerConnection, request: Request) -> None:
        self.requests.append(f"{request.path} {dict(request.headers.raw_items())}")

    async def _handle(self, ws: ServerConnection) -> None:
        async for message in ws:
            self.messages.append(message.encode() if isinstance(message, str) else message)
            await ws.close(CloseCode.AUTH_FAILED, "recording server")

    def saw(self, text: str) -> bool:
        return any(text in r for r in self.requests) or any(text.encode() in m for m in self.messages)


def run_worker(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", address, "--no-dashboard", "--token", TOKEN, *args],
                          env=worker_env(), capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("verify", ["cafile", "fingerprint"])
def test_a_worker_that_verifies_its_foreman_runs_a_map_over_wss(secure: Foreman, pki: SimpleNamespace,
                                                               verify: str, spawn_worker) -> None:
    assert secure.address.startswith("wss://")
    args = ["--cafile", str(pki.ca)] if verify == "cafile" else ["--fingerprint", pki.fingerprint]
    spawn_worker(secure.address, "--token", TOKEN, "--concurrency", "1", "--no-dashboard", "--worker-id",
                 f"tls-{verify}", *args)
    secure.wait_for_workers(1, timeout=30)
    assert secure.map(square, range(50)) == [x * x for x in range(50)]


@pytest.mark.parametrize("args, stderr", [
    (["--cafile", "{other_ca}"], "cannot verify the foreman"),
    ([], "against the system CA store"),
    (["--fingerprint", "sha256:" + "ab" * 32], "not the pinned sha256:" + "ab" * 32),
], ids=["wrong CA", "system CA store", "wrong fingerprint"])
def test_a_worker_that_cannot_verify_its_foreman_exits_2_and_sends_nothing(pki: SimpleNamespace, args: list[str],
                                                                          stderr: str) -> None:
    with RecordingServer(pki) as server:
        result = run_worker(server.address, *[a.format(other_ca=pki.other_ca) for a in args])
    assert result.returncode == 2, result.stderr
    assert stderr in result.stderr and "not sending the token" in result.stderr
    if "--fingerprint" in args:
        assert pki.fingerprint in result.stderr  # the message names the certificate it got, too
    assert server.messages == []
    assert not server.saw(TOKEN)


def test_the_recording_server_does_see_a_worker_that_trusts_it(pki: SimpleNamespace) -> None:
    """The control for the test above: a worker that verifies the server sends its HELLO, token and all."""
    with RecordingServer(pki) as server:
        result = run_worker(server.address, "--fingerprint", pki.fingerprint)
    assert result.returncode == 2 and "recording server" in result.stderr
    assert len(server.messages) == 1 and server.saw(TOKEN)


def test_an_unreachable_tls_foreman_is_retried_not_fatal(pki: SimpleNamespace) -> None:
    with RecordingServer(pki) as server:
        address = server.address  # the port is free again once the server is gone
    worker = start_worker(address, "--token", TOKEN, "--cafile", str(pki.ca), "--no-dashboard", capture=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=2)
    finally:
        stop_process(worker)


def test_a_foreman_with_a_certificate_runs_its_local_workers_over_wss(pki: SimpleNamespace) -> None:
    with Foreman(port=0, certfile=str(pki.cert), keyfile=str(pki.key), local_workers=1, dashboard=False) as fm:
        assert fm.address.startswith("wss://")
        assert fm.map(square, range(20)) == [x * x for x in range(20)]


def test_the_dashboard_answers_over_https_and_the_websocket_port_redirects_there(secure: Foreman,
                                                                                 pki: SimpleNamespace) -> None:
    assert secure.dashboard_url is not None and secure.dashboard_url.startswith("https://")
    verify = ssl.create_default_context(cafile=str(pki.ca))
    response = httpx.get(f"{secure.dashboard_url}api/workers", verify=verify, timeout=10)
    assert response.status_code == 200 and isinstance(response.json(), list)
    redirect = httpx.get(secure.address.replace("wss://", "https://") + "/", verify=verify, timeout=10)
    assert redirect.status_code == 302 and redirect.headers["location"] == secure.dashboard_url
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{secure.dashboard_url}api/workers", verify=ssl.create_default_context(), timeout=10)


def test_print_fingerprint_matches_the_served_certificate(pki: SimpleNamespace) -> None:
    result = subprocess.run([sys.executable, "-m", "foreman", "--print-fingerprint", str(pki.cert)],
                            env=worker_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == pki.fingerprint
    openssl_style = ":".join(pki.fingerprint[7:][i:i + 2] for i in range(0, 64, 2)).upper()
    assert parse_fingerprint(f"SHA256 Fingerprint={openssl_style}") == pki.fingerprint


def test_a_bad_certificate_is_a_clear_error(tmp_path: Path, pki: SimpleNamespace) -> None:
    with pytest.raises(ValueError, match="cannot load the TLS certificate"):
        Foreman(port=0, certfile=str(tmp_path / "missing.pem"), dashboard=False)
    result = subprocess.run([sys.executable, "-m", "foreman", "--port", "0", "--certfile", str(pki.ca)],
                            env=worker_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "cannot load the TLS certificate" in result.stderr


@pytest.mark.parametrize("url, token, warned", [
    ("ws://10.1.2.3:9000", "t", True), ("ws://127.0.0.1:9000", "t", False), ("ws://[::1]:9000", "t", False),
    ("wss://10.1.2.3:9000", "t", False), ("ws://10.1.2.3:9000", None, False),
])
def test_a_token_in_clear_text_is_flagged(url: str, token: str | None, warned: bool) -> None:
    assert WorkerConfig(foreman_url=url, token=token).token_in_clear is warned


def test_verification_flags_need_a_wss_address() -> None:
    with pytest.raises(ValueError, match="wss://"):
        WorkerConfig(foreman_url="ws://127.0.0.1:9000", cafile="ca.pem")
    with pytest.raises(ValueError, match="64 hex digits"):
        WorkerConfig(foreman_url="wss://127.0.0.1:9000", fingerprint="sha256:abc")


@pytest.mark.parametrize("verify", ["cafile", "fingerprint"])
def test_a_client_that_verifies_its_foreman_runs_a_map_over_wss(pki: SimpleNamespace, verify: str) -> None:
    """A remote client checks a wss:// foreman by CA or by pinned fingerprint, then works as usual."""
    with Foreman(port=0, token=TOKEN, certfile=str(pki.cert), keyfile=str(pki.key), local_workers=1,
                 dashboard=False) as fm:
        option = {"cafile": str(pki.ca)} if verify == "cafile" else {"fingerprint": pki.fingerprint}
        with Foreman.connect(fm.address, token=TOKEN, **option) as client:
            assert client.map(square, range(20)) == [x * x for x in range(20)]


def test_a_client_refuses_a_foreman_it_cannot_verify_before_sending_its_token(pki: SimpleNamespace) -> None:
    """A wrong CA or a wrong pin stops the client before its token leaves: the server never sees it."""
    from foreman.errors import AuthenticationError

    with RecordingServer(pki) as recorder:
        wrong_pin = "sha256:" + "0" * 64
        with pytest.raises(AuthenticationError, match="fingerprint"):
            Foreman.connect(recorder.address, token=TOKEN, fingerprint=wrong_pin)
        with pytest.raises(ConnectionError, match="cannot reach the foreman"):
            Foreman.connect(recorder.address, token=TOKEN, cafile=str(pki.other_ca))
        assert not recorder.saw(TOKEN)
