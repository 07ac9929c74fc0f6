"""Run the ext_proc server: transport, health, metrics endpoint, reloads, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Protocol

import grpc
from prometheus_client import start_http_server

from .config import Config
from .grpcio_server import GrpcioServer
from .h2server import H2Server, server_ssl_context
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


def _transport(config: Config, runtime: Runtime) -> Transport:
    def new_processor() -> StreamProcessor:
        return StreamProcessor(runtime)

    limit = config.max_body_bytes + 1024 * 1024  # the body plus headers and framing
    tls = config.server.tls
    if config.server.transport == "grpcio":
        credentials = None
        if tls is not None:
            ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
            credentials = grpc.ssl_server_credentials(
                [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
                root_certificates=ca,
                require_client_auth=ca is not None,
            )
        return GrpcioServer(new_processor, _HEALTH_SERVICES, limit, credentials)
    context = None
    if tls is not None:
        context = server_ssl_context(tls.cert_file, tls.key_file, tls.client_ca_file)
    return H2Server(new_processor, _HEALTH_SERVICES, limit, context)


async def _watch_files(runtime: Runtime, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(runtime.reload_if_changed)
        except Exception:
            log.exception("reload check failed")


async def serve(
    config: Config,
    *,
    runtime: Runtime | None = None,
    stop: asyncio.Event | None = None,
    on_ready: Callable[[int], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop`` is set), then drain."""
    runtime = runtime or Runtime(config)
    server = _transport(config, runtime)
    port = await server.start(config.server.address, config.server.port)
    if config.metrics.enabled:
        start_http_server(config.metrics.port, config.metrics.address, runtime.metrics.registry)
    await server.set_serving(True)
    scheme = "grpcs" if config.server.tls else "grpc"
    log.info(
        "ext_proc listening on %s://%s:%d (%s)",
        scheme,
        config.server.address,
        port,
        config.server.transport,
    )
    if on_ready is not None:
        on_ready(port)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(_watch_files(runtime, config.server.reload_interval_s))
    try:
        await stop.wait()
    finally:
        watcher.cancel()
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
        log.info("stopped")
