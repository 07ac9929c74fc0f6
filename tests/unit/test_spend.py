"""`tollway spend`'s core: which counters a subject has, the query, the report (no I/O)."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest

from extproc import keys
from extproc.config import LimitRule
from extproc.limits.memory import MemoryQuota
from extproc.limits.quota import Keys, Settle, Take
from extproc.limits.rules import RuleSet
from extproc.limits.spend import Query, Subject, find_subject, parse_query, plan, report, usd

NOW = 1_795_988_000.0  # 2026-11-29 21:33:20 UTC: already the 30th in Tokyo

RULES = [
    LimitRule.model_validate(rule)
    for rule in (
        {"name": "key_month", "by": ["key"], "budget_usd": 5, "per": "month"},
        {"name": "key_rpm", "by": ["key"], "requests": 60, "per": "minute"},
        {
            "name": "tenant_day",
            "by": ["tenant"],
            "budget_usd": 100,
            "per": "day",
            "timezone": "Asia/Tokyo",
        },
        {"name": "everyone", "budget_usd": 1000, "per": "month"},
        {
            "name": "other_tenant",
            "by": ["tenant"],
            "match": {"tenants": ["globex"]},
            "tokens": 9,
            "per": "minute",
        },
        {"name": "per_model", "by": ["key", "model"], "requests": 5, "per": "minute"},
        {"name": "per_ip", "by": ["client_ip"], "requests": 5, "per": "minute"},
    )
]


def _key(name: str, tenant: str = "acme", **limits: Any) -> keys.KeyRecord:
    return keys.generate(name=name, tenant=tenant, limits=keys.KeyLimits(**limits))[1]


ALICE = _key("alice", budget_usd=Decimal(2), budget_period="day")
BOB = _key("bob")
GLOBEX = _key("carol", tenant="globex")


@pytest.mark.parametrize(
    ("subject", "period", "rows"),
    [
        # A key: its own rules (its override added), its tenant's, the global ones;
        # never rules by model or IP (one counter per value), nor another tenant's.
        (
            Subject("key", ALICE),
            None,
            [
                ("key_month", "key"),
                ("key_rpm", "key"),
                ("tenant_day", "tenant"),
                ("everyone", "all"),
                ("key_budget", "key"),
            ],
        ),
        (
            Subject("key", ALICE),
            "day",
            [("key_rpm", "key"), ("tenant_day", "tenant"), ("key_budget", "key")],
        ),
        (
            Subject("key", BOB),
            "month",
            [("key_month", "key"), ("key_rpm", "key"), ("everyone", "all")],
        ),
        # A tenant: no key's counter.
        (Subject("tenant", BOB), None, [("tenant_day", "tenant"), ("everyone", "all")]),
        (
            Subject("tenant", GLOBEX),
            None,
            [("tenant_day", "tenant"), ("everyone", "all"), ("other_tenant", "tenant")],
        ),
        (Subject("all"), None, [("everyone", "all")]),
    ],
)
def test_plan_picks_the_subjects_own_counters(
    subject: Subject, period: Any, rows: list[tuple[str, str]]
) -> None:
    lines = plan(RuleSet(RULES), Keys(), subject, NOW, period)
    assert [(line.rule.name, line.scope) for line in lines] == rows


def test_counters_are_the_ones_the_stage_charges() -> None:
    keys_ = Keys("t")
    lines = {
        line.rule.name: line for line in plan(RuleSet(RULES), keys_, Subject("key", ALICE), NOW)
    }
    assert lines["key_month"].counter.key == keys_.budget("key_month", ALICE.id, "2026-11")
    assert lines["key_month"].window == "2026-11"
    # Tokyo is 9 hours ahead: its Monday has begun.
    assert lines["tenant_day"].counter.key == keys_.budget("tenant_day", "acme", "2026-11-30")
    assert lines["everyone"].counter.key == keys_.budget("everyone", "all", "2026-11")
    assert lines["key_rpm"].counter.key == keys_.rate("key_rpm", ALICE.id)
    assert all(line.counter.amount == 0 for line in lines.values())


def test_report_shows_spend_and_what_is_left() -> None:
    quota = MemoryQuota()
    rules = RuleSet(RULES)
    subject = Subject("key", ALICE)
    counters = tuple(line.counter for line in plan(rules, Keys(), subject, NOW))
    charged = tuple(1 if c.kind == "rate" else 1_234_567 for c in counters)
    taken = tuple(replace(c, amount=a) for c, a in zip(counters, charged, strict=True))
    take = Take("r1", NOW, taken)
    assert quota.take(take).allowed
    quota.settle(Settle("r1", NOW, take.counters, charged))
    lines = plan(rules, Keys(), subject, NOW + 0.5)
    doc = report(
        subject, lines, quota.usage([line.counter for line in lines], NOW + 0.5), NOW + 0.5
    )
    assert doc["key"] == {"id": ALICE.id, "name": "alice", "tenant": "acme"}
    assert doc["at"] == "2026-11-29T21:33:20+00:00"
    row = {r["rule"]: r for r in doc["limits"]}
    assert row["key_month"] | {"reset_s": 0} == {
        "rule": "key_month",
        "scope": "key",
        "kind": "budget",
        "per": "month",
        "shadow": False,
        "limit": 5_000_000,
        "used": 1_234_567,
        "remaining": 3_765_433,
        "reset_s": 0,
        "window": "2026-11",
        "limit_usd": "5.000000",
        "used_usd": "1.234567",
        "remaining_usd": "3.765433",
    }
    assert row["key_month"]["reset_s"] == pytest.approx(1_796_083_200 - NOW - 0.5)
    assert (row["key_rpm"]["used"], row["key_rpm"]["remaining"]) == (1, 59)
    assert row["key_rpm"]["used_usd"] is None
    # Bob's counters are his own; his tenant's and everyone's hold what Alice spent.
    bob = plan(rules, Keys(), Subject("key", BOB), NOW)
    levels = quota.usage([line.counter for line in bob], NOW)
    by_rule = {line.rule.name: level.used for line, level in zip(bob, levels, strict=True)}
    assert by_rule == {"key_month": 0, "key_rpm": 0, "tenant_day": 1_234_567, "everyone": 1_234_567}


@pytest.mark.parametrize(
    ("text", "query"),
    [
        ("", Query()),
        ("key=0123456789ab", Query(key_id="0123456789ab")),
        ("tenant=a%20b&period=day", Query(tenant="a b", period="day")),
        ("period=month", Query(period="month")),
    ],
)
def test_parse_query(text: str, query: Query) -> None:
    assert parse_query(text) == query


@pytest.mark.parametrize(
    "text",
    ["key=a&tenant=b", "period=week", "key=", "key=a&key=b", "user=x", "key", "&&"],
)
def test_parse_query_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_query(text)


def test_a_subject_asks_for_itself() -> None:
    for subject in (Subject("key", ALICE), Subject("tenant", ALICE), Subject("all")):
        query = parse_query(subject.query("day"))
        assert find_subject([BOB, ALICE, GLOBEX], query) == (
            subject if subject.scope != "tenant" else Subject("tenant", BOB)  # any acme key
        )
    assert find_subject([BOB], Query(key_id=ALICE.id)) is None
    assert find_subject([BOB], Query(tenant="globex")) is None


@pytest.mark.parametrize(
    ("micro", "text"),
    [(0, "0.000000"), (1, "0.000001"), (1_234_567, "1.234567"), (5 * 10**6, "5.000000")],
)
def test_usd(micro: int, text: str) -> None:
    assert usd(micro) == text
