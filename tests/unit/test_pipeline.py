"""The stages wired as in production, driven with plain Exchanges (no protobuf)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from extproc.config import CREDENTIAL_HEADERS
from extproc.decisions import Deny, Phase
from extproc.exchange import Exchange
from extproc.pipeline import Pipeline

from .factories import (
    NOW,
    PROVIDER_KEYS,
    Clock,
    bearer,
    build_pipeline,
    decide,
    decide_run,
    new_key,
    unknown_key,
)

ALICE, ALICE_RECORD = new_key("alice", tenant="acme")
BOB, BOB_RECORD = new_key("bob", tenant="globex")
REVOKED, REVOKED_RECORD = new_key("gone", revoked=NOW - timedelta(days=1))
EXPIRED, EXPIRED_RECORD = new_key("old", expires=NOW - timedelta(seconds=1))
ENDS_NOW, ENDS_NOW_RECORD = new_key("ends-now", expires=NOW)
LATER, LATER_RECORD = new_key("later", expires=NOW + timedelta(days=1))
RESTRICTED, RESTRICTED_RECORD = new_key(
    "narrow", models=("gpt-4o-mini", "claude-*", "gemini-2.0-*")
)

RECORDS = [
    ALICE_RECORD,
    BOB_RECORD,
    REVOKED_RECORD,
    EXPIRED_RECORD,
    ENDS_NOW_RECORD,
    LATER_RECORD,
    RESTRICTED_RECORD,
]


def pipeline(clock: Clock | None = None) -> Pipeline:
    return build_pipeline(RECORDS, clock=clock)


def assert_no_key_material(ex: Exchange, key: str) -> None:
    """The presented Tollway key must not be logged or forwarded anywhere."""
    if not key.strip():
        return
    secret = key.split("_", 2)[-1]  # tw_<id>_<secret>; the secret itself may hold "_"
    for value in [*ex.metadata.values(), *ex.set_headers.values()]:
        assert key not in str(value)
        assert secret not in str(value)


def assert_denied(
    decision: Deny | Phase | None, status: int, code: str, details: str | None = None
) -> Deny:
    assert isinstance(decision, Deny), decision
    assert (decision.status, decision.code) == (status, code)
    assert decision.details == (details or f"tollway_{code}")
    assert decision.message  # a client-safe explanation is always given
    return decision


# ---- authentication ----------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "repeated", "code"),
    [
        ({}, (), "missing_api_key"),
        ({"authorization": "Bearer "}, (), "missing_api_key"),
        ({"content-type": "application/json"}, (), "missing_api_key"),
        (bearer(unknown_key()), (), "invalid_api_key"),
        (bearer("sk-proj-not-a-tollway-key"), (), "invalid_api_key"),
        (bearer(ALICE[:-1]), (), "invalid_api_key"),
        ({"x-api-key": ALICE + "x"}, (), "invalid_api_key"),
        (bearer(REVOKED), (), "revoked_api_key"),
        (bearer(EXPIRED), (), "expired_api_key"),
        (bearer(ENDS_NOW), (), "expired_api_key"),
        ({"authorization": f"Basic {ALICE}"}, (), "invalid_authorization_header"),
        ({"authorization": ALICE}, (), "invalid_authorization_header"),
        (
            {"authorization": f"Bearer {ALICE},Bearer {ALICE}"},
            ("authorization",),
            "ambiguous_credentials",
        ),
        ({"x-api-key": f"{ALICE},{ALICE}"}, ("x-api-key",), "ambiguous_credentials"),
        ({**bearer(ALICE), "x-api-key": BOB}, (), "ambiguous_credentials"),
        ({"api-key": ALICE, "x-goog-api-key": BOB}, (), "ambiguous_credentials"),
        ({"x-api-key": ALICE, "x-goog-api-key": unknown_key()}, (), "ambiguous_credentials"),
    ],
    ids=[
        "missing",
        "empty-bearer",
        "unrelated-headers",
        "unknown",
        "provider-key",
        "truncated",
        "extended",
        "revoked",
        "expired",
        "expires-this-instant",
        "basic-scheme",
        "no-scheme",
        "repeated-authorization",
        "repeated-x-api-key",
        "two-keys-bearer-and-x-api-key",
        "two-keys-api-key-and-goog",
        "known-and-unknown",
    ],
)
def test_authentication_denials(
    headers: dict[str, str], repeated: tuple[str, ...], code: str
) -> None:
    ex, decision = decide(pipeline(), headers=headers, repeated=repeated)
    deny = assert_denied(decision, 401, code)
    assert deny.type == "authentication_error"
    assert ex.identity is None
    assert "x-tollway-key-id" not in ex.set_headers
    assert "authorization" not in ex.set_headers  # no provider key for a denied request
    for value in headers.values():
        assert_no_key_material(ex, value.removeprefix("Bearer ").split(",")[0])


@pytest.mark.parametrize(
    "headers",
    [
        bearer(ALICE),
        {"authorization": f"bearer {ALICE}"},
        {"authorization": f"Bearer   {ALICE}  "},
        {"x-api-key": ALICE},
        {"api-key": ALICE},
        {"x-goog-api-key": ALICE},
        {**bearer(ALICE), "x-api-key": ALICE},
        {"x-api-key": ALICE, "api-key": ALICE, "x-goog-api-key": ALICE},
    ],
    ids=[
        "bearer",
        "bearer-lowercase",
        "bearer-padded",
        "x-api-key",
        "api-key",
        "x-goog-api-key",
        "same-key-twice",
        "same-key-thrice",
    ],
)
def test_key_accepted_in_every_sdk_header(headers: dict[str, str]) -> None:
    ex, decision = decide(pipeline(), headers=headers)
    assert decision == Phase.NONE
    assert ex.identity == ALICE_RECORD
    assert ex.set_headers["x-tollway-key-id"] == ALICE_RECORD.id
    assert ex.set_headers["x-tollway-tenant"] == "acme"


def test_not_yet_expired_key_expires_when_the_clock_passes_it() -> None:
    clock = Clock()
    p = build_pipeline(RECORDS, clock=clock)
    _, decision = decide(p, headers=bearer(LATER))
    assert decision == Phase.NONE
    clock.advance(timedelta(days=1).total_seconds() - 1)
    assert decide(p, headers=bearer(LATER))[1] == Phase.NONE
    clock.advance(1)
    assert_denied(decide(p, headers=bearer(LATER))[1], 401, "expired_api_key")


def test_denied_known_key_is_named_in_metadata_but_gets_no_identity() -> None:
    ex, decision = decide(pipeline(), headers=bearer(REVOKED))
    assert_denied(decision, 401, "revoked_api_key")
    assert ex.metadata["key_id"] == REVOKED_RECORD.id
    assert "tenant" not in ex.metadata


# ---- header hygiene ----------------------------------------------------------


def test_client_cannot_forge_internal_headers() -> None:
    headers = {
        **bearer(ALICE),
        "x-tollway-key-id": "000000000000",
        "x-tollway-tenant": "root",
        "x-tollway-anything": "1",
        "x-request-id": "keep-me",
    }
    ex, decision = decide(pipeline(), headers=headers)
    assert decision == Phase.NONE
    assert {"x-tollway-key-id", "x-tollway-tenant", "x-tollway-anything"} <= ex.remove_headers
    assert "x-request-id" not in ex.remove_headers
    assert ex.set_headers["x-tollway-key-id"] == ALICE_RECORD.id
    assert ex.set_headers["x-tollway-tenant"] == "acme"


@pytest.mark.parametrize("path", ["/open/v1/chat/completions", "/nowhere"])
def test_internal_headers_are_stripped_even_without_auth_or_route(path: str) -> None:
    ex, _ = decide(pipeline(), path, {"x-tollway-tenant": "root"})
    assert "x-tollway-tenant" in ex.remove_headers
    assert "x-tollway-tenant" not in ex.set_headers


@pytest.mark.parametrize(
    ("path", "client_header", "provider_header", "provider_value"),
    [
        ("/v1/chat/completions", "authorization", "authorization", "Bearer PK-openai-secret"),
        ("/anthropic/v1/messages", "x-api-key", "x-api-key", "PK-anthropic-secret"),
        (
            "/v1beta/models/gemini-2.0-flash:generateContent",
            "x-goog-api-key",
            "x-goog-api-key",
            "PK-gemini-secret",
        ),
        (
            "/openai/deployments/gpt-4o/chat/completions",
            "api-key",
            "api-key",
            "PK-azure-secret",
        ),
        ("/anthropic/v1/messages", "authorization", "x-api-key", "PK-anthropic-secret"),
        ("/v1/embeddings", "x-api-key", "authorization", "Bearer PK-openai-secret"),
    ],
)
def test_client_key_is_swapped_for_the_provider_key(
    path: str, client_header: str, provider_header: str, provider_value: str
) -> None:
    value = f"Bearer {ALICE}" if client_header == "authorization" else ALICE
    ex, decision = decide(pipeline(), path, {client_header: value})
    assert decision == Phase.NONE
    # Every header a Tollway key could ride in is stripped...
    assert set(CREDENTIAL_HEADERS) <= ex.remove_headers
    # ...and exactly one provider credential header is set.
    assert {h: ex.set_headers[h] for h in CREDENTIAL_HEADERS if h in ex.set_headers} == {
        provider_header: provider_value
    }
    assert_no_key_material(ex, ALICE)


def test_route_without_provider_key_still_strips_the_tollway_key() -> None:
    p = build_pipeline(RECORDS, provider_keys={**PROVIDER_KEYS, "openai": None})
    ex, decision = decide(p, headers=bearer(ALICE))
    assert decision == Phase.NONE
    assert set(CREDENTIAL_HEADERS) <= ex.remove_headers
    assert not set(CREDENTIAL_HEADERS) & set(ex.set_headers)


def test_route_without_auth_passes_without_a_key() -> None:
    ex, decision = decide(pipeline(), "/open/v1/chat/completions", {})
    assert decision == Phase.NONE
    assert ex.identity is None
    assert ex.metadata == {"route": "open", "auth": "disabled"}


def test_route_without_auth_passes_the_clients_own_credential() -> None:
    headers = {"authorization": "Bearer sk-clients-own", "x-api-key": "other"}
    ex, decision = decide(pipeline(), "/open/v1/chat/completions", headers)
    assert decision == Phase.NONE
    assert not set(CREDENTIAL_HEADERS) & ex.remove_headers
    assert not set(CREDENTIAL_HEADERS) & set(ex.set_headers)


def test_route_without_auth_but_with_provider_key_replaces_the_clients_credential() -> None:
    ex, decision = decide(pipeline(), "/open-keyed/x", {"authorization": "Bearer sk-clients-own"})
    assert decision == Phase.NONE
    assert ex.set_headers["authorization"] == "Bearer PK-open-keyed-secret"
    assert set(CREDENTIAL_HEADERS) <= ex.remove_headers


# ---- routing -----------------------------------------------------------------


ANTHROPIC_SDK = {"anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(
    ("path", "headers", "route"),
    [
        ("/v1/chat/completions", {}, "openai"),
        ("/v1/messages", ANTHROPIC_SDK, "anthropic"),
        ("/v1/messages/count_tokens", ANTHROPIC_SDK, "anthropic"),
        ("/v1/models?limit=5", {}, "openai"),
        ("/v1/models?limit=5", ANTHROPIC_SDK, "anthropic"),
        ("/v1/files", ANTHROPIC_SDK, "anthropic"),
        ("/v1/models/gemini-2.5-flash:generateContent", {}, "gemini"),
        ("/v1beta/models", {}, "gemini"),
        ("/openai/deployments/x/embeddings", {}, "azure"),
        ("/openai/v1/models", {}, "openai"),
        ("/anthropic/v1/models", {}, "anthropic"),
        ("/gemini/v1beta/models", {}, "gemini"),
    ],
)
def test_a_request_goes_to_the_provider_it_speaks(
    path: str, headers: dict[str, str], route: str
) -> None:
    ex, decision = decide(pipeline(), path, {**bearer(ALICE), **headers}, method="GET")
    assert decision == Phase.NONE
    assert ex.metadata["route"] == route
    assert "?" not in ex.path


@pytest.mark.parametrize("path", ["/", "/v2/chat/completions", "/v1", "/health", "/V1/models"])
def test_unknown_path_is_404_before_any_stage(path: str) -> None:
    ex, decision = decide(pipeline(), path, bearer(ALICE))
    assert_denied(decision, 404, "unknown_url", "tollway_no_route")
    assert ex.identity is None and ex.set_headers == {}


# ---- model allowlist -------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "key", "wants"),
    [
        ("POST", "/v1/chat/completions", ALICE, Phase.NONE),
        ("POST", "/anthropic/v1/messages", ALICE, Phase.NONE),
        ("POST", "/v1/chat/completions", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/v1/chat/completions?stream=true", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/v1/embeddings", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/v1/responses", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/anthropic/v1/messages", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/anthropic/v1/messages/count_tokens", RESTRICTED, Phase.REQUEST_BODY),
        ("POST", "/v1beta/openai/chat/completions", RESTRICTED, Phase.REQUEST_BODY),
        ("GET", "/v1/models", RESTRICTED, Phase.NONE),
        ("GET", "/v1/chat/completions", RESTRICTED, Phase.NONE),
        # Any body may name a model, so a restricted key has it checked.
        ("POST", "/v1/files", RESTRICTED, Phase.REQUEST_BODY),
    ],
)
def test_only_restricted_keys_buffer_the_body(
    method: str, path: str, key: str, wants: Phase
) -> None:
    ex, decision = decide(pipeline(), path, bearer(key), method=method)
    assert decision == wants
    assert ex.identity is not None


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"model": "gpt-4o-mini", "messages": []}', None, None),
        (b'{"model": "claude-3-5-sonnet-latest"}', None, None),
        (b'{"model": "gpt-4o"}', 403, "model_not_allowed"),
        (b'{"model": "gpt-4o-mini-2"}', 403, "model_not_allowed"),
        (b"", 400, "missing_model"),
        (b"not json", 400, "invalid_body"),
        (b'{"model": "gpt-4o-mini"', 400, "invalid_body"),
        (b'["gpt-4o-mini"]', 400, "invalid_body"),
        (b'"gpt-4o-mini"', 400, "invalid_body"),
        (b"{}", 400, "missing_model"),
        (b'{"model": ""}', 400, "invalid_model"),
        (b'{"model": 4}', 400, "invalid_model"),
        (b'{"model": null}', 400, "invalid_model"),
        (b'{"model": ["gpt-4o-mini"]}', 400, "invalid_model"),
        # Models at any depth, and spelled with JSON escapes, are all checked.
        (b'{"model": "gpt-4o-mini", "tools": [{"model": "gpt-4o"}]}', 403, "model_not_allowed"),
        (b'{"mod\\u0065l": "gpt-4o"}', 403, "model_not_allowed"),
        (b'{"model": "gpt-4o-mini", "mod\\u0065l": "gpt-4o"}', 403, "model_not_allowed"),
        # A repeated name: whichever one a provider's parser keeps, both are checked.
        (b'{"model": "gpt-4o", "model": "gpt-4o-mini"}', 403, "model_not_allowed"),
        (b'{"model": "gpt-4o-mini", "model": "gpt-4o"}', 403, "model_not_allowed"),
        # "model" as a value is not a model.
        (b'{"model": "gpt-4o-mini", "messages": [{"role": "model"}]}', None, None),
        (b'{"model": "gpt-4o-mini", "messages": [{"content": "caf\\u00e9"}]}', None, None),
    ],
)
def test_restricted_key_body_check(body: bytes, status: int | None, code: str | None) -> None:
    p = pipeline()
    run, decision = decide_run(p, headers=bearer(RESTRICTED))
    assert decision == Phase.REQUEST_BODY
    result = run.request_body(body)
    if status is None:
        assert result is None
        assert str(run.ex.metadata["request_model"]) in body.decode()
    else:
        assert code is not None
        deny = assert_denied(result, status, code)
        if status == 403:
            assert deny.type == "permission_error" and "gpt-4o" in deny.message
        else:
            assert deny.type == "invalid_request_error"


def test_unrestricted_key_ignores_the_body() -> None:
    p = pipeline()
    run, decision = decide_run(p, headers=bearer(ALICE))
    assert decision == Phase.NONE  # no flow asked for the body
    assert run.request_body(b"not even json") is None


@pytest.mark.parametrize(
    ("path", "model", "allowed"),
    [
        ("/v1beta/models/gemini-2.0-flash:generateContent", "gemini-2.0-flash", True),
        ("/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse", "gemini-2.0-flash", True),
        ("/v1beta/models/gemini-1.5-pro:generateContent", "gemini-1.5-pro", False),
        ("/v1beta/models/gemini-1.5-pro:countTokens", "gemini-1.5-pro", False),
        ("/openai/deployments/gpt-4o-mini/chat/completions", "gpt-4o-mini", True),
        ("/openai/deployments/gpt-4o/chat/completions", "gpt-4o", False),
        ("/openai/deployments/gpt-4o%2Dmini/chat/completions", "gpt-4o-mini", True),
        ("/v1beta/models/gemini-1.5-pro%3AgenerateContent", "gemini-1.5-pro", False),
        ("/v1beta/tunedModels/my-tune:generateContent", "my-tune", False),
    ],
)
def test_model_in_path_is_decided_at_headers(path: str, model: str, allowed: bool) -> None:
    ex, decision = decide(pipeline(), path, bearer(RESTRICTED))
    assert decision != Phase.REQUEST_BODY
    assert ex.metadata["request_model"] == model
    if allowed:
        assert decision == Phase.NONE
    else:
        deny = assert_denied(decision, 403, "model_not_allowed")
        assert model in deny.message


# ---- metadata --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "route", "provider_header"),
    [
        ("authorization", "openai", "authorization"),
        ("x-api-key", "openai", "authorization"),
        ("api-key", "openai", "authorization"),
        # The Gemini SDK's header says the request speaks Gemini.
        ("x-goog-api-key", "gemini", "x-goog-api-key"),
    ],
)
def test_metadata_names_the_key_and_never_holds_it(
    header: str, route: str, provider_header: str
) -> None:
    value = f"Bearer {BOB}" if header == "authorization" else BOB
    ex, decision = decide(pipeline(), "/v1/models", {header: value})
    assert decision == Phase.NONE
    assert ex.metadata == {
        "route": route,
        "key_id": BOB_RECORD.id,
        "tenant": "globex",
        "key_name": "bob",
        "auth": "ok",
    }
    assert_no_key_material(ex, BOB)
    assert set(ex.set_headers) == {"x-tollway-key-id", "x-tollway-tenant", provider_header}


def test_restricted_key_metadata_after_body_holds_model_not_key() -> None:
    p = pipeline()
    run, _ = decide_run(p, headers={"x-api-key": RESTRICTED})
    ex = run.ex
    assert run.request_body(b'{"model": "gpt-4o-mini"}') is None
    assert ex.metadata["request_model"] == "gpt-4o-mini"
    assert_no_key_material(ex, RESTRICTED)


MULTIPART = "multipart/form-data; boundary=XyZ"


def multipart(**fields: str) -> bytes:
    parts = [
        f'--XyZ\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    return ("".join(parts) + "--XyZ--\r\n").encode()


@pytest.mark.parametrize(
    ("path", "content_type", "body", "status", "code"),
    [
        # Endpoints Tollway has no list for are still checked when the body names a model.
        (
            "/v1/chat/completions/",
            "application/json",
            b'{"model": "gpt-4o"}',
            403,
            "model_not_allowed",
        ),
        ("/v1/files", "application/json", b'{"purpose": "batch"}', None, None),
        ("/v1/files", MULTIPART, multipart(purpose="batch", file="{}"), None, None),
        # Uploads name the model in a form field.
        (
            "/v1/audio/transcriptions",
            MULTIPART,
            multipart(model="gpt-4o", file="RIFF"),
            403,
            "model_not_allowed",
        ),
        (
            "/v1/audio/transcriptions",
            MULTIPART,
            multipart(model="gpt-4o-mini", file="RIFF"),
            None,
            None,
        ),
        ("/v1/audio/transcriptions", MULTIPART, multipart(file="RIFF"), 400, "missing_model"),
        (
            "/v1/images/edits",
            MULTIPART,
            multipart(prompt="x", model="gpt-4o"),
            403,
            "model_not_allowed",
        ),
        ("/v1/images/edits", "multipart/form-data", multipart(model="gpt-4o"), 400, "invalid_body"),
        (
            "/v1/images/variations",
            "application/x-www-form-urlencoded",
            b"n=1&model=gpt-4o",
            403,
            "model_not_allowed",
        ),
        (
            "/v1/images/variations",
            "application/x-www-form-urlencoded",
            b"n=1",
            400,
            "missing_model",
        ),
        # Nested: Anthropic batches and realtime sessions.
        (
            "/anthropic/v1/messages/batches",
            "application/json",
            b'{"requests": [{"custom_id": "a", "params": {"model": "claude-3-haiku"}},'
            b' {"custom_id": "b", "params": {"model": "gpt-4o"}}]}',
            403,
            "model_not_allowed",
        ),
        (
            "/v1/realtime/client_secrets",
            "application/json",
            b'{"session": {"type": "realtime", "model": "gpt-4o"}}',
            403,
            "model_not_allowed",
        ),
        (
            "/v1/realtime/client_secrets",
            "application/json",
            b'{"session": {}}',
            400,
            "missing_model",
        ),
        # A content type Tollway cannot read is fine only if nothing in it says "model".
        ("/v1/uploads/x/parts", "application/octet-stream", b"\x00\x01", None, None),
        ("/v1/uploads/x/parts", "text/plain", b"model=gpt-4o", 400, "invalid_body"),
    ],
)
def test_restricted_key_cannot_bypass_the_allowlist(
    path: str, content_type: str, body: bytes, status: int | None, code: str | None
) -> None:
    p = pipeline()
    run, decision = decide_run(p, path, {**bearer(RESTRICTED), "content-type": content_type})
    assert decision == Phase.REQUEST_BODY
    result = run.request_body(body)
    if code is None:
        assert result is None
    else:
        assert_denied(result, status, code)


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        # A batch names its models inside an uploaded file: nothing to check them on.
        ("/v1/batches", 403, "endpoint_not_allowed"),
        ("/azure/openai/batches", 403, "endpoint_not_allowed"),
        # A Gemini path whose model cannot be read is refused, not passed to the body check.
        ("/v1beta/models/gemini-2.5-pro:x:generateContent", 400, "invalid_model"),
        ("/v1/models/gemini-2.0-flash:x:generateContent", 400, "invalid_model"),
        # Azure deployments, whatever the casing Azure accepts.
        ("/openai/deployments/gpt-4o/chat/completions", 403, "model_not_allowed"),
        ("/azure/openai/Deployments/gpt-4o/chat/completions", 403, "model_not_allowed"),
        # A model in the query string counts too.
        ("/v1/realtime/calls?model=gpt-4o", 403, "model_not_allowed"),
    ],
)
def test_restricted_key_refused_at_headers(path: str, status: int, code: str) -> None:
    _, decision = decide(pipeline(), path, bearer(RESTRICTED))
    assert_denied(decision, status, code)


def test_gemini_key_in_query_is_accepted_and_never_forwarded() -> None:
    path = f"/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key={ALICE}"
    ex, decision = decide(pipeline(), path, {})
    assert decision == Phase.NONE
    assert ex.identity is not None and ex.identity.name == "alice"
    assert (
        ex.set_headers[":path"] == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    )
    assert_no_key_material(ex, ALICE)


def test_gemini_query_key_conflicting_with_header_is_ambiguous() -> None:
    path = f"/v1beta/models/gemini-2.0-flash:generateContent?key={ALICE}"
    _, decision = decide(pipeline(), path, {"x-goog-api-key": BOB})
    assert_denied(decision, 401, "ambiguous_credentials")
