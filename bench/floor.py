"""The floor under a CrowdCompute round trip on this machine: what its three transports cost with nothing else.

A ``submit(inc, 1).result()`` crosses, at the least: the caller's thread to the foreman's event-loop thread and
back, one message each way between the foreman's and the worker's event loops (WebSocket for a worker elsewhere,
the local link over a Unix socket for a foreman's own local workers), and one pipe message each way between the
worker and its task process. This measures each of those alone (median of 2,500 round
trips of a 60-byte message, after 500 of warm-up), so the rest of a measured round trip is CrowdCompute's own
processing.

Usage: ``python bench/floor.py``.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import statistics
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's foreman package
from foreman import local_link

MESSAGE = b"x" * 60
WARMUP, CALLS = 500, 2500


def median_ms(samples: list[float]) -> float:
    return 1000 * statistics.median(samples[WARMUP:])


def timed(call: Callable[[], object]) -> float:
    samples = []
    for _ in range(WARMUP + CALLS):
        started = time.perf_counter()
        call()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


def _echo_pipe(conn: Connection) -> None:
    while True:
        conn.send_bytes(conn.recv_bytes())


def _echo_websocket(ports: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with serve(echo, "127.0.0.1", 0, compression=None, ping_interval=None) as server:
            ports.put(server.sockets[0].getsockname()[1])
            await asyncio.Future()

    asyncio.run(main())


def _echo_local_link(addresses: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    async def echo(link: local_link.LocalConnection) -> None:
        async for message in link:
            await link.send(message)

    async def main() -> None:
        server = local_link.LocalServer(echo, 1 << 20)
        await server.start()
        addresses.put(server.address)
        await asyncio.Future()

    asyncio.run(main())


async def _echo_rtt(link: Any) -> float:
    """Median round trip of a message through an echo, over a WebSocket or a local link."""
    samples = []
    for _ in range(WARMUP + CALLS):
        started = time.perf_counter()
        await link.send(MESSAGE)
        await link.recv()
        samples.append(time.perf_counter() - started)
    return median_ms(samples)


async def _local_link_rtt(address: str) -> float:
    async with local_link.open_link(address, 1 << 20) as link:
        return await _echo_rtt(link)


async def _websocket_rtt(port: int) -> float:
    async with connect(f"ws://127.0.0.1:{port}", compression=None, ping_interval=None) as ws:
        return await _echo_rtt(ws)


def main() -> None:
    context = multiprocessing.get_context("spawn")
    ours, theirs = Pipe()
    child = context.Process(target=_echo_pipe, args=(theirs,), daemon=True)
    child.start()
    pipe = timed(lambda: (ours.send_bytes(MESSAGE), ours.recv_bytes()))

    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    hop = timed(lambda: asyncio.run_coroutine_threadsafe(asyncio.sleep(0), loop).result())

    ports = context.Queue()
    server = context.Process(target=_echo_websocket, args=(ports,), daemon=True)
    server.start()
    websocket = asyncio.run(_websocket_rtt(ports.get(timeout=30)))
    local = None
    if local_link.AVAILABLE:
        addresses = context.Queue()
        link_server = context.Process(target=_echo_local_link, args=(addresses,), daemon=True)
        link_server.start()
        local = asyncio.run(_local_link_rtt(addresses.get(timeout=30)))
        link_server.terminate()
    child.kill()
    server.kill()

    print("| transport, alone | round trip, median ms |")
    print("|---|---|")
    print(f"| caller thread -> event-loop thread -> caller | {hop:.3f} |")
    print(f"| WebSocket message and reply between two processes (websockets, asyncio) | {websocket:.3f} |")
    if local is not None:
        print(f"| local link message and reply between two processes (Unix socket, foreman/local_link.py) | "
              f"{local:.3f} |")
    print(f"| pipe message and reply to a spawned process | {pipe:.3f} |")
    print(f"| sum: the floor under one round trip to a worker over WebSocket | {hop + websocket + pipe:.3f} |")
    if local is not None:
        print(f"| sum: the floor under one round trip to a local worker (local link) | {hop + local + pipe:.3f} |")


if __name__ == "__main__":
    main()
