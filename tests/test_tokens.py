"""Per-worker and client tokens from a token file, revocation, and the brake on guessing."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from conftest import start_worker, stop_process, wait_until
from foreman import Foreman, protocol
from foreman.auth import Authenticator, RefusalLimiter, load_token_file
from foreman.protocol import CloseCode, Kind
from tasks import slow_whoami, square

TOKENS = """
[workers]
alice = "worker-alice-0001"
bob = "worker-bob-0002"

[clients]
carol = "client-carol-0003"
"""


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS)
    return path


def test_token_file_parsing(token_file, tmp_path) -> None:
    principals = load_token_file(token_file)
    assert [(p.name, p.role) for p in principals] == [("alice", "worker"), ("bob", "worker"), ("carol", "client")]
    auth = Authenticator("admin-secret", token_file)
    assert auth.identify("worker-bob-0002").name == "bob"
    assert auth.identify("admin-secret").role == "admin"
    assert auth.identify("nope") is None and auth.identify(None) is None
    bad = tmp_path / "bad.toml"
    for text, message in (("[workers]\nx = 1", "string of at least 8"), ("[admins]\nx = 'aaaaaaaaaa'", "unknown"),
                          ("not toml [", "cannot read")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=message):
            load_token_file(bad)


def test_refusal_limiter_blocks_one_address_only() -> None:
    limiter = RefusalLimiter(limit=3, window=10)
    for _ in range(3):
        limiter.refused("10.0.0.1", now=100)
    assert limiter.blocked("10.0.0.1", now=101) and not limiter.blocked("10.0.0.2", now=101)
    assert not limiter.blocked("10.0.0.1", now=111)  # the window passed


def _hello(token: str | None, worker_id: str = "probe") -> bytes:
    return protocol.encode(Kind.HELLO, {"protocol": protocol.PROTOCOL_VERSION, "worker_id": worker_id,
                                        "token": token, "python": "3.11.7", "cloudpickle": "3.1.0",
                                        "concurrency": 1, "capabilities": []})


async def _first_close(address: str, hello: bytes) -> tuple[int | None, str | None]:
    async with connect(address) as ws:
        try:
            await ws.send(hello)
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except ConnectionClosed:
            return ws.close_code, ws.close_reason


def test_worker_and_client_tokens_have_their_own_rights(token_file) -> None:
    with Foreman(port=0, token="admin-secret-1", token_file=str(token_file), heartbeat_interval=0.2,
                 heartbeat_timeout=1.5) as fm:
        assert asyncio.run(_first_close(fm.address, _hello("client-carol-0003"))) == (
            CloseCode.AUTH_FAILED, "a client token cannot join as a worker")
        worker = start_worker(fm.address, "--concurrency", "1", env=_env(CROWDCOMPUTE_TOKEN="worker-alice-0001"))
        try:
            fm.wait_for_workers(1)
            assert fm.map(square, range(10)) == [x * x for x in range(10)]
            worker_id = fm.workers[0]
            with httpx.Client(base_url=fm.dashboard_url, timeout=10) as api:
                as_worker = {"Authorization": "Bearer worker-alice-0001"}
                assert api.post(f"/api/workers/{worker_id}/restart", headers=as_worker).status_code == 403
                as_client = {"Authorization": "Bearer client-carol-0003"}  # a client uses the fleet, not runs it
                assert api.post(f"/api/workers/{worker_id}/restart", headers=as_client).status_code == 403
                as_admin = {"Authorization": "Bearer admin-secret-1"}
                assert api.post(f"/api/workers/{worker_id}/restart", headers=as_admin).status_code == 200
        finally:
            stop_process(worker)


def test_revoking_a_token_disconnects_that_worker_only(token_file) -> None:
    with Foreman(port=0, token_file=str(token_file), heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        alice = start_worker(fm.address, "--concurrency", "1", "--worker-id", "alice-box", capture=True,
                             env=_env(CROWDCOMPUTE_TOKEN="worker-alice-0001"))
        bob = start_worker(fm.address, "--concurrency", "1", "--worker-id", "bob-box",
                           env=_env(CROWDCOMPUTE_TOKEN="worker-bob-0002"))
        try:
            fm.wait_for_workers(2)
            job = fm.imap(slow_whoami, range(400))
            results = [next(job) for _ in range(50)]
            time.sleep(0.05)
            token_file.write_text(TOKENS.replace('alice = "worker-alice-0001"\n', ""))
            os.utime(token_file, (time.time() + 5, time.time() + 5))  # a new mtime even within one second
            results.extend(job)
            assert [x for x, _ in results] == list(range(400))  # alice's tasks went to bob: nothing lost
            wait_until(lambda: fm.workers == ["bob-box"])
            assert alice.wait(timeout=20) == 2  # a revoked token is final for that worker
            assert "token revoked" in alice.stderr.read()
        finally:
            stop_process(alice)
            stop_process(bob)


def test_guessing_is_rate_limited_per_address_and_others_keep_working() -> None:
    with Foreman(port=0, token="right-token-1", heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        codes = [asyncio.run(_first_close(fm.address, _hello("guess")))[0] for _ in range(12)]
        assert codes[:8] == [CloseCode.AUTH_FAILED] * 8 and codes[-1] == CloseCode.TRY_LATER
        code, reason = asyncio.run(_first_close(fm.address, b""))
        assert code == CloseCode.TRY_LATER and "too many" in reason  # the address is turned away at once
        fm._server.refusals = RefusalLimiter()  # the same as the window passing
        worker = start_worker(fm.address, "--concurrency", "1", env=_env(CROWDCOMPUTE_TOKEN="right-token-1"))
        try:
            fm.wait_for_workers(1)
            assert fm.map(square, range(5)) == [0, 1, 4, 9, 16]
        finally:
            stop_process(worker)


def test_a_job_finishes_while_200_bogus_connections_hammer_the_foreman() -> None:
    with Foreman(port=0, token="t0ken-ok", local_workers=2, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        fm.wait_for_workers(2)
        fm._server.refusals = RefusalLimiter(limit=10**6)  # measure the load itself, not the brake

        async def bogus(i: int) -> None:
            try:
                async with connect(fm.address, open_timeout=20) as ws:
                    kind = i % 4
                    if kind == 0:
                        await ws.send(b"\xff" * 64)  # garbage
                    elif kind == 1:
                        await ws.send(_hello("wrong", f"bogus-{i}"))  # bad token
                    elif kind == 2:
                        await ws.send(protocol.encode(Kind.RESULTS, {"job": 1, "start": 0, "count": 1,
                                                                     "status": "ok", "elapsed": 0}))
                    else:
                        await asyncio.sleep(1)  # silent
                    await asyncio.wait_for(ws.recv(), 15)
            except (ConnectionClosed, OSError, TimeoutError, InvalidHandshake):  # InvalidHandshake: over the caps
                pass

        async def hammer() -> None:
            await asyncio.gather(*(bogus(i) for i in range(200)))

        import threading

        attack = threading.Thread(target=asyncio.run, args=(hammer(),))
        attack.start()
        results = fm.map(slow_whoami, range(300))
        attack.join(timeout=60)
        assert [x for x, _ in results] == list(range(300))
        assert len(fm.workers) == 2 and fm._server.scheduler.workers_lost == 0


def _env(**extra: str) -> dict[str, str]:
    from conftest import worker_env

    return worker_env(**extra)
