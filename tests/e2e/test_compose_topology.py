"""compose.yaml's topology as local processes, from the same deploy/ files compose mounts.

redis-server, the demo upstream, two `tollway serve` replicas and the real Envoy run
from deploy/tollway.yaml. What compose's network provides is mapped to loopback, and
only that, with TOLLWAY__* variables (the config's own override mechanism): each
service's name becomes 127.0.0.1 and its port a free one. Envoy's config is what
compose's envoy-config service runs (`tollway render-envoy`), with one edit: the
Tollway cluster lists the two replicas' ports, as compose's DNS lists their addresses.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from extproc import envoyconf, up
from tests.redis_server import RedisServer
from tests.tollway_up import eventually, tollway

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEPLOY_CONFIG = ROOT / "deploy/tollway.yaml"
DEMO_PROVIDER_KEY = "sk-demo-provider-key"  # compose's default for the three keys
RPM = 8


@dataclass
class Topology:
    url: str
    metrics: list[str]  # each replica's metrics port, as Prometheus scrapes it
    env: dict[str, str]  # the loopback mapping every process got
    key: str  # made as compose's README says (`docker compose run --rm tollway keys create`)


def _loopback(workdir: Path, redis: RedisServer, demo_port: int) -> dict[str, str]:
    """compose's names and ports, as loopback and free ports: nothing else changes."""
    demo = f"http://127.0.0.1:{demo_port}"
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOLLWAY__")},
        "TOLLWAY_CONFIG": str(DEPLOY_CONFIG),
        "OPENAI_API_KEY": DEMO_PROVIDER_KEY,
        "ANTHROPIC_API_KEY": DEMO_PROVIDER_KEY,
        "GEMINI_API_KEY": DEMO_PROVIDER_KEY,
        "TOLLWAY__SERVER__ADDRESS": "127.0.0.1",
        "TOLLWAY__METRICS__ADDRESS": "127.0.0.1",
        "TOLLWAY__AUTH__KEYS_FILE": str(workdir / "keys.yaml"),  # the tollway-keys volume
        "TOLLWAY__STORE__REDIS__URL": redis.url,  # redis://redis:6379/0
        "TOLLWAY__STORE__REDIS__TIMEOUT_MS": "250",  # a loaded 2-core machine (see NOTES)
        "TOLLWAY__ENVOY__ADDRESS": "127.0.0.1",
        "TOLLWAY__ENVOY__PORT": str(up.free_port()),
        "TOLLWAY__ENVOY__ADMIN_ADDRESS": "127.0.0.1",
        "TOLLWAY__ENVOY__ADMIN_PORT": str(up.free_port()),
        "TOLLWAY__ENVOY__EXTPROC_HOST": "127.0.0.1",  # the tollway service name
        "TOLLWAY__UPSTREAMS__OPENAI__URL": demo,  # http://demo:8081
        "TOLLWAY__UPSTREAMS__ANTHROPIC__URL": demo,
        "TOLLWAY__UPSTREAMS__GEMINI__URL": demo,
    }


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory, redis: RedisServer) -> Iterator[Topology]:
    workdir = tmp_path_factory.mktemp("compose")
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        demo_port = up.free_port()
        demo_cmd = compose["demo"]["command"]
        demo_args = [demo_cmd[0], "--port", str(demo_port), *demo_cmd[-2:]]  # --provider-key
        env = _loopback(workdir, redis, demo_port)
        create = ("keys", "create", "--name", "compose", "--rpm", str(RPM))
        key = tollway(*create, env=env, check=True).stdout.strip()
        procs.append(
            up.spawn([sys.executable, "-m", "extproc", *demo_args], env, workdir / "demo.log")
        )
        replicas = compose["tollway"]["deploy"]["replicas"]
        ports = [(up.free_port(), up.free_port()) for _ in range(replicas)]
        for i, (grpc_port, metrics_port) in enumerate(ports):
            replica_env = {
                **env,
                "TOLLWAY__SERVER__PORT": str(grpc_port),
                "TOLLWAY__METRICS__PORT": str(metrics_port),
            }
            serve = [sys.executable, "-m", "extproc", *compose["tollway"]["command"]]
            procs.append(up.spawn(serve, replica_env, workdir / f"tollway-{i + 1}.log"))
        # compose's envoy-config service, then the one edit DNS makes there.
        render = compose["envoy-config"]["command"]
        envoy_file = workdir / "envoy.yaml"
        tollway(render[0], "--output", str(envoy_file), env=env, check=True)
        rendered = yaml.safe_load(envoy_file.read_text())
        (cluster,) = [
            c
            for c in rendered["static_resources"]["clusters"]
            if c["name"] == envoyconf.EXTPROC_CLUSTER
        ]
        (endpoints,) = cluster["load_assignment"]["endpoints"]
        (only,) = endpoints["lb_endpoints"]
        assert only["endpoint"]["address"]["socket_address"]["address"] == "127.0.0.1"
        endpoints["lb_endpoints"] = [
            {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": p}}}}
            for p, _ in ports
        ]
        envoy_file.write_text(yaml.safe_dump(rendered, sort_keys=False))
        envoy_cmd = compose["envoy"]["command"]
        flags = envoy_cmd[envoy_cmd.index("-c") + 2 :]  # --concurrency, --file-flush-interval
        argv = [up.envoy_binary(), "-c", str(envoy_file), *flags, "--use-dynamic-base-id"]
        procs.append(up.spawn(argv, env, workdir / "envoy.log"))
        admin = int(env["TOLLWAY__ENVOY__ADMIN_PORT"])
        up.wait_until(lambda: up.extproc_healthy(admin), 60, "both replicas healthy", procs)
        yield Topology(
            f"http://127.0.0.1:{env['TOLLWAY__ENVOY__PORT']}",
            [f"http://127.0.0.1:{m}" for _, m in ports],
            env,
            key,
        )
    finally:
        up.stop_all(list(reversed(procs)))


def _streams(metrics_url: str) -> float:
    with urllib.request.urlopen(f"{metrics_url}/metrics", timeout=5) as response:
        text = response.read().decode()
    (line,) = [x for x in text.splitlines() if x.startswith("tollway_extproc_streams_total ")]
    return float(line.split()[1])


def _ready(metrics_url: str) -> int:
    with urllib.request.urlopen(f"{metrics_url}/readyz", timeout=5) as response:
        return int(response.status)


def test_two_replicas_from_the_compose_files_share_one_count_in_redis(topology: Topology) -> None:
    for metrics in topology.metrics:  # Redis is configured: readiness asked it
        assert _ready(metrics) == 200
    # Envoy's workers may route to one replica for a second or two after both pass
    # their health checks: wait (with keyless requests, which no limit counts) until
    # both take streams, so the count below is shared, not the first replica's alone.
    start = [_streams(m) for m in topology.metrics]

    def both_serve() -> bool:
        httpx.get(f"{topology.url}/v1/models", timeout=5)  # a 401 from either replica
        return all(_streams(m) > s for m, s in zip(topology.metrics, start, strict=True))

    eventually(both_serve, 20, "both replicas taking streams")
    before = [_streams(m) for m in topology.metrics]
    client = openai.OpenAI(base_url=f"{topology.url}/v1", api_key=topology.key, max_retries=0)
    allowed = limited = 0
    for _ in range(3 * RPM):
        try:
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "Hi"}], timeout=10
            )
        except openai.RateLimitError:
            limited += 1
        else:
            assert reply.choices[0].message.content
            allowed += 1
    # Each replica counting on its own would let up to twice the limit through.
    assert (allowed, limited) == (RPM, 2 * RPM)
    served = [_streams(m) - b for m, b in zip(topology.metrics, before, strict=True)]
    assert all(n > 0 for n in served), served  # both replicas took requests
