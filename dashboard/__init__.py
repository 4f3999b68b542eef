"""Templates and static files shared by the worker and foreman dashboards (no CDN: everything is here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEMPLATES = Path(__file__).resolve().parent / "templates"
STATIC = Path(__file__).resolve().parent / "static"


def templates() -> Any:
    """Starlette ``Jinja2Templates`` over this package's templates (imports Starlette, so only on demand)."""
    from fastapi.templating import Jinja2Templates

    return Jinja2Templates(directory=str(TEMPLATES))
