"""Run the ext_proc server: transport, health, metrics endpoint, reloads, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from . import __version__, audit
from .config import STDOUT, Config, ConfigError
from .grpcio_server import GrpcioServer
from .h2server import H2Server, server_ssl_context
from .metrics_http import MetricsServer
from .processor import StreamProcessor
from .runtime import Runtime

log = logging.getLogger("tollway")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
_HEALTH_SERVICES = ("", SERVICE_NAME)


class Transport(Protocol):
    """What serve() needs of a gRPC server: h2server.H2Server or grpcio_server.GrpcioServer."""

    async def start(self, host: str, port: int) -> int: ...

    async def set_serving(self, serving: bool) -> None: ...

    async def stop(self, grace: float) -> None: ...


@dataclass(frozen=True)
class Preflight:
    """What `tollway serve` builds before it listens, each file read and checked."""

    runtime: Runtime
    ssl_context: ssl.SSLContext | None = None  # server.tls for the h2 transport
    grpc_credentials: Any = None  # grpc.ServerCredentials: server.tls for grpcio

    @property
    def missing_provider_keys(self) -> list[str]:
        """Upstreams with a configured credential that is missing or empty (a warning:
        their requests are refused until it appears)."""
        keys = self.runtime.credentials.provider_keys
        upstreams = self.runtime.config.upstreams
        return [n for n, u in upstreams.items() if u.credential is not None and not keys.get(n)]


def preflight(config: Config, runtime: Runtime | None = None) -> Preflight:
    """Everything serve checks at start-up: the keys file, prices (with ``litellm_file``),
    provider credentials (the Runtime), the audit file's folder and the TLS files.
    ``tollway check-config`` runs exactly this; it raises what serve would refuse to
    start with."""
    runtime = runtime or Runtime(config)
    for name, jwt in config.identity.jwt.items():  # (Envoy would not start without it)
        if jwt.jwks_file is not None and not jwt.jwks_file.is_file():
            raise ConfigError(f"identity.jwt.{name}.jwks_file: {jwt.jwks_file}: no such file")
    _check_audit_file(config)
    tls = config.server.tls
    if tls is None:
        return Preflight(runtime)
    for name in ("cert_file", "key_file", "client_ca_file"):
        file = getattr(tls, name)
        if file is not None and not file.is_file():
            raise ConfigError(f"server.tls.{name}: {file}: no such file")
    if config.server.transport == "grpcio":
        ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
        credentials = grpc.ssl_server_credentials(
            [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
        return Preflight(runtime, grpc_credentials=credentials)
    context = server_ssl_context(tls.cert_file, tls.key_file, tls.client_ca_file)
    return Preflight(runtime, ssl_context=context)


def _check_audit_file(config: Config) -> None:
    """What would stop serve opening the audit file, found without creating it."""
    file = config.audit.file
    if not config.audit.enabled or file == STDOUT:
        return
    if not file.parent.is_dir():
        raise ConfigError(f"audit.file: {file}: the folder {file.parent} does not exist")
    target = file if file.exists() else file.parent
    if not os.access(target, os.W_OK):
        raise ConfigError(f"audit.file: {file}: {target} is not writable")


def _transport(config: Config, ready: Preflight) -> Transport:
    def new_processor() -> StreamProcessor:
        return StreamProcessor(ready.runtime.pipeline, ready.runtime.metrics)

    limit = config.max_body_bytes + 1024 * 1024  # the body plus headers and framing
    tls = config.server.tls
    sans = frozenset(tls.client_sans if tls is not None else ())
    if config.server.transport == "grpcio":
        return GrpcioServer(new_processor, _HEALTH_SERVICES, limit, ready.grpc_credentials, sans)
    return H2Server(new_processor, _HEALTH_SERVICES, limit, ready.ssl_context, sans)


async def _watch_files(runtime: Runtime, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(runtime.reload_if_changed)
        except Exception:
            log.exception("reload check failed")


def _open_audit(config: Config, runtime: Runtime) -> audit.AuditLog | None:
    """The runtime's audit log, opened from the config unless the caller attached one.
    A file that cannot be opened stops the start: no serving unaudited."""
    if runtime.audit is None:
        try:
            runtime.attach_audit(audit.open_log(config.audit, runtime.metrics))
        except OSError as exc:
            raise ConfigError(f"audit.file: {config.audit.file}: cannot open: {exc}") from None
    return runtime.audit


async def _summarise(log: audit.AuditLog, interval: float) -> None:
    """Denials held back by the throttle are counted in one line per kind and interval."""
    while True:
        await asyncio.sleep(interval)
        log.flush_suppressed()


async def serve(
    config: Config,
    *,
    runtime: Runtime | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
    ready = preflight(config, runtime)
    runtime = ready.runtime
    audit_log = _open_audit(config, runtime)
    server = _transport(config, ready)
    port = await server.start(config.server.address, config.server.port)
    draining = False
    probe_timeout_s = 1.0  # Redis' PING for /readyz

    async def readiness() -> str | None:
        if draining:
            return "draining"
        return await runtime.store_problem(probe_timeout_s)

    metrics_http: MetricsServer | None = None
    if config.metrics.enabled:
        metrics_http = MetricsServer(
            runtime.metrics.registry,
            runtime.spend,
            asyncio.get_running_loop(),
            ready=readiness,
            probe_timeout_s=probe_timeout_s + 0.5,  # the store's own deadline answers first
        )
        metrics_http.start(config.metrics.address, config.metrics.port)
    await server.set_serving(True)
    scheme = "grpcs" if config.server.tls else "grpc"
    log.info(
        "ext_proc listening on %s://%s:%d (%s)",
        scheme,
        config.server.address,
        port,
        config.server.transport,
    )
    if audit_log is not None:
        audit_log.event(
            "started",
            version=__version__,
            pid=os.getpid(),
            address=f"{config.server.address}:{port}",
            keys=len(runtime.auth.keys),
            keys_file=str(config.auth.keys_file),
        )
    if on_ready is not None:
        on_ready(port)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_files(runtime, config.server.reload_interval_s))
    summaries = (
        asyncio.create_task(_summarise(audit_log, config.audit.summary_interval_s))
        if audit_log is not None
        else None
    )
    try:
        await stop.wait()
    finally:
        watcher.cancel()
        draining = True  # /readyz: 503 (Kubernetes takes the pod out of its Service)
        # Tell Envoy's health checker first, keep serving while it moves away,
        # then refuse new streams and let in-flight ones finish.
        await server.set_serving(False)
        log.info(
            "draining: NOT_SERVING for %.1fs, then up to %.1fs for in-flight streams",
            config.server.drain_delay_s,
            config.server.drain_timeout_s,
        )
        await asyncio.sleep(config.server.drain_delay_s)
        await server.stop(config.server.drain_timeout_s)
        # Every stream has finished its flows: what they queued is written before exit.
        try:
            await asyncio.wait_for(runtime.aclose(), config.server.drain_timeout_s)
        except TimeoutError:
            log.error("queued writes not finished within %.1fs", config.server.drain_timeout_s)
        if metrics_http is not None:  # served through the drain: scrapes see it
            await asyncio.to_thread(metrics_http.close)
        if audit_log is not None:
            if summaries is not None:
                summaries.cancel()
            audit_log.event("stopped", pid=os.getpid())
            await asyncio.to_thread(audit_log.close)  # what is held back, then the queue
        log.info("stopped")
