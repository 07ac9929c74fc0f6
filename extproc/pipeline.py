"""Runs a request's flows phase by phase; the first denial wins; finish exactly once.

The pipeline (one per process) holds the stages. For each request it makes a
``Run``: the request's Exchange and the flows its stages started (see
stages/__init__.py). A run calls each flow only for the phases it declared,
merges the response body modes (the strongest wins: BUFFERED also serves a
flow that asked for STREAMED), parses an SSE body once for all of them
(events.py), and finishes the flows once, in reverse order,
with the request's outcome: denied when a flow denies, forwarded when the last
phase the flows asked for has arrived; the processor adds failed (a fault) and
abandoned (the stream ended first).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, TypeAlias, TypeVar, cast

from . import logs
from .body import RequestBody
from .decisions import Ask, BackendUnavailable, BodyMode, Deny, Outcome, Phase
from .events import ResponseEvents
from .exchange import Exchange
from .headroom import HeaderLimits, over_limits, response_headers_fit
from .routes import RouteTable
from .stages import Flow, Stage

log = logging.getLogger("tollway")

INTERNAL_HEADER_PREFIX = "x-tollway-"

_NO_ROUTE = Deny(
    404, "invalid_request_error", "unknown_url", "Unknown request URL.", "tollway_no_route"
)
_UNWRITABLE = Deny(
    400,
    "invalid_request_error",
    "invalid_body",
    "The request body is nested too deeply to be checked and written out again.",
    "tollway_body_unwritable",
)
_STRENGTH = {BodyMode.NONE: 0, BodyMode.STREAMED: 1, BodyMode.BUFFERED: 2}

T = TypeVar("T")
# A request phase: yields what it asks, receives the decision, returns its result.
Steps: TypeAlias = Generator[Ask[Any], Any, T]
Later: TypeAlias = Awaitable[T]  # a decision that waits for a backend


class Pipeline:
    def __init__(
        self,
        routes: RouteTable,
        stages: Sequence[Stage],
        clock: Callable[[], float] = time.time,
        header_limits: HeaderLimits | None = None,
        on_fault: Callable[[], None] = lambda: None,
        on_backend_failure: Callable[[str, str], None] = lambda stage, reason: None,
        max_event_bytes: int = 16 << 20,
        on_deny: Callable[[Exchange, Deny, Callable[[], tuple[str, str]]], None] | None = None,
    ) -> None:
        self.routes = routes
        self.max_event_bytes = max_event_bytes  # one SSE event kept whole at most
        self.header_limits = header_limits or HeaderLimits()
        self.stages = tuple(stages)
        self.clock = clock
        self.on_fault = on_fault  # a flow faulted while finishing (logged; others go on)
        self.on_backend_failure = on_backend_failure  # (stage, "error" | "timeout")
        # Every denial, told by the one place that answers Envoy, with a way to ask for
        # the client's address and Envoy's request id (read only when needed): the audit.
        self.on_deny = on_deny

    def start(
        self, method: str, path: str, headers: dict[str, str], repeated: frozenset[str]
    ) -> Run:
        """A request's run, from its request headers (the path may carry a query)."""
        path, _, query = path.partition("?")
        call = self.routes.match(method, path, headers, query)
        return Run(self, Exchange(method, path, query, headers, repeated, call, self.clock()))


class Run:
    """One request through the pipeline: its Exchange and its stages' flows."""

    __slots__ = ("_body_flows", "_flows", "_gone", "_pipeline", "_waiting", "_wants", "ex")

    def __init__(self, pipeline: Pipeline, ex: Exchange) -> None:
        self._pipeline = pipeline
        self.ex = ex
        self._flows: tuple[Flow, ...] = ()
        self._body_flows: tuple[Flow, ...] = ()  # those that asked for the response body
        self._wants = Phase.NONE
        self._gone = False  # the stream went away while a backend was pending
        self._waiting: tuple[Flow, ...] = ()  # forwarded, finished when the stream ends

    @property
    def finished(self) -> bool:
        return self.ex.outcome is not None

    def request_headers(self, end_of_stream: bool = False) -> Deny | Phase | Later[Deny | Phase]:
        """Start every stage's flow: the later phases they want, or the first denial.

        With ``end_of_stream`` no body will follow, whatever the mode asks for:
        what the body phase would decide is decided now, on an empty body. An
        awaitable when a stage's backend must be awaited first.
        """
        return self._drive(self._headers(end_of_stream))

    def request_body(self, body: bytes) -> Deny | Later[Deny | None] | None:
        return self._drive(self._body_phase(body))

    def response_headers(
        self, status: int, headers: dict[str, str], end_of_stream: bool = False
    ) -> BodyMode:
        """How the response body should come: the strongest mode any flow asks for."""
        ex = self.ex
        ex.status, ex.response_headers = status, headers
        if headers.get("content-type", "").startswith("text/event-stream") and headers.get(
            "content-encoding", "identity"
        ).lower() in ("identity", ""):
            ex.events = ResponseEvents(self._pipeline.max_event_bytes)
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
            ex.events = None
            self.finish(Outcome.FORWARDED)
        elif ex.events is not None:
            ex.events.editable = any(flow.edits_events for flow in readers)
        return mode

    def response_body(self, chunk: bytes, end: bool) -> bytes | None:
        """A replacement for the chunk, or None to pass it on as it is."""
        ex, events = self.ex, self.ex.events
        if events is not None:
            events.feed(chunk, end)
            for flow in self._body_flows:
                flow.on_response_events(ex, events, end)
            replacement = events.write()
        else:
            replacement = None
            for flow in self._body_flows:
                out = flow.on_response_body(ex, chunk if replacement is None else replacement, end)
                if out is not None:
                    replacement = out
        if end:
            self.finish(Outcome.FORWARDED)
        return replacement

    def abandon(self) -> None:
        """The stream went away while a backend was pending: whatever the pending
        decision allows goes nowhere, so it finishes as abandoned, not forwarded."""
        self._gone = True

    def finish(self, outcome: Outcome) -> None:
        """Finish every flow once, last started first; a second call does nothing.

        A forwarded request's flows that want STREAM_END finish in ``close``.
        """
        ex = self.ex
        if ex.outcome is not None:
            return
        if self._gone and outcome is Outcome.FORWARDED:
            outcome = Outcome.ABANDONED
        ex.outcome = outcome
        events = ex.events
        if events is not None and not events.closed:
            # Cut short: an event left unterminated still counts (it may carry usage).
            self._guarded(self._last_events, events)
        waiting = []
        for flow in reversed(self._flows):
            if outcome is Outcome.FORWARDED and Phase.STREAM_END in flow.wants:
                waiting.append(flow)
            else:
                self._guarded(flow.finish, ex, outcome)
        self._waiting = tuple(waiting)
        if ex.set_response_headers and not response_headers_fit(ex):
            ex.set_response_headers.clear()  # Envoy would fail the whole response over them

    def close(self) -> None:
        """Envoy ended the stream: the request is over. Not finished yet: abandoned."""
        self.finish(Outcome.ABANDONED)
        waiting, self._waiting = self._waiting, ()
        for flow in waiting:
            self._guarded(flow.finish, self.ex, Outcome.FORWARDED)

    def _last_events(self, events: ResponseEvents) -> None:
        events.feed(b"", True)
        for flow in self._body_flows:
            flow.on_response_events(self.ex, events, True)

    def _guarded(self, call: Callable[..., None], *args: Any) -> None:
        """A fault while finishing is logged and counted; the other flows still finish."""
        try:
            call(*args)
        except Exception:
            log.exception("fault while finishing a request", extra=logs.about(self.ex))
            self._pipeline.on_fault()

    # The request phases are generators that yield an Ask when a stage needs I/O;
    # _drive answers it inline when the backend can, and only otherwise awaits.

    def _headers(self, end_of_stream: bool) -> Steps[Deny | Phase]:
        decision = yield from self._start()
        if isinstance(decision, Deny):
            self.finish(Outcome.DENIED)
            return decision
        self._wants = decision
        if Phase.REQUEST_BODY in decision:
            if not end_of_stream:
                return decision
            denial = yield from self._body(b"")
            if denial is not None:
                self.finish(Outcome.DENIED)
                return denial
        self._sent()
        return decision

    def _body_phase(self, body: bytes) -> Steps[Deny | None]:
        denial = yield from self._body(body)
        if denial is not None:
            self.finish(Outcome.DENIED)
            return denial
        self._sent()
        return None

    def _start(self) -> Steps[Deny | Phase]:
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
                if isinstance(started, Ask):
                    started = yield started
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

    def _body(self, body: bytes) -> Steps[Deny | None]:
        """Flows read and edit one document, in order; it is written out once."""
        ex = self.ex
        ex.body, ex.document = body, RequestBody(body)
        for flow in self._flows:
            if Phase.REQUEST_BODY in flow.wants:
                decision = flow.on_request_body(ex)
                if isinstance(decision, Ask):
                    decision = yield decision
                if decision is not None:
                    return decision
        ex.new_body = ex.document.written()
        if ex.new_body is None and ex.document.required:
            return _UNWRITABLE  # a redacted body that cannot be written must not go as sent
        return None

    def _sent(self) -> None:
        """The request goes upstream: finished now if no flow wants the response."""
        if Phase.RESPONSE_HEADERS not in self._wants:
            self.finish(Outcome.FORWARDED)

    def _drive(self, steps: Steps[T]) -> T | Later[T]:
        """Run the steps; an awaitable only if a backend really has to be awaited."""
        done, ask, pending = self._inline(steps, None)
        if ask is None:
            return cast(T, done)
        return self._drive_later(steps, ask, pending)

    def _inline(self, steps: Steps[T], answer: Any) -> tuple[T | None, Ask[Any] | None, Any]:
        """Advance the steps, answering each Ask whose backend answers at once: the
        result, or the Ask and the awaitable its backend returned."""
        while True:
            try:
                ask = steps.send(answer)
            except StopIteration as done:
                return done.value, None, None
            try:
                value = ask.call()
            except BackendUnavailable as e:  # e.g. a breaker that is open: no I/O at all
                answer = self._failed(ask, e.reason)
                continue
            except Exception:
                log.exception("backend of %s failed", ask.stage, extra=logs.about(self.ex))
                answer = self._failed(ask, "error")
                continue
            if inspect.isawaitable(value):
                return None, ask, value
            answer = ask.resume(value)

    async def _drive_later(self, steps: Steps[T], ask: Ask[Any], pending: Awaitable[Any]) -> T:
        """Each wait bounded by its Ask's deadline; a late answer is ignored, but the
        I/O itself is shielded, never cut off halfway."""
        while True:
            answer: Any
            try:
                if ask.timeout_s is None:  # the backend's own deadline bounds it
                    got = await pending
                else:
                    got = await asyncio.wait_for(asyncio.shield(pending), ask.timeout_s)
            except TimeoutError:
                answer = self._failed(ask, "timeout")
            except BackendUnavailable as e:
                answer = self._failed(ask, e.reason)
            except Exception:
                log.exception("backend of %s failed", ask.stage, extra=logs.about(self.ex))
                answer = self._failed(ask, "error")
            else:
                answer = ask.resume(got)
            done, next_ask, pending = self._inline(steps, answer)
            if next_ask is None:
                return cast(T, done)
            ask = next_ask

    def _failed(self, ask: Ask[Any], reason: str) -> Any:
        """The stage's policy decides: a Deny fails closed, None fails open."""
        self._pipeline.on_backend_failure(ask.stage, reason)
        return ask.on_failure(reason)
