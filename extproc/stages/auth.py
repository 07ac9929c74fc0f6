"""Authenticate the caller with a Tollway key and enforce its model allowlist."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl

from .. import named_models
from ..config import CREDENTIAL_HEADERS
from ..decisions import Deny, Phase, bad_request, forbidden, unauthorized
from ..exchange import BodyError, Exchange
from ..keys import KeyRecord, KeyRing
from . import Flow

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def query_keys(ex: Exchange) -> list[str]:
    """Gemini clients may send the key as ``?key=``."""
    if ex.route is None or ex.route.api != "gemini" or "key=" not in ex.query:
        return []
    return [value for name, value in parse_qsl(ex.query, keep_blank_values=True) if name == "key"]


_MISSING = unauthorized(
    "missing_api_key",
    "No API key provided. Send your Tollway key as 'Authorization: Bearer <key>' "
    "(or in x-api-key, api-key or x-goog-api-key).",
)
_INVALID = unauthorized("invalid_api_key", "Incorrect API key provided.")
_REVOKED = unauthorized("revoked_api_key", "This API key has been revoked.")
_EXPIRED = unauthorized("expired_api_key", "This API key has expired.")
_BAD_SCHEME = unauthorized(
    "invalid_authorization_header", "The Authorization header must be 'Bearer <key>'."
)


def _ambiguous(detail: str) -> Deny:
    return unauthorized("ambiguous_credentials", f"Ambiguous credentials: {detail}.")


def presented_key(ex: Exchange) -> str | Deny | None:
    """The one key the client sent, a denial if it sent several, or None."""
    found: str | None = None
    for name in CREDENTIAL_HEADERS:
        value = ex.headers.get(name)
        if value is None:
            continue
        # Envoy may join a repeated header into one value with ","; keys have none.
        if name in ex.repeated or "," in value:
            return _ambiguous(f"the {name} header appears more than once")
        if name == "authorization":
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                return _BAD_SCHEME
        value = value.strip()
        if found is not None and value != found:
            return _ambiguous("different keys in different headers")
        found = value
    in_query = query_keys(ex)
    if len(in_query) > 1:
        return _ambiguous("the key query parameter appears more than once")
    if in_query and found is not None and in_query[0] != found:
        return _ambiguous("different keys in a header and the query")
    return found or (in_query[0] if in_query else None)


def _model_denied(model: str) -> Deny:
    return forbidden("model_not_allowed", f"This API key may not use the model '{model}'.")


class AuthStage:
    """Routes with ``auth: false`` pass without a key; all others need one."""

    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys  # replaced whole when the keys file changes

    def start(self, ex: Exchange) -> Flow | Deny | None:
        if ex.route is not None and not ex.route.upstream.auth:
            ex.metadata["auth"] = "disabled"
            return None
        key = presented_key(ex)
        if key is None:
            return _MISSING
        if isinstance(key, Deny):
            return key
        record = self.keys.find(key)
        if record is None:
            return _INVALID
        ex.metadata["key_id"] = record.id
        if record.revoked is not None:
            return _REVOKED
        if record.expires is not None and record.expires.timestamp() <= ex.now:
            return _EXPIRED
        ex.identity = record
        ex.metadata["tenant"] = record.tenant
        ex.metadata["key_name"] = record.name
        ex.metadata["auth"] = "ok"
        ex.set_headers["x-tollway-key-id"] = record.id
        ex.set_headers["x-tollway-tenant"] = record.tenant
        if not record.restricts_models or ex.call is None:
            return None
        return _check_path_models(ex, record)


class _AllowlistFlow(Flow):
    """A restricted key's request with a body: every model it names must be allowed."""

    __slots__ = ("record",)
    wants = Phase.REQUEST_BODY

    def __init__(self, record: KeyRecord) -> None:
        self.record = record

    def on_request_body(self, ex: Exchange) -> Deny | None:
        assert ex.call is not None  # a flow is only started on a route
        found = _models_in_body(ex)
        if isinstance(found, Deny):
            return found
        if not found and _REQUIRES_MODEL.search(ex.call.path):
            return bad_request(
                "missing_model", "This API key is restricted to certain models: name the 'model'."
            )
        return _check_models(ex, self.record, found)


# Endpoints that fall back to a default model when none is named: a restricted
# key must name one. Matched at the end of the path as the provider sees it.
_REQUIRES_MODEL = re.compile(
    r"/(?:chat/completions|completions|embeddings|responses|moderations"
    r"|images/(?:generations|edits|variations)|audio/(?:speech|transcriptions|translations)"
    r"|realtime/(?:sessions|client_secrets|transcription_sessions)|fine_tuning/jobs"
    r"|assistants|threads/(?:[^/]+/)?runs|messages|messages/count_tokens|messages/batches"
    r"|complete)/?$"
)
# Endpoints whose models Tollway cannot see (a batch names them in an uploaded file).
_OPAQUE = re.compile(r"/(?:v1|openai)/batches/?$")  # OpenAI and Azure


def _check_path_models(ex: Exchange, record: KeyRecord) -> Flow | Deny | None:
    call = ex.call
    assert call is not None
    if call.path_model_unreadable:
        return bad_request("invalid_model", "The model named in the path could not be read.")
    if ex.method in _BODY_METHODS and _OPAQUE.search(call.path):
        return forbidden(
            "endpoint_not_allowed",
            "This API key is restricted to certain models, and the models this endpoint "
            "uses cannot be checked.",
        )
    named: list[object] = [] if call.path_model is None else [call.path_model]
    denied = _check_models(ex, record, [*named, *named_models.in_query(ex.query)])
    if denied is not None:
        return denied
    if call.path_model is not None or ex.method not in _BODY_METHODS:
        return None
    # Only a restricted key pays for the body: any body may name a model.
    return _AllowlistFlow(record)


def _models_in_body(ex: Exchange) -> list[object] | Deny:
    body = ex.body or b""
    if not body:
        return []
    kind = ex.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    try:
        if kind == "application/json" or kind.endswith("+json"):
            doc = ex.json()  # parsed once; metering reads the same document
            return named_models.in_json_body(body, doc)
        if kind == "multipart/form-data":
            return named_models.in_multipart(ex.headers["content-type"], body)
        if kind == "application/x-www-form-urlencoded":
            return named_models.in_form(body)
        return named_models.in_other(body)
    except BodyError as exc:
        return bad_request(
            "invalid_body", f"{exc}; this API key may only send bodies Tollway can check."
        )


def _check_models(ex: Exchange, record: KeyRecord, named: list[object]) -> Deny | None:
    gemini = ex.call is not None and ex.call.route.api == "gemini"
    for value in named:
        if not isinstance(value, str) or not value.strip():
            return bad_request("invalid_model", "Every 'model' must be a non-empty string.")
        # Gemini bodies name "models/gemini-2.0-flash" (or a Vertex resource path).
        model = value.rsplit("/", 1)[-1] if gemini else value
        ex.metadata.setdefault("request_model", model)
        if not record.allows_model(model):
            return _model_denied(model)
    return None
