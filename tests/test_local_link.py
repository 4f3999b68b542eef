"""The local link: length-prefixed messages over a Unix socket between a foreman and the workers it starts."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import stat
import subprocess
import sys
from collections.abc import Awaitable, Callable

import pytest
from conftest import start_worker, stop_process, wait_until, worker_env
from tasks import square
from websockets.exceptions import ConnectionClosedError

from foreman import Foreman, local_link, protocol
from foreman.local_link import LocalConnection, LocalServer
from foreman.outbound import Outbound
from foreman.protocol import CloseCode, Kind

pytestmark = pytest.mark.skipif(not local_link.AVAILABLE, reason="no Unix sockets here")


async def _pair(handler, max_size: int = 1 << 20) -> tuple[LocalServer, LocalConnection]:
    server = LocalServer(handler, max_size)
    await server.start()
    return server, await local_link.connect(server.address, max_size)


def _collector(expected: int) -> tuple[list[bytes], asyncio.Event, Callable[[LocalConnection], Awaitable[None]]]:
    """A handler that keeps each message it receives, and the event it sets once it has ``expected`` of them."""
    received: list[bytes] = []
    done = asyncio.Event()

    async def collect(conn: LocalConnection) -> None:
        async for message in conn:
            received.append(bytes(message))
            if len(received) == expected:
                done.set()

    return received, done, collect


def test_messages_arrive_whole_and_in_order_both_ways() -> None:
    async def echo(conn: LocalConnection) -> None:
        async for message in conn:
            await conn.send(message[::-1])

    async def main() -> None:
        server, conn = await _pair(echo, max_size=8 << 20)
        messages = [b"", b"x", bytes(range(256)) * 3, os.urandom(5 << 20)]  # the last one: over many reads
        for message in messages:
            await conn.send(message)
        assert [await asyncio.wait_for(conn.recv(), 10) for _ in messages] == [m[::-1] for m in messages]
        await conn.close()
        assert conn.close_code == 1000
        await server.close()

    asyncio.run(main())


def test_a_burst_of_messages_across_read_boundaries_arrives_intact() -> None:
    rng = random.Random(5)
    sizes = [rng.choice([0, 1, 3, 4, 5, 1000, 65_531, 65_532, 65_533, 65_536, 70_000, 300_000]) for _ in range(300)]
    messages = [rng.randbytes(size) for size in sizes]

    async def main() -> None:
        received, done, collect = _collector(len(messages))
        server, conn = await _pair(collect)
        for message in messages:
            conn.write_now(message)  # all at once: reads split and join them at every offset
        await asyncio.wait_for(done.wait(), 30)
        assert received == messages
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_handle_each_calls_the_handler_in_order_and_raises_what_it_raised() -> None:
    async def main() -> None:
        seen: list[bytes] = []
        outcome: list[str] = []

        def handler(message: bytes | bytearray) -> None:
            if message == b"bad":
                raise ValueError("bad message")
            seen.append(bytes(message))

        async def serve(conn: LocalConnection) -> None:
            first = await conn.recv()  # a handshake, read the usual way
            seen.append(b"first:" + first)
            await asyncio.sleep(0.1)  # more arrive meanwhile: handle_each takes them first, in order
            try:
                await local_link.handle_each(conn, handler)
                outcome.append(f"closed {conn.close_code}")
            except ValueError as exc:
                outcome.append(f"raised {exc}")

        server, conn = await _pair(serve)
        for message in (b"hello", b"a", b"b"):
            await conn.send(message)
        await asyncio.sleep(0.3)
        for message in (b"c", b"bad", b"never"):
            await conn.send(message)
        await asyncio.sleep(0.3)
        assert seen == [b"first:hello", b"a", b"b", b"c"] and outcome == ["raised bad message"]
        await conn.close()

        seen.clear()
        outcome.clear()
        conn = await local_link.connect(server.address, 1 << 20)
        await conn.send(b"hello")
        await conn.send(b"d")
        await asyncio.sleep(0.3)
        await conn.close(1000)
        await asyncio.sleep(0.1)
        assert seen == [b"first:hello", b"d"] and outcome == ["closed 1000"]
        await server.close()

    asyncio.run(main())


def test_a_close_code_and_reason_reach_the_peer() -> None:
    async def refuse(conn: LocalConnection) -> None:
        await conn.recv()
        await conn.close(4001, "invalid token")

    async def main() -> None:
        server, conn = await _pair(refuse)
        await conn.send(b"hello")
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(conn.recv(), 10)
        assert caught.value.rcvd is not None and (caught.value.rcvd.code, caught.value.rcvd.reason) == \
            (4001, "invalid token")
        assert (conn.close_code, conn.close_reason) == (4001, "invalid token")
        await server.close()

    asyncio.run(main())


def test_a_normal_close_ends_iteration_and_a_dropped_one_raises() -> None:
    async def main() -> None:
        ends: list[str] = []

        async def serve(conn: LocalConnection) -> None:
            try:
                async for _ in conn:
                    pass
                ends.append(f"ended {conn.close_code}")
            except ConnectionClosedError:
                ends.append(f"raised {conn.close_code}")

        server, first = await _pair(serve)
        await first.close(1000, "bye")
        second = await local_link.connect(server.address, 1 << 20)
        second.transport.abort()  # like a kill -9: no close message
        await asyncio.sleep(0.2)
        assert sorted(ends) == ["ended 1000", "raised 1006"]
        with pytest.raises(ConnectionClosedError):
            await second.send(b"late")
        await server.close()

    asyncio.run(main())


def test_a_message_over_the_limit_closes_the_link_with_1009() -> None:
    async def main() -> None:
        received: list[bytes] = []

        async def serve(conn: LocalConnection) -> None:
            async for message in conn:
                received.append(message)

        server = LocalServer(serve, max_size=1000)
        await server.start()
        conn = await local_link.connect(server.address, max_size=10_000)
        await conn.send(b"a" * 1000)
        await conn.send(b"b" * 1001)
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(conn.recv(), 10)
        assert caught.value.rcvd is not None and caught.value.rcvd.code == 1009
        assert received == [b"a" * 1000]
        with pytest.raises(ValueError, match="over the 10000-byte limit"):
            conn.write_now(b"c" * 10_001)
        await server.close()

    asyncio.run(main())


def test_a_message_sent_as_parts_arrives_as_one_in_order_with_the_rest() -> None:
    """encode_parts' messages: small parts joined, large ones written as they are, all framed as one message."""
    rng = random.Random(7)
    big = [rng.randbytes(size) for size in (70_000, 1 << 20, 3 << 20)]

    async def main() -> None:
        received, done, collect = _collector(4)
        server, conn = await _pair(collect, max_size=8 << 20)
        conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        outbound = Outbound(conn)
        writer = asyncio.create_task(outbound.run())
        parts = protocol.encode_parts(Kind.TASKS, {"job": 1, "buffers": [len(b) for b in big]}, b"pickle", *big)
        outbound.send(b"before")
        outbound.send(parts)  # more than the socket takes: the rest waits in the transport
        outbound.send(parts)  # so this one waits in the queue, whole, for Outbound.run
        assert outbound.unsent() == [protocol.encode(Kind.TASKS, {"job": 1, "buffers": [len(b) for b in big]},
                                                     b"pickle", *big)]
        outbound.send(parts)
        outbound.send(b"after")
        await asyncio.wait_for(done.wait(), 30)
        whole = protocol.encode(Kind.TASKS, {"job": 1, "buffers": [len(b) for b in big]}, b"pickle", *big)
        assert received == [b"before", whole, whole, b"after"]
        assert outbound.sent == 2 * len(whole) + len(b"before") + len(b"after")
        with pytest.raises(ValueError, match="over the"):
            conn.write_now((b"x" * 100, os.urandom(8 << 20)))
        writer.cancel()
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_outbound_queues_behind_a_full_transport_and_keeps_order() -> None:
    async def main() -> None:
        received: list[bytes] = []
        done = asyncio.Event()

        async def slow_reader(conn: LocalConnection) -> None:
            await asyncio.sleep(0.3)  # let the sender's transport fill up
            async for message in conn:
                received.append(message)
                if len(received) == 40:
                    done.set()

        server, conn = await _pair(slow_reader, max_size=4 << 20)
        outbound = Outbound(conn)
        writer = asyncio.create_task(outbound.run())
        messages = [bytes([i]) * (1 << 20) for i in range(40)]
        for message in messages:
            outbound.send(message)
        await asyncio.wait_for(done.wait(), 30)
        assert received == messages and outbound.sent == 40 << 20
        writer.cancel()
        await conn.close()
        await server.close()

    asyncio.run(main())


def test_the_socket_is_private_and_removed_on_close() -> None:
    async def main() -> None:
        server = LocalServer(lambda conn: conn.recv(), 1000)
        await server.start()
        assert stat.S_IMODE(os.stat(server.directory).st_mode) == 0o700
        assert server.address == "unix:" + server.path and os.path.exists(server.path)
        await server.close()
        assert not os.path.exists(server.directory)

    asyncio.run(main())


def test_local_workers_dial_the_private_socket_and_run_tasks() -> None:
    with Foreman(port=0, local_workers=2, dashboard=False) as fm:
        fm.wait_for_workers(2, timeout=60)
        peers = fm._call(lambda: [type(peer.ws) for peer in fm._server.peers.values()])
        assert peers == [LocalConnection, LocalConnection]
        assert fm.map(square, range(100)) == [x * x for x in range(100)]
        directory = fm._server._local_server.directory
    assert not os.path.exists(directory)


def test_a_worker_with_a_wrong_token_is_refused_over_the_local_link() -> None:
    with Foreman(port=0, token="s3cret", local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=60)
        address = fm._server._local_server.address
        intruder = start_worker(address, "--token", "wrong", "--no-dashboard", capture=True)
        try:
            assert intruder.wait(timeout=30) == 2
            assert "invalid token" in intruder.stderr.read()
        finally:
            stop_process(intruder)
        assert len(fm.workers) == 1


def test_a_killed_local_worker_loses_nothing() -> None:
    with Foreman(port=0, local_workers=2, dashboard=False, heartbeat_interval=0.2, heartbeat_timeout=2) as fm:
        fm.wait_for_workers(2, timeout=60)
        job = fm.imap(square, range(400), chunksize=1)
        first = [next(job) for _ in range(10)]
        victim = fm._local.processes[0]
        victim.kill()
        victim.wait()
        assert first + list(job) == [x * x for x in range(400)]
        wait_until(lambda: len(fm.workers) == 1)


def test_a_malformed_message_over_the_local_link_closes_it_with_a_protocol_error() -> None:
    hello = protocol.encode(Kind.HELLO, {
        "protocol": protocol.PROTOCOL_VERSION, "worker_id": "probe", "token": "s3cret", "python": "3.11.7",
        "cloudpickle": "3.1.0", "concurrency": 1, "capabilities": []})

    async def probe(address: str) -> tuple[int | None, str]:
        conn = await local_link.connect(address, 1 << 20)
        await conn.send(hello)
        assert protocol.decode(await asyncio.wait_for(conn.recv(), 10)).kind is Kind.WELCOME
        await conn.send(b"\xff not a message")
        with pytest.raises(ConnectionClosedError):
            while True:
                await asyncio.wait_for(conn.recv(), 10)
        return conn.close_code, conn.close_reason

    with Foreman(port=0, token="s3cret", local_workers=1, dashboard=False) as fm:
        fm.wait_for_workers(1, timeout=60)
        code, reason = asyncio.run(probe(fm._server._local_server.address))
        assert code == CloseCode.PROTOCOL_ERROR and "unknown message kind 255" in reason
        assert fm.map(square, range(10)) == [x * x for x in range(10)]  # its own worker is unaffected


def test_a_worker_refuses_a_fingerprint_for_a_local_address() -> None:
    result = subprocess.run([sys.executable, "-m", "worker", "unix:/nonexistent/foreman.sock", "--fingerprint",
                             "ab" * 32, "--no-dashboard"], env=worker_env(), capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode != 0 and "wss://" in result.stderr
