"""The client's side of a standalone foreman: ``Foreman.connect("ws://host:9000", token=...)``.

:class:`RemoteBackend` offers the calls :mod:`foreman.jobs` makes of an embedded server (``add_job``,
``add_batch``, ``close_input``, ``cancel_job``, ``capacity``...) over one WebSocket to the foreman, on the
``Foreman``'s event-loop thread. It reconnects with backoff when the connection drops and picks its jobs up where
they were: each job's input batches are kept until the foreman confirms it has them (the ``fed`` count in its
OUTPUT and ATTACHED messages) and sent again after a reconnect; each result batch carries a sequence number, so
results the foreman sends again are recognised and dropped. Nothing computed is lost, nothing is delivered twice.

A job has a negative local id until the foreman's ACCEPTED gives its real one; the sink's ``id`` is then updated.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import sys
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cloudpickle
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from foreman import protocol, tls
from foreman.errors import (
    AuthenticationError,
    ForemanClosedError,
    ProtocolError,
    rebuild_failure,
)
from foreman.jobs import placement_to_json
from foreman.local_link import handle_each
from foreman.outbound import Outbound
from foreman.protocol import Kind
from foreman.retry import backoff_delay
from foreman.serialization import Pickled

if TYPE_CHECKING:
    from foreman.server import JobSink
    from foreman.validation import Policy

log = logging.getLogger("crowdcompute.client")

#: Results acknowledged at once: the foreman keeps unacknowledged results of a job (in its journal) until then.
ACK_EVERY = 8


@dataclass(eq=False)
class _RemoteJob:
    ref: int
    sink: JobSink
    submit: dict[str, Any]
    function: bytes
    job_id: int | None = None
    retained: deque[tuple[int, int, bytes]] = field(default_factory=deque)  # input not confirmed received
    sent: int = 0  # tasks of input sent on this connection
    fed: int = 0  # tasks of input the foreman confirmed
    input_closed: bool = False
    end_sent: bool = False  # INPUT_END sent on this connection
    cancelled_batches: deque[int] = field(default_factory=deque)  # starts of batches to cancel, once sent
    cancel: bool = False
    failed: str | None = None  # cancelled because a task failed (a map that raised): the job ends failed
    max_seq: int = 0  # results received up to here
    acked: int = 0
    accepted: asyncio.Future[int] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class RemoteBackend:
    """One client connection to a standalone foreman (see the module docstring). All methods run on the loop.

    Argument batches are framed per task (``framed_input``): an INPUT payload, and the foreman's journal, hold
    one pickle per task, so the foreman can split them without unpickling a client's arguments.

    :param address: ``ws://host:port`` (``wss://`` for TLS) of the foreman.
    :param token: a client token of the foreman's token file, or its admin token.
    :param ssl_context: for ``wss://`` (see :func:`foreman.tls.client_context`).
    :param fingerprint: the pinned fingerprint of a ``wss://`` foreman's certificate, checked before the token
        is sent.
    :param heartbeat_interval: seconds between heartbeats; a foreman silent for 3 of them is reconnected to.
    :param reconnect_max_delay: cap of the exponential backoff between reconnection attempts.
    :param trust_workers: load results with full pickle; False (the default) with the restricted loader of
        :mod:`foreman.safe_pickle`. The client's own policy: the foreman's WELCOME does not change it.
    """

    def __init__(self, address: str, token: str | None, ssl_context: ssl.SSLContext | None = None,
                 fingerprint: str | None = None, heartbeat_interval: float = 5.0,
                 reconnect_max_delay: float = 10.0, trust_workers: bool = False) -> None:
        self.address = address
        self.token = token
        self.ssl_context = ssl_context
        self.fingerprint = fingerprint
        self.heartbeat_interval = heartbeat_interval
        self.reconnect_max_delay = reconnect_max_delay
        self.client_id = uuid.uuid4().hex
        self.capacity = 0
        self.slots = 0
        self.max_message_size = protocol.DEFAULT_MAX_MESSAGE_SIZE
        self.out_of_band = False
        self.framed_input = True  # INPUT is framed per task: the foreman splits it without unpickling
        self.trust_workers = trust_workers  # ours to choose: WELCOME's trust_workers is never taken
        self.principal = ""
        self.admin = False
        self.jobs: dict[int, _RemoteJob] = {}  # by local ref and, once known, by job id
        self._refs = 0
        self._queries: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ws: ClientConnection | None = None
        self._outbound: Outbound | None = None
        self._ready: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._failed: BaseException | None = None  # what ended the connection for good (see _fatal)
        self._last_heard = 0.0

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect; raises what stops the first connection (a refused token, a foreman that is not there)."""
        self._ready = asyncio.get_running_loop().create_future()
        self._runner = asyncio.create_task(self._run())
        await self._ready

    async def close(self) -> None:
        """Close the connection; jobs still running fail with ForemanClosedError (they go on on the foreman
        until their client's grace period is over, detached ones to the end)."""
        self._closing = True
        for job in set(self.jobs.values()):
            job.sink.aborted(ForemanClosedError(f"the connection to {self.address} was closed before job "
                                                f"{job.job_id} finished"))
        self.jobs.clear()
        if self._ws is not None:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except (asyncio.CancelledError, Exception):
                pass

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            try:
                async with connect(self.address, max_size=self.max_message_size, compression=None,
                                   ping_interval=None, ssl=self.ssl_context, open_timeout=10) as ws:
                    attempt = 0
                    await self._serve(ws)
                    if ws.close_code in protocol.FATAL_CLOSE_CODES:
                        self._fatal(AuthenticationError(f"the foreman refused this client: {ws.close_reason}"))
                        return
            except AuthenticationError as exc:
                self._fatal(exc)
                return
            except (OSError, ConnectionClosed, InvalidHandshake, asyncio.TimeoutError, ProtocolError) as exc:
                if isinstance(exc, ConnectionClosed) and exc.rcvd and exc.rcvd.code in protocol.FATAL_CLOSE_CODES:
                    self._fatal(AuthenticationError(f"the foreman refused this client: {exc.rcvd.reason}"))
                    return
                if self._ready is not None and not self._ready.done():
                    self._ready.set_exception(ConnectionError(f"cannot reach the foreman at {self.address}: "
                                                              f"{type(exc).__name__}: {exc}"))
                    return
                log.warning("connection to the foreman lost (%s); reconnecting", exc)
            except Exception as exc:  # anything else must end the jobs and start(), not leave them waiting
                log.exception("the connection to the foreman at %s failed", self.address)
                self._fatal(ConnectionError(f"the connection to the foreman at {self.address} failed: "
                                            f"{type(exc).__name__}: {exc}"))
                return
            self._ws = None
            if self._closing:
                return
            await asyncio.sleep(backoff_delay(attempt, self.reconnect_max_delay))
            attempt += 1

    def _fatal(self, error: BaseException) -> None:
        self._failed = error
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(error)
        for job in set(self.jobs.values()):
            job.sink.aborted(error)
        self.jobs.clear()

    async def _serve(self, ws: ClientConnection) -> None:
        if self.fingerprint is not None:
            actual = tls.fingerprint(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
            if actual != self.fingerprint:
                ws.transport.abort()
                raise AuthenticationError(f"the foreman at {self.address} presented a certificate with fingerprint "
                                          f"{actual}, not the pinned {self.fingerprint}; not sending the token")
        await ws.send(protocol.encode(Kind.CONNECT, {
            "protocol": protocol.PROTOCOL_VERSION, "client": self.client_id, "token": self.token,
            "python": ".".join(map(str, sys.version_info[:3])), "cloudpickle": cloudpickle.__version__}))
        welcome = protocol.decode(await asyncio.wait_for(ws.recv(), 30), self.max_message_size)
        if welcome.kind is not Kind.WELCOME:
            raise ProtocolError(f"expected WELCOME, got {welcome.kind.name}")
        header = welcome.header
        self.max_message_size = header["max_message_size"]
        self.principal, self.admin = str(header.get("principal", "")), bool(header.get("admin", False))
        self.heartbeat_interval = min(self.heartbeat_interval, float(header["heartbeat_interval"]))
        self._capacity(header)
        self._ws = ws
        self._outbound = outbound = Outbound(ws)
        self._last_heard = time.monotonic()
        for job in set(self.jobs.values()):  # pick up where the last connection left off
            job.sent = job.fed
            job.end_sent = False
            if job.job_id is None:
                self._send(Kind.SUBMIT, job.submit, job.function)
            else:
                self._send(Kind.ATTACH, {"job": job.job_id, "after": job.max_seq})
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        helpers = [asyncio.create_task(self._heartbeats(ws)), asyncio.create_task(outbound.run())]
        try:
            await handle_each(ws, self._on_frame)
        finally:
            for helper in helpers:
                helper.cancel()
            self._ws = None
            self._outbound = None
            for future in self._queries.values():
                if not future.done():
                    future.set_exception(ConnectionError("the connection to the foreman was lost"))
            self._queries.clear()

    async def _heartbeats(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            if time.monotonic() - self._last_heard > 3 * self.heartbeat_interval:
                log.warning("the foreman is silent: dropping the connection")
                ws.transport.abort()
                return
            self._send(Kind.HEARTBEAT, {})

    def _send(self, kind: Kind, header: dict[str, Any], payload: bytes | memoryview = b"") -> None:
        """Queue a message for this connection, in order; dropped if there is none (a reconnect sends again
        what matters)."""
        if self._outbound is not None:
            self._outbound.send(protocol.encode(kind, header, payload))

    # -- the backend calls (see foreman.jobs) ----------------------------------------------------------------

    def add_job(self, digest: str, function: bytes, call: str, sink: JobSink, name: str = "?",
                total: int | None = None, requires: frozenset[str] = frozenset(),
                resources: dict[str, float] | None = None, priority: int = 0, task_timeout: float | None = None,
                detached: bool = False, validation: Policy | None = None) -> int:
        if self._failed is not None:  # nothing would ever send it: say so instead of waiting forever
            raise ConnectionError(f"the connection to the foreman at {self.address} has ended: {self._failed}")
        placement = {"requires": requires, "resources": resources or {}, "priority": priority,
                     "task_timeout": task_timeout, "validation": validation}
        options = placement_to_json(placement)  # before anything is sent: ValueError for a comparator
        self._refs += 1
        ref = -self._refs
        submit = {"ref": ref, "name": name, "digest": digest, "call": call, "detached": detached,
                  "options": options, "total": total}
        self.jobs[ref] = _RemoteJob(ref, sink, submit, function)
        self._send(Kind.SUBMIT, submit, function)
        return ref

    def add_batch(self, job_id: int, start: int, count: int, payload: Pickled) -> None:
        if not payload.framed:
            raise ValueError("a remote foreman takes argument batches framed per task (framed_input)")
        job = self.jobs.get(job_id)
        if job is not None:
            job.retained.append((start, count, payload.data))
            self._flush(job)

    def close_input(self, job_id: int) -> None:
        job = self.jobs.get(job_id)
        if job is not None:
            job.input_closed = True
            self._flush(job)

    def cancel_job(self, job_id: int, failed: str | None = None) -> bool:
        job = self.jobs.get(job_id)
        if job is None:
            return False
        job.cancel = True
        job.failed = failed
        self._flush(job)
        return True

    def cancel_batch(self, job_id: int, start: int) -> None:
        """One batch of a job (a ``submit`` call) never runs, or is killed; sent after its INPUT, so the input
        stays contiguous."""
        job = self.jobs.get(job_id)
        if job is not None:
            job.cancelled_batches.append(start)
            self._flush(job)

    async def accepted(self, job_id: int) -> int:
        """The foreman's id of a job once it accepted it (raises why it refused it)."""
        return await self.jobs[job_id].accepted

    def attach(self, job_id: int, sink: JobSink) -> None:
        """Receive an existing job's results (all that are kept) and its end."""
        self._refs += 1
        job = _RemoteJob(-self._refs, sink, {}, b"", job_id=job_id, input_closed=True)
        job.accepted.set_result(job_id)
        self.jobs[job_id] = job
        self._send(Kind.ATTACH, {"job": job_id, "after": 0})

    async def query(self, what: str, **fields: Any) -> dict[str, Any]:
        """Ask the foreman about jobs (``jobs``, ``job``) or the fleet; raises what it answers as an error."""
        if self._outbound is None:
            raise ConnectionError(f"not connected to the foreman at {self.address}")
        self._refs += 1
        future = self._queries[self._refs] = asyncio.get_running_loop().create_future()
        self._send(Kind.QUERY, {"ref": self._refs, "what": what, **fields})
        reply = await future
        if reply.get("error"):
            raise LookupError(reply["error"])
        return reply

    def _flush(self, job: _RemoteJob) -> None:
        """Send what this job has that the foreman has not, once it has an id and a connection."""
        if job.job_id is None or self._outbound is None:
            return
        if job.cancel:
            self._send(Kind.ABORT, {"job": job.job_id, **({"failed": job.failed} if job.failed else {})})
            return
        for start, count, payload in job.retained:
            if start >= job.sent:
                self._send(Kind.INPUT, {"job": job.job_id, "start": start, "count": count}, payload)
                job.sent = start + count
        while job.cancelled_batches and job.cancelled_batches[0] < job.sent:
            self._send(Kind.ABORT, {"job": job.job_id, "start": job.cancelled_batches.popleft()})
        if job.input_closed and not job.end_sent:
            job.end_sent = True
            self._send(Kind.INPUT_END, {"job": job.job_id})

    # -- messages from the foreman ---------------------------------------------------------------------------

    def _on_frame(self, data: bytes | bytearray) -> None:
        self._last_heard = time.monotonic()
        self._on_message(protocol.decode(data, self.max_message_size))

    def _on_message(self, msg: protocol.Message) -> None:
        kind, header = msg.kind, msg.header
        if kind is Kind.OUTPUT:
            self._on_output(header, msg.payload)
        elif kind is Kind.ACCEPTED:
            self._on_accepted(header)
        elif kind is Kind.ATTACHED:
            self._on_attached(header)
        elif kind is Kind.JOB_END:
            self._on_end(header)
        elif kind is Kind.HEARTBEAT:
            self._capacity(header)
        elif kind is Kind.REPLY:
            future = self._queries.pop(header["ref"], None)
            if future is not None and not future.done():
                future.set_result(header)
        else:
            raise ProtocolError(f"unexpected {kind.name} from the foreman")

    def _on_accepted(self, header: dict[str, Any]) -> None:
        job = self.jobs.get(header["ref"])
        if job is None:
            return
        if header.get("error") or type(header.get("job")) is not int:
            error = ValueError(f"the foreman refused the job: {header.get('error')}")
            del self.jobs[job.ref]
            job.accepted.set_exception(error)
            job.sink.aborted(error)
            return
        job.job_id = header["job"]
        self.jobs[job.job_id] = job
        if hasattr(job.sink, "id"):
            job.sink.id = job.job_id  # type: ignore[attr-defined]
        if not job.accepted.done():
            job.accepted.set_result(job.job_id)
        self._flush(job)

    def _on_attached(self, header: dict[str, Any]) -> None:
        job = self.jobs.get(header["job"])
        if job is None:
            return
        if header.get("error"):
            self._forget(job)
            job.sink.aborted(ForemanClosedError(str(header["error"])))
            return
        self._confirmed(job, int(header.get("fed", 0)))
        job.sent = job.fed
        self._flush(job)

    def _on_output(self, header: dict[str, Any], payload: memoryview | bytes) -> None:
        job = self.jobs.get(header["job"])
        if job is None or header["seq"] <= job.max_seq:
            return  # sent again after a reconnect: already delivered
        job.max_seq = header["seq"]
        self._confirmed(job, header["fed"])
        if header["status"] == protocol.STATUS_OK:
            job.sink.deliver(header["start"], header["count"], bytes(payload), float(header.get("elapsed", 0)),
                             str(header.get("worker")))
        else:
            job.sink.fail(header["start"], header["count"], rebuild_failure(header.get("error")))
        if job.max_seq - job.acked >= ACK_EVERY:
            self._ack(job)

    def _on_end(self, header: dict[str, Any]) -> None:
        job = self.jobs.get(header["job"])
        if job is None:
            return
        self._ack(job)
        self._forget(job)
        state = header["state"]
        if state == protocol.JOB_FAILED_STATE:
            job.sink.aborted(ForemanClosedError(f"job {header['job']} failed on the foreman: {header.get('error')}"))
        else:
            job.sink.finished(state == protocol.JOB_CANCELLED_STATE)

    def _ack(self, job: _RemoteJob) -> None:
        if job.job_id is not None and job.max_seq > job.acked:
            job.acked = job.max_seq
            self._send(Kind.ACK, {"job": job.job_id, "seq": job.max_seq})

    def _confirmed(self, job: _RemoteJob, fed: int) -> None:
        job.fed = max(job.fed, fed)
        while job.retained and job.retained[0][0] + job.retained[0][1] <= job.fed:
            job.retained.popleft()

    def _forget(self, job: _RemoteJob) -> None:
        self.jobs.pop(job.ref, None)
        if job.job_id is not None:
            self.jobs.pop(job.job_id, None)

    def _capacity(self, header: dict[str, Any]) -> None:
        self.capacity = int(header.get("capacity", self.capacity))
        self.slots = int(header.get("slots", self.slots))

