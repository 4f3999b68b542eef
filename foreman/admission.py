"""What a peer may cost the foreman before and after it proves who it is: connection caps, the pre-authentication
message limit, worker-id ownership, and which connections a token revocation ends.

The decisions are plain classes and functions with no I/O (tested without sockets); :class:`GuardedConnection`
is the thin WebSocket shell that applies them to each TCP connection the foreman accepts.

Limits, and the memory each bounds (see docs/security.md, "Limits"):

- :data:`PREAUTH_MAX_MESSAGE_SIZE`: until its HELLO or CONNECT is accepted a peer may send frames of at most
  this size (a handshake carries a JSON header and no payload), and at most :data:`PREAUTH_MAX_QUEUE` of them
  are buffered: a connection that has not authenticated holds about 2 x 64 KiB of frames, plus asyncio's read
  buffer (256 KiB) and websockets' HTTP request limits, instead of 17 x 64 MiB.
- :data:`MAX_PENDING` / :data:`MAX_PENDING_PER_HOST`: connections not yet authenticated, in all and per peer
  address; together with the above they bound what strangers can make the foreman buffer (about 256 x 0.5 MiB)
  and keep one address from taking every slot. A connection over either cap is closed as soon as it is accepted.
- :data:`MAX_CONNECTIONS`: every connection, authenticated or not (each is a file descriptor and a few KiB).
- The handshake deadline (``HANDSHAKE_TIMEOUT`` in :mod:`foreman.server`, 10 s) bounds how long a pending
  connection may hold its slot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any, Hashable, TypeVar

from websockets.asyncio.server import ServerConnection

from foreman import protocol
from foreman.auth import ADMIN, Principal

log = logging.getLogger("crowdcompute.foreman")

#: Largest frame accepted before authentication: a handshake's prefix and its largest header (it has no payload).
PREAUTH_MAX_MESSAGE_SIZE = 5 + protocol.MAX_HEADER_SIZE
#: Frames buffered for a connection before authentication (websockets' ``max_queue`` for it; 16 after).
PREAUTH_MAX_QUEUE = 1
#: Connections that have not completed their handshake, in all.
MAX_PENDING = 256
#: Connections that have not completed their handshake, from one address.
MAX_PENDING_PER_HOST = 64
#: Connections in all, authenticated or not.
MAX_CONNECTIONS = 10_000
#: The principal of an open foreman (see :meth:`foreman.auth.Authenticator.identify`).
ANONYMOUS = "anonymous"
#: Longest worker id accepted (ids are shown on the dashboard and kept in the journal).
MAX_WORKER_ID = 200

K = TypeVar("K", bound=Hashable)


class Admission:
    """Counts open connections, per address and whether they have authenticated, and decides which new one to
    refuse. Keys are any hashable handle of a connection; ``host`` is its peer address."""

    def __init__(self, max_connections: int | None = None, max_pending: int | None = None,
                 max_pending_per_host: int | None = None) -> None:
        self.max_connections = MAX_CONNECTIONS if max_connections is None else max_connections
        self.max_pending = MAX_PENDING if max_pending is None else max_pending
        self.max_pending_per_host = MAX_PENDING_PER_HOST if max_pending_per_host is None else max_pending_per_host
        self._open: dict[Hashable, tuple[str, bool]] = {}  # key -> (host, authenticated)
        self._pending_by_host: dict[str, int] = {}
        self.pending = 0
        self.refused = 0  # connections refused since the start (for metrics and tests)

    @property
    def connections(self) -> int:
        return len(self._open)

    def open(self, key: Hashable, host: str) -> str | None:
        """A connection was accepted from ``host``: None if it may go on (it is counted as pending), else why it
        is refused (it is not counted)."""
        reason = None
        if len(self._open) >= self.max_connections:
            reason = f"the foreman holds its maximum of {self.max_connections} connections"
        elif self.pending >= self.max_pending:
            reason = f"{self.max_pending} connections are already waiting to authenticate"
        elif self._pending_by_host.get(host, 0) >= self.max_pending_per_host:
            reason = f"{self.max_pending_per_host} connections from {host} are already waiting to authenticate"
        if reason is not None:
            self.refused += 1
            return reason
        self._open[key] = (host, False)
        self.pending += 1
        self._pending_by_host[host] = self._pending_by_host.get(host, 0) + 1
        return None

    def authenticated(self, key: Hashable) -> None:
        """The connection's handshake succeeded: it no longer counts as pending."""
        entry = self._open.get(key)
        if entry is None or entry[1]:
            return
        self._open[key] = (entry[0], True)
        self._unpend(entry[0])

    def closed(self, key: Hashable) -> None:
        entry = self._open.pop(key, None)
        if entry is not None and not entry[1]:
            self._unpend(entry[0])

    def _unpend(self, host: str) -> None:
        self.pending -= 1
        left = self._pending_by_host[host] - 1
        if left:
            self._pending_by_host[host] = left
        else:
            del self._pending_by_host[host]


def worker_id_refusal(worker_id: str, owner: str | None, principal: Principal) -> str | None:
    """Why ``principal`` may not register ``worker_id``, or None if it may. ``owner``: the principal that
    registered that id first (None: nobody yet, or forgotten since, see ``Journal.prune_workers``). An id belongs to
    its first principal; only the admin may take over another's. An id registered on an open foreman (no token:
    the ``anonymous`` principal) belongs to nobody, so adding tokens later locks no worker out."""
    if not worker_id or len(worker_id) > MAX_WORKER_ID or not worker_id.isprintable():
        return f"a worker id must be 1 to {MAX_WORKER_ID} printable characters"
    if owner in (None, ANONYMOUS) or owner == principal.name or principal.role == ADMIN:
        return None
    return f"worker id {worker_id!r} belongs to another token; pick another --worker-id"


def revoked_connections(connections: Iterable[tuple[K, Principal]], revoked: Iterable[Principal]) -> list[K]:
    """The connections (of workers or clients) authenticated with a token among ``revoked``."""
    tokens = {principal.token for principal in revoked}
    return [key for key, principal in connections if principal.token in tokens] if tokens else []


def _host(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


class GuardedConnection(ServerConnection):
    """A server connection that is counted by an :class:`Admission` from the moment it is accepted, refused at
    once when over a cap, and held to the pre-authentication limits until :meth:`authenticated`.
    Use :func:`guarded` to bind it to an admission."""

    admission: Admission

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # websockets >= 15 calls the frame limit max_message_size, older versions max_size; either is read as each
        # frame's header is parsed, so changing it applies from the next frame on.
        self._size_attribute = "max_message_size" if hasattr(self.protocol, "max_message_size") else "max_size"
        self.full_max_size = getattr(self.protocol, self._size_attribute)
        setattr(self.protocol, self._size_attribute, PREAUTH_MAX_MESSAGE_SIZE)
        self.full_max_queue = None
        if hasattr(self, "max_queue_high"):  # read when the connection is made (older versions: 16 frames)
            self.full_max_queue = (self.max_queue_high, self.max_queue_low)
            self.max_queue_high, self.max_queue_low = PREAUTH_MAX_QUEUE, 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        host = _host(transport.get_extra_info("peername"))
        reason = self.admission.open(self, host)
        if reason is not None:
            log.warning("refused a connection from %s: %s", host, reason)
            transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.admission.closed(self)

    def authenticated(self) -> None:
        """Lift the pre-authentication limits (frames already being read keep theirs)."""
        self.admission.authenticated(self)
        setattr(self.protocol, self._size_attribute, self.full_max_size)
        if self.full_max_queue is not None:
            high, low = self.full_max_queue
            self.recv_messages.high = high
            self.recv_messages.low = low if low is not None else (high // 4 if high is not None else None)


def guarded(admission: Admission) -> type[GuardedConnection]:
    """A :class:`GuardedConnection` class counted by ``admission`` (for ``serve(create_connection=...)``)."""
    return type("GuardedConnection", (GuardedConnection,), {"admission": admission})
