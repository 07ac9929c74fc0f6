"""The gRPC server spoken to directly, as Envoy would: every message kind, faults, resets,
and replies that come later (an awaitable from handle), on both transports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import orjson
import pytest
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3.external_processor_pb2_grpc import ExternalProcessorStub
from grpc_health.v1 import health_pb2, health_pb2_grpc

import extproc
from extproc import keys, server
from extproc.config import AuditConfig, Config, MetricsConfig, ServerConfig
from extproc.decisions import Ask, Deny, Outcome, forbidden
from extproc.exchange import Exchange
from extproc.grpcio_server import GrpcioServer
from extproc.h2server import H2Server
from extproc.processor import StreamProcessor
from extproc.runtime import Runtime
from extproc.stages import Flow
from extproc.stages.auth import _AllowlistFlow
from extproc.stages.metering import MeteringFlow

from .held_replies import TIMEOUT, Backend, label_of, message

pytestmark = pytest.mark.usefixtures("provider_keys_in_env")


def headers(**values: str) -> pb.HttpHeaders:
    pairs = [
        HeaderValue(key=k.replace("_", "-").replace("--", ":"), raw_value=v.encode())
        for k, v in values.items()
    ]
    return pb.HttpHeaders(headers=HeaderMap(headers=pairs))


def request_headers(key: str, path: str = "/v1/chat/completions") -> pb.ProcessingRequest:
    h = headers(__method="POST", __path=path, authorization=f"Bearer {key}")
    return pb.ProcessingRequest(request_headers=h)


class Harness:
    def __init__(self, runtime: Runtime, port: int) -> None:
        self.runtime, self.port = runtime, port
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = ExternalProcessorStub(self.channel)

    async def exchange(self, *requests: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
        """Send each message and read one answer to it, like Envoy outside full duplex."""
        call = self.stub.Process()
        answers = []
        for request in requests:
            await call.write(request)
            answer = await asyncio.wait_for(call.read(), timeout=5)
            if answer is grpc.aio.EOF:
                break
            answers.append(answer)
        with contextlib.suppress(asyncio.InvalidStateError):  # a 500 may have ended it
            await call.done_writing()
        return answers

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.runtime.metrics.registry.get_sample_value(name, labels or {}) or 0.0


Fixture = tuple[Harness, dict[str, str]]


TRANSPORTS = pytest.mark.parametrize("transport", ["h2", "grpcio"])


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, transport: str, drain_delay_s: float = 0.5, drain_timeout_s: float = 2
) -> AsyncIterator[tuple[Harness, dict[str, str], asyncio.Event, asyncio.Task[None]]]:
    """A server on a free port with two keys; yields (harness, keys, stop, task)."""
    keys_file = tmp_path / "keys.yaml"
    made = {}
    for name, models in (("open", ()), ("narrow", ("gpt-4o-mini",))):
        key, record = keys.generate(name=name, models=models)
        keys.add(keys_file, record)
        made[name] = key
    server_config = ServerConfig(
        port=0,
        transport=transport,  # type: ignore[arg-type]
        drain_delay_s=drain_delay_s,
        drain_timeout_s=drain_timeout_s,
    )
    config = Config(
        server=server_config,
        metrics=MetricsConfig(enabled=False),
        auth={"keys_file": keys_file},
        audit=AuditConfig(file=tmp_path / "audit.log"),
    )  # type: ignore[arg-type]
    runtime = Runtime(config)
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        server.serve(config, runtime=runtime, stop=stop, on_ready=ready.set_result)
    )
    h = Harness(runtime, await asyncio.wait_for(ready, 10))
    try:
        yield h, made, stop, task
    finally:
        stop.set()
        await h.channel.close()
        await asyncio.wait_for(task, 10)


@TRANSPORTS
async def test_serve_audits_its_start_a_denial_and_its_stop(tmp_path: Path, transport: str) -> None:
    async with running(tmp_path, transport) as (h, _, _, _):
        (answer,) = await h.exchange(request_headers("tw_0123456789ab_" + "x" * 43))
        assert answer.immediate_response.status.code == 401
    lines = [orjson.loads(x) for x in (tmp_path / "audit.log").read_bytes().splitlines()]
    assert [e["event"] for e in lines] == ["started", "auth_failure", "stopped"]
    assert (lines[1]["reason"], lines[1]["claimed_key_id"]) == ("invalid_api_key", "0123456789ab")
    assert lines[1]["client"] == "" and "x" * 43 not in str(lines)  # no attributes sent here
    assert h.metric("tollway_audit_events_total", {"event": "auth_failure"}) == 1


@pytest.fixture(params=["h2", "grpcio"])
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Fixture]:
    async with running(tmp_path, request.param) as (h, made, _, _):
        yield h, made


async def test_every_message_kind_gets_an_answer_of_its_own_kind(harness: Fixture) -> None:
    h, made = harness
    answers = await h.exchange(
        request_headers(made["open"], path="/v1/models"),  # not metered: asks for nothing more
        pb.ProcessingRequest(response_headers=headers(__status="200")),
        pb.ProcessingRequest(response_body=pb.HttpBody(body=b"data", end_of_stream=True)),
        pb.ProcessingRequest(request_trailers=pb.HttpTrailers()),
        pb.ProcessingRequest(response_trailers=pb.HttpTrailers()),
    )
    assert [a.WhichOneof("response") for a in answers] == [
        "request_headers",
        "response_headers",
        "response_body",
        "request_trailers",
        "response_trailers",
    ]
    first = answers[0]
    assert first.mode_override.request_body_mode == ProcessingMode.NONE
    assert first.mode_override.response_header_mode == ProcessingMode.SKIP
    assert h.metric("tollway_requests_total", {"route": "openai", "outcome": "allowed"}) == 1


async def test_the_buffered_body_is_decided_without_end_of_stream(harness: Fixture) -> None:
    """BUFFERED sends the whole body in one message; before trailers it lacks end_of_stream."""
    h, made = harness
    answers = await h.exchange(
        request_headers(made["narrow"]),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model": "gpt-4o"}')),
    )
    assert answers[0].mode_override.request_body_mode == ProcessingMode.BUFFERED
    assert answers[0].mode_override.request_trailer_mode == ProcessingMode.SKIP  # not needed
    denial = answers[1].immediate_response
    assert denial.status.code == 403 and b"model_not_allowed" in denial.body
    allowed = await h.exchange(
        request_headers(made["narrow"]),
        pb.ProcessingRequest(request_body=pb.HttpBody(body=b'{"model": "gpt-4o-mini"}')),
    )
    assert allowed[1].WhichOneof("response") == "request_body"
    assert h.metric("tollway_requests_total", {"route": "openai", "outcome": "allowed"}) == 1


def ended(message: pb.ProcessingRequest) -> pb.ProcessingRequest:
    message.request_headers.end_of_stream = True
    return message


async def test_headers_that_end_the_request_are_decided_on_an_empty_body(harness: Fixture) -> None:
    """content-length: 0, or no body at all: no body message will come."""
    h, made = harness
    (denial,) = await h.exchange(ended(request_headers(made["narrow"])))
    assert denial.immediate_response.status.code == 400
    code = orjson.loads(denial.immediate_response.body)["error"]["code"]
    assert code in {"invalid_body", "missing_model"}  # the auth stage's wording
    assert h.metric("tollway_requests_total", {"route": "openai", "outcome": code}) == 1
    # A key without an allowlist: metering wanted the body, the request goes on as it is.
    (answer,) = await h.exchange(ended(request_headers(made["open"])))
    assert answer.WhichOneof("response") == "request_headers"
    sets = {o.header.key for o in answer.request_headers.response.header_mutation.set_headers}
    assert "x-tollway-tenant" in sets
    assert answer.mode_override.response_header_mode == ProcessingMode.SEND  # still metered
    assert h.metric("tollway_requests_total", {"route": "openai", "outcome": "allowed"}) == 1


async def test_every_stream_is_counted_once(harness: Fixture) -> None:
    h, made = harness
    assert h.metric("tollway_extproc_streams_total") == 0
    for _ in range(3):
        await h.exchange(
            request_headers(made["open"], path="/v1/models"),
            pb.ProcessingRequest(response_headers=headers(__status="200")),
        )
    assert h.metric("tollway_extproc_streams_total") == 3
    assert h.metric("tollway_extproc_messages_total", {"kind": "request_headers"}) == 3
    version = {"version": extproc.__version__}
    assert h.metric("tollway_info", version) == 1


async def test_a_fault_is_a_500_for_that_request_only(
    harness: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, made = harness

    def broken(ex: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.runtime.auth, "start", broken)
    (answer,) = await h.exchange(request_headers(made["open"]))
    assert answer.immediate_response.status.code == 500
    assert b"internal_error" in answer.immediate_response.body
    assert b"bug" not in answer.immediate_response.body  # no internals leak to clients
    assert h.metric("tollway_internal_errors_total") == 1
    monkeypatch.undo()
    (answer,) = await h.exchange(request_headers(made["open"]))
    assert answer.WhichOneof("response") == "request_headers"


async def test_stream_reset_by_envoy_is_quiet(
    harness: Fixture, caplog: pytest.LogCaptureFixture
) -> None:
    h, made = harness
    for _ in range(20):
        call = h.stub.Process()
        await call.write(request_headers(made["open"]))
        call.cancel()  # what Envoy does when a request ends
    (answer,) = await h.exchange(request_headers(made["open"]))
    assert answer.WhichOneof("response") == "request_headers"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@TRANSPORTS
async def test_health_goes_not_serving_when_stopping(tmp_path: Path, transport: str) -> None:
    config = Config(
        server=ServerConfig(port=0, transport=transport, drain_delay_s=1.0, drain_timeout_s=1),
        metrics=MetricsConfig(enabled=False),
        auth={"keys_file": tmp_path / "keys.yaml"},
        audit=AuditConfig(file=tmp_path / "audit.log"),
    )  # type: ignore[arg-type]
    stop, ready = asyncio.Event(), asyncio.get_running_loop().create_future()
    task = asyncio.create_task(server.serve(config, stop=stop, on_ready=ready.set_result))
    port = await asyncio.wait_for(ready, 10)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=server.SERVICE_NAME)
        assert (
            await health.Check(request, timeout=2)
        ).status == health_pb2.HealthCheckResponse.SERVING
        stop.set()
        statuses = []
        for _ in range(50):  # well within the 1 s drain delay, while the server still answers
            statuses.append((await health.Check(request, timeout=2)).status)
            if statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.01)
        assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    await asyncio.wait_for(task, 10)


@TRANSPORTS
async def test_drain_refuses_new_streams_and_finishes_those_in_flight(
    tmp_path: Path, transport: str
) -> None:
    async with running(tmp_path, transport, drain_delay_s=0, drain_timeout_s=10) as (
        h,
        made,
        stop,
        task,
    ):
        call = h.stub.Process()
        await call.write(request_headers(made["open"]))
        assert (await call.read()).WhichOneof("response") == "request_headers"
        stop.set()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{h.port}") as fresh:
            check = health_pb2_grpc.HealthStub(fresh).Check
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                for _ in range(100):  # until the server has begun to stop
                    await check(health_pb2.HealthCheckRequest(), timeout=1)
                    await asyncio.sleep(0.02)
            # h2: the listener is closed; grpc.aio cancels calls it will not serve
            refusals = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}
            assert refused.value.code() in refusals
        await call.write(pb.ProcessingRequest(response_headers=headers(__status="200")))
        assert (await call.read()).WhichOneof("response") == "response_headers"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(task, 10)  # stops as soon as the last stream is done


@TRANSPORTS
async def test_health_of_an_unknown_service_is_not_found(tmp_path: Path, transport: str) -> None:
    async with running(tmp_path, transport) as (h, _, _, _):
        check = health_pb2_grpc.HealthStub(h.channel).Check
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=2)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_fault_while_metering_lets_the_response_through(
    harness: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, made = harness

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(MeteringFlow, "on_response_body", broken)
    body = pb.HttpBody(body=b'{"usage": {}}', end_of_stream=True)
    answers = await h.exchange(
        request_headers(made["open"], path="/anthropic/v1/messages"),
        pb.ProcessingRequest(
            response_headers=headers(__status="200", content_type="application/json")
        ),
        pb.ProcessingRequest(response_body=body),
    )
    kinds = [a.WhichOneof("response") for a in answers]
    assert kinds == ["request_headers", "response_headers", "response_body"]
    assert not answers[2].response_body.response.HasField("body_mutation")  # unchanged
    assert h.metric("tollway_internal_errors_total") == 1


@pytest.mark.parametrize("phase", ["request_body", "response_headers"])
async def test_a_request_tollway_failed_is_never_metered(
    harness: Fixture, monkeypatch: pytest.MonkeyPatch, phase: str
) -> None:
    """A fault after metering started: the client got a 500 (or an unmetered response)."""
    h, made = harness

    def broken(*args: object) -> None:
        raise RuntimeError("bug")

    if phase == "request_body":  # the allowlist check of a restricted key, after metering began
        monkeypatch.setattr(_AllowlistFlow, "on_request_body", broken)
    else:
        monkeypatch.setattr(MeteringFlow, "on_response_headers", broken)
    body = pb.HttpBody(body=b'{"model": "gpt-4o-mini", "messages": []}', end_of_stream=True)
    messages = [
        request_headers(made["narrow"] if phase == "request_body" else made["open"]),
        pb.ProcessingRequest(request_body=body),
    ]
    if phase == "response_headers":
        status = headers(__status="200", content_type="application/json")
        messages.append(pb.ProcessingRequest(response_headers=status))
    answers = await h.exchange(*messages)
    if phase == "request_body":  # the stream ends with Tollway's 500
        assert answers[-1].immediate_response.status.code == 500
    assert h.metric("tollway_internal_errors_total") == 1
    assert h.runtime.store.records == 0  # type: ignore[attr-defined]
    unpriced = {"provider": "openai", "api": "chat"}
    assert h.metric("tollway_gen_ai_unpriced_requests_total", unpriced) == 0


# Replies that come later: handle() returns an awaitable (tests/held_replies.py),
# the processors injected through the transports' new_processor factory.

HeldServer = H2Server | GrpcioServer


@pytest.fixture(params=["future", "coroutine"])
def backend(request: pytest.FixtureRequest) -> Backend:
    return Backend(request.param)


@contextlib.asynccontextmanager
async def holding(
    transport: str, backend: Backend
) -> AsyncIterator[tuple[HeldServer, ExternalProcessorStub]]:
    """A transport serving the backend's processors on a free port, and a stub to call it."""
    held: HeldServer
    if transport == "h2":
        held = H2Server(backend.new_processor, ("",), max_message_bytes=4096)
    else:
        held = GrpcioServer(backend.new_processor, ("",), max_message_bytes=4096)
    port = await held.start("127.0.0.1", 0)
    await held.set_serving(True)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield held, ExternalProcessorStub(channel)
    finally:
        await channel.close()
        await held.stop(1)


async def read_label(call: grpc.aio.StreamStreamCall) -> bytes:
    return label_of(await asyncio.wait_for(call.read(), TIMEOUT))


async def until(condition: Callable[[], bool]) -> None:
    """Poll a condition the test cannot await, with a deadline."""
    async with asyncio.timeout(TIMEOUT):
        while not condition():  # noqa: ASYNC110 (no event to await: a server internal)
            await asyncio.sleep(0.005)


@TRANSPORTS
async def test_messages_behind_a_pending_reply_wait_and_replies_keep_order(
    transport: str, backend: Backend
) -> None:
    async with holding(transport, backend) as (_, stub):
        call = stub.Process()
        for label in (b"hold-1", b"two", b"hold-3", b"four"):
            await call.write(message(label))
        first = await backend.next_ask()
        # Another stream on the same connection, answered meanwhile: by then the
        # server has read the frames written before it.
        other = stub.Process()
        await other.write(message(b"other"))
        assert await read_label(other) == b"other"
        processor = backend.processors[0]
        assert processor.handled == [b"hold-1"]
        first.release()
        assert [await read_label(call), await read_label(call)] == [b"hold-1", b"two"]
        (await backend.next_ask()).release()
        assert [await read_label(call), await read_label(call)] == [b"hold-3", b"four"]
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        assert processor.handled == [b"hold-1", b"two", b"hold-3", b"four"]
        assert not processor.overlapped  # each message handled only after the reply before it
        await processor.wait_closed()
        assert processor.closes == 1


@TRANSPORTS
async def test_other_streams_are_answered_while_a_reply_is_pending(
    transport: str, backend: Backend
) -> None:
    async with holding(transport, backend) as (_, stub):
        slow = stub.Process()
        await slow.write(message(b"hold"))
        ask = await backend.next_ask()
        for _ in range(3):
            fast = stub.Process()
            for label in (b"a", b"b"):
                await fast.write(message(label))
                assert await read_label(fast) == label
            await fast.done_writing()
            assert await fast.code() == grpc.StatusCode.OK
        assert not ask.answer.done()
        ask.release()
        assert await read_label(slow) == b"hold"
        await slow.done_writing()
        assert await slow.code() == grpc.StatusCode.OK


@TRANSPORTS
async def test_a_reset_while_pending_closes_once_the_work_is_done(
    transport: str, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async with holding(transport, backend) as (held, stub):
        call = stub.Process()
        await call.write(message(b"hold"))
        await call.write(message(b"after"))
        ask = await backend.next_ask()
        processor = backend.processors[0]
        call.cancel()  # what Envoy does when the request ends
        await until(lambda: len(held.abandoned) == 1)
        assert processor.closes == 0  # the pending work is not cut short
        ask.release()
        await processor.wait_closed()
        assert processor.closes == 1 and not processor.closed_while_pending
        assert processor.completed == [b"hold"]  # not cancelled halfway
        assert processor.handled == [b"hold"]  # nothing after the reset
        again = stub.Process()
        await again.write(message(b"next"))
        assert await read_label(again) == b"next"
        await again.done_writing()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert processor.closes == 1


@TRANSPORTS
@pytest.mark.parametrize("fault", ["later", "now"])
async def test_a_fault_that_escapes_the_processor_ends_that_stream_only(
    transport: str, fault: str, backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    async with holding(transport, backend) as (_, stub):
        broken = stub.Process()
        await broken.write(message(b"hold" if fault == "later" else b"raise"))
        if fault == "later":
            (await backend.next_ask()).fail()
        assert await asyncio.wait_for(broken.code(), TIMEOUT) == grpc.StatusCode.INTERNAL
        assert "fault escaped the ext_proc stream processor" in caplog.text
        processor = backend.processors[0]
        await processor.wait_closed()
        assert processor.closes == 1
        fine = stub.Process()
        await fine.write(message(b"fine"))
        assert await read_label(fine) == b"fine"
        await fine.done_writing()
        assert await fine.code() == grpc.StatusCode.OK


@TRANSPORTS
async def test_drain_lets_a_pending_reply_complete(transport: str, backend: Backend) -> None:
    async with holding(transport, backend) as (held, stub):
        call = stub.Process()
        await call.write(message(b"hold"))
        ask = await backend.next_ask()
        stopping = asyncio.create_task(held.stop(TIMEOUT))
        ask.release()
        assert await read_label(call) == b"hold"
        await call.write(message(b"after"))
        assert await read_label(call) == b"after"
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        await asyncio.wait_for(stopping, TIMEOUT)
        assert backend.processors[0].closes == 1


@TRANSPORTS
async def test_drain_waits_for_the_pending_work_of_a_reset_stream(
    transport: str, backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with holding(transport, backend) as (held, stub):
        call = stub.Process()
        await call.write(message(b"hold"))
        ask = await backend.next_ask()
        call.cancel()
        await until(lambda: len(held.abandoned) == 1)
        settling, settle = asyncio.Event(), held.abandoned.settle

        async def spied(grace: float) -> None:
            settling.set()
            await settle(grace)

        monkeypatch.setattr(held.abandoned, "settle", spied)
        stopping = asyncio.create_task(held.stop(TIMEOUT))
        await asyncio.wait_for(settling.wait(), TIMEOUT)
        processor = backend.processors[0]
        assert processor.closes == 0
        ask.release()
        await asyncio.wait_for(stopping, TIMEOUT)
        assert processor.closes == 1 and not processor.closed_while_pending


@TRANSPORTS
async def test_after_the_drain_timeout_a_pending_reply_is_closed_without_waiting(
    transport: str, backend: Backend
) -> None:
    async with holding(transport, backend) as (held, stub):
        call = stub.Process()
        await call.write(message(b"hold"))
        ask = await backend.next_ask()
        await asyncio.wait_for(held.stop(0.2), TIMEOUT)  # the stream never ends
        processor = backend.processors[0]
        await processor.wait_closed()
        assert processor.closes == 1 and processor.closed_while_pending
        ask.release()
        await until(lambda: processor.completed == [b"hold"])
        assert processor.closes == 1


# ---- a stage whose decision awaits a backend ------------------------------------------


class Gate:
    """A backend that answers when the test says so; a stage that asks it first."""

    def __init__(self, timeout_s: float = 5.0) -> None:
        self.arrived: asyncio.Queue[asyncio.Future[bool]] = asyncio.Queue()
        self.finished: list[Outcome] = []
        self.done = asyncio.Event()
        self.timeout_s = timeout_s

    def start(self, ex: Exchange) -> Ask[Flow | Deny | None]:
        gate = self

        class Held(Flow):
            __slots__ = ()

            def finish(self, ex: Exchange, outcome: Outcome) -> None:
                gate.finished.append(outcome)
                gate.done.set()

        def call() -> asyncio.Future[bool]:
            answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.arrived.put_nowait(answer)
            return answer

        def resume(open_: bool) -> Flow | Deny | None:
            return Held() if open_ else forbidden("gate_closed", "The gate is closed.")

        closed = Deny(503, "api_error", "gate_unavailable", "No gate.", "tollway_gate")
        return Ask("gate", call, resume, lambda reason: closed, self.timeout_s)

    async def next(self) -> asyncio.Future[bool]:
        """The next request that waits at the gate (bounded wait)."""
        return await asyncio.wait_for(self.arrived.get(), 5)


def gated(h: Harness, gate: Gate) -> None:
    pipeline = h.runtime.pipeline
    pipeline.stages = (gate, *pipeline.stages)


async def test_a_reply_that_waits_for_a_backend_keeps_order_and_holds_no_other_stream(
    harness: Fixture,
) -> None:
    h, made = harness
    gate = Gate()
    gated(h, gate)
    call = h.stub.Process()
    await call.write(request_headers(made["open"], path="/v1/models"))
    await call.write(pb.ProcessingRequest(response_headers=headers(__status="200")))
    waiting = await gate.next()
    # Another stream is answered while the first one waits (its own gate opens at once).
    other = asyncio.create_task(h.exchange(request_headers(made["open"], path="/v1/models")))
    (await gate.next()).set_result(True)
    (answer,) = await asyncio.wait_for(other, 5)
    assert answer.WhichOneof("response") == "request_headers"
    # The first stream's replies come in order once its backend answers.
    waiting.set_result(True)
    first = await asyncio.wait_for(call.read(), 5)
    assert first.WhichOneof("response") == "request_headers"
    assert first.request_headers.response.header_mutation.set_headers  # auth ran after the gate
    then = await asyncio.wait_for(call.read(), 5)
    assert then.WhichOneof("response") == "response_headers"
    await call.done_writing()


async def test_a_stream_reset_while_its_backend_is_pending_finishes_once(
    harness: Fixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    h, made = harness
    gate = Gate()
    gated(h, gate)
    told = asyncio.Event()  # the transport has seen the reset (grpc.aio sees it a little later)
    abandon = StreamProcessor.abandon

    def spied(processor: StreamProcessor) -> None:
        abandon(processor)
        told.set()

    monkeypatch.setattr(StreamProcessor, "abandon", spied)
    call = h.stub.Process()
    await call.write(request_headers(made["open"], path="/v1/models"))
    waiting = await gate.next()
    call.cancel()  # Envoy resets the stream: the client went away
    await asyncio.wait_for(told.wait(), 5)
    assert not waiting.cancelled()  # the backend call is not cut off halfway
    waiting.set_result(True)
    await asyncio.wait_for(gate.done.wait(), 5)
    assert gate.finished == [Outcome.ABANDONED]


async def test_a_backend_past_its_deadline_fails_closed_and_is_counted(harness: Fixture) -> None:
    h, made = harness
    gate = Gate(timeout_s=0.05)
    gated(h, gate)
    (answer,) = await h.exchange(request_headers(made["open"], path="/v1/models"))
    assert answer.immediate_response.status.code == 503
    assert orjson.loads(answer.immediate_response.body)["error"]["code"] == "gate_unavailable"
    assert h.metric("tollway_backend_failures_total", {"stage": "gate", "reason": "timeout"}) == 1
