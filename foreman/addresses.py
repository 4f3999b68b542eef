"""Small facts about network addresses, shared by the foreman and the worker (standard library only)."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 (bracketed or not) and 'localhost': addresses only this machine can reach."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def split_token(address: str) -> tuple[str, str | None]:
    """``ws://host:port/?token=T`` -> (``ws://host:port``, ``T``); an address without a token comes back as it
    is, with None. A foreman that made up its own token hands its workers such an address (Jupyter's way), so
    that ``python -m worker ADDRESS`` needs nothing else; the worker sends the token in its HELLO only."""
    from urllib.parse import parse_qs, urlsplit, urlunsplit

    parts = urlsplit(address)
    if not parts.query or parts.scheme not in ("ws", "wss"):
        return address, None
    query = parse_qs(parts.query)
    tokens = query.pop("token", None)
    if not tokens:
        return address, None
    rest = "&".join(f"{key}={value}" for key, values in query.items() for value in values)
    path = "" if parts.path == "/" and not rest else parts.path
    return urlunsplit((parts.scheme, parts.netloc, path, rest, "")), tokens[-1]


def with_token(address: str, token: str) -> str:
    """The address a worker copies: ``ws://host:port/?token=T`` (see :func:`split_token`)."""
    from urllib.parse import quote

    return f"{address.rstrip('/')}/?token={quote(token, safe='')}"
