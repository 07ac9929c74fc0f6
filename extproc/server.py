"""The grpc.aio ext_proc server: the per-stream loop, health, drain. Nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as extproc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client import start_http_server

from . import codec
from .config import Config
from .decisions import Deny, Phase
from .exchange import Exchange
from .runtime import Runtime

log = logging.getLogger("tollway")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"

_INTERNAL = Deny(
    500,
    "api_error",
    "internal_error",
    "The gateway failed to process this request.",
    "tollway_internal_error",
)

# Messages Tollway did not ask for still get the answer of their own kind.
_CONTINUE = {
    "request_headers": codec.CONTINUE_REQUEST_HEADERS,
    "response_headers": codec.CONTINUE_RESPONSE_HEADERS,
    "request_body": codec.CONTINUE_REQUEST_BODY,
    "response_body": codec.CONTINUE_RESPONSE_BODY,
    "request_trailers": codec.CONTINUE_REQUEST_TRAILERS,
    "response_trailers": codec.CONTINUE_RESPONSE_TRAILERS,
}


class Processor(extproc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, runtime: Runtime) -> None:
        self.pipeline = runtime.pipeline
        self.metrics = runtime.metrics

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.metrics.streams.inc()
        ex: Exchange | None = None
        body = bytearray()
        # Envoy resets the stream when the request ends: the read is then
        # cancelled, which ends this coroutine quietly.
        while (request := await context.read()) is not grpc.aio.EOF:
            kind = request.WhichOneof("request")
            self.metrics.messages[kind if kind in _CONTINUE else "unknown"].inc()
            try:
                if kind == "request_headers":
                    ex, response = self._request_headers(request)
                elif kind == "request_body" and ex is not None:
                    chunk = request.request_body
                    if not chunk.end_of_stream:
                        body += chunk.body
                        response = codec.CONTINUE_REQUEST_BODY
                    else:  # BUFFERED: usually the whole body in one chunk, not copied
                        whole = bytes(body + chunk.body) if body else chunk.body
                        response = self._request_body(ex, whole)
                elif kind in _CONTINUE:
                    response = _CONTINUE[kind]
                else:
                    log.warning("ext_proc message of unknown kind ignored")
                    continue
            except Exception:
                log.exception("fault while processing a %s message", kind)
                self.metrics.internal_errors.inc()
                await context.write(codec.immediate_response(_INTERNAL, {}))
                return
            await context.write(response)

    def _request_headers(self, request: ProcessingRequest) -> tuple[Exchange, ProcessingResponse]:
        headers, repeated = codec.decode_headers(request.request_headers)
        pipeline = self.pipeline
        ex = pipeline.exchange(
            headers.get(":method", ""), headers.get(":path", ""), headers, repeated
        )
        decision = pipeline.request_headers(ex)
        if isinstance(decision, Deny):
            return ex, self._deny(ex, decision)
        if Phase.REQUEST_BODY not in decision:
            self._count(ex, "allowed")
        return ex, codec.request_headers_response(ex, decision)

    def _request_body(self, ex: Exchange, body: bytes) -> ProcessingResponse:
        decision = self.pipeline.request_body(ex, body)
        if decision is not None:
            return self._deny(ex, decision)
        self._count(ex, "allowed")
        return codec.request_body_response(ex)

    def _deny(self, ex: Exchange, deny: Deny) -> ProcessingResponse:
        self._count(ex, deny.code)
        return codec.immediate_response(deny, ex.metadata)

    def _count(self, ex: Exchange, outcome: str) -> None:
        route = ex.route.name if ex.route is not None else "none"
        self.metrics.requests.labels(route, outcome).inc()


def _server_options(config: Config) -> list[tuple[str, int]]:
    limit = config.max_body_bytes + 1024 * 1024  # the body plus headers and framing
    return [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Envoy pings every 30 s (rendered config); never answer with too_many_pings.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.so_reuseport", 0),
    ]


def _credentials(config: Config) -> grpc.ServerCredentials | None:
    tls = config.server.tls
    if tls is None:
        return None
    ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


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
    server = grpc.aio.server(options=_server_options(config))
    extproc_grpc.add_ExternalProcessorServicer_to_server(Processor(runtime), server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    address = f"{config.server.address}:{config.server.port}"
    credentials = _credentials(config)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    await server.start()
    if config.metrics.enabled:
        start_http_server(config.metrics.port, config.metrics.address, runtime.metrics.registry)
    for service in ("", SERVICE_NAME):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    scheme = "grpcs" if credentials else "grpc"
    log.info("ext_proc listening on %s://%s:%d", scheme, config.server.address, port)
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
        await health.enter_graceful_shutdown()
        log.info(
            "draining: NOT_SERVING for %.1fs, then up to %.1fs for in-flight streams",
            config.server.drain_delay_s,
            config.server.drain_timeout_s,
        )
        await asyncio.sleep(config.server.drain_delay_s)
        await server.stop(grace=config.server.drain_timeout_s)
        log.info("stopped")
