"""Tollway's YAML configuration: validated once at start-up, with errors that
name the file, the key and what is wrong.

Environment overrides use the key path in capitals with double underscores,
e.g. ``TOLLWAY__SERVER__PORT=50052`` or ``TOLLWAY__AUTH__KEYS_FILE=/etc/keys.yaml``;
values are parsed as YAML scalars. Secrets never live in the file: provider
credentials are named by environment variable or file.
"""

from __future__ import annotations

import ipaddress
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from . import yamltext
from .kinds import ApiKind
from .redaction.findings import DEFAULT_ENTITIES, ENTITIES

ENV_PREFIX = "TOLLWAY__"
_M = TypeVar("_M", bound=BaseModel)
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024
_HEADER_NAME = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")
# More replicas than this on one machine is more processes than cores to run them on.
MAX_REPLICAS = 32


# The header each provider reads its key from; "authorization" gets "Bearer ".
PROVIDER_KEY_HEADER: dict[str, str] = {
    "openai": "authorization",
    "azure": "api-key",
    "anthropic": "x-api-key",
    "gemini": "x-goog-api-key",
}
# Every header a client SDK may carry its key in (OpenAI, Anthropic, Azure, Gemini).
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key")


class ConfigError(Exception):
    """A configuration problem, phrased for the operator."""


def _as_dict(value: Any) -> dict[str, Any]:
    """A section of the config as a dict, whether given as one or as a model."""
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    return dict(value or {})


def _is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLSFiles(_Model):
    cert_file: Path
    key_file: Path
    # When set, peers must present a certificate signed by this CA (mTLS).
    client_ca_file: Path | None = None
    # server.tls only: the names (DNS, URI or IP SANs) a client certificate must carry
    # one of; empty: any certificate client_ca_file signed.
    client_sans: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _sans_need_ca(self) -> TLSFiles:
        if self.client_sans and self.client_ca_file is None:
            raise ValueError("client_sans needs client_ca_file (client certificates)")
        return self


class TLSDir(_Model):
    """``tls: {dir: ./tls}``: the files `tollway certs --dir` makes (see certs.py),
    for the front door (HTTPS), Tollway's gRPC port (mTLS; only Envoy's certificate
    is accepted) and Envoy's connection to it. envoy.tls, server.tls or
    envoy.extproc_client_tls set as well win over what it would set."""

    dir: Path


class ExtprocClientTLS(_Model):
    """How Envoy connects to Tollway when ``server.tls`` is set."""

    ca_file: Path  # verifies Tollway's certificate
    # Envoy's own certificate, needed when server.tls.client_ca_file asks for one (mTLS).
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name Tollway's certificate must carry (default: the host Envoy dials).
    server_name: str | None = None

    @model_validator(mode="after")
    def _cert_with_key(self) -> ExtprocClientTLS:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither")
        return self


class ServerConfig(_Model):
    """The ext_proc gRPC server that Envoy calls."""

    address: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    # How many `tollway serve` processes `tollway up` runs behind its one Envoy; replica i
    # (from 0) listens on port + i and metrics.port + i, or free ports when those are taken.
    # Compose and Kubernetes run one process per container and scale containers instead.
    replicas: int = Field(1, ge=1, le=MAX_REPLICAS)
    # h2: Tollway's own small gRPC server (asyncio + h2), about twice as fast;
    # grpcio: grpc.aio, the fallback.
    transport: Literal["h2", "grpcio"] = "h2"
    tls: TLSFiles | None = None
    # Plaintext gRPC is refused on non-loopback addresses unless this is true
    # (e.g. inside a private container network).
    allow_plaintext: bool = False
    # After SIGTERM: report NOT_SERVING for this long (so Envoy's health check
    # moves traffic away), then stop accepting streams and let in-flight ones
    # finish for at most drain_timeout_s.
    drain_delay_s: float = Field(2.0, ge=0)
    drain_timeout_s: float = Field(20.0, ge=0)
    # How often the keys and credential files are checked for changes.
    reload_interval_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _plaintext_only_on_loopback(self) -> ServerConfig:
        if self.tls is None and not self.allow_plaintext and not _is_loopback(self.address):
            raise ValueError(
                f"address {self.address!r} is not loopback: configure server.tls "
                "or set server.allow_plaintext: true"
            )
        return self


class MetricsConfig(_Model):
    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535)


class AuthConfig(_Model):
    keys_file: Path = Path("tollway-keys.yaml")


class SecretSource(_Model):
    """A secret read at start: from an environment variable or a file."""

    env: str | None = None
    file: Path | None = None

    @model_validator(mode="after")
    def _exactly_one_source(self) -> SecretSource:
        if (self.env is None) == (self.file is None):
            raise ValueError("set exactly one of 'env' or 'file'")
        return self


class Credential(SecretSource):
    """Where the provider's key comes from: an environment variable or a file."""

    # Override the header the key is sent in (default: the provider's own).
    header: str | None = None


class Upstream(_Model):
    """A provider API that Envoy routes to."""

    url: str
    api: ApiKind = "openai"
    # A prefix of this upstream's own, removed before the request goes upstream:
    # with mount "/anthropic", /anthropic/v1/messages is sent as /v1/messages.
    # (Declared before `prefixes`, which may be empty only when there is a mount.)
    mount: str | None = None
    # Path prefixes routed to this upstream; the longest match wins. Upstreams of
    # different APIs may share a prefix: a request goes to the one it speaks
    # (see routes.py: Anthropic by its header, Gemini by its path or key, else OpenAI).
    # Empty with a mount: only the mount reaches it (Azure OpenAI under /azure).
    prefixes: tuple[str, ...] = ("/v1/",)
    credential: Credential | None = None
    # Turning auth off must be explicit: such a route needs no Tollway key.
    auth: bool = True
    # Who may call it: a Tollway key, a JWT Envoy verified (identity.jwt), a front-door
    # client certificate (identity.certs); tried in this order: jwt, key, cert.
    identities: tuple[Literal["key", "jwt", "cert"], ...] = ("key",)
    # False: prompts to this upstream are not redacted, whatever the key's policy
    # (e.g. a model served in-house).
    redaction: bool = True
    timeout_s: float = Field(600.0, gt=0)
    # Which of the price table's provider names to try first for this upstream's
    # models (`vertex_ai` tries `vertex_ai/<model>`); "" for none. Unset: `azure` for
    # api azure, `vertex_ai` for a Gemini upstream on *aiplatform.googleapis.com.
    prices: str | None = Field(None, pattern=r"^[a-z0-9_.-]*$")

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        try:
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return url.rstrip("/")

    @field_validator("prefixes")
    @classmethod
    def _check_prefixes(cls, prefixes: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        if not prefixes and info.data.get("mount") is None:
            raise ValueError("needs at least one path prefix, or a mount")
        for prefix in prefixes:
            if not prefix.startswith("/"):
                raise ValueError(f"prefix {prefix!r} must start with '/'")
        return prefixes

    @field_validator("mount")
    @classmethod
    def _check_mount(cls, mount: str | None) -> str | None:
        if mount is None:
            return None
        if not mount.startswith("/") or mount == "/" or mount.endswith("/"):
            raise ValueError("must start with '/' and not end with '/' (e.g. /anthropic)")
        return mount

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def tls(self) -> bool:
        return urlsplit(self.url).scheme == "https"

    @property
    def base_path(self) -> str:
        return urlsplit(self.url).path.rstrip("/")

    @property
    def key_header(self) -> str:
        if self.credential is not None and self.credential.header:
            return self.credential.header.lower()
        return PROVIDER_KEY_HEADER[self.api]


class EnvoyConfig(_Model):
    """The front door that `tollway up` and compose run."""

    address: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    admin_address: str = "127.0.0.1"
    admin_port: int = Field(9901, ge=0, le=65535)
    # A listener (on `address`) that serves Envoy's Prometheus stats and nothing else of
    # the admin interface, for scrapers when the admin stays on loopback (Kubernetes).
    stats_port: int | None = Field(None, ge=1, le=65535)
    # Downstream TLS (clients to Envoy); plaintext when absent.
    tls: TLSFiles | None = None
    # Envoy worker threads; 1 leaves the most CPU for Tollway on small hosts.
    concurrency: int = Field(1, ge=1)
    # TLS from Envoy to Tollway; required when server.tls is set.
    extproc_client_tls: ExtprocClientTLS | None = None
    # Hostname Envoy uses to reach Tollway (compose: the service name).
    extproc_host: str | None = None
    # Request header limits (Envoy's max_headers_count and max_request_headers_kb). Envoy
    # checks them on what the client sends (431) and again after Tollway's header edits, so
    # Tollway answers 431 itself when its edits would cross them.
    max_request_headers: int = Field(100, ge=32, le=10000)
    max_request_headers_kb: int = Field(60, ge=8, le=8192)
    # How long Envoy waits for Tollway's answer to one message before failing closed (503).
    # The timer restarts on every message; a whole 10 MiB body is one message (~0.1 s alone,
    # under 1 s with 8 at once on 2 cores).
    extproc_message_timeout_s: float = Field(2.0, gt=0, le=60)


# The paths each provider's SDK calls by default. All three speak /v1/: requests
# there go to the provider they speak (see routes.py).
DEFAULT_PREFIXES: dict[str, tuple[str, ...]] = {
    "openai": ("/v1/",),
    "anthropic": ("/v1/",),
    "gemini": ("/v1/", "/v1beta/", "/v1alpha/"),
}


def _default_upstreams() -> dict[str, Upstream]:
    return {
        "openai": Upstream(
            url="https://api.openai.com",
            api="openai",
            prefixes=DEFAULT_PREFIXES["openai"],
            mount="/openai",
            credential=Credential(env="OPENAI_API_KEY"),
        ),
        "anthropic": Upstream(
            url="https://api.anthropic.com",
            api="anthropic",
            prefixes=DEFAULT_PREFIXES["anthropic"],
            mount="/anthropic",
            credential=Credential(env="ANTHROPIC_API_KEY"),
        ),
        "gemini": Upstream(
            url="https://generativelanguage.googleapis.com",
            api="gemini",
            prefixes=DEFAULT_PREFIXES["gemini"],
            mount="/gemini",
            credential=Credential(env="GEMINI_API_KEY"),
        ),
    }


class Rates(_Model):
    """USD per 1M tokens of each kind a provider bills at its own rate.

    Only ``input`` is required. A kind without a rate is billed at the rate it is
    a part of (cached audio -> cached -> input, a 1-hour cache write -> cache
    write -> input, audio input -> input, audio output -> output), and its tokens
    are counted as unpriced: the provider's bill may differ. Reasoning without a
    rate of its own is output, as every provider bills it.
    """

    input: float = Field(ge=0)
    output: float = Field(0, ge=0)
    cached_input: float | None = Field(None, ge=0)
    cache_write: float | None = Field(None, ge=0)  # the default lifetime (Anthropic: 5 minutes)
    cache_write_1h: float | None = Field(None, ge=0)
    reasoning: float | None = Field(None, ge=0)
    input_audio: float | None = Field(None, ge=0)
    input_image: float | None = Field(None, ge=0)
    input_video: float | None = Field(None, ge=0)
    cached_input_audio: float | None = Field(None, ge=0)
    cached_input_image: float | None = Field(None, ge=0)
    output_audio: float | None = Field(None, ge=0)
    output_image: float | None = Field(None, ge=0)


class LongContextPrice(Rates):
    # Above this many input tokens, these rates price the whole request.
    threshold: int = Field(gt=0)


class TierPrice(Rates):
    long_context: LongContextPrice | None = None


# The tiers a response may say served it, as Usage.service_tier names them.
SERVICE_TIERS = ("flex", "priority", "batch")
ServiceTier = Literal["flex", "priority", "batch"]


class ModelPrice(TierPrice):
    provider: str | None = None
    # Rates of the tiers other than standard (OpenAI and Gemini flex and priority...).
    service_tiers: dict[ServiceTier, TierPrice] = Field(default_factory=dict)
    # Other names of the model (dated snapshots with the same price...).
    aliases: tuple[str, ...] = ()
    # Where the prices came from (a LiteLLM entry, an override); shown by `tollway prices`.
    source: str | None = None


class PricingConfig(_Model):
    # A price table in prices.yaml's format (`tollway prices --update-from ... --output`)
    # read instead of the shipped one.
    table_file: Path | None = None
    # A LiteLLM model_prices_and_context_window.json, read over the (shipped) table.
    litellm_file: Path | None = None
    # Custom models and overrides, over both.
    models: dict[str, ModelPrice] = Field(default_factory=dict)
    # x-tollway-cost-usd on non-streaming JSON responses.
    cost_header: bool = True


# What a limit can count by. header:<name> counts only authenticated callers,
# per tenant, so a client cannot dodge a limit by changing the header.
LIMIT_DIMENSIONS = ("key", "tenant", "model", "route", "client_ip")
RATE_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
_RULE_NAME = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class LimitMatch(_Model):
    """Which requests a rule applies to; an empty list matches all."""

    routes: tuple[str, ...] = ()
    tenants: tuple[str, ...] = ()
    keys: tuple[str, ...] = ()  # key ids
    models: tuple[str, ...] = ()  # * wildcards


class LimitRule(_Model):
    """One limit: exactly one of requests, tokens, concurrent or budget_usd."""

    name: str = Field(pattern=_RULE_NAME)
    by: tuple[str, ...] = ()  # empty: one counter for every request the rule matches
    match: LimitMatch = Field(default_factory=LimitMatch)
    requests: int | None = Field(None, gt=0)
    tokens: int | None = Field(None, gt=0)
    count: Literal["input", "output", "total"] = "total"  # which tokens a token rule counts
    concurrent: int | None = Field(None, gt=0)
    budget_usd: Decimal | None = Field(None, gt=0, decimal_places=6)
    per: Literal["second", "minute", "hour", "day", "month"] | None = None
    timezone: str = "UTC"  # where a budget's day or month begins
    warn_at: float = Field(0.8, gt=0, le=1)  # a budget's warning threshold (a metric)
    shadow: bool = False  # count would-be denials, deny nothing
    # Default: budgets fail closed (money is a promise), rates and concurrency open
    # (a store outage must not take every model offline).
    on_store_error: Literal["fail_open", "fail_closed"] | None = None

    @property
    def kind(self) -> Literal["requests", "tokens", "concurrent", "budget"]:
        if self.requests is not None:
            return "requests"
        if self.tokens is not None:
            return "tokens"
        return "concurrent" if self.concurrent is not None else "budget"

    @property
    def fails_closed(self) -> bool:
        if self.on_store_error is None:
            return self.kind == "budget"
        return self.on_store_error == "fail_closed"

    @model_validator(mode="after")
    def _check(self) -> LimitRule:
        amounts = [self.requests, self.tokens, self.concurrent, self.budget_usd]
        if sum(a is not None for a in amounts) != 1:
            raise ValueError("set exactly one of requests, tokens, concurrent, budget_usd")
        kind = self.kind
        if kind == "concurrent" and self.per is not None:
            raise ValueError("a concurrent limit has no period: remove per")
        if kind in ("requests", "tokens") and self.per not in RATE_PERIODS:
            raise ValueError(f"a {kind} limit needs per: second, minute, hour or day")
        if kind == "budget" and self.per not in ("day", "month"):
            raise ValueError("a budget needs per: day or month (calendar, in its timezone)")
        try:
            ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown timezone {self.timezone!r}") from None
        for dimension in self.by:
            name = dimension.removeprefix("header:")
            if dimension.startswith("header:"):
                if not name or name != name.lower() or not _HEADER_NAME.fullmatch(name):
                    raise ValueError(f"by: {dimension!r}: a lower-case header name")
            elif dimension not in LIMIT_DIMENSIONS:
                choices = ", ".join((*LIMIT_DIMENSIONS, "header:<name>"))
                raise ValueError(f"by: {dimension!r} is not one of {choices}")
        if len(set(self.by)) != len(self.by):
            raise ValueError("by: a dimension is listed twice")
        return self


class Reservations(_Model):
    """What a request reserves before its usage is known (see README: Limits)."""

    # Output tokens reserved for a request that sets no cap of its own.
    default_output_tokens: int = Field(4096, ge=0)


RedactionAction = Literal["mask", "placeholder", "hash", "block"]
_DEFAULT_PHONE_REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP")
_CUSTOM_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def _block_secrets() -> dict[str, RedactionAction]:
    return {"secrets": "block"}


class CustomPattern(_Model):
    name: str  # the entity type it reports: in actions, placeholders and metrics
    pattern: str

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        if not _CUSTOM_NAME.fullmatch(name) or name in ENTITIES:
            raise ValueError(
                f"{name!r}: use lower-case letters, digits and '_' (at most 40), "
                "not a built-in entity's name"
            )
        return name


class RedactionConfig(_Model):
    """What is found in prompts and what replaces it (see README: Redaction)."""

    entities: tuple[str, ...] = DEFAULT_ENTITIES
    action: RedactionAction = "placeholder"
    actions: dict[str, RedactionAction] = Field(default_factory=_block_secrets)
    phone_regions: tuple[str, ...] = _DEFAULT_PHONE_REGIONS
    responses: bool = False  # also redact what the model answers
    restore: bool = False  # put the originals back into the answer, for placeholders
    custom: tuple[CustomPattern, ...] = ()
    # A gitleaks config (TOML) whose rules find more secrets (entity `secrets`).
    gitleaks_file: Path | None = None
    on_error: Literal["fail_closed", "fail_open"] = "fail_closed"
    # The key of the `hash` action's HMAC (in a policy: default the main block's).
    hash_key: SecretSource | None = None
    tenants: tuple[str, ...] = ()  # in redaction_policies: the tenants it is for

    @field_validator("entities")
    @classmethod
    def _check_entities(cls, entities: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [e for e in entities if e not in ENTITIES]
        if unknown:
            raise ValueError(
                f"unknown entity type(s) {', '.join(unknown)}: use {', '.join(ENTITIES)} "
                "(custom patterns are always on)"
            )
        return tuple(dict.fromkeys(entities))

    @field_validator("phone_regions")
    @classmethod
    def _check_regions(cls, regions: tuple[str, ...]) -> tuple[str, ...]:
        import phonenumbers

        unknown = [r for r in regions if r.upper() not in phonenumbers.SUPPORTED_REGIONS]
        if unknown:
            raise ValueError(f"unknown region(s) {', '.join(unknown)}: use ISO codes (US, DE)")
        return tuple(r.upper() for r in regions)

    @model_validator(mode="after")
    def _check_actions(self) -> RedactionConfig:
        names = [c.name for c in self.custom]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"custom pattern names must be unique: {', '.join(twice)}")
        known = (*ENTITIES, *names)
        unknown = [e for e in self.actions if e not in known]
        if unknown:
            raise ValueError(f"actions for unknown entity type(s): {', '.join(unknown)}")
        return self


class SentinelConfig(_Model):
    master: str  # the monitored master's name
    nodes: tuple[str, ...] = Field(min_length=1)  # sentinels, "host:port"

    @field_validator("nodes")
    @classmethod
    def _check_nodes(cls, nodes: tuple[str, ...]) -> tuple[str, ...]:
        for node in nodes:
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"sentinel {node!r}: use host:port")
        return nodes


class RedisConfig(_Model):
    """The shared store (limits, budgets, spend) for all replicas.

    ``url``: redis:// or rediss:// (TLS), optionally user:password@ and a
    database, or unix:///path/redis.sock?db=0 (a local server); with
    ``cluster`` any one node; with ``sentinel`` the URL gives
    only credentials, database and TLS. Keep the password out of the file:
    ``password_env`` names a variable that holds it.
    """

    url: str = "redis://127.0.0.1:6379/0"
    password_env: str | None = None
    cluster: bool = False
    sentinel: SentinelConfig | None = None
    timeout_ms: int = Field(100, ge=1, le=10_000)  # per call; the breaker handles the rest
    hash_tag: str = "tollway"  # every key's {tag}: one Cluster slot
    clock: Literal["server", "caller"] = "server"
    max_connections: int = Field(64, ge=1)  # redis-py pool: Cluster, Sentinel (one node: 1)
    breaker_failures: int = Field(5, ge=1)
    breaker_cool_down_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> RedisConfig:
        scheme = urlsplit(self.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("url: use redis://, rediss:// or unix:// (a local socket)")
        if scheme == "unix" and (self.cluster or self.sentinel is not None):
            raise ValueError("url: unix:// is for one local server, not a cluster or sentinel")
        if self.cluster and self.sentinel is not None:
            raise ValueError("choose cluster or sentinel, not both")
        if not self.hash_tag or "{" in self.hash_tag or "}" in self.hash_tag:
            raise ValueError("hash_tag: a non-empty name without braces")
        return self


class StoreConfig(_Model):
    """Where limits and budgets live: Redis when ``redis`` is set, else this process
    (budget spend saved to ``budgets_file``, by default next to the keys file)."""

    redis: RedisConfig | None = None
    budgets_file: Path | None = None
    persist_every_s: float = Field(5.0, gt=0)


class ClaimNames(_Model):
    """Which claims of a verified JWT say who the caller is (dots reach into objects)."""

    user: str = "sub"
    tenant: str | None = None
    roles: str | None = None  # a list of names, or one string of names with spaces


class JwtProvider(_Model):
    """A token issuer whose JWTs Envoy verifies (jwt_authn); Tollway reads the claims."""

    issuer: str
    audiences: tuple[str, ...] = Field(min_length=1)  # one must be in the token's aud
    jwks_file: Path | None = None  # the issuer's public keys, or:
    jwks_uri: str | None = None  # fetched by Envoy, and cached for jwks_cache_s
    jwks_cache_s: int = Field(600, ge=1)
    clock_skew_s: int = Field(60, ge=0)  # allowed for exp and nbf
    claims: ClaimNames = Field(default_factory=ClaimNames)

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtProvider:
        if (self.jwks_file is None) == (self.jwks_uri is None):
            raise ValueError("set exactly one of jwks_file and jwks_uri")
        if self.jwks_uri is not None:
            parts = urlsplit(self.jwks_uri)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("jwks_uri: must be an http:// or https:// URL")
        return self


class CertIdentity(_Model):
    """Who a front-door client certificate's SAN is."""

    tenant: str = ""
    user: str | None = None  # default: the SAN itself
    roles: tuple[str, ...] = ()


class IdentityConfig(_Model):
    """Identities beyond Tollway keys, for routes that accept them (upstreams.X.identities)."""

    jwt: dict[str, JwtProvider] = Field(default_factory=dict)
    # By the URI or DNS SAN of a certificate envoy.tls.client_ca_file signed.
    certs: dict[str, CertIdentity] = Field(default_factory=dict)


class RoleLimits(_Model):
    """A role's limits for each identity that has it, as a key's own (tollway keys limits)."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    concurrency: int | None = Field(None, ge=1)
    budget_usd: Decimal | None = Field(None, gt=0)
    budget_period: Literal["day", "month"] | None = None


class Role(_Model):
    """What an identity with this role may do."""

    models: tuple[str, ...] = ()  # * wildcards; empty: every model
    routes: tuple[str, ...] = ()  # upstream names; empty: every route
    limits: RoleLimits | None = None
    redaction: str | None = None  # a policy of redaction_policies


STDOUT = Path("-")  # a path that means standard output (audit.file)


class AuditConfig(_Model):
    """The audit log (see audit.py): JSON lines of key changes, reloads and denials."""

    enabled: bool = True
    # "-": standard output (containers, systemd); else a file, mode 0600, rotated by size.
    # The `tollway keys` commands append to the same file (to stderr when it is "-").
    file: Path = STDOUT
    max_bytes: int = Field(100 * 1024 * 1024, ge=4096)
    backups: int = Field(5, ge=1, le=100)
    # A flood of denials cannot fill the disk: each kind (an auth failure's reason, a
    # limit rule) writes at most `denials_burst` lines at once and `denials_per_s` after;
    # what is held back is counted in one "suppressed" line every `summary_interval_s`.
    denials_per_s: float = Field(5.0, gt=0)
    denials_burst: int = Field(50, ge=1)
    summary_interval_s: float = Field(10.0, gt=0)


class Config(_Model):
    server: ServerConfig = Field(default_factory=ServerConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    envoy: EnvoyConfig = Field(default_factory=EnvoyConfig)
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024, le=1024**3)
    upstreams: dict[str, Upstream] = Field(default_factory=_default_upstreams)
    pricing: PricingConfig = Field(default_factory=PricingConfig)
    limits: tuple[LimitRule, ...] = ()
    reservations: Reservations = Field(default_factory=Reservations)
    # Off unless set (`redaction: {}` is on with the defaults). Policies are whole
    # blocks that a key (its `redaction` name) or a tenant selects instead.
    redaction: RedactionConfig | None = None
    redaction_policies: dict[str, RedactionConfig] = Field(default_factory=dict)
    tls: TLSDir | None = None
    identity: IdentityConfig = Field(default_factory=IdentityConfig)
    roles: dict[str, Role] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_identity(self) -> Config:
        for name, role in self.roles.items():
            for route in role.routes:
                if route not in self.upstreams:
                    raise ValueError(f"roles.{name}.routes: no upstream {route!r}")
            if role.redaction is not None and role.redaction not in self.redaction_policies:
                raise ValueError(f"roles.{name}.redaction: no policy {role.redaction!r}")
        for san, who in self.identity.certs.items():
            unknown = [r for r in who.roles if r not in self.roles]
            if unknown:
                raise ValueError(f"identity.certs.{san}.roles: no role {unknown[0]!r}")
        for name, upstream in self.upstreams.items():
            if "jwt" in upstream.identities and not self.identity.jwt:
                raise ValueError(f"upstreams.{name}.identities: jwt needs identity.jwt")
            if "cert" in upstream.identities:
                tls = self.envoy.tls
                if not self.identity.certs or tls is None or tls.client_ca_file is None:
                    raise ValueError(
                        f"upstreams.{name}.identities: cert needs identity.certs and "
                        "envoy.tls.client_ca_file"
                    )
        return self

    @model_validator(mode="before")
    @classmethod
    def _tls_from_dir(cls, data: Any) -> Any:
        tls = data.get("tls") if isinstance(data, dict) else None
        folder = tls.get("dir") if isinstance(tls, dict) else getattr(tls, "dir", None)
        if folder is None:
            return data
        from .certs import CA, ENVOY_CLIENT, ENVOY_NAME, FRONT_DOOR, TOLLWAY, files

        folder = Path(folder)
        ca = files(folder, CA).cert
        front, tollway, client = (files(folder, s) for s in (FRONT_DOOR, TOLLWAY, ENVOY_CLIENT))
        server, envoy = _as_dict(data.get("server")), _as_dict(data.get("envoy"))
        defaults = (
            (server, "tls", {
                "cert_file": tollway.cert,
                "key_file": tollway.key,
                "client_ca_file": ca,
                "client_sans": [ENVOY_NAME],
            }),
            (envoy, "tls", {"cert_file": front.cert, "key_file": front.key}),
            (envoy, "extproc_client_tls", {
                "ca_file": ca, "cert_file": client.cert, "key_file": client.key,
            }),
        )  # fmt: skip
        for section, name, value in defaults:
            if section.get(name) is None:
                section[name] = value
        return {**data, "server": server, "envoy": envoy}

    audit: AuditConfig = Field(default_factory=AuditConfig)

    @field_validator("limits")
    @classmethod
    def _check_limits(cls, limits: tuple[LimitRule, ...]) -> tuple[LimitRule, ...]:
        names = [rule.name for rule in limits]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"rule names must be unique: {', '.join(twice)}")
        return limits

    @model_validator(mode="after")
    def _replica_ports_exist(self) -> Config:
        # Replica i listens on port + i (see server.replicas); 0 means "any free port".
        last = self.server.replicas - 1
        for name, port in (("server.port", self.server.port), ("metrics.port", self.metrics.port)):
            if port and port + last > 65535:
                raise ValueError(f"{name} {port} + {last} (server.replicas - 1) is above 65535")
        return self

    store: StoreConfig = Field(default_factory=StoreConfig)

    @model_validator(mode="after")
    def _check_redaction(self) -> Config:
        main_key = self.redaction.hash_key if self.redaction is not None else None
        blocks = {"redaction": self.redaction} | {
            f"redaction_policies.{name}": p for name, p in self.redaction_policies.items()
        }
        tenants: dict[str, str] = {}
        for where, block in blocks.items():
            if block is None:
                continue
            hashes = block.action == "hash" or "hash" in block.actions.values()
            if hashes and block.hash_key is None and main_key is None:
                raise ValueError(f"{where}: the hash action needs hash_key (env or file)")
            if block.tenants and where == "redaction":
                raise ValueError(
                    "redaction.tenants: only a policy in redaction_policies has tenants"
                )
            for tenant in block.tenants:
                if tenant in tenants:
                    raise ValueError(
                        f"tenant {tenant!r} is in two policies: {tenants[tenant]}, {where}"
                    )
                tenants[tenant] = where
        return self

    @field_validator("upstreams")
    @classmethod
    def _check_upstreams(cls, upstreams: dict[str, Upstream]) -> dict[str, Upstream]:
        if not upstreams:
            raise ValueError("needs at least one upstream")
        # On a shared prefix each upstream must speak a different API (one Anthropic,
        # one Gemini, one OpenAI-style), or a request could not be told apart.
        seen: dict[tuple[str, str], str] = {}
        mounts: dict[str, str] = {}
        for name, upstream in upstreams.items():
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"upstream name {name!r}: use letters, digits, '-' and '_'")
            speaks = "openai" if upstream.api == "azure" else upstream.api
            for prefix in upstream.prefixes:
                other = seen.get((prefix, speaks))
                if other is not None:
                    raise ValueError(
                        f"prefix {prefix!r} is used by {other!r} and {name!r}, which speak "
                        "the same API: requests could not be told apart"
                    )
                seen[prefix, speaks] = name
            if upstream.mount is not None:
                mounts[upstream.mount + "/"] = name
        prefixes = {prefix for prefix, _ in seen}
        for mount, name in mounts.items():
            if mount in prefixes:
                raise ValueError(f"mount {mount[:-1]!r} of {name!r} is also a prefix")
        if len(mounts) != sum(u.mount is not None for u in upstreams.values()):
            raise ValueError("two upstreams have the same mount")
        return upstreams


def replicas_need_shared_store(config: Config, keys_with_limits: int = 0) -> str | None:
    """Why ``config`` cannot run as ``server.replicas`` processes, or None.

    Limits and budgets counted in each process would let N replicas allow N times
    the limit: with limits configured (or keys that carry their own), N > 1 needs
    ``store.redis``. Never a silent fallback to counting per replica.
    """
    replicas = config.server.replicas
    if replicas <= 1 or config.store.redis is not None:
        return None
    if config.limits:
        what = f"limits ({', '.join(rule.name for rule in config.limits)})"
    elif keys_with_limits:
        what = f"{keys_with_limits} key(s) with their own limits"
    else:
        return None
    return (
        f"{replicas} replicas would each count {what} on their own: set store.redis "
        "so that they share one count, or run one replica"
    )


def _env_overrides(environ: dict[str, str] | os._Environ[str]) -> dict[str, Any]:
    """``TOLLWAY__A__B=v`` becomes ``{"a": {"b": v}}``."""
    tree: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if not path:
            continue
        node = tree
        for part in path[:-1]:
            node = node.setdefault(part, {})
        # "-" alone is stdout (audit.file), not YAML's list of one null.
        node[path[-1]] = yaml.safe_load(raw) if raw and raw != "-" else raw
    return tree


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def load(path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Read ``path`` (or only defaults when None), apply env overrides, validate.

    Every path comes out absolute, resolved once here: paths written in the file
    against the file's folder; defaults and ``TOLLWAY__*`` overrides against the
    working directory. A config written out again (as `tollway up` does) means
    the same files wherever it is read from.
    """
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {yamltext.describe(exc)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = _absolute_paths(loaded or {}, Config, path.parent)
    cwd = Path.cwd()
    overrides = _absolute_paths(
        _env_overrides(os.environ if environ is None else environ), Config, cwd
    )
    if overrides:
        source += " + TOLLWAY__* environment"
    try:
        config = Config.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None
    return _resolve_paths(config, cwd)  # what is still relative is a default


def override(config: Config, values: dict[str, Any], source: str) -> Config:
    """``config`` with ``values`` (a nested mapping, like a file's) merged in and
    validated again; ``source`` names them in the error (e.g. a command-line option)."""
    try:
        return Config.model_validate(_merge(config.model_dump(), values))
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _absolute(path: Path, base: Path) -> Path:
    path = path.expanduser()
    return path if path.is_absolute() else Path(os.path.abspath(base / path))


def _field_types(annotation: Any) -> tuple[Any, ...]:
    """``X | None`` -> (X,); ``dict[str, X]`` -> (dict, X); anything else -> (annotation,)."""
    if get_origin(annotation) is dict:
        return (dict, get_args(annotation)[1])
    return tuple(a for a in get_args(annotation) if a is not type(None)) or (annotation,)


def _absolute_paths(data: dict[str, Any], model: type[BaseModel], base: Path) -> dict[str, Any]:
    """Raw (unvalidated) config data with every string in a Path field made absolute."""
    out = dict(data)
    for name, value in data.items():
        info = model.model_fields.get(name)
        if info is None:
            continue  # validation will name it
        kinds = _field_types(info.annotation)
        if Path in kinds and isinstance(value, str) and value and value != str(STDOUT):
            out[name] = str(_absolute(Path(value), base))
        elif kinds[0] is dict and isinstance(value, dict) and _is_model(kinds[1]):
            out[name] = {
                k: _absolute_paths(v, kinds[1], base) if isinstance(v, dict) else v
                for k, v in value.items()
            }
        elif isinstance(value, dict) and _is_model(kinds[0]):
            out[name] = _absolute_paths(value, kinds[0], base)
    return out


def _is_model(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def _resolve_paths(model: _M, base: Path) -> _M:
    """``model`` with every relative Path field, at any depth, resolved against ``base``."""
    update: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path):
            new: Any = value if value == STDOUT else _absolute(value, base)
        elif isinstance(value, BaseModel):
            new = _resolve_paths(value, base)
        elif isinstance(value, dict) and all(isinstance(v, BaseModel) for v in value.values()):
            new = {k: _resolve_paths(v, base) for k, v in value.items()}
        else:
            continue
        if new != value:
            update[name] = new
    return model.model_copy(update=update) if update else model
