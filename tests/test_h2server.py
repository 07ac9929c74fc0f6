"""The h2 gRPC server's edges, driven in memory by an h2 client: no sockets, no sleeps.

Framing split anywhere, flow control with a tiny window, resets racing replies,
unknown methods, oversized and malformed messages, GOAWAY on drain.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from grpc_health.v1 import health_pb2
from hyperframe.frame import Frame, GoAwayFrame

from extproc import keys
from extproc.config import Config, MetricsConfig
from extproc.h2server import HEALTH_CHECK_PATH, PROCESS_PATH, H2Server, Status, _Connection
from extproc.processor import StreamProcessor
from extproc.runtime import Runtime

pytestmark = pytest.mark.usefixtures("provider_keys_in_env")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def close(self) -> None:
        self.closed = True

    abort = close


@dataclass
class Reply:
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    trailers: dict[bytes, bytes] = field(default_factory=dict)
    reset: bool = False

    @property
    def status(self) -> int | None:
        found = self.trailers.get(b"grpc-status") or dict(self.headers).get(b"grpc-status")
        return None if found is None else int(found)

    def messages(self) -> Iterator[bytes]:
        data = bytes(self.data)
        while data:
            length = int.from_bytes(data[1:5], "big")
            yield data[5 : 5 + length]
            data = data[5 + length :]


class Client:
    """An HTTP/2 client wired to one server connection through memory."""

    def __init__(self, server: H2Server, window: int = 65_535) -> None:
        self.server_side = _Connection(server)
        self.transport = MemoryTransport()
        self.server_side.connection_made(self.transport)  # type: ignore[arg-type]
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
        )
        self.h2.initiate_connection()
        self.replies: dict[int, Reply] = {}
        self.pump()

    def open(self, path: bytes = PROCESS_PATH) -> int:
        sid: int = self.h2.get_next_available_stream_id()
        headers = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", path)]
        headers += [(b":authority", b"tollway"), (b"content-type", b"application/grpc")]
        self.h2.send_headers(sid, headers)
        self.replies[sid] = Reply()
        return sid

    def send(self, sid: int, payload: bytes, *, end: bool = False, chunk: int = 0) -> None:
        data = b"\x00" + len(payload).to_bytes(4, "big") + payload
        pieces = [data[i : i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
        for piece in pieces:
            self.h2.send_data(sid, piece)
            self.pump()
        if end:
            self.h2.end_stream(sid)
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has anything to say."""
        for _ in range(1000):
            to_server = self.h2.data_to_send()
            if to_server:
                self.server_side.data_received(to_server)
            to_client = bytes(self.transport.out)
            self.transport.out.clear()
            if not to_server and not to_client:
                return
            if to_client:
                self._receive(to_client)
        raise AssertionError("the conversation did not settle")

    def _receive(self, data: bytes) -> None:
        for event in self.h2.receive_data(data):
            reply = self.replies.get(getattr(event, "stream_id", 0))
            if isinstance(event, h2.events.ResponseReceived) and reply:
                reply.headers = list(event.headers)
            elif isinstance(event, h2.events.DataReceived) and reply:
                reply.data += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived) and reply:
                reply.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamReset) and reply:
                reply.reset = True


@pytest.fixture
def runtime(tmp_path: Path) -> Runtime:
    return Runtime(
        Config(metrics=MetricsConfig(enabled=False), auth={"keys_file": tmp_path / "keys.yaml"})  # type: ignore[arg-type]
    )


@pytest.fixture
def server(runtime: Runtime) -> H2Server:
    h2server = H2Server(
        lambda: StreamProcessor(runtime.pipeline, runtime.metrics),
        ("", SERVICE),
        max_message_bytes=4096,
    )
    h2server.serving = True
    return h2server


def request_headers(key: str = "tw_nope") -> bytes:
    pairs = [(":method", "GET"), (":path", "/v1/models"), ("authorization", f"Bearer {key}")]
    values = [HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs]
    headers = pb.HttpHeaders(headers=HeaderMap(headers=values), end_of_stream=True)
    return pb.ProcessingRequest(request_headers=headers).SerializeToString()


def answers(reply: Reply) -> list[pb.ProcessingResponse]:
    return [pb.ProcessingResponse.FromString(m) for m in reply.messages()]


def test_a_message_split_into_single_bytes_gets_the_same_answer(server: H2Server) -> None:
    client = Client(server)
    whole, split = client.open(), client.open()
    client.send(whole, request_headers())
    client.send(split, request_headers(), chunk=1)
    first, second = answers(client.replies[whole]), answers(client.replies[split])
    assert first == second
    assert first[0].immediate_response.status.code == 401


def test_two_messages_in_one_frame_get_two_answers_in_order(
    server: H2Server, runtime: Runtime, tmp_path: Path
) -> None:
    key, record = keys.generate(name="app")
    keys.add(tmp_path / "keys.yaml", record)
    runtime.reload_if_changed()
    client = Client(server)
    sid = client.open()
    later = pb.ProcessingRequest(response_headers=pb.HttpHeaders()).SerializeToString()
    framed = [b"\x00" + len(m).to_bytes(4, "big") + m for m in (request_headers(key), later)]
    client.h2.send_data(sid, b"".join(framed), end_stream=True)
    client.pump()
    reply = client.replies[sid]
    kinds = [a.WhichOneof("response") for a in answers(reply)]
    assert kinds == ["request_headers", "response_headers"]
    assert reply.status == Status.OK


def test_a_reply_larger_than_the_window_waits_for_window_updates(server: H2Server) -> None:
    client = Client(server, window=16)  # every reply is bigger than this
    sid = client.open()
    client.send(sid, request_headers(), end=True)
    reply = client.replies[sid]
    (answer,) = answers(reply)
    assert answer.immediate_response.status.code == 401
    assert reply.status == Status.OK  # trailers came after all the data
    assert not server.connections or not next(iter(server.connections)).calls


def test_a_reset_in_the_same_read_as_a_message_is_quiet(server: H2Server) -> None:
    client = Client(server)
    sid = client.open()
    payload = request_headers()
    client.h2.send_data(sid, b"\x00" + len(payload).to_bytes(4, "big") + payload)
    client.h2.reset_stream(sid)
    client.pump()  # no StreamClosedError escapes
    assert client.server_side.calls == {}
    other = client.open()
    client.send(other, request_headers(), end=True)
    assert client.replies[other].status == Status.OK


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        (b"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", b"", Status.UNIMPLEMENTED),
        (PROCESS_PATH, b"\xff" * 10, Status.INVALID_ARGUMENT),  # not a ProcessingRequest
        (PROCESS_PATH, b"x" * 5000, Status.RESOURCE_EXHAUSTED),  # over max_message_bytes
        (HEALTH_CHECK_PATH, b"\xff" * 10, Status.INVALID_ARGUMENT),
    ],
)
def test_bad_calls_get_a_grpc_status_and_the_connection_lives(
    server: H2Server, path: bytes, payload: bytes, status: Status
) -> None:
    client = Client(server)
    sid = client.open(path)
    client.send(sid, payload, end=True)
    assert client.replies[sid].status == status
    healthy = client.open(HEALTH_CHECK_PATH)
    client.send(healthy, health_pb2.HealthCheckRequest(service=SERVICE).SerializeToString())
    (message,) = client.replies[healthy].messages()
    assert health_pb2.HealthCheckResponse.FromString(message).status == 1  # SERVING


def test_compressed_messages_are_refused(server: H2Server) -> None:
    client = Client(server)
    sid = client.open()
    payload = request_headers()
    client.h2.send_data(sid, b"\x01" + len(payload).to_bytes(4, "big") + payload, end_stream=True)
    client.pump()
    assert client.replies[sid].status == Status.UNIMPLEMENTED


def test_goaway_lets_open_streams_finish_and_refuses_new_ones(server: H2Server) -> None:
    client = Client(server)
    open_sid = client.open()
    client.send(open_sid, request_headers())
    client.server_side.goaway()
    # Read the GOAWAY off the wire by hand: h2's client would stop sending on
    # open streams once it saw one, which Envoy (per RFC 9113) does not.
    frame, length = Frame.parse_frame_header(memoryview(client.transport.out[:9]))
    frame.parse_body(memoryview(client.transport.out[9 : 9 + length]))
    assert isinstance(frame, GoAwayFrame) and frame.last_stream_id == open_sid
    client.transport.out.clear()
    refused = client.open()
    later = pb.ProcessingRequest(response_headers=pb.HttpHeaders()).SerializeToString()
    client.send(open_sid, later, end=True)
    reply = client.replies[open_sid]
    assert [a.WhichOneof("response") for a in answers(reply)] == [
        "immediate_response",
        "response_headers",
    ]
    assert reply.status == Status.OK
    assert client.replies[refused].reset  # REFUSED_STREAM: safe for Envoy to retry elsewhere


def test_a_late_stream_the_client_already_reset_is_not_refused_twice(server: H2Server) -> None:
    client = Client(server)
    client.server_side.goaway()
    client.transport.out.clear()
    late = client.open()
    client.h2.reset_stream(late)  # HEADERS and RST_STREAM arrive in one read
    client.pump()  # no StreamClosedError escapes; the connection lives on
    assert not client.transport.closed
    assert client.server_side.calls == {}


def test_garbage_instead_of_http2_closes_the_connection(server: H2Server) -> None:
    connection = _Connection(server)
    transport = MemoryTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    connection.data_received(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
    assert transport.closed
