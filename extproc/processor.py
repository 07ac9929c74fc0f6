"""One ext_proc stream, whatever carries it: each ProcessingRequest in, the answer out.

The transports (h2server.py, grpcio_server.py) only move bytes; this turns a
message into a call to the pipeline and the pipeline's decision into a reply.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from . import codec, logs
from .decisions import Deny, Outcome, Phase
from .metrics import Metrics
from .pipeline import Pipeline, Run
from .replies import Reply

log = logging.getLogger("tollway")

INTERNAL_ERROR = Deny(
    500,
    "api_error",
    "internal_error",
    "The gateway failed to process this request.",
    "tollway_internal_error",
)

# Messages Tollway did not ask for still get the answer of their own kind.
_CONTINUE = {
    "request_headers": codec.CONTINUE_REQUEST_HEADERS,
    "response_headers": codec.CONTINUE_RESPONSE_HEADERS,
    "request_body": codec.CONTINUE_REQUEST_BODY,
    "response_body": codec.CONTINUE_RESPONSE_BODY,
    "request_trailers": codec.CONTINUE_REQUEST_TRAILERS,
    "response_trailers": codec.CONTINUE_RESPONSE_TRAILERS,
}

_RESPONSE_KINDS = frozenset({"response_headers", "response_body"})

D = TypeVar("D")


class StreamProcessor:
    """The state of one stream (one HTTP request through Envoy).

    The request's Run sets its outcome as its phases go (denied, forwarded);
    this, the one place that answers Envoy, adds the two the Run cannot see:
    failed (a fault in Tollway) and abandoned (the stream ended first).
    """

    __slots__ = ("_headers", "_metrics", "_pipeline", "_run", "_sent", "failed")

    def __init__(self, pipeline: Pipeline, metrics: Metrics) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._run: Run | None = None
        self._sent: codec.Sent = {}  # the access-log metadata Envoy already has
        self._headers: ProcessingRequest | None = None  # its attributes, read on a denial
        metrics.streams.inc()
        # After a fault the stream has answered with a 500 and should end.
        self.failed = False

    def handle(self, request: ProcessingRequest) -> Reply:
        """The reply to one message; None for a message of a kind this Envoy API lacks."""
        kind = request.WhichOneof("request")
        self._metrics.messages[kind if kind in _CONTINUE else "unknown"].inc()
        try:
            if kind == "request_headers":
                return self._request_headers(request)
            run = self._run
            if run is None or run.finished:
                pass  # nothing (more) to decide on
            elif kind == "response_body":
                body = request.response_body
                replacement = run.response_body(body.body, body.end_of_stream)
                return codec.response_body_response(
                    run.ex, replacement, body.end_of_stream, self._sent
                )
            elif kind == "response_headers":
                message = request.response_headers
                headers, _ = codec.decode_headers(message)
                status = headers.get(":status", "")
                code = int(status) if status.isdigit() else 0
                mode = run.response_headers(code, headers, message.end_of_stream)
                return codec.response_headers_response(run.ex, mode, self._sent)
            elif kind == "request_body":
                # Tollway asks for the request body only BUFFERED: this one message is the
                # whole body. It lacks end_of_stream when trailers follow (HTTP/2), and
                # request trailers are not asked for, so nothing else would mark its end.
                decision = run.request_body(request.request_body.body)
                if decision is None or isinstance(decision, Deny):  # decided now (checked
                    return self._body_reply(run, decision)  # first: an ABC check is slow)
                return self._later(kind, decision, lambda d: self._body_reply(run, d))
        except Exception:
            return self._fault(kind)
        if kind in _CONTINUE:
            return _CONTINUE[kind]
        log.warning("ext_proc message of unknown kind ignored")
        return None

    def abandon(self) -> None:
        """Reset while a stage's backend was pending: what it decides now was abandoned."""
        if self._run is not None:
            self._run.abandon()

    def close(self) -> None:
        """The stream is over (ended or reset): a request not yet finished was abandoned."""
        run, self._run = self._run, None
        if run is not None:
            run.close()

    def _request_headers(self, request: ProcessingRequest) -> Reply:
        self._headers = request
        message = request.request_headers
        headers, repeated = codec.decode_headers(message)
        jwt, peer_names = codec.decode_identity(request)
        run = self._run = self._pipeline.start(
            headers.get(":method", ""), headers.get(":path", ""), headers, repeated
        )
        run.ex.jwt, run.ex.peer_names = jwt, peer_names
        ended = message.end_of_stream
        decision = run.request_headers(ended)
        if isinstance(decision, Phase | Deny):  # decided now (checked first: an ABC check is slow)
            return self._headers_reply(run, decision, ended)
        reply = lambda d: self._headers_reply(run, d, ended)  # noqa: E731
        return self._later("request_headers", decision, reply)

    def _headers_reply(self, run: Run, decision: Deny | Phase, ended: bool) -> ProcessingResponse:
        if isinstance(decision, Deny):
            return self._deny(run, decision)
        if Phase.REQUEST_BODY not in decision or ended:
            self._count(run, "allowed")  # else decided at the body
        return codec.request_headers_response(run.ex, decision, self._sent)

    def _body_reply(self, run: Run, decision: Deny | None) -> ProcessingResponse:
        if decision is not None:
            return self._deny(run, decision)
        self._count(run, "allowed")
        return codec.request_body_response(run.ex, self._sent)

    async def _later(
        self, kind: str, decision: Awaitable[D], reply: Callable[[D], ProcessingResponse]
    ) -> ProcessingResponse | None:
        """The reply once a stage's backend has answered (or missed its deadline)."""
        try:
            return reply(await decision)
        except Exception:
            return self._fault(kind)

    def _fault(self, kind: str | None) -> ProcessingResponse | None:
        """A fault inside Tollway: a 500, or the response let through unmetered."""
        run = self._run
        about = logs.about(run.ex if run is not None else None)
        log.exception("fault while processing a %s message", kind, extra=about)
        self._metrics.internal_errors.inc()
        if run is not None:
            run.finish(Outcome.FAILED)
        if kind in _RESPONSE_KINDS:  # the response is on its way: let it through unmetered
            return _CONTINUE[kind]
        self.failed = True
        dialect = run.ex.dialect if run is not None else "openai"
        return codec.immediate_response(INTERNAL_ERROR, {}, dialect)

    def _deny(self, run: Run, deny: Deny) -> ProcessingResponse:
        self._count(run, deny.code)
        on_deny = self._pipeline.on_deny
        if on_deny is not None:
            try:
                on_deny(run.ex, deny, self._peer)
            except Exception:  # the audit must never change the answer
                log.exception("audit of a denial failed", extra=logs.about(run.ex))
                self._metrics.internal_errors.inc()
        return codec.immediate_response(deny, run.ex.metadata, run.ex.dialect)

    def _peer(self) -> tuple[str, str]:
        return codec.peer(self._headers) if self._headers is not None else ("", "")

    def _count(self, run: Run, outcome: str) -> None:
        route = run.ex.route
        self._metrics.requests.labels(route.name if route is not None else "none", outcome).inc()
