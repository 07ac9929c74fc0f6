"""What ``tollway spend`` reports: one subject's limit counters as they stand (sans-IO
but for one ``Quota.usage`` call).

A subject is a key, a tenant, or nobody (the global rules only). Its rows are the
rules whose counter is the subject's own: ``by: [key]`` (with the key's own
overrides, as ``RuleSet.for_identity`` makes them), ``by: [tenant]`` and
``by: []`` (global), each only where its ``match`` on tenant and key id admits the
subject. A key also sees its tenant's and the global counters, because each of
them can stop its requests; a tenant sees its own and the global ones, never a
key's. Rules that count by anything else (model, route, client IP, a header)
keep one counter per value: there is no one number to show, so they are left out.

Spend is what budget counters hold: micro-USD reserved at the request and settled
with the metered cost, per calendar window in the rule's timezone.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, urlencode

from .quota import Counter, Keys, Level, Quota
from .rules import Rule, RuleSet

if TYPE_CHECKING:
    from ..keys import KeyRecord

Period = Literal["day", "month"]
Scope = Literal["key", "tenant", "all"]
PERIODS: tuple[Period, ...] = ("day", "month")
# The dimensions a rule may count by to be one counter of a subject of this scope.
_OWN: dict[Scope, frozenset[str]] = {
    "key": frozenset(("key", "tenant")),
    "tenant": frozenset(("tenant",)),
    "all": frozenset(),
}


@dataclass(frozen=True, slots=True)
class Query:
    """What a caller asks for: a key by id, a tenant, or neither (global rules)."""

    key_id: str | None = None
    tenant: str | None = None
    period: Period | None = None  # which budgets: day or month ones; None: all


def parse_query(text: str) -> Query:
    """``key=<id>`` or ``tenant=<t>`` (or neither), and ``period=day|month``. Raises
    ValueError with a message fit for the caller."""
    try:
        fields = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text))
    except ValueError:
        raise ValueError("malformed query string") from None
    unknown = sorted(set(fields) - {"key", "tenant", "period"})
    if unknown:
        raise ValueError(f"unknown parameter {unknown[0]!r}: use key, tenant, period")
    values: dict[str, str] = {}
    for name, given in fields.items():
        if len(given) != 1 or not given[0]:
            raise ValueError(f"{name}: give it once, not empty")
        values[name] = given[0]
    if "key" in values and "tenant" in values:
        raise ValueError("give key or tenant, not both")
    period = values.get("period")
    if period is not None and period not in PERIODS:
        raise ValueError("period: day or month")
    return Query(values.get("key"), values.get("tenant"), period)


@dataclass(frozen=True, slots=True)
class Subject:
    scope: Scope
    # The key; for a tenant, any key of that tenant (rules by tenant read only its
    # tenant, and nothing else of this record is reported).
    record: KeyRecord | None = None

    def query(self, period: Period | None = None) -> str:
        """The query string that asks for this subject (what parse_query reads)."""
        fields: dict[str, str] = {}
        if self.record is not None:
            if self.scope == "key":
                fields["key"] = self.record.id
            else:
                fields["tenant"] = self.record.tenant
        if period is not None:
            fields["period"] = period
        return urlencode(fields)


def find_subject(records: Iterable[KeyRecord], query: Query) -> Subject | None:
    """The subject ``query`` names among these keys; None when no key has that id or
    tenant (a tenant exists only through its keys)."""
    if query.key_id is not None:
        found = next((r for r in records if r.id == query.key_id), None)
        return None if found is None else Subject("key", found)
    if query.tenant is not None:
        found = next((r for r in records if r.tenant == query.tenant), None)
        return None if found is None else Subject("tenant", found)
    return Subject("all")


@dataclass(frozen=True, slots=True)
class Line:
    rule: Rule
    scope: Scope  # whose counter: the key's, its tenant's, or everyone's
    counter: Counter
    window: str | None  # budgets: the calendar window's id


def _scope(rule: Rule) -> Scope:
    return "key" if "key" in rule.by else "tenant" if "tenant" in rule.by else "all"


def _admits(rule: Rule, subject: Subject) -> bool:
    record = subject.record
    if record is None:
        return True  # global: every rule by nothing is shown
    if rule.tenants and record.tenant not in rule.tenants:
        return False
    # A tenant's counter of a rule that matches some keys is still the tenant's.
    return subject.scope != "key" or not rule.keys or record.id in rule.keys


def plan(
    rules: RuleSet, keys: Keys, subject: Subject, now: float, period: Period | None = None
) -> tuple[Line, ...]:
    """The subject's counters, in config order (a key's overrides last)."""
    # Overrides are rules by key: only a key's query sees them.
    candidates = rules.for_identity(subject.record) if subject.scope == "key" else rules.rules
    own = _OWN[subject.scope]
    lines = []
    for rule in candidates:
        if not set(rule.by) <= own or not _admits(rule, subject):
            continue
        if rule.kind == "budget" and period is not None and rule.calendar != period:
            continue
        scope = _scope(rule)
        identity = subject.record if scope != "all" else None
        counted = rule.subject(identity, "", None, "", {})
        window = rule.window(now)[0] if rule.kind == "budget" else None
        lines.append(Line(rule, scope, rule.counter(keys, counted, now, 0), window))
    return tuple(lines)


def usd(micro: int) -> str:
    """Micro-USD as an exact decimal string with six places ("0.001234")."""
    return str(Decimal(micro).scaleb(-6))


def report(
    subject: Subject, lines: Sequence[Line], levels: Sequence[Level], now: float
) -> dict[str, Any]:
    """The JSON document (the endpoint's answer and ``tollway spend --json``). Never a
    secret; a key's id, name and tenant only when a key was asked for."""
    record = subject.record
    rows = []
    for line, level in zip(lines, levels, strict=True):
        rule, budget = line.rule, line.rule.kind == "budget"
        rows.append(
            {
                "rule": rule.name,
                "scope": line.scope,
                "kind": rule.kind,
                "per": rule.per or None,
                "shadow": rule.shadow,
                "limit": rule.limit,
                "used": level.used,
                "remaining": level.remaining,
                "reset_s": round(level.reset_s, 3),
                "window": line.window,
                "limit_usd": usd(rule.limit) if budget else None,
                "used_usd": usd(level.used) if budget else None,
                "remaining_usd": usd(level.remaining) if budget else None,
            }
        )
    return {
        "scope": subject.scope,
        "key": (
            {"id": record.id, "name": record.name, "tenant": record.tenant}
            if subject.scope == "key" and record is not None
            else None
        ),
        "tenant": record.tenant if record is not None else None,
        "at": datetime.fromtimestamp(now, UTC).isoformat(timespec="seconds"),
        "limits": rows,
    }


async def spend(
    quota: Quota,
    rules: RuleSet,
    keys: Keys,
    subject: Subject,
    now: float,
    period: Period | None = None,
) -> dict[str, Any]:
    """Read the subject's counters (nothing consumed) and report them."""
    lines = plan(rules, keys, subject, now, period)
    levels: Sequence[Level] = ()
    if lines:
        found = quota.usage([line.counter for line in lines], now)
        levels = found if isinstance(found, tuple) else await found
    return report(subject, lines, levels, now)
