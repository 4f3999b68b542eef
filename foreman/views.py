"""JSON views of the fleet: the fleet's records joined with the scheduler's live state.

Shared by the HTTP API, the dashboard's live socket and the Prometheus metrics. Runs on the foreman's loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from foreman.fleet import JobRecord, WorkerRecord
from foreman.scheduler import State

if TYPE_CHECKING:
    from foreman.server import ForemanServer

#: Finished jobs shown in a snapshot (the API lists all that are kept).
RECENT_JOBS = 20
RECENT_EVENTS = 60
#: Volunteers and workers shown on the dashboard's leaderboard (the API lists all).
LEADERS = 20
#: Event kinds that name jobs: shown only to whom may see every job (the admin, the loopback viewer).
JOB_EVENTS = frozenset({"job", "poison", "replica", "waiting"})
#: Characters kept of a fact a worker states about itself (host name, platform...), items kept of a list of them.
MAX_FACT, MAX_ITEMS = 200, 64


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:MAX_FACT]


def _number(value: Any) -> float | int | None:
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return value
    return None


def dashboard_link(value: Any) -> str | None:
    """A worker's dashboard address, only as an http(s) URL: a ``javascript:`` link would run in the operator's
    page when clicked."""
    if not isinstance(value, str) or len(value) > MAX_FACT:
        return None
    try:
        parts = urlsplit(value)
    except ValueError:
        return None
    return value if parts.scheme in ("http", "https") and parts.netloc else None


def worker_facts(view: dict[str, Any]) -> dict[str, Any]:
    """What a worker said about itself in its HELLO, in the shapes the dashboard expects: strings, non-negative
    numbers, lists of strings, GPUs with a name, an http(s) dashboard link; anything else becomes None or is
    left out. A worker's malformed facts must not break the operator's page."""
    for key in ("host", "platform", "machine", "python", "version"):
        view[key] = _text(view.get(key))
    for key in ("cpu_count", "memory", "concurrency"):
        view[key] = _number(view.get(key))
    capabilities = view.get("capabilities")
    view["capabilities"] = ([str(c)[:MAX_FACT] for c in capabilities[:MAX_ITEMS]]
                            if isinstance(capabilities, list) else [])
    gpus = view.get("gpus")
    view["gpus"] = ([{**{k: v for k, v in g.items() if isinstance(k, str) and type(v) in (str, int, float, bool)},
                      "name": str(g.get("name", "GPU"))[:MAX_FACT]}
                     for g in gpus[:MAX_ITEMS] if isinstance(g, dict)] if isinstance(gpus, list) else [])
    view["dashboard"] = dashboard_link(view.get("dashboard"))
    return view


def worker_view(server: ForemanServer, record: WorkerRecord) -> dict[str, Any]:
    live = server.scheduler.workers.get(record.id) if record.left_at is None else None
    running = sum(batch.count for batch in live.batches.values()) if live else 0
    view = worker_facts(record.to_json(time.time(), running))
    peer = server.peers.get(record.id)
    view["volunteer"] = peer.principal.name if peer else server.trust.ledger.volunteer_of.get(record.id)
    view["trusted"] = bool(live and live.trusted)
    view["reputation"] = server.trust.reputation.to_json(record.id)
    return view


def job_view(server: ForemanServer, record: JobRecord) -> dict[str, Any]:
    live = server.scheduler.jobs.get(record.id) if record.finished_at is None else None
    running = queued = 0
    if live is not None:
        for batch in live.live.values():
            if batch.state is State.ASSIGNED:
                running += batch.count
            else:
                queued += batch.count
    view = record.to_json(time.time(), running, queued)
    if live is not None and live.has_queued and not server.scheduler.can_be_served(live):
        view["state"] = "waiting"  # no connected worker can run it (requirements or environment)
    return view


def workers(server: ForemanServer) -> list[dict[str, Any]]:
    """Connected workers first, then departed ones, most recent first."""
    fleet = server.fleet
    return ([worker_view(server, r) for r in fleet.workers.values()]
            + [worker_view(server, r) for r in reversed(fleet.departed)])


def jobs(server: ForemanServer, finished_limit: int | None = None,
         may_see: Callable[[str], bool] = lambda owner: True) -> list[dict[str, Any]]:
    """Running jobs, then finished ones, most recent first; only those whose owner ``may_see`` accepts."""
    fleet = server.fleet
    finished = [r for r in reversed(fleet.finished_jobs) if may_see(r.owner)]
    if finished_limit is not None:
        finished = finished[:finished_limit]
    return ([job_view(server, r) for r in reversed(fleet.jobs.values()) if may_see(r.owner)]
            + [job_view(server, r) for r in finished])


def totals(server: ForemanServer) -> dict[str, Any]:
    scheduler, fleet = server.scheduler, server.fleet
    queued = sum(batch.count for job in scheduler.jobs.values() for batch in job.live.values()
                 if batch.state is State.QUEUED)
    return {
        "workers_connected": len(scheduler.workers), "slots": scheduler.slots, "jobs_running": len(fleet.jobs),
        "tasks_done": fleet.tasks_done, "tasks_failed": fleet.tasks_failed, "tasks_queued": queued,
        "reassigned": scheduler.reassigned, "duplicates_dropped": scheduler.duplicates_dropped,
        "workers_lost": scheduler.workers_lost, "replicas_added": scheduler.replicas_added, "bytes_in": server.bytes_in, "bytes_out": server.bytes_out,
    }


def snapshot(server: ForemanServer, may_see: Callable[[str], bool] = lambda owner: True,
             job_events: bool = True) -> dict[str, Any]:
    """Everything the dashboard page shows, in one message: the jobs ``may_see`` accepts, and the events that
    name jobs only with ``job_events``."""
    fleet = server.fleet
    events = [e for e in fleet.events if job_events or e["kind"] not in JOB_EVENTS][-RECENT_EVENTS:]
    return {
        "time": time.time(), "address": server.address, "totals": totals(server), "workers": workers(server),
        "jobs": jobs(server, RECENT_JOBS, may_see), "series": list(fleet.series),
        "events": events, "leaderboard": server.trust.ledger.leaderboard(LEADERS),
    }
