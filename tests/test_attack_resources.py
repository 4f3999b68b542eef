"""Attacks on the foreman's resources and on principals' integrity (issue 17), run on loopback against a real
foreman; each shows the attack fails. The decisions behind them (admission, worker-id ownership, revocation,
quotas, journal pruning) are also tested as plain code, without sockets."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import time

import pytest
from conftest import wait_until
from tasks import square
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from foreman import Foreman, protocol, quota
from foreman.addresses import split_token
from foreman.admission import Admission, revoked_connections, worker_id_refusal
from foreman.auth import ADMIN, CLIENT, WORKER, Principal
from foreman.journal import Journal
from foreman.protocol import CloseCode, Kind
from foreman.quota import ClientQuota
from foreman.serialization import dumps_framed, dumps_function

TOKENS = """
[workers]
alice = "worker-alice-0001"
bob = "worker-bob-0002"

[clients]
carol = "client-carol-0003"
dave = "client-dave-0004"
"""


@pytest.fixture
def token_file(tmp_path):
    path = tmp_path / "tokens.toml"
    path.write_text(TOKENS)
    return path


def _hello(token: str | None, worker_id: str = "probe", **changes) -> bytes:
    header = {"protocol": protocol.PROTOCOL_VERSION, "worker_id": worker_id, "token": token, "python": "3.11.7",
              "cloudpickle": "3.1.0", "concurrency": 1, "capabilities": []}
    header.update(changes)
    return protocol.encode(Kind.HELLO, header)


def _connect_msg(token: str, client: str = "attacker") -> bytes:
    return protocol.encode(Kind.CONNECT, {"protocol": protocol.PROTOCOL_VERSION, "client": client, "token": token,
                                          "python": "3.11.7", "cloudpickle": "3.1.0"})


async def _until_closed(ws, timeout: float = 10.0) -> tuple[int | None, str | None]:
    """Read (and drop) messages until the foreman closes ``ws``; its close code and reason."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
    except ConnectionClosed:
        return ws.close_code, ws.close_reason
    except TimeoutError:
        pass
    return None, None  # still open


async def _expect(ws, kind: Kind) -> protocol.Message:
    while True:
        msg = protocol.decode(await asyncio.wait_for(ws.recv(), 10))
        if msg.kind is kind:
            return msg


# -- pure decisions ----------------------------------------------------------------------------------------------


def test_admission_caps_pending_connections_in_all_and_per_address() -> None:
    admission = Admission(max_connections=5, max_pending=3, max_pending_per_host=2)
    assert admission.open("a1", "10.0.0.1") is None and admission.open("a2", "10.0.0.1") is None
    assert "from 10.0.0.1" in admission.open("a3", "10.0.0.1")  # one address cannot take every slot
    assert admission.open("b1", "10.0.0.2") is None
    assert "waiting to authenticate" in admission.open("c1", "10.0.0.3")  # all pending slots taken
    admission.authenticated("a1")  # a handshake done frees its pending slot
    assert admission.open("c1", "10.0.0.3") is None
    admission.authenticated("c1")
    assert admission.open("c2", "10.0.0.3") is None
    assert "maximum of 5" in admission.open("d1", "10.0.0.4")
    for key in ("a1", "a2", "b1", "c1", "c2", "never-opened"):
        admission.closed(key)
    assert (admission.connections, admission.pending, admission.refused) == (0, 0, 3)
    assert admission.open("a3", "10.0.0.1") is None


def test_a_worker_id_belongs_to_the_principal_that_registered_it_first() -> None:
    alice, bob = Principal("alice", WORKER, "t-a"), Principal("bob", WORKER, "t-b")
    admin = Principal("admin", ADMIN, "t-admin")
    assert worker_id_refusal("box", None, bob) is None  # a new id: anyone's
    assert worker_id_refusal("box", "alice", alice) is None  # its owner reconnecting
    assert "belongs to another token" in worker_id_refusal("box", "alice", bob)
    assert worker_id_refusal("box", "alice", admin) is None  # the operator may
    assert worker_id_refusal("box", "anonymous", bob) is None  # registered before the foreman had tokens
    for bad in ("", "x" * 201, "tab\there"):
        assert "printable" in worker_id_refusal(bad, None, alice)


def test_revocation_selects_the_connections_of_revoked_tokens_only() -> None:
    carol, carol_again = Principal("carol", CLIENT, "c-1"), Principal("carol", CLIENT, "c-1")
    dave = Principal("dave", CLIENT, "c-2")
    connections = [("conn1", carol), ("conn2", dave), ("conn3", carol_again)]
    assert revoked_connections(connections, [carol]) == ["conn1", "conn3"]
    assert revoked_connections(connections, []) == []


def test_client_quota_counts_jobs_and_unanswered_input_per_principal() -> None:
    q = ClientQuota(max_running_jobs=2, max_queued_input=100)
    q.job_started(1, "carol")
    q.job_started(2, "carol")
    assert "already runs 2" in q.submit_refusal("carol") and q.submit_refusal("dave") is None
    q.input_added(1, 0, 10, 60)
    q.input_added(1, 10, 5, 30)
    q.input_added(1, 10, 5, 30)  # a resent batch counts once
    assert q.queued("carol") == 90 and "input quota exceeded" in q.input_refusal("carol", 20)
    q.answered(1, 0, 4)  # part of a batch (split after losses): still queued
    assert q.queued("carol") == 90
    q.answered(1, 4, 6)
    assert q.queued("carol") == 30 and q.input_refusal("carol", 20) is None
    q.answered(1, 8, 7)  # spans the end of one batch and the next
    assert q.queued("carol") == 0
    q.input_added(2, 0, 1, 50)
    q.job_over(2)  # its input no longer counts, nor the job
    assert (q.queued("carol"), q.running("carol"), q.submit_refusal("carol")) == (0, 1, None)


def test_the_journal_forgets_departed_workers_beyond_its_bounds() -> None:
    journal = Journal()
    for i in range(30):
        journal.worker_joined(f"w{i}", "alice", "127.0.0.1:1")
        if i != 7:
            journal.worker_left(f"w{i}", "left")
    journal.db.execute("UPDATE workers SET last_seen = 1000 + CAST(substr(id, 2) AS REAL)")
    assert journal.prune_workers(now=2000, keep=10, retention=10**6) == 19  # 29 departed, the 10 newest kept
    kept = {row["id"] for row in journal.worker_history()}
    assert kept == {f"w{i}" for i in range(20, 30)} | {"w7"}  # a connected worker is never forgotten
    assert journal.worker_owner("w25") == "alice" and journal.worker_owner("w3") is None
    assert journal.prune_workers(now=1025 + 86400, keep=10, retention=86400) == 5  # last seen too long ago
    assert journal.purge(now=10**9) == [] and {row["id"] for row in journal.worker_history()} == {"w7"}


class _Transport:
    """A transport whose write buffer the test sets (what the peer has not taken yet)."""

    def __init__(self) -> None:
        self.buffered = 0

    def get_write_buffer_size(self) -> int:
        return self.buffered


class _Link:
    def __init__(self) -> None:
        self.transport = _Transport()


def test_a_send_side_that_drains_nothing_for_the_timeout_is_stalled() -> None:
    from foreman.outbound import Outbound

    link = _Link()
    out = Outbound(link)  # type: ignore[arg-type]
    assert not out.stalled(100.0, 5.0)  # nothing waits
    link.transport.buffered = 1000  # written, not taken by the peer
    assert not out.stalled(101.0, 5.0) and not out.stalled(105.0, 5.0)
    assert out.stalled(106.5, 5.0)  # 5.5 s without a byte taken
    link.transport.buffered = 400  # the peer read 600 bytes: progress
    assert not out.stalled(107.0, 5.0) and not out.stalled(111.0, 5.0)
    assert out.stalled(112.5, 5.0)
    link.transport.buffered = 0
    assert not out.stalled(200.0, 5.0)  # all taken


# -- resources before authentication -----------------------------------------------------------------------------


def _raw_websocket(address: str) -> socket.socket:
    """A WebSocket opened by hand (HTTP upgrade), for frames no client library would send."""
    host, port = address.removeprefix("ws://").rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, "closed during the upgrade"
        response += chunk
    assert response.startswith(b"HTTP/1.1 101"), response
    return sock


def test_a_large_frame_before_authentication_is_refused_at_its_header(token_file) -> None:
    """40 strangers each announce an 8 MiB first frame: each is refused (close 1009) as soon as the frame's length
    is read, before its payload is sent. Without the pre-authentication limit the foreman waited for (and
    buffered) the whole frame, up to 64 MiB a connection, before looking at it."""
    with Foreman(port=0, token_file=str(token_file), dashboard=False, heartbeat_interval=0.2,
                 heartbeat_timeout=1.5) as fm:
        sockets = [_raw_websocket(fm.address) for _ in range(40)]
        try:
            for sock in sockets:  # a masked binary frame header claiming 8 MiB, and its first bytes
                sock.sendall(b"\x82\xff" + (8 << 20).to_bytes(8, "big") + b"mask" + b"\x01" * 1000)
            codes = []
            for sock in sockets:
                sock.settimeout(5)
                try:
                    head = sock.recv(4)
                except (TimeoutError, ConnectionResetError):
                    head = b""
                codes.append(int.from_bytes(head[2:4], "big") if head[:1] == b"\x88" else None)
            assert codes == [1009] * 40  # close: message too big
        finally:
            for sock in sockets:
                sock.close()
        code, _ = asyncio.run(_first_close_after_welcome(fm.address, _hello("worker-alice-0001", "after")))
        assert code is None  # an honest worker is still welcome


async def _first_close_after_welcome(address: str, hello: bytes) -> tuple[int | None, str | None]:
    async with connect(address) as ws:
        await ws.send(hello)
        msg = protocol.decode(await asyncio.wait_for(ws.recv(), 10))
        assert msg.kind is Kind.WELCOME
        return await _until_closed(ws, timeout=0.5)


def test_unauthenticated_connections_from_one_address_are_capped(token_file) -> None:
    """70 raw TCP connections that never send anything: 64 (the per-address cap) are held until the handshake
    deadline, the others are closed at once; once they are gone a worker is welcome again."""
    from foreman.admission import MAX_PENDING_PER_HOST

    with Foreman(port=0, token_file=str(token_file), dashboard=False) as fm:
        host, port = fm.address.removeprefix("ws://").rsplit(":", 1)
        sockets = []
        try:
            for _ in range(MAX_PENDING_PER_HOST + 6):
                s = socket.create_connection((host, int(port)), timeout=10)
                sockets.append(s)
            time.sleep(1.0)  # well within the 10 s handshake deadline
            readable, _, _ = select.select(sockets, [], [], 0)
            closed_at_once = 0
            for s in readable:
                try:
                    closed_at_once += s.recv(1) == b""
                except ConnectionResetError:
                    closed_at_once += 1
            assert closed_at_once == 6
        finally:
            for s in sockets:
                s.close()
        wait_until(lambda: asyncio.run(_first_close_after_welcome(fm.address, _hello("worker-bob-0002", "b")))
                   == (None, None), timeout=20, interval=0.5)


def test_a_slowloris_http_request_is_closed_within_the_header_timeout(monkeypatch) -> None:
    """A socket that sends an HTTP request's headers a byte at a time is closed once the header timeout has
    passed (1 s here, 10 s by default); without it uvicorn kept it open for as long as the bytes kept coming."""
    from dashboard.serving import GuardedH11Protocol

    monkeypatch.setattr(GuardedH11Protocol, "header_timeout", 1.0)
    with Foreman(port=0, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        host, port = fm.dashboard_url.removeprefix("http://").rstrip("/").rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as s:
            started = time.monotonic()
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed = False
            while time.monotonic() - started < 8:  # bounded: a byte every 0.2 s
                try:
                    s.sendall(b"X")
                    s.settimeout(0.2)
                    if s.recv(1) == b"":
                        closed = True
                        break
                except TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    closed = True
                    break
            elapsed = time.monotonic() - started
        assert closed and elapsed < 4, elapsed
        # an honest request on a new connection is still served
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 ")


# -- quotas and slow readers ---------------------------------------------------------------------------------------


def _submit(ref: int, name: str = "job") -> bytes:
    digest, function = dumps_function(square)
    return protocol.encode(Kind.SUBMIT, {"ref": ref, "name": name, "digest": digest, "call": protocol.CALL_ONE,
                                         "detached": False, "options": {}}, function)


def test_a_client_over_its_job_and_input_quotas_gets_a_clear_refusal(token_file, monkeypatch) -> None:
    """A client token submits jobs and floods input no worker answers: the third job is refused, and the input
    beyond the quota fails its job with a reason; another principal is unaffected."""
    monkeypatch.setattr(quota, "MAX_RUNNING_JOBS", 2)
    monkeypatch.setattr(quota, "MAX_QUEUED_INPUT", 1 << 20)
    with Foreman(port=0, token_file=str(token_file), dashboard=False) as fm:
        async def attack() -> tuple[list[dict], dict, dict]:
            async with connect(fm.address) as ws:
                await ws.send(_connect_msg("client-carol-0003"))
                await _expect(ws, Kind.WELCOME)
                accepted = []
                for ref in range(3):
                    await ws.send(_submit(ref))
                    accepted.append((await _expect(ws, Kind.ACCEPTED)).header)
                job = accepted[0]["job"]
                for start in range(3):  # 3 x 400 KiB of input; the quota is 1 MiB
                    await ws.send(protocol.encode(Kind.INPUT, {"job": job, "start": start, "count": 1},
                                                  dumps_framed([b"x" * (400 << 10)], start).data))
                ended = (await _expect(ws, Kind.JOB_END)).header
            async with connect(fm.address) as other:
                await other.send(_connect_msg("client-dave-0004", "dave"))
                await _expect(other, Kind.WELCOME)
                await other.send(_submit(0))
                return accepted, ended, (await _expect(other, Kind.ACCEPTED)).header

        accepted, ended, other = asyncio.run(attack())
        assert [type(a.get("job")) for a in accepted[:2]] == [int, int]
        assert "already runs 2" in accepted[2]["error"]
        assert ended["job"] == accepted[0]["job"] and ended["state"] == "failed"
        assert "input quota exceeded" in ended["error"]
        assert type(other.get("job")) is int


def test_a_client_that_stops_reading_is_disconnected(token_file, monkeypatch) -> None:
    """A client asks for a large job list over and over and reads nothing: once what waits for it passes the send
    queue limit (8 MiB here, 256 MiB by default) the foreman closes it, long before its heartbeat timeout; without
    the limit each reply (56 KiB for a 40-byte QUERY) stayed queued for as long as the client kept asking."""
    from foreman import outbound

    monkeypatch.setattr(outbound, "SEND_QUEUE_LIMIT", 8 << 20, raising=False)
    with Foreman(port=0, token_file=str(token_file), dashboard=False, heartbeat_interval=0.5,
                 heartbeat_timeout=30.0) as fm:
        host, port = fm.address.removeprefix("ws://").rsplit(":", 1)

        async def attack() -> float | None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            async with connect(fm.address, sock=sock, max_size=None) as ws:
                await ws.send(_connect_msg("client-carol-0003"))
                await _expect(ws, Kind.WELCOME)
                for ref in range(8):  # job names make each REPLY to "jobs" about 8 x 7 KiB
                    await ws.send(_submit(ref, "n" * 7000))
                    await _expect(ws, Kind.ACCEPTED)
                ws.transport.pause_reading()  # stop reading
                started = time.monotonic()
                for ref in range(2000):  # bounded: about 110 MiB of replies if all were queued
                    try:
                        await ws.send(protocol.encode(Kind.QUERY, {"ref": ref, "what": "jobs"}))
                    except ConnectionClosed:
                        return time.monotonic() - started
                    await asyncio.sleep(0.002)
                    if ws.transport.is_closing():
                        return time.monotonic() - started
            return None

        elapsed = asyncio.run(attack())
        assert elapsed is not None and elapsed < 15, elapsed


def test_a_worker_that_stops_reading_is_dropped_and_its_tasks_run_elsewhere(spawn_worker) -> None:
    """A worker keeps sending heartbeats but reads nothing (a 4 KiB receive buffer, reading paused), holding the
    batches it was sent: once it has taken no byte for the heartbeat timeout it is dropped and a real worker runs
    them. Without the check its heartbeats kept it connected and the map never finished."""
    with Foreman(port=0, dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        address, worker_token = split_token(fm.address)  # the worker token a foreman without one made up
        host, port = address.removeprefix("ws://").rsplit(":", 1)
        dropped_after: list[float] = []

        async def stalled_worker() -> None:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect((host, int(port)))
            async with connect(address, sock=sock, max_size=None) as ws:
                await ws.send(_hello(worker_token, "hoarder", concurrency=4))
                await _expect(ws, Kind.WELCOME)
                ws.transport.pause_reading()
                started = time.monotonic()
                while time.monotonic() - started < 20:  # bounded
                    try:
                        await ws.send(protocol.encode(Kind.HEARTBEAT))
                    except ConnectionClosed:
                        break
                    if "hoarder" not in fm.workers:
                        break
                    await asyncio.sleep(0.1)
                dropped_after.append(time.monotonic() - started)

        import threading

        attacker = threading.Thread(target=asyncio.run, args=(stalled_worker(),))
        attacker.start()
        try:
            wait_until(lambda: fm.workers == ["hoarder"], timeout=10)
            results = fm.imap(len, [b"x" * (3 << 20)] * 8, chunksize=1, timeout=90)
            attacker.join(30)
            assert dropped_after and dropped_after[0] < 15, dropped_after
            spawn_worker(fm.address, "--concurrency", "2")
            assert list(results) == [3 << 20] * 8
        finally:
            attacker.join(30)


def test_a_job_with_more_stored_results_than_the_send_queue_limit_is_fetched_whole(tmp_path, monkeypatch,
                                                                                   caplog) -> None:
    """The send queue limit must not cut an honest client off: 12 MiB of a detached job's results reach a client
    whose send queue may hold 2 MiB over one connection, because an attach replays stored results as the client
    takes them (sent all at once, they went over the limit, and the client got them only by reconnecting)."""
    from foreman import outbound

    monkeypatch.setattr(outbound, "SEND_QUEUE_LIMIT", 2 << 20, raising=False)
    with Foreman(port=0, token="admin-token-1", local_workers=2, dashboard=False, data_dir=str(tmp_path),
                 heartbeat_interval=0.2, heartbeat_timeout=5) as fm:
        with Foreman.connect(fm.address, token="admin-token-1") as client:
            job_id = client.submit_job(bytes, [1 << 20] * 12).id
            wait_until(lambda: [j["id"] for j in client.jobs(state="done")] == [job_id], timeout=60, interval=0.2)
        with Foreman.connect(fm.address, token="admin-token-1") as client:
            assert [len(r) for r in client.job(job_id).results(timeout=60)] == [1 << 20] * 12
    assert not [r for r in caplog.records if "connection to the foreman lost" in r.getMessage()]


# -- principals ----------------------------------------------------------------------------------------------------


def test_a_malformed_hello_leaves_no_ghost_and_the_next_hello_works(token_file) -> None:
    with Foreman(port=0, token_file=str(token_file), dashboard=False, heartbeat_interval=0.2,
                 heartbeat_timeout=1.5) as fm:
        for bad in ({"cpu_count": "many"}, {"gpus": [{"memory_total": "big"}]}, {"concurrency": 10**9},
                    {"memory": float("nan"), "cpu_count": float("inf")}):
            async def malformed(bad=bad) -> tuple[int | None, str | None]:
                async with connect(fm.address) as ws:
                    await ws.send(_hello("worker-alice-0001", "box", **bad))
                    return await _until_closed(ws)

            code, reason = asyncio.run(malformed())
            assert code == CloseCode.PROTOCOL_ERROR and "HELLO" in reason, (bad, code, reason)
            assert fm.workers == []  # no ghost in the fleet
        code, _ = asyncio.run(_first_close_after_welcome(fm.address, _hello("worker-alice-0001", "box")))
        assert code is None  # the same id joins (before the fix: the ghost broke this HELLO)


def test_a_revoked_client_token_loses_its_live_connection(token_file) -> None:
    with Foreman(port=0, token_file=str(token_file), dashboard=False, heartbeat_interval=0.2,
                 heartbeat_timeout=5) as fm:
        async def scenario() -> tuple[tuple, tuple]:
            async with connect(fm.address) as carol, connect(fm.address) as dave:
                await carol.send(_connect_msg("client-carol-0003", "carol"))
                await dave.send(_connect_msg("client-dave-0004", "dave"))
                await _expect(carol, Kind.WELCOME)
                await _expect(dave, Kind.WELCOME)
                token_file.write_text(TOKENS.replace('carol = "client-carol-0003"\n', ""))
                os.utime(token_file, (time.time() + 5, time.time() + 5))  # a new mtime even within one second
                return await _until_closed(carol, timeout=10), await _until_closed(dave, timeout=1)

        carol, dave = asyncio.run(scenario())
        assert carol == (CloseCode.AUTH_FAILED, "token revoked")
        assert dave == (None, None)  # another principal keeps its connection


def test_a_worker_token_cannot_take_over_another_principals_worker_id(token_file, tmp_path) -> None:
    """bob's token presents the worker id alice registered: refused with a reason, alice's connection stays; the
    binding is in the journal, so it holds after a restart too."""
    def hello_closes(fm: Foreman, token: str) -> tuple[int | None, str | None]:
        async def run() -> tuple[int | None, str | None]:
            async with connect(fm.address) as ws:
                await ws.send(_hello(token, "alice-box"))
                return await _until_closed(ws, timeout=1)
        return asyncio.run(run())

    options = dict(port=0, token_file=str(token_file), dashboard=False, heartbeat_interval=0.2,
                   heartbeat_timeout=5, data_dir=str(tmp_path / "data"))
    with Foreman(**options) as fm:
        async def both() -> tuple[tuple, tuple]:
            async with connect(fm.address) as alice:
                await alice.send(_hello("worker-alice-0001", "alice-box"))
                await _expect(alice, Kind.WELCOME)
                async with connect(fm.address) as bob:
                    await bob.send(_hello("worker-bob-0002", "alice-box"))
                    refused = await _until_closed(bob)
                return refused, await _until_closed(alice, timeout=0.5)

        refused, alice = asyncio.run(both())
        assert refused[0] == CloseCode.AUTH_FAILED and "belongs to another token" in refused[1]
        assert alice == (None, None)  # not replaced
    with Foreman(**options) as fm:
        code, reason = hello_closes(fm, "worker-bob-0002")
        assert code == CloseCode.AUTH_FAILED and "belongs to another token" in reason
        assert hello_closes(fm, "worker-alice-0001") == (None, None)
