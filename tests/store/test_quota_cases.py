"""One case table, run against the embedded store and a real Redis: the same
sequence of takes and settles (on an injected clock) gives the expected
answers, and exactly the same answers from both backends."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pytest

from extproc.limits.memory import MemoryQuota
from extproc.limits.quota import (
    Counter,
    Keys,
    Level,
    Settle,
    Take,
    Verdict,
    calendar_window,
)
from extproc.limits.redis_store import RedisQuota

K = Keys()
T0 = 1_790_000_000.0  # any instant; windows below use explicit dates
INF = math.inf


def rate(name: str, limit: int, period: float, amount: int = 1, shadow: bool = False) -> Counter:
    return Counter(name, K.rate(name, "key-1"), "rate", limit, period, 0.0, amount, shadow)


def conc(name: str, limit: int, ttl: float) -> Counter:
    return Counter(name, K.concurrent(name, "key-1"), "concurrent", limit, ttl, 0.0, 1)


def budget(
    name: str,
    limit: int,
    amount: int,
    now: float,
    period: Literal["day", "month"] = "month",
    tz: str = "UTC",
    shadow: bool = False,
) -> Counter:
    window, end = calendar_window(now, period, tz)
    return Counter(
        name, K.budget(name, "tenant-a", window), "budget", limit, 0.0, end, amount, shadow
    )


def at(text: str, tz: str = "UTC") -> float:
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp()


@dataclass(frozen=True)
class Expect:
    allowed: bool
    remaining: tuple[int, ...]
    reset: tuple[float, ...]
    denied_by: int | None = None
    retry: float = 0.0
    shadow: tuple[int, ...] = ()


def ok(
    remaining: tuple[int, ...], reset: tuple[float, ...], shadow: tuple[int, ...] = ()
) -> Expect:
    return Expect(True, remaining, reset, shadow=shadow)


def no(
    by: int,
    retry: float,
    remaining: tuple[int, ...],
    reset: tuple[float, ...],
    shadow: tuple[int, ...] = (),
) -> Expect:
    return Expect(False, remaining, reset, by, retry, shadow)


@dataclass(frozen=True)
class T:
    """A take at ``now``; ``counters`` may depend on now (budget windows)."""

    now: float
    counters: tuple[Counter, ...] | Callable[[float], tuple[Counter, ...]]
    expect: Expect
    rid: str | None = None


@dataclass(frozen=True)
class S:
    """Settle the take ``rid`` (or, with ``counters``, a request never taken)."""

    now: float
    rid: str
    actual: tuple[int, ...]
    counters: tuple[Counter, ...] | None = None


@dataclass(frozen=True)
class U:
    now: float
    counters: tuple[Counter, ...]
    expect: tuple[Level, ...]


Step = T | S | U


@dataclass(frozen=True)
class Case:
    name: str
    steps: list[Step] = field(default_factory=list)


# Periods and limits are powers of two where tokens are involved: hand-written
# answers then are exact doubles (the backends agree exactly in any case).
A = rate("a", 3, 3.0)  # T = 1 s
TOK = rate("tok", 1024, 64.0)  # T = 1/16 s per token
JAN_END = at("2027-01-31T23:59:59")
NY_FEB = at("2028-02-29T23:30:00", "America/New_York")  # leap day, local evening
NY_MAR = at("2028-03-01T00:30:00", "America/New_York")


def tok(n: int, shadow: bool = False) -> Counter:
    return rate("tok", 1024, 64.0, n, shadow)


CASES = [
    Case(
        "gcra burst, then just before and just after the emission interval",
        [
            T(T0, (A,), ok((2,), (1.0,))),
            T(T0, (A,), ok((1,), (2.0,))),
            T(T0, (A,), ok((0,), (3.0,))),
            T(T0, (A,), no(0, 1.0, (0,), (3.0,))),
            T(T0 + 0.999, (A,), no(0, 1.0 - 0.999, (0,), (3.0 - 0.999,))),
            T(T0 + 1.0, (A,), ok((0,), (3.0,))),
            T(T0 + 2.5, (A,), ok((0,), (2.5,))),  # one more emission (at +2) since
            T(T0 + 2.5, (A,), no(0, 0.5, (0,), (2.5,))),
        ],
    ),
    Case(
        "steady rate: one request per emission interval, for ever",
        [T(T0 + i, (A,), ok((2,), (1.0,))) for i in range(6)],
    ),
    Case(
        "no double burst at a window edge: a burst late in a minute leaves none early in the next",
        [
            T(T0 + 59.5, (tok(1024),), ok((0,), (64.0,))),
            T(T0 + 60.5, (tok(32),), no(0, 1.0, (16,), (63.0,))),  # 16 tokens came back
            T(T0 + 61.5, (tok(32),), ok((0,), (64.0,))),
        ],
    ),
    Case(
        "token costs move the arrival time by n emission intervals",
        [
            T(T0, (tok(600),), ok((424,), (37.5,))),
            T(T0, (tok(500),), no(0, 4.75, (424,), (37.5,))),
            T(T0, (tok(424),), ok((0,), (64.0,))),
            T(T0 + 1.0, (tok(16),), ok((0,), (64.0,))),
        ],
    ),
    Case(
        "an amount over the limit can never be admitted",
        [
            T(T0, (tok(2000),), no(0, INF, (1024,), (0.0,))),
            T(T0, (rate("zero", 0, 60.0),), no(0, INF, (0,), (0.0,))),
            T(T0, (lambda now: (budget("b", 100, 101, now),)), no(0, INF, (100,), (None,))),
        ],
    ),
    Case(
        "shadow: a would-be denial is reported, denies nothing, consumes nothing",
        [
            T(T0, (rate("e", 8, 8.0), rate("s", 1, 8.0, shadow=True)), ok((7, 0), (1.0, 8.0))),
            T(
                T0,
                (rate("e", 8, 8.0), rate("s", 1, 8.0, shadow=True)),
                ok((6, 0), (2.0, 8.0), shadow=(1,)),
            ),
            T(T0 + 8.0, (rate("s", 1, 8.0, shadow=True),), ok((0,), (8.0,))),  # not consumed at T0
        ],
    ),
    Case(
        "all or nothing: one enforced denial reserves nothing anywhere; retry waits for all",
        [
            T(T0, (rate("x", 4, 4.0), rate("y", 1, 8.0)), ok((3, 0), (1.0, 8.0))),
            T(
                T0,
                (rate("x", 4, 4.0), rate("y", 1, 8.0), rate("z", 1, 2.0, shadow=True)),
                no(1, 8.0, (3, 0, 1), (1.0, 8.0, 0.0)),
            ),
            T(
                T0,
                (rate("w", 1, 16.0), rate("x", 4, 4.0), rate("y", 1, 8.0)),
                no(2, 8.0, (1, 3, 0), (0.0, 1.0, 8.0)),
            ),
            T(T0, (rate("x", 4, 4.0),), ok((2,), (2.0,))),  # x was not charged by the denials
            T(T0, (rate("w", 1, 16.0),), ok((0,), (16.0,))),
            T(T0, (rate("w", 1, 16.0), rate("y", 1, 8.0)), no(0, 16.0, (0, 0), (16.0, 8.0))),
        ],
    ),
    Case(
        "concurrency: leases up to the limit, a settle releases one, a lost one expires",
        [
            T(T0, (conc("c", 2, 30.0),), ok((1,), (30.0,)), rid="r1"),
            T(T0, (conc("c", 2, 30.0),), ok((0,), (30.0,)), rid="r2"),
            T(T0, (conc("c", 2, 30.0),), no(0, 30.0, (0,), (30.0,)), rid="r3"),
            S(T0 + 1.0, "r1", (1,)),
            T(T0 + 1.0, (conc("c", 2, 30.0),), ok((0,), (30.0,)), rid="r4"),
            T(T0 + 2.0, (conc("c", 2, 30.0),), no(0, 28.0, (0,), (29.0,)), rid="r5"),
            U(T0 + 2.0, (conc("c", 2, 30.0),), (Level(2, 0, 29.0),)),
            # r2 (never settled) expired at +30, r4 at +31
            T(T0 + 30.0, (conc("c", 2, 30.0),), ok((0,), (30.0,)), rid="r6"),
            T(T0 + 31.5, (conc("c", 2, 30.0),), ok((0,), (30.0,)), rid="r7"),
            T(T0 + 60.0, (conc("c", 2, 30.0),), ok((0,), (30.0,)), rid="r8"),
            T(T0 + 90.5, (conc("c", 2, 30.0),), ok((1,), (30.0,)), rid="r9"),
        ],
    ),
    Case(
        "budget across a month boundary (UTC): a new month is a new counter",
        [
            T(
                JAN_END,
                (lambda now: (budget("m", 1_000_000, 600_000, now),)),
                ok((400_000,), (1.0,)),
            ),
            T(
                JAN_END,
                (lambda now: (budget("m", 1_000_000, 500_000, now),)),
                no(0, 1.0, (400_000,), (1.0,)),
            ),
            T(
                JAN_END + 2.0,
                (lambda now: (budget("m", 1_000_000, 500_000, now),)),
                ok((500_000,), (28 * 86400.0 - 1.0,)),
            ),
        ],
    ),
    Case(
        "budget in New York across a leap-day month end and a DST change",
        [
            T(
                NY_FEB,
                (lambda now: (budget("ny", 1000, 900, now, tz="America/New_York"),)),
                ok((100,), (1800.0,)),
            ),
            T(
                NY_FEB,
                (lambda now: (budget("ny", 1000, 200, now, tz="America/New_York"),)),
                no(0, 1800.0, (100,), (1800.0,)),
            ),
            # March 2028 has 31 days, one of them 23 hours long (DST starts on the 12th)
            T(
                NY_MAR,
                (lambda now: (budget("ny", 1000, 200, now, tz="America/New_York"),)),
                ok((800,), (31 * 86400.0 - 1800.0 - 3600.0,)),
            ),
        ],
    ),
    Case(
        "daily budget in Tokyo: the day ends at local midnight",
        [
            T(
                at("2027-06-30T23:00:00", "Asia/Tokyo"),
                (lambda now: (budget("d", 50, 50, now, period="day", tz="Asia/Tokyo"),)),
                ok((0,), (3600.0,)),
            ),
            T(
                at("2027-07-01T00:00:00", "Asia/Tokyo"),
                (lambda now: (budget("d", 50, 50, now, period="day", tz="Asia/Tokyo"),)),
                ok((0,), (86400.0,)),
            ),
        ],
    ),
    Case(
        "settle a rate both ways: over-use makes later requests wait, under-use gives back",
        [
            T(T0, (tok(512),), ok((512,), (32.0,)), rid="r1"),
            S(T0, "r1", (768,)),
            T(T0, (tok(0),), ok((256,), (48.0,))),
            T(T0, (tok(256),), ok((0,), (64.0,)), rid="r2"),
            S(T0, "r2", (0,)),
            T(T0, (tok(0),), ok((256,), (48.0,))),
            U(T0, (tok(1),), (Level(768, 256, 48.0),)),
            # no banked credit: giving back more than is in use stops at now
            T(T0 + 100.0, (tok(64),), ok((960,), (4.0,)), rid="r3"),
            S(T0 + 100.0, "r3", (0,)),
            S(T0 + 100.0, "r1", (0,)),  # settled already: nothing happens
            T(T0 + 100.0, (tok(1024),), ok((0,), (64.0,))),
            T(T0 + 100.0, (tok(1),), no(0, 0.0625, (0,), (64.0,))),
        ],
    ),
    Case(
        "settle a budget both ways, once only; a take that never ran is charged in full",
        [
            T(
                JAN_END,
                (lambda now: (budget("s", 1_000_000, 300_000, now),)),
                ok((700_000,), (1.0,)),
                rid="r1",
            ),
            S(JAN_END, "r1", (450_000,)),
            S(JAN_END, "r1", (450_000,)),  # a retried settlement charges nothing more
            U(JAN_END, (budget("s", 1_000_000, 0, JAN_END),), (Level(450_000, 550_000, 1.0),)),
            T(
                JAN_END,
                (lambda now: (budget("s", 1_000_000, 100_000, now),)),
                ok((450_000,), (1.0,)),
                rid="r2",
            ),
            S(JAN_END, "r2", (20_000,)),
            S(JAN_END, "lost", (30_000,), (budget("s", 1_000_000, 100_000, JAN_END),)),
            T(JAN_END, (lambda now: (budget("s", 1_000_000, 0, now),)), ok((500_000,), (1.0,))),
        ],
    ),
    Case(
        "settle skips a shadow counter that would have denied (it never consumed)",
        [
            T(
                JAN_END,
                (lambda now: (budget("e", 1000, 10, now), budget("sh", 5, 10, now, shadow=True))),
                ok((990, 5), (1.0, 1.0), shadow=(1,)),
                rid="r1",
            ),
            S(JAN_END, "r1", (20, 20)),
            U(
                JAN_END,
                (budget("e", 1000, 0, JAN_END), budget("sh", 5, 0, JAN_END, shadow=True)),
                (Level(20, 980, 1.0), Level(0, 5, 1.0)),
            ),
        ],
    ),
]


class Runner:
    def __init__(self, quota: MemoryQuota | RedisQuota) -> None:
        self.quota = quota
        self.taken: dict[str, tuple[Counter, ...]] = {}
        self.n = 0

    async def run(self, steps: list[Step]) -> list[Any]:
        out: list[Any] = []
        for step in steps:
            if isinstance(step, T):
                counters = step.counters(step.now) if callable(step.counters) else step.counters
                self.n += 1
                rid = step.rid or f"auto-{self.n}"
                self.taken[rid] = counters
                out.append(await _value(self.quota.take(Take(rid, step.now, counters))))
            elif isinstance(step, S):
                counters = step.counters or self.taken[step.rid]
                self.quota.settle(Settle(step.rid, step.now, counters, step.actual))
                if isinstance(self.quota, RedisQuota):
                    await self.quota.writer.flushed()
                out.append(None)
            else:
                out.append(await _value(self.quota.usage(step.counters, step.now)))
        return out


async def _value(x: Any) -> Any:
    return await x if inspect.isawaitable(x) else x


def _matches(step: Step, got: Any) -> None:
    if isinstance(step, T):
        assert isinstance(got, Verdict)
        e = step.expect
        assert (got.allowed, got.denied_by, got.shadow_denied, got.remaining) == (
            e.allowed,
            e.denied_by,
            e.shadow,
            e.remaining,
        )
        assert got.retry_after_s == pytest.approx(e.retry, abs=1e-6)  # epoch doubles: ~0.2 µs
        assert got.reset_s == pytest.approx(
            tuple(g if x is None else x for g, x in zip(got.reset_s, e.reset, strict=True)),
            abs=1e-6,
        )
    elif isinstance(step, U):
        assert got == step.expect


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_both_backends_give_the_expected_answers(case: Case, redis_quota: RedisQuota) -> None:
    memory = await Runner(MemoryQuota()).run(case.steps)
    shared = await Runner(redis_quota).run(case.steps)
    for i, (step, got) in enumerate(zip(case.steps, memory, strict=True)):
        try:
            _matches(step, got)
        except AssertionError as e:
            raise AssertionError(f"memory, step {i}: {step}\n got {got}") from e
    assert shared == memory  # exactly: same doubles, same integers


def test_calendar_windows() -> None:
    assert calendar_window(at("2028-02-29T12:00:00"), "month") == (
        "2028-02",
        at("2028-03-01T00:00:00"),
    )
    assert calendar_window(at("2027-12-31T23:59:59"), "month")[1] == at("2028-01-01T00:00:00")
    assert calendar_window(at("2027-12-31T23:59:59"), "day") == (
        "2027-12-31",
        at("2028-01-01T00:00:00"),
    )
    # 23:30 in New York on Feb 29 is already March 1 in UTC: still February there
    assert calendar_window(NY_FEB, "month", "America/New_York")[0] == "2028-02"
    assert calendar_window(NY_FEB, "month")[0] == "2028-03"
    # the day DST ends in Europe is 25 hours long
    start = at("2027-10-31T00:00:00", "Europe/Berlin")
    assert calendar_window(start, "day", "Europe/Berlin") == ("2027-10-31", start + 25 * 3600)


def test_keys_share_one_hash_tag_and_parts_cannot_collide() -> None:
    keys = Keys("gw1")
    assert keys.rate("a:b", "c") != keys.rate("a", "b:c")
    assert keys.budget("r", "s", "2027-01").startswith("tw:{gw1}:b:")
    for bad in ("", "a{b", "a}b"):
        with pytest.raises(ValueError):
            Keys(bad)
