"""Authenticate the caller with a Tollway key and enforce its model allowlist."""

from __future__ import annotations

from urllib.parse import parse_qsl

from ..decisions import Deny, Phase, bad_request, forbidden, unauthorized
from ..exchange import BodyError, Exchange
from ..keys import KeyRing

# Every header a client SDK may carry its key in (OpenAI, Anthropic, Azure, Gemini).
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")
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

    def on_request_headers(self, ex: Exchange) -> Deny | Phase:
        if ex.route is not None and not ex.route.upstream.auth:
            ex.metadata["auth"] = "disabled"
            return Phase.NONE
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
        if not record.restricts_models or ex.route is None:
            return Phase.NONE
        model = ex.route.model_in_path(ex.path)
        if model is not None:
            ex.metadata["request_model"] = model
            return Phase.NONE if record.allows_model(model) else _model_denied(model)
        # Only a restricted key pays for the body: any body may name a model.
        return Phase.REQUEST_BODY if ex.method in _BODY_METHODS else Phase.NONE

    def on_request_body(self, ex: Exchange) -> Deny | None:
        record = ex.identity
        if record is None or not record.restricts_models or ex.route is None:
            return None
        names_model = ex.route.model_in_body(ex.method, ex.path)
        try:
            model = ex.json().get("model")
        except BodyError as exc:
            # Endpoints that take no JSON (uploads) name no model to check.
            return bad_request("invalid_body", str(exc)) if names_model else None
        if model is None and not names_model:
            return None
        if not isinstance(model, str) or not model:
            return bad_request("missing_model", "The request body must name a 'model'.")
        ex.metadata["request_model"] = model
        return None if record.allows_model(model) else _model_denied(model)
