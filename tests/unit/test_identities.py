"""Roles and the identities Envoy verified, as plain values (stages/auth.py, identities.py)."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest

from extproc import keys
from extproc.config import CertIdentity, IdentityConfig, JwtProvider, Role, RoleLimits
from extproc.decisions import Deny
from extproc.exchange import Exchange
from extproc.identities import Identities, Roles
from extproc.keys import KeyRing
from extproc.routes import RouteTable
from extproc.stages.auth import AuthStage

from .factories import NOW, bearer, upstreams

ROLES = Roles(
    {
        "chat": Role(routes=("openai",), models=("gpt-4o-mini", "claude-*")),
        "anything": Role(),
        "capped": Role(
            routes=("openai",),
            models=("gpt-4o-mini",),
            limits=RoleLimits(rpm=5, budget_usd=Decimal("1.5"), budget_period="day"),
        ),
        "private": Role(redaction="strict"),
    }
)
PROVIDER = JwtProvider(
    issuer="https://idp",
    audiences=("tollway",),
    jwks_file="jwks.json",  # type: ignore[arg-type]
    claims={"tenant": "org.id", "roles": "realm.roles"},  # type: ignore[arg-type]
)
IDENTITIES = Identities(
    IdentityConfig(
        jwt={"corp": PROVIDER},
        certs={"spiffe://corp/api": CertIdentity(tenant="billing", roles=("chat",))},
    ),
    ROLES,
)


def test_roles_grant_per_route_and_the_first_role_with_a_policy_sets_it() -> None:
    assert ROLES.models_for(("chat",), "anthropic") is None  # not this route
    (pattern,) = ROLES.models_for(("chat",), "openai") or ()
    assert (
        pattern is not None and pattern.fullmatch("claude-3-haiku") and not pattern.fullmatch("o1")
    )
    assert ROLES.models_for(("chat", "anything"), "anthropic") == (None,)
    limits, redaction = ROLES.policies(("private", "capped", "anything"))
    assert (limits.rpm, limits.budget_usd, redaction) == (5, Decimal("1.5"), "strict")
    assert ROLES.known(("chat", "admin")) == ("chat",)


def test_claims_make_a_record_and_unknown_roles_are_dropped() -> None:
    claims = {"sub": "u 1\r\nx", "org": {"id": "acme"}, "realm": {"roles": ["chat", "root"]}}
    record = IDENTITIES.from_jwt({"corp": claims})
    assert isinstance(record, keys.KeyRecord)
    assert (record.kind, record.tenant, record.roles) == ("jwt", "acme", ("chat",))
    assert record.name == "u_1__x" and record.id == "jwt:corp:u_1__x"  # safe in a header
    failed = {"failed:corp": {"code": 16, "message": "Jwt is expired"}}
    assert IDENTITIES.from_jwt(failed) == "Jwt is expired"
    assert IDENTITIES.from_jwt({}) is None
    assert IDENTITIES.from_jwt({"corp": {"org": {"id": "x"}}}) == (
        "it has no 'sub' claim to say who it is"
    )


def test_a_certificate_is_known_by_its_san() -> None:
    record = IDENTITIES.from_cert(("spiffe://corp/other", "spiffe://corp/api"))
    assert record is not None and (record.kind, record.tenant) == ("cert", "billing")
    assert record.name == "spiffe://corp/api"
    assert IDENTITIES.from_cert(("api.corp.internal",)) is None


def _exchange(path: str, headers: dict[str, str], **extra: Any) -> Exchange:
    routes = RouteTable(upstreams())
    call = routes.match("POST", path, headers, "")
    ex = Exchange("POST", path, "", headers, frozenset(), call, NOW.timestamp())
    for name, value in extra.items():
        setattr(ex, name, value)
    return ex


def test_a_keys_roles_limit_it_and_lend_their_policies() -> None:
    key, record = keys.generate(name="svc", roles=["chat", "capped"])
    stage = AuthStage(KeyRing([record]), IDENTITIES)
    ex = _exchange("/v1/chat/completions", bearer(key))
    assert stage.start(ex) is not None  # both roles restrict models: the body is checked
    assert ex.identity is not None and ex.identity.limits.rpm == 5
    ex = _exchange("/v1/messages", {**bearer(key), "anthropic-version": "2023-06-01"})
    denied = stage.start(ex)
    assert isinstance(denied, Deny) and denied.code == "route_not_allowed"


def test_a_key_without_roles_is_as_before() -> None:
    key, record = keys.generate(name="old")
    stage = AuthStage(KeyRing([record]), IDENTITIES)
    assert stage.start(_exchange("/v1/messages", {**bearer(key), "anthropic-version": "1"})) is None


@pytest.mark.parametrize("route_path", ["/v1/chat/completions"])
def test_a_jwt_on_a_route_that_takes_keys_only_is_no_caller(route_path: str) -> None:
    stage = AuthStage(KeyRing([]), IDENTITIES)
    claims = {"corp": {"sub": "u1", "realm": {"roles": ["anything"]}}}
    denied = stage.start(_exchange(route_path, {}, jwt=claims))  # (identities: key only)
    assert isinstance(denied, Deny) and denied.code == "missing_api_key"


def test_a_path_without_a_route_is_no_route_a_role_could_deny() -> None:
    key, record = keys.generate(name="svc", roles=["chat"])
    stage = AuthStage(KeyRing([record]), IDENTITIES)
    ex = _exchange("/nowhere", bearer(key))
    assert ex.route is None
    assert stage.start(ex) is None  # (Envoy's 404, as for a key without roles)
