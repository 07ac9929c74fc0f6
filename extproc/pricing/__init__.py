"""Prices per model and the cost of a request's tokens.

Three layers, later ones winning: the shipped table (prices.yaml), an optional
LiteLLM price map, the config's own ``pricing.models``. Model names from
responses are matched after normalising: case, provider prefixes
(``openai/``, ``models/``) and snapshot dates (``-2024-08-06``, ``-20250929``,
``@20250929``, ``-0613``, ``-002``, ``-latest``).
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..config import ConfigError, ModelPrice, PricingConfig, TierPrice
from ..providers.usage import Usage
from .litellm import load_litellm

__all__ = ["OTHER", "PriceTable", "cost", "load_prices"]

OTHER = "other"  # the model label of everything not in the table
_SNAPSHOT = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|-\d{8}|@\d{8}|-\d{4}|-\d{3}|-latest)$")
# OpenAI's completions name a snapshot after a colon: "gpt-3.5-turbo-instruct:20230824-v2",
# "babbage:2023-07-21-v2". Only a date goes: "llama3:8b" and "ft:..." names are kept.
_COLON_SNAPSHOT = re.compile(r":(?:\d{8}|\d{4}-\d{2}-\d{2})(?:-v\d+)?$")
_CACHE_LIMIT = 4096


class PriceTable:
    def __init__(
        self, models: dict[str, ModelPrice], last_updated: str = "", litellm_version: str = ""
    ) -> None:
        self.models = models
        self.last_updated = last_updated
        self.litellm_version = litellm_version  # of the LiteLLM map the table came from
        self._names: dict[str, str] = {}
        for name, price in models.items():
            for alias in (name, *price.aliases):
                self._names.setdefault(alias.lower(), name)
        self._cache: dict[str, tuple[str, ModelPrice] | None] = {}

    def lookup(self, model: str | None) -> tuple[str, ModelPrice] | None:
        """(the table's name, its price) for a model as a response names it, or None."""
        if not model:
            return None
        if model in self._cache:
            return self._cache[model]
        found = self._find(model)
        if len(self._cache) < _CACHE_LIMIT:  # model names come from upstreams: bounded
            self._cache[model] = found
        return found

    def label(self, model: str | None) -> str:
        """A bounded metric label: the table's name for the model, else "other"."""
        found = self.lookup(model)
        return found[0] if found else OTHER

    def _find(self, model: str) -> tuple[str, ModelPrice] | None:
        lowered = _COLON_SNAPSHOT.sub("", model.lower())
        for candidate in (lowered, lowered.rpartition("/")[2]):
            for name in (candidate, _SNAPSHOT.sub("", candidate)):
                canonical = self._names.get(name)
                if canonical is not None:
                    return canonical, self.models[canonical]
        return None


def cost(price: ModelPrice, usage: Usage) -> float:
    """USD for these tokens: each kind at its own rate, the long-context tier if over it."""
    tier: TierPrice = price
    if price.long_context is not None and usage.input_tokens > price.long_context.threshold:
        tier = price.long_context
    cached, written = usage.cached_input_tokens, usage.cache_creation_tokens
    reasoning = usage.reasoning_tokens
    per_million = (
        max(usage.input_tokens - cached - written, 0) * tier.input
        + cached * (tier.input if tier.cached_input is None else tier.cached_input)
        + written * (tier.input if tier.cache_write is None else tier.cache_write)
        + max(usage.output_tokens - reasoning, 0) * tier.output
        + reasoning * (tier.output if tier.reasoning is None else tier.reasoning)
    )
    return per_million / 1_000_000


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 10x faster at start-up


def _shipped(table_file: Path | None = None) -> tuple[dict[str, Any], str, str]:
    """(models, last_updated, litellm_version) of the shipped table or pricing.table_file."""
    if table_file is None:
        return _package_table()
    return _read_table(table_file)


@functools.cache
def _package_table() -> tuple[dict[str, Any], str, str]:
    # Parsed once a process (~0.1 s): tests and reloads build many tables. Not mutated:
    # load_prices validates it into a new dict.
    return _read_table(None)


def _read_table(table_file: Path | None) -> tuple[dict[str, Any], str, str]:
    if table_file is None:
        text = resources.files(__package__).joinpath("prices.yaml").read_text(encoding="utf-8")
    else:
        try:
            text = table_file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{table_file}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 - a safe loader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{table_file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        raise ConfigError(f"{table_file}: expected a price table (a mapping with models:)")
    return data["models"], str(data.get("last_updated", "")), str(data.get("litellm_version", ""))


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
    raw, last_updated, version = _shipped(config.table_file)
    where = "shipped prices.yaml" if config.table_file is None else str(config.table_file)
    models = _validated(raw, where)
    if config.litellm_file is not None:
        models.update(load_litellm(Path(config.litellm_file)))
    models.update(config.models)
    return PriceTable(models, last_updated, version)
