"""Meter every request that reaches a provider: tokens, cost, metrics, access log, store.

Phases: request headers (which API, so which reader); the request body only for
OpenAI chat and completions, to make streams report usage; response headers
(JSON or SSE, and whether it succeeded); the response body, STREAMED for SSE so
every chunk goes on at once, BUFFERED for JSON of known size so a cost header
can still be added. A stream that ends without its usage (client gone,
upstream cut) is counted from the text delivered, flagged as estimated.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from ..decisions import BodyMode, Deny, Phase
from ..exchange import BodyError, Exchange
from ..metrics import Metrics
from ..pricing import OTHER, PriceTable, cost
from ..providers import Api
from ..providers.meter import Parsed, Reading, ResponseMeter
from ..providers.usage import Usage
from ..store import Store, UsageRecord

COST_HEADER = "x-tollway-cost-usd"
# Streams of these APIs report usage only when asked (stream_options.include_usage).
_ASK_FOR_USAGE: frozenset[Api] = frozenset({"chat", "completions"})
_INCLUDE_USAGE = b'"stream_options":{"include_usage":true},'
TOKEN_TYPES = ("input", "output", "cached_input", "cache_creation", "reasoning")


@dataclass(slots=True)
class Metering:
    """One request's metering state, kept on its Exchange."""

    api: Api
    started: float  # monotonic seconds, at request headers
    request_model: str | None = None
    # The request body's size, for an estimate; None until Tollway saw the whole body.
    prompt_chars: int | None = None
    strip_usage_chunk: bool = False  # Tollway asked for usage; the client did not
    meter: ResponseMeter | None = None
    buffered: bool = False
    first_byte: float | None = None
    done: bool = False


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
        self._spend: dict[tuple[str, ...], tuple[list[Any], Any]] = {}
        self._timing: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def _spend_children(self, labels: tuple[str, str, str, str, str]) -> tuple[list[Any], Any]:
        found = self._spend.get(labels)
        if found is None:
            tenant, model, provider, api, source = labels
            tokens = self.metrics.tokens
            found = self._spend[labels] = (
                [tokens.labels(tenant, model, provider, api, kind, source) for kind in TOKEN_TYPES],
                self.metrics.cost.labels(*labels),
            )
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

    # request

    def on_request_headers(self, ex: Exchange) -> Deny | Phase:
        call = ex.call
        if call is None or call.api is None:
            return Phase.NONE
        m = ex.metering = Metering(call.api, self.clock(), request_model=call.path_model)
        if m.request_model is not None:
            ex.metadata["request_model"] = m.request_model
        if call.api in _ASK_FOR_USAGE:
            return Phase.RESPONSE_HEADERS | Phase.REQUEST_BODY
        return Phase.RESPONSE_HEADERS

    def on_request_body(self, ex: Exchange) -> Deny | None:
        m = ex.metering
        if m is None or ex.body is None:
            return None
        m.prompt_chars = len(ex.body)
        try:
            doc = ex.json()
        except BodyError:
            return None  # the upstream will say what is wrong with it
        model = doc.get("model")
        if isinstance(model, str) and model:
            m.request_model = model
            ex.metadata["request_model"] = model
        if m.api in _ASK_FOR_USAGE and doc.get("stream") is True:
            options = doc.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage") is True):
                new_body = _with_include_usage(ex.body, doc)
                if new_body is not None:  # else forwarded as sent, and estimated
                    ex.new_body, m.strip_usage_chunk = new_body, True
        return None

    # response

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        m = ex.metering
        if m is None or m.done:
            return BodyMode.NONE
        headers = ex.response_headers
        if not 200 <= ex.status < 300:
            self._finish(ex, m, None)  # an error response bills nothing
            return BodyMode.NONE
        if headers.get("content-encoding", "identity").lower() not in ("identity", ""):
            self.metrics.unmetered["content_encoding"].inc()
            self._finish(ex, m, None)
            return BodyMode.NONE
        sse = headers.get("content-type", "").startswith("text/event-stream")
        m.meter = ResponseMeter(
            m.api, sse=sse, max_json_bytes=self.max_json_bytes, prompt_chars=m.prompt_chars or 0
        )
        length = headers.get("content-length", "")
        if not sse and self.cost_header and length.isdigit() and int(length) <= self.max_json_bytes:
            m.buffered = True
            return BodyMode.BUFFERED
        if m.strip_usage_chunk and length:
            # The body will shrink; Envoy would refuse a length that no longer matches.
            ex.remove_response_headers.add("content-length")
        return BodyMode.STREAMED

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        """Read the chunk; return its replacement when the usage chunk must go."""
        m = ex.metering
        if m is None or m.meter is None or m.done:
            return None
        if m.first_byte is None and chunk:
            m.first_byte = self.clock()
        sse = m.meter.sse
        whole_before = sse is None or sse.at_boundary
        events = m.meter.feed(chunk)
        whole_after = sse is None or sse.at_boundary
        if end:
            events += m.meter.close()
            if m.meter.overflow:
                self.metrics.unmetered["body_too_large"].inc()
            self._finish(ex, m, m.meter.reading())
        if not m.strip_usage_chunk:
            return None
        if whole_before and whole_after and not any(_is_usage_chunk(doc) for _, doc in events):
            return None  # whole events, none to remove: the chunk goes on as it came
        return _without_usage_chunks(events)

    def on_stream_end(self, ex: Exchange) -> None:
        """The ext_proc stream ended: meter what arrived if the response did not finish."""
        m = ex.metering
        if m is None or m.done or ex.denied:
            return
        if m.meter is None:  # no response
            if m.prompt_chars is None:
                # Nothing shows it was sent: Envoy may have refused it (a chunked body over
                # body_size_limit's 413) after its headers. What never reached a provider
                # costs nothing and counts nowhere.
                self._finish(ex, m, None)
                return
            # Tollway saw the whole request, so Envoy sent it on; nothing came back.
            estimate = Usage(input_tokens=-(-m.prompt_chars // 4))
            self._finish(ex, m, Reading(None, estimate, estimated=True))
            return
        m.meter.close()
        self._finish(ex, m, m.meter.reading())

    def _finish(self, ex: Exchange, m: Metering, reading: Reading | None) -> None:
        m.done = True
        route = ex.route
        if reading is None or route is None:
            return
        usage = reading.usage
        model = reading.model or m.request_model
        found = self.prices.lookup(model)
        cost_usd = cost(found[1], usage) if found is not None else 0.0
        label = found[0] if found is not None else OTHER
        provider, identity = route.api, ex.identity
        tenant = identity.tenant if identity is not None and identity.tenant else "none"
        source = "estimated" if reading.estimated else "reported"
        counters, spent = self._spend_children((tenant, label, provider, m.api, source))
        counts = (
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.cache_creation_tokens,
            usage.reasoning_tokens,
        )
        for counter, tokens in zip(counters, counts, strict=True):
            if tokens:
                counter.inc(tokens)
        spent.inc(cost_usd)
        if found is None:
            self.metrics.unpriced.labels(provider, m.api).inc()
        duration, first_token = self._timing_children((provider, m.api, label))
        duration.observe(self.clock() - m.started)
        if m.first_byte is not None and m.meter is not None and m.meter.sse is not None:
            first_token.observe(m.first_byte - m.started)
        ex.metadata.update(
            {
                "model": model or "",
                "input_tokens": usage.input_tokens,
                "output_tokens": usage.output_tokens,
                "cached_input_tokens": usage.cached_input_tokens,
                "cache_creation_tokens": usage.cache_creation_tokens,
                "reasoning_tokens": usage.reasoning_tokens,
                "cost_usd": f"{cost_usd:.9f}",  # a decimal, like the cost header
                "usage_estimated": reading.estimated,
            }
        )
        if m.buffered and found is not None:
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
                priced=found is not None,
            )
        )


def _with_include_usage(body: bytes, doc: dict[str, Any]) -> bytes | None:
    """The body with stream_options.include_usage set, spliced in when that is safe.

    None when the document cannot be written out again (orjson writes at most 254
    levels of nesting but parses 1024): the request then goes on unchanged.
    """
    if "stream_options" not in doc:  # no key to collide with: the bytes stay as sent
        start = body.index(b"{") + 1
        return body[:start] + _INCLUDE_USAGE + body[start:]
    options = doc["stream_options"] if isinstance(doc["stream_options"], dict) else {}
    try:
        return orjson.dumps({**doc, "stream_options": {**options, "include_usage": True}})
    except orjson.JSONEncodeError:
        return None


def _is_usage_chunk(doc: Any) -> bool:
    return isinstance(doc, dict) and doc.get("choices") == [] and doc.get("usage") is not None


def _without_usage_chunks(events: list[Parsed]) -> bytes:
    """The complete events as SSE again, minus the usage-only chunk Tollway asked for."""
    out = []
    for event, doc in events:
        if _is_usage_chunk(doc):
            continue
        if event.type != "message":
            out.append(f"event: {event.type}\n")
        out.extend(f"data: {line}\n" for line in event.data.split("\n"))
        out.append("\n")
    return "".join(out).encode()
