"""What a notebook shows for a foreman: a small HTML table (as Dask's ``Client`` shows), from ``_repr_html_``."""

from __future__ import annotations

import html


def foreman_summary_html(address: str, workers: int | None, slots: int | None, dashboard: str | None,
                         closed: bool = False) -> str:
    """An HTML summary: the address workers dial, connected workers, task slots and a dashboard link. Every value
    is escaped (an address or URL is text, never markup)."""
    rows = [("Address", html.escape(address))]
    if closed:
        rows.append(("State", "closed"))
    else:
        rows.append(("Workers", str(workers)))
        rows.append(("Task slots", str(slots)))
        if dashboard:
            url = html.escape(dashboard, quote=True)
            rows.append(("Dashboard", f'<a href="{url}" target="_blank">{url}</a>'))
        else:
            rows.append(("Dashboard", "none (connected to another foreman, or turned off)"))
    body = "".join(f'<tr><th style="text-align:left">{name}</th><td style="text-align:left">{value}</td></tr>'
                   for name, value in rows)
    return f'<div><strong>CrowdCompute Foreman</strong><table>{body}</table></div>'
