"""Who may connect: tokens, protocol versions, malformed handshakes. The foreman keeps serving everyone else."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from conftest import start_worker, stop_process, wait_until
from foreman import Foreman, protocol
from foreman.protocol import CloseCode, Kind
from tasks import square


@pytest.fixture
def secured():
    with Foreman(port=0, token="s3cret", heartbeat_interval=0.2, heartbeat_timeout=1.5) as fm:
        yield fm


def _hello(**changes) -> bytes:
    header = {"protocol": protocol.PROTOCOL_VERSION, "worker_id": "probe", "token": "s3cret", "python": "3.11.7",
              "cloudpickle": "3.1.0", "concurrency": 1, "capabilities": []}
    header.update(changes)
    return protocol.encode(Kind.HELLO, header)


async def _closed_with(address: str, first: bytes | str) -> tuple[int, str]:
    async with connect(address) as ws:
        await ws.send(first)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        return ws.close_code, ws.close_reason


@pytest.mark.parametrize("token, reason", [("wrong", "invalid token"), (None, "token required")])
def test_a_worker_with_a_bad_token_is_refused_and_exits(secured: Foreman, token, reason) -> None:
    args = [] if token is None else ["--token", token]
    worker = start_worker(secured.address, *args, capture=True)
    try:
        assert worker.wait(timeout=30) == 2
        assert reason in worker.stderr.read()
    finally:
        stop_process(worker)
    assert secured.workers == []


def test_the_foreman_keeps_serving_after_refusals(secured: Foreman) -> None:
    for token, expected in (("a", "invalid token"), ("b", "invalid token"), ("", "token required")):
        code, reason = asyncio.run(_closed_with(secured.address, _hello(token=token)))
        assert (code, reason) == (CloseCode.AUTH_FAILED, expected)
    good = start_worker(secured.address, "--token", "s3cret", "--concurrency", "1")
    try:
        secured.wait_for_workers(1)
        assert secured.map(square, range(20)) == [x * x for x in range(20)]
    finally:
        stop_process(good)


def test_protocol_version_mismatch_is_refused_with_a_reason(secured: Foreman) -> None:
    code, reason = asyncio.run(_closed_with(secured.address, _hello(protocol=99)))
    assert code == CloseCode.VERSION_MISMATCH
    assert f"protocol {protocol.PROTOCOL_VERSION}" in reason and "99" in reason


@pytest.mark.parametrize("first, expected", [
    (b"\x00garbage", "unknown message kind"),
    ("a text frame", "text frame"),
    (protocol.encode(Kind.HEARTBEAT), "expected HELLO"),
    (protocol.encode(Kind.HELLO, {"protocol": 1}), "lacks the required field"),
])
def test_a_malformed_handshake_closes_that_connection_only(secured: Foreman, first, expected) -> None:
    code, reason = asyncio.run(_closed_with(secured.address, first))
    assert code == CloseCode.PROTOCOL_ERROR and expected in reason


def test_a_malformed_message_after_the_handshake_closes_that_connection(secured: Foreman) -> None:
    async def scenario() -> tuple[int, str]:
        async with connect(secured.address) as ws:
            await ws.send(_hello())
            assert protocol.decode(await ws.recv()).kind is Kind.WELCOME
            await ws.send(protocol.encode(Kind.TASKS, {"job": 1, "start": 0, "count": 1}))
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), 10)
            return ws.close_code, ws.close_reason

    code, reason = asyncio.run(scenario())
    assert code == CloseCode.PROTOCOL_ERROR and "unexpected TASKS" in reason
    wait_until(lambda: secured.workers == [])


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(monkeypatch) -> None:
    from foreman import server

    monkeypatch.setattr(server, "HANDSHAKE_TIMEOUT", 0.5)
    with Foreman(port=0) as fm:
        async def silent() -> None:
            async with connect(fm.address) as ws:
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), 10)

        asyncio.run(silent())
