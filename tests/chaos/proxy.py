"""A loopback TCP proxy that can partition a connection silently.

Workers that dial :attr:`LoopbackProxy.address` instead of the foreman reach it through here. Each accepted
connection gets its own upstream connection to the foreman and two pumps that copy bytes across. A
:meth:`~LoopbackProxy.cut` stops the copying in both directions *without closing either socket*: what either side
sends is read and thrown away, so neither sees a FIN or an RST and neither is slowed by flow control, exactly
as when the network between them silently drops every packet. Only heartbeats can tell. A cut pair's sockets
are closed ``linger`` seconds later (or by :meth:`close_cut`), so a test never leaks them.

The proxy runs its own event loop on its own thread, and only ever listens on and connects to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"


@dataclass(eq=False)
class Pair:
    """One proxied connection: the worker's side (downstream) and the foreman's side (upstream)."""

    id: int
    down_reader: asyncio.StreamReader
    down_writer: asyncio.StreamWriter
    up_reader: asyncio.StreamReader | None = None
    up_writer: asyncio.StreamWriter | None = None
    up_port: int = 0  # local port of the upstream socket: what the foreman sees as the peer's address
    opened: float = field(default_factory=time.monotonic)
    cut_at: float | None = None  # monotonic time of the silent cut
    down_gone_at: float | None = None  # monotonic time the worker's side closed or reset (after a cut: its watchdog)
    up_gone_at: float | None = None  # monotonic time the foreman's side closed (after a cut)
    closed: bool = False
    bytes_dropped: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def is_cut(self) -> bool:
        return self.cut_at is not None


class LoopbackProxy:
    """Forward ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, with silent cuts on demand.

    :param target_port: the foreman's port.
    :param linger: seconds a cut pair's sockets stay open (silent) before the proxy closes them.
    """

    def __init__(self, target_port: int, linger: float = 8.0) -> None:
        self.target_port = target_port
        self.linger = linger
        self.port = 0
        self.pairs: dict[int, Pair] = {}
        self.hold_new = False  # new connections are cut from the start (the worker cannot get back in)
        self.connections = 0
        self.cuts = 0
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> LoopbackProxy:
        self._thread.start()
        self._server = self._run(asyncio.start_server(self._accept, LOOPBACK, 0))
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        return f"ws://{LOOPBACK}:{self.port}"

    def stop(self) -> None:
        """Close the listener and every pair, then stop the loop."""
        if not self._thread.is_alive():
            return

        async def shutdown() -> None:
            assert self._server is not None
            self._server.close()
            for pair in list(self.pairs.values()):
                self._close_pair(pair)
            await asyncio.sleep(0.05)

        try:
            self._run(shutdown(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> LoopbackProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- control (from any thread) ---------------------------------------------------------------------------

    def pair_for_upstream_port(self, port: int) -> Pair | None:
        with self._lock:
            return next((p for p in self.pairs.values() if p.up_port == port and not p.closed), None)

    def live_pairs(self) -> list[Pair]:
        with self._lock:
            return [p for p in self.pairs.values() if not p.closed and not p.is_cut and p.up_port]

    def cut(self, pair: Pair) -> float:
        """Silently partition ``pair``: nothing more passes either way, nothing is closed. Returns the
        monotonic time of the cut."""
        return self._run(self._cut(pair))

    def close_cut(self) -> None:
        """Close the sockets of every cut pair now (both sides then see the connection end)."""

        async def close_all() -> None:
            for pair in list(self.pairs.values()):
                if pair.is_cut:
                    self._close_pair(pair)

        self._run(close_all())

    def set_hold_new(self, hold: bool) -> None:
        self.hold_new = hold

    # -- the proxy's loop ------------------------------------------------------------------------------------

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _cut(self, pair: Pair) -> float:
        if pair.cut_at is None:
            pair.cut_at = time.monotonic()
            self.cuts += 1
            self._loop.call_later(self.linger, self._close_pair, pair)
        return pair.cut_at

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pair = Pair(next(self._ids), reader, writer)
        with self._lock:
            self.pairs[pair.id] = pair
        self.connections += 1
        if self.hold_new:
            await self._cut(pair)  # held: the worker's handshake disappears into the void
            pair.tasks.append(asyncio.current_task())  # type: ignore[arg-type]
            await self._pump(pair, reader, None, downstream=True)
            return
        try:
            pair.up_reader, pair.up_writer = await asyncio.open_connection(LOOPBACK, self.target_port)
        except OSError:
            self._close_pair(pair)
            return
        pair.up_port = pair.up_writer.get_extra_info("sockname")[1]
        pair.tasks = [asyncio.create_task(self._pump(pair, reader, pair.up_writer, downstream=True)),
                      asyncio.create_task(self._pump(pair, pair.up_reader, writer, downstream=False))]

    async def _pump(self, pair: Pair, reader: asyncio.StreamReader, writer: asyncio.StreamWriter | None,
                    downstream: bool) -> None:
        """Copy ``reader`` to ``writer`` until EOF; once the pair is cut, read and discard instead."""
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if pair.is_cut or writer is None:
                    pair.bytes_dropped += len(data)
                    continue
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            return
        now = time.monotonic()
        if pair.is_cut:
            # One side gave up (the worker's watchdog aborted, or the foreman closed after declaring it lost).
            # The other side must not learn of it: keep its socket open and silent until the pair is closed.
            if downstream and pair.down_gone_at is None:
                pair.down_gone_at = now
            if not downstream and pair.up_gone_at is None:
                pair.up_gone_at = now
            return
        self._close_pair(pair)  # an ordinary end: pass it on

    def _close_pair(self, pair: Pair) -> None:
        if pair.closed:
            return
        pair.closed = True
        for task in pair.tasks:
            if task is not asyncio.current_task():
                task.cancel()
        for writer in (pair.down_writer, pair.up_writer):
            if writer is not None:
                try:
                    writer.close()
                except (ConnectionError, OSError, RuntimeError):
                    pass
        with self._lock:
            self.pairs.pop(pair.id, None)
