"""The config compiled once into what requests read, and reloads of watched files.

Requests read ``runtime.pipeline``'s stages; a reload replaces a stage's key
table with one reference assignment, so the hot path takes no lock and a bad
file keeps the previous table serving.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import audit, keys
from .config import Config
from .headroom import HeaderLimits
from .identities import Identities, Roles
from .limits.backend import open_quota
from .limits.quota import Keys, StoreUnavailable
from .limits.redis_store import RedisQuota
from .limits.rules import RuleSet
from .limits.spend import Query, find_subject, spend
from .metrics import Metrics, StoreMetrics
from .pipeline import Pipeline
from .pricing import load_prices
from .routes import RouteTable
from .stages import Stage
from .stages.auth import AuthStage
from .stages.credentials import CredentialStage
from .stages.limits import LimitsStage
from .stages.metering import MeteringStage
from .stages.redaction import build as build_redaction
from .store import Store
from .store.memory import MemoryStore

log = logging.getLogger("tollway")

Stamp = tuple[int, int, int] | None


def _stamp(path: Path) -> Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def _next_turn() -> None:
    """Let the event loop run what is ready (other streams) before going on."""
    await asyncio.sleep(0)


class Runtime:
    def __init__(
        self,
        config: Config,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        store: Store | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.metrics = metrics or Metrics()
        self.routes = RouteTable(config.upstreams)
        self._stamps: dict[Path, Stamp] = {}
        self.audit: audit.AuditLog | None = None  # serve attaches it (attach_audit)
        keys_file = config.auth.keys_file
        self._stamps[keys_file] = _stamp(keys_file)
        identities = Identities(config.identity, Roles(config.roles))
        ring = keys.KeyRing(keys.read_records(keys_file))  # errors are fatal here
        self.auth = AuthStage(ring, identities)
        if not len(self.auth.keys):
            log.warning("no API keys in %s yet: create one with `tollway keys create`", keys_file)
        self._count_keys()
        self.credentials = CredentialStage(self._provider_keys())
        self.prices = load_prices(config.pricing)
        self.store = store if store is not None else MemoryStore()
        self.metering = MeteringStage(
            self.prices,
            self.store,
            self.metrics,
            cost_header=config.pricing.cost_header,
            max_json_bytes=config.max_body_bytes,
            wall_clock=clock,
        )
        self.quota = open_quota(config.store, keys_file, StoreMetrics(self.metrics))
        redis = config.store.redis
        self.limits = LimitsStage(
            RuleSet(config.limits),
            self.quota,
            self.prices,
            self.metrics,
            keys=Keys(redis.hash_tag) if redis is not None else None,
            default_output_tokens=config.reservations.default_output_tokens,
            # Redis keeps its own per-call deadline (store.redis.timeout_ms); the
            # embedded store answers at once.
            timeout_s=None,
            clock=clock,
        )
        self.redaction = build_redaction(config, self.metrics, _next_turn)
        # Redaction reads the body before limits reserve for it (a refused request
        # reserves nothing). Limits finish after metering (reverse order), so they
        # settle what it read.
        stages: list[Stage] = [self.auth, self.credentials]
        if self.redaction:  # off: no stage, no cost
            stages.append(self.redaction)
        stages += [self.limits, self.metering]
        self.pipeline = Pipeline(
            self.routes,
            stages,
            clock,
            header_limits=HeaderLimits(
                config.envoy.max_request_headers, config.envoy.max_request_headers_kb
            ),
            on_fault=self.metrics.internal_errors.inc,
            on_backend_failure=self._backend_failed,
            max_event_bytes=config.max_body_bytes,
        )

    def attach_audit(self, log: audit.AuditLog | None) -> None:
        """Reloads and denials from now on go to ``log`` (serve's; None: not audited)."""
        self.audit = log
        self.pipeline.on_deny = log.denied if log is not None else None

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.event(event, **fields)

    async def aclose(self) -> None:
        """Shutdown: the backends write what they queued (settlements, usage records)."""
        await self.quota.aclose()
        await self.store.aclose()

    async def spend(self, query: Query) -> dict[str, Any] | None:
        """A key's, a tenant's or the global limit counters from this process's quota
        (``/v1/spend`` on the metrics port); None when no key has that id or tenant.
        Runs on the event loop, which owns the quota's state."""
        subject = find_subject(self.auth.keys, query)
        if subject is None:
            return None
        stage = self.limits
        return await spend(
            self.quota, stage.rules, stage.keys, subject, stage.clock(), query.period
        )

    async def store_problem(self, timeout_s: float) -> str | None:
        """Why the shared store cannot serve now (readiness), or None: the embedded
        store always can; Redis must answer a PING within ``timeout_s``."""
        if not isinstance(self.quota, RedisQuota):
            return None
        try:
            await self.quota.ping(timeout_s)
        except StoreUnavailable as exc:
            return f"store {self.quota.name} unavailable ({exc.reason})"
        return None

    def _backend_failed(self, stage: str, reason: str) -> None:
        self.metrics.backend_failures.labels(stage, reason).inc()

    def _credential_files(self) -> list[Path]:
        return [
            up.credential.file
            for up in self.config.upstreams.values()
            if up.credential is not None and up.credential.file is not None
        ]

    def _provider_keys(self) -> dict[str, str | None]:
        found: dict[str, str | None] = {}
        for name, upstream in self.config.upstreams.items():
            cred = upstream.credential
            value: str | None = None
            if cred is not None and cred.env is not None:
                value = os.environ.get(cred.env, "").strip() or None
                source = f"environment variable {cred.env}"
            elif cred is not None and cred.file is not None:
                self._stamps[cred.file] = _stamp(cred.file)
                try:
                    value = cred.file.read_text(encoding="utf-8").strip() or None
                except OSError:
                    value = None
                source = f"file {cred.file}"
            if cred is not None and value is None:
                log.warning(
                    "upstream %s: no provider key in %s; its requests are refused "
                    "(500 provider_credential_missing) until there is one",
                    name,
                    source,
                )
            found[name] = value
        return found

    def _count_keys(self) -> None:
        now = datetime.fromtimestamp(self.clock(), UTC)
        counts = {"active": 0, "revoked": 0, "expired": 0}
        for record in self.auth.keys:
            if record.revoked is not None:
                counts["revoked"] += 1
            elif record.expires is not None and record.expires <= now:
                counts["expired"] += 1
            else:
                counts["active"] += 1
        for state, count in counts.items():
            self.metrics.keys.labels(state).set(count)

    def reload_if_changed(self) -> None:
        """Re-read any watched file whose stamp changed; keep the old state on error."""
        keys_file = self.config.auth.keys_file
        stamp = _stamp(keys_file)
        if stamp != self._stamps.get(keys_file):
            self._stamps[keys_file] = stamp
            try:
                ring = keys.KeyRing(keys.read_records(keys_file))
            except keys.KeysFileError as exc:
                log.error("keys file not reloaded, previous keys stay in force: %s", exc)
                self.metrics.reloads.labels("keys", "error").inc()
                self._audit("keys_reloaded", outcome="failed", file=str(keys_file), error=str(exc))
            else:
                old, self.auth.keys = self.auth.keys, ring
                self._count_keys()
                self.metrics.reloads.labels("keys", "ok").inc()
                log.info("keys file reloaded: %d keys", len(ring))
                changes = audit.key_changes(old, ring)
                self._audit("keys_reloaded", outcome="ok", file=str(keys_file), **changes)
        files = self._credential_files()
        if any(_stamp(f) != self._stamps.get(f) for f in files):
            old_keys, new_keys = self.credentials.provider_keys, self._provider_keys()
            self.credentials.provider_keys = new_keys
            self.metrics.reloads.labels("credentials", "ok").inc()
            log.info("provider credential files reloaded")
            changes = audit.credential_changes(old_keys, new_keys)
            self._audit("credentials_reloaded", outcome="ok", **changes)
