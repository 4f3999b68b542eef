"""Messages over a Unix socket between an embedded foreman and the workers it starts on its own machine.

The same messages as over WebSocket, framed leaner: a 4-byte big-endian length (its top bit set for a close
message, whose body is a 2-byte close code and a UTF-8 reason) and the body. No HTTP upgrade, masking or frame
parsing in Python: a round trip between two processes costs about 0.11 ms here against 0.17 ms through
``websockets`` (``bench/floor.py``). :class:`LocalConnection` offers the part of a ``websockets`` connection that
the foreman and the worker use (``send``, ``recv``, ``async for``, ``close`` with a code and reason,
``close_code``, ``transport``), so both serve either kind of connection with the same code.

Reads land in a 64 KiB buffer kept for the connection, from which each message is copied out as ``bytes``; a
message too large for it is read straight into a ``bytearray`` of its own, which ``recv`` returns as it is. A
message may be sent as the parts that make it (:func:`foreman.protocol.encode_parts`): the large ones, a batch's
megabytes of arguments, go to the transport as they are instead of being joined into one copy first.

Who may connect: the socket lives in a directory only its owner can enter (mode 0700), and a worker still
presents its token in HELLO. The address a worker dials is ``unix:`` followed by the socket's path.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import socket
import struct
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
)
from websockets.frames import Close

from foreman.protocol import BATCH_BYTES, Parts, message_size

log = logging.getLogger("crowdcompute.foreman")

SCHEME = "unix:"
#: Whether this platform has Unix sockets for asyncio (Windows' event loops do not serve them).
AVAILABLE = os.name == "posix"
_LENGTH = struct.Struct(">I")
_CLOSE_FLAG = 0x8000_0000
_LENGTH_BITS = 0x7FFF_FFFF
_CODE = struct.Struct(">H")
_ABNORMAL = 1006  # closed without a close message, as WebSocket reports it
_TOO_BIG = 1009
_OK_CODES = frozenset({1000, 1001})
#: Bytes read at a time. Reads go into one buffer kept for the connection: asyncio's default of allocating
#: 256 KiB per read costs more than the read itself for small messages (glibc grows and trims its heap).
_CHUNK = 64 * 1024
#: Send buffer asked for on each end: a whole batch of arguments, so its parts go to the kernel as they are written
#: instead of ~200 KiB at a time as the worker reads. Linux caps it at net.core.wmem_max: 4 MiB on this project's
#: machine, about 208 KiB on a stock kernel.
_SEND_BUFFER = BATCH_BYTES


class LocalConnection(asyncio.BufferedProtocol):
    """One end of a local link. Use it like a ``websockets`` connection, on the loop that opened it."""

    remote_address = "local"

    def __init__(self, max_size: int, opened: Callable[[LocalConnection], None] | None = None) -> None:
        self.max_size = max_size
        self._opened = opened
        self.transport: asyncio.Transport = None  # type: ignore[assignment]  # set by connection_made
        self.close_code: int | None = None
        self.close_reason = ""
        self._close_received = False  # the peer closed (rather than this end, or the connection dropping)
        self._chunk = memoryview(bytearray(_CHUNK))  # reads land here; whole messages are copied out
        self._have = 0  # bytes of the chunk filled
        self._large: bytearray | None = None  # the body of a message larger than the chunk, being read into
        self._large_word = 0
        self._large_have = 0
        self._messages: collections.deque[bytes | bytearray] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._handler: Callable[[bytes | bytearray], None] | None = None  # see handle_each
        self._handled: asyncio.Future[None] | None = None  # done when the link closes or the handler raises
        self._drained: asyncio.Future[None] | None = None  # set while the transport is over its high-water mark
        self._closed = asyncio.get_running_loop().create_future()

    # -- asyncio.BufferedProtocol ------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SEND_BUFFER)
        if self._opened is not None:
            self._opened(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._large is not None:
            return memoryview(self._large)[self._large_have:]
        return self._chunk[self._have:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._large is not None:
            self._large_have += nbytes
            if self._large_have == len(self._large):
                body, self._large = self._large, None
                if self._take(self._large_word, body):
                    self._wake()
            return
        self._have += nbytes
        chunk, offset, have = self._chunk, 0, self._have
        while have - offset >= 4:
            (word,) = _LENGTH.unpack_from(chunk, offset)
            length = word & _LENGTH_BITS
            if length > self.max_size:
                self._refuse(length)
                return
            if have - offset - 4 < length:
                if 4 + length > len(chunk):  # read the rest straight into a buffer of its own
                    self._large, self._large_word = bytearray(length), word
                    self._large_have = have - offset - 4
                    self._large[:self._large_have] = chunk[offset + 4:have]
                    offset = have
                break
            body = chunk[offset + 4:offset + 4 + length].tobytes()
            offset += 4 + length
            if not self._take(word, body):
                return
        if offset:
            rest = chunk[offset:have].tobytes()
            chunk[:len(rest)] = rest
            self._have = len(rest)
        self._wake()

    def _take(self, word: int, body: bytes | bytearray) -> bool:
        """Queue a message, or act on a close message (and return False: nothing more is read)."""
        if not word & _CLOSE_FLAG:
            if self._handler is None:
                self._messages.append(body)
                return True
            try:
                self._handler(body)
            except Exception as exc:  # noqa: BLE001 - handle_each raises it; nothing more is read
                self._handler = None
                self.transport.pause_reading()
                if self._handled is not None and not self._handled.done():
                    self._handled.set_exception(exc)
            return self._handler is not None and self.close_code is None
        code = _CODE.unpack_from(body)[0] if len(body) >= 2 else 1005
        self._close_received = self.close_code is None
        self._finish(code, bytes(body[2:]).decode(errors="replace"))
        self.transport.close()
        return False

    def _refuse(self, length: int) -> None:
        self._finish(_TOO_BIG, f"message of {length} bytes is over the {self.max_size}-byte limit")
        self._write_close(_TOO_BIG, "message too big")
        self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(_ABNORMAL, "")
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def pause_writing(self) -> None:
        self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    # -- the websockets-like interface -----------------------------------------------------------------------

    async def recv(self) -> bytes | bytearray:
        """The next message; ConnectionClosedOK / ConnectionClosedError once the link is closed."""
        while not self._messages:
            if self.close_code is not None:
                raise self._closed_error()
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._messages.popleft()

    async def __aiter__(self) -> AsyncIterator[bytes | bytearray]:
        """Messages until the link closes: ends on a normal close, raises ConnectionClosedError otherwise."""
        try:
            while True:
                yield await self.recv()
        except ConnectionClosedOK:
            return

    async def handle_each(self, handler: Callable[[bytes | bytearray], None]) -> None:
        """Call ``handler`` with each message, straight from the read that completes it (no task switch per
        message, unlike ``async for``), until the link closes: return on a normal close, raise
        ConnectionClosedError on any other, or what ``handler`` raised (then nothing more is read)."""
        self._handled = asyncio.get_running_loop().create_future()
        while self._messages:  # those read before
            handler(self._messages.popleft())
        if self.close_code is None:
            self._handler = handler
            try:
                await self._handled
            finally:
                self._handler = None
        if self.close_code not in _OK_CODES:
            raise self._closed_error()

    async def send(self, data: bytes | memoryview | Parts) -> None:
        """Send one message (or the parts that make it), waiting while the transport is over its high-water mark."""
        while self._drained is not None and self.close_code is None:
            await self._drained
        if not self.write_now(data):
            raise self._closed_error()

    def write_now(self, data: bytes | memoryview | Parts) -> bool:
        """Write one message (or the parts that make it, see :func:`foreman.protocol.encode_parts`) to the
        transport now, buffered if need be; False once the link is closing."""
        parts = data if type(data) is tuple else (data,)
        length = message_size(parts)
        if length > self.max_size:
            raise ValueError(f"message of {length} bytes is over the {self.max_size}-byte limit")
        if self.close_code is not None or self.transport.is_closing():
            return False
        small = [_LENGTH.pack(length)]  # small parts are joined: copying them is cheaper than a system call each
        for part in parts:
            if len(part) <= _CHUNK:
                small.append(part)
                continue
            self.transport.write(b"".join(small))
            small.clear()
            # A view: what the socket does not take at once is not sliced into a new bytes first (asyncio 3.11
            # copies it into its buffer, 3.12 and later keep the view).
            self.transport.write(memoryview(part))
            if self.transport.is_closing():  # the write failed: the rest would only be counted as lost
                return False
        if small:
            self.transport.write(b"".join(small))
        return True

    def writable_now(self) -> bool:
        """Whether a message written now would go out at once (nothing buffered before it)."""
        return self.close_code is None and not self.transport.is_closing() and \
            not self.transport.get_write_buffer_size()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close message with ``code`` and ``reason`` (what is buffered goes first), then close."""
        if self.close_code is None and not self.transport.is_closing():
            self._write_close(code, reason)
            self._finish(code, reason)
            self.transport.close()
        else:
            self._finish(code, reason)
        await self.wait_closed()

    async def wait_closed(self, timeout: float = 2.0) -> None:
        """Wait until the link is closed; a peer that reads nothing for ``timeout`` s is cut off."""
        try:
            await asyncio.wait_for(asyncio.shield(self._closed), timeout)
        except asyncio.TimeoutError:
            self.transport.abort()

    # -- internals -------------------------------------------------------------------------------------------

    def _write_close(self, code: int, reason: str) -> None:
        body = _CODE.pack(code) + reason.encode()[:123]
        self.transport.write(_LENGTH.pack(len(body) | _CLOSE_FLAG) + body)

    def _finish(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        if not self._closed.done() and (self.transport is None or self.transport.is_closing()):
            self._closed.set_result(None)
        self._wake()

    def _wake(self) -> None:
        if self._handled is not None and self.close_code is not None and not self._handled.done():
            self._handled.set_result(None)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _closed_error(self) -> ConnectionClosed:
        assert self.close_code is not None
        if self.close_code == _ABNORMAL:
            return ConnectionClosedError(None, None)
        frame = Close(self.close_code, self.close_reason)
        kind = ConnectionClosedOK if self.close_code in _OK_CODES else ConnectionClosedError
        return kind(frame, None) if self._close_received else kind(None, frame)


class LocalServer:
    """Accepts local links on a fresh socket in a private directory; ``handler`` serves each connection."""

    def __init__(self, handler: Callable[[LocalConnection], Awaitable[None]], max_size: int) -> None:
        self.handler = handler
        self.max_size = max_size
        self.directory = tempfile.mkdtemp(prefix="crowdcompute-")  # mode 0700
        self.path = os.path.join(self.directory, "foreman.sock")
        self.connections: set[LocalConnection] = set()
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return SCHEME + self.path

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_unix_server(self._accept, self.path)

    def _accept(self) -> LocalConnection:
        return LocalConnection(self.max_size, self._opened)

    def _opened(self, connection: LocalConnection) -> None:
        self.connections.add(connection)
        task = asyncio.get_running_loop().create_task(self._serve(connection))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, connection: LocalConnection) -> None:
        try:
            await self.handler(connection)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("local link handler failed")
        finally:
            self.connections.discard(connection)
            if not connection.transport.is_closing():
                connection.transport.close()

    def stop_accepting(self) -> None:
        """Stop taking new connections; those open stay open."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Stop accepting, drop every connection still open, wait for their handlers, remove the socket."""
        self.stop_accepting()
        for connection in list(self.connections):
            connection.transport.abort()
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        shutil.rmtree(self.directory, ignore_errors=True)


async def connect(address: str, max_size: int, timeout: float = 10.0) -> LocalConnection:
    """Open a local link to the foreman at ``address`` (``unix:/path``)."""
    if not address.startswith(SCHEME):
        raise ValueError(f"a local link address starts with {SCHEME}, got {address!r}")
    loop = asyncio.get_running_loop()
    _, connection = await asyncio.wait_for(
        loop.create_unix_connection(lambda: LocalConnection(max_size), address[len(SCHEME):]), timeout)
    return connection


@contextlib.asynccontextmanager
async def open_link(address: str, max_size: int) -> AsyncIterator[LocalConnection]:
    """A local link to ``address`` for the ``async with`` block, closed (normally) when the block ends."""
    link = await connect(address, max_size)
    try:
        yield link
    finally:
        await link.close()


async def handle_each(link: Any, handler: Callable[[bytes | bytearray], None]) -> None:
    """Call ``handler`` with each message of ``link`` (a WebSocket or a local link) until it closes normally;
    ConnectionClosedError if it does not. A local link calls it straight from each read."""
    if isinstance(link, LocalConnection):
        await link.handle_each(handler)
    else:
        async for message in link:
            handler(message)


def is_local(address: Any) -> bool:
    return isinstance(address, str) and address.startswith(SCHEME)
