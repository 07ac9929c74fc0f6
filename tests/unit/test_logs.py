"""Tollway's own log lines as JSON, and the request id that joins them to Envoy's
access log (no I/O: records formatted in memory)."""

from __future__ import annotations

import logging
import sys

import orjson

from extproc import logs
from extproc.exchange import Exchange

from .factories import build_pipeline, request


def exchange(headers: dict[str, str]) -> Exchange:
    return request(build_pipeline(), headers=headers).ex


def record(message: str, *args: object, **extra: object) -> logging.LogRecord:
    made = logging.getLogger("tollway").makeRecord(
        "tollway", logging.WARNING, __file__, 1, message, args, None, extra=extra
    )
    made.created, made.msecs = 1_764_650_722.318, 318.0
    return made


def test_a_json_line_has_time_level_logger_message_and_the_request_id() -> None:
    ex = exchange(headers={"x-request-id": "5dcaa5a0-9566"})
    line = orjson.loads(
        logs.JsonFormatter().format(record("upstream %s", "openai", **logs.about(ex)))
    )
    assert line == {
        "time": "2025-12-02T04:45:22.318Z",
        "level": "warning",
        "logger": "tollway",
        "message": "upstream openai",
        "request_id": "5dcaa5a0-9566",
    }


def test_a_line_not_about_a_request_has_no_request_id_and_a_traceback_is_one_field() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        failed = record("fault")
        failed.exc_info = sys.exc_info()
    text = logs.JsonFormatter().format(failed)
    assert "\n" not in text
    line = orjson.loads(text)
    assert "request_id" not in line and "RuntimeError: boom" in line["error"]
    assert logs.about(None) == {} and logs.about(exchange(headers={})) == {}
