"""How a worker runs: :class:`WorkerConfig`, filled by the CLI (``python -m worker --help``) or by a script."""

from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from dataclasses import dataclass, field

from foreman import protocol
from worker import sysinfo


def default_worker_id() -> str:
    """``CROWDCOMPUTE_WORKER_ID`` if set (a hard restart pins it there), else hostname plus a random suffix."""
    return os.environ.get("CROWDCOMPUTE_WORKER_ID") or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class WorkerConfig:
    """How a worker runs. Field names follow the prototype, so its users' configs keep working.

    :param foreman_url: the foreman's ``ws://host:port`` address.
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

    def __post_init__(self) -> None:
        if self.max_concurrent_tasks < 1:
            raise ValueError("max_concurrent_tasks must be >= 1")
        if not self.foreman_url.startswith(("ws://", "wss://")):
            raise ValueError(f"foreman_url must start with ws:// or wss://, got {self.foreman_url!r}")
        if not 0 <= self.dashboard_port <= 65535:
            raise ValueError(f"dashboard_port must be between 0 and 65535, got {self.dashboard_port}")
        if (self.dashboard and not is_loopback(self.dashboard_host) and not self.dashboard_token
                and not self.dashboard_insecure):
            raise ValueError(f"a dashboard on {self.dashboard_host} would let anyone who reaches it restart this "
                             "worker: set a dashboard token (--dashboard-token or CROWDCOMPUTE_DASHBOARD_TOKEN), "
                             "or pass --insecure")
