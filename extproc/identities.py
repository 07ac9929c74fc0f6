"""Who a caller is beyond Tollway keys, and what roles let them do (sans-IO).

Envoy verifies JWTs (jwt_authn) and client certificates; what it found arrives as
plain values (codec.decode_identity). Here they become the same record a key has
(a ``KeyRecord`` of kind ``jwt`` or ``cert``), so limits, redaction, metering and
the access log treat every identity alike; and roles become what a request may
reach: routes, models, a limits and a redaction policy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from .config import CertIdentity, IdentityConfig, JwtProvider, Role
from .keys import NO_LIMITS, KeyLimits, KeyRecord, compile_models, make_record

_EPOCH = datetime.fromtimestamp(0, UTC)
# What a claim may put in a header, a metric label or a limit's key: printable, bounded.
_UNSAFE = re.compile(r"[^\x21-\x7e]")
_MAX_CLAIM = 128


def failed_key(provider: str) -> str:
    """Where jwt_authn writes why a provider's token failed (envoyconf asks it to)."""
    return f"failed:{provider}"


def _clean(value: object) -> str:
    return _UNSAFE.sub("_", str(value))[:_MAX_CLAIM]


@dataclass(frozen=True, slots=True)
class _Grant:
    routes: frozenset[str] | None  # None: every route
    models: re.Pattern[str] | None  # None: every model
    limits: KeyLimits
    redaction: str | None


class Roles:
    """The config's roles, compiled once."""

    def __init__(self, roles: Mapping[str, Role]) -> None:
        self._grants = {name: _grant(role) for name, role in roles.items()}

    def known(self, names: Iterable[str]) -> tuple[str, ...]:
        return tuple(n for n in names if n in self._grants)

    def models_for(
        self, names: Sequence[str], route: str
    ) -> tuple[re.Pattern[str] | None, ...] | None:
        """The model patterns of the roles that grant ``route`` (None in it: any model);
        None when no role does."""
        found = [
            g.models
            for g in (self._grants[n] for n in names if n in self._grants)
            if g.routes is None or route in g.routes
        ]
        return tuple(found) if found else None

    def policies(self, names: Sequence[str]) -> tuple[KeyLimits, str | None]:
        """The limits and redaction policy of the first role that sets each."""
        grants = [self._grants[n] for n in names if n in self._grants]
        limits = next((g.limits for g in grants if g.limits != NO_LIMITS), NO_LIMITS)
        redaction = next((g.redaction for g in grants if g.redaction is not None), None)
        return limits, redaction


def _grant(role: Role) -> _Grant:
    limits = NO_LIMITS
    if role.limits is not None:
        budget = role.limits.budget_usd
        limits = KeyLimits(
            rpm=role.limits.rpm,
            tpm=role.limits.tpm,
            concurrency=role.limits.concurrency,
            budget_usd=Decimal(budget) if budget is not None else None,
            budget_period=role.limits.budget_period,
        )
    return _Grant(
        routes=frozenset(role.routes) if role.routes else None,
        models=compile_models(role.models),
        limits=limits,
        redaction=role.redaction,
    )


class Identities:
    """JWT claims and certificate names to records, by the config's identity section."""

    def __init__(self, config: IdentityConfig, roles: Roles) -> None:
        self._jwt = dict(config.jwt)
        self._certs = dict(config.certs)
        self.roles = roles

    def from_jwt(self, found: Mapping[str, Any]) -> KeyRecord | str | None:
        """The record of a verified token; why a token failed; None without a token."""
        for name, provider in self._jwt.items():
            claims = found.get(name)
            if isinstance(claims, dict):
                if not _claim(claims, provider.claims.user):
                    return f"it has no '{provider.claims.user}' claim to say who it is"
                return self._record("jwt", name, provider, claims)
        for name in self._jwt:
            failed = found.get(failed_key(name))
            if isinstance(failed, dict):
                return str(failed.get("message") or "Jwt verification fails")
        return None

    def from_cert(self, names: Sequence[str]) -> KeyRecord | None:
        """The record of the first client-certificate SAN the config knows."""
        for san in names:
            who = self._certs.get(san)
            if who is not None:
                return self._cert_record(san, who)
        return None

    def _record(
        self,
        kind: Literal["jwt"],
        provider_name: str,
        provider: JwtProvider,
        claims: dict[str, Any],
    ) -> KeyRecord:
        names = provider.claims
        user = _clean(_claim(claims, names.user) or "")
        tenant = _clean(_claim(claims, names.tenant) or "") if names.tenant else ""
        roles = _role_names(_claim(claims, names.roles)) if names.roles else ()
        return self._make(kind, f"jwt:{provider_name}:{user}", user, tenant, roles)

    def _cert_record(self, san: str, who: CertIdentity) -> KeyRecord:
        user = _clean(who.user or san)
        return self._make("cert", f"cert:{_clean(san)}", user, who.tenant, who.roles)

    def _make(
        self,
        kind: Literal["jwt", "cert"],
        record_id: str,
        user: str,
        tenant: str,
        roles: Sequence[str],
    ) -> KeyRecord:
        known = self.roles.known(roles)
        limits, redaction = self.roles.policies(known)
        return make_record(
            name=user,
            tenant=tenant,
            digest="",
            key_id=record_id,
            created=_EPOCH,
            limits=limits,
            redaction=redaction,
            roles=known,
            kind=kind,
        )


def _claim(claims: Mapping[str, Any], path: str | None) -> Any:
    """A claim by name; dots reach into objects (``realm_access.roles``)."""
    if not path:
        return None
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _role_names(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, list):
        return tuple(str(v) for v in value if isinstance(v, str | int))
    return ()
