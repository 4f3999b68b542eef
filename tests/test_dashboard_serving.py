"""The dashboards' uvicorn server (dashboard.serving): a one-second tick, and a stop that does not wait for it."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request

import uvicorn

from dashboard.serving import QuietServer


async def _hello(scope: dict, receive: object, send: object) -> None:  # a minimal ASGI app
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


class Counting(QuietServer):
    ticks = 0

    async def on_tick(self, counter: int) -> bool:
        self.ticks += 1
        return await super().on_tick(counter)


def test_the_server_ticks_once_a_second_serves_and_stops_at_once() -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        port = sock.getsockname()[1]
        server = Counting(uvicorn.Config(_hello, log_level="warning", lifespan="off", access_log=False))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        body = await asyncio.to_thread(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read())
        assert body == b"hello"
        ticks = server.ticks
        await asyncio.sleep(1.5)
        assert server.ticks - ticks <= 2  # uvicorn's own loop ticks 15 times in 1.5 s
        assert any(name == b"date" for name, _ in server.server_state.default_headers)
        stopped = time.monotonic()
        server.stop()
        await asyncio.wait_for(serving, 5)
        assert time.monotonic() - stopped < 0.5  # not at the next tick, up to a second later
        sock.close()

    asyncio.run(main())
