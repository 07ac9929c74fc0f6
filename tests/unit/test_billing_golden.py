"""Golden billing cases: responses in each provider's wire format (written by hand from
the providers' documented formats, tests/fixtures/billing/), the tokens they report,
and what they cost, computed by hand as tokens times the published price of each kind.

Every case is read whole, and split in two at every byte (JSON fed in chunks, SSE
through the pipeline's event parser); the price table's rates are checked against
the published prices the hand computation uses, so a changed table fails here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.config import PricingConfig
from extproc.pricing import bill, load_prices
from extproc.providers import Api, Usage
from tests.unit.test_providers import meter_body

FIXTURES = Path(__file__).parent.parent / "fixtures" / "billing"
TABLE = load_prices(PricingConfig())
M = 1_000_000


@dataclass(frozen=True)
class Golden:
    files: tuple[str, ...]  # the same response as JSON and as SSE, where the API streams
    api: Api
    model: str  # the price table's name the response's model resolves to
    usage: dict[str, Any]  # the Usage fields that are not 0
    usd: float  # by hand: tokens times the published USD per 1M tokens
    rates: dict[str, float]  # the published prices used above, as the table must have them
    unpriced: dict[str, int] = field(default_factory=dict)  # kind: tokens at a rate not theirs
    where: str | None = None  # the route's price namespace (Vertex AI: vertex_ai)
    advisor: tuple[str, dict[str, float]] | None = None  # a second model and its prices


CASES = {
    # Anthropic: thinking is part of output_tokens, billed as output.
    "anthropic thinking tokens": Golden(
        ("anthropic_thinking.json", "anthropic_thinking.sse"),
        "messages",
        "claude-opus-4-6",
        {"input_tokens": 1200, "output_tokens": 3100, "reasoning_tokens": 2600},
        (1200 * 5 + 3100 * 25) / M,
        {"input": 5, "output": 25},
    ),
    # Anthropic: 5-minute and 1-hour cache writes have prices of their own.
    "anthropic cache lifetimes": Golden(
        ("anthropic_cache_ttl.json", "anthropic_cache_ttl.sse"),
        "messages",
        "claude-sonnet-4-6",
        {
            "input_tokens": 50 + 20000 + 6000,
            "output_tokens": 400,
            "cached_input_tokens": 20000,
            "cache_creation_tokens": 6000,
            "cache_creation_1h_tokens": 4000,
        },
        (50 * 3 + 20000 * 0.3 + 2000 * 3.75 + 4000 * 6 + 400 * 15) / M,
        {"input": 3, "cached_input": 0.3, "cache_write": 3.75, "cache_write_1h": 6, "output": 15},
    ),
    # Anthropic: a compaction step is billed, and is not in the top-level usage.
    "anthropic compaction iteration": Golden(
        ("anthropic_compaction.json", "anthropic_compaction.sse"),
        "messages",
        "claude-opus-4-6",
        {"input_tokens": 180000 + 23000, "output_tokens": 3500 + 1000},
        (180000 * 5 + 3500 * 25 + 23000 * 5 + 1000 * 25) / M,
        {"input": 5, "output": 25},
    ),
    # Anthropic: the advisor's sub-inference is billed at the advisor model's prices.
    "anthropic advisor iteration": Golden(
        ("anthropic_advisor.json",),
        "messages",
        "claude-sonnet-4-6",
        {"input_tokens": 8000 + 9000 + 9800, "output_tokens": 300 + 1600 + 700},
        ((8000 + 9800) * 3 + (300 + 700) * 15 + 9000 * 5 + 1600 * 25) / M,
        {"input": 3, "output": 15},
        advisor=("claude-opus-4-6", {"input": 5, "output": 25}),
    ),
    # Anthropic: above 100k prompt tokens, claude-haiku-5-5's long-context prices
    # apply to every kind, the 1-hour cache write included.
    "anthropic long context": Golden(
        ("anthropic_long_context.json",),
        "messages",
        "claude-haiku-5-5",
        {
            "input_tokens": 110000,
            "output_tokens": 2000,
            "cached_input_tokens": 15000,
            "cache_creation_tokens": 5000,
            "cache_creation_1h_tokens": 5000,
        },
        (90000 * 0.5 + 15000 * 0.05 + 5000 * 1.0 + 2000 * 2.5) / M,
        {
            "long_context.threshold": 100000,
            "long_context.input": 0.5,
            "long_context.cached_input": 0.05,
            "long_context.cache_write_1h": 1.0,
            "long_context.output": 2.5,
        },
    ),
    # Anthropic: the threshold applies per sampling step. Two steps of 60k and 61k
    # prompt tokens are each below 100k: base prices, though they sum to 121k.
    "anthropic long context per iteration": Golden(
        ("anthropic_long_context_iterations.json",),
        "messages",
        "claude-haiku-5-5",
        {"input_tokens": 121000, "output_tokens": 1300},
        (121000 * 0.1 + 1300 * 0.5) / M,
        {"input": 0.1, "output": 0.5, "long_context.threshold": 100000},
    ),
    # Anthropic: Claude Sonnet 4.5 above 200k prompt tokens (cache reads and writes
    # count): every kind at its >200k rate, the 1-hour cache write too.
    "anthropic 200k tier": Golden(
        ("anthropic_sonnet_200k.json", "anthropic_sonnet_200k.sse"),
        "messages",
        "claude-sonnet-4-5",
        {
            "input_tokens": 220000,
            "output_tokens": 3000,
            "cached_input_tokens": 60000,
            "cache_creation_tokens": 10000,
            "cache_creation_1h_tokens": 6000,
        },
        (150000 * 6 + 60000 * 0.6 + 4000 * 7.5 + 6000 * 12 + 3000 * 22.5) / M,
        {
            "long_context.threshold": 200000,
            "long_context.input": 6,
            "long_context.cached_input": 0.6,
            "long_context.cache_write": 7.5,
            "long_context.cache_write_1h": 12,
            "long_context.output": 22.5,
        },
    ),
    # Anthropic priority tier: the table has no priority prices for the model, so it
    # is billed at standard prices and every token is flagged.
    "anthropic priority tier without prices": Golden(
        ("anthropic_priority.json",),
        "messages",
        "claude-sonnet-4-6",
        {"input_tokens": 1000, "output_tokens": 200, "service_tier": "priority"},
        (1000 * 3 + 200 * 15) / M,
        {"input": 3, "output": 15},
        unpriced={"input": 1000, "output": 200},
    ),
    # OpenAI: cache writes are part of prompt_tokens, billed at their own price.
    "openai cache writes": Golden(
        ("openai_cache_write.json", "openai_cache_write.sse"),
        "chat",
        "gpt-5.6",
        {
            "input_tokens": 30000,
            "output_tokens": 500,
            "cached_input_tokens": 20000,
            "cache_creation_tokens": 8000,
            "reasoning_tokens": 200,
        },
        (2000 * 4 + 20000 * 0.4 + 8000 * 5 + 500 * 20) / M,
        {"input": 4, "cached_input": 0.4, "cache_write": 5, "output": 20},
    ),
    # OpenAI: audio in and out at the audio prices, the text rest at the text prices.
    "openai audio tokens": Golden(
        ("openai_audio.json", "openai_audio.sse"),
        "chat",
        "gpt-audio",
        {
            "input_tokens": 1500,
            "output_tokens": 900,
            "input_audio_tokens": 1200,
            "output_audio_tokens": 700,
        },
        (300 * 2.5 + 1200 * 32 + 200 * 10 + 700 * 64) / M,
        {"input": 2.5, "input_audio": 32, "output": 10, "output_audio": 64},
    ),
    # OpenAI: priced by the tier that served the request.
    "openai priority tier": Golden(
        ("openai_priority_chat.json",),
        "chat",
        "gpt-5",
        {
            "input_tokens": 2000,
            "output_tokens": 100,
            "reasoning_tokens": 64,
            "service_tier": "priority",
        },
        (2000 * 2.5 + 100 * 20) / M,
        {"service_tiers.priority.input": 2.5, "service_tiers.priority.output": 20},
    ),
    "openai responses flex tier": Golden(
        ("openai_responses_flex.json", "openai_responses_flex.sse"),
        "responses",
        "gpt-5",
        {
            "input_tokens": 10000,
            "output_tokens": 3000,
            "cached_input_tokens": 4000,
            "reasoning_tokens": 2000,
            "service_tier": "flex",
        },
        (6000 * 0.625 + 4000 * 0.0625 + 3000 * 5) / M,
        {
            "service_tiers.flex.input": 0.625,
            "service_tiers.flex.cached_input": 0.0625,
            "service_tiers.flex.output": 5,
        },
    ),
    # OpenAI Responses: image input tokens, and a details field Tollway has no rate
    # for, are billed as input and flagged: the provider's bill may differ.
    "openai responses image and file tokens": Golden(
        ("openai_responses_image_input.json",),
        "responses",
        "gpt-5",
        {
            "input_tokens": 1105,
            "output_tokens": 40,
            "input_image_tokens": 765,
            "other_input_tokens": 300,
        },
        (1105 * 1.25 + 40 * 10) / M,
        {"input": 1.25, "output": 10},
        unpriced={"input_image": 765, "other_input": 300},
    ),
    # OpenAI: snapshot names with a ':' suffix resolve to the model.
    "openai babbage snapshot name": Golden(
        ("openai_babbage_snapshot.json",),
        "completions",
        "babbage-002",
        {"input_tokens": 12, "output_tokens": 16},
        (12 * 0.4 + 16 * 0.4) / M,
        {"input": 0.4, "output": 0.4},
    ),
    "openai completions snapshot name": Golden(
        ("openai_completions_snapshot.json",),
        "completions",
        "gpt-3.5-turbo-instruct",
        {"input_tokens": 5, "output_tokens": 7},
        (5 * 1.5 + 7 * 2) / M,
        {"input": 1.5, "output": 2},
    ),
    # Gemini: tool results fed back to the model are input, outside promptTokenCount;
    # thoughts are output, outside candidatesTokenCount.
    "gemini tool-use prompt tokens": Golden(
        ("gemini_tool_use.json", "gemini_tool_use.sse"),
        "generate_content",
        "gemini-2.5-flash",
        {"input_tokens": 1200 + 3400, "output_tokens": 250 + 600, "reasoning_tokens": 600},
        (4600 * 0.3 + 850 * 2.5) / M,
        {"input": 0.3, "output": 2.5},
    ),
    # Gemini: audio at the audio price, cached audio at the cached audio price.
    "gemini cached audio": Golden(
        ("gemini_audio_cached.json",),
        "generate_content",
        "gemini-2.5-flash",
        {
            "input_tokens": 20000,
            "output_tokens": 300,
            "cached_input_tokens": 12000,
            "cached_audio_tokens": 12000,
            "input_audio_tokens": 16000,
        },
        (12000 * 0.1 + 4000 * 1.0 + 4000 * 0.3 + 300 * 2.5) / M,
        {"input": 0.3, "input_audio": 1.0, "cached_input_audio": 0.1, "output": 2.5},
    ),
    # Gemini: Google prices image input like text; the table has no image rate for the
    # model, so the tokens are billed as text and flagged.
    "gemini image input": Golden(
        ("gemini_image_input.json",),
        "generate_content",
        "gemini-2.5-flash",
        {"input_tokens": 1310, "output_tokens": 12, "input_image_tokens": 1290},
        (1310 * 0.3 + 12 * 2.5) / M,
        {"input": 0.3, "output": 2.5},
        unpriced={"input_image": 1290},
    ),
    # Gemini: an image-generation model called through generateContent, its image
    # output at the image-token price.
    "gemini image generation": Golden(
        ("gemini_image_generation.json", "gemini_image_generation.sse"),
        "generate_content",
        "gemini-2.5-flash-image",
        {"input_tokens": 15, "output_tokens": 1300, "output_image_tokens": 1290},
        (15 * 0.3 + 10 * 2.5 + 1290 * 30) / M,
        {"input": 0.3, "output": 2.5, "output_image": 30},
    ),
    # Gemini priority tier: the table has no priority image rate for the model, so
    # the image tokens take the standard image rate, flagged.
    "gemini image generation priority": Golden(
        ("gemini_3_pro_image_priority.json",),
        "generate_content",
        "gemini-3-pro-image-preview",
        {
            "input_tokens": 40,
            "output_tokens": 1328,
            "reasoning_tokens": 200,
            "output_image_tokens": 1120,
            "service_tier": "priority",
        },
        (40 * 3.6 + 208 * 21.6 + 1120 * 120) / M,
        {
            "service_tiers.priority.input": 3.6,
            "service_tiers.priority.output": 21.6,
            "output_image": 120,
        },
        unpriced={"output_image": 1120},
    ),
    # Gemini API: the gemini/ entry's prices (with a cache read price)...
    "gemini api prices": Golden(
        ("gemini_cached_image_model.json",),
        "generate_content",
        "gemini-2.5-flash-image",
        {"input_tokens": 5000, "output_tokens": 20, "cached_input_tokens": 4096},
        (904 * 0.3 + 4096 * 0.03 + 20 * 2.5) / M,
        {"input": 0.3, "cached_input": 0.03, "output": 2.5},
    ),
    # ...and Vertex AI's own, which has none: the cached tokens are billed as input, flagged.
    "vertex ai prices": Golden(
        ("gemini_cached_image_model.json",),
        "generate_content",
        "vertex_ai/gemini-2.5-flash-image",
        {"input_tokens": 5000, "output_tokens": 20, "cached_input_tokens": 4096},
        (5000 * 0.3 + 20 * 2.5) / M,
        {"input": 0.3, "output": 2.5},
        unpriced={"cached_input": 4096},
        where="vertex_ai",
    ),
    "gemini flex tier": Golden(
        ("gemini_flex.json",),
        "generate_content",
        "gemini-2.5-pro",
        {
            "input_tokens": 8000,
            "output_tokens": 1500,
            "reasoning_tokens": 1100,
            "service_tier": "flex",
        },
        (8000 * 0.625 + 1500 * 5) / M,
        {"service_tiers.flex.input": 0.625, "service_tiers.flex.output": 5},
    ),
    # Gemini: above 200k prompt tokens the whole request is at the long-context prices...
    "gemini long context": Golden(
        ("gemini_long_context.json",),
        "generate_content",
        "gemini-2.5-pro",
        {
            "input_tokens": 250000,
            "output_tokens": 3000,
            "cached_input_tokens": 100000,
            "reasoning_tokens": 1000,
        },
        (150000 * 2.5 + 100000 * 0.25 + 3000 * 15) / M,
        {
            "long_context.threshold": 200000,
            "long_context.input": 2.5,
            "long_context.cached_input": 0.25,
            "long_context.output": 15,
        },
    ),
    # ...and at exactly 200k, at the base prices.
    "gemini at the threshold": Golden(
        ("gemini_at_threshold.json",),
        "generate_content",
        "gemini-2.5-pro",
        {"input_tokens": 200000, "output_tokens": 500},
        (200000 * 1.25 + 500 * 10) / M,
        {"input": 1.25, "output": 10, "long_context.threshold": 200000},
    ),
    # Vertex AI: trafficType names the tier; priority above 200k has prices of its own.
    "vertex ai priority long context": Golden(
        ("vertex_priority_long_context.json", "vertex_priority_long_context.sse"),
        "generate_content",
        "vertex_ai/gemini-2.5-pro",
        {
            "input_tokens": 240000,
            "output_tokens": 3000,
            "reasoning_tokens": 2100,
            "service_tier": "priority",
        },
        (240000 * 4.5 + 3000 * 27) / M,
        {
            "service_tiers.priority.long_context.input": 4.5,
            "service_tiers.priority.long_context.output": 27,
        },
        where="vertex_ai",
    ),
}


def rate(price: Any, path: str) -> Any:
    for part in path.split("."):
        price = price[part] if isinstance(price, dict) else getattr(price, part)
    return price


def check(case: Golden, chunks: list[bytes], sse: bool) -> None:
    reading = meter_body(case.api, chunks, sse=sse)
    assert not reading.estimated
    assert reading.usage == Usage(**case.usage)
    priced = bill(TABLE, reading.model, reading.usage, reading.parts, case.where)
    assert priced.name == case.model
    assert priced.complete
    assert priced.usd == pytest.approx(case.usd, abs=1e-12)
    flagged: dict[str, int] = {}
    for kind, tokens in priced.unpriced:
        flagged[kind] = flagged.get(kind, 0) + tokens
    assert flagged == case.unpriced


@pytest.mark.parametrize("name", CASES)
def test_the_price_table_has_the_published_prices(name: str) -> None:
    case = CASES[name]
    for model, rates in ((case.model, case.rates), *([case.advisor] if case.advisor else [])):
        price = TABLE.models[model]
        assert {path: rate(price, path) for path in rates} == rates, model


@pytest.mark.parametrize(("name", "file"), [(n, f) for n, c in CASES.items() for f in c.files])
def test_tokens_and_cost_whole_and_split_at_every_byte(name: str, file: str) -> None:
    case, body = CASES[name], (FIXTURES / file).read_bytes()
    sse = file.endswith(".sse")
    check(case, [body], sse)
    for i in range(1, len(body)):
        check(case, [body[:i], body[i:]], sse)


def test_every_fixture_is_a_case() -> None:
    used = {f for case in CASES.values() for f in case.files}
    assert used == {p.name for p in FIXTURES.iterdir()}


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 10**6)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=30,
)
# The fields each reader looks at, so that random values land where they are read.
USAGE_KEYS = st.sampled_from(
    [
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation",
        "output_tokens_details",
        "iterations",
        "service_tier",
        "speed",
        "prompt_tokens",
        "completion_tokens",
        "prompt_tokens_details",
        "completion_tokens_details",
        "input_tokens_details",
        "promptTokenCount",
        "candidatesTokenCount",
        "toolUsePromptTokenCount",
        "thoughtsTokenCount",
        "cachedContentTokenCount",
        "promptTokensDetails",
        "cacheTokensDetails",
        "candidatesTokensDetails",
        "serviceTier",
        "trafficType",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(USAGE_KEYS, JSON, max_size=8),
    JSON,
    st.sampled_from(["messages", "chat", "responses", "generate_content"]),
)
def test_any_usage_an_upstream_sends_reads_and_prices_without_error(
    raw: dict[str, Any], tier: Any, api: Api
) -> None:
    """Whatever shape the usage fields take, the reading is counts and the bill a number."""
    doc = {
        "messages": {"type": "message", "model": "claude-sonnet-4-6", "usage": raw},
        "chat": {"model": "gpt-5", "usage": raw, "service_tier": tier},
        "responses": {"model": "gpt-5", "usage": raw, "service_tier": tier},
        "generate_content": {"modelVersion": "gemini-2.5-pro", "usageMetadata": raw},
    }[api]
    reading = meter_body(api, [orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)], sse=False)
    counts = [getattr(reading.usage, f.name) for f in fields(Usage) if f.name != "service_tier"]
    assert all(type(n) is int and n >= 0 for n in counts)
    priced = bill(TABLE, reading.model, reading.usage, reading.parts)
    assert priced.usd >= 0 and priced.usd == priced.usd  # not NaN
