"""The rendered front door: local replies, fail-closed settings and header limits (no I/O)."""

from __future__ import annotations

from typing import Any

from extproc import envoyconf
from extproc.config import Config, EnvoyConfig, ServerConfig


def _hcm(config: Config) -> dict[str, Any]:
    listener = envoyconf.render(config)["static_resources"]["listeners"][0]
    return dict(listener["filter_chains"][0]["filters"][0]["typed_config"])


def test_tollways_own_answers_are_matched_first_and_left_alone() -> None:
    first = _hcm(Config())["local_reply_config"]["mappers"][0]
    assert first.keys() == {"filter"}  # no status, body or header override
    tollway, direct_response = first["filter"]["or_filter"]["filters"]
    expression = direct_response["extension_filter"]["typed_config"]["expression"]
    assert expression == "response.code_details == 'direct_response'"
    metadata = tollway["metadata_filter"]
    assert metadata["matcher"]["filter"] == "tollway"
    assert metadata["matcher"]["path"] == [{"key": "denied"}]
    assert metadata["match_if_key_not_found"] is False  # else it matches every reply


def _route_filter(mapper: dict[str, Any]) -> str | None:
    """The CEL route test of a provider-shaped mapper (None: the OpenAI default)."""
    filters = mapper["filter"].get("and_filter", {}).get("filters", [])
    for f in filters:
        expression = f.get("extension_filter", {}).get("typed_config", {}).get("expression", "")
        if expression.startswith("xds.route_name"):
            return str(expression)
    return None


def test_every_envoy_status_has_a_json_body_from_error_body() -> None:
    mappers = _hcm(Config())["local_reply_config"]["mappers"]
    by_status = {}
    for mapper in mappers:
        if _route_filter(mapper) is not None:
            continue
        comparison = mapper["filter"].get("status_code_filter", {}).get("comparison", {})
        if comparison.get("op") == "EQ":
            by_status[comparison["value"]["default_value"]] = mapper["body_format_override"]
    for status, code, message, type_ in envoyconf.ENVOY_ERRORS:
        assert by_status[status] == envoyconf.error_body(status, code, message, type_)
    for mapper in mappers[1:]:
        assert mapper["body_format_override"]["content_type"] == "application/json"


def test_envoys_answers_on_a_providers_route_come_in_its_shape() -> None:
    mappers = _hcm(Config())["local_reply_config"]["mappers"]
    shapes = {}
    for mapper in mappers[1:]:
        route = _route_filter(mapper)
        body = mapper["body_format_override"]["json_format"]
        shapes.setdefault(route, set()).add(frozenset(body) | frozenset(body["error"]))
    assert shapes == {
        "xds.route_name in ['anthropic']": {frozenset({"type", "error", "message"})},
        "xds.route_name in ['gemini']": {
            frozenset({"error", "code", "message", "status", "details"})
        },
        None: {frozenset({"error", "message", "type", "code", "param"})},
    }


def test_a_message_timeout_is_a_503() -> None:
    mappers = _hcm(Config())["local_reply_config"]["mappers"]
    timeouts = [m for m in mappers if m.get("status_code") == 503]
    assert len(timeouts) == 3  # one per provider shape
    timeout = next(m for m in timeouts if _route_filter(m) is None)
    expression = timeout["filter"]["extension_filter"]["typed_config"]["expression"]
    assert envoyconf.EXTPROC_TIMEOUT_DETAILS in expression
    assert timeout["body_format_override"]["json_format"]["error"]["code"] == "service_unavailable"


def test_fail_closed_fast_and_header_limits_come_from_the_config() -> None:
    config = Config(
        envoy=EnvoyConfig(
            max_request_headers=150, max_request_headers_kb=96, extproc_message_timeout_s=1.5
        )
    )
    hcm = _hcm(config)
    assert hcm["common_http_protocol_options"]["max_headers_count"] == 150
    assert hcm["max_request_headers_kb"] == 96
    extproc = hcm["http_filters"][1]["typed_config"]
    assert extproc["message_timeout"] == "1.5s"
    assert extproc["status_on_error"] == {"code": 503}
    cluster = envoyconf.render(config)["static_resources"]["clusters"][0]
    assert cluster["name"] == envoyconf.EXTPROC_CLUSTER
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}


def _extproc_cluster(config: Config, ports: list[int] | None = None) -> dict[str, Any]:
    cluster = envoyconf.render(config, ports)["static_resources"]["clusters"][0]
    assert cluster["name"] == envoyconf.EXTPROC_CLUSTER
    return dict(cluster)


def _ports(cluster: dict[str, Any]) -> list[int]:
    (locality,) = cluster["load_assignment"]["endpoints"]
    addresses = [e["endpoint"]["address"]["socket_address"] for e in locality["lb_endpoints"]]
    assert {a["address"] for a in addresses} == {"127.0.0.1"}
    return [a["port_value"] for a in addresses]


def test_the_tollway_cluster_lists_every_replica() -> None:
    three = Config(server=ServerConfig(port=50051, replicas=3))
    assert _ports(_extproc_cluster(Config())) == [50051]
    assert _ports(_extproc_cluster(three)) == [50051, 50052, 50053]  # port + i by default
    assert _ports(_extproc_cluster(three, [40001, 40007, 40003])) == [40001, 40007, 40003]
    cluster = _extproc_cluster(three)
    # Each health-checked on its own, picked per stream by open streams.
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == (
        envoyconf.SERVICE_NAME
    )
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["common_lb_config"]["healthy_panic_threshold"] == {"value": 0}


def test_only_unreachable_replicas_are_ejected_and_retried_elsewhere() -> None:
    cluster = _extproc_cluster(Config(server=ServerConfig(replicas=2)))
    outlier = cluster["outlier_detection"]
    assert outlier["split_external_local_origin_errors"] is True
    assert outlier["consecutive_local_origin_failure"] == 3
    assert outlier["enforcing_consecutive_5xx"] == outlier["enforcing_success_rate"] == 0
    extproc = _hcm(Config())["http_filters"][1]["typed_config"]
    retry = extproc["grpc_service"]["retry_policy"]
    # Only what Tollway never saw: a retried stream is never processed twice.
    assert retry["retry_on"] == "connect-failure,refused-stream"
    assert [p["name"] for p in retry["retry_host_predicate"]] == [
        "envoy.retry_host_predicates.previous_hosts"
    ]
    assert cluster["circuit_breakers"]["thresholds"][0]["max_retries"] >= 100
