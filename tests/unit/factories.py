"""Builders for the unit tier: records, pipelines and exchanges as plain values.

No sockets, no protobuf (except in test_codec), no real clock: everything a
test needs is made here in one line.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from extproc import keys
from extproc.config import AuthConfig, Config, Credential, Upstream
from extproc.decisions import Deny, Phase
from extproc.exchange import Exchange
from extproc.keys import KeyRecord, KeyRing
from extproc.pipeline import Pipeline, Run
from extproc.routes import RouteTable
from extproc.stages import Stage
from extproc.stages.auth import AuthStage
from extproc.stages.credentials import CredentialStage
from extproc.stages.metering import MeteringStage

NOW = datetime(2025, 1, 15, 12, 0, 0, tzinfo=UTC)

# Provider keys as the CredentialStage sees them; None means "none configured".
PROVIDER_KEYS: dict[str, str | None] = {
    "openai": "PK-openai-secret",
    "anthropic": "PK-anthropic-secret",
    "gemini": "PK-gemini-secret",
    "azure": "PK-azure-secret",
    "open": None,
    "open_keyed": "PK-open-keyed-secret",
}


def upstreams() -> dict[str, Upstream]:
    """One upstream per provider kind, plus two routes with ``auth: false``."""
    return {
        # The three providers as the default config routes them: sharing /v1/.
        **{
            name: upstream.model_copy(update={"credential": None})
            for name, upstream in Config().upstreams.items()
        },
        "azure": Upstream(
            url="https://example.openai.azure.com",
            api="azure",
            prefixes=("/openai/deployments/",),
            mount="/azure",
        ),
        "open": Upstream(url="http://127.0.0.1:9000", prefixes=("/open/",), auth=False),
        "open_keyed": Upstream(url="http://127.0.0.1:9001", prefixes=("/open-keyed/",), auth=False),
    }


def new_key(
    name: str = "alice",
    *,
    tenant: str = "acme",
    models: Sequence[str] = (),
    expires: datetime | None = None,
    revoked: datetime | None = None,
    created: datetime = NOW,
) -> tuple[str, KeyRecord]:
    """A fresh key and its record, as ``tollway keys add`` would make them."""
    key, record = keys.generate(
        name=name, tenant=tenant, models=models, expires=expires, now=created
    )
    if revoked is not None:
        record = replace(record, revoked=revoked)
    return key, record


def unknown_key() -> str:
    """Well-formed, but no keys file holds it."""
    return f"{keys.PREFIX}{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


class Clock:
    """An injected wall clock that a test moves by hand."""

    def __init__(self, at: datetime = NOW) -> None:
        self.now = at.timestamp()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def build_pipeline(
    records: Iterable[KeyRecord] = (),
    provider_keys: Mapping[str, str | None] | None = None,
    clock: Clock | None = None,
    metering: MeteringStage | None = None,
) -> Pipeline:
    """Wired as extproc.runtime.Runtime wires it (metering only when given)."""
    stages: list[Stage] = [
        AuthStage(KeyRing(list(records))),
        CredentialStage(PROVIDER_KEYS if provider_keys is None else provider_keys),
    ]
    if metering is not None:
        stages.append(metering)
    return Pipeline(RouteTable(upstreams()), stages, clock or Clock())


def request(
    pipeline: Pipeline,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    *,
    method: str = "POST",
    repeated: Iterable[str] = (),
) -> Run:
    """A request's run as the codec would start it (lower-case header names)."""
    return pipeline.start(method, path, dict(headers or {}), frozenset(repeated))


def decide_run(
    pipeline: Pipeline,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    **kwargs: object,
) -> tuple[Run, Deny | Phase]:
    """Request headers decided; the body phase (if any) still to come."""
    run = request(pipeline, path, headers, **kwargs)  # type: ignore[arg-type]
    return run, run.request_headers()


def decide(
    pipeline: Pipeline,
    path: str = "/v1/chat/completions",
    headers: Mapping[str, str] | None = None,
    **kwargs: object,
) -> tuple[Exchange, Deny | Phase]:
    run, decision = decide_run(pipeline, path, headers, **kwargs)
    return run.ex, decision


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def runtime_config(
    keys_file: Path, credential_file: Path | None = None, **upstream_fields: object
) -> Config:
    """A Config whose only upstream reads its provider key from a file (never the env)."""
    credential = Credential(file=credential_file) if credential_file is not None else None
    upstream = Upstream(url="https://api.openai.com", credential=credential, **upstream_fields)  # type: ignore[arg-type]
    return Config(auth=AuthConfig(keys_file=keys_file), upstreams={"openai": upstream})
