"""``Foreman``: the API a script uses, on its own event-loop thread in this process.

Embedded (``Foreman(local_workers=2)``), it runs the foreman server in this process. Connected
(``Foreman.connect("ws://host:9000", token=...)``), it is a client of a standalone foreman (see
:mod:`foreman.remote`). The job API is the same either way.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from foreman import local_link, protocol
from foreman.addresses import is_loopback, split_token, with_token
from foreman.aio import AsyncAPI
from foreman.auth import Authenticator
from foreman.errors import ForemanClosedError, PortInUseError
from foreman.executor import ForemanExecutor
from foreman.handles import JobHandle, LocalSubscriber
from foreman.jobs import Job, JobOptions, SubmitStream, _pickle_fitting, placement_to_json
from foreman.journal import Journal
from foreman.local import LocalWorkers
from foreman.remote import RemoteBackend
from foreman.serialization import Pickled, dumps_function, ship_by_value
from foreman.server import ForemanServer
from foreman.tls import certificate_fingerprint, client_context, parse_fingerprint, server_context

log = logging.getLogger("crowdcompute.foreman")


@contextlib.contextmanager
def _port_taken(role: str, host: str, port: int) -> Iterator[None]:
    """Turn "address already in use" from binding ``port`` into a :class:`PortInUseError` naming it."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE or isinstance(exc, PortInUseError):
            raise
        raise PortInUseError(role, host, port) from None


class Options:
    """A foreman with job options bound (``fm.options(...)``): the same ``submit``/``map``/``imap`` calls."""

    def __init__(self, foreman: Foreman, options: JobOptions) -> None:
        self._foreman = foreman
        self._job_options = options

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        return self._foreman._submit(fn, args, kwargs, self._job_options)

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> list[Any]:
        return self._foreman.map(fn, *iterables, **{**dataclasses.asdict(self._job_options), **kwargs})

    def imap(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> Job:
        return self._foreman.imap(fn, *iterables, **{**dataclasses.asdict(self._job_options), **kwargs})

    def imap_unordered(self, fn: Callable[..., Any], *iterables: Iterable[Any], **kwargs: Any) -> Job:
        return self._foreman.imap_unordered(fn, *iterables, **{**dataclasses.asdict(self._job_options), **kwargs})


class Foreman(AsyncAPI):
    """A foreman's job API: embedded (a WebSocket server for workers, in this process) or connected to a
    standalone foreman (``address``, or :meth:`connect`).

    ::

        with Foreman(port=0, local_workers=2) as fm:
            fm.map(square, range(10_000))

        with Foreman.connect("ws://foreman.example:9000", token="c-...") as fm:
            fm.map(square, range(10_000))

    :param host: address to listen on. Any but loopback needs ``token`` or ``token_file`` (ValueError without).
    :param port: port to listen on; 0 picks a free one (see :attr:`address`).
    :param token: the admin secret: workers may join with it, clients may connect with it, and the dashboard's
        control needs it. None (and no ``token_file``): the foreman makes up an admin token (:attr:`token`) and a
        worker token, which :attr:`address` carries, so ``python -m worker ADDRESS`` joins as a worker and nothing
        more. Nobody connects without a token.
    :param token_file: a TOML file of per-worker and per-client tokens (see :mod:`foreman.auth`), re-read when
        it changes; removing a worker's token disconnects that worker.
    :param local_workers: worker processes to start on this machine, through the same path as remote ones.
    :param heartbeat_interval: seconds between worker heartbeats.
    :param heartbeat_timeout: a worker silent this long is declared lost and its tasks are reassigned.
    :param max_message_size: largest message in either direction; bounds memory per connection. The foreman's
        setting: a client (``Foreman.connect``) learns it from its foreman, and workers need as large a one
        (``python -m worker --max-message-size``) to take tasks that big.
    :param max_task_losses: a task in flight on this many workers that died in a row fails as poison.
    :param speculation: at a job's tail, start a second copy of a batch running this many times longer than the
        job's typical task on an idle worker (first result wins), and at once of a batch held by a worker already
        seen to run the job at half the typical speed or worse; None turns it off.
    :param trust_workers: unpickle results with full pickle (code from workers could run here). Default:
        True on a loopback address, False elsewhere, where results are loaded with a restricted loader that
        only rebuilds plain data (builtins, containers, numbers, strings, bytes, registered safe types).
        Connected to a foreman (``address``), this process's own choice, default False: whatever the foreman
        says in its WELCOME never switches a client to full unpickling (a foreman, or a man in the middle of a
        ``ws://`` link, could otherwise run code here through a result).
    :param dashboard: serve the fleet dashboard, JSON API and metrics over HTTP (see :attr:`dashboard_url`). Needs
        the web stack (``pip install 'crowdcompute[dashboard]'``): without it the foreman runs without a dashboard
        and logs one warning saying so. A port already in use raises :class:`~foreman.errors.PortInUseError`.
    :param http_port: the dashboard's port; default ``port + 1`` (any free port when ``port`` is 0).
    :param certfile: serve ``wss://`` and the dashboard over https with this PEM certificate (chain); local
        workers pin its fingerprint.
    :param keyfile: its private key (default: in ``certfile``).
    :param data_dir: keep stored jobs (detached ones, remote clients') and the worker history in
        ``data_dir/journal.sqlite``, so that a restarted foreman resumes them (see :mod:`foreman.journal`).
    :param retention: seconds a finished stored job is kept (its results, for a detached job).
    :param client_grace: seconds a remote client may be gone before its jobs (not detached ones) are cancelled.
    :param address: connect to the standalone foreman at this ``ws://``/``wss://`` address instead of running
        one; ``token`` is then a client token of that foreman, and only ``cafile``, ``fingerprint``,
        ``trust_workers`` and ``heartbeat_interval`` apply besides.
    :param cafile: (connected) verify a ``wss://`` foreman's certificate with this CA bundle.
    :param fingerprint: (connected) accept only the ``wss://`` foreman whose certificate has this SHA-256
        fingerprint (``python -m foreman --print-fingerprint CERT``).
    :param local_authkey: give the local workers' task processes this ``multiprocessing`` authentication key, so
        that ``multiprocessing.Manager()`` proxies made here work in their tasks (``ForemanExecutor`` passes this
        process's own, as a process pool's children inherit it). Only for a foreman whose local workers run this
        process's own work: whoever runs code there can reach this process's managers.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9000, token: str | None = None,
                 local_workers: int = 0, token_file: str | None = None, heartbeat_interval: float = 5.0,
                 heartbeat_timeout: float = 30.0, max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE,
                 max_task_losses: int = 3, speculation: float | None = 3.0,
                 dashboard: bool = True, http_port: int | None = None, trust_workers: bool | None = None,
                 certfile: str | None = None, keyfile: str | None = None, data_dir: str | None = None,
                 retention: float = 7 * 86400, client_grace: float = 300.0, address: str | None = None,
                 cafile: str | None = None, fingerprint: str | None = None,
                 local_authkey: bytes | None = None) -> None:
        self._closed = False
        self._default_options = JobOptions()
        self._streams: dict[tuple[str, int], SubmitStream] = {}  # open submit streams (event loop only)
        self._server: ForemanServer | None = None
        self._local: LocalWorkers | None = None
        self._backend: ForemanServer | RemoteBackend
        self._worker_token: str | None = None  # the one a foreman without a token made up for its address
        if address is not None:
            if local_workers:
                raise ValueError("local_workers cannot be started for a foreman at another address")
            address, carried = split_token(address)
            token = token if token is not None else carried
            if not address.startswith(("ws://", "wss://")):
                raise ValueError(f"a foreman's address is ws://HOST:PORT (wss:// with TLS), not {address!r}: "
                                 "scripts connect where workers do, not to the dashboard's http:// address")
            if max_message_size != protocol.DEFAULT_MAX_MESSAGE_SIZE:
                raise ValueError("max_message_size is the foreman's setting (Foreman(max_message_size=...), "
                                 "python -m foreman --max-message-size): a client uses the limit its foreman "
                                 "announces")
            pin = parse_fingerprint(fingerprint) if fingerprint else None
            context = client_context(cafile, pinned=pin is not None) if address.startswith("wss://") else None
            self._backend = RemoteBackend(address, token, context, pin, heartbeat_interval=heartbeat_interval,
                                          trust_workers=bool(trust_workers))
        else:
            if local_workers < 0:
                raise ValueError("local_workers must be >= 0")
            if dashboard and http_port is None:
                http_port = port + 1 if port else 0
            if trust_workers is None:
                trust_workers = is_loopback(host)
            if keyfile and not certfile:
                raise ValueError("keyfile needs a certfile")
            if token is None and token_file is None:
                if not is_loopback(host):
                    raise ValueError(f"listening on {host} needs a token or a token_file: workers run the code this "
                                     "foreman sends, and clients send it, so it must not accept strangers")
                auth = Authenticator.generated()
                token, self._worker_token = auth.token, auth.worker_token
            else:
                auth = Authenticator(token, token_file)
            tls = server_context(certfile, keyfile) if certfile else None
            journal = Journal(Path(data_dir) / "journal.sqlite" if data_dir else None, retention)
            self._server = self._backend = ForemanServer(
                host, port, auth, heartbeat_interval=heartbeat_interval, heartbeat_timeout=heartbeat_timeout,
                max_message_size=max_message_size, max_task_losses=max_task_losses, speculation=speculation,
                http_port=http_port if dashboard else None, trust_workers=trust_workers, ssl_context=tls,
                journal=journal, client_grace=client_grace)
            pin = certificate_fingerprint(certfile) if certfile else None
            self._local = LocalWorkers(auth.local_token(), heartbeat_interval, pin, local_authkey)
        self._token = token
        # The loop thread starts once every argument has been checked: a refused one leaves nothing running.
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="crowdcompute-foreman", daemon=True)
        self._thread.start()
        try:
            if self._server is None:
                self._call(self._backend.start())
            else:
                with _port_taken("port", host, port):
                    self._call(self._server.start())
                assert self._local is not None
                if local_workers:
                    # Its own workers dial a private Unix socket where there is one: a leaner link than WebSocket.
                    address = (self._call(self._server.start_local()) if local_link.AVAILABLE
                               else self._server.address)  # no token in it: they hold the local secret
                    self._local.start(address, local_workers)
                try:
                    with _port_taken("http_port", host, http_port or 0):
                        self._call(self._server.start_http())
                except ImportError as exc:  # a plain install: the web stack is the [dashboard] extra
                    log.warning("running without a dashboard: the %s package is missing (pip install "
                                "'crowdcompute[dashboard]' adds it; dashboard=False / --no-dashboard silences "
                                "this)", exc.name)
                log.info("foreman listening on %s", self.address)
        except BaseException:
            if self._local is not None:
                self._local.stop()
            if self._server is not None:
                self._call(self._server.close())
            self._stop_loop()
            raise

    @classmethod
    def connect(cls, address: str, token: str | None = None, **options: Any) -> Foreman:
        """A client of the standalone foreman at ``address`` (``crowdcompute foreman ...``): the same API as an
        embedded foreman. ``token``: a client token of its token file, or its admin token (an address
        ``ws://host:port/?token=T`` carries it too; ``token`` wins)."""
        return cls(address=address, token=token, **options)

    @property
    def address(self) -> str:
        """The ``ws://host:port`` address workers dial (``wss://`` with a certfile), or the one connected to. For
        a foreman that made up its own token, it carries the worker token (``ws://host:port/?token=...``): the
        address to copy to ``python -m worker`` as it is. It lets a worker join, nothing more."""
        if self._worker_token is not None:
            return with_token(self._backend.address, self._worker_token)
        return self._backend.address

    @property
    def token(self) -> str | None:
        """The admin token (given, or made up when none was): ``Foreman.connect(fm.address, token=fm.token)``
        connects a client, and the dashboard's control takes it (see :attr:`dashboard_login_url`). Connected: the
        token this client presented."""
        return self._token

    @property
    def dashboard_login_url(self) -> str | None:
        """:attr:`dashboard_url` with the admin token, as Jupyter prints it: opening it once logs the browser in
        (a cookie holding a digest of the token) and moves to the plain address. None without a dashboard or an
        admin token."""
        url = self.dashboard_url
        return f"{url}?token={quote(self._token, safe='')}" if url and self._token else None

    @property
    def dashboard_url(self) -> str | None:
        """The ``http://`` (``https://``) address of the fleet dashboard and JSON API, or None when disabled
        (or connected to another foreman)."""
        http = self._server.http if self._server is not None else None
        return http.url if http is not None else None

    @property
    def workers(self) -> list[str]:
        """Ids of the connected workers."""
        if self._server is None:
            return list(self._query("fleet")["workers"])
        server = self._server
        return self._call(lambda: list(server.peers))

    @property
    def slots(self) -> int:
        """Tasks the connected workers run at once (the sum of their concurrency), as last known here."""
        return int(self._backend.slots)

    def wait_for_workers(self, n: int = 1, timeout: float = 60.0) -> None:
        """Block until at least ``n`` workers are connected; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while len(self.workers) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.workers)} of {n} workers connected after {timeout}s")
            time.sleep(0.02)

    # -- the job API -----------------------------------------------------------------------------------------

    def map(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
            timeout: float | None = None, progress: bool = False, **options: Any) -> list[Any]:
        """``[fn(*args) for args in zip(*iterables)]``, computed by the fleet, in input order.

        Raises the first failing task's exception (with its remote traceback) once that result is reached,
        unless ``return_exceptions=True``. ``progress=True`` shows a tqdm progress bar (terminal or notebook).
        ``timeout`` bounds the whole job. Other keywords are :class:`~foreman.jobs.JobOptions` (``requires``,
        ``resources``, ``priority``, ``retries``, ``retry_on``, ``retry_backoff``, ``return_exceptions``).
        """
        job = self.imap(fn, *iterables, chunksize=chunksize, timeout=timeout, progress=progress, **options)
        try:
            return list(job)
        finally:
            job.close()

    def imap(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
             timeout: float | None = None, progress: bool = False, **options: Any) -> Job:
        """A lazy iterator of results in input order; the input is consumed only as fast as results are."""
        self._check_open()
        self._ship(fn)
        return Job(self, fn, iterables, chunksize, True, timeout, progress, self._options(options))

    def imap_unordered(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
                       timeout: float | None = None, progress: bool = False, **options: Any) -> Job:
        """Like :meth:`imap`, yielding results as they complete."""
        self._check_open()
        self._ship(fn)
        return Job(self, fn, iterables, chunksize, False, timeout, progress, self._options(options))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` on a worker; returns a standard Future.

        An unpicklable function or argument raises SerializationError here, in the caller. For job options
        (``requires``, ``retries``...), use ``fm.options(...).submit(fn, ...)``.
        """
        return self._submit(fn, args, kwargs, self._default_options)

    def options(self, **options: Any) -> Options:
        """This foreman with job options set, for ``submit`` (and ``map``...):
        ``fm.options(requires={"gpu"}, retries=2).submit(train, config)``."""
        return Options(self, self._options(options))

    def _submit(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                options: JobOptions) -> concurrent.futures.Future[Any]:
        self._check_open()
        self._ship(fn)
        digest, function = dumps_function(options.shipped(fn))
        limit = self._backend.max_message_size - protocol.MAX_HEADER_SIZE
        ((_, _, payload),) = _pickle_fitting([(args, kwargs)], 0, limit, self._backend.out_of_band,
                                             self._backend.framed_input)
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self._post(self._submit_on_loop, (digest, id(options)), digest, function,
                   getattr(fn, "__qualname__", repr(fn)), options, future, payload)
        return future

    def _submit_on_loop(self, key: tuple[str, int], digest: str, function: bytes, name: str, options: JobOptions,
                        future: concurrent.futures.Future[Any], payload: Pickled) -> None:
        """Add one call to the open stream of its function and options, opening one if needed."""
        try:
            stream = self._streams.get(key)
            if stream is None or not stream.open:
                stream = self._streams[key] = SubmitStream(self, key, digest, function, name, options)
            stream.add(future, payload)
        except Exception as exc:  # e.g. an option the foreman refuses: the caller's future says so
            if future.set_running_or_notify_cancel():
                future.set_exception(exc)

    def _ship(self, fn: Callable[..., Any]) -> None:
        """Connected to a foreman whose workers are elsewhere: a function from a local module travels by value."""
        if self._server is None:
            ship_by_value(fn)

    def _options(self, options: dict[str, Any]) -> JobOptions:
        if "requires" in options:
            options["requires"] = frozenset(options["requires"])
        if "retry_on" in options and isinstance(options["retry_on"], type):
            options["retry_on"] = (options["retry_on"],)
        try:
            job_options = dataclasses.replace(self._default_options, **options)
        except TypeError as exc:
            raise TypeError(f"unknown job option: {exc}") from None
        return job_options

    # -- detached jobs ---------------------------------------------------------------------------------------

    def submit_job(self, fn: Callable[..., Any], *iterables: Iterable[Any], chunksize: int | None = None,
                   **options: Any) -> JobHandle:
        """Submit ``fn`` over the items as a detached job and return once the foreman holds all its input.

        The job runs on without this process: ``Foreman.connect(...).job(handle.id)`` takes it up later, from
        any process of the same owner, while the foreman keeps it (``retention``). Options as for :meth:`map`.
        """
        self._check_open()
        self._ship(fn)
        job_options = self._options(options)
        json_options = placement_to_json(job_options.placement())  # ValueError for a comparator, here
        if not iterables:
            raise TypeError("submit_job() needs at least one iterable")
        call = protocol.CALL_ONE if len(iterables) == 1 else protocol.CALL_STAR
        items = list(iterables[0] if len(iterables) == 1 else zip(*iterables))
        digest, function = dumps_function(job_options.shipped(fn))
        name = getattr(fn, "__qualname__", repr(fn))
        size = chunksize or max(1, len(items) // (8 * max(self._backend.slots, 1)))
        limit = self._backend.max_message_size - protocol.MAX_HEADER_SIZE
        pieces = [piece for start in range(0, len(items), size)
                  for piece in _pickle_fitting(items[start:start + size], start, limit, framed=True)]
        handle = JobHandle(self, 0)
        handle.id = self._call(self._open_detached(digest, function, call, name, len(items),
                                                   job_options.placement(), json_options, pieces, handle))
        return handle

    async def _open_detached(self, digest: str, function: bytes, call: str, name: str, total: int,
                             placement: dict[str, Any], json_options: dict[str, Any],
                             pieces: list[tuple[int, int, Pickled]], handle: JobHandle) -> int:
        if isinstance(self._backend, RemoteBackend):
            backend = self._backend
            job_id = await backend.accepted(backend.add_job(digest, function, call, handle, name, total,
                                                            detached=True, **placement))
            for start, count, payload in pieces:
                backend.add_batch(job_id, start, count, payload)
            backend.close_input(job_id)
            await backend.query("job", job=job_id)  # answered after the input before it: the foreman has it all
            return job_id
        server = self._backend
        job_id = server.add_stored_job("admin", name, digest, call, function, json_options, total, detached=True).id
        for start, count, payload in pieces:
            server.add_stored_input(job_id, start, count, payload.data)  # pieces are framed per task
        server.attach_stored(job_id, LocalSubscriber(handle))  # before the end, which an empty job reaches at once
        server.close_stored_input(job_id)
        return job_id

    def job(self, job_id: int) -> JobHandle:
        """A handle on a stored job (detached, or a client's), to read its results, wait for it or cancel it.
        LookupError if this foreman has no such job of yours."""
        self._check_open()
        self._job_info(job_id)  # LookupError early
        handle = JobHandle(self, job_id)
        self._call(self._attach, handle)
        return handle

    def _attach(self, handle: JobHandle) -> None:
        if isinstance(self._backend, RemoteBackend):
            self._backend.attach(handle.id, handle)
            return
        self._backend.attach_stored(handle.id, LocalSubscriber(handle))

    def jobs(self, state: str | None = None) -> list[dict[str, Any]]:
        """The stored jobs this foreman keeps (yours only, unless your token is the admin's), newest first."""
        if isinstance(self._backend, RemoteBackend):
            fields = {"state": state} if state else {}
            return list(self._query("jobs", **fields)["jobs"])
        journal = self._backend.journal
        return self._call(lambda: [row.summary() for row in journal.jobs(state=state)])

    def _job_info(self, job_id: int) -> dict[str, Any]:
        if isinstance(self._backend, RemoteBackend):
            return dict(self._query("job", job=job_id)["job"])
        journal = self._backend.journal
        row = self._call(journal.job, job_id)
        if row is None:
            raise LookupError(f"no stored job {job_id} on this foreman")
        return row.summary()

    def _query(self, what: str, **fields: Any) -> dict[str, Any]:
        assert isinstance(self._backend, RemoteBackend)
        return self._call(self._backend.query(what, **fields))

    def executor(self) -> ForemanExecutor:
        """A ``concurrent.futures.Executor`` over this foreman's fleet (its shutdown leaves the foreman up)."""
        return ForemanExecutor(foreman=self)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop local workers and the server; unfinished jobs fail with ForemanClosedError."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._server is None:
                # A submit()'s job ends with its calls: not a minute later, nor at the end of the client's grace.
                self._call(lambda: [stream.end_input() for stream in list(self._streams.values())])
                self._call(self._backend.close())
                return
            self._call(self._server.abort_jobs)
            if self._local is not None:
                self._local.stop()
            self._call(self._server.close())
        finally:
            if self._local is not None:
                self._local.stop()
            self._stop_loop()

    def __enter__(self) -> Foreman:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Foreman {self._backend.address}{' closed' if self._closed else ''}>"

    def _repr_html_(self) -> str:
        """The summary a notebook shows for a foreman (as Dask's ``Client`` does): address, workers, task slots,
        and a link to the dashboard."""
        from foreman.notebook import foreman_summary_html

        if self._closed:
            return foreman_summary_html(self.address, None, None, None, closed=True)
        return foreman_summary_html(self.address, len(self.workers), self.slots, self.dashboard_url)

    # -- crossing into the event loop ------------------------------------------------------------------------

    def _call(self, what: Coroutine[Any, Any, Any] | Callable[..., Any], *args: Any) -> Any:
        """Run a coroutine, or a plain function with ``args``, on the loop and wait for its result."""
        if not asyncio.iscoroutine(what):
            fn = what

            async def wrapper() -> Any:
                return fn(*args)

            what = wrapper()
        return asyncio.run_coroutine_threadsafe(what, self._loop).result()  # type: ignore[arg-type]

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop without waiting. RuntimeError once the foreman is closed."""
        self._loop.call_soon_threadsafe(fn, *args)

    def _check_open(self) -> None:
        if self._closed:
            raise ForemanClosedError("this foreman is closed")

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()
