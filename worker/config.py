"""How a worker runs: :class:`WorkerConfig`, filled by the CLI (``python -m worker --help``) or by a script."""

from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from foreman import local_link, protocol
from foreman.addresses import is_loopback, split_token
from foreman.tls import parse_fingerprint
from worker import sysinfo
from worker.limits import Limits
from worker.prefs import Prefs


#: Where a worker runs: task processes get their work and their shared memory over a Unix socket (``sendmsg``).
SUPPORTED_PLATFORMS = "Linux and macOS"


def unsupported_platform(os_name: str = os.name, has_sendmsg: bool = hasattr(socket.socket, "sendmsg")) -> str | None:
    """Why a worker cannot run on this platform (one line, for its refusal), or None where it can."""
    if os_name == "posix" and has_sendmsg:
        return None
    return (f"workers run on {SUPPORTED_PLATFORMS} (POSIX) only, not yet on Windows: their task processes are "
            "handed work with sendmsg, which this platform lacks (WSL is Linux, and works)")


def default_worker_id() -> str:
    """``CROWDCOMPUTE_WORKER_ID`` if set (a hard restart pins it there), else hostname plus a random suffix."""
    return os.environ.get("CROWDCOMPUTE_WORKER_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


@dataclass
class WorkerConfig:
    """How a worker runs. Field names follow the prototype, so its users' configs keep working.

    :param foreman_url: the foreman's ``ws://host:port`` address; ``wss://`` for TLS; ``unix:PATH`` for the
        private socket of a foreman on this machine (how a foreman's own local workers dial it). An address
        that carries a token (``ws://host:port/?token=T``, as a foreman that made up its token prints it) is
        split: the worker dials the address without it and sends ``T`` in its HELLO (``token`` wins).
    :param worker_id: a stable name; a worker that reconnects under the same id replaces its old connection.
    :param token: the shared secret the foreman expects, if it has one.
    :param max_concurrent_tasks: task processes run at once (default: CPU count).
    :param auto_restart: reconnect (with backoff) when the connection drops; if False, exit instead.
    :param heartbeat_interval: seconds between heartbeats until the foreman says otherwise in its WELCOME.
    :param capabilities: labels a job may require (``gpu``, ``high-memory``, ...).
    :param drain_timeout: on SIGTERM, seconds to let running tasks finish before handing them back.
    :param max_message_size: largest message accepted from the foreman; bounds memory per message.
    :param reconnect_max_delay: upper bound of the exponential reconnect backoff, in seconds.
    :param start_method: multiprocessing start method for task processes.
    :param parent_pid: exit when this process ends (used by a foreman's local workers).
    :param dashboard: serve the dashboard and HTTP API (needs fastapi, uvicorn, jinja2, prometheus-client).
    :param dashboard_host: address the dashboard listens on; anything but loopback needs ``dashboard_token``.
    :param dashboard_port: its port; when taken, the next free one is used (0 picks any free port).
    :param dashboard_token: secret for restarting the worker and for the live page (and for everything when
        the dashboard is off loopback). Not the foreman's token: that one is shared with the foreman.
    :param dashboard_insecure: allow a non-loopback dashboard without a token (anyone who reaches it can restart
        the worker).
    :param cafile: for ``wss://``: verify the foreman's certificate (and hostname) against this PEM CA file
        instead of the system's CA store.
    :param fingerprint: for ``wss://``: the foreman's certificate must have this SHA-256 fingerprint
        (``sha256:HEX``); without ``cafile`` no CA is consulted.
    :param max_task_seconds: a task running longer fails with TaskTimeoutError (the volunteer's cap).
    :param max_memory: bytes of address space a task process may use; beyond it a task gets MemoryError.
    :param prefs: the owner's preferences: when to pause, and caps on cores and CPU (:class:`worker.prefs.Prefs`).
        Its ``max_cores`` lowers ``max_concurrent_tasks``.
    """

    foreman_url: str = "ws://127.0.0.1:9000"
    worker_id: str = field(default_factory=default_worker_id)
    token: str | None = None
    max_concurrent_tasks: int = field(default_factory=sysinfo.cpu_count)
    auto_restart: bool = True
    heartbeat_interval: float = 5.0
    capabilities: list[str] = field(default_factory=list)
    drain_timeout: float = 30.0
    max_message_size: int = protocol.DEFAULT_MAX_MESSAGE_SIZE
    reconnect_max_delay: float = 30.0
    start_method: str = "spawn"
    parent_pid: int | None = None
    dashboard: bool = True
    dashboard_host: str = "127.0.0.1"
    dashboard_port: int = 8001
    dashboard_token: str | None = None
    dashboard_insecure: bool = False
    cafile: str | None = None
    fingerprint: str | None = None
    max_task_seconds: float | None = None
    max_memory: int | None = None
    prefs: Prefs = field(default_factory=Prefs)

    def __post_init__(self) -> None:
        self.foreman_url, carried = split_token(self.foreman_url)
        if self.token is None:
            self.token = carried
        if self.max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be >= 1")
        if self.prefs.max_cores is not None:
            self.max_concurrent_tasks = min(self.max_concurrent_tasks, self.prefs.max_cores)
        if not self.foreman_url.startswith(("ws://", "wss://", local_link.SCHEME)):
            raise ValueError(f"foreman_url must start with ws://, wss:// or {local_link.SCHEME} (a foreman's "
                             f"private socket on this machine), got {self.foreman_url!r}")
        if (self.cafile or self.fingerprint) and not self.foreman_url.startswith("wss://"):
            raise ValueError(f"--cafile and --fingerprint verify a TLS foreman: give a wss:// address, not "
                             f"{self.foreman_url}")
        if self.fingerprint is not None:
            self.fingerprint = parse_fingerprint(self.fingerprint)
        if self.max_task_seconds is not None and self.max_task_seconds <= 0:
            raise ValueError(f"max_task_seconds must be > 0, got {self.max_task_seconds}")
        if self.max_memory is not None and self.max_memory <= 0:
            raise ValueError(f"max_memory must be > 0 bytes, got {self.max_memory}")
        if not 0 <= self.dashboard_port <= 65535:
            raise ValueError(f"dashboard_port must be between 0 and 65535, got {self.dashboard_port}")
        if (self.dashboard and not is_loopback(self.dashboard_host) and not self.dashboard_token
                and not self.dashboard_insecure):
            raise ValueError(f"a dashboard on {self.dashboard_host} would let anyone who reaches it restart this "
                             "worker: set a dashboard token (--dashboard-token or CROWDCOMPUTE_DASHBOARD_TOKEN), "
                             "or pass --insecure")

    @property
    def limits(self) -> Limits:
        """The volunteer's caps on each task."""
        return Limits(self.max_task_seconds, self.max_memory)

    @property
    def token_in_clear(self) -> bool:
        """A token would travel unencrypted beyond this machine (``ws://`` to a non-loopback host)."""
        host = urlsplit(self.foreman_url).hostname or ""
        return bool(self.token) and self.foreman_url.startswith("ws://") and not is_loopback(host)
