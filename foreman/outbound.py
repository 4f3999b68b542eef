"""Messages to one peer (a WebSocket or a local link), in order, with flow control; used by the foreman and the
worker alike.

A message is written straight to the connection when nothing is waiting before it and the transport has nothing
buffered (the common case: one small message at a time), which saves a trip through a queue and a writer task.
Otherwise it is queued, and :meth:`Outbound.run` sends the queue with ``ws.send``, which waits while the transport
is over its high-water mark. Order holds because a message is only written straight when the queue is empty and
the writer holds none.

A peer that stops reading must not make the sender grow without limit. Two bounds (the foreman sets both for
its workers and clients; a worker sets none, it trusts its foreman):

- ``max_queued``: bytes waiting in the queue (not yet handed to the connection). A message that would go over
  it aborts the connection instead: the memory one connection can hold is this plus the transport's buffer
  (one message at most, plus the high-water mark).
- :meth:`Outbound.stalled`: something waits to be sent and the peer has taken no byte for ``timeout`` seconds.
  The owner checks it on its clock and drops such a peer, so a reader that never reads is gone within the
  timeout even while what it is sent stays under ``max_queued``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from foreman.local_link import LocalConnection
from foreman.protocol import Parts, message_size

log = logging.getLogger("crowdcompute.foreman")

#: Bytes the foreman lets wait in the send queue of one worker or client connection (``Outbound.max_queued``).
#: Honest traffic stays below it: a worker is sent at most its slots plus prefetch in batches (4 MiB each by
#: default), a client its results as they come.
SEND_QUEUE_LIMIT = 256 * 1024 * 1024


class Outbound:
    """The send side of one connection. Call :meth:`send` and :meth:`run` on the connection's event loop."""

    def __init__(self, ws: Connection | LocalConnection, max_queued: int | None = None) -> None:
        self.ws = ws
        self.max_queued = max_queued
        self.sent = 0  # bytes handed to the connection
        self.queued = 0  # bytes in the queue and held by run(), not yet handed to the connection
        self.overflowed = False  # went over max_queued: the connection is being closed, nothing more is sent
        self._progress: tuple[int, float | None] = (0, None)  # (see stalled) at the last sign of progress
        self.on_empty: Callable[[], None] | None = None  # called when run() has sent all that was queued
        self._queue: collections.deque[bytes | Parts] = collections.deque()
        self._wake = asyncio.Event()
        self._holding: bytes | Parts | None = None  # taken from the queue by run() and not yet sent
        self._joins = not isinstance(ws, LocalConnection)  # a WebSocket message is one frame

    def send(self, data: bytes | Parts) -> None:
        """Send ``data`` (a message, or the parts that make it) after everything sent before it, now if the
        connection can take it at once."""
        if self.overflowed:
            return
        if self._joins and type(data) is tuple:
            data = b"".join(data)
        if not self._queue and self._holding is None and self._write_now(data):
            return
        size = message_size(data)
        if self.max_queued is not None and self.queued + size > self.max_queued:
            self._overflow(size)
            return
        self.queued += size
        self._queue.append(data)
        self._wake.set()

    def stalled(self, now: float, timeout: float) -> bool:
        """True if messages wait to be sent and the peer has taken nothing for ``timeout`` seconds. Call it now
        and then (each call notes the progress seen)."""
        taken = self.sent - self._buffered()  # falls as a frame is written, rises as the peer takes bytes
        last, since = self._progress
        if since is None or taken > last or not (self._queue or self._holding is not None or self._buffered()):
            self._progress = (taken, now)
            return False
        self._progress = (taken, since)
        return now - since > timeout

    def _buffered(self) -> int:
        transport = getattr(self.ws, "transport", None)
        try:
            return int(transport.get_write_buffer_size()) if transport is not None else 0
        except (AttributeError, RuntimeError):
            return 0

    def _overflow(self, size: int) -> None:
        self.overflowed = True
        self._queue.clear()
        self.queued = 0
        log.warning("closing the connection of %s: over %s bytes wait to be sent to it (it does not read)",
                    getattr(self.ws, "remote_address", "a peer"), self.max_queued)
        # Aborted, not closed: a close frame would wait behind what the peer does not read.
        self.ws.transport.abort()

    async def run(self) -> None:
        """Send queued messages until the connection closes; then return (see :meth:`unsent`)."""
        while True:
            while not self._queue:
                self._wake.clear()
                await self._wake.wait()
            data = self._holding = self._queue.popleft()
            try:
                await self.ws.send(data)
            except ConnectionClosed:
                return  # what it held stays in unsent()
            self._holding = None
            size = message_size(data)
            self.sent += size
            self.queued -= size
            if not self._queue and self.on_empty is not None:
                self.on_empty()

    def unsent(self) -> list[bytes]:
        """Messages not handed to the connection, oldest first (each joined); the queue is left empty."""
        out = ([self._holding] if self._holding is not None else []) + list(self._queue)
        self._holding = None
        self._queue.clear()
        self.queued = 0
        return [b"".join(data) if type(data) is tuple else data for data in out]

    def _write_now(self, data: bytes | Parts) -> bool:
        ws = self.ws
        if isinstance(ws, LocalConnection):
            if not (ws.writable_now() and ws.write_now(data)):
                return False
        elif ws.protocol.state is not State.OPEN or ws.transport.is_closing() or \
                ws.transport.get_write_buffer_size():
            return False
        else:
            # What ws.send does for one binary message, without the coroutine: frame it, write it to the transport.
            ws.protocol.send_binary(data)
            ws.send_data()
        self.sent += message_size(data)
        return True
