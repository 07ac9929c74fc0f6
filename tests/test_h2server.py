"""The h2 gRPC server's edges, driven in memory by an h2 client: no sockets, no sleeps.

Framing split anywhere, flow control with a tiny window, resets racing replies,
unknown methods, oversized and malformed messages, GOAWAY on drain; replies that
come later (an awaitable from handle): order, credit, resets, faults, drain.
"""

from __future__ import annotations

import asyncio
import logging
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

from .held_replies import TIMEOUT, Backend, label_of, message

pytestmark = pytest.mark.usefixtures("provider_keys_in_env")

SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"


class MemoryTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.written = asyncio.Event()  # for a reply that the server sends later

    def write(self, data: bytes) -> None:
        self.out += data
        self.written.set()

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


# Replies that come later: handle() returns an awaitable (tests/held_replies.py).


@pytest.fixture(params=["future", "coroutine"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


@pytest.fixture
def held_server(backend: Backend) -> H2Server:
    return H2Server(backend.new_processor, ("", SERVICE), max_message_bytes=4096)


async def written(client: Client) -> None:
    """Wait until the server writes on its own (a pending reply came), then settle."""
    await asyncio.wait_for(client.transport.written.wait(), TIMEOUT)
    client.transport.written.clear()
    client.pump()


def labels(reply: Reply) -> list[bytes]:
    return [label_of(a) for a in answers(reply)]


def framed(*labels: bytes) -> bytes:
    data = [message(label).SerializeToString() for label in labels]
    return b"".join(b"\x00" + len(m).to_bytes(4, "big") + m for m in data)


async def test_messages_behind_a_pending_reply_wait_and_replies_keep_order(
    held_server: H2Server, backend: Backend
) -> None:
    client = Client(held_server)
    sid = client.open()
    client.h2.send_data(sid, framed(b"hold-1", b"two", b"hold-3", b"four"), end_stream=True)
    client.pump()
    (processor,) = backend.processors
    first = await backend.next_ask()
    assert processor.handled == [b"hold-1"]  # the rest waits, end of stream included
    reply = client.replies[sid]
    assert not reply.data and reply.status is None
    first.release()
    await written(client)
    assert labels(reply) == [b"hold-1", b"two"]
    assert processor.handled == [b"hold-1", b"two", b"hold-3"]
    (await backend.next_ask()).release()
    await written(client)
    assert labels(reply) == [b"hold-1", b"two", b"hold-3", b"four"]
    assert reply.status == Status.OK  # trailers only after the last reply
    assert not processor.overlapped
    assert processor.closes == 1 and not client.server_side.calls


async def test_other_streams_are_answered_while_a_reply_is_pending(
    held_server: H2Server, backend: Backend
) -> None:
    client = Client(held_server)
    slow, fast = client.open(), client.open()
    client.send(slow, message(b"hold").SerializeToString())
    ask = await backend.next_ask()
    client.h2.send_data(fast, framed(b"a", b"b"), end_stream=True)  # one frame, two messages
    client.pump()
    assert labels(client.replies[fast]) == [b"a", b"b"]
    assert client.replies[fast].status == Status.OK
    assert not client.replies[slow].data
    ask.release()
    await written(client)
    assert labels(client.replies[slow]) == [b"hold"]


def stream_window(client: Client, sid: int) -> int:
    """What the client may still send on the stream (below the connection's window)."""
    window: int = client.h2.local_flow_control_window(sid)
    return window


async def test_a_stream_that_floods_while_pending_gets_its_credit_as_messages_are_taken(
    held_server: H2Server, backend: Backend
) -> None:
    client = Client(held_server)
    sid = client.open()
    client.send(sid, message(b"hold").SerializeToString())
    ask = await backend.next_ask()
    window, connection = stream_window(client, sid), client.h2.outbound_flow_control_window
    flood = framed(*[b"x" * 1000] * 50)
    for start in range(0, len(flood), 4096):
        client.h2.send_data(sid, flood[start : start + 4096])
        client.pump()
    assert stream_window(client, sid) == window - len(flood)  # no credit while they wait
    assert client.h2.outbound_flow_control_window == connection  # the connection's came back
    other = client.open()
    client.send(other, message(b"meanwhile").SerializeToString(), end=True)
    assert labels(client.replies[other]) == [b"meanwhile"]
    ask.release()
    await written(client)
    assert len(answers(client.replies[sid])) == 51
    assert stream_window(client, sid) == window  # taken, so credited


async def test_a_reset_while_pending_drops_the_reply_and_closes_once_the_work_is_done(
    held_server: H2Server, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(held_server)
    sid = client.open()
    client.h2.send_data(sid, framed(b"hold", b"after"))
    client.pump()
    (processor,) = backend.processors
    ask = await backend.next_ask()
    client.h2.reset_stream(sid)
    client.pump()
    assert client.server_side.calls == {}
    assert processor.closes == 0  # the pending work is not cut short
    ask.release()
    await processor.wait_closed()
    assert processor.closes == 1 and not processor.closed_while_pending
    assert processor.completed == [b"hold"] and processor.handled == [b"hold"]
    client.pump()
    assert not client.replies[sid].data  # nothing written for the reset stream
    assert not held_server.abandoned
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_connection_lost_while_pending_closes_once_the_work_is_done(
    held_server: H2Server, backend: Backend
) -> None:
    client = Client(held_server)
    client.send(client.open(), message(b"hold").SerializeToString())
    (processor,) = backend.processors
    ask = await backend.next_ask()
    client.server_side.connection_lost(None)
    assert processor.closes == 0
    ask.release()
    await processor.wait_closed()
    assert processor.closes == 1 and processor.completed == [b"hold"]


async def test_a_goaway_from_envoy_while_pending_closes_once_the_work_is_done(
    held_server: H2Server, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(held_server)
    sid = client.open()
    client.send(sid, message(b"hold").SerializeToString())
    (processor,) = backend.processors
    ask = await backend.next_ask()
    client.h2.send_data(sid, framed(b"queued"))  # in the same read as the GOAWAY
    client.h2.close_connection()
    client.server_side.data_received(client.h2.data_to_send())
    assert client.transport.closed and processor.closes == 0
    client.transport.out.clear()
    ask.release()
    await processor.wait_closed()
    assert processor.closes == 1 and processor.completed == [b"hold"]
    assert not client.transport.out  # nothing sent after the connection closed
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_pending_reply_that_raises_ends_that_stream_only(
    held_server: H2Server, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(held_server)
    broken, other = client.open(), client.open()
    client.h2.send_data(broken, framed(b"hold", b"after"))
    client.pump()
    (processor, *_) = backend.processors
    (await backend.next_ask()).fail()
    await written(client)
    assert client.replies[broken].status == Status.INTERNAL
    assert not client.replies[broken].data
    assert processor.handled == [b"hold"] and processor.closes == 1
    assert "fault escaped the ext_proc stream processor" in caplog.text
    client.send(other, message(b"fine").SerializeToString(), end=True)
    assert labels(client.replies[other]) == [b"fine"]
    assert not client.transport.closed


async def test_a_fault_escaping_handle_ends_that_stream_only(
    held_server: H2Server, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    client = Client(held_server)
    broken, other = client.open(), client.open()
    client.send(broken, message(b"raise").SerializeToString())  # handle() raises at once
    assert client.replies[broken].status == Status.INTERNAL
    assert "fault escaped the ext_proc stream processor" in caplog.text
    client.send(other, message(b"fine").SerializeToString(), end=True)
    assert labels(client.replies[other]) == [b"fine"]
    assert [p.closes for p in backend.processors] == [1, 1]
    assert not client.transport.closed


async def test_drain_waits_for_the_pending_work_of_a_reset_stream(
    held_server: H2Server, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = Client(held_server)
    sid = client.open()
    client.send(sid, message(b"hold").SerializeToString())
    (processor,) = backend.processors
    ask = await backend.next_ask()
    client.h2.reset_stream(sid)
    client.pump()
    settling, settle = asyncio.Event(), held_server.abandoned.settle

    async def spied(grace: float) -> None:
        settling.set()
        await settle(grace)

    monkeypatch.setattr(held_server.abandoned, "settle", spied)
    stopping = asyncio.create_task(held_server.stop(TIMEOUT))
    await asyncio.wait_for(settling.wait(), TIMEOUT)
    assert processor.closes == 0
    ask.release()
    await asyncio.wait_for(stopping, TIMEOUT)
    assert processor.closes == 1 and not processor.closed_while_pending


async def test_after_the_drain_timeout_pending_work_is_closed_without_waiting(
    held_server: H2Server, backend: Backend
) -> None:
    client = Client(held_server)
    client.send(client.open(), message(b"hold").SerializeToString())
    (processor,) = backend.processors
    ask = await backend.next_ask()
    await asyncio.wait_for(held_server.stop(0.05), TIMEOUT)  # the stream never ends
    assert processor.closes == 1 and processor.closed_while_pending
    ask.release()
    for _ in range(5):  # a few turns of the loop: the completion finds nothing left to close
        await asyncio.sleep(0)
    assert processor.completed == [b"hold"] and processor.closes == 1
