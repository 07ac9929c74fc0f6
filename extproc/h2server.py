"""A small gRPC server on asyncio + h2 that speaks exactly what Envoy needs.

Two methods: ext_proc's bidirectional ``Process`` and ``grpc.health.v1.Health/
Check``; anything else is answered UNIMPLEMENTED. Measured on a 2-core box this
costs less than half the CPU per stream of grpc.aio (whose C core hands every
message between its own threads and Python), and Envoy spends less too. The
grpc.aio server stays available as ``server.transport: grpcio``.

gRPC over HTTP/2, as used here: a call is an HTTP/2 stream; each message is a
5-byte prefix (compressed flag, big-endian length) and the serialized protobuf;
the reply is response headers, messages, then trailers carrying grpc-status.

A reply may come later (``handle`` returned an awaitable): the stream's next
messages wait in its inbound buffer, in order, until that reply has been sent;
their stream-level flow-control credit is returned only as they are taken, so
a stream that keeps sending meanwhile is held by its own window (16 MB) and
the connection's credit is returned at once, so other streams keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable
from enum import IntEnum
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2
from hyperframe.frame import GoAwayFrame

from .replies import Abandoned, Processor

log = logging.getLogger("tollway")

PROCESS_PATH = b"/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_PATH = b"/grpc.health.v1.Health/Check"

_RESPONSE_HEADERS = [(b":status", b"200"), (b"content-type", b"application/grpc")]
# Large frames and windows: a 10 MB request body arrives in few events, with
# few WINDOW_UPDATEs. Envoy bounds what it sends by its own buffer limits.
_MAX_FRAME_SIZE = 1 << 20
_STREAM_WINDOW = 16 << 20
_CONNECTION_WINDOW = 64 << 20
_MAX_CONCURRENT_STREAMS = 10_000


class Status(IntEnum):
    """The gRPC status codes this server sends."""

    OK = 0
    INVALID_ARGUMENT = 3
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class _Call:
    """One HTTP/2 stream: a gRPC call in progress."""

    __slots__ = (
        "awaiting",
        "ended",
        "headers_sent",
        "inbound",
        "owed",
        "pending",
        "processor",
        "stream_id",
        "trailers",
    )

    def __init__(self, stream_id: int, processor: Processor | None) -> None:
        self.stream_id = stream_id
        self.processor = processor  # None: a health check
        self.inbound = bytearray()  # bytes of messages not yet taken
        self.headers_sent = False
        self.pending = bytearray()  # outbound bytes waiting for flow-control window
        self.trailers: list[tuple[bytes, bytes]] | None = None  # sent once pending is out
        # A reply that comes later; until it is sent, the next messages wait in inbound.
        self.awaiting: asyncio.Future[ProcessingResponse | None] | None = None
        self.owed = 0  # stream credit of the bytes that waited, returned as they are taken
        self.ended = False  # the client half-closed while a reply was pending


class _Connection(asyncio.Protocol):
    """One HTTP/2 connection from Envoy, driven by h2's sans-IO state machine."""

    def __init__(self, server: H2Server) -> None:
        self.server = server
        self.h2 = h2.connection.H2Connection(server.h2_config)
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self.goaway_sent = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        wanted = self.server.client_sans
        if wanted:
            names = peer_sans(transport.get_extra_info("peercert"))
            if not names & wanted:
                # Signed by the CA, but not Envoy's: another workload's certificate.
                log.warning("refused a client certificate for %s", ", ".join(sorted(names)))
                self.transport.abort()
                return
        self.server.connections.add(self)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: _MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: _MAX_FRAME_SIZE,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 64 * 1024,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(_CONNECTION_WINDOW - 65_535)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._drop_calls()
        self.server.notify_idle()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("HTTP/2 protocol error from the ext_proc client: %s", exc)
            self._flush()
            self._close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._on_data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._on_request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._on_end(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self._forget(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated):
                self._on_window(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self._flush()
                self._close()
                return
        self._flush()

    # HTTP/2 events

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.goaway_sent:  # opened before our GOAWAY reached Envoy: safe to retry
            with contextlib.suppress(h2.exceptions.StreamClosedError):  # the client gave up first
                self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        path = next((v for k, v in event.headers or () if k == b":path"), b"")
        if path == PROCESS_PATH:
            self.calls[sid] = _Call(sid, self.server.new_processor())
        elif path == HEALTH_CHECK_PATH:
            self.calls[sid] = _Call(sid, None)
        else:
            self._finish(_Call(sid, None), Status.UNIMPLEMENTED, "unknown method")

    def _on_data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        call = self.calls.get(sid)
        if call is not None and call.awaiting is not None:
            self._queue(call, event.data, event.flow_controlled_length)
            return
        if event.flow_controlled_length:
            self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
        if call is None or not event.data:
            return
        call.inbound += event.data
        self._take_messages(call)

    def _take_messages(self, call: _Call) -> None:
        """Answer the complete messages in the inbound buffer, until one's reply is pending."""
        buffer = call.inbound
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if length > self.server.max_message_bytes:
                self._finish(call, Status.RESOURCE_EXHAUSTED, "message larger than the limit")
                return
            end = 5 + length
            if len(buffer) < end:
                return
            if buffer[0]:
                self._finish(call, Status.UNIMPLEMENTED, "compressed messages are not accepted")
                return
            message = bytes(buffer[5:end])
            del buffer[:end]
            if not self._on_message(call, message):
                return

    def _on_message(self, call: _Call, message: bytes) -> bool:
        """Answer one message; False once the call is finished or its reply is pending."""
        processor = call.processor
        if processor is None:
            self._health_check(call, message)
            return False
        try:
            request = ProcessingRequest.FromString(message)
        except DecodeError:
            self._finish(call, Status.INVALID_ARGUMENT, "not a ProcessingRequest")
            return False
        try:
            reply = processor.handle(request)
        except Exception:
            self._fault(call)
            return False
        if isinstance(reply, ProcessingResponse):  # the common case: answered at once
            self._send_message(call, reply.SerializeToString())
        elif reply is not None:
            self._await(call, reply)
            return False
        if processor.failed:
            if self.calls.get(call.stream_id) is call:  # not reset as the 500 went out
                self._finish(call, Status.OK)
            return False
        return True

    def _fault(self, call: _Call) -> None:
        """An exception escaped the processor (it should answer its faults itself)."""
        log.exception("fault escaped the ext_proc stream processor")
        self._finish(call, Status.INTERNAL, "internal error")

    # a reply that comes later

    def _await(self, call: _Call, reply: Awaitable[ProcessingResponse | None]) -> None:
        try:
            future = asyncio.ensure_future(reply)  # a Future as it is; a coroutine becomes a task
        except TypeError:  # not awaitable after all
            self._fault(call)
            return
        call.awaiting = future
        future.add_done_callback(functools.partial(self._on_reply, call))

    def _queue(self, call: _Call, data: bytes, size: int) -> None:
        """Bytes for a stream whose reply is pending: they wait, and so does their stream
        credit; the connection's credit goes back now, so that other streams keep flowing."""
        call.inbound += data
        if size:
            call.owed += size
            with contextlib.suppress(h2.exceptions.ProtocolError):  # a GOAWAY in the same read
                self.h2.increment_flow_control_window(size)

    def _on_reply(self, call: _Call, future: asyncio.Future[ProcessingResponse | None]) -> None:
        """The pending reply is here: send it, then take the messages that waited."""
        sid = call.stream_id
        if self.calls.get(sid) is not call:  # gone: self.server.abandoned closes it
            return
        call.awaiting = None
        try:
            reply = future.result()
        except (Exception, asyncio.CancelledError):
            self._fault(call)
        else:
            if isinstance(reply, ProcessingResponse):
                self._send_message(call, reply.SerializeToString())
            elif reply is not None:
                log.error("a pending reply resolved to a %s", type(reply).__name__)
                self._finish(call, Status.INTERNAL, "internal error")
            if self.calls.get(sid) is call:  # not finished, nor reset as the reply went out
                processor = call.processor
                if processor is not None and processor.failed:
                    self._finish(call, Status.OK)
                else:
                    self._resume(call)
        self._flush()

    def _resume(self, call: _Call) -> None:
        before = len(call.inbound)
        self._take_messages(call)
        if call.awaiting is None:  # nothing pending any more: all the credit, as on the fast path
            credit, call.owed = call.owed, 0
        else:  # the credit of the messages taken; the rest waits with its bytes
            credit = min(call.owed, before - len(call.inbound))
            call.owed -= credit
        live = self.calls.get(call.stream_id) is call
        if credit and live and not call.ended:  # the client may still send on this stream
            with contextlib.suppress(h2.exceptions.ProtocolError):  # StreamClosedError is one
                self.h2.increment_flow_control_window(credit, call.stream_id)
        if live and call.ended and call.awaiting is None:
            self._on_end(call.stream_id)

    def _health_check(self, call: _Call, message: bytes) -> None:
        try:
            service = health_pb2.HealthCheckRequest.FromString(message).service
        except DecodeError:
            self._finish(call, Status.INVALID_ARGUMENT, "not a HealthCheckRequest")
            return
        if service not in self.server.services:
            self._finish(call, Status.NOT_FOUND, "unknown service")
            return
        status = _SERVING if self.server.serving else _NOT_SERVING
        reply = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        self._send_message(call, reply)
        self._finish(call, Status.OK)

    def _on_end(self, sid: int) -> None:
        """The client half-closed: a finished Process call ends with OK."""
        call = self.calls.get(sid)
        if call is None:
            return
        if call.awaiting is not None:  # once the pending reply and the messages after it are out
            call.ended = True
            return
        self._finish(call, Status.OK if call.processor else Status.INVALID_ARGUMENT)

    def _on_window(self, sid: int) -> None:
        calls = self.calls.values() if sid == 0 else filter(None, [self.calls.get(sid)])
        for call in list(calls):
            self._send(call)

    # sending

    def _send_message(self, call: _Call, payload: bytes) -> None:
        call.pending += b"\x00" + len(payload).to_bytes(4, "big") + payload
        self._send(call)

    def _finish(self, call: _Call, status: Status, message: str = "") -> None:
        trailers = [(b"grpc-status", b"%d" % status)]
        if message:
            trailers.append((b"grpc-message", quote(message).encode()))
        if not call.headers_sent and not call.pending:  # a trailers-only response
            trailers = _RESPONSE_HEADERS + trailers
            call.headers_sent = True
        call.trailers = trailers
        self.calls.setdefault(call.stream_id, call)
        self._send(call)

    def _send(self, call: _Call) -> None:
        """Headers, then what flow control allows of the messages, then trailers.

        What the window does not allow waits for a WINDOW_UPDATE.
        """
        sid, pending, h2conn = call.stream_id, call.pending, self.h2
        try:
            if not call.headers_sent:
                h2conn.send_headers(sid, _RESPONSE_HEADERS)
                call.headers_sent = True
            while pending:
                size = min(len(pending), h2conn.local_flow_control_window(sid))
                size = min(size, h2conn.max_outbound_frame_size)
                if size <= 0:
                    return
                h2conn.send_data(sid, bytes(pending[:size]))
                del pending[:size]
            if call.trailers is not None:
                h2conn.send_headers(sid, call.trailers, end_stream=True)
                self._forget(sid)
        except h2.exceptions.StreamClosedError:  # reset by Envoy in the same read
            self._forget(sid)

    def _forget(self, sid: int) -> None:
        call = self.calls.pop(sid, None)
        if call is None:
            return
        self._release(call)
        if not self.calls:
            self.server.notify_idle()

    def _release(self, call: _Call) -> None:
        """The stream is over: close its processor now, or once its pending reply is done."""
        if call.processor is None:
            return
        if call.awaiting is None:
            call.processor.close()
        else:  # not cancelled halfway: the reply is dropped when it comes
            self.server.abandoned.add(call.awaiting, call.processor)

    def _drop_calls(self) -> None:
        calls = list(self.calls.values())
        self.calls.clear()
        for call in calls:
            self._release(call)

    def _flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        self._drop_calls()  # now: a reply that comes later must not be sent after this
        if self.transport is not None:
            self.transport.close()

    # shutdown

    def goaway(self) -> None:
        """No new streams on this connection; the ones in flight go on.

        Written by hand because h2's close_connection() would also stop it from
        reading the frames of streams still in flight.
        """
        if self.goaway_sent or self.transport is None:
            return
        self.goaway_sent = True
        self._flush()
        last = self.h2.highest_inbound_stream_id
        self.transport.write(GoAwayFrame(0, last_stream_id=last).serialize())

    def abort(self) -> None:
        self._drop_calls()  # now, not at connection_lost: stop() settles what is pending
        if self.transport is not None:
            self.transport.abort()


class H2Server:
    """Serves ext_proc and health on one port until stopped."""

    def __init__(
        self,
        new_processor: Callable[[], Processor],
        services: tuple[str, ...],
        max_message_bytes: int,
        ssl_context: ssl.SSLContext | None = None,
        client_sans: frozenset[str] = frozenset(),
    ) -> None:
        self.new_processor = new_processor
        self.client_sans = client_sans  # with mTLS: a client certificate must name one
        self.services = frozenset(services)  # the names health checks may ask about
        self.serving = False
        self.max_message_bytes = max_message_bytes
        self.ssl_context = ssl_context
        # Header validation is a third of h2's cost per stream; the peer is
        # Envoy and only :path is read, compared against two fixed values.
        self.h2_config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        self.connections: set[_Connection] = set()
        self.abandoned = Abandoned()  # reset while a reply was pending
        self.draining = False
        self._idle = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, ssl=self.ssl_context, reuse_address=True
        )
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving

    def notify_idle(self) -> None:
        if self.draining and not any(c.calls for c in self.connections):
            self._idle.set()

    async def stop(self, grace: float) -> None:
        """Refuse new streams, let in-flight ones (and replies pending for streams already
        reset) finish for up to ``grace`` s, close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.draining = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.goaway()
        self.notify_idle()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            log.warning("drain timeout: cancelling streams still in flight")
        for connection in list(self.connections):
            connection.abort()
        await self.abandoned.settle(deadline - loop.time())
        if self._server is not None:
            await self._server.wait_closed()


def server_ssl_context(
    cert_file: Path, key_file: Path, client_ca_file: Path | None
) -> ssl.SSLContext:
    """TLS for the gRPC port: TLS 1.3 (only Envoy connects, and it speaks 1.3), HTTP/2
    by ALPN, client certificates required with a CA (mTLS)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(cert_file, key_file)
    context.set_alpn_protocols(["h2"])
    if client_ca_file is not None:
        context.load_verify_locations(client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_sans(peercert: Any) -> set[str]:
    """The names in a peer certificate's subjectAltName (as ``getpeercert()`` gives it)."""
    if not peercert:
        return set()
    return {str(value) for _, value in peercert.get("subjectAltName", ())}
