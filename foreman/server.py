"""The foreman's asyncio shell: WebSocket connections in, scheduler decisions out.

All scheduling decisions are the :class:`~foreman.scheduler.Scheduler`'s; this module authenticates peers, turns
frames into scheduler events, and sends what the scheduler decides. Every method here runs on the foreman's
event loop; :mod:`foreman.client` crosses into it from user threads with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import ssl
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from foreman import outbound, protocol
from foreman.admission import Admission, GuardedConnection, guarded, revoked_connections, worker_id_refusal
from foreman.auth import Authenticator, Principal, RefusalLimiter
from foreman.clients import ClientService
from foreman.errors import ForemanClosedError, ProtocolError, SerializationError, TaskLostError
from foreman.fleet import Fleet
from foreman.jobs import placement_from_json
from foreman.journal import RUNNING, Journal
from foreman.local_link import LocalConnection, LocalServer, handle_each
from foreman.outbound import Outbound
from foreman.permissions import Action, authorize, host_allowed, origin_allowed, refusal
from foreman.protocol import CloseCode, Kind
from foreman.checkpoints import Checkpoints
from foreman.scheduler import Assignment, Failure, Scheduler
from foreman.serialization import ENV_FINGERPRINT, JOBS_ENV, Pickled, function_digest
from foreman.stored import StoredJob, Subscriber
from foreman.trust import Trust
from foreman.validation import Policy

if TYPE_CHECKING:
    from foreman.http import HttpServer

log = logging.getLogger("crowdcompute.foreman")
#: Seconds a timer is set past its moment: asyncio may run one up to its clock's resolution early (15.6 ms on some
#: Windows clocks), and a timer that finds nothing due yet would be set again for the same instant.
_TIMER_SLACK = 0.002

#: Seconds a new connection has to send its HELLO. Bounds what a silent peer can hold.
HANDSHAKE_TIMEOUT = 10.0
#: Messages a worker may send per second before its connection is closed. Batching keeps honest workers far
#: below this; it bounds what a flood can cost the foreman.
MAX_MESSAGES_PER_SECOND = 5_000


class JobSink(Protocol):
    """Receives a job's outcomes on the event loop (implemented by :mod:`foreman.jobs`)."""

    def deliver(self, start: int, count: int, payload: bytes | memoryview, elapsed: float, worker: str) -> None:
        ...

    def fail(self, start: int, count: int, error: BaseException) -> None: ...

    def aborted(self, error: BaseException) -> None: ...

    def starting(self, start: int) -> bool:
        """The batch at ``start`` is about to be sent for the first time; False cancels that batch instead."""
        ...

    def finished(self, cancelled: bool) -> None: ...


@dataclass(eq=False)
class _JobRecord:
    id: int
    digest: str
    function: bytes
    call: str
    sink: JobSink
    task_timeout: float | None = None
    validation: Policy | None = None  # redundancy / spot checks; None: the first result is taken
    wants_gpu: bool = False  # asked for a GPU (credit counts GPU-seconds)


#: A worker's or client's connection: WebSocket, or a local link from a worker this foreman started.
Link = ServerConnection | LocalConnection


@dataclass(eq=False)
class Peer:
    """One connected worker."""

    worker_id: str
    ws: Link
    hello: dict[str, Any]
    principal: Principal
    connected_at: float = field(default_factory=time.time)
    leaving: bool = False  # said DRAIN: its close is clean
    outbound: Outbound = field(init=False)

    def __post_init__(self) -> None:
        self.outbound = Outbound(self.ws, outbound.SEND_QUEUE_LIMIT)

    def send(self, data: bytes | protocol.Parts) -> None:
        self.outbound.send(data)


class ForemanServer:
    """Accepts workers, runs the scheduler against them, and reports outcomes to job sinks.

    :param auth: who may connect (see :mod:`foreman.auth`); with no token at all any worker is accepted
        (keep the foreman on localhost then).
    :param heartbeat_interval: how often workers are told to send a heartbeat.
    :param heartbeat_timeout: a worker silent this long is declared lost and its tasks reassigned.
    :param max_message_size: largest frame accepted from a peer; bounds memory per connection.
    :param max_task_losses: see :class:`~foreman.scheduler.Scheduler`.
    :param speculation: see :class:`~foreman.scheduler.Scheduler` (None: no speculative copies).
    :param trust_workers: load workers' results with full pickle. False: a restricted loader that only
        rebuilds plain data (see :mod:`foreman.safe_pickle`), for fleets of strangers.
    :param http_port: serve the dashboard, JSON API and metrics on this port (0: any free one); None: no HTTP.
        A browser that opens the WebSocket port is redirected there.
    :param ssl_context: serve ``wss://`` (and the dashboard over https) with it (see :mod:`foreman.tls`).
    :param journal: where stored jobs (remote clients', detached ones) and the worker history are kept (see
        :mod:`foreman.journal`); default in memory. With a file, a restarted foreman resumes its stored jobs.
    :param client_grace: seconds a remote client may be gone before its (not detached) jobs are cancelled.
    :param recovery_window: after a restart, seconds the resumed jobs' batches wait for the workers that held them
        to reconnect and hand in their work before running anywhere (default: the heartbeat timeout).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9000, auth: Authenticator | None = None,
                 heartbeat_interval: float = 5.0, heartbeat_timeout: float = 30.0,
                 max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE, max_task_losses: int = 3,
                 speculation: float | None = 3.0,
                 http_port: int | None = None, trust_workers: bool = True,
                 ssl_context: ssl.SSLContext | None = None, journal: Journal | None = None,
                 client_grace: float = 300.0, recovery_window: float | None = None) -> None:
        if heartbeat_interval <= 0 or heartbeat_timeout <= heartbeat_interval:
            raise ValueError("need 0 < heartbeat_interval < heartbeat_timeout")
        self.host = host
        self.port = port
        self.auth = auth or Authenticator()
        self.refusals = RefusalLimiter()
        self.admission = Admission()  # connection caps and pre-authentication limits (see foreman.admission)
        self.max_messages_per_second = MAX_MESSAGES_PER_SECOND
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.max_message_size = max_message_size
        self.out_of_band = True  # argument batches may carry out-of-band buffers (stored jobs' do not)
        self.framed_input = False  # in-process jobs' batches are one pickled list (stored jobs' are framed)
        self.http_port = http_port
        self.trust_workers = trust_workers
        self.ssl_context = ssl_context
        self.http: HttpServer | None = None
        self.scheduler = Scheduler(time.monotonic, heartbeat_timeout, max_task_losses=max_task_losses,
                                   speculation=speculation)
        self.peers: dict[str, Peer] = {}
        self.jobs: dict[int, _JobRecord] = {}
        self.journal = journal or Journal()
        self.session = self.journal.session()
        self.stored: dict[int, StoredJob] = {}
        self.clients = ClientService(self, client_grace)
        self.recovery_window = heartbeat_timeout if recovery_window is None else recovery_window
        self._awaited: set[str] = set()  # after a restart: workers that may still hold resumed jobs' batches
        self._server: Server | None = None
        self._local_server: LocalServer | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._speculation_timer: asyncio.TimerHandle | None = None  # see _arm_speculation
        self._waiting_logged: set[int] = set()
        self._tick_errors: dict[str, str] = {}  # tick step -> its last error logged (each logged once)
        self._loop_lag = 0.0  # seconds the ticker recently woke late: the loop's own delay in reading heartbeats
        self.closing = False
        self.fleet = Fleet()
        self.checkpoints = Checkpoints()  # job -> task -> latest saved state (pickled), of trusted workers only
        self._untrusted_checkpoints: set[str] = set()  # workers whose dropped checkpoints were logged
        self.trust = Trust(self)
        self.bytes_in = 0
        self._bytes_out_gone = 0  # sent to peers no longer connected

    @property
    def bytes_out(self) -> int:
        return self._bytes_out_gone + sum(peer.outbound.sent for peer in self.peers.values())

    @property
    def address(self) -> str:
        """The ``ws://host:port`` (with TLS, ``wss://``) address workers dial."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'wss' if self.ssl_context else 'ws'}://{host}:{self.port}"

    @property
    def capacity(self) -> int:
        """Batches all connected workers may hold (a feeder keeps a few times this many in flight)."""
        return self.scheduler.capacity

    @property
    def slots(self) -> int:
        """Tasks all connected workers run at once."""
        return self.scheduler.slots

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, max_size=self.max_message_size,
                                   compression=None, ping_interval=None, open_timeout=HANDSHAKE_TIMEOUT,
                                   close_timeout=2, process_request=self._plain_http, ssl=self.ssl_context,
                                   create_connection=guarded(self.admission))
        self.port = self._server.sockets[0].getsockname()[1]
        self._resume_stored_jobs()
        self._load_state()
        self._ticker = asyncio.create_task(self._tick_forever())

    async def start_local(self) -> str:
        """Listen for the workers started on this machine on a Unix socket (a private one), and return the
        ``unix:`` address they dial: a leaner link than WebSocket for the same messages (see
        :mod:`foreman.local_link`)."""
        if self._local_server is None:
            self._local_server = LocalServer(self._handle, self.max_message_size)
            await self._local_server.start()
        return self._local_server.address

    async def start_http(self) -> None:
        """Serve the dashboard and API, if an HTTP port was given. Separate from :meth:`start` so that workers
        can be started while FastAPI imports (it takes a while)."""
        if self.http_port is None:
            return
        http = await asyncio.to_thread(importlib.import_module, "foreman.http")
        self.http = http.HttpServer(self, self.host, self.http_port, self.ssl_context)
        self.http.start()
        log.info("dashboard at %s", self.http.url)

    def _plain_http(self, connection: ServerConnection, request: Request) -> Response | None:
        """A browser opening the WebSocket address is sent to the dashboard. Refused: a request to a loopback
        foreman under a name that is not loopback (DNS rebinding), and a browser page of another site opening a
        WebSocket here (see :mod:`foreman.permissions`)."""
        host = request.headers.get("Host")
        if not host_allowed(host, self.host):
            return connection.respond(HTTPStatus.FORBIDDEN, "CrowdCompute foreman: unknown Host\n")
        own_ports = (self.port,) + ((self.http.port,) if self.http is not None else ())
        if not origin_allowed(request.headers.get("Origin"), host, own_ports):
            return connection.respond(HTTPStatus.FORBIDDEN, "CrowdCompute foreman: cross-site request refused\n")
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None
        if self.http is None:
            return connection.respond(HTTPStatus.UPGRADE_REQUIRED,
                                      "CrowdCompute foreman: workers connect here over WebSocket.\n")
        host = (host or self.host).rsplit(":", 1)[0]
        path = request.path.split("?", 1)[0]  # a token in the address stays out of the dashboard's
        location = f"{'https' if self.ssl_context else 'http'}://{host}:{self.http.port}{path}"
        response = connection.respond(HTTPStatus.FOUND, f"The dashboard is at {location}\n")
        response.headers["Location"] = location
        return response

    def abort_jobs(self) -> None:
        """Fail every unfinished job with ForemanClosedError and stop its tasks on the workers. Stored jobs in a
        persistent journal are kept: the next run of the foreman resumes them."""
        for job_id, record in list(self.jobs.items()):
            if job_id in self.stored and self.journal.persistent:
                continue
            record.sink.aborted(ForemanClosedError(f"the foreman shut down before job {job_id} finished"))
            self.cancel_job(job_id)

    async def close(self) -> None:
        self.closing = True
        if self._ticker is not None:
            self._ticker.cancel()
        if self._speculation_timer is not None:
            self._speculation_timer.cancel()
        self.abort_jobs()
        if self.http is not None:
            await self.http.close()
        if self._server is not None:
            self._server.close(close_connections=False)
            if self._local_server is not None:
                self._local_server.stop_accepting()
            # Together: a silent peer takes the whole close timeout, and they must not queue behind each other.
            # Workers drop their work for a foreman that is gone, but keep it for one that resumes stored jobs.
            code = CloseCode.GOING_AWAY if self.stored and self.journal.persistent else CloseCode.SHUTTING_DOWN
            await asyncio.gather(*(peer.ws.close(code, "foreman shutting down")
                                   for peer in list(self.peers.values())),
                                 *(client.ws.close(CloseCode.GOING_AWAY, "foreman shutting down")
                                   for client in list(self.clients.peers.values())))
            await self._server.wait_closed()
            if self._local_server is not None:
                await self._local_server.close()
        self._save_state()
        self.journal.close()

    # -- jobs (called on the loop by the client layer) --------------------------------------------------------

    def add_job(self, digest: str, function: bytes, call: str, sink: JobSink, name: str = "?",
                total: int | None = None, requires: frozenset[str] = frozenset(),
                resources: dict[str, float] | None = None, priority: int = 0,
                task_timeout: float | None = None, owner: str = "", job_id: int | None = None,
                held_until: float = 0.0, validation: Policy | None = None) -> int:
        if task_timeout is not None and task_timeout <= 0:
            raise ValueError("task_timeout must be > 0")
        digest = function_digest(function)  # workers cache functions by it: never a client's word for it
        job = self.scheduler.add_job(ENV_FINGERPRINT, frozenset(requires), resources, priority, owner, job_id,
                                     held_until, validation.redundancy if validation else 1,
                                     validation.spot_check if validation else 0.0)
        wants_gpu = bool(requires & {"gpu", "cuda"}) or (resources or {}).get("gpu", 0) > 0
        self.jobs[job.id] = _JobRecord(job.id, digest, function, call, sink, task_timeout, validation=validation,
                                       wants_gpu=wants_gpu)
        self.fleet.job_added(time.time(), job.id, name, total, owner)
        return job.id

    def add_stored_job(self, owner: str, name: str, digest: str, call: str, function: bytes,
                       options: dict[str, Any], total: int | None, detached: bool) -> StoredJob:
        """A job whose results the journal keeps for its client (a remote client's, or a detached one).
        ``options``: the placement options of :class:`~foreman.jobs.JobOptions`, JSON-able."""
        placement = placement_from_json(options)
        digest = function_digest(function)  # the client's SUBMIT names one; the foreman computes its own
        self.scheduler.skip_job_ids(self.journal.last_job_id())
        job_id = self.scheduler.next_job_id
        self.journal.add_job(job_id, owner, name, digest, call, function, options, total, detached)
        row = self.journal.job(job_id)
        assert row is not None
        stored = self.stored[job_id] = StoredJob(row, self.journal, self.clients.quota)
        self.add_job(digest, function, call, stored, name, total, owner=owner, job_id=job_id, **placement)
        return stored

    def add_stored_input(self, job_id: int, start: int, count: int, payload: bytes | memoryview) -> None:
        """Journal a batch of a stored job's input (framed per task, checked), then queue it. A batch already
        received (a client resending after a reconnect) is ignored; ValueError for one that leaves a gap or is not
        framed per task (the foreman never unpickles a client's arguments: it splits them by their frames)."""
        try:
            protocol.check_framed(Kind.INPUT, count, payload)
        except ProtocolError as exc:
            raise ValueError(str(exc)) from None
        if self.stored[job_id].add_input(start, count, payload):
            self.add_batch(job_id, start, count, Pickled(bytes(payload), framed=True))

    def close_stored_input(self, job_id: int) -> None:
        stored = self.stored[job_id]
        if not stored.input_closed:
            stored.close_input()
            self.close_input(job_id)

    def attach_stored(self, job_id: int, subscriber: Subscriber, after: int = 0) -> bool:
        """Send ``subscriber`` a stored job's results after ``after``, then its end: as they come while the job
        runs (True), or at once from the journal if it is over (False)."""
        stored = self.stored.get(job_id)
        if stored is not None:
            stored.attach(subscriber, after)
            return True
        row = self.journal.job(job_id)
        assert row is not None
        for output in self.journal.outputs(job_id, after):
            subscriber.output(output, row.fed)
        subscriber.ended(row)
        return False

    def _persisted_parts(self) -> dict[str, Any]:
        return {"credit": self.trust.ledger, "reputation": self.trust.reputation}

    def _load_state(self) -> None:
        """Credit and reputations (bans included) as the journal kept them."""
        for name, part in self._persisted_parts().items():
            state = self.journal.load_state(name)
            if state is not None:
                part.restore(state)

    def _save_state(self) -> None:
        if self.journal.persistent:
            for name, part in self._persisted_parts().items():
                self.journal.save_state(name, part.snapshot())

    def _resume_stored_jobs(self) -> None:
        """Bring back the journal's running jobs after a restart. Their batches wait (``recovery_window``) for
        the workers that held them, which hand in what they ran on or finished meanwhile (see _adopt)."""
        rows = self.journal.jobs(state=RUNNING)
        self.scheduler.skip_job_ids(self.journal.last_job_id())
        self._awaited = self.journal.connected_workers() if rows else set()
        self.journal.all_disconnected()
        held_until = time.monotonic() + self.recovery_window if self._awaited else 0.0
        for row in sorted(rows, key=lambda r: r.id):
            stored = StoredJob(row, self.journal, self.clients.quota)
            stored.orphaned_at = time.monotonic()  # until its client attaches again
            self.stored[row.id] = stored
            self.add_job(row.digest, row.function, row.call, stored, row.name, row.total, owner=row.owner,
                         job_id=row.id, held_until=held_until, **placement_from_json(row.options))
            inputs = self.journal.inputs(row.id)
            for start, count, payload in inputs:
                try:
                    protocol.check_framed(Kind.INPUT, count, payload)
                except ProtocolError:  # journaled by a foreman of protocol 3 or older: never unpickled here
                    stored.fail(start, count, SerializationError(
                        "this input was journaled by an older foreman, before arguments were framed per task; "
                        "submit the job again"))
                    continue
                self.scheduler.add_batch(row.id, start, count, Pickled(payload, framed=True))
                stored.resumed_input(start, count, len(payload))
            log.info("job %s of %s resumed from the journal: %s batches to run, %s tasks done",
                     row.id, row.owner, len(inputs), row.tasks_done, extra={"job": row.id})
            if row.input_closed:
                self.close_input(row.id)

    def add_batch(self, job_id: int, start: int, count: int, payload: Pickled) -> None:
        if job_id in self.jobs:
            self.scheduler.add_batch(job_id, start, count, payload)
            self._pump()

    def close_input(self, job_id: int) -> None:
        if job_id in self.jobs:
            self.scheduler.close_input(job_id)
            self._maybe_finish(job_id)

    def cancel_job(self, job_id: int, failed: str | None = None) -> bool:
        """Queued tasks never run; running ones are killed on their workers. False if no such running job.
        ``failed``: its client stopped it because a task failed (a ``map`` that raised): a stored job ends
        ``failed`` with this reason, not ``cancelled``."""
        if job_id not in self.jobs:
            return False
        if failed is not None and job_id in self.stored:
            self.stored[job_id].failure = failed
        # One CANCEL per worker for the whole job: the worker drops its queued batches before killing running
        # ones, so a batch queued behind a killed one never starts.
        for worker_id in {worker_id for worker_id, _ in self.scheduler.cancel_job(job_id)}:
            peer = self.peers.get(worker_id)
            if peer is not None:
                peer.send(protocol.encode(Kind.CANCEL, {"job": job_id}))
        self._maybe_finish(job_id)
        self._pump()
        return True

    def cancel_batch(self, job_id: int, start: int) -> None:
        """One batch of a job (one ``submit`` call) never runs, or is killed where it runs; the job goes on."""
        if job_id not in self.jobs:
            return
        for worker_id in self.scheduler.cancel_batch(job_id, start):
            peer = self.peers.get(worker_id)
            if peer is not None:
                peer.send(protocol.encode(Kind.CANCEL, {"job": job_id, "start": start}))
        self._maybe_finish(job_id)
        self._pump()

    def restart_worker(self, worker_id: str, hard: bool = False) -> bool:
        """Relay a restart to a worker over its own connection (works behind NAT). False if not connected."""
        peer = self.peers.get(worker_id)
        if peer is None:
            return False
        peer.send(protocol.encode(Kind.RESTART, {"hard": hard}))
        self.fleet.event(time.time(), "restart", f"restart{' (hard)' if hard else ''} sent to worker {worker_id}")
        return True

    # -- connections -----------------------------------------------------------------------------------------

    async def _handle(self, ws: Link) -> None:
        peer = await self._handshake(ws)
        if peer is None:
            return
        writer = asyncio.create_task(peer.outbound.run())
        lost, reason = True, "connection lost"
        window, messages = time.monotonic(), 0

        def on_frame(data: bytes | bytearray) -> None:
            nonlocal window, messages
            messages += 1
            if messages > self.max_messages_per_second:
                now = time.monotonic()
                if now - window < 1.0:
                    raise ProtocolError(f"more than {self.max_messages_per_second} messages in a second")
                window, messages = now, 1
            self.bytes_in += len(data)
            self.scheduler.touch(peer.worker_id)
            self._on_message(peer, protocol.decode(data, self.max_message_size))

        try:
            await handle_each(ws, on_frame)
            lost = not (ws.close_code == CloseCode.NORMAL or peer.leaving or self.closing)
            reason = _close_description(ws)
        except ProtocolError as exc:
            log.warning("worker %s sent a bad message, closing: %s", peer.worker_id, exc,
                        extra={"worker": peer.worker_id})
            reason = f"protocol error: {exc}"
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        except ConnectionClosed:
            lost = not self.closing
            reason = _close_description(ws)
        finally:
            writer.cancel()
            self._drop(peer, lost, reason)

    async def _handshake(self, ws: Link) -> Peer | None:
        address = ws.remote_address
        if self.refusals.blocked(_host_of(address)):
            await ws.close(CloseCode.TRY_LATER, "too many refused attempts from this address; retry later")
            return None
        try:
            msg = protocol.decode(await asyncio.wait_for(ws.recv(), HANDSHAKE_TIMEOUT), self.max_message_size)
            if msg.kind not in (Kind.HELLO, Kind.CONNECT):
                raise ProtocolError(f"expected HELLO or CONNECT, got {msg.kind.name}")
        except (asyncio.TimeoutError, ConnectionClosed):
            return None
        except ProtocolError as exc:
            log.warning("refused %s: %s", address, exc)
            self.refusals.refused(_host_of(address))
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
            return None
        hello = msg.header
        if hello["protocol"] != protocol.PROTOCOL_VERSION:
            older = "this worker" if msg.kind is Kind.HELLO else "this client"
            if hello["protocol"] > protocol.PROTOCOL_VERSION:
                older = "the foreman"
            reason = (f"protocol {hello['protocol']} refused, the foreman speaks protocol "
                      f"{protocol.PROTOCOL_VERSION}: upgrade CrowdCompute on {older}")
            log.warning("refused %s: %s", address, reason)
            await ws.close(CloseCode.VERSION_MISMATCH, reason)
            return None
        if msg.kind is Kind.CONNECT:
            await self._serve_client(ws, hello)
            return None
        principal = self.auth.identify(hello["token"])
        if (principal is not None and principal.name == "local" and self._local_server is not None
                and not isinstance(ws, LocalConnection)):
            principal = None  # the local workers' secret is good on the private Unix socket only, never over TCP
        if not authorize(principal, Action.JOIN):
            reason = ("token required" if not hello["token"] else
                      "invalid token" if principal is None else refusal(principal, Action.JOIN))
            log.warning("refused worker %s from %s: %s", hello["worker_id"], address, reason,
                        extra={"worker": hello["worker_id"]})
            self.refusals.refused(_host_of(address))
            await ws.close(CloseCode.AUTH_FAILED, reason)
            return None
        worker_id = hello["worker_id"]
        try:  # everything a HELLO says is checked before anything is registered: a bad one leaves no trace
            facts = _worker_facts(hello)
        except ProtocolError as exc:
            log.warning("refused worker from %s: %s", address, exc)
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
            return None
        taken = worker_id_refusal(worker_id, self.journal.worker_owner(worker_id), principal)
        if taken is not None:
            log.warning("refused worker %.200r of %s from %s: %s", worker_id, principal.name, address, taken)
            self.refusals.refused(_host_of(address))
            await ws.close(CloseCode.AUTH_FAILED, taken[:120])
            return None
        _authenticated(ws)
        old = self.peers.get(worker_id)
        if old is not None:
            log.warning("worker %s reconnected: replacing its old connection", worker_id, extra={"worker": worker_id})
            self._drop(old, lost=True, reason="replaced by a new connection")
            _close_soon(old.ws, CloseCode.REPLACED, "replaced by a new connection of the same worker id")
        peer = Peer(worker_id, ws, hello, principal)
        self.peers[worker_id] = peer
        try:
            self._register(peer, facts, _format_address(address))
            await ws.send(protocol.encode(Kind.WELCOME, {
                "session": self.session, "heartbeat_interval": self.heartbeat_interval,
                "heartbeat_timeout": self.heartbeat_timeout, "max_message_size": self.max_message_size,
                "confirms_results": self.journal.persistent, "jobs_env": JOBS_ENV}))
        except BaseException as exc:  # a peer half registered would be a ghost that breaks its next HELLO
            self._drop(peer, lost=True, reason=f"handshake failed: {type(exc).__name__}")
            if isinstance(exc, ConnectionClosed):
                return None
            raise
        log.info("worker %s joined from %s (%s slots, Python %s)", worker_id, address, hello["concurrency"],
                 hello["python"], extra={"worker": worker_id})
        self._pump()
        return peer

    def _register(self, peer: Peer, facts: tuple[str, frozenset[str], dict[str, float]], address: str) -> None:
        worker_id, hello = peer.worker_id, peer.hello
        env, capabilities, resources = facts
        self.scheduler.add_worker(worker_id, hello["concurrency"], env, capabilities, resources,
                                  str(hello.get("hostname") or ""), peer.principal.trusted,
                                  self.trust.reputation.barred(worker_id))
        self.fleet.worker_joined(time.time(), worker_id, hello, address)
        self.journal.worker_joined(worker_id, peer.principal.name, address)
        self._adopt(worker_id, hello.get("holding") if hello.get("foreman_session") == self.session else None)

    async def _serve_client(self, ws: Link, header: dict[str, Any]) -> None:
        principal, reason = self.clients.identify(header)
        if principal is None:
            log.warning("refused client %s from %s: %s", header["client"], ws.remote_address, reason)
            self.refusals.refused(_host_of(ws.remote_address))
            await ws.close(CloseCode.AUTH_FAILED, reason)
            return
        _authenticated(ws)
        await self.clients.serve(ws, principal, header)

    def _adopt(self, worker_id: str, holding: Any) -> None:
        """A worker back after this foreman restarted still holds batches of stored jobs: they count as in flight
        there, so they are not run twice. Once every worker awaited is back, the resumed jobs run anywhere."""
        adopted = 0
        if isinstance(holding, list):
            for entry in holding:
                if (isinstance(entry, list) and len(entry) == 3 and all(type(v) is int for v in entry)
                        and entry[0] in self.stored):
                    adopted += self.scheduler.adopt(worker_id, *entry)
        if adopted:
            log.info("worker %s still held %s batches of resumed jobs", worker_id, adopted, extra={"worker": worker_id})
        self._awaited.discard(worker_id)
        if not self._awaited:
            for job_id in self.stored:
                self.scheduler.jobs[job_id].held_until = 0.0

    def _drop(self, peer: Peer, lost: bool, reason: str) -> None:
        if self.peers.get(peer.worker_id) is not peer:
            return  # already replaced or dropped
        del self.peers[peer.worker_id]
        self._bytes_out_gone += peer.outbound.sent
        worker = self.scheduler.workers.get(peer.worker_id)
        if worker is None:  # its handshake failed before the scheduler heard of it
            return
        held = len(worker.batches)
        failures = self.scheduler.remove_worker(peer.worker_id, lost)
        now = time.time()
        self.fleet.worker_left(now, peer.worker_id, lost, reason)
        if not self.closing:
            # A foreman that stops keeps its workers journaled as connected: they keep what they run and hold,
            # and the next run awaits them (recovery_window) before running their batches anywhere else.
            self.journal.worker_left(peer.worker_id, reason)
        if lost:
            log.warning("worker %s lost (%s); its %s batches are reassigned", peer.worker_id, reason, held,
                        extra={"worker": peer.worker_id})
        else:
            log.info("worker %s left (%s)", peer.worker_id, reason, extra={"worker": peer.worker_id})
        if held:
            self.fleet.event(now, "reassign", f"{held} batches of worker {peer.worker_id} requeued")
        self._report_failures(failures)
        self._pump()

    # -- messages --------------------------------------------------------------------------------------------

    def _on_message(self, peer: Peer, msg: protocol.Message) -> None:
        kind, header = msg.kind, msg.header
        if kind is Kind.RESULTS:
            self._on_results(peer, header, msg.payload)
        elif kind is Kind.HEARTBEAT:
            self.fleet.worker_heard(time.time(), peer.worker_id, header.get("status"), header.get("reason"))
            peer.send(protocol.encode(Kind.HEARTBEAT))
        elif kind is Kind.PAUSE:
            self.scheduler.pause_worker(peer.worker_id, header["paused"])
            self.fleet.worker_paused(time.time(), peer.worker_id, header["paused"], str(header.get("reason", "")))
            self._pump()
        elif kind is Kind.CHECKPOINT:
            self._on_checkpoint(peer, header["job"], header["task"], msg.payload)
        elif kind is Kind.DRAIN:
            peer.leaving = True
            self.scheduler.drain_worker(peer.worker_id)
            log.info("worker %s is draining", peer.worker_id, extra={"worker": peer.worker_id})
        else:
            raise ProtocolError(f"unexpected {kind.name} from a worker")

    def trusts(self, peer: Peer) -> bool:
        """Whether this worker's bytes (results, checkpoints) may reach a full unpickler: the operator trusts every
        worker (``trust_workers``), or its token is a trusted one (local workers, the admin, ``[trusted_workers]``)."""
        return self.trust_workers or peer.principal.trusted

    def _on_checkpoint(self, peer: Peer, job_id: int, task: int, state: memoryview | bytes) -> None:
        """Keep a task's latest checkpoint, if that worker is running that task and the foreman trusts it: the
        next worker's task process loads it with full pickle (an untrusted worker's is dropped; the task then
        restarts from scratch if it is lost, see docs/security.md)."""
        if len(state) > protocol.MAX_CHECKPOINT_SIZE:
            raise ProtocolError(f"a checkpoint of {len(state)} bytes is over the {protocol.MAX_CHECKPOINT_SIZE} "
                                "byte limit")
        worker = self.scheduler.workers.get(peer.worker_id)
        if worker is None or not any(job == job_id and start <= task < start + count
                                     for job, start, count in worker.batches):
            return  # stale: the task finished, or moved to another worker
        if not self.trusts(peer):
            if peer.worker_id not in self._untrusted_checkpoints:
                self._untrusted_checkpoints.add(peer.worker_id)
                log.info("worker %s is not trusted: its checkpoints are not kept (its tasks restart if it is lost)",
                         peer.worker_id, extra={"worker": peer.worker_id})
            return
        if not self.checkpoints.keep(peer.worker_id, job_id, task, bytes(state)):
            log.warning("worker %s: checkpoint of task %s of job %s dropped, over the bound on checkpoints held",
                        peer.worker_id, task, job_id, extra={"worker": peer.worker_id})

    def _on_results(self, peer: Peer, header: dict[str, Any], payload: memoryview | bytes) -> None:
        job_id, start, count, status = header["job"], header["start"], header["count"], header["status"]
        scheduler = self.scheduler
        record = self.jobs.get(job_id)
        if status == protocol.STATUS_OK and record is not None and record.validation is not None:
            self.trust.answer(peer, record, header, payload)
            self._maybe_finish(job_id)
        elif status == protocol.STATUS_OK:
            done = scheduler.complete(peer.worker_id, job_id, start, count, holders_only=not self.trust_workers)
            if done is not None:
                record = self.jobs[job_id]
                self.trust.credit(peer.worker_id, record, count, self.trust.report(peer, header))
                for other in done.cancel_on:
                    if other in self.peers:
                        self.peers[other].send(protocol.encode(Kind.CANCEL, {"job": job_id, "start": start}))
                elapsed = float(header["elapsed"])
                failed = header.get("failed", 0)
                failed = failed if type(failed) is int and 0 <= failed <= count else 0
                errors = header.get("errors", [])
                self.fleet.batch_done(time.time(), peer.worker_id, job_id, start, count, elapsed, failed,
                                      errors if isinstance(errors, list) else [])
                self.checkpoints.drop(job_id, start, count)
                record.sink.deliver(start, count, payload, elapsed, peer.worker_id)
                self._maybe_finish(job_id)
        elif status == protocol.STATUS_CRASHED:
            reason = f"{header.get('error', 'the task process died')} on worker {peer.worker_id}"
            failure = scheduler.crashed(peer.worker_id, job_id, start, count, reason)
            self._report_failures([failure] if failure else [])
        elif status == protocol.STATUS_RETURNED:
            scheduler.hand_back(peer.worker_id, job_id, start, count)
        if self.journal.persistent:  # the worker may forget these results: a restart will not need them again
            peer.send(protocol.encode(Kind.RECEIVED, {"job": job_id, "start": start, "count": count}))
        self._pump()

    def _report_failures(self, failures: list[Failure]) -> None:
        for failure in failures:
            batch = failure.batch
            record = self.jobs.get(batch.job_id)
            if record is not None:
                log.error("%s", failure.reason, extra={"job": batch.job_id, "task": batch.start})
                self.fleet.task_lost(time.time(), batch.job_id, batch.start, batch.count, failure.reason)
                record.sink.fail(batch.start, batch.count, TaskLostError(failure.reason))
                self._maybe_finish(batch.job_id)

    def _maybe_finish(self, job_id: int) -> None:
        job = self.scheduler.jobs.get(job_id)
        if job is None or not job.finished:
            return
        record = self.jobs.pop(job_id)
        self._waiting_logged.discard(job_id)
        self.checkpoints.drop_job(job_id)
        self.trust.forget_job(job_id)
        self.fleet.job_finished(time.time(), job_id, job.cancelled)
        for worker_id in self.scheduler.forget_job(job_id):
            peer = self.peers.get(worker_id)
            if peer is not None:
                peer.send(protocol.encode(Kind.JOB_DONE, {"job": job_id}))
        record.sink.finished(job.cancelled)
        self.stored.pop(job_id, None)

    def _pump(self) -> None:
        """Send whatever the scheduler assigns now. A job's sink hears that a batch starts before it is first
        sent, and may refuse (its future was cancelled meanwhile): then it is not sent, and is cancelled."""
        if self.closing:
            return  # a stopping foreman starts nothing: what its workers gave up runs in its next run
        refused: list[tuple[int, int]] = []
        for assignment in self.scheduler.dispatch():
            batch = assignment.batch
            record = self.jobs[batch.job_id]
            if batch.attempts == 1 and not record.sink.starting(batch.start):
                refused.append((batch.job_id, batch.start))
                if assignment.ship_function:  # the scheduler counts the function as sent to that worker
                    self._ship_function(self.peers[assignment.worker_id], record)
            else:
                self._send_assignment(assignment, record)
        for job_id, start in refused:
            self.cancel_batch(job_id, start)
        self._arm_speculation()

    def _arm_speculation(self) -> None:
        """Pump again the moment a batch in flight turns late while a worker is idle, so that its speculative
        copy starts then rather than at the next event or tick (up to a second later)."""
        due = self.scheduler.next_speculation()
        if due is None or self.closing:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + (due - self.scheduler.clock()) + _TIMER_SLACK
        timer = self._speculation_timer
        if timer is not None:
            if not timer.cancelled() and timer.when() <= when:
                return
            timer.cancel()
        self._speculation_timer = loop.call_at(when, self._speculation_due)

    def _speculation_due(self) -> None:
        self._speculation_timer = None
        self._pump()

    def _ship_function(self, peer: Peer, record: _JobRecord) -> None:
        header = {"job": record.id, "digest": record.digest, "call": record.call}
        if record.task_timeout is not None:
            header["task_timeout"] = record.task_timeout
        peer.send(protocol.encode(Kind.JOB, header, record.function))

    def _send_assignment(self, assignment: Assignment, record: _JobRecord) -> None:
        peer = self.peers[assignment.worker_id]
        batch = assignment.batch
        if assignment.ship_function:
            self._ship_function(peer, record)
        saved = self.checkpoints.of_job(batch.job_id)
        if saved:  # resume tasks from their last checkpoint
            for task in range(batch.start, batch.start + batch.count):
                if task in saved:
                    peer.send(protocol.encode(Kind.CHECKPOINT, {"job": batch.job_id, "task": task}, saved[task]))
        header = {"job": batch.job_id, "start": batch.start, "count": batch.count}
        payload = batch.payload
        if payload.framed:
            header["framed"] = True
        elif payload.buffers:
            header["buffers"] = [len(buffer) for buffer in payload.buffers]
        peer.send(protocol.encode_parts(Kind.TASKS, header, payload.data, *payload.buffers))

    # -- clock -----------------------------------------------------------------------------------------------

    async def _tick_forever(self) -> None:
        period = min(1.0, self.heartbeat_interval / 2)
        loop = asyncio.get_running_loop()
        while True:
            asleep = loop.time()
            await asyncio.sleep(period)
            # How late this tick woke: the loop was that busy, and heartbeats that arrived meanwhile may still be
            # unread in the sockets. Expiry allows the recent worst of it, so that overload does not make healthy
            # workers look lost (it decays: a frozen worker is still found within a tick or two of the timeout).
            lag = max(0.0, loop.time() - asleep - period)
            self._loop_lag = max(lag, self._loop_lag * 0.9)
            self.tick()

    def tick(self) -> None:
        """Declare silent workers lost, apply token revocations, sample activity, say why waiting jobs wait.

        Each step is guarded: an exception in one (a journal that cannot be written, a bug) is logged and the
        others still run, this tick and every later one; above all, silent workers are still declared lost."""
        steps = (("expiry", self._expire_silent), ("fleet sample", lambda: self.fleet.sample(time.time())),
                 ("clients", lambda: self.clients.tick(time.monotonic())), ("journal purge", self.journal.purge),
                 ("saving state", self._save_state), ("token reload", self._apply_revocations),
                 ("stalled readers", self._drop_stalled),
                 ("dispatch", self._pump),  # a batch may have become slow enough to run a second copy of
                 ("waiting jobs", self._log_waiting))
        for name, step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - logged; the next step and the next tick go on
                if self._tick_errors.get(name) != repr(exc):  # once per distinct error, not once a tick
                    self._tick_errors[name] = repr(exc)
                    log.exception("tick: %s failed (the other steps go on): %s", name, exc)

    def _apply_revocations(self) -> None:
        revoked = self.auth.reload_if_changed()
        for peer in revoked_connections(((p, p.principal) for p in self.peers.values()), revoked):
            log.warning("worker %s: its token was revoked, disconnecting it", peer.worker_id,
                        extra={"worker": peer.worker_id})
            self._drop(peer, lost=False, reason="token revoked")
            _close_soon(peer.ws, CloseCode.AUTH_FAILED, "token revoked")
        self.clients.revoke(revoked)

    def _drop_stalled(self) -> None:
        now = time.monotonic()
        for peer in [p for p in self.peers.values() if p.outbound.stalled(now, self.heartbeat_timeout)]:
            log.warning("worker %s has read nothing for %.0fs: dropping it", peer.worker_id, self.heartbeat_timeout,
                        extra={"worker": peer.worker_id})
            self._drop(peer, lost=True, reason="does not read what it is sent")
            peer.ws.transport.abort()  # a close handshake would queue behind what it does not read

    def _expire_silent(self) -> None:
        for worker_id in self.scheduler.expired(slack=self._loop_lag):
            peer = self.peers.get(worker_id)
            if peer is None:
                continue
            log.warning("worker %s silent for %.0fs: declared lost", worker_id, self.heartbeat_timeout,
                        extra={"worker": worker_id})
            self._drop(peer, lost=True, reason=f"no heartbeat for {self.heartbeat_timeout:g}s")
            _close_soon(peer.ws, CloseCode.HEARTBEAT_TIMEOUT, "no heartbeat within the timeout")

    def _log_waiting(self) -> None:
        for job in self.scheduler.jobs.values():
            if job.has_queued and job.id not in self._waiting_logged and time.monotonic() - job.created > 2:
                if not self.scheduler.can_be_served(job):
                    self._waiting_logged.add(job.id)
                    if self.scheduler.workers:
                        message = f"job {job.id} is waiting: no connected worker has {_needs(job)}"
                    else:
                        message = (f"job {job.id} is waiting: no worker is connected (start one with "
                                   f"python -m worker {self.address})")
                    log.warning("%s", message, extra={"job": job.id})
                    self.fleet.event(time.time(), "waiting", message)


def _authenticated(ws: Link) -> None:
    """The peer proved who it is: lift the pre-authentication limits of its connection."""
    if isinstance(ws, GuardedConnection):
        ws.authenticated()


#: Most task slots one worker may announce (bounds what one HELLO makes the scheduler plan for).
MAX_CONCURRENCY = 4096


def _worker_facts(hello: dict[str, Any]) -> tuple[str, frozenset[str], dict[str, float]]:
    """A HELLO's environment, labels and resources; ProtocolError naming what is malformed."""
    if not 1 <= hello["concurrency"] <= MAX_CONCURRENCY:
        raise ProtocolError(f"HELLO needs a concurrency from 1 to {MAX_CONCURRENCY}")
    if not hello["worker_id"]:
        raise ProtocolError("HELLO needs a worker_id")
    try:
        env, (labels, resources) = _env_of(hello), describe_worker(hello)
    except (TypeError, ValueError, AttributeError, KeyError, OverflowError) as exc:
        raise ProtocolError(f"HELLO has a malformed field: {type(exc).__name__}: {exc}") from None
    if not all(0 <= value < float("inf") for value in resources.values()):  # False for NaN too
        raise ProtocolError(f"HELLO announces impossible resources: {resources}")
    return env, labels, resources


def _close_soon(ws: Link, code: int, reason: str) -> None:
    """Close without waiting: a silent peer may never answer the close handshake (close_timeout bounds it)."""
    asyncio.ensure_future(ws.close(code, reason))


def _host_of(address: Any) -> str:
    return str(address[0]) if isinstance(address, tuple) and address else str(address)


def _close_description(ws: Link) -> str:
    if ws.close_code is None:
        return "connection lost"
    return f"closed with code {ws.close_code}" + (f": {ws.close_reason}" if ws.close_reason else "")


def _format_address(address: Any) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


def describe_worker(hello: dict[str, Any]) -> tuple[frozenset[str], dict[str, float]]:
    """A worker's capabilities and resources from its HELLO: its own labels plus what its machine shows."""
    gpus = [g for g in hello.get("gpus") or [] if isinstance(g, dict)]
    memory = hello.get("memory") if isinstance(hello.get("memory"), (int, float)) else 0
    labels = {str(c) for c in hello["capabilities"]} | {"cpu"}
    if gpus:
        labels |= {"gpu", "cuda"}
    if memory >= 32 * 2**30:
        labels.add("high-memory")
    resources = {"cpu": float(hello.get("cpu_count") or hello["concurrency"]), "memory_gb": memory / 2**30,
                 "gpu": float(len(gpus)),
                 "gpu_memory_gb": min((g.get("memory_total") or 0) / 2**30 for g in gpus) if gpus else 0.0}
    return frozenset(labels), resources


def _needs(job: Any) -> str:
    parts = [job.env] + sorted(job.requires) + [f"{k} >= {v:g}" for k, v in sorted(job.resources.items())]
    return ", ".join(parts)


def _env_of(hello: dict[str, Any]) -> str:
    """The worker's environment fingerprint, comparable with ENV_FINGERPRINT."""
    python = ".".join(hello["python"].split(".")[:2])
    return f"py{python}/cloudpickle{hello['cloudpickle'].split('.')[0]}"
