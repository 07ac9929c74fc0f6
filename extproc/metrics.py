"""Prometheus collectors. Label values come from closed sets (config names, fixed codes)."""

from __future__ import annotations

from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

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
        self.backend_failures = Counter(
            "tollway_backend_failures",
            "A stage's backend failed or missed its deadline; the stage's policy decided",
            ["stage", "reason"],
            registry=r,
        )
        self.limit_decisions = Counter(
            "tollway_limit_decisions",
            "Limit rule decisions: allowed, limited, shadow_limited, failed_open, failed_closed",
            ["rule", "outcome"],
            registry=r,
        )
        self.budget_used = Gauge(
            "tollway_budget_used_ratio",
            "Share of a budget spent in its current window (at most 1000 scopes a rule)",
            ["rule", "scope"],
            registry=r,
        )
        self.budget_warn = Gauge(
            "tollway_budget_warn_ratio",
            "A budget rule's warning threshold (alert when used_ratio passes it)",
            ["rule"],
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
        # Exported at 0 from the start, so that increase() sees the first reload.
        for file, result in (("keys", "ok"), ("keys", "error"), ("credentials", "ok")):
            self.reloads.labels(file, result)
        self.keys = Gauge("tollway_api_keys", "API keys loaded, by state", ["state"], registry=r)
        # Metering. Labels: tenant (from the keys file, "none" without auth), model (the
        # price table's name, else "other"), provider (the route's API kind), api.
        self.tokens = Counter(
            "tollway_gen_ai_tokens",
            "Tokens by type: input and output are totals, every other type is a part of "
            "one of them (README: Metering). source: reported or estimated",
            ["tenant", "model", "provider", "api", "type", "source"],
            registry=r,
        )
        self.cost = Counter(
            "tollway_gen_ai_cost_usd",
            "Cost in USD from the price table",
            ["tenant", "model", "provider", "api", "source"],
            registry=r,
        )
        self.duration = Histogram(
            "tollway_gen_ai_request_duration_seconds",
            "From request headers to the end of a metered response",
            ["provider", "api", "model"],
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "tollway_gen_ai_time_to_first_token_seconds",
            "From request headers to the first chunk of a streamed response",
            ["provider", "api", "model"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.unpriced = Counter(
            "tollway_gen_ai_unpriced_requests",
            "Metered requests whose model has no price (their cost counts as 0)",
            ["provider", "api"],
            registry=r,
        )
        self.unpriced_tokens = Counter(
            "tollway_gen_ai_unpriced_tokens",
            "Tokens of a kind (or a service tier) the price table has no rate for, priced "
            "at the rate they are a part of: the provider's bill may differ",
            ["provider", "model", "kind", "service_tier"],
            registry=r,
        )
        unmetered = Counter(
            "tollway_gen_ai_unmetered_responses",
            "Successful responses whose usage could not be read, by reason",
            ["reason"],
            registry=r,
        )
        self.unmetered = {
            reason: unmetered.labels(reason) for reason in ("content_encoding", "body_too_large")
        }
        # Redaction. Labels: entity type (built-in or a custom pattern's name), action.
        self.redactions = Counter(
            "tollway_redactions",
            "Entities found in prompts or answers, by type and the action taken",
            ["entity", "action", "where"],
            registry=r,
        )
        self.redaction_failures = Counter(
            "tollway_redaction_failures",
            "Requests the redactor could not check, by what the policy did",
            ["outcome"],
            registry=r,
        )
        for outcome in ("failed_closed", "failed_open"):
            self.redaction_failures.labels(outcome)
        # The quota store (Redis): see StoreMetrics.
        self.store_latency = Histogram(
            "tollway_store_latency_seconds",
            "Store calls that answered, by operation (take, settle, usage)",
            ["op"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.store_errors = Counter(
            "tollway_store_errors",
            "Store calls that failed, by operation and reason (timeout, error, breaker_open)",
            ["op", "reason"],
            registry=r,
        )
        self.store_breaker_open = Gauge(
            "tollway_store_breaker_open",
            "1 while the store's circuit breaker is open (calls fail at once)",
            registry=r,
        )
        self.settlements_dropped = Counter(
            "tollway_settlements_dropped",
            "Settlements never written, by reason (queue_full, failed after retries, shutdown)",
            ["reason"],
            registry=r,
        )
        # At 0 from the start: drops come in bursts, and increase() cannot see the
        # first one of a series born above 0.
        for op in ("take", "settle", "usage"):
            for reason in ("timeout", "error", "breaker_open"):
                self.store_errors.labels(op, reason)
        for reason in ("queue_full", "failed", "shutdown"):
            self.settlements_dropped.labels(reason)
        self.audit_events = Counter(
            "tollway_audit_events",
            "Audit log lines, by event (key changes, reloads, denials, suppressed summaries)",
            ["event"],
            registry=r,
        )
        self.audit_suppressed = Counter(
            "tollway_audit_suppressed",
            "Denials not written to the audit log (throttled), by event",
            ["event"],
            registry=r,
        )
        self.audit_dropped = Counter(
            "tollway_audit_dropped",
            "Audit lines lost: the writer's queue was full or the write failed",
            ["reason"],
            registry=r,
        )
        for reason in ("queue_full", "error"):
            self.audit_dropped.labels(reason)


class StoreMetrics:
    """A store backend's observer (store.StoreObserver) that feeds the collectors."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def latency(self, op: str, seconds: float) -> None:
        self._m.store_latency.labels(op).observe(seconds)

    def error(self, op: str, reason: Literal["timeout", "error", "breaker_open"]) -> None:
        self._m.store_errors.labels(op, reason).inc()

    def breaker_open(self, is_open: bool) -> None:
        self._m.store_breaker_open.set(1 if is_open else 0)

    def settlement_dropped(self, reason: Literal["queue_full", "failed", "shutdown"]) -> None:
        self._m.settlements_dropped.labels(reason).inc()
