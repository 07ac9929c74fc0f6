"""The limits stage through the pipeline, on the embedded store: what a client sees."""

from __future__ import annotations

import dataclasses
from typing import Any

import orjson
import pytest

from extproc import error_shapes, keys
from extproc.config import LimitRule, ModelPrice
from extproc.decisions import BodyMode, Deny, Phase
from extproc.limits.memory import MemoryQuota
from extproc.limits.quota import StoreUnavailable, Take, Verdict
from extproc.limits.rules import RuleSet
from extproc.metrics import Metrics
from extproc.pipeline import Pipeline, Run
from extproc.pricing import PriceTable
from extproc.routes import RouteTable
from extproc.stages.auth import AuthStage
from extproc.stages.credentials import CredentialStage
from extproc.stages.limits import LimitsFlow, LimitsStage
from extproc.stages.metering import MeteringStage

from .factories import PROVIDER_KEYS, Clock, upstreams

PRICES = PriceTable({"gpt-4o": ModelPrice(provider="openai", input=2.5, output=10)})
KEY, RECORD = keys.generate(name="alice", tenant="acme")


class Broken:
    """A store that is down: every take fails at once (as an open breaker does)."""

    def take(self, take: Take) -> Verdict:
        raise StoreUnavailable("breaker_open")

    def settle(self, settle: object) -> None:
        pass


class World:
    def __init__(self, *rules: dict[str, Any], quota: Any = None, record: Any = RECORD) -> None:
        self.clock = Clock()
        self.metrics = Metrics()
        self.quota = quota if quota is not None else MemoryQuota()
        limit_rules = [LimitRule.model_validate(r) for r in rules]
        self.limits = LimitsStage(
            RuleSet(limit_rules), self.quota, PRICES, self.metrics, clock=self.clock
        )
        metering = MeteringStage(PRICES, _NoRecords(), self.metrics, wall_clock=self.clock)
        stages = [AuthStage(keys.KeyRing([record])), CredentialStage(PROVIDER_KEYS)]
        self.pipeline = Pipeline(
            RouteTable(upstreams()),
            [*stages, self.limits, metering],
            self.clock,
            on_backend_failure=lambda s, r: self.metrics.backend_failures.labels(s, r).inc(),
        )
        self.key = KEY

    def send(
        self, body: dict[str, Any] | None = None, path: str = "/v1/chat/completions", **headers: str
    ) -> tuple[Run, Deny | None]:
        """A request up to where Tollway lets it go (or answers it)."""
        hdrs = {"authorization": f"Bearer {self.key}", "content-type": "application/json"}
        hdrs.update(headers)
        run = self.pipeline.start("POST", path, hdrs, frozenset())
        decision = run.request_headers()
        if isinstance(decision, Deny):
            return run, decision
        assert isinstance(decision, Phase)
        if Phase.REQUEST_BODY in decision:
            raw = orjson.dumps(body if body is not None else {"model": "gpt-4o"})
            denied = run.request_body(raw)
            assert not hasattr(denied, "__await__")  # the embedded store answers inline
            if denied is not None:
                return run, denied  # type: ignore[return-value]
        return run, None

    def answer(self, run: Run, usage: dict[str, int] | None, *, cut: bool = False) -> None:
        """The upstream's JSON answer (with usage), then Envoy ends the stream."""
        doc: dict[str, Any] = {"model": "gpt-4o", "choices": [{"message": {"content": "x" * 40}}]}
        if usage is not None:
            doc["usage"] = usage
        body = orjson.dumps(doc)
        mode = run.response_headers(
            200, {"content-type": "application/json", "content-length": str(len(body))}
        )
        if mode is not BodyMode.NONE:
            run.response_body(body[: len(body) // 2] if cut else body, end=not cut)
        run.close()

    def counters(self, run: Run) -> Any:
        """The counters the request's limits flow took."""
        return next(f for f in run._flows if isinstance(f, LimitsFlow)).counters

    def decisions(self, rule: str, outcome: str) -> float:
        sample = "tollway_limit_decisions_total"
        return (
            self.metrics.registry.get_sample_value(sample, {"rule": rule, "outcome": outcome}) or 0
        )


class _NoRecords:
    def record_usage(self, record: object) -> None:
        pass


def body_of(deny: Deny, dialect: str = "openai") -> dict[str, Any]:
    return error_shapes.error_document(dialect, deny.status, deny.type, deny.code, deny.message)  # type: ignore[arg-type]


def test_a_request_rate_admits_the_limit_then_answers_429_with_retry_after() -> None:
    world = World({"name": "key-rpm", "by": ["key"], "requests": 3, "per": "minute"})
    for remaining in (2, 1, 0):
        run, denied = world.send()
        assert denied is None and run.ex.metadata["ratelimit_remaining_requests"] == remaining
        assert run.ex.metadata["ratelimit_limit_requests"] == 3
    run, denied = world.send()
    assert denied is not None and denied.status == 429
    assert dict(denied.headers)["retry-after"] == "20"  # one request's worth of a minute
    error = body_of(denied)["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert "key-rpm" in error["message"]
    assert world.decisions("key-rpm", "allowed") == 3 and world.decisions("key-rpm", "limited") == 1
    world.clock.advance(20)  # GCRA: one request back after a third of the minute, not all
    assert world.send()[1] is None
    assert world.send()[1] is not None


def test_anthropic_and_gemini_clients_get_their_own_429() -> None:
    world = World({"name": "r", "requests": 1, "per": "hour"})
    anthropic = {"anthropic-version": "2023-06-01"}
    run, _ = world.send({"model": "claude-3-5-haiku"}, "/v1/messages", **anthropic)
    assert run.ex.metadata["ratelimit_reset_requests"].endswith("Z")  # RFC 3339, as Anthropic's
    _, denied = world.send({"model": "claude-3-5-haiku"}, "/v1/messages", **anthropic)
    assert denied is not None
    assert body_of(denied, "anthropic")["error"]["type"] == "rate_limit_error"
    _, denied = world.send(None, "/v1beta/models/gemini-2.0-flash:generateContent")
    assert denied is not None
    assert body_of(denied, "gemini")["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_tokens_are_reserved_up_front_and_reconciled_with_what_metering_read() -> None:
    world = World({"name": "tpm", "by": ["tenant"], "tokens": 1000, "per": "hour"})
    prompt = {"model": "gpt-4o", "max_tokens": 600, "messages": [{"content": "hi"}]}
    first, denied = world.send(prompt)
    assert denied is None  # reserved: ~15 prompt + 600 output
    _, denied = world.send(prompt)
    assert denied is not None and body_of(denied)["error"]["type"] == "tokens"  # would go over
    world.answer(first, {"prompt_tokens": 10, "completion_tokens": 20})  # used 30 of 615
    second, denied = world.send(prompt)
    assert denied is None  # what the first did not use came back
    assert second.ex.metadata["ratelimit_remaining_tokens"] < 1000 - 600


def test_a_request_alone_over_the_limit_is_told_it_can_never_pass() -> None:
    world = World({"name": "tpm", "tokens": 100, "per": "minute"})
    _, denied = world.send({"model": "gpt-4o", "max_tokens": 5000})
    assert denied is not None and "larger than the limit" in denied.message
    assert not denied.headers  # no retry-after: waiting would not help


def test_a_budget_is_spent_by_what_requests_cost_and_then_refuses() -> None:
    world = World({"name": "tenant-budget", "by": ["tenant"], "budget_usd": "0.01", "per": "day"})
    prompt = {"model": "gpt-4o", "max_tokens": 100}  # reserves ~$0.001
    for _ in range(3):
        run, denied = world.send(prompt)
        assert denied is None
        world.answer(run, {"prompt_tokens": 1000, "completion_tokens": 100})  # $0.0035 each
    _, denied = world.send(prompt)
    assert denied is not None
    error = body_of(denied)["error"]
    assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
    used = world.metrics.registry.get_sample_value(
        "tollway_budget_used_ratio", {"rule": "tenant-budget", "scope": "acme"}
    )
    assert used is not None and used >= 0.7
    world.clock.advance(86400)  # a new day: a new budget
    assert world.send(prompt)[1] is None


def test_a_stream_the_client_abandons_pays_for_what_was_delivered() -> None:
    world = World({"name": "budget", "budget_usd": "1", "per": "month"})
    run, denied = world.send({"model": "gpt-4o", "max_tokens": 10_000})  # reserves $0.10
    assert denied is None
    reserved = world.quota.usage(world.counters(run), world.clock())[0].used
    assert reserved > 0
    world.answer(run, None, cut=True)  # no usage arrived: metering estimates what was delivered
    spent = world.quota.usage(world.counters(run), world.clock())[0].used
    assert 0 < spent < reserved


def test_a_concurrency_lease_is_held_until_envoy_ends_the_stream() -> None:
    world = World({"name": "conc", "by": ["key"], "concurrent": 2})
    first, _ = world.send()
    world.send()
    _, denied = world.send()
    assert denied is not None and "concurrent requests" in denied.message
    first.response_headers(200, {"content-type": "application/json"})  # headers are not the end
    assert world.send()[1] is not None
    first.close()
    assert world.send()[1] is None


def test_a_request_denied_before_the_limits_costs_nothing() -> None:
    world = World({"name": "r", "requests": 1, "per": "hour"})
    run = world.pipeline.start("POST", "/v1/chat/completions", {}, frozenset())
    assert isinstance(run.request_headers(), Deny)  # no key: auth answered 401
    assert world.send()[1] is None  # the one request is still there


def test_shadow_rules_count_would_be_denials_and_deny_nothing() -> None:
    world = World({"name": "trial", "requests": 1, "per": "hour", "shadow": True})
    assert world.send()[1] is None and world.send()[1] is None
    assert world.decisions("trial", "shadow_limited") == 1


def test_rules_match_models_tenants_and_keys() -> None:
    world = World(
        {"name": "gpt4o", "requests": 1, "per": "hour", "match": {"models": ["gpt-4o*"]}},
        {"name": "other", "requests": 1, "per": "hour", "match": {"tenants": ["other"]}},
    )
    assert world.send({"model": "gpt-4o-mini"})[1] is None
    assert world.send({"model": "gpt-4o"})[1] is not None
    assert world.send({"model": "o3"})[1] is None and world.send({"model": "o3"})[1] is None


def test_a_keys_own_limit_overrides_the_configured_one() -> None:
    vip = keys.generate(name="vip", tenant="acme", limits=keys.KeyLimits(rpm=2))
    world = World({"name": "key-rpm", "by": ["key"], "requests": 1, "per": "minute"}, record=vip[1])
    world.key = vip[0]
    assert world.send()[1] is None and world.send()[1] is None
    _, denied = world.send()
    assert denied is not None and "key_rpm" in denied.message


def test_a_keys_limits_changed_in_the_keys_file_apply_to_its_next_request() -> None:
    key, record = keys.generate(name="vip", tenant="acme", limits=keys.KeyLimits(rpm=1))
    world = World(record=record)
    world.key = key
    assert world.send()[1] is None and world.send()[1] is not None
    raised = dataclasses.replace(record, limits=keys.KeyLimits(rpm=3))
    auth = world.pipeline.stages[0]
    assert isinstance(auth, AuthStage)
    auth.keys = keys.KeyRing([raised])  # as a reload of the keys file does
    world.clock.advance(40)  # at 1 a minute, still refused; at 3 a minute, two more fit
    assert world.send()[1] is None and world.send()[1] is None
    assert world.send()[1] is not None


@pytest.mark.parametrize(
    ("rule", "denied"),
    [
        ({"name": "budget", "budget_usd": 5, "per": "month"}, True),  # fails closed by default
        ({"name": "rpm", "requests": 5, "per": "minute"}, False),  # fails open by default
        ({"name": "rpm", "requests": 5, "per": "minute", "on_store_error": "fail_closed"}, True),
    ],
)
def test_a_store_that_is_down_follows_each_rules_policy(rule: dict[str, Any], denied: bool) -> None:
    world = World(rule, quota=Broken())
    _, answer = world.send()
    assert (answer is not None) is denied
    if denied:
        assert answer is not None and answer.status == 503
    outcome = "failed_closed" if denied else "failed_open"
    assert world.decisions(rule["name"], outcome) == 1
    failures = world.metrics.registry.get_sample_value(
        "tollway_backend_failures_total", {"stage": "limits", "reason": "breaker_open"}
    )
    assert failures == 1
