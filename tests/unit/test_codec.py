"""Protobuf in and out: the one module that speaks Envoy's ext_proc messages."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)
from google.protobuf.json_format import MessageToDict
from google.protobuf.struct_pb2 import Struct, Value

from extproc import codec
from extproc.decisions import BodyMode, Deny, Phase, forbidden, unauthorized
from extproc.error_shapes import error_document
from extproc.exchange import Exchange
from extproc.kinds import Dialect

from .factories import bearer, build_pipeline, decide, new_key

OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def http_headers(*pairs: tuple[str, bytes]) -> HttpHeaders:
    """What Envoy sends: every value in raw_value, repeats as separate entries."""
    return HttpHeaders(
        headers=HeaderMap(headers=[HeaderValue(key=k, raw_value=v) for k, v in pairs]),
        end_of_stream=False,
    )


def exchange(
    set_headers: dict[str, str] | None = None,
    remove_headers: set[str] | None = None,
    metadata: dict[str, str | int | float | bool] | None = None,
) -> Exchange:
    ex = Exchange("POST", "/v1/chat/completions", "", {}, frozenset(), None, 0.0)
    ex.set_headers.update(set_headers or {})
    ex.remove_headers.update(remove_headers or set())
    ex.metadata.update(metadata or {})
    return ex


def roundtrip(response: ProcessingResponse) -> ProcessingResponse:
    """What Envoy would receive: serialised and parsed again."""
    return ProcessingResponse.FromString(response.SerializeToString())


def tollway_metadata(response: ProcessingResponse) -> dict[str, object]:
    fields = MessageToDict(response.dynamic_metadata)
    assert set(fields) <= {codec.METADATA_NAMESPACE}
    return dict(fields.get(codec.METADATA_NAMESPACE, {}))


# ---- decode ----------------------------------------------------------------------


def test_decode_headers_joins_repeats_and_names_them() -> None:
    headers, repeated = codec.decode_headers(
        http_headers(
            (":method", b"POST"),
            (":path", b"/v1/chat/completions?x=1"),
            ("authorization", b"Bearer a"),
            ("x-api-key", b"k"),
            ("authorization", b"Bearer b"),
            ("accept", b"*/*"),
            ("authorization", b"Bearer c"),
        )
    )
    assert headers == {
        ":method": "POST",
        ":path": "/v1/chat/completions?x=1",
        "authorization": "Bearer a,Bearer b,Bearer c",
        "x-api-key": "k",
        "accept": "*/*",
    }
    assert repeated == frozenset({"authorization"})


def test_decode_headers_keeps_every_byte_and_reads_value_as_fallback() -> None:
    message = http_headers(("x-name", b"caf\xe9 \xff"), ("x-empty", b""))
    message.headers.headers.add(key="x-legacy", value="from-value-field")
    headers, repeated = codec.decode_headers(message)
    assert headers == {"x-name": "café ÿ", "x-empty": "", "x-legacy": "from-value-field"}
    assert repeated == frozenset()


def test_decoded_repeated_header_is_denied_by_the_pipeline() -> None:
    key, record = new_key()
    headers, repeated = codec.decode_headers(
        http_headers(("authorization", f"Bearer {key}".encode()), ("authorization", b"Bearer x"))
    )
    p = build_pipeline([record])
    decision = p.start("POST", "/v1/chat/completions", headers, repeated).request_headers()
    assert isinstance(decision, Deny) and decision.code == "ambiguous_credentials"


# ---- request headers response -----------------------------------------------------


def test_header_mutation_uses_raw_value_and_overwrite() -> None:
    ex = exchange(
        set_headers={"authorization": "Bearer PK", "x-tollway-tenant": "acmé"},
        remove_headers={"x-api-key", "authorization", "x-tollway-forged"},
    )
    response = roundtrip(codec.request_headers_response(ex, Phase.NONE))
    mutation = response.request_headers.response.header_mutation
    sets = {o.header.key: o for o in mutation.set_headers}
    assert set(sets) == {"authorization", "x-tollway-tenant"}
    assert sets["authorization"].header.raw_value == b"Bearer PK"
    assert sets["x-tollway-tenant"].header.raw_value == "acmé".encode("latin-1")
    for option in sets.values():
        assert option.header.value == ""  # Envoy rejects mutations that set both
        assert option.append_action == OVERWRITE
    # A header both set and removed is only set (removing it would drop the new value).
    assert list(mutation.remove_headers) == ["x-api-key", "x-tollway-forged"]


def test_no_edits_means_no_header_mutation() -> None:
    response = codec.request_headers_response(exchange(), Phase.NONE)
    assert response.HasField("request_headers")
    assert not response.request_headers.response.HasField("header_mutation")
    assert not response.HasField("dynamic_metadata")


@pytest.mark.parametrize(
    ("wants", "request_body", "response_headers", "response_body"),
    [
        (Phase.NONE, ProcessingMode.NONE, ProcessingMode.SKIP, ProcessingMode.NONE),
        (Phase.REQUEST_BODY, ProcessingMode.BUFFERED, ProcessingMode.SKIP, ProcessingMode.NONE),
        (Phase.RESPONSE_HEADERS, ProcessingMode.NONE, ProcessingMode.SEND, ProcessingMode.NONE),
        (Phase.RESPONSE_BODY, ProcessingMode.NONE, ProcessingMode.SKIP, ProcessingMode.STREAMED),
        (
            Phase.REQUEST_BODY | Phase.RESPONSE_HEADERS,
            ProcessingMode.BUFFERED,
            ProcessingMode.SEND,
            ProcessingMode.NONE,
        ),
    ],
)
def test_mode_override_asks_only_for_wanted_phases(
    wants: Phase, request_body: int, response_headers: int, response_body: int
) -> None:
    response = roundtrip(codec.request_headers_response(exchange(), wants))
    assert response.HasField("mode_override")
    mode = response.mode_override
    assert mode.request_body_mode == request_body
    assert mode.response_header_mode == response_headers
    assert mode.response_body_mode == response_body
    assert mode.request_trailer_mode == ProcessingMode.SKIP
    assert mode.response_trailer_mode == ProcessingMode.SKIP


def test_metadata_goes_under_the_tollway_namespace() -> None:
    ex = exchange(metadata={"route": "openai", "key_id": "0123456789ab", "auth": "ok"})
    response = roundtrip(codec.request_headers_response(ex, Phase.NONE))
    assert tollway_metadata(response) == {
        "route": "openai",
        "key_id": "0123456789ab",
        "auth": "ok",
    }


def test_metadata_strings_are_bounded_and_marked_when_cut() -> None:
    """A client-chosen model name cannot make a megabyte access-log line."""
    huge = "m" * (1 << 20)
    exact = "e" * codec.METADATA_MAX_CHARS
    ex = exchange(metadata={"request_model": huge, "model": exact, "input_tokens": 7})
    for response in (
        codec.request_headers_response(ex, Phase.NONE),
        codec.immediate_response(forbidden("model_not_allowed", "no"), {"request_model": huge}),
    ):
        logged = tollway_metadata(roundtrip(response))
        assert logged["request_model"] == "m" * codec.METADATA_MAX_CHARS + codec.TRUNCATED
        assert len(response.SerializeToString()) < 2 * codec.METADATA_MAX_CHARS + 200
    assert logged["denied"] == "model_not_allowed"
    again = exchange(metadata={"model": exact, "input_tokens": 7})
    assert tollway_metadata(roundtrip(codec.request_headers_response(again, Phase.NONE))) == {
        "model": exact,  # at the bound: kept whole
        "input_tokens": 7,
    }


def test_pipeline_result_encodes_end_to_end() -> None:
    key, record = new_key("alice", tenant="acme")
    ex, decision = decide(build_pipeline([record]), headers=bearer(key))
    assert isinstance(decision, Phase)
    response = roundtrip(codec.request_headers_response(ex, decision))
    mutation = response.request_headers.response.header_mutation
    sets = {o.header.key: o.header.raw_value for o in mutation.set_headers}
    assert sets == {
        "authorization": b"Bearer PK-openai-secret",
        "x-tollway-key-id": record.id.encode(),
        "x-tollway-tenant": b"acme",
    }
    assert "authorization" not in mutation.remove_headers
    assert {"x-api-key", "api-key", "x-goog-api-key"} <= set(mutation.remove_headers)
    assert key.encode() not in response.SerializeToString()
    assert tollway_metadata(response)["key_id"] == record.id


# ---- request body response --------------------------------------------------------


def test_request_body_response_carries_late_edits_and_metadata() -> None:
    response = roundtrip(
        codec.request_body_response(
            exchange(set_headers={"x-model": "gpt-4o"}, metadata={"model": "gpt-4o"})
        )
    )
    mutation = response.request_body.response.header_mutation
    assert [(o.header.key, o.header.raw_value) for o in mutation.set_headers] == [
        ("x-model", b"gpt-4o")
    ]
    assert tollway_metadata(response) == {"model": "gpt-4o"}
    plain = codec.request_body_response(exchange())
    assert plain.HasField("request_body")
    assert not plain.request_body.response.HasField("header_mutation")


# ---- immediate response -------------------------------------------------------------


@pytest.mark.parametrize(
    "deny",
    [
        unauthorized("invalid_api_key", "Incorrect API key provided."),
        forbidden("model_not_allowed", "This API key may not use the model 'gpt-4o'."),
        Deny(
            429,
            "rate_limit_error",
            "rate_limited",
            'Slow "down".',
            "tollway_rate",
            (("retry-after", "3"),),
        ),
    ],
    ids=lambda d: d.code,
)
def test_immediate_response_is_an_openai_style_json_error(deny: Deny) -> None:
    response = roundtrip(codec.immediate_response(deny, {"route": "openai", "key_id": "k1"}))
    assert response.HasField("immediate_response")
    immediate = response.immediate_response
    assert immediate.status.code == deny.status
    assert immediate.details == deny.details
    headers = {o.header.key: o for o in immediate.headers.set_headers}
    assert headers["content-type"].header.raw_value == b"application/json"
    for name, value in deny.headers:
        assert headers[name].header.raw_value == value.encode()
    for option in headers.values():
        assert option.append_action == OVERWRITE
        assert option.header.value == ""
    assert orjson.loads(immediate.body) == {
        "error": {"message": deny.message, "type": deny.type, "code": deny.code, "param": None}
    }
    assert tollway_metadata(response) == {"route": "openai", "key_id": "k1", "denied": deny.code}


def test_immediate_response_metadata_without_context() -> None:
    deny = unauthorized("missing_api_key", "No API key provided.")
    response = codec.immediate_response(deny, {})
    assert tollway_metadata(response) == {"denied": "missing_api_key"}


@pytest.mark.parametrize(
    ("response", "kind"),
    [
        (codec.CONTINUE_REQUEST_HEADERS, "request_headers"),
        (codec.CONTINUE_RESPONSE_HEADERS, "response_headers"),
        (codec.CONTINUE_REQUEST_BODY, "request_body"),
        (codec.CONTINUE_RESPONSE_BODY, "response_body"),
        (codec.CONTINUE_REQUEST_TRAILERS, "request_trailers"),
        (codec.CONTINUE_RESPONSE_TRAILERS, "response_trailers"),
    ],
)
def test_continue_answers_match_their_message_kind(response: ProcessingResponse, kind: str) -> None:
    assert response.WhichOneof("response") == kind
    assert not response.HasField("mode_override")


def test_a_replaced_request_body_brings_its_own_content_length() -> None:
    ex = exchange()
    ex.headers["content-length"] = "10"
    ex.new_body = b'{"a": "bcd"}'
    common = roundtrip(codec.request_body_response(ex)).request_body.response
    assert common.body_mutation.body == ex.new_body
    (length,) = [h for h in common.header_mutation.set_headers if h.header.key == "content-length"]
    assert length.header.raw_value == b"12"


def test_a_replaced_body_without_content_length_gets_none() -> None:
    ex = exchange()  # e.g. HTTP/2 without content-length
    ex.new_body = b"{}"
    common = roundtrip(codec.request_body_response(ex)).request_body.response
    assert common.body_mutation.body == b"{}"
    assert not common.header_mutation.set_headers


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (BodyMode.NONE, ProcessingMode.NONE),
        (BodyMode.STREAMED, ProcessingMode.STREAMED),
        (BodyMode.BUFFERED, ProcessingMode.BUFFERED),
    ],
)
def test_response_headers_ask_for_the_body_as_decided(mode: BodyMode, expected: int) -> None:
    response = roundtrip(codec.response_headers_response(exchange(metadata={"route": "r"}), mode))
    assert response.WhichOneof("response") == "response_headers"
    assert response.mode_override.response_body_mode == expected
    assert response.mode_override.response_trailer_mode == ProcessingMode.SKIP
    assert tollway_metadata(response) == {"route": "r"}


def test_a_response_chunk_passes_unchanged_without_allocating() -> None:
    assert codec.response_body_response(exchange(), None, end=False) is codec.CONTINUE_RESPONSE_BODY


@pytest.mark.parametrize(
    ("replacement", "field", "value"),
    [(b"data: x\n\n", "body", b"data: x\n\n"), (b"", "clear_body", True)],
)
def test_a_replaced_response_chunk(replacement: bytes, field: str, value: object) -> None:
    common = roundtrip(codec.response_body_response(exchange(), replacement, end=False))
    assert getattr(common.response_body.response.body_mutation, field) == value


def test_the_last_response_chunk_carries_metadata_and_response_headers() -> None:
    ex = exchange(metadata={"cost_usd": 0.25, "usage_estimated": False})
    ex.set_response_headers["x-tollway-cost-usd"] = "0.250000000"
    response = roundtrip(codec.response_body_response(ex, None, end=True))
    headers = response.response_body.response.header_mutation.set_headers
    assert [(h.header.key, h.header.raw_value) for h in headers] == [
        ("x-tollway-cost-usd", b"0.250000000")
    ]
    assert not response.response_body.response.HasField("body_mutation")
    assert tollway_metadata(response) == {"cost_usd": 0.25, "usage_estimated": False}


@pytest.mark.parametrize(
    ("dialect", "body"),
    [
        (
            "anthropic",
            {
                "type": "error",
                "error": {"type": "permission_error", "message": "No gpt-4o for you."},
            },
        ),
        (
            "gemini",
            {
                "error": {
                    "code": 403,
                    "message": "No gpt-4o for you.",
                    "status": "PERMISSION_DENIED",
                    "details": [
                        {
                            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                            "reason": "MODEL_NOT_ALLOWED",
                            "domain": "tollway",
                        }
                    ],
                }
            },
        ),
        (
            "openai",
            {
                "error": {
                    "message": "No gpt-4o for you.",
                    "type": "permission_error",
                    "code": "model_not_allowed",
                    "param": None,
                }
            },
        ),
    ],
)
def test_denials_come_in_the_providers_own_shape(dialect: Dialect, body: dict[str, Any]) -> None:
    deny = forbidden("model_not_allowed", "No gpt-4o for you.")
    response = roundtrip(codec.immediate_response(deny, {}, dialect))
    assert response.immediate_response.status.code == 403
    assert orjson.loads(response.immediate_response.body) == body


@pytest.mark.parametrize(
    ("status", "anthropic_type", "google_status"),
    [
        (400, "invalid_request_error", "INVALID_ARGUMENT"),
        (401, "authentication_error", "UNAUTHENTICATED"),
        (404, "not_found_error", "NOT_FOUND"),
        (413, "request_too_large", "INVALID_ARGUMENT"),
        (429, "rate_limit_error", "RESOURCE_EXHAUSTED"),
        (500, "api_error", "INTERNAL"),
        (503, "api_error", "UNAVAILABLE"),
    ],
)
def test_error_types_follow_the_status(
    status: int, anthropic_type: str, google_status: str
) -> None:
    assert error_document("anthropic", status, "t", "c", "m")["error"]["type"] == anthropic_type
    assert error_document("gemini", status, "t", "c", "m")["error"]["status"] == google_status


def test_each_message_of_a_stream_carries_only_the_metadata_that_changed() -> None:
    ex, sent = exchange(metadata={"route": "openai", "key_id": "k1"}), {}
    first = roundtrip(codec.request_headers_response(ex, Phase.RESPONSE_HEADERS, sent))
    assert tollway_metadata(first) == {"route": "openai", "key_id": "k1"}
    ex.metadata["model"] = "gpt-4o"
    later = roundtrip(codec.response_headers_response(ex, BodyMode.NONE, sent))
    assert tollway_metadata(later) == {"model": "gpt-4o"}  # Envoy keeps what it had


def test_a_rewritten_body_gets_its_length_without_touching_the_exchange() -> None:
    ex = exchange()
    ex.headers["content-length"] = "2"
    ex.new_body = b'{"a": 1}'
    common = roundtrip(codec.request_body_response(ex)).request_body.response
    assert [(h.header.key, h.header.raw_value) for h in common.header_mutation.set_headers] == [
        ("content-length", b"8")
    ]
    assert ex.set_headers == {}


def test_the_peer_is_read_from_envoys_request_attributes() -> None:
    fields = {
        "source.address": Value(string_value="10.0.0.9:5555"),
        "request.id": Value(string_value="r1"),
    }
    message = ProcessingRequest(attributes={codec.ATTRIBUTES: Struct(fields=fields)})
    assert codec.peer(message) == ("10.0.0.9:5555", "r1")
    assert codec.peer(ProcessingRequest()) == ("", "")
