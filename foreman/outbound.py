"""Messages to one peer (a WebSocket or a local link), in order, with flow control; used by the foreman and the
worker alike.

A message is written straight to the connection when nothing is waiting before it and the transport has nothing
buffered (the common case: one small message at a time), which saves a trip through a queue and a writer task.
Otherwise it is queued, and :meth:`Outbound.run` sends the queue with ``ws.send``, which waits while the transport
is over its high-water mark. Order holds because a message is only written straight when the queue is empty and
the writer holds none.
"""

from __future__ import annotations

import asyncio
import collections

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from foreman.local_link import LocalConnection
from foreman.protocol import Parts, message_size


class Outbound:
    """The send side of one connection. Call :meth:`send` and :meth:`run` on the connection's event loop."""

    def __init__(self, ws: Connection | LocalConnection) -> None:
        self.ws = ws
        self.sent = 0  # bytes handed to the connection
        self._queue: collections.deque[bytes | Parts] = collections.deque()
        self._wake = asyncio.Event()
        self._holding: bytes | Parts | None = None  # taken from the queue by run() and not yet sent
        self._joins = not isinstance(ws, LocalConnection)  # a WebSocket message is one frame

    def send(self, data: bytes | Parts) -> None:
        """Send ``data`` (a message, or the parts that make it) after everything sent before it, now if the
        connection can take it at once."""
        if self._joins and type(data) is tuple:
            data = b"".join(data)
        if not self._queue and self._holding is None and self._write_now(data):
            return
        self._queue.append(data)
        self._wake.set()

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
            self.sent += message_size(data)

    def unsent(self) -> list[bytes]:
        """Messages not handed to the connection, oldest first (each joined); the queue is left empty."""
        out = ([self._holding] if self._holding is not None else []) + list(self._queue)
        self._holding = None
        self._queue.clear()
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
