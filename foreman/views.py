"""JSON views of the fleet: the fleet's records joined with the scheduler's live state.

Shared by the HTTP API, the dashboard's live socket and the Prometheus metrics. Runs on the foreman's loop.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from foreman.fleet import JobRecord, WorkerRecord
from foreman.scheduler import State

if TYPE_CHECKING:
    from foreman.server import ForemanServer

#: Finished jobs shown in a snapshot (the API lists all that are kept).
RECENT_JOBS = 20
RECENT_EVENTS = 60
#: Volunteers and workers shown on the dashboard's leaderboard (the API lists all).
LEADERS = 20


def worker_view(server: ForemanServer, record: WorkerRecord) -> dict[str, Any]:
    live = server.scheduler.workers.get(record.id) if record.left_at is None else None
    running = sum(batch.count for batch in live.batches.values()) if live else 0
    view = record.to_json(time.time(), running)
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


def jobs(server: ForemanServer, finished_limit: int | None = None) -> list[dict[str, Any]]:
    """Running jobs, then finished ones, most recent first."""
    fleet = server.fleet
    finished = list(reversed(fleet.finished_jobs))
    if finished_limit is not None:
        finished = finished[:finished_limit]
    return [job_view(server, r) for r in reversed(fleet.jobs.values())] + [job_view(server, r) for r in finished]


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


def snapshot(server: ForemanServer) -> dict[str, Any]:
    """Everything the dashboard page shows, in one message."""
    fleet = server.fleet
    return {
        "time": time.time(), "address": server.address, "totals": totals(server), "workers": workers(server),
        "jobs": jobs(server, RECENT_JOBS), "series": list(fleet.series),
        "events": list(fleet.events)[-RECENT_EVENTS:], "leaderboard": server.trust.ledger.leaderboard(LEADERS),
    }
