"""Prometheus collectors. Label values come from closed sets (config names, fixed codes)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info

from . import __version__

MESSAGE_KINDS = (
    "request_headers",
    "request_body",
    "request_trailers",
    "response_headers",
    "response_body",
    "response_trailers",
    "unknown",
)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        Info("tollway", "Tollway build information", registry=r).info({"version": __version__})
        self.streams = Counter(
            "tollway_extproc_streams", "ext_proc streams opened by Envoy", registry=r
        )
        messages = Counter(
            "tollway_extproc_messages",
            "ext_proc messages received, by kind (fewer per request is faster)",
            ["kind"],
            registry=r,
        )
        self.messages = {kind: messages.labels(kind) for kind in MESSAGE_KINDS}
        self.requests = Counter(
            "tollway_requests",
            "Requests decided, by route and outcome ('allowed' or the error code)",
            ["route", "outcome"],
            registry=r,
        )
        self.internal_errors = Counter(
            "tollway_internal_errors",
            "Requests answered 500 because of a fault inside Tollway",
            registry=r,
        )
        self.reloads = Counter(
            "tollway_reloads",
            "Reloads of watched files (keys, provider credentials), by result",
            ["file", "result"],
            registry=r,
        )
        self.keys = Gauge("tollway_api_keys", "API keys loaded, by state", ["state"], registry=r)
