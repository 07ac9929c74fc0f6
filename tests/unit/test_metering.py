"""The metering stage as a sans-IO unit: phases asked for, bodies rewritten, records made."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import ModelPrice
from extproc.decisions import BodyMode, Outcome, Phase
from extproc.exchange import Exchange
from extproc.metrics import Metrics
from extproc.pipeline import Pipeline, Run
from extproc.pricing import PriceTable
from extproc.providers import Usage
from extproc.stages.metering import COST_HEADER, MeteringStage
from extproc.store import UsageRecord

from .factories import bearer, build_pipeline, new_key, request

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"
PRICES = PriceTable(
    {
        "gpt-4o": ModelPrice(provider="openai", input=2.5, output=10, cached_input=1.25),
        "o4-mini": ModelPrice(provider="openai", input=1.1, output=4.4, cached_input=0.275),
        # No audio rates, and no flex tier: such tokens are billed as text, and flagged.
        "gpt-audio": ModelPrice(provider="openai", input=2.5, output=10),
        "claude-sonnet-4-6": ModelPrice(provider="anthropic", input=3, output=15),
    }
)
ALICE, ALICE_RECORD = new_key("alice", tenant="acme")


class Records:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def record_usage(self, record: UsageRecord) -> None:
        self.records.append(record)


class Ticks:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class World:
    def __init__(self, cost_header: bool = True) -> None:
        self.store = Records()
        self.metrics = Metrics()
        self.ticks = Ticks()
        self.stage = MeteringStage(
            PRICES, self.store, self.metrics, cost_header=cost_header, clock=self.ticks
        )
        self.pipeline: Pipeline = build_pipeline([ALICE_RECORD], metering=self.stage)

        self.runs: dict[int, Run] = {}

    def start(self, path: str = "/v1/chat/completions", body: bytes | None = None) -> Exchange:
        run = request(self.pipeline, path, {**bearer(ALICE), "content-length": "1"})
        wants = run.request_headers()
        assert isinstance(wants, Phase)
        if body is not None:
            assert Phase.REQUEST_BODY in wants
            assert run.request_body(body) is None
        self.runs[id(run.ex)] = run
        return run.ex

    def run(self, ex: Exchange) -> Run:
        """The run of a request this world started."""
        return self.runs[id(ex)]

    def client_sees_usage_chunk(self, ex: Exchange) -> bool:
        """Stream a usage-only chunk back: does it reach the client?"""
        run = self.run(ex)
        run.response_headers(200, {"content-type": "text/event-stream"})
        usage = b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
        replaced = run.response_body(usage, end=True)
        return b'"usage"' in (usage if replaced is None else replaced)

    def respond(
        self, ex: Exchange, fixture: str, status: int = 200, *, chunk: int = 0
    ) -> tuple[BodyMode, bytes]:
        """Headers, then the fixture's body (in chunks of ``chunk`` bytes); what the client gets."""
        body = (FIXTURES / fixture).read_bytes()
        sse = fixture.endswith(".sse")
        headers = {
            ":status": str(status),
            "content-type": "text/event-stream" if sse else "application/json",
        }
        if not sse:
            headers["content-length"] = str(len(body))
        mode = self.run(ex).response_headers(status, headers)
        if mode is BodyMode.NONE:
            return mode, body
        pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] if chunk else [body]
        out = b""
        for i, piece in enumerate(pieces):
            self.ticks.now += 0.01
            replaced = self.run(ex).response_body(piece, end=i == len(pieces) - 1)
            out += piece if replaced is None else replaced
        return mode, out

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def moved(self) -> list[str]:
        """Metering samples that are not zero (tokens, cost, unpriced, durations...)."""
        return [
            sample.name
            for family in self.metrics.registry.collect()
            if family.name.startswith("tollway_gen_ai")
            for sample in family.samples
            if sample.value and not sample.name.endswith("_created")
        ]


def test_not_metered_requests_ask_for_nothing_more() -> None:
    w = World()
    run = request(w.pipeline, "/v1/models", bearer(ALICE), method="GET")
    assert run.request_headers() == Phase.NONE
    assert run.ex.outcome is Outcome.FORWARDED  # nothing more to see: finished at once


@pytest.mark.parametrize(
    ("path", "wants"),
    [
        ("/v1/chat/completions", Phase.RESPONSE_HEADERS | Phase.REQUEST_BODY),
        ("/v1/completions", Phase.RESPONSE_HEADERS | Phase.REQUEST_BODY),
        ("/v1/embeddings", Phase.RESPONSE_HEADERS),
        ("/v1/responses", Phase.RESPONSE_HEADERS),
        ("/anthropic/v1/messages", Phase.RESPONSE_HEADERS),
        ("/v1beta/models/gemini-2.5-pro:streamGenerateContent", Phase.RESPONSE_HEADERS),
    ],
)
def test_only_openai_chat_and_completions_read_the_request_body(path: str, wants: Phase) -> None:
    w = World()
    assert request(w.pipeline, path, bearer(ALICE)).request_headers() == wants


def test_gemini_names_its_model_in_the_path() -> None:
    w = World()
    ex = w.start("/v1beta/models/gemini-2.5-pro:generateContent")
    assert ex.metadata["request_model"] == "gemini-2.5-pro"


def test_a_stream_without_include_usage_gets_it_spliced_in() -> None:
    w = World()
    body = b'  {"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}'
    ex = w.start(body=body)
    assert ex.new_body is not None
    assert ex.new_body.endswith(body[3:])  # the client's bytes stay as they were
    assert orjson.loads(ex.new_body) == {
        **orjson.loads(body),
        "stream_options": {"include_usage": True},
    }
    assert not w.client_sees_usage_chunk(ex)  # the one Tollway asked for is taken out


@pytest.mark.parametrize(
    "options",
    [None, {}, {"include_usage": False}, {"include_usage": False, "other": 1}, "bogus"],
)
def test_existing_stream_options_are_kept_and_usage_turned_on(options: object) -> None:
    w = World()
    doc = {"model": "gpt-4o", "stream": True, "stream_options": options, "messages": []}
    ex = w.start(body=orjson.dumps(doc))
    assert ex.new_body is not None
    sent = orjson.loads(ex.new_body)
    kept = options if isinstance(options, dict) else {}
    assert sent["stream_options"] == {**kept, "include_usage": True}
    assert {k: v for k, v in sent.items() if k != "stream_options"} == {
        k: v for k, v in doc.items() if k != "stream_options"
    }


@pytest.mark.parametrize(
    "doc",
    [
        {"model": "gpt-4o", "messages": []},  # not a stream
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}},
        {"model": "gpt-4o", "stream": "yes"},
    ],
)
def test_the_body_is_left_alone_when_usage_will_come_anyway(doc: dict[str, object]) -> None:
    w = World()
    ex = w.start(body=orjson.dumps(doc))
    assert ex.new_body is None
    assert w.client_sees_usage_chunk(ex)  # a client that asked for usage gets it


def test_a_body_that_is_not_json_is_left_for_the_upstream_to_refuse() -> None:
    w = World()
    ex = w.start(body=b"{not json")
    assert ex.new_body is None


def test_json_is_buffered_priced_and_gets_a_cost_header() -> None:
    w = World()
    ex = w.start(body=b'{"model": "o4-mini", "messages": []}')
    mode, _ = w.respond(ex, "openai_chat.json")
    assert mode is BodyMode.BUFFERED
    (record,) = w.store.records
    usage = Usage(2306, 595, 1920, 0, 576)
    expected = ((2306 - 1920) * 1.1 + 1920 * 0.275 + 595 * 4.4) / 1e6
    assert record.usage == usage and record.cost_usd == pytest.approx(expected, abs=1e-12)
    assert (record.key_id, record.tenant, record.model) == (
        ALICE_RECORD.id,
        "acme",
        "o4-mini-2025-04-16",
    )
    assert not record.estimated and record.priced
    assert ex.set_response_headers[COST_HEADER] == f"{expected:.9f}"
    assert ex.metadata["input_tokens"] == 2306
    assert ex.metadata["cost_usd"] == f"{record.cost_usd:.9f}"  # a decimal, like the header
    assert ex.metadata["request_model"] == "o4-mini"
    labels = {"tenant": "acme", "model": "o4-mini", "provider": "openai", "api": "chat"}
    assert (
        w.sample("tollway_gen_ai_tokens_total", **labels, type="cached_input", source="reported")
        == 1920
    )
    assert w.sample("tollway_gen_ai_cost_usd_total", **labels, source="reported") == pytest.approx(
        expected
    )


def test_without_the_cost_header_json_streams_through() -> None:
    w = World(cost_header=False)
    ex = w.start(body=b'{"model": "o4-mini"}')
    mode, _ = w.respond(ex, "openai_chat.json", chunk=100)
    assert mode is BodyMode.STREAMED
    assert COST_HEADER not in ex.set_response_headers
    assert w.store.records[0].usage.input_tokens == 2306


def test_sse_streams_and_the_usage_chunk_tollway_asked_for_is_removed() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    mode, delivered = w.respond(ex, "openai_chat_stream.sse", chunk=7)
    assert mode is BodyMode.STREAMED
    original = (FIXTURES / "openai_chat_stream.sse").read_bytes()
    events = original.split(b"\n\n")
    usage_event = next(e for e in events if b'"choices":[]' in e)
    assert delivered == original.replace(usage_event + b"\n\n", b"")
    assert w.store.records[0].usage == Usage(1200, 9, 1024, 0, 0)
    assert COST_HEADER not in ex.set_response_headers  # too late for headers on a stream
    ttft = w.sample(
        "tollway_gen_ai_time_to_first_token_seconds_count",
        provider="openai",
        api="chat",
        model="gpt-4o",
    )
    assert ttft == 1


def test_whole_events_without_the_usage_chunk_pass_unchanged() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    w.run(ex).response_headers(200, {"content-type": "text/event-stream"})
    comment_and_event = (
        b': keep-alive\r\n\r\ndata: {"choices":[{"delta":{"content":"hi"}}]}\r\n\r\n'
    )
    assert w.run(ex).response_body(comment_and_event, end=False) is None  # no copy made
    split = w.run(ex).response_body(b'data: {"choices":[{"delta":', end=False)
    assert split == b""  # held back until the event is whole
    rest = w.run(ex).response_body(b'{"content":"yo"}}]}\n\n', end=False)
    assert rest == b'data: {"choices":[{"delta":{"content":"yo"}}]}\n\n'


def test_a_stream_the_client_asked_usage_for_is_passed_untouched() -> None:
    w = World()
    ex = w.start(
        body=b'{"model": "gpt-4o", "stream": true, "stream_options": {"include_usage": true}}'
    )
    _, delivered = w.respond(ex, "openai_chat_stream.sse", chunk=5)
    assert delivered == (FIXTURES / "openai_chat_stream.sse").read_bytes()


def test_error_responses_bill_nothing_and_skip_the_body() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o"}')
    mode, _ = w.respond(ex, "openai_chat.json", status=429)
    assert mode is BodyMode.NONE
    assert w.store.records == []
    w.run(ex).finish(Outcome.ABANDONED)  # the stream ends later: still nothing
    assert w.store.records == []


def test_compressed_responses_are_counted_as_unmetered() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o"}')
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    assert w.run(ex).response_headers(200, headers) is BodyMode.NONE
    assert w.sample("tollway_gen_ai_unmetered_responses_total", reason="content_encoding") == 1


def test_a_stream_cut_short_is_estimated_when_the_stream_ends() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    w.run(ex).response_headers(200, {"content-type": "text/event-stream"})
    w.run(ex).response_body(
        b'data: {"model":"gpt-4o","choices":[{"delta":{"content":"abcdefgh"}}]}\n\n', end=False
    )
    w.run(ex).finish(Outcome.ABANDONED)  # Envoy reset the stream: client gone
    (record,) = w.store.records
    assert record.estimated and record.usage.output_tokens == 2 and record.usage.input_tokens > 0
    w.run(ex).finish(Outcome.ABANDONED)
    assert len(w.store.records) == 1  # finished once


def test_a_request_that_never_got_a_response_is_estimated_from_its_prompt() -> None:
    w = World()
    ex = w.start(
        body=b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "'
        + b"x" * 396
        + b'"}]}'
    )
    w.run(ex).finish(Outcome.ABANDONED)
    (record,) = w.store.records
    assert record.estimated and record.usage.output_tokens == 0
    assert record.usage.input_tokens == -(-len(ex.body or b"") // 4)


def test_an_unpriced_model_costs_zero_and_is_counted() -> None:
    w = World()
    ex = w.start("/anthropic/v1/messages")
    w.respond(ex, "anthropic_messages.json")
    (record,) = w.store.records
    assert not record.priced and record.cost_usd == 0
    assert COST_HEADER not in ex.set_response_headers
    assert (
        w.sample("tollway_gen_ai_unpriced_requests_total", provider="anthropic", api="messages")
        == 1
    )
    assert (
        w.sample(
            "tollway_gen_ai_tokens_total",
            tenant="acme",
            model="other",
            provider="anthropic",
            api="messages",
            type="cache_creation",
            source="reported",
        )
        == 1553
    )


def test_a_stream_with_a_content_length_loses_it_when_it_will_shrink() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    headers = {"content-type": "text/event-stream", "content-length": "1234"}
    assert w.run(ex).response_headers(200, headers) is BodyMode.STREAMED
    assert ex.remove_response_headers == {"content-length"}


@settings(max_examples=60, deadline=None)
@given(cuts=st.lists(st.integers(0, 4000), max_size=30))
def test_stripping_survives_any_split_and_delivers_everything_else(cuts: list[int]) -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    w.run(ex).response_headers(200, {"content-type": "text/event-stream"})
    original = (FIXTURES / "openai_chat_stream.sse").read_bytes()
    points = sorted({c % (len(original) + 1) for c in cuts})
    pieces = [original[a:b] for a, b in zip([0, *points], [*points, len(original)], strict=True)]
    delivered = b""
    for i, piece in enumerate(pieces):
        out = w.run(ex).response_body(piece, end=i == len(pieces) - 1)
        delivered += piece if out is None else out
    usage_event = next(e for e in original.split(b"\n\n") if b'"choices":[]' in e)
    assert delivered == original.replace(usage_event + b"\n\n", b"")
    assert w.store.records[0].usage == Usage(1200, 9, 1024, 0, 0)


def test_a_request_denied_at_its_body_is_never_metered() -> None:
    w = World()
    narrow_key, narrow = new_key("narrow", models=["gpt-4o-mini"])
    pipeline = build_pipeline([narrow], metering=w.stage)
    run = request(pipeline, "/v1/chat/completions", bearer(narrow_key))
    assert Phase.REQUEST_BODY in run.request_headers()  # type: ignore[operator]
    denial = run.request_body(b'{"model": "gpt-4o", "stream": true}')
    assert denial is not None and denial.code == "model_not_allowed"
    assert run.ex.outcome is Outcome.DENIED
    run.finish(Outcome.ABANDONED)  # Envoy ends the stream after the 403: already finished
    assert w.store.records == []


def test_the_logged_cost_is_a_decimal_without_float_noise() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "stream": true}')
    w.run(ex).response_headers(200, {"content-type": "text/event-stream"})
    usage = b'{"model":"gpt-4o","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1}}'
    w.run(ex).response_body(b"data: " + usage + b"\n\n", end=True)
    (record,) = w.store.records
    assert record.cost_usd == 2.5e-6 + 10e-6  # 1.2499999999999999e-05 as a float
    assert ex.metadata["cost_usd"] == "0.000012500"


def test_a_request_whose_body_never_arrived_costs_nothing_and_counts_nowhere() -> None:
    """Envoy's body_size_limit refused a chunked body (413) after Tollway saw the headers."""
    w = World()
    run = request(w.pipeline, "/v1/chat/completions", bearer(ALICE))
    assert Phase.REQUEST_BODY in run.request_headers()  # type: ignore[operator]
    run.finish(Outcome.ABANDONED)  # no body, no response: the 413 came from Envoy
    assert w.store.records == []
    assert w.moved() == []


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/messages", "/v1/responses"])
def test_an_api_whose_body_is_not_read_is_not_estimated_without_a_response(path: str) -> None:
    w = World()
    ex = w.start(path)
    w.run(ex).finish(Outcome.ABANDONED)  # client gone before any response: no sign it was sent
    assert w.store.records == []
    assert w.moved() == []


def deep(levels: int) -> bytes:
    return b'{"model": "gpt-4o", "stream": true, "stream_options": {}, "metadata": %s}' % (
        b"[" * levels + b"]" * levels
    )


@pytest.mark.parametrize("levels", [254, 300, 1000])
def test_a_body_too_deep_to_rewrite_goes_on_unchanged_and_is_estimated(levels: int) -> None:
    w = World()
    ex = w.start(body=deep(levels))
    assert ex.new_body is None  # forwarded as sent
    w.run(ex).response_headers(200, {"content-type": "text/event-stream"})
    chunk = b'data: {"model":"gpt-4o","choices":[{"delta":{"content":"abcdefgh"}}]}\n\n'
    assert w.run(ex).response_body(chunk + b"data: [DONE]\n\n", end=True) is None
    (record,) = w.store.records
    assert record.estimated and record.usage.output_tokens == 2
    assert record.usage.input_tokens == -(-len(deep(levels)) // 4)


def test_a_json_body_over_the_bound_is_counted_as_unmetered() -> None:
    w = World()
    w.stage.max_json_bytes = 100
    ex = w.start(body=b'{"model": "o4-mini"}')
    mode, _ = w.respond(ex, "openai_chat.json", chunk=64)
    assert mode is BodyMode.STREAMED  # too large to buffer for a cost header
    assert w.sample("tollway_gen_ai_unmetered_responses_total", reason="body_too_large") == 1


@pytest.mark.parametrize("outcome", [Outcome.FAILED, Outcome.DENIED])
def test_a_request_tollway_answered_itself_is_never_metered(outcome: Outcome) -> None:
    """Metering saw the prompt; then a fault (a 500) or a later stage's denial."""
    w = World()
    ex = w.start(body=b'{"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}')
    w.run(ex).finish(outcome)
    assert w.store.records == []
    assert w.moved() == []
    w.run(ex).finish(Outcome.ABANDONED)  # the stream closes later: finished already
    assert w.store.records == []


def test_a_token_kind_without_a_rate_is_billed_at_its_parents_and_counted() -> None:
    w = World()
    ex = w.start(body=b'{"model": "gpt-audio", "modalities": ["text", "audio"]}')
    w.respond(ex, "../billing/openai_audio.json")
    (record,) = w.store.records
    expected = (1500 * 2.5 + 900 * 10) / 1e6  # audio at the text rates
    assert record.priced and record.cost_usd == pytest.approx(expected, abs=1e-12)
    assert ex.set_response_headers[COST_HEADER] == f"{expected:.9f}"
    assert ex.metadata["input_audio_tokens"] == 1200 and ex.metadata["unpriced_tokens"] == 1900
    assert "input_image_tokens" not in ex.metadata  # kinds not reported are not logged
    labels = {"provider": "openai", "model": "gpt-audio", "service_tier": "standard"}
    unpriced = "tollway_gen_ai_unpriced_tokens_total"
    assert w.sample(unpriced, **labels, kind="input_audio") == 1200
    assert w.sample(unpriced, **labels, kind="output_audio") == 700
    assert w.sample(unpriced, **labels, kind="input") == 0  # text has its rate
    tokens = {"tenant": "acme", "model": "gpt-audio", "provider": "openai", "api": "chat"}
    assert (
        w.sample("tollway_gen_ai_tokens_total", **tokens, type="output_audio", source="reported")
        == 700
    )


def test_a_tier_without_rates_is_billed_at_standard_and_counted() -> None:
    w = World()
    ex = w.start("/v1/responses")
    body = orjson.loads((FIXTURES.parent / "billing" / "openai_responses_flex.json").read_bytes())
    body["model"] = "gpt-4o"  # in the table, without flex rates
    run = w.run(ex)
    raw = orjson.dumps(body)
    run.response_headers(200, {"content-type": "application/json", "content-length": str(len(raw))})
    run.response_body(raw, end=True)
    (record,) = w.store.records
    assert record.usage.service_tier == "flex" and ex.metadata["service_tier"] == "flex"
    expected = (6000 * 2.5 + 4000 * 1.25 + 3000 * 10) / 1e6
    assert record.cost_usd == pytest.approx(expected, abs=1e-12)
    labels = {"provider": "openai", "model": "gpt-4o", "service_tier": "flex"}
    assert w.sample("tollway_gen_ai_unpriced_tokens_total", **labels, kind="input") == 6000
    assert w.sample("tollway_gen_ai_unpriced_tokens_total", **labels, kind="cached_input") == 4000
    assert w.sample("tollway_gen_ai_unpriced_tokens_total", **labels, kind="output") == 1000
    assert w.sample("tollway_gen_ai_unpriced_tokens_total", **labels, kind="reasoning") == 2000


def test_a_step_at_a_model_without_a_price_makes_the_request_unpriced() -> None:
    w = World()
    ex = w.start("/anthropic/v1/messages")
    w.respond(ex, "../billing/anthropic_advisor.json")  # the advisor: claude-opus-4-6
    (record,) = w.store.records
    assert not record.priced
    assert record.cost_usd == pytest.approx(((8000 + 9800) * 3 + 1000 * 15) / 1e6, abs=1e-12)
    assert record.usage.input_tokens == 26800  # every step's tokens count
    assert COST_HEADER not in ex.set_response_headers  # the cost would be short
    assert (
        w.sample("tollway_gen_ai_unpriced_requests_total", provider="anthropic", api="messages")
        == 1
    )
