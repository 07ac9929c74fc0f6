"""Tollway's own log lines: text (the default) or JSON (``--log-format json``).

A JSON line has time, level, logger and message, the traceback when there is
one, and ``request_id`` when the line is about a request: Envoy's x-request-id,
the access log's ``request_id``, so the two join. Log calls about a request pass
``extra=logs.about(ex)``; nothing else is added per request.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

import orjson

if TYPE_CHECKING:
    from .exchange import Exchange

Format = Literal["text", "json"]
FORMATS: tuple[Format, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def about(ex: Exchange | None) -> dict[str, str]:
    """``extra`` for a log call about this request: its request id."""
    if ex is None:
        return {}
    request_id = ex.headers.get("x-request-id")
    return {"request_id": request_id} if request_id else {}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["error"] = record.exc_text
        return orjson.dumps(line).decode()


def setup(format_: Format = "text", level: int = logging.INFO) -> None:
    """Log to stderr in the format asked for (replacing any earlier setup)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if format_ == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
