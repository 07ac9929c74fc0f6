"""Usage read from each provider's real wire format, JSON and SSE, split any way."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.events import ResponseEvents
from extproc.providers import Api, Usage
from extproc.providers.meter import Reading, ResponseMeter

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"


def meter_body(api: Api, chunks: list[bytes], *, sse: bool, prompt_chars: int = 0) -> Reading:
    """The reading of a body fed as the pipeline feeds it: JSON chunks, or parsed events."""
    meter = ResponseMeter(api, prompt_chars=prompt_chars)
    events = ResponseEvents(1 << 20)
    for i, chunk in enumerate(chunks):
        if sse:
            meter.on_events(events.feed(chunk, i == len(chunks) - 1))
        else:
            meter.feed(chunk)
    meter.close()
    return meter.reading()


def read(api: Api, name: str, chunks: list[bytes] | None = None) -> Reading:
    body = (FIXTURES / name).read_bytes()
    sse = name.endswith(".sse")
    return meter_body(api, chunks if chunks is not None else [body], sse=sse, prompt_chars=400)


# (api, fixture, model, usage) — each usage follows from the fixture's own numbers, with
# the provider's trap spelled out where there is one.
CASES: list[tuple[Api, str, str, Usage]] = [
    # OpenAI: prompt_tokens already includes cached_tokens; completion includes reasoning.
    ("chat", "openai_chat.json", "o4-mini-2025-04-16", Usage(2306, 595, 1920, 0, 576)),
    ("chat", "openai_chat_stream.sse", "gpt-4o-2024-08-06", Usage(1200, 9, 1024, 0, 0)),
    ("chat", "azure_chat.json", "gpt-4o-mini-2024-07-18", Usage(11, 8, 0, 0, 0)),
    ("chat", "vllm_chat_stream.sse", "meta-llama/Llama-3.1-8B-Instruct", Usage(42, 4)),
    ("completions", "openai_completions.json", "gpt-3.5-turbo-instruct", Usage(5, 7)),
    ("embeddings", "openai_embeddings.json", "text-embedding-3-small", Usage(8, 0)),
    ("responses", "openai_responses.json", "gpt-5-2025-08-07", Usage(5200, 1450, 4096, 0, 1024)),
    (
        "responses",
        "openai_responses_stream.sse",
        "gpt-5-2025-08-07",
        Usage(5200, 1450, 4096, 0, 1024),
    ),
    # Anthropic: input_tokens excludes cache reads and writes, so input = 21 + 1553 + 10240.
    (
        "messages",
        "anthropic_messages.json",
        "claude-sonnet-4-5-20250929",
        Usage(11814, 42, 10240, 1553, 0),
    ),
    # ...and message_delta usage is cumulative: the last output_tokens (17) wins, not 2+15+17.
    (
        "messages",
        "anthropic_messages_stream.sse",
        "claude-sonnet-4-5-20250929",
        Usage(2520, 17, 2048, 0, 0),
    ),
    # Gemini: cachedContentTokenCount is inside promptTokenCount; thoughtsTokenCount is
    # outside candidatesTokenCount and billed as output: output = 11 + 356.
    ("generate_content", "gemini_generate.json", "gemini-2.5-pro", Usage(8192, 367, 6000, 0, 356)),
    ("generate_content", "gemini_stream.sse", "gemini-2.5-flash", Usage(8192, 367, 6000, 0, 356)),
    (
        "generate_content",
        "gemini_stream_array.json",
        "gemini-2.5-flash",
        Usage(8192, 367, 6000, 0, 356),
    ),
]


@pytest.mark.parametrize(("api", "name", "model", "usage"), CASES, ids=[c[1] for c in CASES])
def test_usage_from_the_wire(api: Api, name: str, model: str, usage: Usage) -> None:
    assert read(api, name) == Reading(model, usage, estimated=False)


@pytest.mark.parametrize(("api", "name", "model", "usage"), CASES, ids=[c[1] for c in CASES])
def test_one_byte_chunks_give_the_same_reading(
    api: Api, name: str, model: str, usage: Usage
) -> None:
    body = (FIXTURES / name).read_bytes()
    assert read(api, name, [body[i : i + 1] for i in range(len(body))]) == read(api, name)


@settings(max_examples=80, deadline=None)
@given(case=st.sampled_from(CASES), cuts=st.lists(st.integers(0, 1 << 14), max_size=25))
def test_random_splits_give_the_same_reading(
    case: tuple[Api, str, str, Usage], cuts: list[int]
) -> None:
    api, name, _, _ = case
    body = (FIXTURES / name).read_bytes()
    points = sorted({c % (len(body) + 1) for c in cuts})
    chunks = [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True)]
    assert read(api, name, chunks) == read(api, name)


def test_a_stream_without_usage_is_estimated_from_what_was_delivered() -> None:
    reading = read("completions", "openai_completions_stream_no_usage.sse")
    delivered = len("\n\nThis is a test")
    assert reading.estimated
    assert reading.model == "gpt-3.5-turbo-instruct:20230824-v2"
    assert reading.usage == Usage(input_tokens=100, output_tokens=-(-delivered // 4))


def test_a_stream_cut_before_its_usage_chunk_is_estimated() -> None:
    body = (FIXTURES / "openai_chat_stream.sse").read_bytes()
    cut = body[: body.index(b'"choices":[]')]  # the upstream went away before the usage
    reading = meter_body("chat", [cut], sse=True)
    assert reading.estimated
    assert reading.usage.output_tokens == -(-len("Bonjour ! Comment ça va ? 👋") // 4)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "12", "completion_tokens": null}}',
        b'{"usage": {"prompt_tokens": -5, "completion_tokens": 1.5}}',
        b'{"error": {"message": "Rate limit reached", "type": "requests"}}',
        b'{"choices": "nope", "model": 7}',
    ],
)
@pytest.mark.parametrize("api", ["chat", "responses", "messages", "generate_content"])
def test_odd_bodies_never_raise(api: Api, body: bytes) -> None:
    reading = meter_body(api, [body], sse=False)
    assert reading.usage.input_tokens >= 0 and reading.usage.output_tokens >= 0


def test_bad_counts_are_zero_not_errors() -> None:
    body = b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3, "total_tokens": 15}}'
    assert meter_body("chat", [body], sse=False) == Reading(None, Usage(0, 3), estimated=False)


def test_a_json_body_over_the_limit_is_not_kept() -> None:
    meter = ResponseMeter("embeddings", max_json_bytes=64)
    body = orjson.dumps({"data": [0.1] * 100, "usage": {"prompt_tokens": 3}})
    meter.feed(body[:50])
    meter.feed(body[50:])
    meter.close()
    assert meter.overflow and meter.reading().estimated
