"""Who may use the worker's dashboard.

Without a dashboard token everything is open: the dashboard is then on loopback (or was started ``--insecure``).
With a token, restarting and the live socket (hence the page) need it, always; read-only JSON needs it too when
the dashboard listens beyond loopback. The token is accepted as ``Authorization: Bearer <token>`` or as the cookie
the login form sets, which holds a digest of the token, not the token itself. ``/health`` is always open.

Requests that change state, and the live socket, are refused when their ``Origin`` is another site, so a web page
cannot restart a worker on its visitor's machine (CSRF), token or not.
"""

from __future__ import annotations

import hmac

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response

from dashboard import access


class Access:
    """Decides whether a request may proceed.

    :param token: the dashboard token, or None for an open dashboard.
    :param loopback: the dashboard listens on loopback only, so read-only JSON may stay open.
    :param port: the dashboard's port; cookies do not tell ports apart, so the cookie name carries it.
    """

    def __init__(self, token: str | None, loopback: bool, port: int) -> None:
        self.token = token
        self.loopback = loopback
        self.cookie = access.cookie_name("worker", port)

    @property
    def session(self) -> str:
        """The login cookie's value: proves the token was typed, without storing it in the browser."""
        assert self.token is not None
        return access.session(self.token, "worker dashboard")

    def token_matches(self, offered: str) -> bool:
        return self.token is not None and hmac.compare_digest(offered.encode(), self.token.encode())

    def authenticated(self, conn: HTTPConnection) -> bool:
        if self.token is None:
            return True
        scheme, _, credentials = conn.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self.token_matches(credentials.strip()):
            return True
        return hmac.compare_digest(conn.cookies.get(self.cookie, "").encode(), self.session.encode())

    same_origin = staticmethod(access.same_origin)

    def refusal(self, conn: HTTPConnection, control: bool) -> Response | None:
        """None if ``conn`` may proceed, else the response to send: 401 without credentials, 403 with wrong ones
        or from another site. ``control``: the request changes state or opens the live socket."""
        if control and not self.same_origin(conn):
            return JSONResponse({"detail": "cross-site request refused"}, status_code=403)
        if self.token is None or (not control and self.loopback) or self.authenticated(conn):
            return None
        if "authorization" in conn.headers or self.cookie in conn.cookies:
            return JSONResponse({"detail": "wrong dashboard token"}, status_code=403)
        return JSONResponse({"detail": "this worker's dashboard needs its token: send 'Authorization: Bearer "
                                       "<token>' or log in at login"}, status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

