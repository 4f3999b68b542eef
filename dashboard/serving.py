"""uvicorn for both dashboards, waking the machine once a second instead of ten times."""

from __future__ import annotations

import asyncio
import contextlib

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class QuietServer(uvicorn.Server):
    """uvicorn's server with a one-second tick.

    uvicorn's main loop wakes every 0.1 s to refresh the ``Date`` header (which it does once a second) and to
    look at ``should_exit``. Here it wakes once a second, and :meth:`stop` ends it at once, so an idle foreman
    or worker does not wake its CPU ten times a second for its dashboard.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._stopping = asyncio.Event()

    def stop(self) -> None:
        """Shut down now (as setting ``should_exit``, without waiting for the next tick)."""
        self.should_exit = True
        self._stopping.set()

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # tick 0: the Date header is refreshed on every tick
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 1.0)


#: Seconds an HTTP connection may take to send a request's headers (the first, and each next one on a kept-alive
#: connection); then it is closed. uvicorn has no such timeout of its own (its keep-alive timeout stops at the
#: first byte), so a peer sending a header a byte at a time could hold a connection for ever (slowloris). Headers
#: are at most h11's 16 KiB, so this bounds how long, not how much, a connection holds before it has a request.
HEADER_TIMEOUT = 10.0


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with :data:`HEADER_TIMEOUT` (pass it as ``uvicorn.Config(http=...)``)."""

    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_deadline: asyncio.TimerHandle | None = None
        self._arm_header_deadline()

    def _arm_header_deadline(self) -> None:
        self._disarm_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _disarm_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _header_timed_out(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()  # no request yet: nothing to answer

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's headers arrived
            self._disarm_header_deadline()

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm_header_deadline()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_deadline()
        super().connection_lost(exc)
