"""Redis Cluster: all of a request's keys carry one hash tag, so one script reaches them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from extproc.limits.quota import Counter, Keys, Settle, Take, calendar_window
from extproc.limits.redis_store import RedisQuota, connect
from tests.redis_server import RedisServer, start_cluster

NOW = 1_790_000_000.0


def counters(keys: Keys) -> tuple[Counter, ...]:
    window, end = calendar_window(NOW, "month", "Europe/Paris")
    return (
        Counter("rpm", keys.rate("rpm", "key:1"), "rate", 10, 60.0, 0.0, 1),
        Counter("tpm", keys.rate("tpm", "tenant{x}"), "rate", 1000, 60.0, 0.0, 300),
        Counter("conc", keys.concurrent("conc", "key:1"), "concurrent", 2, 60.0, 0.0, 1),
        Counter("usd", keys.budget("usd", "key:1", window), "budget", 10**6, 0.0, end, 5000),
        Counter("usd-t", keys.budget("usd", "tenant-a", window), "budget", 10**7, 0.0, end, 5000),
    )


@pytest.mark.parametrize("tag", ["tollway", "gw-eu"])
def test_every_key_of_a_request_is_in_one_slot(tag: str) -> None:
    keys = Keys(tag)
    all_keys = [c.key for c in counters(keys)] + [keys.request("req-7")]
    assert len({key_slot(k.encode()) for k in all_keys}) == 1
    assert key_slot(all_keys[0].encode()) == key_slot(tag.encode())


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisServer]]:
    servers = start_cluster(Path(tmp_path_factory.mktemp("cluster")))
    yield servers
    for server in servers:
        server.stop()


async def test_take_and_settle_on_a_real_three_node_cluster(cluster: list[RedisServer]) -> None:
    keys = Keys("tollway")
    quota = RedisQuota(
        connect(cluster[1].url, cluster=True), keys=keys, timeout_s=2.0, clock="caller"
    )
    try:
        cs = counters(keys)
        first = await quota.take(Take("req-1", NOW, cs))
        assert first.allowed and first.remaining == (9, 700, 1, 995_000, 9_995_000)
        second = await quota.take(Take("req-2", NOW, cs))
        assert second.allowed
        third = await quota.take(Take("req-3", NOW, cs))  # the third concurrent lease
        assert not third.allowed and third.denied_by == 2
        quota.settle(Settle("req-1", NOW, cs, (1, 100, 1, 2000, 2000)))
        await quota.writer.flushed()
        levels = await quota.usage(cs, NOW)
        assert [lv.used for lv in levels] == [2, 400, 1, 7000, 7000]
    finally:
        await quota.aclose()
