"""Limit rules: config checks, which rules apply to whom, counters, reservations."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from extproc import keys
from extproc.config import Config, LimitRule
from extproc.limits.rules import RuleSet, compile_rule
from extproc.stages.limits import BLOB_TOKENS, estimate_input_tokens, openai_duration, output_cap

ALICE = keys.generate(name="alice", tenant="acme")[1]
BOB = keys.generate(name="bob", tenant="other")[1]


def rule(**fields: Any) -> LimitRule:
    return LimitRule.model_validate({"name": "r", **fields})


@pytest.mark.parametrize(
    ("fields", "error"),
    [
        ({"requests": 1}, "needs per"),
        ({"requests": 1, "tokens": 5, "per": "minute"}, "exactly one"),
        ({}, "exactly one"),
        ({"concurrent": 2, "per": "minute"}, "no period"),
        ({"budget_usd": 5, "per": "hour"}, "day or month"),
        ({"requests": 1, "per": "month"}, "needs per"),
        ({"requests": 1, "per": "minute", "by": ["user"]}, "is not one of"),
        ({"requests": 1, "per": "minute", "by": ["header:X-User"]}, "lower-case"),
        ({"requests": 1, "per": "minute", "by": ["key", "key"]}, "twice"),
        ({"budget_usd": 5, "per": "month", "timezone": "Mars/Olympus"}, "unknown timezone"),
        ({"budget_usd": "0.0000001", "per": "day"}, "decimal"),
    ],
)
def test_a_rule_that_makes_no_sense_is_refused_at_load(fields: dict[str, Any], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        rule(**fields)


def test_rule_names_are_unique() -> None:
    with pytest.raises(ValidationError, match="unique: a"):
        Config.model_validate(
            {"limits": [{"name": "a", "concurrent": 1}, {"name": "a", "concurrent": 2}]}
        )


def test_budgets_fail_closed_and_rates_open_unless_told() -> None:
    assert rule(budget_usd=5, per="month").fails_closed
    assert not rule(requests=5, per="minute").fails_closed
    assert not rule(concurrent=5).fails_closed
    assert not rule(budget_usd=5, per="month", on_store_error="fail_open").fails_closed
    assert rule(tokens=5, per="minute", on_store_error="fail_closed").fails_closed


def test_a_budget_counts_exact_micro_dollars() -> None:
    assert compile_rule(rule(budget_usd="0.1", per="day")).limit == 100_000


def test_who_a_rule_applies_to() -> None:
    by_key = compile_rule(rule(requests=1, per="minute", by=["key"]))
    by_ip = compile_rule(rule(requests=1, per="minute", by=["client_ip"]))
    by_user = compile_rule(rule(requests=1, per="minute", by=["header:x-user-id"]))
    for_acme = compile_rule(rule(requests=1, per="minute", match={"tenants": ["acme"]}))
    on_route = compile_rule(rule(requests=1, per="minute", match={"routes": ["openai"]}))
    assert by_key.applies("openai", ALICE) and not by_key.applies("openai", None)
    assert by_ip.applies("openai", None)  # an anonymous caller has an address
    assert not by_user.applies("openai", None)  # but no trusted user id
    assert for_acme.applies("openai", ALICE) and not for_acme.applies("openai", BOB)
    assert on_route.applies("openai", BOB) and not on_route.applies("anthropic", BOB)


def test_models_match_with_wildcards_and_need_the_body() -> None:
    gpt4o = compile_rule(rule(requests=1, per="minute", match={"models": ["gpt-4o*"]}))
    assert gpt4o.needs_body
    assert gpt4o.applies_to_model("gpt-4o-mini") and not gpt4o.applies_to_model("o3")
    assert not gpt4o.applies_to_model(None)  # a request naming no model is not one of them
    assert not compile_rule(rule(requests=1, per="minute", by=["key"])).needs_body
    assert compile_rule(rule(tokens=1, per="minute")).needs_body


def test_counters_are_per_scope_and_values_a_client_controls_are_hashed() -> None:
    by_user = compile_rule(rule(name="per-user", requests=1, per="minute", by=["header:x-user-id"]))

    def name(identity: keys.KeyRecord, user: str) -> str:
        return by_user.subject(identity, "openai", None, "", {"x-user-id": user})

    assert name(ALICE, "u1") == name(ALICE, "u1") != name(ALICE, "u2")
    assert name(ALICE, "u1") != name(BOB, "u1")  # one tenant's users are not another's
    long = name(ALICE, "x" * 10_000 + ":{}")
    assert long.startswith("h") and len(long) < 30
    by_key = compile_rule(rule(name="k", requests=1, per="minute", by=["key", "tenant"]))
    assert by_key.subject(ALICE, "openai", None, "", {}) == f"{ALICE.id}:acme"
    assert compile_rule(rule(requests=1, per="minute")).subject(None, "r", None, "", {}) == "all"


def test_a_keys_own_limits_replace_the_matching_rule_and_add_the_others() -> None:
    rules = RuleSet(
        [
            rule(name="key-rpm", by=["key"], requests=60, per="minute"),
            rule(name="key-rph", by=["key"], requests=1000, per="hour"),
            rule(name="tenant-tpm", by=["tenant"], tokens=10_000, per="minute"),
        ]
    )
    limits = keys.KeyLimits(rpm=600, budget_usd=Decimal("2.5"), budget_period="day")
    vip = keys.generate(name="vip", tenant="acme", limits=limits)[1]
    assert [r.name for r in rules.for_identity(ALICE)] == ["key-rpm", "key-rph", "tenant-tpm"]
    mine = {r.name: r for r in rules.for_identity(vip)}
    assert set(mine) == {"key-rph", "tenant-tpm", "key_rpm", "key_budget"}
    assert mine["key_rpm"].limit == 600 and mine["key_budget"].limit == 2_500_000
    assert mine["key_budget"].calendar == "day" and mine["key_budget"].by == ("key",)
    assert rules.for_identity(vip) is rules.for_identity(vip)  # built once a key


def test_the_prompt_estimate_counts_text_not_base64() -> None:
    text = orjson.dumps({"messages": [{"role": "user", "content": "word " * 400}]})
    assert estimate_input_tokens(text) == -(-len(text) // 4)
    image = "data:image/png;base64," + "A" * 2_000_000
    with_image = orjson.dumps(
        {"messages": [{"content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    )
    assert BLOB_TOKENS <= estimate_input_tokens(with_image) < BLOB_TOKENS + 100
    gemini = orjson.dumps({"contents": [{"parts": [{"inlineData": {"data": "QUJD" * 4096}}]}]})
    assert estimate_input_tokens(gemini) < BLOB_TOKENS + 100


@pytest.mark.parametrize(
    ("doc", "cap"),
    [
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
        ({"max_output_tokens": 70}, 70),  # Responses API
        ({"max_tokens": 100, "n": 3}, 300),
        ({"generationConfig": {"maxOutputTokens": 40, "candidateCount": 2}}, 80),
        ({"max_tokens": "100"}, None),
        ({"max_tokens": True}, None),
        ({"max_tokens": -1}, None),
        ({}, None),
    ],
)
def test_the_output_cap_is_the_requests_own(doc: dict[str, Any], cap: int | None) -> None:
    assert output_cap(doc) == cap


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.02, "20ms"), (1, "1s"), (1.2, "2s"), (59, "59s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_reset_times_read_like_openais(seconds: float, text: str) -> None:
    assert openai_duration(seconds) == text
