"""`tollway up`'s restart policy, replica ports, banner and demo key, without processes."""

from __future__ import annotations

import socket
from pathlib import Path

from extproc import keys, up
from extproc.config import Config, EnvoyConfig, MetricsConfig, ServerConfig


def test_restart_delays_double_to_30s_and_reset_after_a_minute_of_running() -> None:
    backoff = up.Backoff()
    delays = [backoff.delay(ran_for=1.0) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(ran_for=60.0) == 0.5
    assert backoff.delay(ran_for=59.9) == 1


def test_each_demo_adds_a_fresh_demo_key_and_revokes_the_previous_by_id(tmp_path: Path) -> None:
    file = tmp_path / "tollway-keys.yaml"
    _, other = keys.generate(name="other")
    keys.add(file, other)
    first = up._demo_key(file, up.DEMO_LIMITS)
    second = up._demo_key(file, up.DEMO_LIMITS)
    ring = keys.KeyRing(keys.read_records(file))
    first_record, second_record = ring.find(first), ring.find(second)
    assert first_record is not None and first_record.revoked is not None
    assert second_record is not None and second_record.revoked is None
    assert second_record.name == "demo" and second_record.limits == up.DEMO_LIMITS
    assert [r.revoked for r in keys.read_records(file) if r.id == other.id] == [None]


def _config(server_port: int, metrics_port: int, replicas: int) -> Config:
    return Config(
        server=ServerConfig(port=server_port, replicas=replicas),
        metrics=MetricsConfig(port=metrics_port),
        envoy=EnvoyConfig(port=0, admin_port=0),
    )


def _free_run(length: int) -> int:
    """A port p with p .. p + length - 1 free right now."""
    while True:
        base = up.free_port()
        if base + length <= 65535 and all(
            up.port_is_free("127.0.0.1", base + i) for i in range(length)
        ):
            return base


def test_replica_i_gets_the_configured_ports_plus_i_when_free() -> None:
    base = _free_run(6)
    config, replicas = up._pick_ports(_config(base, base + 3, replicas=3))
    assert [(r.name, r.port, r.metrics_port) for r in replicas] == [
        ("tollway serve #1", base, base + 3),
        ("tollway serve #2", base + 1, base + 4),
        ("tollway serve #3", base + 2, base + 5),
    ]
    assert replicas[1].env() == {
        "TOLLWAY__SERVER__PORT": str(base + 1),
        "TOLLWAY__METRICS__PORT": str(base + 4),
    }
    # The written config is replica #1's; the others differ only by their env overrides.
    assert (config.server.port, config.metrics.port) == (base, base + 3)


def test_taken_replica_ports_become_free_ones_and_none_is_given_twice() -> None:
    base = _free_run(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 1))
        _, replicas = up._pick_ports(_config(base, 0, replicas=2))
    assert replicas[0].port == base and replicas[1].port not in (base, base + 1)
    _, many = up._pick_ports(_config(0, 0, replicas=8))
    ports = [r.port for r in many] + [r.metrics_port for r in many]
    assert len(set(ports)) == 16


def test_one_replica_keeps_its_plain_name_and_metrics_off_means_no_port() -> None:
    config = _config(0, 0, replicas=1)
    off = config.model_copy(update={"metrics": MetricsConfig(enabled=False)})
    _, (replica,) = up._pick_ports(off)
    assert replica.name == up.SERVE and replica.metrics_port is None
    assert replica.env() == {"TOLLWAY__SERVER__PORT": str(replica.port)}


def test_the_banner_names_each_replicas_metrics_endpoint(tmp_path: Path) -> None:
    config, replicas = up._pick_ports(_config(0, 0, replicas=2))
    banner = up._banner(up.Gateway(config, tmp_path, replicas=replicas), tmp_path / "k", None)
    first, second = replicas
    assert (
        f"  metrics     http://127.0.0.1:{first.metrics_port}/metrics"
        f"  (tollway serve #1, ext_proc 127.0.0.1:{first.port})\n"
        f"              http://127.0.0.1:{second.metrics_port}/metrics"
        f"  (tollway serve #2, ext_proc 127.0.0.1:{second.port})\n"
        "  envoy admin"
    ) in banner
    config, replicas = up._pick_ports(_config(0, 0, replicas=1))
    banner = up._banner(up.Gateway(config, tmp_path, replicas=replicas), tmp_path / "k", None)
    assert f"  metrics     http://127.0.0.1:{replicas[0].metrics_port}/metrics\n" in banner
