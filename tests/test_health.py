"""The HTTP probes Kubernetes, compose and the image's HEALTHCHECK call, on a real
`serve` with a real redis-server: liveness is the process, readiness is the process
able to serve (not draining, the shared store answering)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from extproc import server, up
from extproc.config import Config, MetricsConfig, RedisConfig, ServerConfig, StoreConfig
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.usefixtures("provider_keys_in_env")


def probe(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())["status"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["status"]


async def probe_until(url: str, wanted: Callable[[int, str], bool], within_s: float = 10) -> str:
    """Poll ``url`` until ``wanted(status, reason)``; the reason then (fails after within_s)."""
    deadline = time.monotonic() + within_s
    while True:
        status, reason = await asyncio.to_thread(probe, url)
        if wanted(status, reason):
            return reason
        assert time.monotonic() < deadline, f"{url}: still {status} {reason!r}"
        await asyncio.sleep(0.05)


@asynccontextmanager
async def serving(
    tmp_path: Path, redis: RedisServer | None, drain_delay_s: float = 0.0
) -> AsyncIterator[tuple[str, asyncio.Event]]:
    """`serve` on free ports; yields the metrics port's base URL and its stop event."""
    metrics_port = up.free_port()
    store = StoreConfig(redis=RedisConfig(url=redis.url, timeout_ms=250)) if redis else None
    config = Config(
        server=ServerConfig(port=0, drain_delay_s=drain_delay_s, drain_timeout_s=1),
        metrics=MetricsConfig(port=metrics_port),
        auth={"keys_file": tmp_path / "keys.yaml"},  # type: ignore[arg-type]
        store=store or StoreConfig(),
    )
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(config, stop=stop, on_ready=ready.set_result))
    await asyncio.wait_for(ready, 10)
    try:
        yield f"http://127.0.0.1:{metrics_port}", stop
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


@pytest.fixture
def redis(tmp_path: Path) -> AsyncIterator[RedisServer]:  # type: ignore[misc]
    assert redis_server_binary(), "redis-server is missing: ./scripts/test installs it"
    server_ = RedisServer(tmp_path)
    server_.start()
    yield server_
    server_.stop()


async def test_without_redis_a_running_server_is_live_and_ready(tmp_path: Path) -> None:
    async with serving(tmp_path, None) as (base, _):
        assert await asyncio.to_thread(probe, f"{base}/healthz") == (200, "ok")
        assert await asyncio.to_thread(probe, f"{base}/readyz") == (200, "ok")


async def test_readiness_follows_redis_and_liveness_does_not(
    tmp_path: Path, redis: RedisServer
) -> None:
    async with serving(tmp_path, redis) as (base, _):
        assert await asyncio.to_thread(probe, f"{base}/readyz") == (200, "ok")

        redis.pause()  # answers nothing: the PING's deadline
        reason = await probe_until(f"{base}/readyz", lambda status, _: status == 503)
        assert reason == f"store {redis.url} unavailable (timeout)"
        # A restart would not bring Redis back: the process stays live.
        assert await asyncio.to_thread(probe, f"{base}/healthz") == (200, "ok")
        redis.resume()
        await probe_until(f"{base}/readyz", lambda status, _: status == 200)

        redis.stop()  # refused: an error at once
        reason = await probe_until(f"{base}/readyz", lambda status, _: status == 503)
        assert reason == f"store {redis.url} unavailable (error)"
        redis.start()  # the same port, a new process: the next probe reconnects
        await probe_until(f"{base}/readyz", lambda status, _: status == 200)


async def test_a_draining_server_is_not_ready_but_live(tmp_path: Path) -> None:
    async with serving(tmp_path, None, drain_delay_s=1.5) as (base, stop):
        stop.set()
        reason = await probe_until(f"{base}/readyz", lambda status, _: status == 503)
        assert reason == "draining"
        assert await asyncio.to_thread(probe, f"{base}/healthz") == (200, "ok")
