"""Real redis-server processes for the store tests (never a fake)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from extproc.limits.quota import Keys
from extproc.limits.redis_store import RedisQuota, connect
from tests.redis_server import (
    RedisServer,
    SentinelGroup,
    Tls,
    redis_server_binary,
    start_sentinel_group,
)


def _server(folder: Path) -> RedisServer:
    assert redis_server_binary(), (
        "redis-server is missing: ./scripts/test installs it (apt-get install redis-server)"
    )
    server = RedisServer(folder)
    server.start()
    return server


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the tests that only need a clean database."""
    server = _server(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test's own, to pause, kill and restart."""
    server = _server(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def sentinel_group(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SentinelGroup]:
    """A master, its replica and a sentinel of this test's own, to kill the master;
    ``password`` and ``tls`` as indirect parameters."""
    options = getattr(request, "param", {})
    tls = Tls.make(tmp_path) if options.get("tls") else None
    group = start_sentinel_group(tmp_path, password=options.get("password"), tls=tls)
    yield group
    group.stop()


@pytest.fixture
async def redis_quota(shared_redis: RedisServer) -> AsyncIterator[RedisQuota]:
    """A Redis backend on an empty database, on the caller's (injected) clock."""
    admin = aioredis.Redis.from_url(shared_redis.url)
    await admin.flushdb()
    await admin.aclose()
    quota = RedisQuota(connect(shared_redis.url), keys=Keys(), timeout_s=1.0, clock="caller")
    yield quota
    await quota.aclose()
