"""One ext_proc stream, whatever carries it: each ProcessingRequest in, the answer out.

The transports (h2server.py, grpcio_server.py) only move bytes; this turns a
message into a call to the pipeline and the pipeline's decision into a reply.
"""

from __future__ import annotations

import logging

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

from . import codec
from .decisions import Deny, Phase
from .exchange import Exchange
from .runtime import Runtime

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


class StreamProcessor:
    """The state of one stream (one HTTP request through Envoy)."""

    __slots__ = ("_ex", "_metrics", "_pipeline", "failed")

    def __init__(self, runtime: Runtime) -> None:
        self._pipeline = runtime.pipeline
        self._metrics = runtime.metrics
        self._ex: Exchange | None = None
        self._metrics.streams.inc()
        # After a fault the stream has answered with a 500 and should end.
        self.failed = False

    def handle(self, request: ProcessingRequest) -> ProcessingResponse | None:
        """The reply to one message; None for a message of a kind this Envoy API lacks."""
        kind = request.WhichOneof("request")
        self._metrics.messages[kind if kind in _CONTINUE else "unknown"].inc()
        try:
            if kind == "request_headers":
                return self._request_headers(request)
            ex = self._ex
            if ex is None:
                pass  # no request headers seen: nothing to decide on
            elif kind == "response_body":
                body = request.response_body
                replacement = self._pipeline.response_body(ex, body.body, body.end_of_stream)
                return codec.response_body_response(ex, replacement, body.end_of_stream)
            elif kind == "response_headers":
                return self._response_headers(ex, request)
            elif kind == "request_body":
                # Tollway asks for the request body only BUFFERED: this one message is the
                # whole body. It lacks end_of_stream when trailers follow (HTTP/2), and
                # request trailers are not asked for, so nothing else would mark its end.
                return self._request_body(ex, request.request_body.body)
        except Exception:
            log.exception("fault while processing a %s message", kind)
            self._metrics.internal_errors.inc()
            if kind in _RESPONSE_KINDS:  # the response is on its way: let it through unmetered
                self._ex = None
                return _CONTINUE[kind]
            self.failed = True
            dialect = self._ex.dialect if self._ex is not None else "openai"
            return codec.immediate_response(INTERNAL_ERROR, {}, dialect)
        if kind in _CONTINUE:
            return _CONTINUE[kind]
        log.warning("ext_proc message of unknown kind ignored")
        return None

    def _request_headers(self, request: ProcessingRequest) -> ProcessingResponse:
        headers, repeated = codec.decode_headers(request.request_headers)
        pipeline = self._pipeline
        ex = self._ex = pipeline.exchange(
            headers.get(":method", ""), headers.get(":path", ""), headers, repeated
        )
        decision = pipeline.request_headers(ex)
        if isinstance(decision, Deny):
            return self._deny(ex, decision)
        if Phase.REQUEST_BODY in decision:
            if not request.request_headers.end_of_stream:
                return codec.request_headers_response(ex, decision)  # decided at the body
            # No body will follow (content-length: 0, or none at all), whatever the mode
            # asks for: decide on the empty body now, in the answer to the headers.
            denial = pipeline.request_body(ex, b"")
            if denial is not None:
                return self._deny(ex, denial)
        self._count(ex, "allowed")
        return codec.request_headers_response(ex, decision)

    def _response_headers(self, ex: Exchange, request: ProcessingRequest) -> ProcessingResponse:
        message = request.response_headers
        headers, _ = codec.decode_headers(message)
        status = headers.get(":status", "")
        mode = self._pipeline.response_headers(ex, int(status) if status.isdigit() else 0, headers)
        if message.end_of_stream:  # no body will follow
            self._pipeline.stream_end(ex)
        return codec.response_headers_response(ex, mode)

    def close(self) -> None:
        """The stream is over (ended or reset): let stages account for what happened."""
        if self._ex is None:
            return
        try:
            self._pipeline.stream_end(self._ex)
        except Exception:
            log.exception("fault while ending a stream")
            self._metrics.internal_errors.inc()
        self._ex = None

    def _request_body(self, ex: Exchange, body: bytes) -> ProcessingResponse:
        decision = self._pipeline.request_body(ex, body)
        if decision is not None:
            return self._deny(ex, decision)
        self._count(ex, "allowed")
        return codec.request_body_response(ex)

    def _deny(self, ex: Exchange, deny: Deny) -> ProcessingResponse:
        self._count(ex, deny.code)
        return codec.immediate_response(deny, ex.metadata, ex.dialect)

    def _count(self, ex: Exchange, outcome: str) -> None:
        route = ex.route.name if ex.route is not None else "none"
        self._metrics.requests.labels(route, outcome).inc()
