"""Render the front-door Envoy config from Tollway's config: one source of truth.

`tollway up` renders it for local processes; `envoy/envoy.yaml` is the same
rendering for compose (`tollway render-envoy --profile compose`), and a test
keeps the committed file in sync.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import yaml

from .config import Config, ConfigError, TLSFiles, Upstream
from .error_shapes import error_document
from .routes import (
    ANTHROPIC_HEADER,
    GEMINI_KEY_HEADER,
    GEMINI_KEY_PARAM,
    GEMINI_PATH,
    Dialect,
    RouteTable,
    Signature,
)

EXTPROC_CLUSTER = "tollway_extproc"
SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
SYSTEM_CA = "/etc/ssl/certs/ca-certificates.crt"

_T = "type.googleapis.com/envoy."

# Fields of Envoy's JSON access log; no query strings (Gemini keys may ride in
# `?key=`), no headers that could carry credentials.
ACCESS_LOG_FORMAT: dict[str, str] = {
    "time": "%START_TIME%",
    "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(:METHOD)%",
    "path": "%REQ_WITHOUT_QUERY(:PATH)%",
    "protocol": "%PROTOCOL%",
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "upstream": "%UPSTREAM_CLUSTER%",
    "upstream_ms": "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%",
    "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
    "user_agent": "%REQ(USER-AGENT)%",
    "route": "%DYNAMIC_METADATA(tollway:route)%",
    "auth": "%DYNAMIC_METADATA(tollway:auth)%",
    "key_id": "%DYNAMIC_METADATA(tollway:key_id)%",
    "key_name": "%DYNAMIC_METADATA(tollway:key_name)%",
    "tenant": "%DYNAMIC_METADATA(tollway:tenant)%",
    "denied": "%DYNAMIC_METADATA(tollway:denied)%",
    "request_model": "%DYNAMIC_METADATA(tollway:request_model)%",
    "model": "%DYNAMIC_METADATA(tollway:model)%",
    "input_tokens": "%DYNAMIC_METADATA(tollway:input_tokens)%",
    "output_tokens": "%DYNAMIC_METADATA(tollway:output_tokens)%",
    "cached_input_tokens": "%DYNAMIC_METADATA(tollway:cached_input_tokens)%",
    "cache_creation_tokens": "%DYNAMIC_METADATA(tollway:cache_creation_tokens)%",
    "reasoning_tokens": "%DYNAMIC_METADATA(tollway:reasoning_tokens)%",
    "cost_usd": "%DYNAMIC_METADATA(tollway:cost_usd)%",
    "usage_estimated": "%DYNAMIC_METADATA(tollway:usage_estimated)%",
}


def _error_json(message: str, type_: str, code: str) -> dict[str, Any]:
    return {
        "json_format": {"error": {"message": message, "type": type_, "code": code}},
        "content_type": "application/json",
    }


def _status_mapper(codes: tuple[int, ...], message: str, type_: str, code: str) -> dict[str, Any]:
    """Envoy's own error replies (Tollway never sends these codes) as OpenAI-style JSON."""
    filters = [
        {
            "status_code_filter": {
                "comparison": {"op": "EQ", "value": {"default_value": c, "runtime_key": "unused"}}
            }
        }
        for c in codes
    ]
    return {
        "filter": filters[0] if len(filters) == 1 else {"or_filter": {"filters": filters}},
        "body_format_override": _error_json(message, type_, code),
    }


def _downstream_tls(files: TLSFiles) -> dict[str, Any]:
    """Clients to Envoy; with client_ca_file, clients must present a certificate."""
    common: dict[str, Any] = {
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(files.cert_file)},
                "private_key": {"filename": str(files.key_file)},
            }
        ],
        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
    }
    if files.client_ca_file is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(files.client_ca_file)}}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_T}extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": common,
            "require_client_certificate": files.client_ca_file is not None,
        },
    }


def _endpoint(name: str, host: str, port: int) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {
                "lb_endpoints": [
                    {
                        "endpoint": {
                            "address": {"socket_address": {"address": host, "port_value": port}}
                        }
                    }
                ]
            }
        ],
    }


def _extproc_cluster(config: Config) -> dict[str, Any]:
    host = config.envoy.extproc_host or config.server.address
    cluster: dict[str, Any] = {
        "name": EXTPROC_CLUSTER,
        "type": "STRICT_DNS",  # every replica behind one name (compose, k8s headless service)
        "connect_timeout": "1s",
        "load_assignment": _endpoint(EXTPROC_CLUSTER, host, config.server.port),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": f"{_T}extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                    }
                },
            }
        },
        "health_checks": [
            {
                "timeout": "1s",
                "interval": "1s",
                "no_traffic_interval": "1s",
                "unhealthy_threshold": 1,
                "healthy_threshold": 1,
                "grpc_health_check": {"service_name": SERVICE_NAME},
            }
        ],
    }
    if config.server.tls is not None:
        cluster["transport_socket"] = _extproc_tls(config, host)
    return cluster


def _extproc_tls(config: Config, host: str) -> dict[str, Any]:
    """Envoy verifies Tollway's certificate and, for mTLS, presents its own."""
    client = config.envoy.extproc_client_tls
    if client is None:
        raise ConfigError("envoy.extproc_client_tls (at least ca_file) is required with server.tls")
    name = client.server_name or host
    san_type = "IP_ADDRESS" if _is_ip(name) else "DNS"
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "tls_params": {"tls_maximum_protocol_version": "TLSv1_3"},
        "validation_context": {
            "trusted_ca": {"filename": str(client.ca_file)},
            "match_typed_subject_alt_names": [{"san_type": san_type, "matcher": {"exact": name}}],
        },
    }
    if client.cert_file is not None and client.key_file is not None:
        common["tls_certificates"] = [
            {
                "certificate_chain": {"filename": str(client.cert_file)},
                "private_key": {"filename": str(client.key_file)},
            }
        ]
    context: dict[str, Any] = {
        "@type": f"{_T}extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": common,
    }
    if san_type == "DNS":
        context["sni"] = name
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _upstream_cluster(name: str, upstream: Upstream) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": f"upstream_{name}",
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": _endpoint(f"upstream_{name}", upstream.host, upstream.port),
    }
    if upstream.tls:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_T}extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": upstream.host,
                "common_tls_context": {
                    "validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": upstream.host}}
                        ],
                    }
                },
            },
        }
    return cluster


def _matches(prefix: str, signature: Signature | None) -> list[dict[str, Any]]:
    """Envoy route matches for one rule of the table: the same test routes.py makes."""
    if signature is None:
        return [{"prefix": prefix}]
    if signature == "anthropic":
        return [{"prefix": prefix, "headers": [{"name": ANTHROPIC_HEADER, "present_match": True}]}]
    # :path carries the query string; routes.py matches the path without it.
    path = {"safe_regex": {"regex": GEMINI_PATH + r"(?:\?.*)?"}}
    return [
        {"prefix": prefix, "headers": [{"name": ":path", "string_match": path}]},
        {"prefix": prefix, "headers": [{"name": GEMINI_KEY_HEADER, "present_match": True}]},
        {"prefix": prefix, "query_parameters": [{"name": GEMINI_KEY_PARAM, "present_match": True}]},
    ]


def _routes(config: Config) -> list[dict[str, Any]]:
    disabled = {
        "envoy.filters.http.ext_proc": {
            "@type": f"{_T}extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "disabled": True,
        }
    }
    routes: list[dict[str, Any]] = [
        {
            "name": "healthz",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
            "typed_per_filter_config": disabled,
        }
    ]
    for rule in RouteTable(config.upstreams).rules:
        upstream = rule.route.upstream
        action: dict[str, Any] = {
            "cluster": f"upstream_{rule.route.name}",
            "timeout": f"{upstream.timeout_s:g}s",
            "auto_host_rewrite": True,
        }
        if rule.strip:  # a mount: /anthropic/v1/messages goes up as /v1/messages
            action["prefix_rewrite"] = upstream.base_path + "/"
        elif upstream.base_path:
            action["prefix_rewrite"] = upstream.base_path + rule.prefix
        for match in _matches(rule.prefix, rule.signature):
            routes.append(
                {
                    "name": rule.route.name,
                    "match": match,
                    "route": action,
                    # ext_proc would see gzip bytes otherwise (and a decompressor behind it hangs).
                    "request_headers_to_remove": ["accept-encoding"],
                }
            )
    # No provider matched: a 404 in the shape of what the request seems to speak.
    not_found: list[tuple[Signature | None, Dialect]] = [
        ("anthropic", "anthropic"),
        ("gemini", "gemini"),
        (None, "openai"),
    ]
    for signature, dialect in not_found:
        body = error_document(
            dialect, 404, "invalid_request_error", "unknown_url", "Unknown request URL."
        )
        for match in _matches("/", signature):
            routes.append(
                {
                    "name": "not_found",
                    "match": match,
                    "direct_response": {
                        "status": 404,
                        "body": {"inline_string": json.dumps(body)},
                    },
                    "response_headers_to_add": [
                        {
                            "header": {"key": "content-type", "value": "application/json"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                        }
                    ],
                    "typed_per_filter_config": disabled,
                }
            )
    return routes


def _http_filters(config: Config) -> list[dict[str, Any]]:
    return [
        {
            # Before ext_proc: 413 on HTTP/1.1 and HTTP/2 alike.
            "name": "envoy.filters.http.body_size_limit",
            "typed_config": {
                "@type": f"{_T}extensions.filters.http.body_size_limit.v3.BodySizeLimit",
                "max_request_bytes": config.max_body_bytes,
            },
        },
        {
            "name": "envoy.filters.http.ext_proc",
            "typed_config": {
                "@type": f"{_T}extensions.filters.http.ext_proc.v3.ExternalProcessor",
                "grpc_service": {
                    "envoy_grpc": {"cluster_name": EXTPROC_CLUSTER},
                    "timeout": "10s",
                },
                "failure_mode_allow": False,  # fail closed: no Tollway, no traffic
                "status_on_error": {"code": 503},
                "message_timeout": "5s",
                "allow_mode_override": True,
                # The route was chosen on what the client sent; Tollway's edits
                # (credential headers, ?key=) must not send it elsewhere.
                "route_cache_action": "RETAIN",
                # Tollway asks per request for anything beyond request headers.
                "processing_mode": {
                    "request_header_mode": "SEND",
                    "response_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "response_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_trailer_mode": "SKIP",
                },
                "metadata_options": {"receiving_namespaces": {"untyped": ["tollway"]}},
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": f"{_T}extensions.filters.http.router.v3.Router"},
        },
    ]


def render(config: Config) -> dict[str, Any]:
    envoy = config.envoy
    hcm = {
        "@type": f"{_T}extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "front_door",
        "codec_type": "AUTO",
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "use_remote_address": True,
        "stream_idle_timeout": "300s",
        "access_log": [
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": {
                    "@type": f"{_T}extensions.access_loggers.stream.v3.StdoutAccessLog",
                    "log_format": {
                        "json_format": ACCESS_LOG_FORMAT,
                        "formatters": [
                            {
                                "name": "envoy.formatter.req_without_query",
                                "typed_config": {
                                    "@type": f"{_T}extensions.formatter.req_without_query.v3"
                                    ".ReqWithoutQuery"
                                },
                            }
                        ],
                    },
                },
            }
        ],
        "local_reply_config": {
            "mappers": [
                _status_mapper(
                    (413,), "Request body too large.", "invalid_request_error", "request_too_large"
                ),
                _status_mapper(
                    (503,),
                    "The gateway or the upstream is unavailable.",
                    "api_error",
                    "service_unavailable",
                ),
                _status_mapper(
                    (502, 504), "The upstream failed to answer.", "api_error", "upstream_error"
                ),
            ]
        },
        "http_filters": _http_filters(config),
        "route_config": {
            "name": "llm",
            "virtual_hosts": [{"name": "llm", "domains": ["*"], "routes": _routes(config)}],
        },
    }
    chain: dict[str, Any] = {
        "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]
    }
    if envoy.tls is not None:
        chain["transport_socket"] = _downstream_tls(envoy.tls)
    return {
        "admin": {
            "address": {
                "socket_address": {"address": envoy.admin_address, "port_value": envoy.admin_port}
            }
        },
        "static_resources": {
            "listeners": [
                {
                    "name": "front_door",
                    "address": {
                        "socket_address": {"address": envoy.address, "port_value": envoy.port}
                    },
                    # ext_proc buffers a request body in this much memory.
                    "per_connection_buffer_limit_bytes": config.max_body_bytes + 64 * 1024,
                    "filter_chains": [chain],
                }
            ],
            "clusters": [
                _extproc_cluster(config),
                *(_upstream_cluster(name, up) for name, up in config.upstreams.items()),
            ],
        },
    }


def render_yaml(config: Config, header: str = "") -> str:
    return header + yaml.safe_dump(render(config), sort_keys=False, default_flow_style=False)
