"""The ext_proc server on grpc.aio (``server.transport: grpcio``), the fallback transport."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as extproc_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from .processor import StreamProcessor


class _Servicer(extproc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, new_processor: Callable[[], StreamProcessor]) -> None:
        self.new_processor = new_processor

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        processor = self.new_processor()
        # Envoy resets the stream when the request ends: the read is then
        # cancelled, which ends this coroutine quietly.
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                response = processor.handle(request)
                if response is not None:
                    await context.write(response)
                if processor.failed:
                    return
        finally:
            processor.close()


class GrpcioServer:
    """grpc.aio with the ext_proc servicer and grpc's own health servicer."""

    def __init__(
        self,
        new_processor: Callable[[], StreamProcessor],
        services: tuple[str, ...],
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                # Envoy pings every 30 s (rendered config); never answer too_many_pings.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.so_reuseport", 0),
            ]
        )
        extproc_grpc.add_ExternalProcessorServicer_to_server(_Servicer(new_processor), self.server)
        self.health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.services = services
        self.credentials = credentials

    async def start(self, host: str, port: int) -> int:
        address = f"{host}:{port}"
        if self.credentials is None:
            bound: int = self.server.add_insecure_port(address)
        else:
            bound = self.server.add_secure_port(address, self.credentials)
        await self.server.start()
        return bound

    async def set_serving(self, serving: bool) -> None:
        if not serving:
            await self.health.enter_graceful_shutdown()
            return
        for service in self.services:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float) -> None:
        await self.server.stop(grace=grace)
