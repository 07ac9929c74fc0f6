"""The metrics port's own server on a real socket: /metrics as prometheus_client serves
it, and /v1/spend handed to the event loop (late or failing stores answer 503)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter

from extproc.limits.quota import StoreUnavailable
from extproc.limits.spend import Query
from extproc.metrics_http import MetricsServer, Spend


def fetch(url: str, method: str = "GET", accept: str | None = None) -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    if accept is not None:
        request.add_header("accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["content-type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["content-type"], error.read()


@pytest.fixture
async def serving() -> AsyncIterator[tuple[str, list[Spend]]]:
    """A server on a free loopback port; the test sets what /v1/spend runs."""
    registry = CollectorRegistry()
    Counter("tollway_test", "a sample", registry=registry).inc()
    answer: list[Spend] = []

    async def spend(query: Query) -> dict[str, Any] | None:
        return await answer[0](query)

    server = MetricsServer(registry, spend, asyncio.get_running_loop(), timeout_s=0.3)
    port = server.start("127.0.0.1", 0)
    yield f"http://127.0.0.1:{port}", answer
    await asyncio.to_thread(server.close)


async def test_metrics_are_served_as_prometheus_client_serves_them(
    serving: tuple[str, list[Spend]],
) -> None:
    base, _ = serving
    status, kind, body = await asyncio.to_thread(fetch, f"{base}/metrics")
    assert (status, kind) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert b"tollway_test_total 1.0" in body
    status, kind, _ = await asyncio.to_thread(
        fetch, f"{base}/metrics", accept="application/openmetrics-text; version=1.0.0"
    )
    assert kind.startswith("application/openmetrics-text")


async def test_spend_runs_on_the_loop(serving: tuple[str, list[Spend]]) -> None:
    base, answer = serving
    loop = asyncio.get_running_loop()

    async def on_the_loop(query: Query) -> dict[str, Any] | None:
        assert asyncio.get_running_loop() is loop
        return None if query.key_id == "gone" else {"asked": query.key_id}

    answer.append(on_the_loop)
    status, kind, body = await asyncio.to_thread(fetch, f"{base}/v1/spend?key=k1")
    assert (status, kind, json.loads(body)) == (200, "application/json", {"asked": "k1"})
    status, _, body = await asyncio.to_thread(fetch, f"{base}/v1/spend?key=gone")
    assert (status, json.loads(body)) == (404, {"error": "no key with id 'gone'"})
    assert (await asyncio.to_thread(fetch, f"{base}/v1/spend?x=1"))[0] == 400
    assert (await asyncio.to_thread(fetch, f"{base}/v1/spend", "POST"))[0] == 405
    assert (await asyncio.to_thread(fetch, f"{base}/"))[0] == 404


async def test_a_late_or_failing_store_is_a_503(serving: tuple[str, list[Spend]]) -> None:
    base, answer = serving

    async def never(query: Query) -> dict[str, Any] | None:
        await asyncio.Event().wait()
        return None

    async def broken(query: Query) -> dict[str, Any] | None:
        raise StoreUnavailable("breaker_open")

    answer.append(never)
    status, _, body = await asyncio.to_thread(fetch, f"{base}/v1/spend")
    assert status == 503 and "did not answer within 0.3s" in json.loads(body)["error"]
    answer[0] = broken
    status, _, body = await asyncio.to_thread(fetch, f"{base}/v1/spend")
    assert (status, json.loads(body)) == (
        503,
        {"error": "the limits store is unavailable (breaker_open)"},
    )


async def test_a_wedged_event_loop_fails_liveness() -> None:
    """/healthz answers from the server's thread, but only with the loop's help: a loop
    that runs nothing (a blocking call, a runaway regex) is a process to restart."""
    import threading
    import time

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = MetricsServer(CollectorRegistry(), _no_spend, loop, probe_timeout_s=0.3)
    port = server.start("127.0.0.1", 0)
    try:
        status, _, body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        loop.call_soon_threadsafe(time.sleep, 1.5)
        status, _, body = await asyncio.to_thread(fetch, f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(body)) == (503, {"status": "no answer within 0.3s"})
    finally:
        await asyncio.to_thread(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


async def test_readiness_says_why_not() -> None:
    reasons: list[str | None] = ["draining"]

    async def ready() -> str | None:
        return reasons[0]

    server = MetricsServer(CollectorRegistry(), _no_spend, asyncio.get_running_loop(), ready=ready)
    port = server.start("127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{port}/readyz"
        status, kind, body = await asyncio.to_thread(fetch, url)
        assert (status, kind, json.loads(body)) == (503, "application/json", {"status": "draining"})
        reasons[0] = None
        status, _, body = await asyncio.to_thread(fetch, url)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    finally:
        await asyncio.to_thread(server.close)


async def _no_spend(query: Query) -> dict[str, Any] | None:
    return None
