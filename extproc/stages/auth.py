"""Authenticate the caller (a Tollway key, a JWT or a client certificate Envoy
verified) and enforce what it may reach: its roles' routes and models, and a
key's own model allowlist."""

from __future__ import annotations

import re
from dataclasses import replace
from urllib.parse import parse_qsl

from .. import named_models
from ..config import CREDENTIAL_HEADERS, IdentityConfig
from ..decisions import Deny, Phase, bad_request, forbidden, unauthorized
from ..exchange import BodyError, Exchange
from ..identities import Identities, Roles
from ..keys import NO_LIMITS, PREFIX, KeyRecord, KeyRing
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


_NOUNS = {"key": "API key", "jwt": "token", "cert": "client certificate"}


def _model_denied(access: _Access, model: str) -> Deny:
    noun = _NOUNS[access.record.kind]
    return forbidden("model_not_allowed", f"This {noun} may not use the model '{model}'.")


def _token_failed(reason: str) -> Deny:
    # Envoy's reason (expired, issuer, audience, signature): no secret in it.
    return unauthorized("invalid_token", f"The token was not accepted: {reason}.")


class _Access:
    """What one request's identity may do on its route: the record's own allowlist
    and, when it has roles, the models of the roles that grant the route."""

    __slots__ = ("record", "role_models")

    def __init__(
        self, record: KeyRecord, role_models: tuple[re.Pattern[str] | None, ...] | None
    ) -> None:
        self.record = record
        self.role_models = role_models  # None: the identity has no roles

    @property
    def restricts_models(self) -> bool:
        roles = self.role_models
        return self.record.restricts_models or (roles is not None and None not in roles)

    def allows_model(self, model: str) -> bool:
        if not self.record.allows_model(model):
            return False
        roles = self.role_models
        return roles is None or any(p is None or p.fullmatch(model) for p in roles)


class AuthStage:
    """Routes with ``auth: false`` pass without an identity; all others need one of
    those their upstream accepts (``identities``), tried in the order jwt, key, cert."""

    def __init__(self, keys: KeyRing, identities: Identities | None = None) -> None:
        self.keys = keys  # replaced whole when the keys file changes
        self.identities = identities or Identities(IdentityConfig(), Roles({}))
        self.roles = self.identities.roles

    def start(self, ex: Exchange) -> Flow | Deny | None:
        route = ex.route
        if route is not None and not route.upstream.auth:
            ex.metadata["auth"] = "disabled"
            return None
        accepts = route.upstream.identities if route is not None else ("key",)
        found = self._identify(ex, accepts)
        if isinstance(found, Deny):
            return found
        record = found
        ex.identity = record
        ex.metadata["key_id"] = record.id  # (a JWT's or certificate's too: jwt:corp:USER)
        ex.metadata["tenant"] = record.tenant
        ex.metadata["key_name"] = record.name
        ex.metadata["auth"] = record.kind if record.kind != "key" else "ok"
        ex.set_headers["x-tollway-key-id"] = record.id
        ex.set_headers["x-tollway-tenant"] = record.tenant
        role_models = None
        if route is not None and (record.roles or record.kind != "key"):
            # An identity with roles (every JWT and certificate) reaches only what they grant.
            # (No route: Envoy answers 404, nothing is reached.)
            role_models = self.roles.models_for(record.roles, route.name)
            if not role_models:
                return forbidden(
                    "route_not_allowed", f"This {_NOUNS[record.kind]} has no role for this route."
                )
            if record.kind == "key" and record.roles:
                ex.identity = _with_role_policies(record, self.roles)
        access = _Access(record, role_models)
        if not access.restricts_models or ex.call is None:
            return None
        return _check_path_models(ex, access)

    def _identify(self, ex: Exchange, accepts: tuple[str, ...]) -> KeyRecord | Deny:
        failed: str | None = None
        if "jwt" in accepts and ex.jwt:
            token = self.identities.from_jwt(ex.jwt)
            if isinstance(token, KeyRecord):
                return token
            failed = token  # unless a Tollway key was sent instead
        key = presented_key(ex) if "key" in accepts or failed is not None else None
        if isinstance(key, Deny):
            return key
        if key is not None and (failed is None or key.startswith(PREFIX)):
            return self._key_record(ex, key) if "key" in accepts else _INVALID
        if failed is not None:
            return _token_failed(failed)
        if "cert" in accepts and ex.peer_names:
            record = self.identities.from_cert(ex.peer_names)
            if record is not None:
                return record
            return unauthorized(
                "unknown_client_certificate", "This client certificate is not known here."
            )
        return _MISSING

    def _key_record(self, ex: Exchange, key: str) -> KeyRecord | Deny:
        record = self.keys.find(key)
        if record is None:
            return _INVALID
        ex.metadata["key_id"] = record.id
        if record.revoked is not None:
            return _REVOKED
        if record.expires is not None and record.expires.timestamp() <= ex.now:
            return _EXPIRED
        return record


def _with_role_policies(record: KeyRecord, roles: Roles) -> KeyRecord:
    """A key's own limits and redaction policy, else its roles'."""
    limits, redaction = roles.policies(record.roles)
    if (record.limits != NO_LIMITS or limits == NO_LIMITS) and (
        record.redaction is not None or redaction is None
    ):
        return record
    return replace(
        record,
        limits=record.limits if record.limits != NO_LIMITS else limits,
        redaction=record.redaction if record.redaction is not None else redaction,
    )


class _AllowlistFlow(Flow):
    """A restricted key's request with a body: every model it names must be allowed."""

    __slots__ = ("access",)
    wants = Phase.REQUEST_BODY

    def __init__(self, access: _Access) -> None:
        self.access = access

    def on_request_body(self, ex: Exchange) -> Deny | None:
        assert ex.call is not None  # a flow is only started on a route
        found = _models_in_body(ex)
        if isinstance(found, Deny):
            return found
        if not found and _REQUIRES_MODEL.search(ex.call.path):
            return bad_request(
                "missing_model", "This API key is restricted to certain models: name the 'model'."
            )
        return _check_models(ex, self.access, found)


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


def _check_path_models(ex: Exchange, access: _Access) -> Flow | Deny | None:
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
    denied = _check_models(ex, access, [*named, *named_models.in_query(ex.query)])
    if denied is not None:
        return denied
    if call.path_model is not None or ex.method not in _BODY_METHODS:
        return None
    # Only a restricted key pays for the body: any body may name a model.
    return _AllowlistFlow(access)


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


def _check_models(ex: Exchange, access: _Access, named: list[object]) -> Deny | None:
    gemini = ex.call is not None and ex.call.route.api == "gemini"
    for value in named:
        if not isinstance(value, str) or not value.strip():
            return bad_request("invalid_model", "Every 'model' must be a non-empty string.")
        # Gemini bodies name "models/gemini-2.0-flash" (or a Vertex resource path).
        model = value.rsplit("/", 1)[-1] if gemini else value
        ex.metadata.setdefault("request_model", model)
        if not access.allows_model(model):
            return _model_denied(access, model)
    return None
