"""Values that stages return: what Envoy should do next."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar


class Phase(enum.Flag):
    """Later ext_proc phases a request needs, beyond its request headers."""

    NONE = 0
    REQUEST_BODY = enum.auto()
    RESPONSE_HEADERS = enum.auto()
    RESPONSE_BODY = enum.auto()
    # Not an ext_proc phase: finish this flow only when Envoy ends the stream (the
    # request is over), not at the last phase asked for. A concurrency lease is
    # held this long; Envoy resets the stream at the end of every request.
    STREAM_END = enum.auto()


class BodyMode(enum.Enum):
    """How Envoy should hand over the response body, decided at response headers."""

    NONE = "none"
    STREAMED = "streamed"  # chunk by chunk, each answered at once (SSE keeps its speed)
    BUFFERED = "buffered"  # whole; the only mode where a response header can still be set


class Outcome(enum.Enum):
    """How a request ended for Tollway, set by the one place that answers Envoy."""

    FORWARDED = "forwarded"  # sent upstream; every phase Tollway asked for arrived
    DENIED = "denied"  # Tollway answered the client itself
    FAILED = "failed"  # a fault inside Tollway (the client got a 500, or an unmetered response)
    ABANDONED = "abandoned"  # the stream ended first: client gone, upstream cut, Envoy refused


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer the client directly with an OpenAI-style JSON error.

    ``details`` is a snake_case reason for Envoy's access log
    (%RESPONSE_CODE_DETAILS%); ``message`` is safe to show the client; ``audit``
    holds facts for the audit log (which rule, whose counter), never a secret.
    """

    status: int
    type: str
    code: str
    message: str
    details: str
    headers: tuple[tuple[str, str], ...] = ()
    audit: tuple[tuple[str, str], ...] = ()


def unauthorized(code: str, message: str) -> Deny:
    return Deny(401, "authentication_error", code, message, f"tollway_{code}")


def forbidden(code: str, message: str) -> Deny:
    return Deny(403, "permission_error", code, message, f"tollway_{code}")


def bad_request(code: str, message: str) -> Deny:
    return Deny(400, "invalid_request_error", code, message, f"tollway_{code}")


class BackendUnavailable(Exception):
    """A backend says why it cannot answer ("timeout", "error", "breaker_open"): a
    failure the stage's policy decides, counted by reason, without a traceback."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


R = TypeVar("R", covariant=True)


@dataclass(slots=True)  # not frozen: built per request, and frozen costs 5x
class Ask(Generic[R]):
    """A decision that needs I/O first: a plain query and a pure resume.

    The pipeline performs ``call`` (a backend operation the stage prepared) and
    hands its answer to ``resume``, which decides. A backend that can answer at
    once returns a value: the flow resumes inline, no coroutine, no task. One
    that really awaits returns an awaitable, waited for at most ``timeout_s``
    (None: the backend keeps a deadline of its own, so no second timer is set)
    (the I/O itself is not cancelled). If the backend fails or is late,
    ``on_failure(reason)`` decides instead ("error", "timeout", or a
    BackendUnavailable's reason): the stage's
    policy, a Deny to fail closed or None to fail open. ``stage`` names the
    stage in metrics.
    """

    stage: str
    call: Callable[[], Any]
    resume: Callable[[Any], R]
    on_failure: Callable[[str], R]
    timeout_s: float | None = 0.05  # None: the backend bounds its own wait
