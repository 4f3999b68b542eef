"""Templates and static files shared by the worker and foreman dashboards.

``templates/base.html`` frames every page (title, a header with a name and a status pill, the main block, a
footer); ``templates/login.html`` is the token form. ``static/style.css`` and ``static/charts.js`` serve both
dashboards. Pages link to static files and endpoints by relative URL (``static/style.css``, a WebSocket URL
computed from ``location``), so a dashboard behind a reverse proxy under a path prefix still works. Nothing is
loaded from a CDN.

jinja2 and starlette are imported only when a function here is called.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import jinja2
    from starlette.templating import Jinja2Templates

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def environment() -> jinja2.Environment:
    """A jinja2 environment over :data:`TEMPLATES`, autoescaping HTML."""
    import jinja2

    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=jinja2.select_autoescape())


def templates() -> Jinja2Templates:
    """Starlette's (and FastAPI's) template renderer over :func:`environment`."""
    from starlette.templating import Jinja2Templates

    return Jinja2Templates(env=environment())
