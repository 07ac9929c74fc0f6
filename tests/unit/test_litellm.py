"""LiteLLM's price map in Tollway's schema, the shipped table made from it, snapshot names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from extproc.config import ConfigError, ModelPrice, PricingConfig
from extproc.pricing import PriceTable, load_prices
from extproc.pricing.litellm import load_litellm, read_litellm
from extproc.pricing.update import read_overrides, update_table

SHIPPED = load_prices(PricingConfig())


def one(entry: dict[str, Any], key: str = "m") -> ModelPrice:
    return read_litellm({key: entry})[key]


def test_every_token_kind_is_read_per_million() -> None:
    price = one(
        {
            "input_cost_per_token": 2.5e-06,
            "output_cost_per_token": 1e-05,
            "cache_read_input_token_cost": 2.5e-07,
            "cache_creation_input_token_cost": 3.125e-06,
            "cache_creation_input_token_cost_above_1hr": 5e-06,
            "output_cost_per_reasoning_token": 1.2e-05,
            "input_cost_per_audio_token": 4e-05,
            "input_cost_per_image_token": 3e-06,
            "input_cost_per_video_token": 2e-06,
            "cache_read_input_audio_token_cost": 2.5e-06,
            "cache_read_input_image_token_cost": 7.5e-07,
            "output_cost_per_audio_token": 8e-05,
            "output_cost_per_image_token": 3e-05,
            "litellm_provider": "openai",
        },
        key="gpt-x",
    )
    assert price == ModelPrice(
        provider="openai",
        source="litellm:gpt-x",
        input=2.5,
        output=10,
        cached_input=0.25,
        cache_write=3.125,
        cache_write_1h=5,
        reasoning=12,
        input_audio=40,
        input_image=3,
        input_video=2,
        cached_input_audio=2.5,
        cached_input_image=0.75,
        output_audio=80,
        output_image=30,
    )


def test_every_token_priced_model_is_kept_whatever_its_mode() -> None:
    models = read_litellm(
        {
            "sample_spec": {"input_cost_per_token": 0, "litellm_provider": "one of..."},
            "gemini/gemini-9-flash-image": {
                "input_cost_per_token": 3e-07,
                "output_cost_per_token": 2.5e-06,
                "output_cost_per_image_token": 3e-05,
                "output_cost_per_image": 0.039,  # per image: not a token price, left out
                "litellm_provider": "gemini",
                "mode": "image_generation",
            },
            "gpt-9-realtime": {"input_cost_per_token": 4e-06, "mode": "realtime"},
            "whisper-9": {"input_cost_per_second": 0.0001, "mode": "audio_transcription"},
            "dall-e-9": {"output_cost_per_image": 0.04, "mode": "image_generation"},
            "free-9": {"input_cost_per_token": 0, "output_cost_per_token": 0},
        }
    )
    image = models["gemini-9-flash-image"]
    assert (image.input, image.output, image.output_image) == (0.3, 2.5, 30)
    assert "gpt-9-realtime" in models and models["free-9"].input == 0
    assert not {"whisper-9", "dall-e-9", "sample_spec"} & set(models)


def test_long_context_keys_make_a_tier_and_a_cache_ttl_is_no_threshold() -> None:
    price = one(
        {
            "input_cost_per_token": 3e-06,
            "output_cost_per_token": 1.5e-05,
            "cache_creation_input_token_cost": 3.75e-06,
            "cache_creation_input_token_cost_above_1hr": 6e-06,
            "cache_creation_input_token_cost_above_12hr": 9e-06,  # no such rate here
            "input_cost_per_token_above_200k_tokens": 6e-06,
            "cache_creation_input_token_cost_above_1hr_above_200k_tokens": 1.2e-05,
            "input_cost_per_character_above_128k_tokens": 1e-06,  # not tokens: no threshold
        }
    )
    assert price.cache_write_1h == 6
    long = price.long_context
    assert long is not None and long.threshold == 200_000
    assert (long.input, long.cache_write_1h, long.cache_write) == (6, 12, None)
    assert long.output == 15  # no long-context output price: the standard one


def test_of_several_thresholds_the_lowest_is_the_tier() -> None:
    price = one(
        {
            "input_cost_per_token": 1e-06,
            "input_cost_per_token_above_256k_tokens": 3e-06,
            "input_cost_per_token_above_32k_tokens": 2e-06,
        }
    )
    assert price.long_context is not None
    assert (price.long_context.threshold, price.long_context.input) == (32_000, 2)


def test_service_tiers_with_their_own_long_context() -> None:
    price = one(
        {
            "input_cost_per_token": 2.5e-06,
            "output_cost_per_token": 1.5e-05,
            "input_cost_per_token_above_272k_tokens": 5e-06,
            "input_cost_per_token_flex": 1.25e-06,
            "output_cost_per_token_flex": 7.5e-06,
            "input_cost_per_token_above_272k_tokens_flex": 2.5e-06,
            "input_cost_per_token_priority": 5e-06,
            "output_cost_per_token_priority": 3e-05,
            "input_cost_per_token_above_272k_tokens_priority": 1e-05,
            "output_cost_per_token_above_272k_tokens_priority": 4.5e-05,
            "input_cost_per_token_batches": 1.25e-06,  # no batch output: the standard one
            "input_cost_per_token_ultrafast": 9e-06,  # a tier Tollway has no name for
        }
    )
    assert set(price.service_tiers) == {"flex", "priority", "batch"}
    flex, priority, batch = (price.service_tiers[t] for t in ("flex", "priority", "batch"))
    assert (flex.input, flex.output) == (1.25, 7.5)
    assert flex.long_context is not None
    assert (flex.long_context.threshold, flex.long_context.input) == (272_000, 2.5)
    assert flex.long_context.output == 7.5  # the flex output, not the standard one
    assert priority.long_context is not None
    assert (priority.long_context.input, priority.long_context.output) == (10, 45)
    assert (batch.input, batch.output, batch.long_context) == (1.25, 15, None)


def test_a_tier_without_an_input_price_is_not_made() -> None:
    price = one(
        {
            "input_cost_per_token": 3e-07,
            "output_cost_per_image_token": 3e-05,
            "output_cost_per_image_token_priority": 5.4e-05,
        }
    )
    assert price.service_tiers == {}


LITELLM: dict[str, Any] = {
    "gemini-9-pro": {  # LiteLLM's bare gemini entries are Vertex AI's prices
        "input_cost_per_token": 1.25e-06,
        "cache_read_input_token_cost": 3.1e-07,
        "litellm_provider": "vertex_ai-language-models",
    },
    "gemini/gemini-9-pro": {
        "input_cost_per_token": 1.25e-06,
        "cache_read_input_token_cost": 1.25e-07,
        "litellm_provider": "gemini",
    },
    "gemini-9-vertex-only": {
        "input_cost_per_token": 1e-06,
        "litellm_provider": "vertex_ai-language-models",
    },
    "vertex_ai/gemini-9-flash": {"input_cost_per_token": 5e-07, "litellm_provider": "vertex_ai"},
    "gemini-9-flash": {
        "input_cost_per_token": 6e-07,
        "litellm_provider": "vertex_ai-language-models",
    },
    "vertex_ai/claude-9": {
        "input_cost_per_token": 3e-06,
        "litellm_provider": "vertex_ai-anthropic_models",
    },
    "openai/gpt-9": {"input_cost_per_token": 9e-06, "litellm_provider": "openai"},
    "openai/gpt-4o": {"input_cost_per_token": 9e-06, "litellm_provider": "openai"},
    "gpt-4o": {"input_cost_per_token": 2.5e-06, "litellm_provider": "openai"},
    "azure/gpt-4o": {"input_cost_per_token": 2.75e-06, "litellm_provider": "azure"},
    "fireworks_ai/gpt-9": {"input_cost_per_token": 1e-07, "litellm_provider": "fireworks_ai"},
}


def test_the_gemini_api_wins_the_bare_name_and_vertex_keeps_its_own() -> None:
    models = read_litellm(LITELLM)
    assert models["gemini-9-pro"].cached_input == 0.125
    assert models["gemini-9-pro"].source == "litellm:gemini/gemini-9-pro"
    vertex = models["vertex_ai/gemini-9-pro"]
    assert (vertex.cached_input, vertex.source) == (0.31, "litellm:gemini-9-pro")
    assert models["vertex_ai/gemini-9-flash"].input == 0.5  # an explicit key wins
    assert models["gemini-9-vertex-only"] is models["vertex_ai/gemini-9-vertex-only"]
    assert "vertex_ai/claude-9" in models and "claude-9" not in models


def test_prefixed_first_party_names_fill_free_bare_names_and_azure_keeps_its_keys() -> None:
    models = read_litellm(LITELLM)
    assert models["gpt-9"].input == 9  # openai/gpt-9: the bare name was free
    assert models["gpt-4o"].input == 2.5  # not replaced by openai/gpt-4o
    assert models["azure/gpt-4o"].input == 2.75
    assert "fireworks_ai/gpt-9" in models  # a reseller's entry: not a first-party name
    table = PriceTable(models)
    assert table.label("gpt-4o") == "gpt-4o" and table.label("azure/gpt-4o") == "azure/gpt-4o"


def test_a_snapshot_priced_as_its_model_is_an_alias_one_with_its_own_price_its_own_entry() -> None:
    same = {"input_cost_per_token": 2.5e-06, "litellm_provider": "openai"}
    models = read_litellm(
        {
            "gpt-9o": same,
            "gpt-9o-2026-08-06": same,
            "gpt-9o-2026-05-13": {"input_cost_per_token": 5e-06, "litellm_provider": "openai"},
            "vertex_ai/claude-9": {"input_cost_per_token": 3e-06, "litellm_provider": "vertex_ai"},
            "vertex_ai/claude-9@20260929": {
                "input_cost_per_token": 3e-06,
                "litellm_provider": "vertex_ai",
            },
        }
    )
    assert set(models) == {"gpt-9o", "gpt-9o-2026-05-13", "vertex_ai/claude-9"}
    assert models["gpt-9o"].aliases == ("gpt-9o-2026-08-06",)
    table = PriceTable(models)
    assert table.label("gpt-9o-2026-08-06") == "gpt-9o"
    assert table.label("gpt-9o-2026-05-13") == "gpt-9o-2026-05-13"
    assert table.label("vertex_ai/claude-9@20260929") == "vertex_ai/claude-9"


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_bad_litellm_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "prices.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match=r"prices\.json"):
        load_litellm(path)


def test_litellm_file_sits_between_the_table_and_the_config(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps(LITELLM))
    table = load_prices(
        PricingConfig(litellm_file=path, models={"gemini-9-pro": ModelPrice(input=9, output=9)})
    )
    found = table.lookup("gpt-4o")
    assert found is not None and found[1].source == "litellm:gpt-4o"
    found = table.lookup("gemini-9-pro")
    assert found is not None and found[1].input == 9
    assert table.lookup("claude-sonnet-4-5") is not None  # the shipped table is still there


# --- The shipped table: made from litellm's map by scripts/update-prices ---


def shipped(name: str) -> ModelPrice:
    assert name in SHIPPED.models, name
    return SHIPPED.models[name]


def test_the_shipped_table_says_where_each_price_came_from() -> None:
    assert SHIPPED.last_updated[:2] == "20" and SHIPPED.litellm_version
    assert all(price.source for price in SHIPPED.models.values())
    assert shipped("gpt-4o").source == "litellm:gpt-4o"
    assert shipped("claude-opus-4-1").source == "tollway"  # an override: LiteLLM lacks it


def test_the_shipped_table_has_the_image_models_tiers_and_cache_ttls() -> None:
    image = shipped("gemini-2.5-flash-image")
    assert image.input > 0 and image.output_image is not None and image.output_image > 0
    assert shipped("gemini-3-pro-image-preview").input > 0
    pro = shipped("gemini-2.5-pro")
    assert pro.source == "litellm:gemini/gemini-2.5-pro"
    assert pro.long_context is not None and pro.long_context.threshold == 200_000
    assert {"flex", "priority"} <= set(pro.service_tiers)
    assert pro.service_tiers["priority"].input > pro.input > pro.service_tiers["flex"].input
    assert shipped("claude-sonnet-4-5").cache_write_1h is not None
    assert shipped("claude-opus-4-1").cache_write_1h is not None
    gpt = shipped("gpt-5.4")
    assert gpt.long_context is not None and gpt.long_context.threshold == 272_000


def test_the_shipped_table_keeps_vertex_and_azure_prices_apart() -> None:
    vertex = shipped("vertex_ai/gemini-2.5-pro")
    assert vertex.source == "litellm:gemini-2.5-pro" and vertex.provider == "vertex_ai"
    assert "vertex_ai/claude-sonnet-4-5" in SHIPPED.models
    assert shipped("azure/gpt-4o").provider == "azure"
    providers = {price.provider for price in SHIPPED.models.values()}
    assert providers == {"openai", "anthropic", "gemini", "vertex_ai", "azure"}
    assert not [name for name in SHIPPED.models if name.count("/") > 1]  # no azure/eu/...


def test_every_override_is_in_the_shipped_table() -> None:
    """overrides.yaml edited but the table not regenerated: this fails."""
    for name, override in read_overrides().items():
        price = shipped(name)
        assert price.source is not None and price.source.endswith("tollway"), name
        assert set(override.get("aliases", ())) <= set(price.aliases), name


def test_the_old_hand_written_tables_names_still_resolve() -> None:
    old = [
        *("gpt-5.6", "gpt-5.5-pro", "gpt-4o-2024-05-13", "chatgpt-4o-latest", "o3-pro"),
        *("gpt-3.5-turbo-instruct", "text-embedding-3-small", "claude-fable-5"),
        *("claude-opus-4-20250514", "claude-4-sonnet-20250514", "claude-3-haiku-20240307"),
        *("claude-3-opus-20240229", "claude-3-7-sonnet-20250219", "claude-sonnet-4-5-20250929"),
        *("gemini-3-pro-preview", "gemini-3.1-flash-lite", "gemini-2.0-flash-lite"),
        *("gemini-2.0-flash-001", "gemini-embedding-001"),
    ]
    assert [name for name in old if SHIPPED.lookup(name) is None] == []


# --- Regenerating a table ---


def test_an_update_writes_a_table_the_config_can_point_at(tmp_path: Path) -> None:
    source = tmp_path / "litellm.json"
    source.write_text(json.dumps(LITELLM))
    overrides = tmp_path / "overrides.yaml"
    overrides.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "gpt-4o": {"output": 10, "aliases": ["gpt-4o-house"]},
                    "gpt-house": {"provider": "openai", "input": 1},
                }
            }
        )
    )
    output = tmp_path / "prices.yaml"
    update_table(source, output, "9.9.9", "2026-01-02", overrides=overrides)
    table = load_prices(PricingConfig(table_file=output))
    assert (table.last_updated, table.litellm_version) == ("2026-01-02", "9.9.9")
    assert set(table.models) == {
        *("gpt-4o", "gpt-9", "gemini-9-pro", "gpt-house"),
        *("vertex_ai/gemini-9-pro", "vertex_ai/gemini-9-flash", "vertex_ai/gemini-9-vertex-only"),
        *("vertex_ai/claude-9", "azure/gpt-4o"),
    }
    gpt = table.models["gpt-4o"]
    assert (gpt.input, gpt.output, gpt.source) == (2.5, 10, "litellm:gpt-4o, tollway")
    assert table.label("gpt-4o-house") == "gpt-4o"
    assert table.models["gpt-house"].source == "tollway"
    assert table.lookup("claude-sonnet-4-5") is None  # instead of the shipped table


def test_a_table_file_that_is_not_a_table_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "prices.yaml"
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match=r"prices\.yaml: expected a price table"):
        load_prices(PricingConfig(table_file=bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_prices(PricingConfig(table_file=tmp_path / "none.yaml"))


# --- Names as responses give them ---


@pytest.mark.parametrize(
    ("seen", "name"),
    [
        ("gpt-3.5-turbo-instruct:20230824-v2", "gpt-3.5-turbo-instruct"),
        ("babbage:2023-07-21-v2", "babbage-002"),  # overrides.yaml: babbage is an alias
        ("davinci:2023-07-21", "davinci-002"),
        ("gpt-4o:20240806", "gpt-4o"),
        ("ft:babbage-002", "ft:babbage-002"),  # LiteLLM prices fine-tunes of babbage-002
    ],
)
def test_a_colon_date_snapshot_is_its_model(seen: str, name: str) -> None:
    assert SHIPPED.label(seen) == name


@pytest.mark.parametrize(
    "seen", ["llama3:8b", "gpt-4o:latest", "ft:gpt-4o-mini-2024-07-18:acme::abc123", "gpt-4o:2024"]
)
def test_other_colon_suffixes_are_not_stripped(seen: str) -> None:
    assert SHIPPED.lookup(seen) is None
