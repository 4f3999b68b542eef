"""Logging set-up for the foreman service: plain lines, or one JSON object per line (``--log-json``).

Log calls name the job, task and worker they concern with ``extra={"job": ..., "worker": ...}``; the JSON
format puts those in fields of their own, so a log pipeline can filter one job's or one worker's lines.
"""

from __future__ import annotations

import json
import logging
import time

#: Record attributes written as JSON fields when a log call sets them (``extra=``).
CONTEXT_FIELDS = ("job", "task", "worker", "client")


class JsonFormatter(logging.Formatter):
    """``{"time": ..., "level": ..., "logger": ..., "message": ..., "job": 3, "worker": "w1"}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                 + f".{int(record.msecs):03d}Z", "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str, as_json: bool = False) -> None:
    """Log to stderr at ``level``, as plain lines or JSON lines."""
    handler = logging.StreamHandler()
    if as_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    if logging.getLogger().level > logging.DEBUG:
        # websockets' own INFO lines ("server listening", "connection open") repeat ours, and one of them said
        # the foreman listened just before it failed on its dashboard's port.
        logging.getLogger("websockets").setLevel(logging.WARNING)
