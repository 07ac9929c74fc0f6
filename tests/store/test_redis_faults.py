"""The Redis backend against a real redis-server: exact under concurrency,
bounded when Redis is slow or gone, idempotent settles, automatic recovery."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable

import pytest
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from extproc.limits.quota import Counter, Keys, Settle, StoreUnavailable, Take, Verdict
from extproc.limits.redis_store import RedisQuota, connect, redact_url
from extproc.limits.resp import Connection
from extproc.metrics import Metrics, StoreMetrics
from extproc.store.breaker import Breaker
from tests.redis_server import RedisServer

K = Keys()
NOW = 1_790_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def rate(limit: int, period: float = 3600.0, amount: int = 1, name: str = "rpm") -> Counter:
    return Counter(name, K.rate(name, "k"), "rate", limit, period, 0.0, amount)


def budget(limit: int, amount: int) -> Counter:
    return Counter("b", K.budget("b", "t", "2026-12"), "budget", limit, 0.0, NOW + 86400, amount)


async def verdict(v: Verdict | Awaitable[Verdict]) -> Verdict:
    assert not isinstance(v, Verdict)  # Redis answers later
    return await v


async def used(url: str, key: str) -> int:
    admin = aioredis.Redis.from_url(url)
    try:
        return int(await admin.get(key) or 0)
    finally:
        await admin.aclose()


async def test_exact_under_concurrency_on_the_server_clock(shared_redis: RedisServer) -> None:
    admin = aioredis.Redis.from_url(shared_redis.url)
    await admin.flushdb()
    await admin.aclose()
    quota = RedisQuota(connect(shared_redis.url), timeout_s=5.0, clock="server")
    try:
        takes = [quota.take(Take(f"r{i}", 0.0, (rate(50),))) for i in range(200)]
        admitted = [v.allowed for v in await asyncio.gather(*takes)]
        assert admitted.count(True) == 50

        leases = Counter("c", K.concurrent("c", "k"), "concurrent", 10, 60.0, 0.0, 1)
        got = await asyncio.gather(*(quota.take(Take(f"c{i}", 0.0, (leases,))) for i in range(200)))
        assert sum(v.allowed for v in got) == 10

        rng = random.Random(9)
        amounts = [rng.randint(1, 100) for _ in range(200)]
        tokens = [rate(1000, 3600.0, n, name="tpm") for n in amounts]
        got = await asyncio.gather(
            *(quota.take(Take(f"t{i}", 0.0, (c,))) for i, c in enumerate(tokens))
        )
        reserved = sum(n for n, v in zip(amounts, got, strict=True) if v.allowed)
        assert 900 < reserved <= 1000  # never over the limit; denials only near it
    finally:
        await quota.aclose()


async def test_scripts_reload_after_a_restart(own_redis: RedisServer) -> None:
    quota = RedisQuota(connect(own_redis.url), timeout_s=2.0, clock="caller")
    try:
        assert (await verdict(quota.take(Take("a", NOW, (rate(5),))))).remaining == (4,)
        own_redis.restart()  # empty: no scripts, no counters
        answers: list[Verdict] = []
        for attempt in range(3):  # the connection may be found dead once
            try:
                answers.append(await verdict(quota.take(Take(f"b{attempt}", NOW, (rate(5),)))))
                break
            except StoreUnavailable as e:
                assert e.reason == "error"
        assert answers and answers[0].remaining == (4,)  # NOSCRIPT was answered by a reload
        # The settle script too, though settlements go in batches of EVALSHA.
        quota.settle(Settle(f"b{attempt}", NOW, (rate(5),), (3,)))
        await quota.writer.flushed()
        assert quota.writer.written == 1
        assert [lv.used for lv in await quota.usage((rate(5),), NOW)] == [3]
    finally:
        await quota.aclose()


async def test_a_flushed_script_is_loaded_again_and_each_take_runs_once(
    own_redis: RedisServer,
) -> None:
    quota = RedisQuota(connect(own_redis.url), timeout_s=2.0, clock="caller")
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        assert (await verdict(quota.take(Take("a", NOW, (rate(100),))))).remaining == (99,)
        await admin.script_flush()
        got = await asyncio.gather(
            *(quota.take(Take(f"b{i}", NOW, (rate(100),))) for i in range(10))
        )
        assert sorted(v.remaining[0] for v in got) == list(range(89, 99))  # none ran twice
        await admin.script_flush()
        quota.settle(Settle("a", NOW, (rate(100),), (5,)))
        await quota.writer.flushed()
        assert quota.writer.written == 1
        assert [lv.used for lv in await quota.usage((rate(100),), NOW)] == [15]
    finally:
        await admin.aclose()
        await quota.aclose()


async def test_redis_py_clients_sentinels_path_take_settle_and_reload(
    own_redis: RedisServer,
) -> None:
    """A Sentinel master is a redis-py client: pipelines of EVALSHA, not resp.py."""
    quota = RedisQuota(aioredis.Redis.from_url(own_redis.url), timeout_s=2.0, clock="caller")
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        got = await asyncio.gather(
            *(quota.take(Take(f"r{i}", NOW, (rate(10),))) for i in range(12))
        )
        assert [v.allowed for v in got].count(True) == 10
        counter = budget(10_000, 100)
        assert (await verdict(quota.take(Take("b", NOW, (counter,))))).allowed
        await admin.script_flush()
        quota.settle(Settle("b", NOW, (counter,), (500,)))
        await quota.writer.flushed()
        assert quota.writer.written == 1
        assert [lv.used for lv in await quota.usage((counter,), NOW)] == [500]
    finally:
        await admin.aclose()
        await quota.aclose()


async def test_an_open_breaker_drops_the_connection_and_the_probe_opens_a_new_one(
    own_redis: RedisServer,
) -> None:
    clock = FakeClock()
    client = connect(own_redis.url)
    assert isinstance(client, Connection)
    quota = RedisQuota(client, timeout_s=0.05, clock="caller", breaker=Breaker(2, 1.0, clock=clock))
    try:
        await verdict(quota.take(Take("warm", NOW, (rate(100),))))
        assert client.connected
        own_redis.pause()
        for i in range(2):
            with pytest.raises(StoreUnavailable):
                await verdict(quota.take(Take(f"t{i}", NOW, (rate(100),))))
        assert quota.breaker.is_open and not client.connected  # no socket left to fill
        own_redis.resume()
        clock.t += 1.0
        assert (await verdict(quota.take(Take("probe", NOW, (rate(100),))))).allowed
        assert client.connected and not quota.breaker.is_open
    finally:
        own_redis.resume()
        await quota.aclose()


async def test_a_stopped_redis_costs_one_timeout_then_the_breaker_answers_at_once(
    own_redis: RedisServer,
) -> None:
    metrics = Metrics(CollectorRegistry())
    observer = StoreMetrics(metrics)
    clock = FakeClock()
    quota = RedisQuota(
        connect(own_redis.url),
        timeout_s=0.05,
        clock="caller",
        breaker=Breaker(3, 1.0, clock=clock),
        observer=observer,
    )
    sample = metrics.registry.get_sample_value
    try:
        await verdict(quota.take(Take("warm", NOW, (rate(100),))))
        own_redis.pause()
        for i in range(3):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as e:
                await verdict(quota.take(Take(f"t{i}", NOW, (rate(100),))))
            assert e.value.reason == "timeout"
            assert time.monotonic() - started < 0.05 + 0.25  # the deadline, not a hang
        assert sample("tollway_store_errors_total", {"op": "take", "reason": "timeout"}) == 3
        assert sample("tollway_store_breaker_open") == 1

        started = time.monotonic()
        for i in range(100):  # open: no I/O, raised before any await
            with pytest.raises(StoreUnavailable) as e:
                quota.take(Take(f"o{i}", NOW, (rate(100),)))
            assert e.value.reason == "breaker_open"
        assert time.monotonic() - started < 0.1
        assert sample("tollway_store_errors_total", {"op": "take", "reason": "breaker_open"}) == 100

        clock.t += 1.0  # cool-down over: one probe goes out, and fails
        with pytest.raises(StoreUnavailable):
            await verdict(quota.take(Take("probe1", NOW, (rate(100),))))
        with pytest.raises(StoreUnavailable):
            quota.take(Take("still-open", NOW, (rate(100),)))

        own_redis.resume()
        clock.t += 1.0
        assert (await verdict(quota.take(Take("probe2", NOW, (rate(100),))))).allowed
        assert sample("tollway_store_breaker_open") == 0
        assert (await verdict(quota.take(Take("after", NOW, (rate(100),))))).allowed
        assert sample("tollway_store_latency_seconds_count", {"op": "take"}) == 3
    finally:
        own_redis.resume()
        await quota.aclose()


async def test_killed_mid_load_and_restarted_nobody_waits_longer_than_the_timeout(
    own_redis: RedisServer,
) -> None:
    timeout = 0.05
    quota = RedisQuota(
        connect(own_redis.url),
        timeout_s=timeout,
        clock="caller",
        breaker=Breaker(5, 0.05),
    )
    slowest = 0.0
    outcomes: list[str] = []

    async def client(n: int) -> None:
        nonlocal slowest
        for i in range(60):
            started = time.monotonic()
            try:
                pending = quota.take(Take(f"{n}-{i}", NOW, (rate(10**6),)))
                await pending
                outcomes.append("ok")
            except StoreUnavailable as e:
                outcomes.append(e.reason)
            slowest = max(slowest, time.monotonic() - started)
            await asyncio.sleep(0.005)

    async def chaos() -> None:
        await asyncio.sleep(0.1)
        own_redis.stop()
        await asyncio.sleep(0.15)
        own_redis.start()

    try:
        await asyncio.gather(chaos(), *(client(n) for n in range(10)))
        assert slowest < timeout + 0.2
        assert "ok" in outcomes[:50] and set(outcomes) - {"ok"}  # it did go down
        assert outcomes[-10:] == ["ok"] * 10  # and came back by itself
    finally:
        await quota.aclose()


async def test_a_settlement_retried_after_a_timeout_is_charged_once(own_redis: RedisServer) -> None:
    clock = FakeClock()
    quota = RedisQuota(
        connect(own_redis.url),
        timeout_s=1.0,
        settle_timeout_s=0.05,
        clock="caller",
        breaker=Breaker(2, 0.1, clock=clock),
        settle_retry_for_s=10.0,
    )
    try:
        counter = budget(10_000, 100)
        assert (await verdict(quota.take(Take("r1", NOW, (counter,))))).allowed
        own_redis.pause()
        quota.settle(Settle("r1", NOW, (counter,), (500,)))  # sent, then timed out: kept
        await asyncio.sleep(0.2)  # the writer tried, failed and is backing off
        own_redis.resume()  # the first, timed-out settle runs now
        clock.t += 1.0
        await asyncio.wait_for(quota.writer.flushed(), 10.0)
        assert quota.writer.written == 1
        assert await used(own_redis.url, counter.key) == 500  # not 900
    finally:
        own_redis.resume()
        await quota.aclose()


async def test_aclose_drains_queued_settlements(own_redis: RedisServer) -> None:
    quota = RedisQuota(connect(own_redis.url), timeout_s=1.0, clock="caller")
    counter = budget(10**9, 10)
    for i in range(50):
        assert (await verdict(quota.take(Take(f"r{i}", NOW, (counter,))))).allowed
    for i in range(50):
        quota.settle(Settle(f"r{i}", NOW, (counter,), (30,)))
    assert quota.writer.pending > 0
    await quota.aclose()
    assert await used(own_redis.url, counter.key) == 50 * 30


async def test_settlements_that_cannot_be_queued_are_dropped_and_counted(
    own_redis: RedisServer,
) -> None:
    metrics = Metrics(CollectorRegistry())
    quota = RedisQuota(
        connect(own_redis.url), clock="caller", queue_size=2, observer=StoreMetrics(metrics)
    )
    counter = budget(10**9, 10)
    for i in range(5):
        quota.settle(Settle(f"r{i}", NOW, (counter,), (1,)))
    await quota.aclose()
    get = metrics.registry.get_sample_value
    assert get("tollway_settlements_dropped_total", {"reason": "queue_full"}) == 3
    assert await used(own_redis.url, counter.key) == 2


def test_urls_in_logs_have_no_password() -> None:
    assert redact_url("rediss://tw:s3cret@redis.internal:6380/2") == (
        "rediss://tw:***@redis.internal:6380/2"
    )
    assert redact_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    assert redact_url("redis://:pw@[::1]:6379") == "redis://:***@[::1]:6379"


async def test_a_take_that_cannot_be_sent_fails_rather_than_hangs(redis_quota: RedisQuota) -> None:
    bad = Counter("x", K.rate("x", "k"), "nope", 1, 1.0, 0.0, 1)  # type: ignore[arg-type]
    with pytest.raises(KeyError):
        await asyncio.wait_for(verdict(redis_quota.take(Take("bad", NOW, (bad,)))), 2.0)
    assert (await verdict(redis_quota.take(Take("good", NOW, (rate(5),))))).allowed
