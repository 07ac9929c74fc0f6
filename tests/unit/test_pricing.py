"""Prices: the shipped table, name normalisation, cost per token kind (LiteLLM: test_litellm)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extproc.config import ModelPrice, PricingConfig, Upstream
from extproc.pricing import OTHER, PriceTable, _buckets, buckets, cost, load_prices, namespace
from extproc.providers import Usage

SHIPPED = load_prices(PricingConfig())


def test_the_shipped_table_covers_the_three_providers_and_says_when() -> None:
    providers = {price.provider for price in SHIPPED.models.values()}
    assert {"openai", "anthropic", "gemini"} <= providers
    assert SHIPPED.last_updated[:2] == "20"
    for name in ("gpt-4o", "gpt-4o-mini", "o3", "claude-sonnet-4-5", "gemini-2.5-pro"):
        assert SHIPPED.lookup(name) is not None, name


@pytest.mark.parametrize(
    ("seen", "name"),
    [
        ("gpt-4o", "gpt-4o"),
        ("GPT-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),  # dated snapshot, same price
        ("gpt-4o-2024-05-13", "gpt-4o-2024-05-13"),  # a snapshot with its own price
        ("openai/gpt-4o-mini", "gpt-4o-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-sonnet-4-5@20250929", "claude-sonnet-4-5"),  # Vertex AI style
        ("models/gemini-2.5-flash", "gemini-2.5-flash"),
        ("gemini-2.0-flash-001", "gemini-2.0-flash"),
    ],
)
def test_model_names_are_normalised(seen: str, name: str) -> None:
    found = SHIPPED.lookup(seen)
    assert found is not None and found[0] == name
    assert SHIPPED.label(seen) == name


@pytest.mark.parametrize("seen", [None, "", "my-finetune", "meta-llama/Llama-3.1-8B-Instruct"])
def test_unknown_models_have_no_price_and_label_other(seen: str | None) -> None:
    assert SHIPPED.lookup(seen) is None
    assert SHIPPED.label(seen) == OTHER


def price(name: str) -> ModelPrice:
    found = SHIPPED.lookup(name)
    assert found is not None
    return found[1]


def test_openai_cached_tokens_are_inside_the_prompt_and_priced_at_the_cached_rate() -> None:
    p = price("o4-mini")
    usage = Usage(
        input_tokens=2306, output_tokens=595, cached_input_tokens=1920, reasoning_tokens=576
    )
    assert p.cached_input is not None
    expected = ((2306 - 1920) * p.input + 1920 * p.cached_input + 595 * p.output) / 1e6
    assert cost(p, usage).usd == pytest.approx(expected, abs=1e-9)


def test_anthropic_cache_reads_and_writes_each_have_a_rate() -> None:
    p = price("claude-sonnet-4-5")
    assert p.cached_input is not None and p.cache_write is not None
    usage = Usage(11814, 42, cached_input_tokens=10240, cache_creation_tokens=1553)
    expected = (21 * p.input + 10240 * p.cached_input + 1553 * p.cache_write + 42 * p.output) / 1e6
    assert cost(p, usage).usd == pytest.approx(expected, abs=1e-9)


def test_gemini_thoughts_are_billed_as_output() -> None:
    p = price("gemini-2.5-flash")
    usage = Usage(8192, 367, cached_input_tokens=6000, reasoning_tokens=356)
    assert p.cached_input is not None
    expected = (2192 * p.input + 6000 * p.cached_input + 367 * p.output) / 1e6
    assert cost(p, usage).usd == pytest.approx(expected, abs=1e-9)


def test_long_context_prices_the_whole_request_above_the_threshold() -> None:
    p = price("gemini-2.5-pro")
    assert p.long_context is not None
    threshold, tier = p.long_context.threshold, p.long_context
    at = Usage(input_tokens=threshold, output_tokens=1000)
    above = Usage(input_tokens=threshold + 1, output_tokens=1000)
    assert cost(p, at).usd == pytest.approx((threshold * p.input + 1000 * p.output) / 1e6, abs=1e-9)
    assert cost(p, above).usd == pytest.approx(
        ((threshold + 1) * tier.input + 1000 * tier.output) / 1e6, abs=1e-9
    )


def test_missing_cache_and_reasoning_prices_mean_no_discount() -> None:
    p = ModelPrice(input=1.0, output=4.0)
    usage = Usage(
        1000, 500, cached_input_tokens=400, cache_creation_tokens=100, reasoning_tokens=200
    )
    assert cost(p, usage).usd == pytest.approx((1000 * 1.0 + 500 * 4.0) / 1e6, abs=1e-12)
    assert cost(ModelPrice(input=1.0, output=4.0, reasoning=8.0), usage).usd == pytest.approx(
        (1000 * 1.0 + 300 * 4.0 + 200 * 8.0) / 1e6, abs=1e-12
    )


def test_config_adds_models_and_overrides_the_table() -> None:
    table = load_prices(
        PricingConfig(
            models={
                "gpt-4o": ModelPrice(input=1, output=2),
                "meta-llama/Llama-3.1-8B-Instruct": ModelPrice(input=0.05, output=0.08),
            }
        )
    )
    assert table.lookup("gpt-4o-2024-08-06") == ("gpt-4o", ModelPrice(input=1, output=2))
    assert table.label("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"


def test_lookups_are_cached_but_bounded() -> None:
    table = PriceTable({"m": ModelPrice(input=1)})
    for i in range(10_000):
        table.lookup(f"unknown-{i}")
    assert len(table._cache) <= 4096


def test_a_kind_without_a_rate_falls_back_along_its_parents_and_is_flagged() -> None:
    p = ModelPrice(input=1.0, output=4.0, cache_write=1.25)
    usage = Usage(1000, 100, cache_creation_tokens=600, cache_creation_1h_tokens=400)
    priced = cost(p, usage)
    # 1-hour writes at the (5-minute) write rate, the nearest the table has: flagged.
    assert priced.usd == pytest.approx((400 * 1.25 + 200 * 1.25 + 400 * 1.0 + 100 * 4) / 1e6)
    assert priced.unpriced == (("cache_write_1h", 400),)


def test_reasoning_without_a_rate_is_output_as_every_provider_bills_it() -> None:
    priced = cost(ModelPrice(input=1.0, output=4.0), Usage(10, 100, reasoning_tokens=80))
    assert priced == ((10 * 1.0 + 100 * 4.0) / 1e6, ())


def test_over_the_threshold_in_a_tier_without_long_context_rates_is_flagged() -> None:
    p = ModelPrice.model_validate(
        {
            "input": 1,
            "output": 2,
            "long_context": {"threshold": 1000, "input": 2, "output": 4},
            "service_tiers": {"flex": {"input": 0.5, "output": 1}},
        }
    )
    below = cost(p, Usage(1000, 10, service_tier="flex"))
    assert below == ((1000 * 0.5 + 10 * 1) / 1e6, ())
    above = cost(p, Usage(1001, 10, service_tier="flex"))
    assert above.usd == pytest.approx((1001 * 0.5 + 10 * 1) / 1e6)
    assert dict(above.unpriced) == {"input": 1001, "output": 10}


@given(
    st.lists(st.just(0) | st.integers(min_value=0, max_value=5000), min_size=15, max_size=15),
    st.sampled_from(["", "flex", "priority", "other"]),
)
def test_no_token_is_billed_twice_however_the_parts_overlap(counts: list[int], tier: str) -> None:
    usage = Usage(*counts, service_tier=tier)  # type: ignore[arg-type]
    parts = buckets(usage)
    assert parts == _buckets(usage)  # the fast path splits as the general one does
    assert sum(n for _, n in parts) == usage.input_tokens + usage.output_tokens
    assert all(n > 0 for _, n in parts)
    price = SHIPPED.lookup("gemini-2.5-flash")
    assert price is not None
    priced = cost(price[1], usage)
    assert priced.usd >= 0


@pytest.mark.parametrize(
    ("upstream", "where"),
    [
        ({"url": "https://api.openai.com", "api": "openai"}, None),
        ({"url": "https://my-resource.openai.azure.com", "api": "azure"}, "azure"),
        ({"url": "https://us-central1-aiplatform.googleapis.com", "api": "gemini"}, "vertex_ai"),
        ({"url": "https://aiplatform.googleapis.com", "api": "gemini"}, "vertex_ai"),
        ({"url": "https://generativelanguage.googleapis.com", "api": "gemini"}, None),
        ({"url": "http://10.0.0.7:8080", "api": "gemini", "prices": "vertex_ai"}, "vertex_ai"),
        ({"url": "https://aiplatform.googleapis.com", "api": "gemini", "prices": ""}, None),
    ],
)
def test_a_route_looks_up_its_providers_own_prices_first(
    upstream: dict[str, str], where: str | None
) -> None:
    assert namespace(Upstream.model_validate(upstream)) == where


def test_azure_and_vertex_names_win_on_their_routes_and_fall_back_to_the_bare_name() -> None:
    azure = SHIPPED.lookup("gpt-4o-mini-2024-07-18", "azure")
    vertex = SHIPPED.lookup("gemini-2.5-flash-image", "vertex_ai")
    assert azure is not None and azure[0] == "azure/gpt-4o-mini"
    assert vertex is not None and vertex[0] == "vertex_ai/gemini-2.5-flash-image"
    assert SHIPPED.label("gemini-2.5-flash-image") == "gemini-2.5-flash-image"  # Gemini API
    fallback = SHIPPED.lookup("claude-opus-4-6", "azure")  # no azure/ entry
    assert fallback is not None and fallback[0] == "claude-opus-4-6"


def test_a_tier_without_a_kinds_rate_borrows_the_standard_rate_of_that_kind() -> None:
    p = ModelPrice.model_validate(
        {
            "input": 2,
            "output": 12,
            "output_image": 120,
            "service_tiers": {"priority": {"input": 3.6, "output": 21.6}},
        }
    )
    priced = cost(p, Usage(10, 1300, output_image_tokens=1290, service_tier="priority"))
    # Image output at the standard image rate (nearer than priority's text rate), flagged.
    assert priced.usd == pytest.approx((10 * 3.6 + 10 * 21.6 + 1290 * 120) / 1e6)
    assert priced.unpriced == (("output_image", 1290),)
