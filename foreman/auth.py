"""Who may connect, and as whom: tokens, a token file with revocation, and a brake on guessing.

Three kinds of credential:

- the foreman's own ``token`` (admin): may do everything; workers given it are accepted too, so a single
  shared secret keeps working for small fleets;
- worker tokens, from the ``[workers]`` table of a token file (or the one ``worker_token`` a foreman makes up for
  itself, see :meth:`Authenticator.generated`): may join as a worker and nothing else;
- client tokens, from the ``[clients]`` table: may submit jobs and see and cancel their own, never join as a
  worker nor control workers.

There is no anonymous access: a foreman given no token makes one up (:meth:`Authenticator.generated`), as Jupyter
does. What each role may do is decided in one place, :func:`foreman.permissions.authorize`.

The token file is TOML, one name per token::

    [workers]
    alice-laptop = "w-2b7e..."
    [trusted_workers]
    lab-rack-1 = "t-51c0..."
    [clients]
    bob = "c-9f41..."

Workers in ``[trusted_workers]`` are ones the operator vouches for: they run spot checks (their results are
taken as the reference) and are never quarantined. So are workers joining with the admin token, and an embedded
foreman's local workers (which join with a secret of their own, :meth:`Authenticator.local_token`).

It is re-read when it changes; a worker whose token was removed is disconnected. Tokens are compared in
constant time.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

log = logging.getLogger("crowdcompute.foreman")

ADMIN, WORKER, CLIENT = "admin", "worker", "client"
#: An unauthenticated reader of the dashboard on loopback (see :mod:`foreman.permissions`); no token maps to it.
VIEWER = "viewer"


@dataclass(frozen=True)
class Principal:
    """Who a token belongs to: ``role`` is admin, worker or client."""

    name: str
    role: str
    token: str = field(repr=False)
    trusted: bool = False  # a worker whose results are a reference (spot checks); see the module docstring


def load_token_file(path: str | os.PathLike[str]) -> list[Principal]:
    """Parse a token file; ValueError saying what is wrong with it."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read token file {path}: {exc}") from exc
    principals = []
    for table, role in (("workers", WORKER), ("trusted_workers", WORKER), ("clients", CLIENT)):
        entries = data.get(table, {})
        if not isinstance(entries, dict):
            raise ValueError(f"token file {path}: [{table}] must be a table of name = \"token\"")
        for name, token in entries.items():
            if not isinstance(token, str) or len(token) < 8:
                raise ValueError(f"token file {path}: {table}.{name} must be a string of at least 8 characters")
            principals.append(Principal(name, role, token, trusted=table == "trusted_workers"))
    unknown = set(data) - {"workers", "trusted_workers", "clients"}
    if unknown:
        raise ValueError(f"token file {path}: unknown tables {sorted(unknown)} "
                         "(expected [workers], [trusted_workers], [clients])")
    return principals


class Authenticator:
    """Checks offered tokens against the admin token and the token file."""

    def __init__(self, token: str | None = None, token_file: str | os.PathLike[str] | None = None,
                 worker_token: str | None = None) -> None:
        self.token = token
        self.worker_token = worker_token
        self.token_file = Path(token_file) if token_file is not None else None
        self._principals: list[Principal] = []
        self._mtime = 0.0
        self._local: str | None = None
        if self.token_file is not None:
            self._principals = load_token_file(self.token_file)
            self._mtime = self.token_file.stat().st_mtime

    @classmethod
    def generated(cls) -> Authenticator:
        """For a foreman given no token: a random admin token (for its dashboard and clients) and a random worker
        token (for the address its workers dial), each 32 bytes from :mod:`secrets`."""
        return cls(secrets.token_urlsafe(32), worker_token=secrets.token_urlsafe(32))

    @property
    def principals(self) -> list[Principal]:
        """The token file's principals (not the admin)."""
        return list(self._principals)

    @property
    def has_clients(self) -> bool:
        """The token file names clients: principals whose jobs others must not see."""
        return any(p.role == CLIENT for p in self._principals)

    @property
    def required(self) -> bool:
        return self.token is not None or self.token_file is not None

    def local_token(self) -> str:
        """A secret for this process's own (local) workers: they join as the trusted worker ``local``."""
        if self._local is None:
            self._local = secrets.token_urlsafe(24)
        return self._local

    def identify(self, offered: str | None) -> Principal | None:
        """The principal ``offered`` belongs to, or None (also when this foreman has no token at all: nobody
        but its local workers may connect then)."""
        if self._local is not None and offered and hmac.compare_digest(offered.encode(), self._local.encode()):
            return Principal("local", WORKER, self._local, trusted=True)
        if not offered:
            return None
        found = None
        for principal in self._all():  # no early exit: the time taken does not depend on which matched
            if hmac.compare_digest(offered.encode(), principal.token.encode()):
                found = found or principal
        return found

    def identify_session(self, offered: str, session: Callable[[str], str]) -> Principal | None:
        """The admin or client whose login cookie is ``offered``: ``session(token)`` is the cookie a token gives
        (a digest: the browser never holds the token itself). None if it is nobody's (or the token was revoked)."""
        found = None
        if not offered:
            return None
        for principal in self._all():
            if principal.role in (ADMIN, CLIENT) and hmac.compare_digest(offered.encode(),
                                                                       session(principal.token).encode()):
                found = found or principal
        return found

    def _all(self) -> list[Principal]:
        everyone = list(self._principals)
        if self.token is not None:
            everyone.insert(0, Principal("admin", ADMIN, self.token, trusted=True))
        if self.worker_token is not None:
            everyone.append(Principal("worker", WORKER, self.worker_token))
        return everyone

    def reload_if_changed(self) -> list[Principal]:
        """Re-read the token file if it changed; returns the principals whose tokens were removed."""
        if self.token_file is None:
            return []
        try:
            mtime = self.token_file.stat().st_mtime
            if mtime == self._mtime:
                return []
            fresh = load_token_file(self.token_file)
        except (OSError, ValueError) as exc:
            log.error("token file not reloaded, keeping the old tokens: %s", exc)
            return []
        self._mtime = mtime
        kept = {p.token for p in fresh}
        removed = [p for p in self._principals if p.token not in kept]
        self._principals = fresh
        log.info("token file reloaded: %d tokens, %d revoked", len(fresh), len(removed))
        return removed


class RefusalLimiter:
    """After ``limit`` refused handshakes from one address within ``window`` seconds, that address is turned
    away at once until the window has passed. Bounds how fast a stranger can guess tokens; other addresses
    are unaffected. Memory is bounded by ``max_addresses``."""

    def __init__(self, limit: int = 10, window: float = 60.0, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window = window
        self.max_addresses = max_addresses
        self._refusals: dict[str, deque[float]] = {}

    def blocked(self, address: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        times = self._refusals.get(address)
        if times is None:
            return False
        while times and times[0] < now - self.window:
            times.popleft()
        if not times:
            del self._refusals[address]
            return False
        return len(times) >= self.limit

    def refused(self, address: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if address not in self._refusals and len(self._refusals) >= self.max_addresses:
            self._refusals.pop(next(iter(self._refusals)))  # forget the oldest address
        self._refusals.setdefault(address, deque(maxlen=self.limit)).append(now)
