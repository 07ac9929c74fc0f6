"""The real topology as local processes: demo upstream, Tollway, the Envoy binary.

Every port is free-picked; readiness is polled with deadlines, never slept for.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from extproc import keys, up
from extproc.config import Config, Credential, EnvoyConfig, MetricsConfig, ServerConfig, Upstream
from tests.redis_server import RedisServer, redis_server_binary

from . import leaks

PROVIDER_KEY = "sk-provider-secret-for-tests"
PROVIDER_ENV = "TOLLWAY_TEST_PROVIDER_KEY"


@dataclass
class Stack:
    gateway: up.Gateway
    upstream_url: str
    keys: dict[str, str]  # name -> the key as a client would send it
    keys_file: Path

    @property
    def url(self) -> str:
        return self.gateway.url

    @property
    def tollway(self) -> Any:
        return self.gateway.procs[-2]

    def upstream_requests(self) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"{self.upstream_url}/__demo/requests", timeout=5) as r:
            return list(json.loads(r.read()))

    def clear_upstream_requests(self) -> None:
        req = urllib.request.Request(f"{self.upstream_url}/__demo/requests", method="DELETE")
        urllib.request.urlopen(req, timeout=5).close()

    def scrape(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """Every sample of Tollway's /metrics, read at one instant."""
        port = self.gateway.config.metrics.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        samples = {}
        for line in text.splitlines():
            if line.startswith("#") or not line:
                continue
            metric, _, value = line.rpartition(" ")
            name, _, rest = metric.partition("{")
            pairs = [p.split("=", 1) for p in rest.rstrip("}").split(",") if "=" in p]
            labels = frozenset((k, v.strip('"')) for k, v in pairs)
            samples[(name, labels)] = float(value)
        return samples

    def metric(self, name: str, **labels: str) -> float:
        """A sample from Tollway's /metrics (0 when absent)."""
        return self.scrape().get((name, frozenset(labels.items())), 0.0)

    def access_log(self) -> list[dict[str, Any]]:
        text = (self.gateway.workdir / "envoy.log").read_text()
        complete = text.split("\n")[:-1]  # the last piece may be a line Envoy is still writing
        return [json.loads(line) for line in complete if line.startswith("{")]


def eventually(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until ``check`` returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result or time.monotonic() > deadline:
            assert result, "condition not met in time"
            return result
        time.sleep(0.05)


def _record(name: str, tenant: str = "acme", **extra: Any) -> tuple[str, keys.KeyRecord]:
    return keys.generate(name=name, tenant=tenant, **extra)


def start_stack(
    workdir: Path,
    *,
    drain_delay_s: float = 0.0,
    customize: Callable[[Config], Config] = lambda config: config,
    log_format: str = "text",
) -> Stack:
    """A gateway in front of the demo upstream, with a fixed set of test keys.

    Ports are picked free before the processes bind them, and another process
    (any outgoing connection) may take one in between: a start that fails is
    tried again on new ports, and the failure is printed.
    """
    keys_file = workdir / "keys.yaml"
    made = _make_keys(keys_file)
    leaks.watch(workdir, made)  # the dict: keys tests add later are checked too
    for attempt in (1, 2):
        try:
            return _start(workdir, keys_file, made, drain_delay_s, customize, log_format)
        except Exception as error:
            print(f"start_stack: attempt {attempt} failed, trying new ports: {error!r}")
    return _start(workdir, keys_file, made, drain_delay_s, customize, log_format)


def _make_keys(keys_file: Path) -> dict[str, str]:
    made: dict[str, str] = {}
    now = datetime.now(UTC)
    for name, extra in {
        "alice": {},
        "restricted": {"models": ["gpt-4o-mini", "claude-*", "gemini-2.0-flash"]},
        "revoked": {},
        "expired": {"now": now - timedelta(days=30)},
    }.items():
        key, record = _record(name, **extra)
        if name == "expired":
            record = keys.make_record(
                key_id=record.id,
                name=name,
                tenant="acme",
                digest=record.digest,
                created=record.created,
                expires=now - timedelta(days=1),
            )
        keys.add(keys_file, record)
        made[name] = key
    keys.revoke(keys_file, "revoked")
    return made


def _start(
    workdir: Path,
    keys_file: Path,
    made: dict[str, str],
    drain_delay_s: float,
    customize: Callable[[Config], Config],
    log_format: str,
) -> Stack:
    upstream_port = up.free_port()
    env = {**os.environ, PROVIDER_ENV: PROVIDER_KEY, up.DEMO_KEY_ENV: PROVIDER_KEY}
    demo = up.spawn(
        [
            sys.executable,
            "-m",
            "extproc",
            "demo-upstream",
            "--port",
            str(upstream_port),
            "--provider-key",
            PROVIDER_KEY,
        ],
        env=env,
        log=workdir / "demo.log",
    )
    upstream_url = f"http://127.0.0.1:{upstream_port}"
    config = Config(
        server=ServerConfig(
            port=0, drain_delay_s=drain_delay_s, drain_timeout_s=5, reload_interval_s=0.2
        ),
        metrics=MetricsConfig(port=0),
        envoy=EnvoyConfig(port=0, admin_port=0),
        auth={"keys_file": keys_file},  # type: ignore[arg-type]
        max_body_bytes=10 * 1024 * 1024,
        upstreams={
            # The default routes: OpenAI, Anthropic and Gemini share /v1/, each has a mount.
            **up.demo_upstreams(upstream_url),
            # Its provider key is configured but not there: refused, never sent keyless.
            "keyless": Upstream(
                url=upstream_url,
                api="openai",
                prefixes=("/keyless/",),
                credential=Credential(env="TOLLWAY_TEST_UNSET_PROVIDER_KEY"),
            ),
            # An internal route with auth explicitly off: clients bring their own key.
            "internal": Upstream(
                url=upstream_url, api="openai", prefixes=("/v1/embeddings",), auth=False
            ),
        },
    )
    try:
        gateway = up.start(
            customize(config),
            workdir,
            log_to_files=True,
            env=env,
            timeout=60,
            log_format=log_format,
        )
    except BaseException:
        up.stop_all([demo])
        raise
    gateway.procs.insert(0, demo)
    try:  # started first, but nothing above waited for it
        eventually(lambda: answers(f"{upstream_url}/__demo/requests"), timeout=30)
    except BaseException:
        gateway.stop()
        raise
    return Stack(gateway, upstream_url, made, keys_file)


def answers(url: str) -> bool:
    """A GET of ``url`` gets a 2xx (not refused, not a 503 while starting)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="session", autouse=True)
def no_secret_in_any_log() -> Iterator[None]:
    """After every e2e test and every stack has stopped: no Tollway, Envoy or audit log
    of any stack holds a Tollway key, the provider key or a value a test planted."""
    leaks.plant(PROVIDER_KEY)
    yield
    files = leaks.log_files()
    assert files or not leaks.watched(), "no log found to check"
    found = leaks.findings(files, leaks.secrets())
    assert not found, "secrets in logs:\n" + "\n".join(found)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.gateway.stop()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the module's own: its tests may stop or pause it."""
    assert redis_server_binary(), (
        "redis-server is missing: ./scripts/test installs it (apt-get install redis-server)"
    )
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A private stack for tests that stop or disturb it."""
    s = start_stack(tmp_path, drain_delay_s=3.0)
    yield s
    s.gateway.stop()
