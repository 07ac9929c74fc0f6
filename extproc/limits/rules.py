"""Limit rules compiled from config: which apply to a request, and the counter each
one counts it under (sans-IO).

A rule applies when its ``match`` does (route, tenant, key id, model) and the
request has every value its ``by`` needs: rules by ``key``, ``tenant`` or a
header count only authenticated callers (an anonymous request has no key to
count against). A key's own overrides (``tollway keys create --rpm ...``)
replace the configured rule of the same kind and period that counts ``by: [key]``
with no ``match``, and are added when there is none.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fnmatch import translate
from typing import TYPE_CHECKING, Literal

from ..config import RATE_PERIODS, LimitRule
from ..keys import NO_LIMITS, KeyLimits
from .quota import Counter, Keys, calendar_window
from .quota import Kind as CounterKind

if TYPE_CHECKING:
    from ..keys import KeyRecord

Kind = Literal["requests", "tokens", "concurrent", "budget"]
MICRO = 1_000_000  # budgets count micro-USD: integers, exact in Lua and in memory
_PLAIN = re.compile(r"[A-Za-z0-9._-]{1,64}")
# (period, timezone) -> (worked out at, window id, window end): a zone conversion
# and a strftime per request otherwise. Bounded by the rules' periods and zones.
_WINDOWS: dict[tuple[str, str], tuple[float, str, float]] = {}
_COUNTER_KIND: dict[Kind, CounterKind] = {
    "requests": "rate",
    "tokens": "rate",
    "concurrent": "concurrent",
    "budget": "budget",
}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: Kind
    limit: int  # requests or tokens per period, leases, or micro-USD per window
    period_s: float  # rates: the period
    calendar: Literal["day", "month"] | None  # budgets: the window
    timezone: str  # IANA: where a budget's day or month begins
    by: tuple[str, ...]
    routes: frozenset[str]
    tenants: frozenset[str]
    keys: frozenset[str]
    models: re.Pattern[str] | None
    count: Literal["input", "output", "total"]
    shadow: bool
    fails_closed: bool
    warn_at: float
    per: str  # as configured: second, minute, hour, day or month (concurrency: "")

    @property
    def needs_body(self) -> bool:
        """Whether the decision waits for the request body (tokens, dollars, its model)."""
        return self.kind in ("tokens", "budget") or "model" in self.by or self.models is not None

    def applies(self, route: str, identity: KeyRecord | None) -> bool:
        """What request headers tell: route, tenant, key (the model comes later)."""
        if self.routes and route not in self.routes:
            return False
        if identity is None:
            return not (self.tenants or self.keys or _needs_identity(self.by))
        if self.tenants and identity.tenant not in self.tenants:
            return False
        return not self.keys or identity.id in self.keys

    def applies_to_model(self, model: str | None) -> bool:
        return self.models is None or (
            model is not None and self.models.fullmatch(model) is not None
        )

    def subject(
        self,
        identity: KeyRecord | None,
        route: str,
        model: str | None,
        client_ip: str,
        headers: dict[str, str],
    ) -> str:
        """The values the rule counts by ("all" when it counts every request as one):
        one counter per subject. Values a client controls are hashed, so keys stay
        short and plain."""
        parts: list[str] = []
        tenant = identity.tenant if identity is not None else ""
        for dimension in self.by:
            if dimension == "key":
                value = identity.id if identity is not None else ""
            elif dimension == "tenant":
                value = tenant
            elif dimension == "model":
                value = model or ""
            elif dimension == "route":
                value = route
            elif dimension == "client_ip":
                value = client_ip
            else:  # header:<name>, per tenant: one tenant's users are not another's
                value = tenant + "\0" + headers.get(dimension[7:], "")
            parts.append(value if _PLAIN.fullmatch(value) else _digest(value))
        return ":".join(parts) if parts else "all"

    def window(self, now: float) -> tuple[str, float]:
        """A budget's calendar window holding ``now``: its id and when it ends."""
        period = self.calendar or "month"
        found = _WINDOWS.get((period, self.timezone))
        # The window found holds every time from when it was worked out to its end.
        if found is not None and found[0] <= now < found[2]:
            return found[1], found[2]
        window, end = calendar_window(now, period, self.timezone)
        _WINDOWS[period, self.timezone] = (now, window, end)
        return window, end

    def counter(
        self, keys: Keys, subject: str, now: float, amount: int, lease_s: float = 0.0
    ) -> Counter:
        """This rule's counter for ``subject``, charged ``amount`` (the limits stage
        takes it; ``tollway spend`` reads it with amount 0). ``lease_s``: how long a
        concurrency lease lives."""
        window_end, period = 0.0, self.period_s
        if self.kind == "concurrent":
            key, period = keys.concurrent(self.name, subject), lease_s
        elif self.kind == "budget":
            window, window_end = self.window(now)
            key = keys.budget(self.name, subject, window)
        else:
            key = keys.rate(self.name, subject)
        return Counter(
            rule=self.name,
            key=key,
            kind=_COUNTER_KIND[self.kind],
            limit=self.limit,
            period_s=period,
            window_end=window_end,
            amount=amount,
            shadow=self.shadow,
        )


def _needs_identity(by: Sequence[str]) -> bool:
    return any(d in ("key", "tenant") or d.startswith("header:") for d in by)


def _digest(value: str) -> str:
    return "h" + hashlib.blake2b(value.encode(), digest_size=10).hexdigest()


def compile_rule(rule: LimitRule) -> Rule:
    kind = rule.kind
    if kind == "budget":
        assert rule.budget_usd is not None
        limit = int(rule.budget_usd * MICRO)
    else:
        limit = rule.requests or rule.tokens or rule.concurrent or 0
    models = rule.match.models
    return Rule(
        name=rule.name,
        kind=kind,
        limit=limit,
        period_s=RATE_PERIODS.get(rule.per or "", 0.0),
        calendar=rule.per if kind == "budget" and rule.per in ("day", "month") else None,
        timezone=rule.timezone,
        by=rule.by,
        routes=frozenset(rule.match.routes),
        tenants=frozenset(rule.match.tenants),
        keys=frozenset(rule.match.keys),
        models=re.compile("|".join(f"(?:{translate(m)})" for m in models)) if models else None,
        count=rule.count,
        shadow=rule.shadow,
        fails_closed=rule.fails_closed,
        warn_at=rule.warn_at,
        per=rule.per or "",
    )


def _override(name: str, kind: Kind, amount: int | Decimal, per: str) -> LimitRule:
    fields: dict[str, object] = {"name": name, "by": ("key",)}
    fields["budget_usd" if kind == "budget" else kind] = amount
    if kind != "concurrent":
        fields["per"] = per
    return LimitRule.model_validate(fields)


def key_overrides(limits: KeyLimits) -> list[Rule]:
    """A key's own limits as rules by key (fixed names: metrics labels stay bounded)."""
    made: list[LimitRule] = []
    if limits.rpm is not None:
        made.append(_override("key_rpm", "requests", limits.rpm, "minute"))
    if limits.tpm is not None:
        made.append(_override("key_tpm", "tokens", limits.tpm, "minute"))
    if limits.concurrency is not None:
        made.append(_override("key_concurrency", "concurrent", limits.concurrency, ""))
    if limits.budget_usd is not None:
        made.append(
            _override("key_budget", "budget", limits.budget_usd, limits.budget_period or "month")
        )
    return [compile_rule(rule) for rule in made]


def _replaces(override: Rule, rule: Rule) -> bool:
    return (
        rule.by == ("key",)
        and not (rule.routes or rule.tenants or rule.keys or rule.models)
        and rule.kind == override.kind
        and rule.per == override.per
    )


class RuleSet:
    """The configured rules, and a key's overrides over them (built once per key)."""

    def __init__(self, rules: Sequence[LimitRule]) -> None:
        self.rules = tuple(compile_rule(rule) for rule in rules)
        self._for_key: dict[tuple[str, KeyLimits], tuple[Rule, ...]] = {}

    def __bool__(self) -> bool:
        return bool(self.rules) or bool(self._for_key)

    def for_identity(self, identity: KeyRecord | None) -> tuple[Rule, ...]:
        if identity is None or identity.limits == NO_LIMITS:
            return self.rules
        cache_key = (identity.id, identity.limits)
        found = self._for_key.get(cache_key)
        if found is None:
            overrides = key_overrides(identity.limits)
            kept = [r for r in self.rules if not any(_replaces(o, r) for o in overrides)]
            found = tuple(kept + overrides)
            if len(self._for_key) >= 10_000:  # keys come and go: stay bounded
                self._for_key.clear()
            self._for_key[cache_key] = found
        return found
