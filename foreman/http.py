"""The foreman's HTTP side: the fleet dashboard, the JSON API, health and Prometheus metrics.

A FastAPI app served by uvicorn on the foreman's own event loop, so handlers read the server's state directly.
Imported only when the dashboard is enabled: a worker never imports it.

Access: with no token, everything is open (keep the foreman on loopback then). With tokens, control endpoints
(restart, cancel, ban) always need an admin or client token (see :mod:`foreman.auth`; a worker token is not enough),
and so does everything else for clients that are not on loopback. A token is accepted as
``Authorization: Bearer <token>``, or as the cookie set by the ``login`` form.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, HTTPException, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)

import dashboard
from dashboard.serving import QuietServer
from foreman import views
from foreman.addresses import is_loopback
from foreman.auth import ADMIN, CLIENT
from foreman.fleet import DURATION_BUCKETS

if TYPE_CHECKING:
    from foreman.server import ForemanServer

log = logging.getLogger("crowdcompute.foreman")

COOKIE = "crowdcompute_token"
#: Seconds between live snapshots pushed to dashboard pages.
PUSH_INTERVAL = 1.0


def create_app(server: ForemanServer) -> FastAPI:
    app = FastAPI(title="CrowdCompute foreman", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    templates = dashboard.templates()
    registry = CollectorRegistry()
    registry.register(_Metrics(server))

    auth = server.auth

    def authorized(request: Request | WebSocket) -> bool:
        offered = request.cookies.get(COOKIE) or ""
        header = request.headers.get("authorization", "")
        if header.lower().startswith("bearer "):
            offered = header[7:].strip()
        principal = auth.identify(offered)
        return principal is not None and principal.role in (ADMIN, CLIENT)

    def may_read(request: Request | WebSocket) -> bool:
        return (not auth.required or is_loopback(request.client.host if request.client else "")
                or authorized(request))

    def require_read(request: Request) -> None:
        if not may_read(request):
            raise HTTPException(401, "this foreman needs its token: send 'Authorization: Bearer <token>' "
                                     "or log in at /login")

    def require_control(request: Request) -> None:
        if not authorized(request):
            offered = request.headers.get("authorization") or request.cookies.get(COOKIE)
            raise HTTPException(403 if offered else 401,
                                "control endpoints need the foreman's token ('Authorization: Bearer <token>')")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> Response:
        if not may_read(request):
            return RedirectResponse("login", status_code=303)
        return templates.TemplateResponse(request, "foreman.html", {
            "title": "CrowdCompute foreman", "address": server.address, "token_required": auth.required})

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"title": "Log in", "error": ""})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        offered = parse_qs((await request.body()).decode(errors="replace")).get("token", [""])[0]
        principal = auth.identify(offered) if auth.required else None
        if principal is None or principal.role not in (ADMIN, CLIENT):
            return templates.TemplateResponse(request, "login.html", {"title": "Log in", "error": "wrong token"},
                                              status_code=401)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(COOKIE, offered, httponly=True, samesite="strict")
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the foreman serves; says how many workers are connected."""
        return JSONResponse({"status": "ok", "workers": len(server.peers), "jobs": len(server.jobs)})

    @app.get("/api/workers")
    async def list_workers(request: Request) -> list[dict[str, Any]]:
        require_read(request)
        return views.workers(server)

    @app.get("/api/workers/{worker_id}")
    async def get_worker(worker_id: str, request: Request) -> dict[str, Any]:
        require_read(request)
        record = server.fleet.known_worker(worker_id)
        if record is None:
            raise HTTPException(404, f"no worker {worker_id!r} is connected or remembered")
        return views.worker_view(server, record)

    @app.post("/api/workers/{worker_id}/restart")
    async def restart_worker(worker_id: str, request: Request, hard: bool = False) -> dict[str, Any]:
        require_control(request)
        if not server.restart_worker(worker_id, hard):
            raise HTTPException(404, f"no worker {worker_id!r} is connected")
        return {"worker": worker_id, "restart": "hard" if hard else "soft", "sent": True}

    @app.post("/api/workers/{worker_id}/ban")
    async def ban_worker(worker_id: str, request: Request, reason: str = "") -> dict[str, Any]:
        """The worker gets no more work (also after reconnecting) until unbanned."""
        require_control(request)
        server.trust.ban(worker_id, reason[:200])
        return {"worker": worker_id, "banned": True, "reputation": server.trust.reputation.to_json(worker_id)}

    @app.post("/api/workers/{worker_id}/unban")
    async def unban_worker(worker_id: str, request: Request) -> dict[str, Any]:
        """Lift a ban or a quarantine."""
        require_control(request)
        if not server.trust.unban(worker_id):
            raise HTTPException(409, f"worker {worker_id!r} is neither banned nor quarantined")
        return {"worker": worker_id, "banned": False, "reputation": server.trust.reputation.to_json(worker_id)}

    @app.get("/api/leaderboard")
    async def leaderboard(request: Request) -> dict[str, Any]:
        """Credit by volunteer and by worker: tasks, CPU-seconds, GPU-seconds, validated results."""
        require_read(request)
        return server.trust.ledger.leaderboard()

    @app.get("/api/jobs")
    async def list_jobs(request: Request) -> list[dict[str, Any]]:
        require_read(request)
        return views.jobs(server)

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: int, request: Request) -> dict[str, Any]:
        require_read(request)
        record = server.fleet.known_job(job_id)
        if record is None:
            raise HTTPException(404, f"no job {job_id} is running or remembered")
        return views.job_view(server, record)

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: int, request: Request) -> dict[str, Any]:
        require_control(request)
        if not server.cancel_job(job_id):
            known = server.fleet.known_job(job_id)
            raise HTTPException(404 if known is None else 409,
                                f"no job {job_id}" if known is None else f"job {job_id} already {known.state}")
        return {"job": job_id, "cancelled": True}

    @app.get("/api/status")
    async def status(request: Request) -> dict[str, Any]:
        """Everything the dashboard shows, as pushed on /ws."""
        require_read(request)
        return views.snapshot(server)

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        require_read(request)
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.websocket("/ws")
    async def live(ws: WebSocket) -> None:
        if not may_read(ws):
            await ws.close(code=4001, reason="token required")
            return
        await ws.accept()
        try:
            while True:
                await ws.send_json(views.snapshot(server))
                await asyncio.sleep(PUSH_INTERVAL)
        except (WebSocketDisconnect, RuntimeError):
            pass

    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app


class HttpServer:
    """uvicorn serving the app on the foreman's loop, on a socket bound up front (so port 0 and errors are
    known at once); over https with ``ssl_context`` (uvicorn wraps the given socket with it)."""

    def __init__(self, server: ForemanServer, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(128)
        self.host = host
        self.port: int = self.socket.getsockname()[1]
        self.scheme = "https" if ssl_context else "http"
        config = uvicorn.Config(create_app(server), log_level="warning", lifespan="off", access_log=False,
                                ws_max_size=1 << 20,
                                ssl_context_factory=(lambda *_: ssl_context) if ssl_context else None)
        self._uvicorn = QuietServer(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/"

    def start(self) -> None:
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[self.socket]))

    async def close(self) -> None:
        self._uvicorn.stop()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, 5)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._task.cancel()
        self.socket.close()


class _Metrics:
    """Prometheus collector computed at scrape time from the foreman's own counters (no hot-path cost)."""

    def __init__(self, server: ForemanServer) -> None:
        self.server = server

    def collect(self) -> Any:
        server, fleet = self.server, self.server.fleet
        totals = views.totals(server)
        tasks = CounterMetricFamily("crowdcompute_tasks", "Tasks finished, by outcome", labels=["state"])
        tasks.add_metric(["done"], totals["tasks_done"])
        tasks.add_metric(["failed"], totals["tasks_failed"])
        yield tasks
        yield GaugeMetricFamily("crowdcompute_tasks_queued", "Tasks waiting for a worker", totals["tasks_queued"])
        running = sum(b.count for w in server.scheduler.workers.values() for b in w.batches.values())
        yield GaugeMetricFamily("crowdcompute_tasks_running", "Tasks in flight on workers", running)
        yield GaugeMetricFamily("crowdcompute_workers_connected", "Connected workers", totals["workers_connected"])
        yield GaugeMetricFamily("crowdcompute_jobs_running", "Jobs not yet finished", totals["jobs_running"])
        yield CounterMetricFamily("crowdcompute_reassignments", "Batches requeued after a worker was lost",
                                  totals["reassigned"])
        yield CounterMetricFamily("crowdcompute_duplicates_dropped", "Results dropped as duplicate or stale",
                                  totals["duplicates_dropped"])
        yield CounterMetricFamily("crowdcompute_workers_lost", "Workers declared lost", totals["workers_lost"])
        yield CounterMetricFamily("crowdcompute_replicas_added", "Extra replicas run after disagreeing results",
                                  totals["replicas_added"])
        traffic = CounterMetricFamily("crowdcompute_bytes", "WebSocket payload bytes", labels=["direction"])
        traffic.add_metric(["in"], totals["bytes_in"])
        traffic.add_metric(["out"], totals["bytes_out"])
        yield traffic
        buckets, cumulative = [], 0
        for bound, count in zip(DURATION_BUCKETS, fleet.duration_buckets):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
        yield HistogramMetricFamily("crowdcompute_task_duration_seconds", "Task run time (batch mean per task)",
                                    buckets=buckets, sum_value=fleet.duration_sum)
