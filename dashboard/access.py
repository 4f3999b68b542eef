"""What both dashboards (the worker's and the foreman's) do the same way about browsers: the login cookie, the
same-origin test, and the headers that keep their pages out of other sites' frames.

- The login cookie holds a digest of the token (:func:`session`), never the token; it is ``HttpOnly``,
  ``SameSite=Strict``, ``Secure`` over https, and its name carries the port (:func:`cookie_name`), since cookies
  do not tell the ports of one host apart.
- :func:`same_origin`: a request that a browser sent from another site (its ``Origin``) is not one of ours.
- :func:`security_headers`: ``X-Frame-Options: DENY`` and a Content-Security-Policy that allows only the
  page's own scripts and connections (no frames, no plugins, no other sites).

Standard library only; starlette's request type is used for annotations.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from starlette.requests import HTTPConnection


def session(token: str, purpose: str) -> str:
    """The login cookie's value for ``token``: proves the token was typed, without storing it in the browser.
    ``purpose`` keeps the worker's and the foreman's cookies apart."""
    return hmac.new(token.encode(), f"crowdcompute {purpose}".encode(), hashlib.sha256).hexdigest()


def cookie_name(kind: str, port: int) -> str:
    return f"crowdcompute_{kind}_{port}"


def same_origin(conn: HTTPConnection) -> bool:
    """True unless a browser says the request comes from another origin. Clients other than browsers send no
    Origin; a reverse proxy may rewrite Host, so X-Forwarded-Host counts too."""
    origin = conn.headers.get("origin")
    if origin is None:
        return True
    netloc = urlsplit(origin).netloc
    return bool(netloc) and netloc in (conn.headers.get("host"), conn.headers.get("x-forwarded-host"))


def security_headers(host: str | None) -> dict[str, str]:
    """Headers for every dashboard response: not framed by anyone, scripts and styles from this origin only
    (inline style attributes stay allowed: the pages draw bars with them), WebSockets back to this host."""
    connect = "'self'" + (f" ws://{host} wss://{host}" if host and all(c not in host for c in " ;'\"") else "")
    return {
        "X-Frame-Options": "DENY",
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Content-Security-Policy": (f"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                                    f"img-src 'self' data:; connect-src {connect}; frame-ancestors 'none'; "
                                    f"object-src 'none'; base-uri 'none'; form-action 'self'"),
    }
