"""The foreman's HTTP side: the fleet dashboard, the JSON API, health and Prometheus metrics.

A FastAPI app served by uvicorn on the foreman's own event loop, so handlers read the server's state directly.
Imported only when the dashboard is enabled: a worker never imports it.

Access: who a request is comes from ``Authorization: Bearer <token>``, or the login cookie (a digest of the token,
see :mod:`dashboard.access`), set by the ``login`` form or by opening the page once as ``/?token=<token>`` (the
link a foreman prints). What it may do is :func:`foreman.permissions.authorize`'s answer, the same as on the
WebSocket side: clients see and cancel their own jobs only, workers and clients cannot ban or restart workers.
A request without credentials from this machine reads as the *viewer*: the fleet and the admin's jobs, never a
client's, and nothing it can change; from elsewhere it needs a token.

Browsers: on a loopback foreman, a ``Host`` that is not a loopback name is refused (DNS rebinding); a POST or a
live socket opened by a page of another site (its ``Origin``) is refused (CSRF, cross-site WebSocket); every
response carries ``X-Frame-Options``/CSP headers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
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
from starlette.requests import HTTPConnection

import dashboard
from dashboard import access
from dashboard.serving import GuardedH11Protocol, QuietServer
from foreman import views
from foreman.addresses import is_loopback
from foreman.auth import ADMIN, CLIENT, VIEWER, Principal
from foreman.fleet import DURATION_BUCKETS
from foreman.permissions import Action, authorize, host_allowed

if TYPE_CHECKING:
    from foreman.server import ForemanServer

log = logging.getLogger("crowdcompute.foreman")

#: What the login cookie's digest is bound to (the worker dashboard's differs, so one cannot stand for the other).
PURPOSE = "foreman dashboard"
#: Seconds between live snapshots pushed to dashboard pages.
PUSH_INTERVAL = 1.0
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def create_app(server: ForemanServer, port: int = 0) -> FastAPI:
    app = FastAPI(title="CrowdCompute foreman", docs_url="/api/docs", openapi_url="/api/openapi.json",
                  redoc_url=None)
    templates = dashboard.templates()
    registry = CollectorRegistry()
    registry.register(_Metrics(server))

    auth = server.auth
    cookie = access.cookie_name("foreman", port)

    def session(token: str) -> str:
        return access.session(token, PURPOSE)

    def who(conn: HTTPConnection) -> tuple[Principal | None, bool]:
        """The principal of a request, and whether it offered credentials at all."""
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            return auth.identify(credentials.strip()), True
        offered = conn.cookies.get(cookie)
        if offered:
            principal = auth.identify_session(offered, session)
            if principal is not None:
                return principal, True
        if is_loopback(conn.client.host if conn.client else ""):
            return Principal("viewer", VIEWER, ""), bool(offered)
        return None, bool(offered)

    def require(conn: HTTPConnection, action: Action, owner: str | None = None) -> Principal:
        principal, offered = who(conn)
        if not authorize(principal, action, owner):
            if principal is None or principal.role == VIEWER:
                if not offered:
                    raise HTTPException(401, "this needs the foreman's token: send 'Authorization: Bearer <token>' "
                                             "or log in at /login", headers={"WWW-Authenticate": "Bearer"})
                raise HTTPException(403, "wrong token")
            raise HTTPException(403, f"a {principal.role} token may not {action.value}")
        assert principal is not None
        return principal

    def may_see(principal: Principal) -> Callable[[str], bool]:
        return lambda owner: authorize(principal, Action.SEE_JOB, owner)

    def job_events(principal: Principal) -> bool:
        """Events name jobs but not their owners: only for whom may see every job (the viewer while there are no
        clients)."""
        return principal.role == ADMIN or (principal.role == VIEWER and not auth.has_clients)

    def logged_in(token: str, request: Request) -> Response:
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(cookie, session(token), path=None, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.middleware("http")
    async def browsers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        host = request.headers.get("host")
        if not host_allowed(host, server.host):
            response: Response = JSONResponse({"detail": "unknown Host: this foreman answers to loopback names "
                                                         "only"}, status_code=403)
        elif request.method in _STATE_CHANGING and not access.same_origin(request):
            response = JSONResponse({"detail": "cross-site request refused"}, status_code=403)
        else:
            response = await call_next(request)
        headers = access.security_headers(host)
        if request.url.path == app.docs_url:  # FastAPI's Swagger page runs inline and CDN scripts: no CSP there
            del headers["Content-Security-Policy"]
        response.headers.update(headers)
        return response

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(request: Request) -> Response:
        offered = request.query_params.get("token")
        if offered is not None:  # the link a foreman prints: log in once, then a clean address
            principal = auth.identify(offered)
            if principal is None or principal.role not in (ADMIN, CLIENT):
                return templates.TemplateResponse(request, "login.html", {"title": "Log in", "error": "wrong token"},
                                                  status_code=401)
            return logged_in(offered, request)
        principal, _ = who(request)
        if not authorize(principal, Action.READ):
            return RedirectResponse("login", status_code=303)
        return templates.TemplateResponse(request, "foreman.html", {
            "title": "CrowdCompute foreman", "address": server.address, "token_required": auth.required})

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_form(request: Request) -> Response:
        return templates.TemplateResponse(request, "login.html", {"title": "Log in", "error": ""})

    @app.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        offered = parse_qs((await request.body()).decode(errors="replace")).get("token", [""])[0]
        principal = auth.identify(offered)
        if principal is None or principal.role not in (ADMIN, CLIENT):
            return templates.TemplateResponse(request, "login.html", {"title": "Log in", "error": "wrong token"},
                                              status_code=401)
        return logged_in(offered, request)

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the foreman serves; says how many workers are connected."""
        return JSONResponse({"status": "ok", "workers": len(server.peers), "jobs": len(server.jobs)})

    @app.get("/api/workers")
    async def list_workers(request: Request) -> list[dict[str, Any]]:
        require(request, Action.READ)
        return views.workers(server)

    @app.get("/api/workers/{worker_id}")
    async def get_worker(worker_id: str, request: Request) -> dict[str, Any]:
        require(request, Action.READ)
        record = server.fleet.known_worker(worker_id)
        if record is None:
            raise HTTPException(404, f"no worker {worker_id!r} is connected or remembered")
        return views.worker_view(server, record)

    @app.post("/api/workers/{worker_id}/restart")
    async def restart_worker(worker_id: str, request: Request, hard: bool = False) -> dict[str, Any]:
        require(request, Action.CONTROL_WORKER)
        if not server.restart_worker(worker_id, hard):
            raise HTTPException(404, f"no worker {worker_id!r} is connected")
        return {"worker": worker_id, "restart": "hard" if hard else "soft", "sent": True}

    @app.post("/api/workers/{worker_id}/ban")
    async def ban_worker(worker_id: str, request: Request, reason: str = "") -> dict[str, Any]:
        """The worker gets no more work (also after reconnecting) until unbanned."""
        require(request, Action.CONTROL_WORKER)
        server.trust.ban(worker_id, reason[:200])
        return {"worker": worker_id, "banned": True, "reputation": server.trust.reputation.to_json(worker_id)}

    @app.post("/api/workers/{worker_id}/unban")
    async def unban_worker(worker_id: str, request: Request) -> dict[str, Any]:
        """Lift a ban or a quarantine."""
        require(request, Action.CONTROL_WORKER)
        if not server.trust.unban(worker_id):
            raise HTTPException(409, f"worker {worker_id!r} is neither banned nor quarantined")
        return {"worker": worker_id, "banned": False, "reputation": server.trust.reputation.to_json(worker_id)}

    @app.get("/api/leaderboard")
    async def leaderboard(request: Request) -> dict[str, Any]:
        """Credit by volunteer and by worker: tasks, CPU-seconds, GPU-seconds, validated results."""
        require(request, Action.READ)
        return server.trust.ledger.leaderboard()

    @app.get("/api/jobs")
    async def list_jobs(request: Request) -> list[dict[str, Any]]:
        """The jobs this request's principal may see (a client: its own)."""
        principal = require(request, Action.READ)
        return views.jobs(server, may_see=may_see(principal))

    @app.get("/api/jobs/{job_id}")
    async def get_job(job_id: int, request: Request) -> dict[str, Any]:
        principal = require(request, Action.READ)
        record = server.fleet.known_job(job_id)
        if record is None or not authorize(principal, Action.SEE_JOB, record.owner):
            raise HTTPException(404, f"no job {job_id} of yours is running or remembered")
        return views.job_view(server, record)

    @app.post("/api/jobs/{job_id}/cancel")
    async def cancel_job(job_id: int, request: Request) -> dict[str, Any]:
        principal, _ = who(request)
        record = server.fleet.known_job(job_id)
        if principal is not None and principal.role != VIEWER and (
                record is None or not authorize(principal, Action.SEE_JOB, record.owner)):
            raise HTTPException(404, f"no job {job_id} of yours")  # another owner's job is not even named
        require(request, Action.CANCEL_JOB, record.owner if record is not None else None)
        if not server.cancel_job(job_id):
            known = server.fleet.known_job(job_id)
            raise HTTPException(404 if known is None else 409,
                                f"no job {job_id}" if known is None else f"job {job_id} already {known.state}")
        return {"job": job_id, "cancelled": True}

    @app.get("/api/status")
    async def status(request: Request) -> dict[str, Any]:
        """Everything the dashboard shows, as pushed on /ws (a client's: its own jobs only)."""
        principal = require(request, Action.READ)
        return views.snapshot(server, may_see(principal), job_events(principal))

    @app.get("/metrics", include_in_schema=False)
    async def metrics(request: Request) -> Response:
        require(request, Action.READ)
        return Response(generate_latest(registry), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.websocket("/ws")
    async def live(ws: WebSocket) -> None:
        """The dashboard's live feed. Only for the foreman's own pages: a page of another site could otherwise
        read it (browsers do not keep WebSockets to their origin)."""
        if not host_allowed(ws.headers.get("host"), server.host) or not access.same_origin(ws):
            await ws.send_denial_response(JSONResponse({"detail": "cross-site request refused"}, status_code=403))
            return
        principal, _ = who(ws)
        if principal is None or not authorize(principal, Action.READ):
            await ws.send_denial_response(JSONResponse({"detail": "token required"}, status_code=401))
            return
        await ws.accept()
        see, events = may_see(principal), job_events(principal)
        try:
            while True:
                await ws.send_json(views.snapshot(server, see, events))
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
        config = uvicorn.Config(create_app(server, self.port), log_level="warning", lifespan="off", access_log=False,
                                ws_max_size=1 << 20, http=GuardedH11Protocol,
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
