"""Who may do what: the one decision that both the WebSocket side and the HTTP side of the foreman ask.

:func:`authorize` answers for a :class:`~foreman.auth.Principal` (admin, client, worker, or the loopback
*viewer*: an unauthenticated reader on this machine) and an action; for actions on a job, its owner decides.
The table, in words:

=============  =====  ======  ============================  ==============  =================
role           join   submit  read the fleet (workers...)   see/cancel job  ban/restart worker
=============  =====  ======  ============================  ==============  =================
admin          yes    yes     yes                           any             yes
client         no     yes     yes                           its own         no
worker         yes    no      no                            no              no
viewer         no     no      yes                           see the admin's no
=============  =====  ======  ============================  ==============  =================

The viewer exists so that a script's own dashboard stays readable on its machine without typing a token; it can
change nothing, and never sees a client's jobs.

The browser checks live here too, as pure functions of request headers: :func:`host_allowed` (a foreman on
loopback answers only to loopback names, so a DNS-rebinding page cannot reach it under its own name) and
:func:`origin_allowed` (a browser page from another site may not drive the foreman: no cross-site WebSocket, no
cross-site POST). Clients other than browsers send no ``Origin`` and pass.
"""

from __future__ import annotations

from enum import Enum
from urllib.parse import urlsplit

from foreman.addresses import is_loopback
from foreman.auth import ADMIN, CLIENT, VIEWER, WORKER, Principal

#: Owners of jobs that belong to the admin: a script's embedded jobs ("") and the admin principal's stored ones.
ADMIN_OWNERS = frozenset({"", "admin"})


class Action(Enum):
    JOIN = "join"  # connect as a worker and run tasks
    SUBMIT = "submit"  # connect as a client: submit jobs, stream their input
    READ = "read"  # the fleet's view: workers, totals, leaderboard, metrics
    SEE_JOB = "see job"  # a job's progress, failures, results
    CANCEL_JOB = "cancel job"
    CONTROL_WORKER = "control worker"  # ban, unban, restart


_ALLOWED: dict[str, frozenset[Action]] = {
    ADMIN: frozenset(Action),
    CLIENT: frozenset({Action.SUBMIT, Action.READ, Action.SEE_JOB, Action.CANCEL_JOB}),
    WORKER: frozenset({Action.JOIN}),
    VIEWER: frozenset({Action.READ, Action.SEE_JOB}),
}


def authorize(principal: Principal | None, action: Action, owner: str | None = None) -> bool:
    """May ``principal`` do ``action`` (on a job of ``owner``)? None (nobody authenticated) may do nothing."""
    if principal is None or action not in _ALLOWED.get(principal.role, frozenset()):
        return False
    if action in (Action.SEE_JOB, Action.CANCEL_JOB) and principal.role != ADMIN:
        mine = ADMIN_OWNERS if principal.role == VIEWER else {principal.name}
        return owner in mine
    return True


def refusal(principal: Principal | None, action: Action) -> str:
    """Why ``authorize`` said no, in words for the peer."""
    if principal is None:
        return "token required"
    if action is Action.JOIN:
        return f"a {principal.role} token cannot join as a worker"
    if action is Action.SUBMIT:
        return f"a {principal.role} token cannot connect as a client"
    return f"a {principal.role} token may not {action.value}"


# -- browsers ----------------------------------------------------------------------------------------------------

def _hostname(netloc: str) -> str:
    return (urlsplit(f"//{netloc}").hostname or "") if netloc else ""


def host_allowed(host_header: str | None, bound_host: str) -> bool:
    """A foreman bound to loopback answers only requests addressed to a loopback name (``Host``): a page whose
    own name was rebound to 127.0.0.1 (DNS rebinding) is refused. A foreman bound elsewhere takes any name."""
    if not is_loopback(bound_host) and bound_host not in ("", "localhost"):
        return True
    if not host_header:
        return True  # HTTP/1.0 clients; a browser always sends Host
    return is_loopback(_hostname(host_header))


def origin_allowed(origin: str | None, host_header: str | None, own_ports: tuple[int, ...] = ()) -> bool:
    """A browser's request comes from one of the foreman's own pages: its ``Origin`` names the host the request
    was sent to (``Host``), on that port or one of ``own_ports`` (the dashboard's, the WebSocket port's).
    No ``Origin`` at all (scripts, workers, curl) passes; ``Origin: null`` (sandboxed or file pages) does not."""
    if origin is None:
        return True
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or not host_header:
        return False
    if parts.netloc == host_header:
        return True
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return False
    return parts.hostname == _hostname(host_header) and port in own_ports
