"""The ext_proc server on grpc.aio (``server.transport: grpcio``), the fallback transport.

A reply may come later (``handle`` returned an awaitable): the servicer awaits it
before it reads the next message, so that stream's messages wait in order, in
grpc's buffers, where grpc's own flow control bounds them; other streams are
other coroutines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as extproc_grpc
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from .replies import Abandoned, Processor

log = logging.getLogger("tollway")


class _Servicer(extproc_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(
        self,
        new_processor: Callable[[], Processor],
        abandoned: Abandoned,
        client_sans: frozenset[str],
    ) -> None:
        self.new_processor = new_processor
        self.abandoned = abandoned
        self.client_sans = client_sans

    async def Process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        if self.client_sans:
            # grpc checks the CA only; the name is checked per stream (grpcio cannot
            # refuse the connection itself, as the h2 transport does).
            names = context.auth_context().get("x509_subject_alternative_name", [])
            if not {n.decode() for n in names} & self.client_sans:
                log.warning("refused a client certificate for %s", b", ".join(names).decode())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "client certificate refused")
        processor = self.new_processor()
        pending: asyncio.Future[ProcessingResponse | None] | None = None
        # Envoy resets the stream when the request ends: the read (or the wait for a
        # pending reply) is then cancelled, which ends this coroutine quietly.
        try:
            while (request := await context.read()) is not grpc.aio.EOF:
                try:
                    reply = processor.handle(request)
                    if not isinstance(reply, ProcessingResponse) and reply is not None:
                        pending = asyncio.ensure_future(reply)
                        reply = await asyncio.shield(pending)  # a reset must not cancel the I/O
                        pending = None
                except Exception:  # the processor should answer its faults itself
                    log.exception("fault escaped the ext_proc stream processor")
                    context.set_code(grpc.StatusCode.INTERNAL)
                    context.set_details("internal error")
                    return
                if reply is not None:
                    await context.write(reply)
                if processor.failed:
                    return
        finally:
            if pending is None or pending.done():
                processor.close()
            else:  # cancelled while a reply was pending: close once it is done
                self.abandoned.add(pending, processor)


class GrpcioServer:
    """grpc.aio with the ext_proc servicer and grpc's own health servicer."""

    def __init__(
        self,
        new_processor: Callable[[], Processor],
        services: tuple[str, ...],
        max_message_bytes: int,
        credentials: grpc.ServerCredentials | None = None,
        client_sans: frozenset[str] = frozenset(),
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
        self.abandoned = Abandoned()  # reset while a reply was pending
        servicer = _Servicer(new_processor, self.abandoned, client_sans)
        extproc_grpc.add_ExternalProcessorServicer_to_server(servicer, self.server)
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
        """Let in-flight streams (and replies pending for streams already reset) finish for
        up to ``grace`` s, then cancel what is left."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        await self.server.stop(grace=grace)
        await self.abandoned.settle(deadline - loop.time())
