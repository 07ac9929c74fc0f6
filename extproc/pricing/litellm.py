"""Read LiteLLM's community price map (model_prices_and_context_window.json).

Every entry with a numeric ``input_cost_per_token`` is kept, whatever its
``mode`` (image models such as gemini-2.5-flash-image bill tokens too). Its
per-token USD prices become per-1M rates of the price schema: each token kind,
the long-context tier (keys ``..._above_200k_tokens``), the service tiers (keys
``..._flex``, ``..._priority``, ``..._batches``, and both at once). Prices per
second, image, query or character are not tokens and are left out.

Names: an entry stays under its LiteLLM key, and

* ``gemini/<m>`` (the Gemini API) is also entered as ``<m>``, over LiteLLM's
  bare ``<m>``, which is Vertex AI's price;
* an entry of a Vertex AI provider is also ``vertex_ai/<m>`` (an explicit
  ``vertex_ai/<m>`` key wins over a bare Vertex entry of the same name);
* ``openai/<m>`` and ``anthropic/<m>`` fill ``<m>`` when it is free;
* a dated snapshot priced exactly as its undated name (``claude-sonnet-4-5-20250929``)
  becomes an alias of it, so both count under one name in metrics.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson

from ..config import SERVICE_TIERS, ConfigError, LongContextPrice, ModelPrice, TierPrice

__all__ = ["fold_snapshots", "load_litellm", "read_litellm"]

_FIRST_PARTY = frozenset({"openai", "anthropic", "gemini"})
_VERTEX = "vertex_ai"
# LiteLLM's key -> the rate of the schema.
_RATES = {
    "input_cost_per_token": "input",
    "output_cost_per_token": "output",
    "cache_read_input_token_cost": "cached_input",
    "cache_creation_input_token_cost": "cache_write",
    "cache_creation_input_token_cost_above_1hr": "cache_write_1h",  # a TTL, not a threshold
    "output_cost_per_reasoning_token": "reasoning",
    "input_cost_per_audio_token": "input_audio",
    "input_cost_per_image_token": "input_image",
    "input_cost_per_video_token": "input_video",
    "cache_read_input_audio_token_cost": "cached_input_audio",
    "cache_read_input_image_token_cost": "cached_input_image",
    "output_cost_per_audio_token": "output_audio",
    "output_cost_per_image_token": "output_image",
}
# LiteLLM's suffix -> the service tier (others, such as _ultrafast, have no tier here).
_TIERS = {"flex": "flex", "priority": "priority", "batches": "batch"}
assert set(_TIERS.values()) == set(SERVICE_TIERS)
_KEY = re.compile(
    r"^(?P<rate>[a-z0-9_]+?)(?:_above_(?P<k>\d+)k_tokens)?(?:_(?P<tier>flex|priority|batches))?$"
)
# A snapshot suffix, as PriceTable._find strips it, and Vertex AI's version aliases.
_SNAPSHOT = re.compile(
    r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{4}|-\d{3}|-latest|@default|@latest)$"
)

# (service tier or None, long-context threshold or None) -> {rate: USD per 1M}
_Rates = dict[tuple[str | None, int | None], dict[str, float]]


def _per_million(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return None
    return round(value * 1_000_000, 10)


def _rates(entry: dict[str, Any]) -> _Rates:
    rates: _Rates = {}
    for key, value in entry.items():
        match = _KEY.match(key)
        if match is None or match["rate"] not in _RATES:
            continue
        usd = _per_million(value)
        if usd is None:
            continue
        tier = _TIERS[match["tier"]] if match["tier"] else None
        threshold = int(match["k"]) * 1000 if match["k"] else None
        rates.setdefault((tier, threshold), {})[_RATES[match["rate"]]] = usd
    return rates


def _tier(rates: _Rates, tier: str | None, threshold: int | None, output: float) -> TierPrice:
    base = dict(rates[(tier, None)])
    base.setdefault("output", output)  # a tier without an output rate: the standard one
    long = rates.get((tier, threshold)) if threshold is not None else None
    long_context = None
    if threshold is not None and long is not None and "input" in long:
        # A long-context tier without an output rate keeps its tier's output rate.
        long_context = LongContextPrice(threshold=threshold, **{"output": base["output"], **long})
    return TierPrice(long_context=long_context, **base)


def model_price(key: str, entry: dict[str, Any]) -> ModelPrice | None:
    """One LiteLLM entry in the price schema; None if it has no price per input token."""
    rates = _rates(entry)
    standard = rates.get((None, None), {})
    if "input" not in standard:
        return None
    # An entry may list several thresholds (a few resellers' Qwen models: 32k and
    # 256k); the schema has one long-context tier, so the lowest is taken.
    thresholds = sorted({t for _, t in rates if t is not None})
    threshold = thresholds[0] if thresholds else None
    output = standard.get("output", 0.0)
    tiers = {
        tier: _tier(rates, tier, threshold, output)
        for tier in SERVICE_TIERS
        if "input" in rates.get((tier, None), {})  # a tier without an input rate is not made
    }
    price = _tier(rates, None, threshold, output)
    provider = entry.get("litellm_provider")
    return ModelPrice(
        **price.model_dump(exclude_none=True),
        provider=provider if isinstance(provider, str) else None,
        service_tiers=tiers,
        source=f"litellm:{key}",
    )


def _same_price(a: ModelPrice, b: ModelPrice) -> bool:
    return a.model_dump(exclude={"source", "aliases"}) == b.model_dump(
        exclude={"source", "aliases"}
    )


def fold_snapshots(models: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
    """Dated snapshots priced as their undated name become aliases of it."""
    aliases: dict[str, list[str]] = {}
    for name, price in models.items():
        base = _SNAPSHOT.sub("", name)
        if base != name and base in models and _same_price(price, models[base]):
            aliases.setdefault(base, []).append(name)
    folded = {name for names in aliases.values() for name in names}
    result = {}
    for name, price in models.items():
        if name in folded:
            continue
        if name in aliases:
            merged = tuple(dict.fromkeys((*price.aliases, *aliases[name])))
            price = price.model_copy(update={"aliases": merged})
        result[name] = price
    return result


def read_litellm(data: dict[str, Any]) -> dict[str, ModelPrice]:
    """Every token-priced entry of a LiteLLM map, under the names described above."""
    models: dict[str, ModelPrice] = {}
    gemini: dict[str, ModelPrice] = {}  # bare name -> the Gemini API's price
    vertex: dict[str, ModelPrice] = {}  # vertex_ai/<m> of bare Vertex entries
    prefixed: dict[str, ModelPrice] = {}  # bare name -> openai/, anthropic/ prices
    for key, entry in data.items():
        if not isinstance(entry, dict) or key == "sample_spec":
            continue
        price = model_price(key, entry)
        if price is None:
            continue
        models[key] = price
        provider = price.provider or ""
        prefix, slash, rest = key.partition("/")
        if provider.startswith(_VERTEX) and prefix != _VERTEX:
            vertex.setdefault(f"{_VERTEX}/{key}", price)
        if slash and prefix in _FIRST_PARTY and provider == prefix:
            (gemini if prefix == "gemini" else prefixed).setdefault(rest, price)
    for name, price in vertex.items():
        models.setdefault(name, price)  # an explicit vertex_ai/<m> key wins
    models.update(gemini)  # the Gemini API's price over Vertex's bare entry
    for name, price in prefixed.items():
        models.setdefault(name, price)
    return fold_snapshots(models)


def load_litellm(path: Path) -> dict[str, ModelPrice]:
    try:
        data = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object of models")
    return read_litellm(data)
