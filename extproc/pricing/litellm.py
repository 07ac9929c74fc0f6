"""Read LiteLLM's community price map (model_prices_and_context_window.json).

Per-token USD prices become per-1M prices. Entries keyed with a provider
prefix (``gemini/gemini-2.5-pro``) are also entered under the bare name when
the provider is a first-party API Tollway meters and the bare name is free.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from ..config import ConfigError, LongContextPrice, ModelPrice

_FIRST_PARTY = frozenset({"openai", "anthropic", "gemini"})
_METERED_MODES = frozenset({"chat", "completion", "embedding", "responses"})
_ABOVE = re.compile(r"^input_cost_per_token_above_(\d+)k_tokens$")
_FIELDS = {
    "input": "input_cost_per_token",
    "output": "output_cost_per_token",
    "cached_input": "cache_read_input_token_cost",
    "cache_write": "cache_creation_input_token_cost",
    "reasoning": "output_cost_per_reasoning_token",
}


def _per_million(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return round(value * 1_000_000, 10)


def _prices(entry: dict[str, Any], suffix: str = "") -> dict[str, float]:
    prices = {}
    for field, key in _FIELDS.items():
        value = _per_million(entry.get(key + suffix))
        if value is not None:
            prices[field] = value
    return prices


def _long_context(entry: dict[str, Any], base: dict[str, float]) -> LongContextPrice | None:
    for key in entry:
        match = _ABOVE.match(key)
        if match:
            prices = _prices(entry, f"_above_{match.group(1)}k_tokens")
            prices.setdefault("output", base.get("output", 0.0))
            return LongContextPrice(threshold=int(match.group(1)) * 1000, **prices)
    return None


def load_litellm(path: Path) -> dict[str, ModelPrice]:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of models")
    models: dict[str, ModelPrice] = {}
    bare: dict[str, ModelPrice] = {}
    for name, entry in data.items():
        if not isinstance(entry, dict) or name == "sample_spec":
            continue
        if entry.get("mode", "chat") not in _METERED_MODES:
            continue
        prices = _prices(entry)
        if "input" not in prices:
            continue
        provider = entry.get("litellm_provider")
        price = ModelPrice(
            provider=provider if isinstance(provider, str) else None,
            long_context=_long_context(entry, prices),
            **prices,
        )
        models[name] = price
        prefix, slash, rest = name.partition("/")
        if slash and prefix in _FIRST_PARTY and provider == prefix:
            bare.setdefault(rest, price)
    for name, price in bare.items():
        models.setdefault(name, price)
    return models
