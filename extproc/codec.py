"""Protobuf <-> plain values: stages never see protobuf, only this and the transports."""

from __future__ import annotations

from functools import cache
from typing import Any

import orjson
from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
    ProcessingRequest,
    ProcessingResponse,
    TrailersResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus
from google.protobuf.json_format import MessageToDict

from .decisions import BodyMode, Deny, Phase
from .error_shapes import error_document
from .exchange import Exchange, MetadataValue
from .kinds import Dialect

METADATA_NAMESPACE = "tollway"
JWT_NAMESPACE = "envoy.filters.http.jwt_authn"  # (envoyconf forwards it with identity.jwt)
# Envoy's request_attributes (envoyconf.py asks for them) arrive with the request
# headers under the filter's name.
ATTRIBUTES = "envoy.filters.http.ext_proc"
# Envoy's attributes of a front-door client certificate (its first URI and DNS SAN).
CERT_ATTRIBUTES = ("connection.uri_san_peer_certificate", "connection.dns_san_peer_certificate")
# Metadata strings may come from clients (a model name): each is cut to this many
# characters and marked, so that one request cannot write a megabyte into the access log.
METADATA_MAX_CHARS = 256
TRUNCATED = "...[truncated]"

_OVERWRITE = HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_JSON = HeaderValueOption(
    header=HeaderValue(key="content-type", raw_value=b"application/json"), append_action=_OVERWRITE
)

# Answers that carry no change, built once: most messages get one of these.
CONTINUE_REQUEST_HEADERS = ProcessingResponse(request_headers=HeadersResponse())
CONTINUE_RESPONSE_HEADERS = ProcessingResponse(response_headers=HeadersResponse())
CONTINUE_REQUEST_BODY = ProcessingResponse(request_body=BodyResponse())
CONTINUE_RESPONSE_BODY = ProcessingResponse(response_body=BodyResponse())
CONTINUE_REQUEST_TRAILERS = ProcessingResponse(request_trailers=TrailersResponse())
CONTINUE_RESPONSE_TRAILERS = ProcessingResponse(response_trailers=TrailersResponse())


def peer(request: ProcessingRequest) -> tuple[str, str]:
    """The client's address (``source.address``, with its port) and Envoy's request id
    (``request.id``, the access log's ``x-request-id``); empty when Envoy sent none."""
    if ATTRIBUTES not in request.attributes:
        return "", ""
    fields = request.attributes[ATTRIBUTES].fields
    address = fields["source.address"].string_value if "source.address" in fields else ""
    request_id = fields["request.id"].string_value if "request.id" in fields else ""
    return address, request_id


def decode_headers(message: HttpHeaders) -> tuple[dict[str, str], frozenset[str]]:
    """Header map as a dict (repeats joined with ","), plus the names that repeat."""
    headers: dict[str, str] = {}
    repeated: set[str] = set()
    for header in message.headers.headers:
        name = header.key
        # Envoy sends raw_value; latin-1 maps every byte, so nothing is lost.
        value = header.raw_value.decode("latin-1") if header.raw_value else header.value
        if name in headers:
            headers[name] += "," + value
            repeated.add(name)
        else:
            headers[name] = value
    return headers, frozenset(repeated)


def decode_identity(request: ProcessingRequest) -> tuple[dict[str, Any], tuple[str, ...]]:
    """What Envoy established about the caller: jwt_authn's metadata (verified claims
    by provider, or why a token failed) and the front-door client certificate's SANs."""
    jwt: dict[str, Any] = {}
    if request.HasField("metadata_context"):
        found = request.metadata_context.filter_metadata.get(JWT_NAMESPACE)
        if found is not None:
            jwt = MessageToDict(found)
    names: tuple[str, ...] = ()
    attributes = request.attributes.get(ATTRIBUTES) if request.attributes else None
    if attributes is not None:
        fields = attributes.fields
        # (only these: the audit's source.address arrives here too)
        names = tuple(
            fields[name].string_value
            for name in CERT_ATTRIBUTES
            if name in fields and fields[name].string_value
        )
    return jwt, names


@cache
def _mode(wants: Phase) -> ProcessingMode:
    return ProcessingMode(
        request_body_mode=(
            ProcessingMode.BUFFERED if Phase.REQUEST_BODY in wants else ProcessingMode.NONE
        ),
        response_header_mode=(
            ProcessingMode.SEND if Phase.RESPONSE_HEADERS in wants else ProcessingMode.SKIP
        ),
        response_body_mode=(
            ProcessingMode.STREAMED if Phase.RESPONSE_BODY in wants else ProcessingMode.NONE
        ),
        request_trailer_mode=ProcessingMode.SKIP,
        response_trailer_mode=ProcessingMode.SKIP,
    )


_BODY_MODES = {
    BodyMode.NONE: ProcessingMode.NONE,
    BodyMode.STREAMED: ProcessingMode.STREAMED,
    BodyMode.BUFFERED: ProcessingMode.BUFFERED,
}


@cache
def _response_mode(mode: BodyMode) -> ProcessingMode:
    return ProcessingMode(
        response_body_mode=_BODY_MODES[mode], response_trailer_mode=ProcessingMode.SKIP
    )


def _set(headers: dict[str, str]) -> list[HeaderValueOption]:
    return [
        HeaderValueOption(
            header=HeaderValue(key=name, raw_value=value.encode("latin-1")),
            append_action=_OVERWRITE,
        )
        for name, value in headers.items()
    ]


def _header_mutation(ex: Exchange, also: dict[str, str] | None = None) -> HeaderMutation | None:
    set_headers = {**ex.set_headers, **also} if also else ex.set_headers
    if not set_headers and not ex.remove_headers:
        return None
    return HeaderMutation(
        set_headers=_set(set_headers),
        # A header that is set is overwritten; removing it too would drop it.
        remove_headers=sorted(ex.remove_headers.difference(set_headers)),
    )


def _with_metadata(response: ProcessingResponse, metadata: dict[str, MetadataValue]) -> None:
    """Under Tollway's namespace; Envoy merges it into what earlier messages set.

    Written field by field: Struct.update() is several times slower. Strings are
    bounded here, the one place every value passes on its way to Envoy.
    """
    if not metadata:
        return
    fields = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    for name, value in metadata.items():
        field = fields[name]
        if isinstance(value, str):
            if len(value) > METADATA_MAX_CHARS:
                value = value[:METADATA_MAX_CHARS] + TRUNCATED
            field.string_value = value
        elif isinstance(value, bool):
            field.bool_value = value
        else:
            field.number_value = value


Sent = dict[str, MetadataValue]  # per stream: the metadata earlier messages carried


def _new_metadata(ex: Exchange, sent: Sent | None) -> dict[str, MetadataValue]:
    """What changed since an earlier message of the stream sent it: Envoy keeps the rest."""
    if sent is None:
        return ex.metadata
    changed = {k: v for k, v in ex.metadata.items() if k not in sent or sent[k] != v}
    sent.update(changed)
    return changed


def request_headers_response(
    ex: Exchange, wants: Phase, sent: Sent | None = None
) -> ProcessingResponse:
    """Continue with the exchange's header edits and ask only for the phases wanted.

    Also the answer when the body was decided here (headers with end_of_stream: an
    empty body); a body edit cannot be made then, and no stage makes one of nothing.
    """
    response = ProcessingResponse(
        request_headers=HeadersResponse(
            response=CommonResponse(header_mutation=_header_mutation(ex))
        ),
        mode_override=_mode(wants),
    )
    _with_metadata(response, _new_metadata(ex, sent))
    return response


def request_body_response(ex: Exchange, sent: Sent | None = None) -> ProcessingResponse:
    """Continue after the body phase; header edits made there still reach the upstream.

    A replaced body gets its new content-length: Envoy does not recompute it.
    """
    body, length = None, None
    if ex.new_body is not None:
        body = BodyMutation(body=ex.new_body)
        if "content-length" in ex.headers:
            length = {"content-length": str(len(ex.new_body))}
    mutation = _header_mutation(ex, length)
    if mutation is None and body is None:
        response = ProcessingResponse(request_body=BodyResponse())
    else:
        common = CommonResponse(header_mutation=mutation, body_mutation=body)
        response = ProcessingResponse(request_body=BodyResponse(response=common))
    _with_metadata(response, _new_metadata(ex, sent))
    return response


def response_headers_response(
    ex: Exchange, mode: BodyMode, sent: Sent | None = None
) -> ProcessingResponse:
    """Continue, asking for the response body only as the stages want it."""
    headers = HeadersResponse()
    if ex.remove_response_headers:
        headers.response.header_mutation.remove_headers.extend(sorted(ex.remove_response_headers))
    response = ProcessingResponse(response_headers=headers, mode_override=_response_mode(mode))
    _with_metadata(response, _new_metadata(ex, sent))
    return response


def response_body_response(
    ex: Exchange, replacement: bytes | None, end: bool, sent: Sent | None = None
) -> ProcessingResponse:
    """Pass the chunk on (or its replacement); the last one carries metadata and headers.

    Response headers set here reach the client only in BUFFERED mode.
    """
    if replacement is None and not end:
        return CONTINUE_RESPONSE_BODY
    common = CommonResponse()
    if replacement is not None:
        if replacement:
            common.body_mutation.body = replacement
        else:
            common.body_mutation.clear_body = True
    if end and ex.set_response_headers:
        common.header_mutation.set_headers.extend(_set(ex.set_response_headers))
    response = ProcessingResponse(response_body=BodyResponse(response=common))
    if end:
        _with_metadata(response, _new_metadata(ex, sent))
    return response


def error_body(deny: Deny, dialect: Dialect = "openai") -> bytes:
    return orjson.dumps(error_document(dialect, deny.status, deny.type, deny.code, deny.message))


def immediate_response(
    deny: Deny, metadata: dict[str, MetadataValue], dialect: Dialect = "openai"
) -> ProcessingResponse:
    """Answer the client now, in the error shape of the provider it speaks."""
    headers = [_JSON, *_set(dict(deny.headers))]
    response = ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=deny.status),
            headers=HeaderMutation(set_headers=headers),
            body=error_body(deny, dialect),
            details=deny.details,
        )
    )
    _with_metadata(response, {**metadata, "denied": deny.code})
    return response
