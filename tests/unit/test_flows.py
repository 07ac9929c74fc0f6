"""The stage contract: flows see only the phases they asked for and finish exactly once."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field

import orjson
import pytest

from extproc.body import RequestBody
from extproc.decisions import Ask, BodyMode, Deny, Outcome, Phase, forbidden
from extproc.events import ResponseEvents
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.pipeline import Pipeline, Run
from extproc.routes import RouteTable
from extproc.stages import Flow

from .factories import Clock, upstreams


@dataclass
class Journal:
    """What every flow of a test saw, in order."""

    calls: list[str] = field(default_factory=list)


class Recording(Flow):
    __slots__ = ("deny_at", "journal", "mode", "name", "wants")

    def __init__(
        self, name: str, journal: Journal, wants: Phase, mode: BodyMode, deny_at: str | None
    ) -> None:
        self.name, self.journal, self.wants = name, journal, wants
        self.mode, self.deny_at = mode, deny_at

    def _saw(self, phase: str) -> Deny | None:
        self.journal.calls.append(f"{self.name}.{phase}")
        return forbidden("no", "no") if self.deny_at == phase else None

    def on_request_body(self, ex: Exchange) -> Deny | None:
        return self._saw("request_body")

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        self._saw("response_headers")
        return self.mode

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        self._saw("response_body")
        return None

    def finish(self, ex: Exchange, outcome: Outcome) -> None:
        self.journal.calls.append(f"{self.name}.finish:{outcome.value}")


@dataclass
class Starts:
    """A stage that starts a Recording flow (or denies, or declines)."""

    name: str
    journal: Journal
    wants: Phase = Phase.NONE
    mode: BodyMode = BodyMode.NONE
    deny_at: str | None = None
    declines: bool = False

    def start(self, ex: Exchange) -> Flow | Deny | None:
        self.journal.calls.append(f"{self.name}.start")
        if self.deny_at == "start":
            return forbidden("no", "no")
        if self.declines:
            return None
        return Recording(self.name, self.journal, self.wants, self.mode, self.deny_at)


def run_of(*stages: Starts) -> Run:
    pipeline = Pipeline(RouteTable(upstreams()), stages, Clock())
    return pipeline.start("POST", "/v1/chat/completions", {}, frozenset())


ALL = Phase.REQUEST_BODY | Phase.RESPONSE_HEADERS


def test_flows_see_only_the_phases_they_asked_for_and_finish_in_reverse() -> None:
    j = Journal()
    run = run_of(
        Starts("a", j, Phase.REQUEST_BODY),
        Starts("b", j, declines=True),
        Starts("c", j, Phase.RESPONSE_HEADERS, BodyMode.STREAMED),
        Starts("d", j, Phase.RESPONSE_HEADERS),
    )
    assert run.request_headers() == ALL
    assert run.request_body(b"{}") is None
    assert run.response_headers(200, {}) is BodyMode.STREAMED
    run.response_body(b"x", end=False)
    run.response_body(b"y", end=True)
    assert j.calls == [
        "a.start",
        "b.start",
        "c.start",
        "d.start",
        "a.request_body",
        "c.response_headers",
        "d.response_headers",
        "c.response_body",  # d asked for no body: not called
        "c.response_body",
        "d.finish:forwarded",
        "c.finish:forwarded",
        "a.finish:forwarded",
    ]
    assert run.ex.outcome is Outcome.FORWARDED


@pytest.mark.parametrize(
    ("modes", "merged"),
    [
        ((BodyMode.NONE, BodyMode.STREAMED), BodyMode.STREAMED),
        ((BodyMode.STREAMED, BodyMode.BUFFERED), BodyMode.BUFFERED),
        ((BodyMode.BUFFERED, BodyMode.STREAMED), BodyMode.BUFFERED),
        ((BodyMode.NONE, BodyMode.NONE), BodyMode.NONE),
    ],
)
def test_the_strongest_body_mode_wins(modes: tuple[BodyMode, BodyMode], merged: BodyMode) -> None:
    j = Journal()
    run = run_of(*(Starts(f"s{i}", j, Phase.RESPONSE_HEADERS, m) for i, m in enumerate(modes)))
    run.request_headers()
    assert run.response_headers(200, {}) is merged


def finishes(j: Journal) -> list[str]:
    return [c for c in j.calls if ".finish:" in c]


@pytest.mark.parametrize(
    ("drive", "expected"),
    [
        # Denied at headers by the second stage: only the first flow started, and it finishes.
        ("deny_at_start", ["a.finish:denied"]),
        ("deny_at_body", ["b.finish:denied", "a.finish:denied"]),
        ("forwarded", ["b.finish:forwarded", "a.finish:forwarded"]),
        ("upstream_error", ["b.finish:forwarded", "a.finish:forwarded"]),
        ("reset_mid_stream", ["b.finish:abandoned", "a.finish:abandoned"]),
        ("no_body_arrives", ["b.finish:abandoned", "a.finish:abandoned"]),
        ("empty_body_at_headers", ["b.finish:forwarded", "a.finish:forwarded"]),
    ],
)
def test_every_path_finishes_each_flow_exactly_once(drive: str, expected: list[str]) -> None:
    j = Journal()
    second = "start" if drive == "deny_at_start" else "request_body"
    # The flows want no body of an upstream's error: done at its headers.
    mode = BodyMode.NONE if drive == "upstream_error" else BodyMode.STREAMED
    a = Starts("a", j, ALL, mode)
    b = Starts("b", j, ALL, mode, deny_at=second if "deny" in drive else None)
    run = run_of(a, b)
    decision = run.request_headers(end_of_stream=drive == "empty_body_at_headers")
    if drive not in ("deny_at_start", "no_body_arrives", "empty_body_at_headers"):
        assert isinstance(decision, Phase)
        run.request_body(b"{}")
    if drive in ("forwarded", "reset_mid_stream"):
        run.response_headers(200, {})
        run.response_body(b"part", end=False)
    if drive == "forwarded":
        run.response_body(b"rest", end=True)
    if drive == "upstream_error":
        run.response_headers(500, {})
    if drive == "empty_body_at_headers":
        run.response_headers(200, {}, end_of_stream=True)
    # Whatever happened, the transport ends the stream (close) and may do so twice.
    run.finish(Outcome.ABANDONED)
    run.finish(Outcome.FAILED)
    assert finishes(j) == expected


def test_a_flow_that_faults_while_finishing_does_not_stop_the_others() -> None:
    j = Journal()
    faults: list[int] = []

    class Broken(Recording):
        __slots__ = ()

        def finish(self, ex: Exchange, outcome: Outcome) -> None:
            raise RuntimeError("bug")

    class StartsBroken(Starts):
        def start(self, ex: Exchange) -> Flow | Deny | None:
            return Broken(self.name, self.journal, Phase.NONE, BodyMode.NONE, None)

    pipeline = Pipeline(
        RouteTable(upstreams()),
        [Starts("a", j), StartsBroken("b", j)],
        Clock(),
        on_fault=lambda: faults.append(1),
    )
    run = pipeline.start("GET", "/v1/models", {}, frozenset())
    run.request_headers()  # nothing more wanted: finished at once
    assert finishes(j) == ["a.finish:forwarded"] and faults == [1]


def test_a_stage_that_raises_still_finishes_the_flows_already_started() -> None:
    j = Journal()

    class Raises(Starts):
        def start(self, ex: Exchange) -> Flow | Deny | None:
            raise RuntimeError("bug")

    run = run_of(Starts("a", j, ALL), Raises("b", j))
    with pytest.raises(RuntimeError):
        run.request_headers()
    run.finish(Outcome.FAILED)  # what the processor does with a fault
    assert finishes(j) == ["a.finish:failed"]


# ---- one document for every stage's edits ----------------------------------------


class Redacts(Flow):
    """Edits the prompt in place, as a redaction stage will."""

    __slots__ = ()
    wants = Phase.REQUEST_BODY

    def on_request_body(self, ex: Exchange) -> Deny | None:
        doc = ex.json()
        doc["messages"][0]["content"] = "[REDACTED]"
        assert ex.document is not None
        ex.document.edited()
        return None


class StartsRedaction:
    def start(self, ex: Exchange) -> Flow | Deny | None:
        return Redacts()


def test_edits_of_two_stages_compose_and_are_written_once() -> None:
    """Redaction's edit is not undone by metering's include_usage (both in one document)."""
    from extproc.stages.metering import MeteringStage

    from .test_metering import PRICES, Records

    metering = MeteringStage(PRICES, Records(), Metrics())
    pipeline = Pipeline(RouteTable(upstreams()), [StartsRedaction(), metering], Clock())
    run = pipeline.start("POST", "/v1/chat/completions", {}, frozenset())
    run.request_headers()
    sent = b'{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"my ssn"}]}'
    assert run.request_body(sent) is None
    assert orjson.loads(run.ex.new_body or b"") == {
        "model": "gpt-4o",
        "stream": True,
        "messages": [{"role": "user", "content": "[REDACTED]"}],
        "stream_options": {"include_usage": True},
    }


@pytest.mark.parametrize(
    ("raw", "edits", "expected"),
    [
        # Nothing changed: the client's bytes go on untouched (no body mutation at all).
        (b' {"a": 1} ', [], None),
        # Only members the client did not send: spliced in, the client's bytes kept.
        (b' {"a": 1} ', [("b", 2)], b' {"b":2,"a": 1} '),
        (b"{}", [("b", 2)], b'{"b":2}'),
        # A member the client sent is changed: written out again.
        (b'{"a": 1}', [("a", 2)], b'{"a":2}'),
    ],
)
def test_a_body_is_written_once_and_only_if_it_changed(
    raw: bytes, edits: list[tuple[str, int]], expected: bytes | None
) -> None:
    body = RequestBody(raw)
    for name, value in edits:
        body.set(name, value)
    assert body.written() == expected


def test_a_body_too_deep_to_write_out_goes_on_as_sent() -> None:
    body = RequestBody(b'{"a": ' + b"[" * 300 + b"]" * 300 + b"}")
    body.edited()
    body.json()
    assert body.written() is None


# ---- a decision that needs a backend ------------------------------------------------


TOO_MANY = Deny(429, "rate_limit_error", "rate_limited", "Slow down.", "tollway_rate_limited")
UNAVAILABLE = Deny(503, "api_error", "limits_unavailable", "Try later.", "tollway_unavailable")


@dataclass
class Limits:
    """A stage whose start asks a backend (as rate limits will): allowed while ``left``."""

    journal: Journal
    answer: object  # what the backend's call returns: a value, or an awaitable
    on_failure: Deny | None = UNAVAILABLE
    timeout_s: float = 0.05

    def start(self, ex: Exchange) -> Ask[Flow | Deny | None]:
        def call() -> object:
            self.journal.calls.append("limits.call")
            if isinstance(self.answer, Exception):
                raise self.answer
            return self.answer

        def resume(left: object) -> Flow | Deny | None:
            self.journal.calls.append(f"limits.resume:{left}")
            return (
                Recording("limits", self.journal, Phase.NONE, BodyMode.NONE, None)
                if left
                else TOO_MANY
            )

        def failed(reason: str) -> Deny | None:
            self.journal.calls.append(f"limits.failed:{reason}")
            return self.on_failure

        return Ask("limits", call, resume, failed, self.timeout_s)


def limited(stage: Limits, failures: list[tuple[str, str]] | None = None) -> Run:
    pipeline = Pipeline(
        RouteTable(upstreams()),
        [stage, Starts("after", stage.journal)],
        Clock(),
        on_backend_failure=lambda s, reason: (failures if failures is not None else []).append(
            (s, reason)
        ),
    )
    return pipeline.start("GET", "/v1/models", {}, frozenset())


def test_a_backend_that_answers_at_once_resumes_inline() -> None:
    j = Journal()
    run = limited(Limits(j, answer=3))
    assert run.request_headers() == Phase.NONE  # a value, not an awaitable
    assert j.calls[:3] == ["limits.call", "limits.resume:3", "after.start"]
    assert finishes(j) == ["after.finish:forwarded", "limits.finish:forwarded"]
    j2 = Journal()
    assert limited(Limits(j2, answer=0)).request_headers() is TOO_MANY
    assert "after.start" not in j2.calls  # the first denial wins


async def test_a_backend_that_awaits_makes_the_decision_later() -> None:
    j = Journal()
    answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    run = limited(Limits(j, answer=answer))
    decision = run.request_headers()
    assert inspect.isawaitable(decision)
    assert j.calls == ["limits.call"] and not run.finished
    answer.set_result(2)
    assert await decision == Phase.NONE
    assert j.calls[1:3] == ["limits.resume:2", "after.start"] and run.finished


@pytest.mark.parametrize(("policy", "expected"), [(UNAVAILABLE, UNAVAILABLE), (None, Phase.NONE)])
async def test_a_late_backend_follows_the_stages_policy(
    policy: Deny | None, expected: Deny | Phase
) -> None:
    j, failures = Journal(), []
    never: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    run = limited(Limits(j, answer=never, on_failure=policy, timeout_s=0.01), failures)
    decision = run.request_headers()
    assert inspect.isawaitable(decision)
    assert await decision == expected
    assert failures == [("limits", "timeout")] and "limits.failed:timeout" in j.calls
    assert not never.cancelled()  # the I/O is not cut off halfway; its answer is ignored
    never.set_result(1)


@pytest.mark.parametrize(("policy", "expected"), [(UNAVAILABLE, UNAVAILABLE), (None, Phase.NONE)])
def test_a_failing_backend_follows_the_stages_policy(
    policy: Deny | None, expected: Deny | Phase
) -> None:
    j, failures = Journal(), []
    run = limited(Limits(j, answer=ConnectionError("down"), on_failure=policy), failures)
    assert run.request_headers() == expected
    assert failures == [("limits", "error")] and "limits.failed:error" in j.calls
    assert "limits.resume" not in " ".join(j.calls)


class Editor(Flow):
    """Reads an SSE body's events; drops or rewrites those whose JSON says so."""

    __slots__ = ("docs", "edits_events", "rewrite", "wants")

    def __init__(self, edits: bool, rewrite: dict[str, str | None]) -> None:
        self.wants = Phase.RESPONSE_HEADERS
        self.edits_events, self.rewrite = edits, rewrite
        self.docs: list[object] = []

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        return BodyMode.STREAMED

    def on_response_events(self, ex: Exchange, events: ResponseEvents, end: bool) -> None:
        for event, doc in events.new:
            self.docs.append(doc)
            if isinstance(doc, dict) and doc.get("id") in self.rewrite:
                data = self.rewrite[doc["id"]]
                events.drop(event) if data is None else events.replace(event, data)


@dataclass
class Hands:
    flow: Flow

    def start(self, ex: Exchange) -> Flow:
        return self.flow


SSE = {"content-type": "text/event-stream"}


def sse_run(*flows: Flow) -> Run:
    run = Pipeline(RouteTable(upstreams()), [Hands(f) for f in flows], Clock()).start(
        "POST", "/v1/chat/completions", {}, frozenset()
    )
    assert run.request_headers() == Phase.RESPONSE_HEADERS
    assert run.response_headers(200, dict(SSE)) is BodyMode.STREAMED
    return run


def test_events_are_parsed_once_for_every_flow_and_chunks_pass_as_they_came() -> None:
    first, second = Editor(False, {}), Editor(False, {})
    run = sse_run(first, second)
    chunk = b'data: {"id": "a"}\n\ndata: {"id"'
    assert run.response_body(chunk, False) is None  # nobody edits: bytes untouched
    assert run.response_body(b': "b"}\n\n', True) is None
    assert first.docs == [{"id": "a"}, {"id": "b"}]
    assert all(x is y for x, y in zip(first.docs, second.docs, strict=True))  # one parse


def test_two_flows_edit_the_same_events_and_one_writer_emits_them() -> None:
    dropper, rewriter = Editor(True, {"a": None}), Editor(True, {"b": '{"id": "B"}'})
    run = sse_run(dropper, rewriter)
    chunk = b'data: {"id": "a"}\n\nevent: x\ndata: {"id": "b"}\n\ndata: {"id"'
    out = run.response_body(chunk, False)
    assert out == b'event: x\ndata: {"id": "B"}\n\n'  # the unfinished event is held back
    assert run.response_body(b': "c"}\n\n', False) == b'data: {"id": "c"}\n\n'
    assert run.response_body(b'data: {"id": "d"}\n\n', True) is None  # whole, unedited


def test_an_event_left_unterminated_reaches_the_flows_when_the_stream_is_cut() -> None:
    reader = Editor(False, {})
    run = sse_run(reader)
    run.response_body(b'data: {"id": "a"}\n\ndata: {"id": "last"}', False)
    run.finish(Outcome.ABANDONED)
    assert reader.docs == [{"id": "a"}, {"id": "last"}]


def test_a_flow_must_declare_that_it_edits_events() -> None:
    class Sneaky(Editor):
        __slots__ = ()

        def on_response_headers(self, ex: Exchange) -> BodyMode:
            self.edits_events = False
            return BodyMode.STREAMED

    run = sse_run(Sneaky(True, {"a": None}))
    with pytest.raises(RuntimeError):
        run.response_body(b'data: {"id": "a"}\n\n', False)


def test_a_flow_that_wants_the_stream_end_finishes_when_envoy_ends_the_stream() -> None:
    j = Journal()
    run = run_of(
        Starts("lease", j, wants=Phase.STREAM_END), Starts("meter", j, Phase.RESPONSE_HEADERS)
    )
    assert run.request_headers() == Phase.RESPONSE_HEADERS | Phase.STREAM_END
    run.response_headers(200, {})
    assert j.calls[-1] == "meter.finish:forwarded" and run.finished  # the lease is still held
    run.close()
    assert j.calls[-1] == "lease.finish:forwarded"
    run.close()
    assert j.calls.count("lease.finish:forwarded") == 1


def test_a_denied_request_does_not_wait_for_the_stream_end() -> None:
    j = Journal()
    run = run_of(Starts("lease", j, wants=Phase.STREAM_END), Starts("no", j, deny_at="start"))
    assert isinstance(run.request_headers(), Deny)
    assert j.calls[-1] == "lease.finish:denied"
    run.close()
    assert j.calls.count("lease.finish:denied") == 1
