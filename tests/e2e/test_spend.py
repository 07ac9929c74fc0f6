"""`tollway spend` against a running gateway: what the limits recorded for the requests
made through the front door, read from the server's metrics port (embedded store)
or from Redis directly, by the command run as users run it."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from extproc import keys, up
from extproc.config import Config, LimitRule, RedisConfig, StoreConfig
from extproc.limits.rules import MICRO
from extproc.stages.metering import COST_HEADER
from tests.redis_server import RedisServer

from .conftest import Stack, eventually, start_stack

pytestmark = pytest.mark.e2e

RULES = (
    LimitRule(name="key_month", by=("key",), budget_usd=Decimal(5), per="month"),
    LimitRule(name="tenant_day", by=("tenant",), budget_usd=Decimal(100), per="day"),
    # Ten an hour: what three requests used is still there when the command reads it.
    LimitRule(name="key_hourly", by=("key",), requests=10, per="hour"),
)


def with_limits(store: StoreConfig | None = None) -> Any:
    def customize(config: Config) -> Config:
        update: dict[str, Any] = {"limits": RULES}
        if store is not None:
            update["store"] = store
        return config.model_copy(update=update)

    return customize


def chat(stack: Stack, key: str = "alice") -> int:
    """One priced request; the micro-USD its budget is charged (the cost, rounded up)."""
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        headers={"authorization": f"Bearer {stack.keys[key]}"},
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return math.ceil(float(response.headers[COST_HEADER]) * MICRO)


def spend(config_file: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", "spend", "--config", str(config_file), *args],
        capture_output=True,
        text=True,
        timeout=30,
    )


def rows(stdout: str) -> dict[str, dict[str, Any]]:
    return {row["rule"]: row for row in json.loads(stdout)["limits"]}


def config_file(stack: Stack) -> Path:
    return stack.gateway.workdir / "tollway.yaml"  # what the gateway's serve reads


def get(stack: Stack, path: str) -> tuple[int, Any]:
    url = f"http://127.0.0.1:{stack.gateway.config.metrics.port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("spend"), customize=with_limits())
    yield s
    s.gateway.stop()


def test_spend_of_a_key_from_the_running_server(stack: Stack) -> None:
    charged = [chat(stack) for _ in range(3)]
    assert all(charged)
    alice = next(r for r in keys.read_records(stack.keys_file) if r.name == "alice")

    def settled() -> Any:  # settled at the end of each stream: the reservations given back
        status, doc = get(stack, f"/v1/spend?key={alice.id}")
        used = {row["rule"]: row["used"] for row in doc["limits"]}
        return status == 200 and abs(used["key_month"] - sum(charged)) <= len(charged)

    eventually(settled)
    done = spend(config_file(stack), "--key", "alice", "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["key"] == {"id": alice.id, "name": "alice", "tenant": "acme"}
    found = rows(done.stdout)
    assert set(found) == {"key_month", "tenant_day", "key_hourly"}
    month = found["key_month"]
    assert abs(month["used"] - sum(charged)) <= len(charged)  # the cost's float rounding
    assert Decimal(month["used_usd"]) == Decimal(month["used"]) / MICRO
    assert Decimal(month["remaining_usd"]) == 5 - Decimal(month["used_usd"])
    assert month["window"] == doc["at"][:7] and month["scope"] == "key"
    assert found["tenant_day"]["used"] == month["used"]  # only Alice spends in acme
    assert (found["key_hourly"]["used"], found["key_hourly"]["remaining"]) == (3, 7)

    table = spend(config_file(stack), "--key", alice.id, "--period", "day")
    assert table.returncode == 0, table.stderr
    assert f"key {alice.id} (alice, tenant acme)" in table.stdout
    assert "tenant_day" in table.stdout and "key_hourly" in table.stdout
    assert "key_month" not in table.stdout  # a month's budget, not a day's
    assert "$100.00" in table.stdout

    tenant = spend(config_file(stack), "--tenant", "acme", "--json")
    assert tenant.returncode == 0, tenant.stderr
    assert json.loads(tenant.stdout)["key"] is None
    assert set(rows(tenant.stdout)) == {"tenant_day"}  # no key's own counter


def test_the_endpoint_refuses_what_it_cannot_answer(stack: Stack) -> None:
    assert get(stack, "/v1/spend?period=week") == (400, {"error": "period: day or month"})
    assert get(stack, "/v1/spend?key=0123456789ab")[0] == 404
    assert get(stack, "/v1/spend?tenant=nobody")[0] == 404
    assert get(stack, "/")[0] == 404
    port = stack.gateway.config.metrics.port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["content-type"].startswith("text/plain")
        assert b"tollway_info" in response.read()


def test_unknown_key_and_server_down(stack: Stack, tmp_path: Path) -> None:
    unknown = spend(config_file(stack), "--key", "nobody")
    assert unknown.returncode == 1
    assert "no key with id or name 'nobody'" in unknown.stderr
    port = up.free_port()  # nothing listens there
    dead = tmp_path / "tollway.yaml"
    dead.write_text(f"auth: {{keys_file: {stack.keys_file}}}\nmetrics: {{port: {port}}}\n")
    down = spend(dead, "--key", "alice")
    assert down.returncode == 1
    assert f"cannot reach the server's metrics port at http://127.0.0.1:{port}" in down.stderr
    assert spend(dead, "--key", "alice", "--tenant", "acme").returncode == 2


def test_spend_read_from_redis_with_the_gateway_stopped(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        store = StoreConfig(redis=RedisConfig(url=redis.url))
        workdir = tmp_path / "gateway"
        workdir.mkdir()
        s = start_stack(workdir, customize=with_limits(store))
        try:
            charged = [chat(s) for _ in range(2)]
        finally:
            s.gateway.stop()  # its settlements are written before it exits
        done = spend(config_file(s), "--key", "alice", "--json")
        assert done.returncode == 0, done.stderr
        month = rows(done.stdout)["key_month"]
        assert abs(month["used"] - sum(charged)) <= len(charged)
        assert rows(done.stdout)["key_hourly"]["used"] == 2
        redis.stop()
        gone = spend(config_file(s), "--key", "alice")
        assert gone.returncode == 1
        assert f"Redis at {redis.url} did not answer" in gone.stderr
    finally:
        redis.stop()
