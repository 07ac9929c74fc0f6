"""Runs a request's flows phase by phase; the first denial wins; finish exactly once.

The pipeline (one per process) holds the stages. For each request it makes a
``Run``: the request's Exchange and the flows its stages started (see
stages/__init__.py). A run calls each flow only for the phases it declared,
merges the response body modes (the strongest wins: BUFFERED also serves a
flow that asked for STREAMED), and finishes the flows once, in reverse order,
with the request's outcome: denied when a flow denies, forwarded when the last
phase the flows asked for has arrived; the processor adds failed (a fault) and
abandoned (the stream ended first).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from .body import RequestBody
from .decisions import BodyMode, Deny, Outcome, Phase
from .exchange import Exchange
from .headroom import HeaderLimits, over_limits, response_headers_fit
from .routes import RouteTable
from .stages import Flow, Stage

log = logging.getLogger("tollway")

INTERNAL_HEADER_PREFIX = "x-tollway-"

_NO_ROUTE = Deny(
    404, "invalid_request_error", "unknown_url", "Unknown request URL.", "tollway_no_route"
)
_STRENGTH = {BodyMode.NONE: 0, BodyMode.STREAMED: 1, BodyMode.BUFFERED: 2}


class Pipeline:
    def __init__(
        self,
        routes: RouteTable,
        stages: Sequence[Stage],
        clock: Callable[[], float] = time.time,
        header_limits: HeaderLimits | None = None,
        on_fault: Callable[[], None] = lambda: None,
    ) -> None:
        self.routes = routes
        self.header_limits = header_limits or HeaderLimits()
        self.stages = tuple(stages)
        self.clock = clock
        self.on_fault = on_fault  # a flow faulted while finishing (logged; others go on)

    def start(
        self, method: str, path: str, headers: dict[str, str], repeated: frozenset[str]
    ) -> Run:
        """A request's run, from its request headers (the path may carry a query)."""
        path, _, query = path.partition("?")
        call = self.routes.match(method, path, headers, query)
        return Run(self, Exchange(method, path, query, headers, repeated, call, self.clock()))


class Run:
    """One request through the pipeline: its Exchange and its stages' flows."""

    __slots__ = ("_body_flows", "_flows", "_pipeline", "_wants", "ex")

    def __init__(self, pipeline: Pipeline, ex: Exchange) -> None:
        self._pipeline = pipeline
        self.ex = ex
        self._flows: tuple[Flow, ...] = ()
        self._body_flows: tuple[Flow, ...] = ()  # those that asked for the response body
        self._wants = Phase.NONE

    @property
    def finished(self) -> bool:
        return self.ex.outcome is not None

    def request_headers(self, end_of_stream: bool = False) -> Deny | Phase:
        """Start every stage's flow: the later phases they want, or the first denial.

        With ``end_of_stream`` no body will follow, whatever the mode asks for:
        what the body phase would decide is decided now, on an empty body.
        """
        decision = self._start()
        if isinstance(decision, Deny):
            self.finish(Outcome.DENIED)
            return decision
        self._wants = decision
        if Phase.REQUEST_BODY in decision:
            if not end_of_stream:
                return decision
            denial = self._body(b"")
            if denial is not None:
                self.finish(Outcome.DENIED)
                return denial
        self._sent()
        return decision

    def request_body(self, body: bytes) -> Deny | None:
        denial = self._body(body)
        if denial is not None:
            self.finish(Outcome.DENIED)
            return denial
        self._sent()
        return None

    def response_headers(
        self, status: int, headers: dict[str, str], end_of_stream: bool = False
    ) -> BodyMode:
        """How the response body should come: the strongest mode any flow asks for."""
        ex = self.ex
        ex.status, ex.response_headers = status, headers
        mode = BodyMode.NONE
        readers: list[Flow] = []
        for flow in self._flows:
            if Phase.RESPONSE_HEADERS not in flow.wants:
                continue
            wanted = flow.on_response_headers(ex)
            if wanted is not BodyMode.NONE:
                readers.append(flow)
                if _STRENGTH[wanted] > _STRENGTH[mode]:
                    mode = wanted
        self._body_flows = tuple(readers)
        if end_of_stream or mode is BodyMode.NONE:  # no body will be read
            self.finish(Outcome.FORWARDED)
        return mode

    def response_body(self, chunk: bytes, end: bool) -> bytes | None:
        """A replacement for the chunk, or None to pass it on as it is."""
        replacement = None
        for flow in self._body_flows:
            out = flow.on_response_body(self.ex, chunk if replacement is None else replacement, end)
            if out is not None:
                replacement = out
        if end:
            self.finish(Outcome.FORWARDED)
        return replacement

    def finish(self, outcome: Outcome) -> None:
        """Finish every flow once, last started first; a second call does nothing."""
        ex = self.ex
        if ex.outcome is not None:
            return
        ex.outcome = outcome
        for flow in reversed(self._flows):
            try:
                flow.finish(ex, outcome)
            except Exception:
                log.exception("fault while finishing a request (%s)", outcome.value)
                self._pipeline.on_fault()
        if ex.set_response_headers and not response_headers_fit(ex):
            ex.set_response_headers.clear()  # Envoy would fail the whole response over them

    def _start(self) -> Deny | Phase:
        ex = self.ex
        # Clients must not be able to forge headers that upstreams trust.
        for name in ex.headers:
            if name.startswith(INTERNAL_HEADER_PREFIX):
                ex.remove_headers.add(name)
        if ex.call is None:
            return _NO_ROUTE
        ex.metadata["route"] = ex.call.route.name
        wants = Phase.NONE
        flows: list[Flow] = []
        try:
            for stage in self._pipeline.stages:
                started = stage.start(ex)
                if isinstance(started, Deny):
                    return started
                if started is not None:
                    flows.append(started)
                    wants |= started.wants
        finally:
            self._flows = tuple(flows)  # those started finish, whatever happens next
        # After every stage's edits: Envoy would fail the request if they crossed its limits.
        too_large = over_limits(ex, self._pipeline.header_limits)
        return too_large if too_large is not None else wants

    def _body(self, body: bytes) -> Deny | None:
        """Flows read and edit one document, in order; it is written out once."""
        ex = self.ex
        ex.body, ex.document = body, RequestBody(body)
        for flow in self._flows:
            if Phase.REQUEST_BODY in flow.wants:
                decision = flow.on_request_body(ex)
                if decision is not None:
                    return decision
        ex.new_body = ex.document.written()
        return None

    def _sent(self) -> None:
        """The request goes upstream: finished now if no flow wants the response."""
        if Phase.RESPONSE_HEADERS not in self._wants:
            self.finish(Outcome.FORWARDED)
