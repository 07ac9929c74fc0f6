"""Prices per model and the cost of a request's tokens.

Three layers, later ones winning: the shipped table (prices.yaml), an optional
LiteLLM price map, the config's own ``pricing.models``. Model names from
responses are matched after normalising: case, provider prefixes
(``openai/``, ``models/``) and snapshot dates (``-2024-08-06``, ``-20250929``,
``@20250929``, ``-0613``, ``-002``, ``-latest``).
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml
from pydantic import ValidationError

from ..config import ConfigError, ModelPrice, PricingConfig, Rates, TierPrice, Upstream
from ..providers.usage import Usage
from .litellm import load_litellm

__all__ = [
    "OTHER",
    "Bill",
    "PriceTable",
    "Priced",
    "bill",
    "buckets",
    "cost",
    "load_prices",
    "namespace",
]

OTHER = "other"  # the model label of everything not in the table
_SNAPSHOT = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{4}|-\d{3}|-latest)$")
_CACHE_LIMIT = 4096


class PriceTable:
    def __init__(self, models: dict[str, ModelPrice], last_updated: str = "") -> None:
        self.models = models
        self.last_updated = last_updated
        self._names: dict[str, str] = {}
        for name, price in models.items():
            for alias in (name, *price.aliases):
                self._names.setdefault(alias.lower(), name)
        self._cache: dict[tuple[str, str | None], tuple[str, ModelPrice] | None] = {}

    def lookup(
        self, model: str | None, namespace: str | None = None
    ) -> tuple[str, ModelPrice] | None:
        """(the table's name, its price) for a model as a response names it, or None.

        ``namespace`` is where the route's provider keeps its own prices
        (``vertex_ai``, ``azure``): ``vertex_ai/<model>`` is looked up first.
        """
        if not model:
            return None
        key = (model, namespace)
        if key in self._cache:
            return self._cache[key]
        found = None
        if namespace is not None:
            found = self._find(f"{namespace}/{model.rpartition('/')[2]}")
        if found is None:
            found = self._find(model)
        if len(self._cache) < _CACHE_LIMIT:  # model names come from upstreams: bounded
            self._cache[key] = found
        return found

    def label(self, model: str | None, namespace: str | None = None) -> str:
        """A bounded metric label: the table's name for the model, else "other"."""
        found = self.lookup(model, namespace)
        return found[0] if found else OTHER

    def _find(self, model: str) -> tuple[str, ModelPrice] | None:
        lowered = model.lower()
        for candidate in (lowered, lowered.rpartition("/")[2]):
            for name in (candidate, _SNAPSHOT.sub("", candidate)):
                canonical = self._names.get(name)
                if canonical is not None:
                    return canonical, self.models[canonical]
        return None


class Priced(NamedTuple):
    usd: float
    # Tokens billed at the rate they are a part of, because the table has no rate
    # of their own for this kind (and tier): (kind, tokens), e.g. ("input_audio", 120).
    unpriced: tuple[tuple[str, int], ...]


# A kind without a rate is billed at the first of these that has one.
_PARENTS: dict[str, tuple[str, ...]] = {
    "cached_input": ("input",),
    "cached_input_audio": ("cached_input", "input"),
    "cached_input_image": ("cached_input", "input"),
    "cache_write": ("input",),
    "cache_write_1h": ("cache_write", "input"),
    "input_audio": ("input",),
    "input_image": ("input",),
    "input_video": ("input",),
    "reasoning": ("output",),
    "output_audio": ("output",),
    "output_image": ("output",),
}
# Billed at their parent's rate by every provider: no rate of their own is no surprise.
_SAME_AS_PARENT = frozenset({"reasoning"})


def buckets(usage: Usage) -> list[tuple[str, int]]:
    """The tokens of each kind, disjoint, in price-table terms; they sum to input + output.

    Providers' counts may overlap more than they should (a cached count above the
    prompt, say); each part is capped by what is left, so no token is billed twice.
    """
    if (
        usage.cache_creation_1h_tokens
        or usage.cached_audio_tokens
        or usage.cached_image_tokens
        or usage.input_audio_tokens
        or usage.input_image_tokens
        or usage.input_video_tokens
        or usage.output_audio_tokens
        or usage.output_image_tokens
        or usage.other_input_tokens
        or usage.other_output_tokens
    ):
        return _buckets(usage)
    # Most responses: text, perhaps cached, perhaps reasoning. The same split, faster.
    parts = []
    left = usage.input_tokens
    cached = min(usage.cached_input_tokens, left)
    if cached > 0:
        parts.append(("cached_input", cached))
        left -= cached
    written = min(usage.cache_creation_tokens, left)
    if written > 0:
        parts.append(("cache_write", written))
        left -= written
    if left > 0:
        parts.append(("input", left))
    left = usage.output_tokens
    reasoning = min(usage.reasoning_tokens, left)
    if reasoning > 0:
        parts.append(("reasoning", reasoning))
        left -= reasoning
    if left > 0:
        parts.append(("output", left))
    return parts


def _buckets(usage: Usage) -> list[tuple[str, int]]:
    left = usage.input_tokens
    parts: list[tuple[str, int]] = []

    def take(kind: str, tokens: int) -> int:
        nonlocal left
        n = min(max(tokens, 0), left)
        left -= n
        if n:
            parts.append((kind, n))
        return n

    cached_audio = take("cached_input_audio", usage.cached_audio_tokens)
    cached_image = take("cached_input_image", usage.cached_image_tokens)
    take("cached_input", usage.cached_input_tokens - cached_audio - cached_image)
    written_1h = take("cache_write_1h", usage.cache_creation_1h_tokens)
    take("cache_write", usage.cache_creation_tokens - written_1h)
    take("input_audio", usage.input_audio_tokens - cached_audio)
    take("input_image", usage.input_image_tokens - cached_image)
    take("input_video", usage.input_video_tokens)
    take("other_input", usage.other_input_tokens)
    take("input", left)
    left = usage.output_tokens
    take("reasoning", usage.reasoning_tokens)
    take("output_audio", usage.output_audio_tokens)
    take("output_image", usage.output_image_tokens)
    take("other_output", usage.other_output_tokens)
    take("output", left)
    return parts


def _rates(price: ModelPrice, usage: Usage) -> tuple[Rates, bool]:
    """The rates that price this request, and whether they are the ones it was served at."""
    tier: TierPrice = price
    exact = True
    if usage.service_tier:
        served = price.service_tiers.get(usage.service_tier)  # type: ignore[call-overload]
        if served is None:
            exact = False  # a tier the table has no rates for: standard rates, flagged
        else:
            tier = served
    base_long = price.long_context
    long = tier.long_context
    if long is not None and usage.input_tokens > long.threshold:
        return long, exact
    if long is None and base_long is not None and usage.input_tokens > base_long.threshold:
        exact = False  # over the threshold in a tier whose long-context rates are unknown
    return tier, exact


_RESOLVED: dict[int, tuple[Rates, dict[str, tuple[float, bool]]]] = {}


def _resolve(rates: Rates) -> dict[str, tuple[float, bool]]:
    """Each kind's rate in these rates, and whether it is the kind's own."""
    resolved: dict[str, tuple[float, bool]] = {}
    for kind in (*_PARENTS, "input", "output"):
        rate, own = getattr(rates, kind), True
        for parent in _PARENTS.get(kind, ()) if rate is None else ():
            rate = getattr(rates, parent)
            if rate is not None:
                own = kind in _SAME_AS_PARENT
                break
        resolved[kind] = (rate, own)
    # Kinds Tollway has no name for: the plain rate, never their own.
    resolved["other_input"] = (rates.input, False)
    resolved["other_output"] = (rates.output, False)
    return resolved


def cost(price: ModelPrice, usage: Usage) -> Priced:
    """USD for these tokens: each kind at its own rate, in the tier that served them,
    the long-context rates if the prompt is over the threshold."""
    rates, exact = _rates(price, usage)
    found = _RESOLVED.get(id(rates))
    if found is None:  # once per rates: price tables are immutable
        if len(_RESOLVED) > _CACHE_LIMIT:
            _RESOLVED.clear()
        found = _RESOLVED[id(rates)] = (rates, _resolve(rates))  # kept alive: id stays its own
    resolved = found[1]
    total = 0.0
    unpriced: list[tuple[str, int]] = []
    for kind, tokens in buckets(usage):
        rate, own = resolved[kind]
        total += tokens * rate
        if not (own and exact):
            unpriced.append((kind, tokens))
    return Priced(total / 1_000_000, tuple(unpriced))


class Bill(NamedTuple):
    """What one response cost, priced step by step."""

    name: str | None  # the table's name for the response's model; None: not priced
    usd: float
    unpriced: tuple[tuple[str, int], ...]  # as in Priced, over every step
    complete: bool  # every step's model was in the table


def bill(
    table: PriceTable,
    model: str | None,
    usage: Usage,
    parts: tuple[tuple[str | None, Usage], ...] = (),
    where: str | None = None,
) -> Bill:
    """Price a response: its usage at its model's prices, or, when it reports steps of
    its own (``parts``: a step's model, None for the response's), each step apart."""
    found = table.lookup(model, where)
    name = found[0] if found is not None else None
    if not parts:
        if found is None:
            return Bill(None, 0.0, (), False)
        usd, unpriced = cost(found[1], usage)
        return Bill(name, usd, unpriced, True)
    total, complete = 0.0, True
    flagged: list[tuple[str, int]] = []
    for step_model, step in parts:
        price = found if step_model is None else table.lookup(step_model, where)
        if price is None:
            complete = False
            continue
        usd, unpriced = cost(price[1], step)
        total += usd
        flagged.extend(unpriced)
    return Bill(name, total, tuple(flagged), complete)


def namespace(upstream: Upstream) -> str | None:
    """Where a route's provider keeps prices of its own in the table: the upstream's
    ``prices`` setting, else ``azure`` for Azure OpenAI and ``vertex_ai`` for a Gemini
    upstream on Vertex AI (``*aiplatform.googleapis.com``)."""
    if upstream.prices is not None:
        return upstream.prices or None
    if upstream.api == "azure":
        return "azure"
    host = urlsplit(upstream.url).hostname or ""
    if upstream.api == "gemini" and host.endswith("aiplatform.googleapis.com"):
        return "vertex_ai"
    return None


def _shipped() -> tuple[dict[str, Any], str]:
    text = resources.files(__package__).joinpath("prices.yaml").read_text(encoding="utf-8")
    data = yaml.safe_load(text)
    return data["models"], str(data.get("last_updated", ""))


def _validated(raw: dict[str, Any], source: str) -> dict[str, ModelPrice]:
    models = {}
    for name, entry in raw.items():
        try:
            models[name] = ModelPrice.model_validate(entry)
        except ValidationError as exc:
            problem = exc.errors()[0]
            where = ".".join(str(p) for p in problem["loc"])
            raise ConfigError(f"{source}: models.{name}.{where}: {problem['msg']}") from None
    return models


def load_prices(config: PricingConfig) -> PriceTable:
    raw, last_updated = _shipped()
    models = _validated(raw, "shipped prices.yaml")
    if config.litellm_file is not None:
        models.update(load_litellm(Path(config.litellm_file)))
    models.update(config.models)
    return PriceTable(models, last_updated)
