"""The foreman's side of remote clients: scripts that submit jobs over a WebSocket (``Foreman.connect(...)``).

A client authenticates with a client token (or the admin token) in its CONNECT, then submits stored jobs (see
:mod:`foreman.stored`), streams their input, and receives their results as OUTPUT messages. Each client sees only
the jobs its principal owns; the admin sees all. A client that reconnects presents the same ``client`` id and
attaches to its jobs again; the jobs of a client gone for longer than ``client_grace`` are cancelled, unless they
are detached (those run to the end and wait in the journal for anyone of their owner to fetch them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from foreman import outbound, protocol
from foreman.admission import revoked_connections
from foreman.auth import ADMIN, Principal
from foreman.errors import ProtocolError
from foreman.journal import JobRow, Output
from foreman.local_link import LocalConnection, handle_each
from foreman.outbound import Outbound
from foreman.permissions import Action, authorize, refusal
from foreman.protocol import CloseCode, Kind
from foreman.quota import ClientQuota
from foreman.stored import StoredJob

if TYPE_CHECKING:
    from foreman.server import ForemanServer

log = logging.getLogger("crowdcompute.foreman")

#: Bytes queued to a client under which an attach replays more of a job's stored results (see
#: ``ClientService._replay``; at most a quarter of the send queue limit), and stored results read from the
#: journal at a time: what an attach holds in memory, however many results the job has.
REPLAY_WINDOW = 16 * 1024 * 1024
REPLAY_BATCH = 8

class ClientPeer:
    """One connected client; a :class:`~foreman.stored.Subscriber` of the jobs it attached to."""

    def __init__(self, ws: ServerConnection | LocalConnection, client_id: str, principal: Principal) -> None:
        self.ws = ws
        self.client_id = client_id
        self.principal = principal
        self.attached: set[int] = set()
        self.last_heard = time.monotonic()
        self.outbound = Outbound(ws, outbound.SEND_QUEUE_LIMIT)
        self.replaying: dict[int, int] = {}  # job -> last seq sent, while its stored results are replayed

    @property
    def admin(self) -> bool:
        return self.principal.role == ADMIN

    def send(self, data: bytes) -> None:
        self.outbound.send(data)

    def output(self, output: Output, fed: int) -> None:
        header: dict[str, Any] = {"job": output.job, "seq": output.seq, "start": output.start,
                                  "count": output.count, "status": output.status, "fed": fed,
                                  "elapsed": output.elapsed, "worker": output.worker}
        if output.error is not None:
            header["error"] = output.error
        self.send(protocol.encode(Kind.OUTPUT, header, output.payload))

    def ended(self, job: JobRow) -> None:
        self.attached.discard(job.id)
        self.send(protocol.encode(Kind.JOB_END, {"job": job.id, "state": job.state, "error": job.error}))


class ClientService:
    """Serves client connections for a :class:`~foreman.server.ForemanServer`."""

    def __init__(self, server: ForemanServer, client_grace: float = 300.0) -> None:
        self.server = server
        self.client_grace = client_grace
        self.peers: dict[str, ClientPeer] = {}
        self.quota = ClientQuota()  # running jobs and unanswered input per principal (see foreman.quota)

    def identify(self, header: dict[str, Any]) -> tuple[Principal | None, str]:
        """The principal of a CONNECT, or None and why it is refused."""
        principal = self.server.auth.identify(header["token"])
        if principal is None:
            return None, "token required" if not header["token"] else "invalid token"
        if not authorize(principal, Action.SUBMIT):
            return None, refusal(principal, Action.SUBMIT)
        return principal, ""

    async def serve(self, ws: ServerConnection | LocalConnection, principal: Principal, header: dict[str, Any]) -> None:
        """Run one client connection after its CONNECT was accepted."""
        server = self.server
        peer = ClientPeer(ws, header["client"], principal)
        old = self.peers.get(peer.client_id)
        if old is not None:
            self._drop(old)  # closed without waiting: a silent peer would hold this one up
            asyncio.ensure_future(old.ws.close(CloseCode.REPLACED, "replaced by a new connection of the same client"))
        self.peers[peer.client_id] = peer
        await ws.send(protocol.encode(Kind.WELCOME, {
            "session": server.session, "heartbeat_interval": server.heartbeat_interval,
            "heartbeat_timeout": server.heartbeat_timeout, "max_message_size": server.max_message_size,
            "principal": principal.name, "admin": peer.admin, "trust_workers": server.trust_workers,
            **self.capacity()}))
        log.info("client %s (%s) connected from %s", peer.client_id, principal.name, ws.remote_address,
                 extra={"client": peer.client_id})
        writer = asyncio.create_task(peer.outbound.run())

        def on_frame(data: bytes | bytearray) -> None:
            peer.last_heard = time.monotonic()
            self._on_message(peer, protocol.decode(data, server.max_message_size))

        try:
            await handle_each(ws, on_frame)
        except ProtocolError as exc:
            log.warning("client %s sent a bad message, closing: %s", peer.client_id, exc,
                        extra={"client": peer.client_id})
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            if self.peers.get(peer.client_id) is peer:
                self._drop(peer)

    def capacity(self) -> dict[str, int]:
        """What a client's feeder sizes its window and batches by."""
        return {"capacity": self.server.scheduler.capacity, "slots": self.server.scheduler.slots}

    def _drop(self, peer: ClientPeer) -> None:
        del self.peers[peer.client_id]
        now = time.monotonic()
        for job_id in peer.attached:
            stored = self.server.stored.get(job_id)
            if stored is not None:
                stored.detach(peer, now)
        peer.attached.clear()

    # -- messages --------------------------------------------------------------------------------------------

    def _on_message(self, peer: ClientPeer, msg: protocol.Message) -> None:
        kind, header = msg.kind, msg.header
        if kind is Kind.SUBMIT:
            self._submit(peer, header, msg.payload)
        elif kind is Kind.INPUT:
            stored = self._running(peer, header["job"])
            if stored is not None:
                refusal = self.quota.input_refusal(stored.owner, len(msg.payload))
                if refusal is not None and header["start"] >= stored.fed:  # a resent batch costs nothing
                    log.warning("job %s failed: %s", stored.id, refusal, extra={"job": stored.id})
                    stored.failure = refusal
                    self.server.cancel_job(stored.id)
                    return
                try:
                    self.server.add_stored_input(header["job"], header["start"], header["count"], msg.payload)
                except ValueError as exc:
                    raise ProtocolError(str(exc)) from None
        elif kind is Kind.INPUT_END:
            if self._running(peer, header["job"]) is not None:
                self.server.close_stored_input(header["job"])
        elif kind is Kind.ABORT:
            if self._running(peer, header["job"]) is not None:
                start = header.get("start")
                if type(start) is int:
                    self.server.cancel_batch(header["job"], start)
                else:
                    failed = header.get("failed")
                    self.server.cancel_job(header["job"], failed=failed[:500] if isinstance(failed, str) else None)
        elif kind is Kind.ATTACH:
            self._attach(peer, header["job"], header["after"])
        elif kind is Kind.ACK:
            self._running(peer, header["job"])
            self.server.journal.acknowledge(header["job"], header["seq"])
        elif kind is Kind.QUERY:
            peer.send(protocol.encode(Kind.REPLY, {"ref": header["ref"], **self._query(peer, header)}))
        elif kind is Kind.HEARTBEAT:
            peer.send(protocol.encode(Kind.HEARTBEAT, self.capacity()))
        else:
            raise ProtocolError(f"unexpected {kind.name} from a client")

    def _submit(self, peer: ClientPeer, header: dict[str, Any], function: memoryview | bytes) -> None:
        options = header["options"]
        refusal = self.quota.submit_refusal(peer.principal.name)
        if refusal is not None:
            peer.send(protocol.encode(Kind.ACCEPTED, {"ref": header["ref"], "error": refusal}))
            return
        try:
            total = header.get("total")
            if total is not None and (type(total) is not int or total < 0):
                raise ValueError("total must be a count of tasks or null")
            stored = self.server.add_stored_job(peer.principal.name, header["name"], header["digest"],
                                                header["call"], bytes(function), options, total,
                                                header["detached"])
        except (TypeError, ValueError) as exc:
            peer.send(protocol.encode(Kind.ACCEPTED, {"ref": header["ref"], "error": str(exc)}))
            return
        peer.send(protocol.encode(Kind.ACCEPTED, {"ref": header["ref"], "job": stored.id}))
        peer.attached.add(stored.id)
        self.server.attach_stored(stored.id, peer)

    def _attach(self, peer: ClientPeer, job_id: int, after: int) -> None:
        row = self.server.journal.job(job_id)
        if row is None or not self._may_see(peer, row.owner):
            peer.send(protocol.encode(Kind.ATTACHED, {"job": job_id, "error": _unknown(job_id, self.server)}))
            return
        peer.send(protocol.encode(Kind.ATTACHED, {"job": job_id, **row.summary()}))
        if job_id not in peer.replaying and job_id not in peer.attached:
            peer.replaying[job_id] = after
            peer.outbound.on_empty = lambda: self._replay(peer)
            self._replay(peer)

    def _replay(self, peer: ClientPeer) -> None:
        """Send the stored results of the jobs ``peer`` attached to, a few at a time while its send queue is under
        :data:`REPLAY_WINDOW` (its writer calls this again once it has sent them), so a job with more results than
        the send queue limit reaches a client that reads; then subscribe it to what comes next. Results a job
        stores meanwhile are read from the journal too, so the client gets them in order."""
        journal = self.server.journal
        window = min(REPLAY_WINDOW, (peer.outbound.max_queued or REPLAY_WINDOW) // 4)
        while peer.replaying and peer.outbound.queued < window and self.peers.get(peer.client_id) is peer:
            job_id, after = next(iter(peer.replaying.items()))
            outputs = list(journal.outputs(job_id, after, limit=REPLAY_BATCH))
            row = journal.job(job_id)
            if outputs and row is not None:
                for output in outputs:
                    if peer.outbound.queued >= window:
                        break
                    peer.output(output, row.fed)
                    peer.replaying[job_id] = output.seq
                continue
            del peer.replaying[job_id]
            if row is not None and self.server.attach_stored(job_id, peer, after):
                peer.attached.add(job_id)

    def _query(self, peer: ClientPeer, header: dict[str, Any]) -> dict[str, Any]:
        journal = self.server.journal
        if header["what"] == "jobs":
            rows = journal.jobs(None if peer.admin else peer.principal.name, header.get("state"))
            return {"jobs": [row.summary() for row in rows]}
        if header["what"] == "job":
            job_id = header.get("job")
            row = journal.job(job_id) if type(job_id) is int else None
            if row is None or not self._may_see(peer, row.owner):
                return {"error": _unknown(job_id, self.server)}
            return {"job": row.summary()}
        if header["what"] == "fleet":
            return {"workers": list(self.server.peers), **self.capacity()}
        return {"error": f"unknown query {header['what']!r} (expected jobs, job or fleet)"}

    def _running(self, peer: ClientPeer, job_id: int) -> StoredJob | None:
        """The client's running job ``job_id``; None if it is over (messages crossing its end are ignored).
        ProtocolError if the client has no such job at all."""
        stored = self.server.stored.get(job_id)
        if stored is not None and self._may_see(peer, stored.owner):
            return stored
        row = self.server.journal.job(job_id)
        if row is None or not self._may_see(peer, row.owner):
            raise ProtocolError(f"no job {job_id} of {peer.principal.name}")
        return None

    def _may_see(self, peer: ClientPeer, owner: str) -> bool:
        return authorize(peer.principal, Action.SEE_JOB, owner)

    def revoke(self, revoked: list[Principal]) -> None:
        """Close the connections of clients whose token was just revoked (their jobs follow the grace rule)."""
        for peer in revoked_connections(((p, p.principal) for p in self.peers.values()), revoked):
            log.warning("client %s (%s): its token was revoked, disconnecting it", peer.client_id,
                        peer.principal.name, extra={"client": peer.client_id})
            self._drop(peer)
            asyncio.ensure_future(peer.ws.close(CloseCode.AUTH_FAILED, "token revoked"))

    # -- clock -----------------------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Drop clients silent for longer than the heartbeat timeout; cancel the jobs of clients gone for longer
        than the grace period (not detached ones)."""
        for peer in list(self.peers.values()):
            if now - peer.last_heard > self.server.heartbeat_timeout:
                log.warning("client %s silent for %.0fs: dropping it", peer.client_id, now - peer.last_heard,
                            extra={"client": peer.client_id})
                self._drop(peer)
                peer.ws.transport.abort()
            elif peer.outbound.stalled(now, self.server.heartbeat_timeout):
                log.warning("client %s has read nothing for %.0fs: dropping it", peer.client_id,
                            self.server.heartbeat_timeout, extra={"client": peer.client_id})
                self._drop(peer)
                peer.ws.transport.abort()
        for stored in list(self.server.stored.values()):
            orphaned = stored.orphaned_at
            if orphaned is not None and now - orphaned > self.client_grace and (
                    not stored.detached or not stored.input_closed):
                log.warning("job %s: its client has been gone for %.0fs, cancelling it", stored.id, now - orphaned,
                            extra={"job": stored.id})
                self.server.cancel_job(stored.id)


def _unknown(job_id: Any, server: ForemanServer) -> str:
    hint = "" if server.journal.persistent else " (this foreman keeps no journal across restarts: no --data-dir)"
    return f"no job {job_id} of yours on this foreman{hint}"
