"""Runs the stages phase by phase; the first denial wins."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .decisions import BodyMode, Deny, Phase
from .exchange import Exchange
from .headroom import HeaderLimits, over_limits, response_headers_fit
from .routes import RouteTable
from .stages import ResponseStage, Stage

INTERNAL_HEADER_PREFIX = "x-tollway-"

_NO_ROUTE = Deny(
    404, "invalid_request_error", "unknown_url", "Unknown request URL.", "tollway_no_route"
)


class Pipeline:
    def __init__(
        self,
        routes: RouteTable,
        stages: Sequence[Stage],
        clock: Callable[[], float] = time.time,
        response_stages: Sequence[ResponseStage] = (),
        header_limits: HeaderLimits | None = None,
    ) -> None:
        self.routes = routes
        self.header_limits = header_limits or HeaderLimits()
        self.stages = tuple(stages)
        self.response_stages = tuple(response_stages)
        self.clock = clock

    def exchange(
        self, method: str, path: str, headers: dict[str, str], repeated: frozenset[str]
    ) -> Exchange:
        path, _, query = path.partition("?")
        call = self.routes.match(method, path, headers, query)
        return Exchange(method, path, query, headers, repeated, call, self.clock())

    def request_headers(self, ex: Exchange) -> Deny | Phase:
        # Clients must not be able to forge headers that upstreams trust.
        for name in ex.headers:
            if name.startswith(INTERNAL_HEADER_PREFIX):
                ex.remove_headers.add(name)
        if ex.route is None:
            ex.denied = True
            return _NO_ROUTE
        ex.metadata["route"] = ex.route.name
        wants = Phase.NONE
        for stage in self.stages:
            decision = stage.on_request_headers(ex)
            if isinstance(decision, Deny):
                ex.denied = True
                return decision
            wants |= decision
        # After every stage's edits: Envoy would fail the request if they crossed its limits.
        too_large = over_limits(ex, self.header_limits)
        if too_large is not None:
            ex.denied = True
            return too_large
        return wants

    def request_body(self, ex: Exchange, body: bytes) -> Deny | None:
        ex.body = body
        for stage in self.stages:
            decision = stage.on_request_body(ex)
            if decision is not None:
                ex.denied = True
                return decision
        return None

    def response_headers(self, ex: Exchange, status: int, headers: dict[str, str]) -> BodyMode:
        """How the response body should come; the first stage that wants it decides."""
        ex.status, ex.response_headers = status, headers
        mode = BodyMode.NONE
        for stage in self.response_stages:
            wanted = stage.on_response_headers(ex)
            if mode is BodyMode.NONE:
                mode = wanted
        return mode

    def response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        """A replacement for the chunk, or None to pass it on as it is."""
        replacement = None
        for stage in self.response_stages:
            out = stage.on_response_body(ex, chunk if replacement is None else replacement, end)
            if out is not None:
                replacement = out
        if end and ex.set_response_headers and not response_headers_fit(ex):
            ex.set_response_headers.clear()  # Envoy would fail the whole response over them
        return replacement

    def stream_end(self, ex: Exchange) -> None:
        for stage in self.response_stages:
            stage.on_stream_end(ex)
