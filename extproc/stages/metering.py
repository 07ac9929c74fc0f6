"""Meter every request that reaches a provider: tokens, cost, metrics, access log, store.

Phases: request headers (which API, so which reader); the request body only for
OpenAI chat and completions, to make streams report usage; response headers
(JSON or SSE, and whether it succeeded); the response body, STREAMED for SSE so
every chunk goes on at once (read as the events the pipeline parsed),
BUFFERED for JSON of known size so a cost header can still be added. A stream
that ends without its usage (client gone, upstream cut) is counted from the
text delivered, flagged as estimated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..decisions import BodyMode, Deny, Outcome, Phase
from ..events import ResponseEvents
from ..exchange import BodyError, Exchange
from ..metrics import Metrics
from ..pricing import OTHER, PriceTable, bill, namespace
from ..providers import Api
from ..providers.meter import Reading, ResponseMeter
from ..providers.usage import Usage
from ..routes import Route
from ..store import Store, UsageRecord
from . import Flow

COST_HEADER = "x-tollway-cost-usd"
# Streams of these APIs report usage only when asked (stream_options.include_usage).
_ASK_FOR_USAGE: frozenset[Api] = frozenset({"chat", "completions"})
# tollway_gen_ai_tokens_total{type}: the Usage field each type counts.
TOKEN_TYPES = {
    "input": "input_tokens",
    "output": "output_tokens",
    "cached_input": "cached_input_tokens",
    "cache_creation": "cache_creation_tokens",
    "reasoning": "reasoning_tokens",
    "cache_creation_1h": "cache_creation_1h_tokens",
    "cached_audio": "cached_audio_tokens",
    "cached_image": "cached_image_tokens",
    "input_audio": "input_audio_tokens",
    "input_image": "input_image_tokens",
    "input_video": "input_video_tokens",
    "output_audio": "output_audio_tokens",
    "output_image": "output_image_tokens",
    "other_input": "other_input_tokens",
    "other_output": "other_output_tokens",
}
# In the access log always; the other kinds only when the response reports them.
_ALWAYS_LOGGED = ("input", "output", "cached_input", "cache_creation", "reasoning")


class MeteringStage:
    def __init__(
        self,
        prices: PriceTable,
        store: Store,
        metrics: Metrics,
        *,
        cost_header: bool = True,
        max_json_bytes: int = 10 << 20,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.prices = prices
        self.store = store
        self.metrics = metrics
        self.cost_header = cost_header
        self.max_json_bytes = max_json_bytes
        self.clock = clock
        self.wall_clock = wall_clock
        # Labelled children, looked up once per label set: labels() is slow per call.
        self._tokens: dict[tuple[str, ...], Any] = {}
        self._cost: dict[tuple[str, ...], Any] = {}
        self._timing: dict[tuple[str, ...], tuple[Any, Any]] = {}
        self._namespaces: dict[str, str | None] = {}  # by route name

    def _child(
        self, cache: dict[tuple[str, ...], Any], metric: Any, labels: tuple[str, ...]
    ) -> Any:
        found = cache.get(labels)
        if found is None:
            found = cache[labels] = metric.labels(*labels)
        return found

    def _timing_children(self, labels: tuple[str, str, str]) -> tuple[Any, Any]:
        found = self._timing.get(labels)
        if found is None:
            metrics = self.metrics
            found = self._timing[labels] = (
                metrics.duration.labels(*labels),
                metrics.time_to_first_token.labels(*labels),
            )
        return found

    def start(self, ex: Exchange) -> MeteringFlow | None:
        call = ex.call
        if call is None or call.api is None:
            return None
        if call.path_model is not None:
            ex.metadata["request_model"] = call.path_model
        return MeteringFlow(self, call.api, call.path_model)

    def _namespace(self, route: Route) -> str | None:
        if route.name not in self._namespaces:
            self._namespaces[route.name] = namespace(route.upstream)
        return self._namespaces[route.name]

    def record(self, ex: Exchange, m: MeteringFlow, reading: Reading) -> None:
        """One metered request: metrics, access-log metadata, cost header, usage record."""
        route = ex.route
        if route is None:
            return
        ex.usage, ex.usage_estimated = reading.usage, reading.estimated
        usage = reading.usage
        model = reading.model or m.request_model
        priced = bill(self.prices, model, usage, reading.parts, self._namespace(route))
        cost_usd, unpriced, complete = priced.usd, priced.unpriced, priced.complete
        ex.cost_usd = cost_usd
        label = priced.name or OTHER
        provider, identity, metrics = route.api, ex.identity, self.metrics
        tenant = identity.tenant if identity is not None and identity.tenant else "none"
        source = "estimated" if reading.estimated else "reported"
        metadata = ex.metadata
        for kind, field in TOKEN_TYPES.items():
            tokens = getattr(usage, field)
            if tokens:
                labels = (tenant, label, provider, m.api, kind, source)
                self._child(self._tokens, metrics.tokens, labels).inc(tokens)
            if tokens or kind in _ALWAYS_LOGGED:
                metadata[field] = tokens
        self._child(self._cost, metrics.cost, (tenant, label, provider, m.api, source)).inc(
            cost_usd
        )
        if not complete:
            metrics.unpriced.labels(provider, m.api).inc()
        if unpriced:
            tier = usage.service_tier or "standard"
            for kind, tokens in unpriced:
                metrics.unpriced_tokens.labels(provider, label, kind, tier).inc(tokens)
            metadata["unpriced_tokens"] = sum(tokens for _, tokens in unpriced)
        if usage.service_tier:
            metadata["service_tier"] = usage.service_tier
        duration, first_token = self._timing_children((provider, m.api, label))
        duration.observe(self.clock() - m.started)
        if m.first_byte is not None and m.sse:
            first_token.observe(m.first_byte - m.started)
        metadata["model"] = model or ""
        metadata["cost_usd"] = f"{cost_usd:.9f}"  # a decimal, like the cost header
        metadata["usage_estimated"] = reading.estimated
        if m.buffered and complete:
            ex.set_response_headers[COST_HEADER] = f"{cost_usd:.9f}"
        self.store.record_usage(
            UsageRecord(
                at=self.wall_clock(),
                key_id=identity.id if identity is not None else None,
                tenant=identity.tenant if identity is not None else None,
                route=route.name,
                provider=provider,
                api=m.api,
                model=model,
                usage=usage,
                cost_usd=cost_usd,
                estimated=reading.estimated,
                priced=complete,
            )
        )


class MeteringFlow(Flow):
    """One request's metering: what it asked for, and the response as it arrives."""

    __slots__ = (
        "api",
        "billable",
        "buffered",
        "edits_events",
        "first_byte",
        "meter",
        "prompt_chars",
        "request_model",
        "sse",
        "stage",
        "started",
        "strip_usage_chunk",
        "wants",
    )

    def __init__(self, stage: MeteringStage, api: Api, request_model: str | None) -> None:
        self.stage = stage
        self.api = api
        self.started = stage.clock()  # monotonic seconds, at request headers
        self.request_model = request_model
        # Streams of chat and completions report usage only when asked: read the body.
        self.wants = Phase.RESPONSE_HEADERS
        if api in _ASK_FOR_USAGE:
            self.wants |= Phase.REQUEST_BODY
        # The request body's size, for an estimate; None until Tollway saw the whole body.
        self.prompt_chars: int | None = None
        self.strip_usage_chunk = False  # Tollway asked for usage; the client did not
        self.meter: ResponseMeter | None = None
        self.billable = True  # False once the response says it bills nothing
        self.buffered = False
        self.sse = False
        self.edits_events = False
        self.first_byte: float | None = None

    def on_request_body(self, ex: Exchange) -> Deny | None:
        body = ex.body or b""
        self.prompt_chars = len(body)
        try:
            doc = ex.json()
        except BodyError:
            return None  # the upstream will say what is wrong with it
        model = doc.get("model")
        if isinstance(model, str) and model:
            self.request_model = model
            ex.metadata["request_model"] = model
        if doc.get("stream") is True and ex.document is not None:
            options = doc.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                # Added in front of the client's bytes when it sent no stream_options. A
                # body too deep to write out again goes on as sent, and is estimated.
                kept = options if isinstance(options, dict) else {}
                ex.document.set("stream_options", {**kept, "include_usage": True})
                self.strip_usage_chunk = True
        return None

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        stage, headers = self.stage, ex.response_headers
        if not 200 <= ex.status < 300:
            self.billable = False  # an error response bills nothing
            return BodyMode.NONE
        if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            stage.metrics.unmetered["content_encoding"].inc()
            self.billable = False
            return BodyMode.NONE
        self.meter = ResponseMeter(
            self.api, max_json_bytes=stage.max_json_bytes, prompt_chars=self.prompt_chars or 0
        )
        length = headers.get("content-length", "")
        if ex.events is None:
            if stage.cost_header and length.isdigit() and int(length) <= stage.max_json_bytes:
                self.buffered = True
                return BodyMode.BUFFERED
            return BodyMode.STREAMED
        self.sse = True
        self.edits_events = self.strip_usage_chunk
        if self.strip_usage_chunk and length:
            # The body will shrink; Envoy would refuse a length that no longer matches.
            ex.remove_response_headers.add("content-length")
        return BodyMode.STREAMED

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        meter = self.meter
        assert meter is not None  # set when this flow asked for the body
        meter.feed(chunk)
        if end:
            meter.close()
            if meter.overflow:
                self.stage.metrics.unmetered["body_too_large"].inc()
        return None

    def on_response_events(self, ex: Exchange, events: ResponseEvents, end: bool) -> None:
        """Read the events; drop the usage chunk the client did not ask for."""
        meter = self.meter
        assert meter is not None  # set when this flow asked for the body
        new = events.new
        if self.first_byte is None and new:
            self.first_byte = self.stage.clock()
        meter.on_events(new)
        if self.strip_usage_chunk:
            for event, doc in new:
                if _is_usage_chunk(doc):
                    events.drop(event)

    def finish(self, ex: Exchange, outcome: Outcome) -> None:
        """Meter what reached a provider: the response's usage, or an estimate."""
        if outcome in (Outcome.DENIED, Outcome.FAILED) or not self.billable:
            return
        if self.meter is not None:
            self.meter.close()  # a JSON body cut short: what arrived
            self.stage.record(ex, self, self.meter.reading())
        elif self.prompt_chars is not None:
            # Tollway saw the whole request, so Envoy sent it on; nothing came back.
            estimate = Usage(input_tokens=-(-self.prompt_chars // 4))
            self.stage.record(ex, self, Reading(None, estimate, estimated=True))
        # Otherwise nothing shows it was sent: Envoy may have refused it (a chunked
        # body over body_size_limit's 413) after its headers. What never reached a
        # provider costs nothing and counts nowhere.


def _is_usage_chunk(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("choices") == [] and doc.get("usage") is not None
