"""Limits through the real Envoy: two Tollway replicas share a real redis-server.

Each test counts under rules of its own tenant, so the tests do not share counters.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc import keys
from extproc.config import Config, LimitRule, RedisConfig, StoreConfig
from extproc.stages.limits import estimate_input_tokens
from tests.redis_server import RedisServer

from .conftest import Stack, eventually, start_stack
from .test_front_door import CHAT

pytestmark = pytest.mark.e2e

RULES: list[dict[str, Any]] = [
    {"name": "burst", "by": ["key"], "requests": 25, "per": "hour", "match": {"tenants": ["req"]},
     "on_store_error": "fail_closed"},
    {"name": "tpm", "by": ["tenant"], "tokens": 3000, "per": "hour", "match": {"tenants": ["tok"]}},
    {"name": "spend", "by": ["tenant"], "budget_usd": "0.002", "per": "day",
     "match": {"tenants": ["usd"]}},
    {"name": "open", "by": ["key"], "requests": 1000, "per": "minute",
     "match": {"tenants": ["fault"]}},
    {"name": "closed", "by": ["key"], "requests": 1000, "per": "minute",
     "on_store_error": "fail_closed", "match": {"tenants": ["strict"]}},
    {"name": "anthropic", "by": ["key"], "requests": 1, "per": "hour",
     "match": {"tenants": ["claude"]}},
]  # fmt: skip


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Stack]:
    def customize(config: Config) -> Config:
        return config.model_copy(
            update={
                "server": config.server.model_copy(update={"replicas": 2}),
                # Loose enough for a loaded CI machine; the outage test shows it bounds waits.
                "store": StoreConfig(redis=RedisConfig(url=redis.url, timeout_ms=250)),
                "limits": tuple(LimitRule.model_validate(rule) for rule in RULES),
            }
        )

    stack = start_stack(tmp_path_factory.mktemp("limited"), customize=customize)
    yield stack
    stack.gateway.stop()


def reloads(stack: Stack) -> list[float]:
    """Each replica's count of keys-file reloads."""
    counts = []
    for replica in stack.gateway.replicas:
        url = f"http://127.0.0.1:{replica.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        line = next(x for x in text.splitlines() if x.startswith(_RELOADED))
        counts.append(float(line.rpartition(" ")[2]))
    return counts


_RELOADED = 'tollway_reloads_total{file="keys",result="ok"}'


def new_key(stack: Stack, tenant: str) -> str:
    """A key of its own for one test, served once every replica reloaded the keys file;
    one request made with it (counted by its rules)."""
    before = reloads(stack)
    key, record = keys.generate(name=f"t-{tenant}", tenant=tenant)
    keys.add(stack.keys_file, record)
    eventually(lambda: all(a > b for a, b in zip(reloads(stack), before, strict=True)))
    assert chat(stack, key, {"model": "no-such-model"}).status_code != 401
    return key


def chat(stack: Stack, key: str, body: dict[str, Any] = CHAT) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"}
    return httpx.post(f"{stack.url}/v1/chat/completions", headers=headers, json=body, timeout=10)


def burst(stack: Stack, key: str, n: int, body: dict[str, Any] = CHAT) -> list[httpx.Response]:
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(lambda _: chat(stack, key, body), range(n)))


def test_n_concurrent_requests_across_two_replicas_admit_exactly_the_limit(limited: Stack) -> None:
    key = new_key(limited, "req")  # its probe request was one of the 25
    answers = burst(limited, key, 60)
    statuses = [r.status_code for r in answers]
    # Exact both ways: never one over, and no refusal while there was room. A store call
    # that missed its deadline fails closed (503), having maybe taken its slot; a loaded
    # machine may fail a request after it was admitted: those are neither.
    seen = {code: statuses.count(code) for code in set(statuses)}
    assert statuses.count(200) <= 24 and statuses.count(429) <= 36, seen
    if set(statuses) == {200, 429}:  # the usual case
        assert statuses.count(200) == 24, seen
    refused = next(r for r in answers if r.status_code == 429)
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("requests", "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) > 0
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"


def test_the_openai_sdk_sees_the_limit_headers_and_its_own_rate_limit_error(limited: Stack) -> None:
    key = new_key(limited, "req")
    client = openai.OpenAI(base_url=f"{limited.url}/v1", api_key=key, max_retries=0)
    raw = client.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert raw.headers["x-ratelimit-limit-requests"] == "25"
    assert raw.headers["x-ratelimit-remaining-requests"] == "23"  # the probe, then this one
    assert raw.headers["x-ratelimit-reset-requests"].endswith("s")
    burst(limited, key, 23)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(**CHAT)
    assert "burst" in str(caught.value)


def test_anthropic_clients_get_their_own_429_and_headers(limited: Stack) -> None:
    key = new_key(limited, "claude")  # the probe was its one request of the hour
    client = anthropic.Anthropic(base_url=limited.url, api_key=key, max_retries=0)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(
            model="claude-3-5-haiku-latest",
            max_tokens=16,
            messages=[{"role": "user", "content": "hi"}],
        )
    assert caught.value.response.headers["anthropic-ratelimit-requests-remaining"] == "0"
    assert caught.value.response.headers["anthropic-ratelimit-requests-reset"].endswith("Z")


def test_token_reservations_never_exceed_the_limit_and_are_reconciled(limited: Stack) -> None:
    body = {**CHAT, "max_tokens": 1400}  # reserves ~1420 of the 3000: two fit at once
    key = new_key(limited, "tok")
    answers = burst(limited, key, 30, body)
    refused = [r for r in answers if r.status_code == 429]
    assert refused and refused[0].json()["error"]["type"] == "tokens"
    used = sum(r.json()["usage"]["total_tokens"] for r in answers if r.status_code == 200)
    assert used <= 3000
    # Reconciled: each answer gives back what it reserved and did not use (it used ~30),
    # so one after the other, ten such requests fit where only two could be reserved.
    later = [chat(limited, key, body).status_code for _ in range(10)]
    assert later == [200] * 10


def test_a_dollar_budget_is_exact_across_replicas(limited: Stack) -> None:
    body = {"model": "gpt-4o", "max_tokens": 50, "messages": [{"role": "user", "content": "hi"}]}
    reserve = (
        estimate_input_tokens(httpx.Request("POST", "/", json=body).content) * 2.5 + 500
    ) / 1e6
    key = new_key(limited, "usd")
    answers = burst(limited, key, 40, body)  # concurrently, over both replicas
    for _ in range(100):  # then one at a time, until the budget says no (a 503: try again)
        if answers[-1].status_code == 429:
            break
        answers.append(chat(limited, key, body))
    spent = sum(float(r.headers["x-tollway-cost-usd"]) for r in answers if r.status_code == 200)
    assert 0.002 - reserve <= spent <= 0.002  # never over; refused only when one more cannot fit
    refused = answers[-1].json()["error"]
    assert (refused["type"], refused["code"]) == ("insufficient_quota", "insufficient_quota")


def test_a_redis_outage_follows_each_rules_policy_within_its_timeout(
    limited: Stack, redis: RedisServer
) -> None:
    open_key, strict_key = new_key(limited, "fault"), new_key(limited, "strict")
    redis.pause()  # SIGSTOP: Redis accepts nothing and answers nothing
    try:
        for _ in range(10):
            started = time.monotonic()
            assert chat(limited, open_key).status_code == 200  # fails open
            refused = chat(limited, strict_key)  # fails closed
            assert time.monotonic() - started < 1.5  # each within the timeout, then the breaker
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "limits_unavailable"
    finally:
        redis.resume()
    eventually(lambda: chat(limited, strict_key).status_code == 200)  # back by itself
