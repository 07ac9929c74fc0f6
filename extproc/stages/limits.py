"""Request, token and concurrency limits and $ budgets: reserve before, settle after.

At the request (its headers when no rule applying to it needs the body, else
its body) the flow reserves, in one atomic take for every rule that applies:
one request, the tokens it may use (the prompt estimated, plus its own output
cap or ``reservations.default_output_tokens``), one concurrency lease, and
the dollars those tokens would cost. A rule that would go over denies the
request with a 429 in the route's error shape, and nothing is reserved. At
``finish`` the flow settles with what metering read: unused tokens and
dollars are given back, any excess is charged; a request that reached no
provider gives all of it back (its request still counts). A concurrency lease
is held until Envoy ends the stream (STREAM_END), and expires if that never
comes. A store that fails or is late decides by each rule's policy: the
request is refused (503) if any rule that applies fails closed.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from ..decisions import Ask, Deny, Outcome, Phase
from ..exchange import BodyError, Exchange
from ..kinds import Usage
from ..limits.quota import INF, Counter, Keys, Quota, Settle, Take, Verdict
from ..limits.rules import MICRO, Rule, RuleSet
from ..metrics import Metrics
from ..pricing import PriceTable, cost
from ..providers.usage import estimate_tokens
from . import Flow

# What the client's own cap on output is called, per API.
_OUTPUT_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")
# Base64 blobs (images, audio, files) are not text: counted as a flat number of tokens.
_BLOB = re.compile(rb'"(?:data:[^"]{512,}|[A-Za-z0-9+/=]{2048,})"')
BLOB_TOKENS = 1600  # about what a large image costs at the providers' top resolution
_MAX_GAUGED = 1000
_SLACK_S = 60.0  # a lease outlives the route's upstream timeout by this much
_HEADER_KINDS = ("requests", "tokens")  # the rules providers' rate-limit headers describe

UNAVAILABLE = Deny(
    503,
    "api_error",
    "limits_unavailable",
    "Rate limits cannot be checked right now; try again shortly.",
    "tollway_limits_unavailable",
)


def estimate_input_tokens(body: bytes) -> int:
    """About four bytes a token for text; each base64 blob a flat BLOB_TOKENS."""
    blobs = [m.end() - m.start() for m in _BLOB.finditer(body)] if len(body) > 512 else []
    return estimate_tokens(len(body) - sum(blobs)) + BLOB_TOKENS * len(blobs)


def output_cap(doc: dict[str, Any]) -> int | None:
    """The request's own cap on output tokens times the choices asked for, if it set one."""
    cap: int | None = next((doc[k] for k in _OUTPUT_CAPS if type(doc.get(k)) is int), None)
    choices = doc.get("n")
    config = doc.get("generationConfig") or doc.get("generation_config")
    if isinstance(config, dict):  # Gemini
        found = config.get("maxOutputTokens", config.get("max_output_tokens"))
        cap = found if type(found) is int else cap
        choices = config.get("candidateCount", config.get("candidate_count"))
    if cap is None or cap < 0:
        return None
    return cap * (choices if type(choices) is int and 1 <= choices <= 128 else 1)


def client_ip(ex: Exchange) -> str:
    """The peer Envoy saw: the last X-Forwarded-For entry (Envoy appends it)."""
    return ex.headers.get("x-forwarded-for", "").rpartition(",")[2].strip()


class LimitsStage:
    def __init__(
        self,
        rules: RuleSet,
        quota: Quota,
        prices: PriceTable,
        metrics: Metrics,
        *,
        keys: Keys | None = None,
        default_output_tokens: int = 4096,
        timeout_s: float | None = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.rules = rules
        self.quota = quota
        self.keys = keys or Keys()
        self.prices = prices
        self.metrics = metrics
        self.default_output_tokens = default_output_tokens
        self.timeout_s = timeout_s
        self.clock = clock
        self._gauged: dict[str, dict[str, Any]] = {}  # per rule: scope -> gauge child
        # Request ids: unique per stage (a random prefix) and cheap (a counter).
        self._id_prefix = secrets.token_hex(6)
        self._ids = itertools.count()
        # Hot-path caches. Decision counters by (rule, outcome): closed sets, and
        # labels() takes a lock and builds a tuple each time.
        self._decisions: dict[tuple[str, str], Any] = {}
        self._starts: dict[
            tuple[str, str, str], tuple[tuple[Rule, ...], tuple[Rule, ...], Phase]
        ] = {}
        self._plans: dict[tuple[int, str, str, str | None], Plan] = {}
        for rule in rules.rules:
            if rule.kind == "budget":
                metrics.budget_warn.labels(rule.name).set(rule.warn_at)

    def gauge(self, rule: Rule, ex: Exchange) -> Any:
        """The gauge of a budget's spent share for this request's scope, for a bounded
        set of scopes (by key, by tenant or over all), else None."""
        identity = ex.identity
        if rule.by == ():
            scope = "all"
        elif rule.by == ("key",) and identity is not None:
            scope = identity.id
        elif rule.by == ("tenant",) and identity is not None:
            scope = identity.tenant
        else:
            return None
        scopes = self._gauged.setdefault(rule.name, {})
        child = scopes.get(scope)
        if child is None:
            if len(scopes) >= _MAX_GAUGED:
                return None
            child = scopes[scope] = self.metrics.budget_used.labels(rule.name, scope)
        return child

    def request_id(self) -> str:
        return f"{self._id_prefix}{next(self._ids):x}"

    def start(self, ex: Exchange) -> LimitsFlow | Deny | Ask[LimitsFlow | Deny | None] | None:
        route = ex.route
        if route is None:
            return None
        identity = ex.identity
        source = self.rules.for_identity(identity)
        at = (identity.id, identity.tenant, route.name) if identity else ("", "", route.name)
        found = self._starts.get(at)
        if found is None or found[0] is not source:  # a key's limits changed: work it out again
            rules = tuple(r for r in source if r.applies(route.name, identity))
            wants = Phase.STREAM_END if any(r.kind == "concurrent" for r in rules) else Phase.NONE
            if any(r.needs_body for r in rules):
                wants |= Phase.REQUEST_BODY
            found = self._starts[at] = (source, rules, wants)
            _bound(self._starts)
        _, rules, wants = found
        if not rules:
            return None
        flow = LimitsFlow(self, rules, wants)
        if Phase.REQUEST_BODY in wants:
            return flow
        return flow.take(ex, None, 0, 0)

    def plan(self, ex: Exchange, rules: tuple[Rule, ...], model: str | None, now: float) -> Plan:
        """The rules that apply to this request's model and their counters, worked out
        once per key, route and model (per request only for rules by client address
        or header)."""
        route, identity = ex.route, ex.identity
        assert route is not None
        at = (id(rules), identity.id if identity else "", route.name, model)
        plan = self._plans.get(at)
        if plan is not None and plan.source is rules and now < plan.expires:
            return plan
        plan = Plan(self, ex, rules, model, now)
        if not any(_per_request(r) for r in plan.rules):
            self._plans[at] = plan
            _bound(self._plans)
        return plan

    def child(self, rule: Rule, outcome: str) -> Any:
        """The decision counter of a rule and outcome."""
        child = self._decisions.get((rule.name, outcome))
        if child is None:
            child = self._decisions[rule.name, outcome] = self.metrics.limit_decisions.labels(
                rule.name, outcome
            )
        return child

    def count(self, rule: Rule, outcome: str) -> None:
        self.child(rule, outcome).inc()


class Plan:
    """What every request of one key, route and model takes: its rules, their
    counters (without this request's amounts) and metric children."""

    __slots__ = (
        "allowed",
        "counters",
        "expires",
        "gauges",
        "has_budget",
        "rules",
        "source",
        "subjects",
    )

    def __init__(
        self,
        stage: LimitsStage,
        ex: Exchange,
        source: tuple[Rule, ...],  # the rules that apply to the key and route
        model: str | None,
        now: float,
    ) -> None:
        route = ex.route
        assert route is not None
        ip, lease_s = client_ip(ex), route.upstream.timeout_s + _SLACK_S
        self.source = source
        self.rules = rules = tuple(r for r in source if r.applies_to_model(model))
        # What each rule counts by (client values hashed): the audit log names it too.
        self.subjects = tuple(
            rule.subject(ex.identity, route.name, model, ip, ex.headers) for rule in rules
        )
        self.counters = tuple(
            rule.counter(stage.keys, subject, now, 0, lease_s)
            for rule, subject in zip(rules, self.subjects, strict=True)
        )
        # Until the first of its budget windows ends (then the keys change).
        self.expires = min((c.window_end for c in self.counters if c.kind == "budget"), default=INF)
        self.has_budget = any(r.kind == "budget" for r in rules)
        self.allowed = tuple(stage.child(rule, "allowed") for rule in rules)
        self.gauges = tuple(
            (i, stage.gauge(rule, ex)) for i, rule in enumerate(rules) if rule.kind == "budget"
        )

    def counters_for(self, amounts: Sequence[int]) -> tuple[Counter, ...]:
        return tuple(
            [
                Counter(c.rule, c.key, c.kind, c.limit, c.period_s, c.window_end, a, c.shadow)
                for c, a in zip(self.counters, amounts, strict=True)
            ]
        )


def _per_request(rule: Rule) -> bool:
    """Whether the rule's counter depends on more than key, route and model."""
    return any(d == "client_ip" or d.startswith("header:") for d in rule.by)


def _bound(cache: dict[Any, Any]) -> None:
    if len(cache) > 10_000:  # keys, routes and models come and go
        cache.clear()


class LimitsFlow(Flow):
    """One request's reservation: the counters it took, settled once at finish."""

    __slots__ = ("counters", "plan", "request_id", "rules", "stage", "taken", "wants")

    def __init__(self, stage: LimitsStage, rules: tuple[Rule, ...], wants: Phase) -> None:
        self.stage = stage
        self.rules = rules
        self.plan: Plan | None = None
        self.counters: tuple[Counter, ...] = ()
        self.taken = False  # the store admitted this request: settle at finish
        # Ours, not Envoy's x-request-id: a client must not share one lease between requests.
        self.request_id = stage.request_id()
        self.wants = wants

    def on_request_body(self, ex: Exchange) -> Ask[Deny | None] | None:
        body = ex.body or b""
        call = ex.call
        model = call.path_model if call is not None else None
        out = 0
        try:
            doc = ex.json()
        except BodyError:
            doc = {}
        if isinstance(doc.get("model"), str):
            model = doc["model"]
        if call is not None and call.api != "embeddings":
            cap = output_cap(doc)
            out = cap if cap is not None else self.stage.default_output_tokens
        return self.take(ex, model, estimate_input_tokens(body), out)

    def take(
        self, ex: Exchange, model: str | None, input_tokens: int, output_tokens: int
    ) -> Ask[Any] | None:
        stage = self.stage
        now = stage.clock()
        plan = self.plan = stage.plan(ex, self.rules, model, now)
        self.rules = plan.rules
        if not plan.rules:
            return None
        micro = 0
        if plan.has_budget:
            found = stage.prices.lookup(model)
            if found is not None:
                usd = cost(
                    found[1], Usage(input_tokens=input_tokens, output_tokens=output_tokens)
                ).usd
                micro = math.ceil(usd * MICRO)
        amounts = []
        for rule in plan.rules:
            if rule.kind == "tokens":
                amounts.append(_tokens(rule, input_tokens, output_tokens))
            else:
                amounts.append(micro if rule.kind == "budget" else 1)
        self.counters = plan.counters_for(amounts)
        take = Take(self.request_id, now, self.counters)
        return Ask(
            "limits",
            lambda: stage.quota.take(take),
            lambda verdict: self._decide(ex, verdict, now),
            self._failed,
            stage.timeout_s,
        )

    def _decide(self, ex: Exchange, verdict: Verdict, now: float) -> Any:
        stage = self.stage
        for i in verdict.shadow_denied:
            stage.count(self.rules[i], "shadow_limited")
        _rate_headers(ex, self.rules, verdict, now)
        assert self.plan is not None
        for i, gauge in self.plan.gauges:  # on a denial too: the gauge shows the spend as it is
            if gauge is not None:
                gauge.set(1 - max(0, verdict.remaining[i]) / self.rules[i].limit)
        if not verdict.allowed:
            assert verdict.denied_by is not None
            rule = self.rules[verdict.denied_by]
            stage.count(rule, "limited")
            return _too_many(rule, verdict, self.plan.subjects[verdict.denied_by])
        self.taken = True
        for child in self.plan.allowed:
            child.inc()
        return self if Phase.REQUEST_BODY not in self.wants else None

    def _failed(self, reason: str) -> Any:
        closed = any(r.fails_closed and not r.shadow for r in self.rules)
        for rule in self.rules:
            self.stage.count(rule, "failed_closed" if closed else "failed_open")
        if closed:
            return UNAVAILABLE
        # Let through: still charged at settle (in full: nothing was reserved), once
        # the store is back, so an outage does not make spending vanish.
        self.taken = True
        return self if Phase.REQUEST_BODY not in self.wants else None

    def finish(self, ex: Exchange, outcome: Outcome) -> None:
        if not self.taken:
            return
        usage = ex.usage or Usage()
        micro = math.ceil((ex.cost_usd or 0.0) * MICRO)
        actual = []
        for rule, counter in zip(self.rules, self.counters, strict=True):
            if rule.kind == "tokens":
                actual.append(_tokens(rule, usage.input_tokens, usage.output_tokens))
            elif rule.kind == "budget":
                actual.append(micro)
            elif rule.kind == "concurrent":
                actual.append(0)  # the lease ends
            else:
                actual.append(counter.amount)  # a request counts once it was admitted
        self.stage.quota.settle(
            Settle(self.request_id, self.stage.clock(), self.counters, tuple(actual))
        )


def _tokens(rule: Rule, input_tokens: int, output_tokens: int) -> int:
    if rule.count == "input":
        return input_tokens
    if rule.count == "output":
        return output_tokens
    return input_tokens + output_tokens


def _too_many(rule: Rule, verdict: Verdict, subject: str) -> Deny:
    retry = verdict.retry_after_s
    if rule.kind == "budget":
        message = f"Budget {rule.name!r} is spent for this {rule.per}."
        kind, code = "insufficient_quota", "insufficient_quota"
    else:
        what = {"requests": "requests", "tokens": "tokens", "concurrent": "concurrent requests"}[
            rule.kind
        ]
        per = f" per {rule.per}" if rule.per else ""
        message = f"Rate limit reached for {what} (rule {rule.name!r}: {rule.limit}{per})."
        kind, code = ("tokens" if rule.kind == "tokens" else "requests"), "rate_limit_exceeded"
    headers: tuple[tuple[str, str], ...] = ()
    if math.isinf(retry):
        message += " This request alone is larger than the limit."
    else:
        seconds = max(1, math.ceil(retry))
        message += f" Retry in {seconds}s."
        headers = (("retry-after", str(seconds)),)
    audit = (
        ("rule", rule.name),
        ("kind", rule.kind),
        ("by", ",".join(rule.by)),
        ("subject", subject),
    )
    return Deny(429, kind, code, message, f"tollway_limited_{rule.kind}", headers, audit)


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: 20ms, 1s, 6m0s, 1h2m3s."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _rate_headers(ex: Exchange, rules: Sequence[Rule], verdict: Verdict, now: float) -> None:
    """The tightest enforced request and token rule, as metadata for Envoy's route to
    add as the provider's own rate-limit headers (no extra ext_proc message)."""
    tightest: dict[str, int] = {}
    remaining = verdict.remaining
    for i, rule in enumerate(rules):
        kind = rule.kind
        if kind in _HEADER_KINDS and not rule.shadow:
            best = tightest.get(kind)
            if best is None or remaining[i] < remaining[best]:
                tightest[kind] = i
    anthropic = ex.dialect == "anthropic"
    metadata = ex.metadata
    for name, i in tightest.items():
        reset = verdict.reset_s[i]
        metadata[f"ratelimit_limit_{name}"] = rules[i].limit
        metadata[f"ratelimit_remaining_{name}"] = max(0, remaining[i])
        metadata[f"ratelimit_reset_{name}"] = (
            datetime.fromtimestamp(now + reset, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            if anthropic
            else openai_duration(reset)
        )
