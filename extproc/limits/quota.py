"""The quota engine's seam: plain values and the pure algorithms, no I/O.

A limits stage turns its rules into ``Counter``s for a request and asks a
``Quota`` backend to ``take`` them all at once; at the request's end it
``settle``s them with the real amounts. Two backends give the same answers
for the same sequence of calls: ``memory.MemoryQuota`` (embedded, answers
inline) and ``redis_store.RedisQuota`` (shared by replicas; its Lua scripts
mirror the functions below line for line, and the case table in
tests/store/test_quota_cases.py runs against both).

    Counter(rule, key, kind, limit, period_s, window_end, amount, shadow=False)
    Take(request_id, now, counters)            -> Verdict (a value, or an awaitable)
    Settle(request_id, now, counters, actual)  -> None (never blocks)
    usage(counters, now)                       -> tuple[Level, ...] (nothing consumed)
    aclose()                                   drain queued writes, persist

Semantics, the same in both backends:

- **rate** (requests or tokens per ``period_s``): GCRA with variable cost. The
  emission interval is T = period/limit, the burst is the limit; a cost n
  moves the theoretical arrival time (TAT) by n*T, admitted if
  new_tat - now <= period. No double burst at window edges.
- **concurrent**: one lease per request (``amount`` is ignored), TTL
  ``period_s``; admitted while live leases < limit; settle releases it; the
  lease of a request that never settles expires.
- **budget**: integer micro-USD per calendar window; the window id is part of
  the key (``calendar_window`` + ``Keys.budget``); admitted if
  used + amount <= limit. Kept until ``window_end + BUDGET_KEEP_S`` so that
  spend of the previous window can still be read.
- **all or nothing**: if any enforced counter denies, nothing is reserved in
  any counter. A **shadow** counter never denies; one that would deny does not
  consume (it mirrors what enforcement would do: a denied request costs
  nothing), and is reported in ``Verdict.shadow_denied``.
- **reservations**: an admitted take records what it reserved under the
  request id. ``settle`` applies actual - reserved per counter (rates: over-use
  moves the TAT on, under-use gives back but never below now; budgets: plus or
  minus), releases leases, and marks the request settled: a second settle of
  the same request id does nothing (settlements may be retried). A settle
  with no reservation on record (the take failed or timed out before it ran,
  and the stage failed open) charges the actual amounts in full; shadow
  counters that would have denied are not charged. A denied take records
  nothing and needs no settle. One take per request id: a request that takes
  twice (headers, then body) uses two ids.
- A reservation never settled stays charged (budgets: the estimate counts as
  spent, the safe side); its record expires after ``RESERVATION_TTL_S``.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, Protocol, TypeAlias
from zoneinfo import ZoneInfo

from ..decisions import BackendUnavailable

Kind: TypeAlias = Literal["rate", "concurrent", "budget"]
INF = math.inf

BUDGET_KEEP_S = 35 * 86400.0  # budget counters outlive their window (spend of last month)
RESERVATION_TTL_S = 3600.0  # longer than any request: a settle finds its reservation
NOT_TAKEN = -1  # a reservation slot for a shadow counter that would have denied


# The values a request passes through here are read-only by convention, not frozen:
# a frozen dataclass's __init__ costs about five times as much (object.__setattr__
# per field), several times a request.
@dataclass(slots=True)
class Counter:
    """One rule's counter for one request."""

    rule: str  # rule name (metrics, messages)
    key: str  # store key, from Keys
    kind: Kind
    limit: int  # rate: requests or tokens per period; concurrent: leases; budget: micro-USD
    period_s: float  # rate: the period; concurrent: lease TTL; budget: unused
    window_end: float  # budget: epoch seconds when its calendar window ends; else 0
    amount: int  # this request's cost: 1 request, N reserved tokens, micro-USD reserved
    shadow: bool = False  # counts would-be denials, denies nothing


@dataclass(slots=True)
class Take:
    request_id: str
    now: float  # epoch seconds (the caller's clock; see RedisQuota for server time)
    counters: tuple[Counter, ...]


@dataclass(slots=True)
class Verdict:
    allowed: bool
    denied_by: int | None  # index of the first enforced counter that denied
    shadow_denied: tuple[int, ...]  # shadow counters that would have denied
    # When every denying enforced counter could admit its amount (inf: never, the
    # amount is over the limit); 0 when allowed.
    retry_after_s: float
    remaining: tuple[int, ...]  # per counter, after this take
    reset_s: tuple[float, ...]  # per counter, seconds until fully replenished / window end


@dataclass(slots=True)
class Settle:
    request_id: str
    now: float
    counters: tuple[Counter, ...]  # the take's counters, in the same order
    actual: tuple[int, ...]  # real amounts per counter (ignored for concurrent: released)


@dataclass(frozen=True, slots=True)
class Level:
    """A counter as it stands, nothing consumed (``tollway spend``, headers)."""

    used: int  # budget: micro-USD spent; rate: units in use; concurrent: live leases
    remaining: int
    reset_s: float


class Quota(Protocol):
    def take(self, take: Take) -> Verdict | Awaitable[Verdict]:
        """Check and reserve all counters at once. The memory backend answers with a
        value; Redis with an awaitable, or raises StoreUnavailable at once."""
        ...

    def settle(self, settle: Settle) -> None:
        """Never blocks: applied inline (memory) or queued for one writer (Redis)."""
        ...

    def usage(
        self, counters: Sequence[Counter], now: float
    ) -> tuple[Level, ...] | Awaitable[tuple[Level, ...]]: ...

    async def aclose(self) -> None:
        """Write what is queued or unsaved (called by serve on shutdown)."""
        ...


class StoreUnavailable(BackendUnavailable):
    """The backend cannot answer (timeout, connection, breaker open). The pipeline
    treats it like any backend failure: the stage's fail-open/fail-closed policy."""

    def __init__(self, reason: Literal["timeout", "error", "breaker_open"]) -> None:
        super().__init__(reason)


# Keys -------------------------------------------------------------------------


def _part(text: str) -> str:
    # ':' separates parts; escaping it keeps ("a:b", "c") and ("a", "b:c") apart.
    return text.replace("%", "%25").replace(":", "%3A")


class Keys:
    """Store keys. All carry one hash tag, so that every key of a request (and of
    all requests) is in one Redis Cluster slot: a take is one atomic script."""

    __slots__ = ("prefix",)

    def __init__(self, tag: str = "tollway") -> None:
        if not tag or "{" in tag or "}" in tag:
            raise ValueError("a hash tag is a non-empty name without braces")
        self.prefix = f"tw:{{{tag}}}:"

    def rate(self, rule: str, subject: str) -> str:
        return f"{self.prefix}r:{_part(rule)}:{_part(subject)}"

    def concurrent(self, rule: str, subject: str) -> str:
        return f"{self.prefix}c:{_part(rule)}:{_part(subject)}"

    def budget(self, rule: str, subject: str, window: str) -> str:
        return f"{self.prefix}b:{_part(rule)}:{_part(subject)}:{window}"

    def request(self, request_id: str) -> str:
        """Where a request's reservation (then its settled mark) is recorded."""
        return f"{self.prefix}q:{_part(request_id)}"


def calendar_window(
    now: float, period: Literal["day", "month"], timezone: str = "UTC"
) -> tuple[str, float]:
    """The calendar window holding ``now``: its id ("2026-12-31" or "2026-12") and
    the epoch seconds when it ends, in an IANA timezone (a month is a real month,
    a day is a local day, 23 or 25 hours long across a DST change)."""
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now, zone)
    if period == "day":
        start = datetime(local.year, local.month, local.day, tzinfo=zone)
        nxt = (start + timedelta(days=1)).replace(tzinfo=zone)  # wall-clock midnight
        return start.strftime("%Y-%m-%d"), nxt.timestamp()
    year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
    return local.strftime("%Y-%m"), datetime(year, month, 1, tzinfo=zone).timestamp()


# The algorithms (the oracle the Lua scripts mirror) ------------------------------


@dataclass(slots=True)
class Check:
    """One counter's answer to a take, before the all-or-nothing rule."""

    ok: bool
    retry_s: float  # when it could admit this amount (0 if ok, inf if never)
    new_tat: float  # rate: the arrival time to store if taken; else 0
    remaining_if_taken: int
    remaining_if_not: int
    reset_if_taken: float
    reset_if_not: float


def rate_check(limit: int, period: float, amount: int, now: float, tat: float | None) -> Check:
    """GCRA with cost ``amount``; ``tat`` is the stored arrival time (None: fresh)."""
    if limit <= 0:
        return Check(False, INF, 0.0, 0, 0, 0.0, 0.0)
    t = period / limit
    base = tat if tat is not None and tat > now else now
    new_tat = base + amount * t
    ok = new_tat - now <= period
    retry = 0.0 if ok else (INF if amount > limit else new_tat - period - now)
    return Check(
        ok,
        retry,
        new_tat,
        _rate_remaining(period, t, new_tat - now),
        _rate_remaining(period, t, base - now),
        new_tat - now,
        base - now,
    )


def _rate_remaining(period: float, t: float, ahead: float) -> int:
    return max(0, math.floor((period - ahead) / t))


def rate_settle(limit: int, period: float, delta: int, now: float, tat: float | None) -> float:
    """The new TAT after a settle: over-use moves it on, under-use gives back but
    never below now (no banked credit)."""
    base = tat if tat is not None and tat > now else now
    if limit <= 0:
        return base
    t = period / limit
    moved = base + delta * t
    return moved if moved > now else now


def concurrent_check(
    limit: int, ttl: float, live: int, earliest: float, latest: float, now: float
) -> Check:
    """``live`` unexpired leases, the earliest and latest expiry among them; a new
    lease would expire at now + ttl."""
    ok = live + 1 <= limit
    retry = 0.0 if ok else (INF if limit <= 0 else max(0.0, earliest - now))
    held = max(0.0, latest - now) if live else 0.0
    return Check(
        ok, retry, 0.0, max(0, limit - live - 1), max(0, limit - live), max(held, ttl), held
    )


def budget_check(limit: int, window_end: float, amount: int, now: float, used: int) -> Check:
    ok = used + amount <= limit
    reset = max(0.0, window_end - now)
    retry = 0.0 if ok else (INF if amount > limit else reset)
    return Check(ok, retry, 0.0, max(0, limit - used - amount), max(0, limit - used), reset, reset)


def verdict(counters: Sequence[Counter], checks: Sequence[Check]) -> tuple[Verdict, list[bool]]:
    """Apply all-or-nothing and shadow: the verdict, and which counters consume."""
    denied_by: int | None = None
    retry = 0.0
    shadow_denied: list[int] = []
    for i, check in enumerate(checks):
        if check.ok:
            continue
        if counters[i].shadow:
            shadow_denied.append(i)
        else:
            if denied_by is None:
                denied_by = i
            retry = max(retry, check.retry_s)
    allowed = denied_by is None
    consume = [allowed and check.ok for check in checks]
    remaining, reset = [], []
    for check, took in zip(checks, consume, strict=True):
        remaining.append(check.remaining_if_taken if took else check.remaining_if_not)
        reset.append(check.reset_if_taken if took else check.reset_if_not)
    return (
        Verdict(allowed, denied_by, tuple(shadow_denied), retry, tuple(remaining), tuple(reset)),
        consume,
    )


def reserved_amounts(counters: Sequence[Counter], consume: Sequence[bool]) -> tuple[int, ...]:
    """What the reservation record holds: each counter's amount, or NOT_TAKEN."""
    return tuple(
        [c.amount if took else NOT_TAKEN for c, took in zip(counters, consume, strict=True)]
    )
