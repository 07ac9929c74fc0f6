"""Will Envoy accept the request headers once Tollway's edits are applied? (sans-IO)

Envoy checks a request's header map against ``max_headers_count`` and
``max_request_headers_kb`` twice: on what the client sent (Envoy's own 431),
and again after ext_proc's header mutation, where crossing a limit rejects the
mutation and fails the request with a 5xx. Envoy adds a handful of headers in
between (``x-request-id``, ``x-forwarded-*``, ``:scheme``, ...) and Tollway adds
its own (identity, the provider key), so a request a little under the limits
would get a 503. Tollway sees the whole map, so it works out the map as it will
be and answers 431 itself instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from .decisions import Deny
from .exchange import Exchange

# A body phase may still rewrite content-length (a replaced body): a few more bytes.
BODY_PHASE_SLACK_BYTES = 16
# Envoy's limit on the header lines of an upstream's response (the upstream cluster's
# max_headers_count, default 100), checked again after ext_proc adds response headers.
RESPONSE_HEADER_LINES = 100

TOO_LARGE = Deny(
    431,
    "invalid_request_error",
    "request_header_fields_too_large",
    "Request headers too large or too many.",
    "tollway_request_header_fields_too_large",
)


@dataclass(frozen=True, slots=True)
class HeaderLimits:
    """Envoy's limits on a request's header map (``envoy.max_request_headers[_kb]``)."""

    count: int = 100
    kb: int = 60


def after_edits(ex: Exchange) -> tuple[int, int]:
    """(entries, bytes) of the header map once Tollway's edits are applied.

    Envoy counts each entry (a repeated header once per line) and its bytes as
    name + value. Repeats arrive joined with ","; a value's own commas make the
    estimate count more lines than were sent, never fewer. Sums run in C: this
    is on every request's path.
    """
    headers = ex.headers
    count = len(headers)
    size = sum(map(len, headers)) + sum(map(len, headers.values()))
    for name in ex.repeated:
        extra = headers[name].count(",")
        count += extra
        size += extra * (len(name) - 1)
    for name in ex.remove_headers | ex.set_headers.keys():
        value = headers.get(name)
        if value is None:
            continue
        lines = value.count(",") + 1 if name in ex.repeated else 1
        count -= lines
        size -= lines * len(name) + len(value) - (lines - 1)
    count += len(ex.set_headers)
    size += sum(map(len, ex.set_headers)) + sum(map(len, ex.set_headers.values()))
    return count, size


def over_limits(ex: Exchange, limits: HeaderLimits) -> Deny | None:
    """A 431 when the edited headers would cross Envoy's limits, else None."""
    count, size = after_edits(ex)
    if count > limits.count or size + BODY_PHASE_SLACK_BYTES > limits.kb * 1024:
        return TOO_LARGE
    return None


def response_headers_fit(ex: Exchange, limit: int = RESPONSE_HEADER_LINES) -> bool:
    """Would the response headers Tollway adds keep the response within Envoy's count?

    Response repeats are not marked, so every comma counts as a line: near the
    limit this errs towards leaving an optional header out.
    """
    kept = (v for n, v in ex.response_headers.items() if n not in ex.remove_response_headers)
    lines = sum(value.count(",") + 1 for value in kept)
    added = sum(1 for name in ex.set_response_headers if name not in ex.response_headers)
    return lines + added <= limit
