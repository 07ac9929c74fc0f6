"""Render the front-door Envoy config from Tollway's config: one source of truth.

`tollway up` renders it for local processes; `envoy/envoy.yaml` is the same
rendering for compose (`tollway render-envoy --profile compose`), and a test
keeps the committed file in sync.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import Any

import yaml

from .codec import CERT_ATTRIBUTES, JWT_NAMESPACE
from .config import CREDENTIAL_HEADERS, Config, ConfigError, EnvoyConfig, TLSFiles, Upstream
from .error_shapes import error_document
from .identities import failed_key
from .kinds import Dialect
from .routes import (
    ANTHROPIC_HEADER,
    GEMINI_KEY_HEADER,
    GEMINI_KEY_PARAM,
    GEMINI_PATH,
    RouteTable,
    Signature,
    route_dialect,
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
    "path": "%REQ_WITHOUT_QUERY(X-ENVOY-ORIGINAL-PATH?:PATH)%",
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
    # Only when the response reports them (null otherwise):
    **{
        field: f"%DYNAMIC_METADATA(tollway:{field})%"
        for field in (
            "cache_creation_1h_tokens",
            "cached_audio_tokens",
            "cached_image_tokens",
            "input_audio_tokens",
            "input_image_tokens",
            "input_video_tokens",
            "output_audio_tokens",
            "output_image_tokens",
            "other_input_tokens",
            "other_output_tokens",
            "service_tier",
            "unpriced_tokens",
        )
    },
    "cost_usd": "%DYNAMIC_METADATA(tollway:cost_usd)%",
    "usage_estimated": "%DYNAMIC_METADATA(tollway:usage_estimated)%",
}


def error_body(
    status: int, code: str, message: str, type_: str, dialect: Dialect = "openai"
) -> dict[str, Any]:
    """The body of an error the front door itself answers, in the route's provider shape."""
    return {
        "json_format": error_document(dialect, status, type_, code, message),
        "content_type": "application/json",
    }


def _status_is(op: str, status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {"op": op, "value": {"default_value": status, "runtime_key": "unused"}}
        }
    }


def _mapper(
    filter_: dict[str, Any],
    status: int,
    code: str,
    message: str,
    type_: str,
    *,
    rewrite: int = 0,
    dialect: Dialect = "openai",
) -> dict[str, Any]:
    mapper: dict[str, Any] = {
        "filter": filter_,
        "body_format_override": error_body(status, code, message, type_, dialect),
    }
    if rewrite:
        mapper["status_code"] = rewrite
    return mapper


# Envoy's own answers, by status: (status, code, message, type).
ENVOY_ERRORS: tuple[tuple[int, str, str, str], ...] = (
    (400, "bad_request", "The request is malformed.", "invalid_request_error"),
    (403, "upgrade_not_supported", "Protocol upgrades are not supported.", "invalid_request_error"),
    (404, "unknown_url", "Unknown request URL.", "invalid_request_error"),
    (408, "request_timeout", "The request was not received in time.", "invalid_request_error"),
    (413, "request_too_large", "Request body too large.", "invalid_request_error"),
    (426, "upgrade_required", "HTTP/1.1 or HTTP/2 is required.", "invalid_request_error"),
    (
        431,
        "request_header_fields_too_large",
        "Request headers too large or too many.",
        "invalid_request_error",
    ),
    (500, "gateway_error", "The gateway failed to process this request.", "api_error"),
    (501, "not_implemented", "The gateway does not support this request.", "invalid_request_error"),
    (502, "upstream_error", "The upstream failed to answer.", "api_error"),
    (503, "service_unavailable", "The gateway or the upstream is unavailable.", "api_error"),
    (504, "upstream_error", "The upstream failed to answer.", "api_error"),
)

_UNAVAILABLE = ENVOY_ERRORS[-2]
# Envoy's ext_proc filter answers 504 when Tollway does not answer a message in time.
EXTPROC_TIMEOUT_DETAILS = "ext_proc_error_per-message_timeout_exceeded"


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": f"{_T}extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression,
            },
        }
    }


def _details_are(details: str) -> dict[str, Any]:
    """The reply's %RESPONSE_CODE_DETAILS% (a CEL filter: no built-in filter reads it)."""
    return _cel(f"response.code_details == '{details}'")


def _both(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    return first if second is None else {"and_filter": {"filters": [first, second]}}


def _local_reply_config(config: Config) -> dict[str, Any]:
    """Every answer Envoy makes itself is a JSON error; Tollway's own answers pass unchanged.

    Tollway's ImmediateResponses are local replies too (mappers would rewrite
    them), and each one sets dynamic metadata ``tollway.denied``; so are
    routes' direct responses (details ``direct_response``). The first mapper
    matches both and changes nothing. A Tollway that does not answer in time
    is a 503 (fail closed), not the upstream's 504. Real upstream answers are
    not local replies and are never rewritten.
    """
    tollway_answered = {
        "metadata_filter": {
            "matcher": {
                "filter": "tollway",
                "path": [{"key": "denied"}],
                "value": {"present_match": True},
            },
            "match_if_key_not_found": False,  # default true: would match every reply
        }
    }
    # A route's direct_response (the 404 for an unknown URL) is an answer written on purpose.
    configured = _details_are("direct_response")
    mappers: list[dict[str, Any]] = [
        {"filter": {"or_filter": {"filters": [tollway_answered, configured]}}}
    ]
    # In the shape of the provider whose route the request took (Envoy's route
    # names are the upstreams'); before any route (a malformed request), OpenAI's.
    names: dict[Dialect, list[str]] = {}
    for name, upstream in config.upstreams.items():
        names.setdefault(route_dialect(upstream.api), []).append(name)
    for dialect in ("anthropic", "gemini", "openai"):
        if dialect == "openai":
            on_route = None
        elif dialect in names:
            listed = ", ".join(f"'{n}'" for n in names[dialect])
            on_route = _cel(f"xds.route_name in [{listed}]")
        else:
            continue
        status, code, message, type_ = _UNAVAILABLE
        mappers.append(
            _mapper(
                _both(_details_are(EXTPROC_TIMEOUT_DETAILS), on_route),
                status,
                code,
                message,
                type_,
                rewrite=status,
                dialect=dialect,
            )
        )
        mappers += [
            _mapper(_both(_status_is("EQ", s), on_route), s, c, m, t, dialect=dialect)
            for s, c, m, t in ENVOY_ERRORS
        ]
        # Anything else Envoy refuses (405, 411, 414, 501, ...): still a JSON error.
        client_error = {"and_filter": {"filters": [_status_is("GE", 400), _status_is("LE", 499)]}}
        mappers.append(
            _mapper(
                _both(client_error, on_route),
                400,
                "request_refused",
                "The gateway refused this request.",
                "invalid_request_error",
                dialect=dialect,
            )
        )
        mappers.append(
            _mapper(
                _both(_status_is("GE", 500), on_route),
                500,
                "gateway_error",
                "The gateway failed to process this request.",
                "api_error",
                dialect=dialect,
            )
        )
    return {"mappers": mappers}


def _downstream_tls(files: TLSFiles, required: bool = True) -> dict[str, Any]:
    """Clients to Envoy; with client_ca_file, clients must present a certificate."""
    common: dict[str, Any] = {
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(files.cert_file)},
                "private_key": {"filename": str(files.key_file)},
            }
        ],
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
    }
    if files.client_ca_file is not None:
        common["validation_context"] = {"trusted_ca": {"filename": str(files.client_ca_file)}}
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_T}extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": common,
            "require_client_certificate": required and files.client_ca_file is not None,
        },
    }


def _endpoints(name: str, host: str, ports: Sequence[int]) -> dict[str, Any]:
    address = [{"socket_address": {"address": host, "port_value": port}} for port in ports]
    return {
        "cluster_name": name,
        "endpoints": [{"lb_endpoints": [{"endpoint": {"address": a}} for a in address]}],
    }


def replica_ports(config: Config) -> list[int]:
    """Where the ``server.replicas`` processes listen when nothing chose otherwise."""
    return [config.server.port + i for i in range(config.server.replicas)]


def _extproc_cluster(config: Config, ports: Sequence[int]) -> dict[str, Any]:
    host = config.envoy.extproc_host or config.server.address
    cluster: dict[str, Any] = {
        "name": EXTPROC_CLUSTER,
        "type": "STRICT_DNS",  # every replica behind one name (compose, k8s headless service)
        "connect_timeout": "1s",
        "load_assignment": _endpoints(EXTPROC_CLUSTER, host, ports),
        # Each request is one gRPC stream, picked per stream; streams last from one message
        # (auth only) to a whole SSE response: the replica with fewer open streams of two.
        "lb_policy": "LEAST_REQUEST",
        # A replica that cannot be reached (killed, restarting) is taken out at once, before
        # its next health check: fewer open streams makes it the least-request choice.
        "outlier_detection": _EJECT_UNREACHABLE,
        # Streams that could not reach a replica are retried on another (see _RETRY); more
        # of them at once than Envoy's default of 3 when a replica dies under load.
        "circuit_breakers": {"thresholds": [{"max_retries": 1000}]},
        # No healthy replica means no healthy replica: fail closed at once (503) instead of
        # Envoy's panic mode sending every request to the unhealthy ones anyway.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
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
        # A replica that stops answering (hung, stopped, overloaded) is ejected after one
        # missed check: within interval + timeout, ~2 s.
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


# Eject a replica after 3 failures to reach it in a row (connect refused, connection reset);
# a passing health check (every second) brings it back. Its answers never eject it.
_EJECT_UNREACHABLE: dict[str, Any] = {
    "split_external_local_origin_errors": True,
    "consecutive_local_origin_failure": 3,
    "enforcing_consecutive_local_origin_failure": 100,
    "enforcing_local_origin_success_rate": 0,
    "enforcing_consecutive_5xx": 0,
    "enforcing_success_rate": 0,
    "interval": "1s",
    "base_ejection_time": "1s",
    "max_ejection_time": "10s",
    "max_ejection_percent": 100,
}


# A stream that never reached a replica (connect refused, HTTP/2 REFUSED_STREAM: Tollway
# saw nothing of it) goes to another one; anything later could have been processed.
_RETRY: dict[str, Any] = {
    "retry_on": "connect-failure,refused-stream",
    "num_retries": 2,
    "retry_back_off": {"base_interval": "0.01s", "max_interval": "0.05s"},
    "retry_host_predicate": [
        {
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {
                "@type": f"{_T}extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
            },
        }
    ],
    "host_selection_retry_max_attempts": 3,
}


def _extproc_tls(config: Config, host: str) -> dict[str, Any]:
    """Envoy verifies Tollway's certificate and, for mTLS, presents its own."""
    client = config.envoy.extproc_client_tls
    if client is None:
        raise ConfigError("envoy.extproc_client_tls (at least ca_file) is required with server.tls")
    name = client.server_name or host
    san_type = "IP_ADDRESS" if _is_ip(name) else "DNS"
    common: dict[str, Any] = {
        "alpn_protocols": ["h2"],
        "tls_params": {  # (Tollway's port accepts TLS 1.3 only)
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
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
    return _dns_cluster(f"upstream_{name}", upstream)


def _dns_cluster(name: str, upstream: Upstream) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "5s",
        "load_assignment": _endpoints(name, upstream.host, [upstream.port]),
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


# The provider's own rate-limit headers, filled from what the limits stage found at
# request time (dynamic metadata): no response-headers message needed. A value
# Tollway did not set adds nothing, and leaves the upstream's header alone.
_RATE_HEADERS: dict[str, tuple[tuple[str, str], ...]] = {
    "openai": tuple(
        (f"x-ratelimit-{field}-{kind}", f"ratelimit_{field}_{kind}")
        for kind in ("requests", "tokens")
        for field in ("limit", "remaining", "reset")
    ),
    "anthropic": tuple(
        (f"anthropic-ratelimit-{kind}-{field}", f"ratelimit_{field}_{kind}")
        for kind in ("requests", "tokens")
        for field in ("limit", "remaining", "reset")
    ),
}


def _rate_headers(dialect: Dialect) -> list[dict[str, Any]]:
    return [
        {
            "header": {"key": header, "value": f"%DYNAMIC_METADATA(tollway:{key})%"},
            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
        }
        for header, key in _RATE_HEADERS.get(dialect, ())
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
        rate_headers = _rate_headers(route_dialect(rule.route.api))
        for match in _matches(rule.prefix, rule.signature):
            entry: dict[str, Any] = {
                "name": rule.route.name,
                "match": match,
                "route": action,
                # ext_proc would see gzip bytes otherwise (and a decompressor behind it hangs).
                "request_headers_to_remove": ["accept-encoding"],
            }
            if rate_headers:
                entry["response_headers_to_add"] = rate_headers
            routes.append(entry)
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


def _jwks_cluster(provider: str) -> str:
    return f"jwks_{provider}"


def _jwt_authn(config: Config) -> dict[str, Any]:
    """Envoy verifies JWTs (signature, issuer, audience, times) and hands the claims,
    or why they failed, to Tollway as metadata. A request without a token, or with a
    Tollway key instead, passes: Tollway decides per route what it needs."""
    providers: dict[str, Any] = {}
    for name, jwt in config.identity.jwt.items():
        provider: dict[str, Any] = {
            "issuer": jwt.issuer,
            "audiences": list(jwt.audiences),
            "clock_skew_seconds": jwt.clock_skew_s,
            # Where SDKs put what they are given as an API key: a JWT may come in any.
            "from_headers": [
                {"name": h, "value_prefix": "Bearer " if h == "authorization" else ""}
                for h in CREDENTIAL_HEADERS
            ],
            "from_params": [],  # (not ?access_token=: URLs end up in logs)
            "forward": False,  # the IdP's token does not go to the model provider
            "payload_in_metadata": name,
            "failed_status_in_metadata": failed_key(name),
        }
        if jwt.jwks_file is not None:
            provider["local_jwks"] = {"filename": str(jwt.jwks_file)}
        else:
            provider["remote_jwks"] = {
                "http_uri": {
                    "uri": jwt.jwks_uri,
                    "cluster": _jwks_cluster(name),
                    "timeout": "5s",
                },
                "cache_duration": f"{jwt.jwks_cache_s}s",
                "async_fetch": {},  # fetched at start and on expiry, not by a request
                "retry_policy": {"num_retries": 3},
            }
        providers[name] = provider
    anyone = [{"provider_name": name} for name in providers]
    return {
        "name": JWT_NAMESPACE,
        "typed_config": {
            "@type": f"{_T}extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": providers,
            "rules": [
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {"requirements": [*anyone, {"allow_missing_or_failed": {}}]}
                    },
                }
            ],
        },
    }


def _jwks_clusters(config: Config) -> list[dict[str, Any]]:
    """Where Envoy fetches each remote JWKS from (over TLS for https://)."""
    return [
        _dns_cluster(_jwks_cluster(name), Upstream(url=jwt.jwks_uri))
        for name, jwt in config.identity.jwt.items()
        if jwt.jwks_uri is not None
    ]


def _http_filters(config: Config) -> list[dict[str, Any]]:
    metadata: dict[str, Any] = {"receiving_namespaces": {"untyped": ["tollway"]}}
    if config.identity.jwt:
        metadata["forwarding_namespaces"] = {"untyped": [JWT_NAMESPACE]}
    # (Envoy's request id is its x-request-id header already: no attribute for it)
    attributes = ["source.address"]
    if config.identity.certs:
        attributes += CERT_ATTRIBUTES
    return [
        *([_jwt_authn(config)] if config.identity.jwt else []),
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
                    "retry_policy": _RETRY,
                },
                "failure_mode_allow": False,  # fail closed: no Tollway, no traffic
                "status_on_error": {"code": 503},
                # A stalled Tollway costs a request this long (then 503), not more.
                "message_timeout": f"{config.envoy.extproc_message_timeout_s:g}s",
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
                "metadata_options": metadata,
                # With the request headers: the audit log's client address (and a
                # client certificate's names, with identity.certs).
                "request_attributes": attributes,
            },
        },
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": f"{_T}extensions.filters.http.router.v3.Router"},
        },
    ]


STATS_PATH = "/stats/prometheus"
_ADMIN_CLUSTER = "envoy_admin"


def _stats_listener(envoy: EnvoyConfig, port: int) -> dict[str, Any]:
    """Envoy's own /stats/prometheus, read from its admin interface on loopback: every
    other path (and every other admin endpoint: /quitquitquit, /config_dump) is a 404."""
    not_found = {"status": 404, "body": {"inline_string": "not found\n"}}
    hcm = {
        "@type": f"{_T}extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "stats",
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {"@type": f"{_T}extensions.filters.http.router.v3.Router"},
            }
        ],
        "route_config": {
            "name": "stats",
            "virtual_hosts": [
                {
                    "name": "stats",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"path": STATS_PATH, "headers": [_method_is("GET")]},
                            "route": {"cluster": _ADMIN_CLUSTER, "timeout": "5s"},
                        },
                        {"match": {"prefix": "/"}, "direct_response": not_found},
                    ],
                }
            ],
        },
    }
    return {
        "name": "stats",
        "address": {"socket_address": {"address": envoy.address, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                          "typed_config": hcm}]}
        ],
    }  # fmt: skip


def _method_is(method: str) -> dict[str, Any]:
    return {"name": ":method", "string_match": {"exact": method}}


def _admin_cluster(envoy: EnvoyConfig) -> dict[str, Any]:
    host = envoy.admin_address if envoy.admin_address not in ("0.0.0.0", "::") else "127.0.0.1"
    return {
        "name": _ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": _endpoints(_ADMIN_CLUSTER, host, [envoy.admin_port]),
    }


def render(config: Config, extproc_ports: Sequence[int] | None = None) -> dict[str, Any]:
    """Envoy's config; its Tollway cluster lists ``extproc_ports`` (default: replica_ports)."""
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
        # Explicit, because Tollway reads the same numbers: Envoy checks the headers after
        # ext_proc's edits against these limits too (see headroom.py).
        "common_http_protocol_options": {"max_headers_count": envoy.max_request_headers},
        "max_request_headers_kb": envoy.max_request_headers_kb,
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
        "local_reply_config": _local_reply_config(config),
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
        # With identity.certs a certificate is one way in among others: asked for and
        # checked when sent, not required.
        required = not config.identity.certs
        chain["transport_socket"] = _downstream_tls(envoy.tls, required)
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
                },
                *([_stats_listener(envoy, envoy.stats_port)] if envoy.stats_port else []),
            ],
            "clusters": [
                _extproc_cluster(config, extproc_ports or replica_ports(config)),
                *(_upstream_cluster(name, up) for name, up in config.upstreams.items()),
                *_jwks_clusters(config),
                *([_admin_cluster(envoy)] if envoy.stats_port else []),
            ],
        },
    }


def render_yaml(
    config: Config, header: str = "", extproc_ports: Sequence[int] | None = None
) -> str:
    rendered = render(config, extproc_ports)
    return header + yaml.safe_dump(rendered, sort_keys=False, default_flow_style=False)
