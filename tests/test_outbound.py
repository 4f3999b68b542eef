"""Outbound, the send side of a connection, over real WebSockets on loopback: order, flow control, unsent."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from foreman.outbound import Outbound


def test_messages_arrive_in_order_and_whole_while_the_peer_lags() -> None:
    """Small messages written at once and large ones queued behind a full transport keep their order."""
    messages = [bytes([i]) * (2_000_000 if i % 3 == 0 else 10) for i in range(30)]

    async def main() -> list[bytes]:
        received: list[bytes] = []
        reading = asyncio.Event()

        async def handler(ws: ServerConnection) -> None:
            await reading.wait()  # nothing is read until everything is sent: the client's transport fills up
            while len(received) < len(messages):
                received.append(await ws.recv())

        async with serve(handler, "127.0.0.1", 0, max_size=None, compression=None) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}", max_size=None, compression=None) as ws:
                outbound = Outbound(ws)
                writer = asyncio.create_task(outbound.run())
                for message in messages:
                    outbound.send(message)
                assert outbound.sent < sum(map(len, messages))  # some had to wait for the writer
                reading.set()
                while len(received) < len(messages):
                    await asyncio.sleep(0.01)
                writer.cancel()
                assert outbound.sent == sum(map(len, messages)) and outbound.unsent() == []
        return received

    assert asyncio.run(main()) == messages


def test_messages_sent_after_the_connection_closed_are_kept_as_unsent() -> None:
    async def main() -> list[bytes]:
        async def handler(ws: ServerConnection) -> None:
            await ws.close()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}") as ws:
                await ws.wait_closed()
                outbound = Outbound(ws)
                outbound.send(b"first")
                outbound.send(b"second")
                await outbound.run()  # returns: the connection is closed
                return outbound.unsent()

    assert asyncio.run(main()) == [b"first", b"second"]
