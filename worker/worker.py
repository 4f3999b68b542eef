"""The worker: dials out to a foreman, runs the batches it is sent, and keeps coming back.

The event loop only moves bytes: tasks run in child processes (:mod:`worker.executor`), so heartbeats keep
flowing during long tasks. Control (cancel, restart, drain) comes back over the same socket the worker opened,
so a worker behind NAT needs no open port.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
import time
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

import cloudpickle
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from foreman import local_link, protocol, tls
from foreman.errors import AuthenticationError, ProtocolError, VersionMismatchError
from foreman.outbound import Outbound
from foreman.protocol import CloseCode, Kind
from foreman.serialization import env_mismatch
from foreman.version import VERSION
from worker import pause, sysinfo
from worker.config import WorkerConfig
from worker.executor import Executor, Outcome, WorkItem
from worker.history import BatchHistory
from worker.policy import Sampler
from worker.session import Key, Session

if TYPE_CHECKING:
    from worker.dashboard import Dashboard

#: The connection to the foreman: WebSocket, or the local link of a foreman on this machine.
Link = ClientConnection | local_link.LocalConnection

log = logging.getLogger("crowdcompute.worker")


@dataclass
class WorkerStats:
    started: float = field(default_factory=time.time)
    tasks_completed: int = 0
    tasks_failed: int = 0
    total_execution_time: float = 0.0
    connections: int = 0

    @property
    def reconnects(self) -> int:
        return max(0, self.connections - 1)


class FatalConnectionError(Exception):
    """The foreman refused us, or could not be verified (TLS), for a reason retrying cannot fix."""


class Worker:
    """One volunteer worker. ``await worker.run()`` until stopped; ``worker.stop()`` asks it to leave.

    ``sampler`` replaces the readings of the machine that the owner's pause rules judge (see :mod:`worker.policy`).
    """

    def __init__(self, config: WorkerConfig, sampler: Sampler | None = None) -> None:
        self.config = config
        #: A foreman's own local worker polls while its messages come fast (see :mod:`worker.polling`).
        self.polls = local_link.is_local(config.foreman_url)
        self.paused_reason: str | None = None  # why the owner's rules paused the worker; None while it works
        self._sampler = sampler
        self._grace: asyncio.Task[None] | None = None  # lets running tasks finish after a pause, then hands back
        self.stats = WorkerStats()
        # Reconnect backoff, results the foreman has not confirmed, what a close keeps (see worker.session).
        self.session = Session(max_delay=config.reconnect_max_delay)
        self.connected_at: float | None = None  # wall-clock time of the current connection's WELCOME
        self.last_error: str | None = None  # how the last connection attempt or connection ended
        self.env_mismatch: str | None = None  # why this foreman's jobs cannot run here (Python, cloudpickle)
        self.draining = False
        self.history = BatchHistory()
        self.executor: Executor | None = None
        self.dashboard: Dashboard | None = None
        self._ws: Link | None = None
        self._outbound: Outbound | None = None
        self._session = 0
        self._resume: dict[tuple[int, int], bytes] = {}  # (job, task) -> checkpoint to resume it from
        # job id -> (digest, function bytes, call style, the job's task_timeout or None)
        self._jobs: dict[int, tuple[str, bytes, str, float | None]] = {}
        self._last_heard = time.monotonic()
        self._heartbeat_interval = config.heartbeat_interval
        self._heartbeat_timeout = config.heartbeat_interval * 6
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None  # cuts a reconnect backoff short
        self._reconnect_now = False
        self._reexec = False
        self._signals = 0

    # -- public ----------------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.session.connected

    @property
    def _foreman_session(self) -> str | None:
        """The session id of the foreman whose work this worker holds (a new one means a new foreman)."""
        return self.session.foreman

    @property
    def status(self) -> str:
        """connecting / idle / busy / paused / draining / disconnected."""
        if self.draining:
            return "draining"
        if not self.connected:
            return "disconnected" if self._stop is not None and self._stop.is_set() else "connecting"
        if self.paused_reason is not None:
            return "paused"
        return "busy" if self.executor and self.executor.busy else "idle"

    async def run(self) -> None:
        """Connect, serve, reconnect; return once stopped. Raises FatalConnectionError if refused for good."""
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self.executor = Executor(self.config.max_concurrent_tasks, self._on_outcome, loop,
                                 self.config.start_method, self.config.limits, self._on_checkpoint, self.polls)
        watchers = pause.start(self, self._sampler)  # first: a preference this machine cannot honour raises
        self.executor.start()
        self._install_signal_handlers(loop)
        if self.config.parent_pid:
            watchers.append(asyncio.create_task(self._watch_parent()))
        if self.config.dashboard:
            self.dashboard = await self._open_dashboard()
        try:
            await self._connect_loop()
        finally:
            self.session.stop()
            for task in watchers:
                task.cancel()
            if self.dashboard is not None:
                await self.dashboard.close()
            running = self.executor.busy
            self.executor.close()
            log.info("%s", self.session.stop_report(running))
        if self._reexec:
            reexec(self.config.worker_id, self.config.token)

    def may_poll(self) -> bool:
        """For :class:`worker.polling.PollingSelector`: only around short batches (:meth:`Executor.may_reply_soon`);
        when the loop waits for the foreman's next batch after a longer one, it sleeps as before."""
        return self.executor is None or self.executor.may_reply_soon()

    def stop(self, reason: str = "worker stopping") -> None:
        """Leave now: running tasks are abandoned and go back to the foreman."""
        if self._stop is not None:
            self._stop.set()
        if self._wake is not None:
            self._wake.set()
        if self._ws is not None:
            asyncio.ensure_future(self._ws.close(CloseCode.NORMAL, reason))

    async def drain(self) -> None:
        """Leave gracefully: hand back queued batches, let running ones finish (up to drain_timeout), go."""
        if self.draining:
            return
        self.draining = True
        assert self.executor is not None
        if not self.connected:
            self.stop()
            return
        log.info("draining: handing back queued tasks, finishing running ones (up to %.0fs)",
                 self.config.drain_timeout)
        self._send(protocol.encode(Kind.DRAIN))
        for item in self.executor.stop_items(protocol.STATUS_RETURNED, kill_running=False):
            self._send_outcome(Outcome(item, protocol.STATUS_RETURNED))
        deadline = time.monotonic() + self.config.drain_timeout
        while self.executor.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.executor.stop_items(protocol.STATUS_RETURNED)
        await asyncio.sleep(0.05)  # let the writer flush what is queued
        self.stop()

    def pause(self, reason: str) -> None:
        """Step aside for the owner: tell the foreman, hand back queued batches, give running ones
        ``pause_grace`` seconds to finish, then stop them too (they resume from their checkpoints elsewhere).
        Called again while paused, it only updates the reason."""
        assert self.executor is not None
        first = self.paused_reason is None
        self.paused_reason = reason
        self._send(protocol.encode(Kind.PAUSE, {"paused": True, "reason": reason}))  # before the hand-backs
        if not first:
            return
        log.info("pausing: %s", reason)
        for item in self.executor.stop_items(protocol.STATUS_RETURNED, kill_running=False):
            self._send_outcome(Outcome(item, protocol.STATUS_RETURNED))
        self._grace = asyncio.ensure_future(self._hand_back_running(self.config.prefs.pause_grace))

    def resume(self) -> None:
        """Take work again after :meth:`pause`."""
        if self.paused_reason is None:
            return
        log.info("resuming: the owner's rules no longer object")
        self.paused_reason = None
        if self._grace is not None:
            self._grace.cancel()
        self._send(protocol.encode(Kind.PAUSE, {"paused": False, "reason": ""}))

    async def _hand_back_running(self, grace: float) -> None:
        assert self.executor is not None
        deadline = time.monotonic() + grace
        while self.executor.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.executor.busy:
            log.info("pause: stopping %d running batch(es) after the %.0fs grace; they go back to the foreman",
                     self.executor.busy, grace)
            self.executor.stop_items(protocol.STATUS_RETURNED)

    async def restart(self, hard: bool = False) -> None:
        """Drop the connection, kill running tasks (they go back to the foreman) and reconnect at once.

        ``hard`` re-executes the whole worker process instead, under the same worker id, so that it picks up
        upgraded code. The connection is closed cleanly first, so the foreman requeues its tasks without strikes.
        """
        assert self.executor is not None and self._wake is not None
        log.info("restarting%s: killing running tasks and %s", " (hard)" if hard else "",
                 "re-executing the worker process" if hard else "reconnecting")
        self.executor.stop_items(protocol.STATUS_RETURNED)
        if hard:
            self._reexec = True
            self.stop("worker restarting")
            return
        self._reconnect_now = True
        self._wake.set()
        if self._ws is not None:
            await self._ws.close(CloseCode.NORMAL, "worker restarting")

    async def _open_dashboard(self) -> Dashboard | None:
        """Serve the dashboard in this loop; without its packages or a free port the worker runs headless."""
        try:
            from worker.dashboard import Dashboard
        except ImportError as exc:
            log.warning("running without a dashboard: the %s package is missing (pip install "
                        "'crowdcompute[dashboard]' adds it; --no-dashboard silences this)", exc.name)
            return None
        dashboard = Dashboard(self)
        return dashboard if await dashboard.open() else None

    # -- connection ------------------------------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        assert self._stop is not None and self._wake is not None
        context = _client_tls(self.config)
        if self.config.token_in_clear:
            log.warning("the token travels in clear text over ws:// to %s, readable on the network like the code "
                        "and data: prefer wss:// (a foreman with --certfile, a worker with --cafile or "
                        "--fingerprint)", self.config.foreman_url)
        while not self._stop.is_set():
            welcomes = self.session.connections
            try:
                async with self._dial(context) as ws:
                    self._ws = ws
                    _check_pin(ws, self.config)
                    await self._serve(ws)
            except FatalConnectionError:
                raise
            except ssl.SSLCertVerificationError as exc:
                raise FatalConnectionError(
                    f"cannot verify the foreman at {self.config.foreman_url} against "
                    f"{self.config.cafile or 'the system CA store'}: {exc.verify_message}; not sending the token. "
                    f"Give the CA that signed its certificate with --cafile, or pin the certificate with "
                    f"--fingerprint ({tls.FINGERPRINT_HELP})") from exc
            except (OSError, asyncio.TimeoutError, ConnectionClosed, InvalidHandshake, ProtocolError) as exc:
                if isinstance(exc, ConnectionClosed):
                    _raise_if_refused(exc)  # a token revoked mid-session is as final as one refused at once
                self.last_error = _describe(exc)
                worked = self.session.connections != welcomes
                level = logging.INFO if worked or self._stop.is_set() else logging.WARNING
                log.log(level, "connection to %s ended: %s", self.config.foreman_url, _describe(exc))
            except InvalidURI as exc:
                raise FatalConnectionError(str(exc)) from exc
            finally:
                self._ws = None
                if self.session.connections == welcomes:
                    self.session.refused(time.monotonic())
            if self._stop.is_set() or self.draining:
                break
            if not self.config.auto_restart:
                log.info("connection closed and auto_restart is off: exiting")
                break
            if self._reconnect_now:
                self._reconnect_now = False
                continue
            delay = self.session.next_delay(time.monotonic())
            log.info("reconnecting in %.1fs", delay)
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except asyncio.TimeoutError:
                pass
            self._reconnect_now = False  # a restart during the wait has woken it

    def _dial(self, context: ssl.SSLContext | None) -> AbstractAsyncContextManager[Link]:
        """The connection to the foreman, for an ``async with``: a local link for a ``unix:`` address."""
        url, max_size = self.config.foreman_url, self.config.max_message_size
        if local_link.is_local(url):
            return local_link.open_link(url, max_size)
        return connect(url, max_size=max_size, compression=None, ping_interval=None, open_timeout=10,
                       close_timeout=2, ssl=context)

    async def _serve(self, ws: Link) -> None:
        hello = await asyncio.to_thread(self._hello)  # NVML and psutil may take a while: keep the loop free
        hello.update(self._holding())
        await ws.send(protocol.encode(Kind.HELLO, hello))
        try:
            welcome = protocol.decode(await asyncio.wait_for(ws.recv(), 30), self.config.max_message_size)
        except ConnectionClosed as exc:
            _raise_if_refused(exc)
            raise
        if welcome.kind is not Kind.WELCOME:
            raise ProtocolError(f"expected WELCOME, got {welcome.kind.name}")
        self._session += 1
        self._jobs.clear()
        self._resume.clear()
        other, resend = self.session.welcomed(time.monotonic(), welcome.header["session"],
                                              bool(welcome.header.get("confirms_results")))
        if other and self.executor is not None:  # a different foreman: old work means nothing to it
            self.executor.stop_items(protocol.STATUS_CANCELLED)
        self.connected_at = time.time()
        self.last_error = None
        self.stats.connections += 1
        self._heartbeat_interval = float(welcome.header["heartbeat_interval"])
        self._heartbeat_timeout = float(welcome.header["heartbeat_timeout"])
        self._last_heard = time.monotonic()
        log.info("connected to %s as %s (session %s)", self.config.foreman_url, self.config.worker_id,
                 welcome.header["session"])
        self.env_mismatch = env_mismatch(welcome.header.get("jobs_env"))
        if self.env_mismatch is not None:
            log.warning("%s", self.env_mismatch)
        self._outbound = Outbound(ws)
        if self.paused_reason is not None:
            self._send(protocol.encode(Kind.PAUSE, {"paused": True, "reason": self.paused_reason}))
        for data in resend:
            self._outbound.send(data)
        tasks = [asyncio.create_task(self._outbound.run()), asyncio.create_task(self._heartbeats(ws))]
        try:
            await local_link.handle_each(ws, self._on_frame)
        except ProtocolError as exc:
            log.error("foreman sent a bad message: %s", exc)
            await ws.close(CloseCode.PROTOCOL_ERROR, str(exc)[:120])
        finally:
            for task in tasks:
                task.cancel()
            self.last_error = _describe_close(ws)
            forget = self.session.closed(time.monotonic(), ws.close_code, self._unwritten(self._outbound))
            self._outbound = None
            if self.executor is not None:
                # Unstarted batches are requeued by the foreman when it sees us go; running ones finish and
                # their results are offered on the next connection.
                self.executor.stop_items(protocol.STATUS_RETURNED, kill_running=False)
                if forget:  # SHUTTING_DOWN: leave no task of a foreman that is gone running
                    self.executor.stop_items(protocol.STATUS_CANCELLED)
        if ws.close_code is not None:
            _raise_if_refused_code(ws.close_code, ws.close_reason)

    def _on_frame(self, data: bytes | bytearray) -> None:
        self._last_heard = time.monotonic()
        self._handle(protocol.decode(data, self.config.max_message_size))

    def _hello(self) -> dict[str, Any]:
        config = self.config
        return {
            "protocol": protocol.PROTOCOL_VERSION,
            "worker_id": config.worker_id,
            "token": config.token,
            "python": ".".join(map(str, sys.version_info[:3])),
            "cloudpickle": cloudpickle.__version__,
            "concurrency": config.max_concurrent_tasks,
            "capabilities": list(config.capabilities),
            "version": VERSION,
            "dashboard": self.dashboard.url if self.dashboard is not None else None,
            **sysinfo.describe(),
        }

    def _holding(self) -> dict[str, Any]:
        """The batches of the last foreman this worker still runs or holds results of: a foreman that restarted
        from its journal (same session) counts them as in flight here instead of running them again."""
        running = self.executor.running_items() if self.executor is not None else []
        return self.session.holding([(item.job_id, item.start, item.count) for item in running])

    def _unwritten(self, outbound: Outbound | None) -> list[tuple[Key, bytes]]:
        """The result messages a closed connection did not write, for the next one; everything else is dropped."""
        out = []
        for data in outbound.unsent() if outbound is not None else []:
            if data[0] == Kind.RESULTS:
                header = protocol.decode(data, self.config.max_message_size).header
                out.append(((header["job"], header["start"], header["count"]), bytes(data)))
        return out

    async def _heartbeats(self, ws: Link) -> None:
        while True:
            await asyncio.sleep(self._heartbeat_interval)
            silent = time.monotonic() - self._last_heard
            if silent > self._heartbeat_timeout:
                log.warning("foreman silent for %.0fs: dropping the connection", silent)
                ws.transport.abort()
                return
            self._send(protocol.encode(Kind.HEARTBEAT, self._heartbeat()))

    def _heartbeat(self) -> dict[str, Any]:
        executor = self.executor
        return {"status": self.status, "running": executor.busy if executor else 0,
                "queued": len(executor.pending) if executor else 0,
                "tasks_completed": self.stats.tasks_completed, "reason": self.paused_reason or ""}

    def _send(self, data: bytes) -> None:
        if self._outbound is not None:
            self._outbound.send(data)

    # -- messages from the foreman ---------------------------------------------------------------------------

    def _handle(self, msg: protocol.Message) -> None:
        kind, header = msg.kind, msg.header
        if kind is Kind.TASKS:
            job = self._jobs.get(header["job"])
            if job is None:
                raise ProtocolError(f"TASKS for job {header['job']} arrived before its JOB")
            digest, function, call, task_timeout = job
            assert self.executor is not None
            start, count = header["start"], header["count"]
            resume = {i: self._resume.pop((header["job"], i)) for i in range(start, start + count)
                      if (header["job"], i) in self._resume} if self._resume else None
            item = WorkItem(header["job"], start, count, digest, function, call, protocol.payload_parts(msg),
                            self._session, task_timeout=task_timeout, foreman=self._foreman_session or "",
                            resume=resume, framed=header.get("framed") is True)
            if self.paused_reason is not None:  # sent before the foreman heard we paused
                self._send_outcome(Outcome(item, protocol.STATUS_RETURNED))
            else:
                self.executor.submit(item)
        elif kind is Kind.CHECKPOINT:
            if len(msg.payload) > protocol.MAX_CHECKPOINT_SIZE:
                raise ProtocolError(f"a checkpoint of {len(msg.payload)} bytes is over the limit")
            self._resume[(header["job"], header["task"])] = bytes(msg.payload)
        elif kind is Kind.JOB:
            timeout = header.get("task_timeout")
            timeout = float(timeout) if isinstance(timeout, (int, float)) and timeout > 0 else None
            self._jobs[header["job"]] = (header["digest"], bytes(msg.payload), header["call"], timeout)
        elif kind is Kind.CANCEL:
            assert self.executor is not None
            self.executor.stop_items(protocol.STATUS_CANCELLED, header["job"], header.get("start"))
        elif kind is Kind.RECEIVED:
            self.session.received((header["job"], header["start"], header["count"]))
        elif kind is Kind.JOB_DONE:
            self._jobs.pop(header["job"], None)
            for key in [k for k in self._resume if k[0] == header["job"]]:
                del self._resume[key]
        elif kind is Kind.RESTART:
            asyncio.ensure_future(self.restart(hard=header["hard"]))
        elif kind is Kind.DRAIN:
            asyncio.ensure_future(self.drain())
        elif kind is not Kind.HEARTBEAT:
            raise ProtocolError(f"unexpected {kind.name} from the foreman")

    # -- results ---------------------------------------------------------------------------------------------

    def _on_checkpoint(self, item: WorkItem, task: int, state: bytes) -> None:
        """A task saved its progress: pass it to the foreman that sent the task."""
        if item.foreman == self._foreman_session:
            self._send(protocol.encode(Kind.CHECKPOINT, {"job": item.job_id, "task": task}, state))

    def _on_outcome(self, outcome: Outcome) -> None:
        """Called on the loop for each finished batch."""
        self.history.add(outcome)
        stats = self.stats
        if outcome.status == protocol.STATUS_OK:
            stats.tasks_completed += outcome.item.count - outcome.failed
            stats.tasks_failed += outcome.failed
            stats.total_execution_time += outcome.elapsed
        elif outcome.status == protocol.STATUS_CRASHED:
            stats.tasks_failed += outcome.item.count
            log.warning("batch %s/%s: %s", outcome.item.job_id, outcome.item.start, outcome.error)
        if outcome.status == protocol.STATUS_CANCELLED or outcome.item.foreman != self._foreman_session:
            return  # the foreman asked for it and has moved on, or it is not the foreman that sent it
        if outcome.status == protocol.STATUS_RETURNED and (outcome.item.session != self._session
                                                           or self._outbound is None):
            return  # the foreman requeued it when that connection closed
        self._send_outcome(outcome)

    def _send_outcome(self, outcome: Outcome) -> None:
        item = outcome.item
        header = {"job": item.job_id, "start": item.start, "count": item.count, "status": outcome.status,
                  "elapsed": outcome.elapsed, "failed": outcome.failed, "cpu": outcome.cpu}
        if outcome.error:
            header["error"] = outcome.error
        if outcome.errors:
            header["errors"] = outcome.errors
        payload = outcome.payload
        if len(payload) + protocol.MAX_HEADER_SIZE > self.config.max_message_size:
            header["status"] = protocol.STATUS_CRASHED
            header["error"] = (f"the batch's results pickle to {len(payload)} bytes, over the "
                               f"{self.config.max_message_size}-byte message limit")
            payload = b""
        data = protocol.encode(Kind.RESULTS, header, payload)
        if outcome.status == protocol.STATUS_RETURNED:
            self.session.returned()
        if self.session.finished((item.job_id, item.start, item.count), data) and self._outbound is not None:
            self._outbound.send(data)

    # -- process plumbing ------------------------------------------------------------------------------------

    def _install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, self._on_signal, sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # Windows, or not the main thread: Ctrl-C raises KeyboardInterrupt instead

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s received: draining (send it again to stop at once)", signal.Signals(sig).name)
            asyncio.ensure_future(self.drain())
        else:
            self.stop()

    async def _watch_parent(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if os.getppid() != self.config.parent_pid:
                log.info("parent process %s is gone: stopping", self.config.parent_pid)
                self.stop()
                return


def reexec(worker_id: str, token: str | None = None) -> NoReturn:
    """Replace this process with a fresh run of its own command line, under the same worker id. The token goes
    back where the command line expects it: down a fresh pipe on standard input (``--token-stdin``), else in the
    environment the worker took it from (which ``python -m worker`` empties again at once)."""
    os.environ["CROWDCOMPUTE_WORKER_ID"] = worker_id  # read by default_worker_id() and the CLI
    argv = [sys.executable, *sys.orig_argv[1:]]
    if token is not None and "--token-stdin" in argv:
        read, write = os.pipe()
        os.write(write, token.encode() + b"\n")
        os.close(write)
        os.dup2(read, 0)
        os.close(read)
    elif token is not None and "--token" not in argv:
        os.environ["CROWDCOMPUTE_TOKEN"] = token
    log.info("re-executing %s as worker %s", " ".join(argv), worker_id)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _client_tls(config: WorkerConfig) -> ssl.SSLContext | None:
    """The TLS context for a ``wss://`` foreman (None for ``ws://``); FatalConnectionError if --cafile won't load."""
    if not config.foreman_url.startswith("wss://"):
        return None
    try:
        return tls.client_context(config.cafile, pinned=config.fingerprint is not None)
    except OSError as exc:
        raise FatalConnectionError(f"cannot load the CA file {config.cafile} (--cafile): {exc}") from exc


def _check_pin(ws: ClientConnection, config: WorkerConfig) -> None:
    """With --fingerprint, the foreman's certificate must match it before anything is sent."""
    if config.fingerprint is None:
        return
    actual = tls.fingerprint(ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True))
    if actual != config.fingerprint:
        ws.transport.abort()
        raise FatalConnectionError(
            f"the foreman at {config.foreman_url} presented a certificate with fingerprint {actual}, not the "
            f"pinned {config.fingerprint} (--fingerprint); not sending the token. If its certificate was "
            f"replaced on purpose, pin the new one ({tls.FINGERPRINT_HELP})")


def _raise_if_refused(exc: ConnectionClosed) -> None:
    if exc.rcvd is not None:
        _raise_if_refused_code(exc.rcvd.code, exc.rcvd.reason)


def _raise_if_refused_code(code: int, reason: str) -> None:
    if code == CloseCode.AUTH_FAILED:
        raise FatalConnectionError(str(AuthenticationError(f"the foreman refused this worker: {reason}")))
    if code == CloseCode.VERSION_MISMATCH:
        raise FatalConnectionError(str(VersionMismatchError(f"the foreman refused this worker: {reason}")))


def _describe_close(ws: Link) -> str:
    if ws.close_code is None:
        return "connection lost"
    return f"connection closed ({ws.close_code} {ws.close_reason})".replace(" )", ")")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionClosed):
        frame = exc.rcvd or exc.sent
        return f"connection closed ({frame.code} {frame.reason})" if frame else "connection lost"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc} (is the foreman serving wss://, i.e. started with --certfile?)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
