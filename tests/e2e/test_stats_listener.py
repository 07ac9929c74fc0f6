"""envoy.stats_port: Envoy's Prometheus stats for a scraper, and nothing else of its admin."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from extproc import envoyconf, up
from extproc.config import Config

from .conftest import Stack, start_stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stats_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    port = up.free_port()

    def with_stats(config: Config) -> Config:
        envoy = config.envoy.model_copy(update={"stats_port": port})
        return config.model_copy(update={"envoy": envoy})

    stack = start_stack(tmp_path_factory.mktemp("stats"), customize=with_stats)
    try:
        yield stack, port
    finally:
        stack.gateway.stop()


def test_the_stats_port_serves_prometheus_stats_only(stats_stack: tuple[Stack, int]) -> None:
    stack, port = stats_stack
    key = stack.keys["alice"]
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {key}"}
    assert (
        httpx.post(f"{stack.url}/v1/chat/completions", json=chat, headers=headers).status_code
        == 200
    )
    stats = httpx.get(f"http://127.0.0.1:{port}/stats/prometheus", timeout=5)
    assert stats.status_code == 200
    assert "envoy_cluster_upstream_rq_total" in stats.text  # the dashboard's Envoy panels
    assert 'envoy_cluster_name="tollway_extproc"' in stats.text
    for method, path in (("GET", "/stats"), ("GET", "/config_dump"), ("POST", "/quitquitquit"),
                         ("POST", "/stats/prometheus"), ("GET", "/clusters")):  # fmt: skip
        assert httpx.request(method, f"http://127.0.0.1:{port}{path}", timeout=5).status_code == 404
    # Envoy still runs: the admin was never reached.
    assert (
        httpx.post(f"{stack.url}/v1/chat/completions", json=chat, headers=headers).status_code
        == 200
    )


def test_no_stats_listener_unless_asked() -> None:
    listeners = envoyconf.render(Config())["static_resources"]["listeners"]
    assert [listener["name"] for listener in listeners] == ["front_door"]
