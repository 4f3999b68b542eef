"""The worker's dashboard and HTTP API: a FastAPI app served by uvicorn inside the worker's own event loop.

Routes and their JSON are documented in ``docs/worker-api.md``. This module is imported only when the dashboard
is on: it needs fastapi, uvicorn, jinja2 and prometheus-client (psutil and NVML are optional).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask

import dashboard
from dashboard.serving import QuietServer
from worker import metrics, stats
from worker.access import Access
from foreman.addresses import is_loopback
from worker.stats import Sampler

if TYPE_CHECKING:
    from worker.worker import Worker

log = logging.getLogger("crowdcompute.worker")

#: Seconds between snapshots pushed on the live socket.
LIVE_INTERVAL = 1.0
#: Ports tried, from the configured one up, before giving up on the dashboard.
PORT_ATTEMPTS = 10


class Dashboard:
    """Serves one worker's dashboard: ``await open()`` binds and starts it, ``await close()`` stops it."""

    def __init__(self, worker: Worker) -> None:
        config = worker.config
        self.worker = worker
        self.host = config.dashboard_host
        self.port = config.dashboard_port  # the port in use, once open
        self.sampler = Sampler(lambda: worker.stats.tasks_completed)
        self._server: _Server | None = None
        self._serving: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """Where to point a browser; a wildcard address (``0.0.0.0``) is shown as this machine's name."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    async def open(self) -> bool:
        """Start serving; False (and a log line saying why) if no port could be had."""
        config = self.worker.config
        try:
            sock = _listen(self.host, self.port)
        except OSError as exc:
            log.error("running without a dashboard: cannot listen on %s port %s: %s (choose another with "
                      "--dashboard-port, or pass --no-dashboard)", self.host, self.port, exc.strerror or exc)
            return False
        wanted, self.port = self.port, sock.getsockname()[1]
        if wanted and self.port != wanted:
            log.warning("dashboard port %s is taken: the dashboard is at %s instead", wanted, self.url)
        else:
            log.info("dashboard at %s", self.url)
        if not is_loopback(self.host) and config.dashboard_token is None:
            log.warning("!!! INSECURE: the dashboard at %s has no token: anyone who can reach it can restart "
                        "this worker. Set --dashboard-token (or CROWDCOMPUTE_DASHBOARD_TOKEN). !!!", self.url)
        await asyncio.to_thread(self.sampler.start)
        access = Access(config.dashboard_token, is_loopback(self.host), self.port)
        app = create_app(self.worker, self.sampler, access)
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # our own line above says where it is
        self._server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off",
                                              timeout_graceful_shutdown=1))
        self._serving = asyncio.create_task(self._server.serve(sockets=[sock]))
        return True

    async def close(self) -> None:
        if self._server is None or self._serving is None:
            return
        self._server.stop()
        try:
            await asyncio.wait_for(self._serving, 5)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            log.warning("the dashboard did not stop in time")
        await asyncio.to_thread(self.sampler.close)


class _Server(QuietServer):
    """uvicorn without its signal handlers: SIGTERM and Ctrl-C stay the worker's, which drains first."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``port``, else on the first free one of the next PORT_ATTEMPTS - 1 ports."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    candidates = [port] if port == 0 else list(range(port, min(port + PORT_ATTEMPTS, 65536)))
    for candidate in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if os.name != "nt":  # on Windows the option would let two servers share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
            sock.listen(128)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRINUSE:
                raise
    raise OSError(errno.EADDRINUSE, f"ports {candidates[0]} to {candidates[-1]} are all taken")


def create_app(worker: Worker, sampler: Sampler, access: Access) -> FastAPI:
    """The dashboard's routes. No GET changes anything; the state changes are ``POST /restart`` and
    ``POST /drain``."""
    app = FastAPI(title="CrowdCompute worker", docs_url=None, redoc_url=None, openapi_url=None)
    templates = dashboard.templates()
    registry = metrics.registry(lambda: stats.live(worker, sampler))
    vary = {"Vary": "Accept"}

    @app.get("/", response_model=None)
    async def index(request: Request) -> Response:
        """The page for browsers, the status JSON for everyone else."""
        if "text/html" not in request.headers.get("accept", ""):
            return access.refusal(request, control=False) or JSONResponse(stats.status(worker), headers=vary)
        if access.refusal(request, control=True) is not None:  # the page's live socket needs the token
            return RedirectResponse("login", status_code=303)
        return templates.TemplateResponse(request, "worker.html", {
            "title": f"{worker.config.worker_id} · CrowdCompute worker", "snap": stats.live(worker, sampler),
            "samples": [sample.as_dict() for sample in sampler.samples()]}, headers=vary)

    @app.get("/stats", response_model=None)
    async def get_stats(request: Request) -> Response:
        return access.refusal(request, control=False) or JSONResponse(stats.stats(worker, sampler))

    @app.get("/history", response_model=None)
    async def get_history(request: Request) -> Response:
        return access.refusal(request, control=False) or JSONResponse(stats.history(worker, sampler))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while connected to the foreman; 503 with the reason otherwise."""
        body = {"worker_id": worker.config.worker_id, "status": worker.status, "connected": worker.connected}
        if worker.connected and not worker.draining:
            return JSONResponse({"ok": True, **body})
        if worker.draining:
            reason = "draining: the worker is leaving"
        else:
            reason = f"not connected to the foreman at {worker.config.foreman_url}"
            if worker.last_error:
                reason += f" ({worker.last_error})"
        return JSONResponse({"ok": False, **body, "reason": reason}, status_code=503)

    @app.get("/metrics", response_model=None)
    async def get_metrics(request: Request) -> Response:
        refused = access.refusal(request, control=False)
        return refused or Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/restart", response_model=None)
    async def restart(request: Request, hard: bool = False) -> Response:
        """Soft: reconnect. Hard: re-execute the process. Either way, after this response is sent."""
        refused = access.refusal(request, control=True)
        if refused is not None:
            return refused
        return JSONResponse({"worker_id": worker.config.worker_id, "restarting": True, "hard": hard},
                            status_code=202, background=BackgroundTask(worker.restart, hard=hard))

    @app.post("/drain", response_model=None)
    async def drain(request: Request) -> Response:
        """Leave gracefully: hand back queued tasks, let running ones finish (up to --drain-timeout), go."""
        refused = access.refusal(request, control=True)
        if refused is not None:
            return refused
        return JSONResponse({"worker_id": worker.config.worker_id, "draining": True}, status_code=202,
                            background=BackgroundTask(worker.drain))

    @app.get("/login", response_model=None)
    async def login_form(request: Request) -> Response:
        if access.token is None:
            return RedirectResponse("./", status_code=303)
        return templates.TemplateResponse(request, "login.html", {"title": "Log in · CrowdCompute worker",
                                                                  "error": ""})

    @app.post("/login", response_model=None)
    async def login(request: Request) -> Response:
        if access.token is None:
            return RedirectResponse("./", status_code=303)
        offered = parse_qs((await request.body()).decode(errors="replace")).get("token", [""])[0]
        if not access.same_origin(request) or not access.token_matches(offered):
            return templates.TemplateResponse(request, "login.html", {
                "title": "Log in · CrowdCompute worker", "error": "wrong token"}, status_code=403)
        response = RedirectResponse("./", status_code=303)
        response.set_cookie(access.cookie, access.session, path=None, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    @app.websocket("/ws")
    async def live(websocket: WebSocket) -> None:
        """A snapshot about once a second (``stats.live``), until the page goes away."""
        refused = access.refusal(websocket, control=True)
        if refused is not None:
            await websocket.send_denial_response(refused)
            return
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(json.dumps(stats.live(worker, sampler)))
                try:
                    message = await asyncio.wait_for(websocket.receive(), LIVE_INTERVAL)
                except asyncio.TimeoutError:
                    continue
                if message["type"] == "websocket.disconnect":
                    return
        except WebSocketDisconnect:
            return

    app.mount("/static", StaticFiles(directory=dashboard.STATIC), name="static")
    return app
