"""Redis Sentinel against real processes: a master, its replica and a sentinel.

The backend is built as users build it, from a config file's ``store.redis``
with ``sentinel`` set. It counts exactly on the master the sentinel names;
when that master is killed, takes fail fast, and once the replica is promoted
they succeed again, with the counts that had replicated.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from extproc.config import load
from extproc.limits.backend import open_quota
from extproc.limits.quota import Counter, Keys, Settle, StoreUnavailable, Take, Verdict
from extproc.limits.redis_store import RedisQuota
from tests.redis_server import SentinelGroup, free_port, start_sentinel

K = Keys()
TIMEOUT_S = 1.0  # store.redis.timeout_ms: the first take over TLS (sentinel, handshake,
# script load) took more than 0.25 s on a loaded CI host
SLACK_S = 0.5  # how much later than its deadline a failed take may come back
BOUND_S = 10.0  # a bug that loses an answer fails the test instead of hanging it


def requests(limit: int, name: str = "rpm") -> Counter:
    return Counter(name, K.rate(name, "key:1"), "rate", limit, 3600.0, 0.0, 1)


def budget(limit: int, amount: int) -> Counter:
    end = time.time() + 86400
    return Counter("usd", K.budget("usd", "key:1", "2026-12"), "budget", limit, 0.0, end, amount)


def quota_from_config(
    folder: Path, group: SentinelGroup, url: str = "redis:///0", nodes: list[str] | None = None
) -> RedisQuota:
    """The backend from a config file, as `tollway up` reads it."""
    nodes = nodes or [f"127.0.0.1:{group.sentinel.port}"]
    path = folder / "tollway.yaml"
    path.write_text(
        f"""
store:
  redis:
    url: {url}
    password_env: TW_TEST_REDIS_PASSWORD
    sentinel:
      master: {group.name}
      nodes: [{", ".join(nodes)}]
    timeout_ms: {int(TIMEOUT_S * 1000)}
    breaker_cool_down_s: 0.2
""",
        encoding="utf-8",
    )
    quota = open_quota(load(path, environ={}).store, folder / "tollway-keys.yaml")
    assert isinstance(quota, RedisQuota)
    return quota


@pytest.mark.parametrize(
    "sentinel_group",
    [{}, {"password": "s3cret-pw"}, {"tls": True}],
    ids=["plain", "password", "tls"],
    indirect=True,
)
async def test_takes_and_settles_on_the_master_the_sentinel_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sentinel_group: SentinelGroup
) -> None:
    if sentinel_group.password:
        monkeypatch.setenv("TW_TEST_REDIS_PASSWORD", sentinel_group.password)
    tls = sentinel_group.tls
    url = f"rediss:///3?ssl_ca_certs={tls.ca}" if tls else "redis:///3"
    quota = quota_from_config(tmp_path, sentinel_group, url=url)
    try:
        counters = (requests(5), budget(10_000, 100))
        async with asyncio.timeout(BOUND_S):
            takes = [quota.take(Take(f"r{i}", 0.0, counters)) for i in range(12)]
            verdicts = await asyncio.gather(*takes)
        admitted = [f"r{i}" for i, v in enumerate(verdicts) if v.allowed]
        assert len(admitted) == 5  # a limit of 5 admits exactly 5 of 12
        assert all(v.denied_by == 0 and v.retry_after_s > 0 for v in verdicts if not v.allowed)

        for rid in admitted:  # each used 30 of the 100 it reserved
            quota.settle(Settle(rid, 0.0, counters, (1, 30)))
        async with asyncio.timeout(BOUND_S):
            await quota.writer.flushed()
        assert quota.writer.written == 5
        assert [lv.used for lv in await quota.usage(counters, 0.0)] == [5, 150]
    finally:
        await quota.aclose()
    # On the master, in the URL's database.
    with sentinel_group.admin(sentinel_group.master) as master:
        master.select(3)
        assert master.exists(counters[0].key, counters[1].key) == 2
        master.select(0)
        assert master.dbsize() == 0


async def take_or_failure(quota: RedisQuota, take: Take) -> tuple[Verdict | str, float]:
    """A verdict or the failure's reason, and how long the caller waited."""

    async def asked() -> Verdict:
        return await quota.take(take)  # raises at once while the breaker is open

    started = time.monotonic()
    try:
        outcome: Verdict | str = await asyncio.wait_for(asked(), BOUND_S)
    except StoreUnavailable as e:
        outcome = e.reason
    return outcome, time.monotonic() - started


async def test_after_failover_takes_succeed_again_with_the_replicated_counts(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> None:
    quota = quota_from_config(tmp_path, sentinel_group)
    try:
        counters = (requests(3), budget(10_000, 100))
        for i in range(3):
            assert (await quota.take(Take(f"r{i}", 0.0, counters))).allowed
        assert not (await quota.take(Take("r3", 0.0, counters))).allowed
        with sentinel_group.admin(sentinel_group.master) as master:
            assert master.wait(1, 5000) == 1  # the replica has every write so far

        sentinel_group.master.stop()  # SIGKILL
        quota.settle(Settle("r0", 0.0, counters, (1, 400)))  # queued while it is down
        outcomes: list[str] = []
        deadline = time.monotonic() + 15
        while True:
            outcome, waited = await take_or_failure(quota, Take("after", 0.0, counters))
            assert waited < TIMEOUT_S + SLACK_S  # failed fast, never a hang
            if isinstance(outcome, Verdict):
                answer = outcome
                break
            outcomes.append(outcome)
            assert time.monotonic() < deadline, f"no answer after failover: {outcomes[-5:]}"
            await asyncio.sleep(0.02)

        # The sentinel promoted the replica; it was down long enough to open the breaker,
        # which closed again by itself.
        assert sentinel_group.master_port() == sentinel_group.replica.service_port
        assert outcomes and "breaker_open" in outcomes
        assert not quota.breaker.is_open
        # The promoted replica had the counts: the limit is still used up.
        assert not answer.allowed and answer.denied_by == 0
        fresh = requests(3, name="other")
        assert (await quota.take(Take("fresh", 0.0, (fresh,)))).allowed  # it takes writes
        # The settlement queued during the outage landed, once: 300 + (400 - 100).
        async with asyncio.timeout(BOUND_S):
            await quota.writer.flushed()
        assert quota.writer.written == 1 and quota.writer.dropped == 0
        assert [lv.used for lv in await quota.usage(counters, 0.0)] == [3, 600]
    finally:
        await quota.aclose()


async def test_sentinels_that_are_down_or_hung_are_skipped(
    tmp_path: Path, sentinel_group: SentinelGroup
) -> None:
    hung = start_sentinel(tmp_path, sentinel_group.name, sentinel_group.master)
    hung.pause()  # SIGSTOP: connections are accepted, never answered
    try:
        down = f"127.0.0.1:{free_port()}"  # nothing listens there
        live = f"127.0.0.1:{sentinel_group.sentinel.port}"
        quota = quota_from_config(
            tmp_path, sentinel_group, nodes=[down, f"127.0.0.1:{hung.port}", live]
        )
        try:
            outcome, waited = await take_or_failure(quota, Take("r", 0.0, (requests(3),)))
            assert isinstance(outcome, Verdict) and outcome.remaining == (2,)
            assert waited < TIMEOUT_S + SLACK_S
        finally:
            await quota.aclose()
    finally:
        hung.stop()
