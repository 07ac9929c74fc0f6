"""Regenerate a price table (prices.yaml) from LiteLLM's map and Tollway's overrides.

The shipped table keeps the first-party models of OpenAI, Anthropic and Google's
Gemini API under their bare names, and the same providers' models on Vertex AI
(``vertex_ai/gemini-*``, ``vertex_ai/claude-*``) and Azure OpenAI (``azure/<m>``;
not Azure's regional ``azure/eu/<m>`` names). overrides.yaml is applied on top.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError, ModelPrice
from .litellm import load_litellm

__all__ = ["SHIPPED_TABLE", "apply_overrides", "render", "select", "update_table"]

SHIPPED_TABLE = Path(__file__).with_name("prices.yaml")
# (section, its heading) in the order the table lists them.
_SECTIONS = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "gemini": "Google Gemini API (LiteLLM's gemini/ keys, under the bare name)",
    "vertex_ai": "Google Vertex AI: Gemini and Claude (looked up as vertex_ai/<model>)",
    "azure": "Azure OpenAI (looked up as azure/<model>)",
}
_BARE = {
    "openai": "openai",
    "text-completion-openai": "openai",
    "anthropic": "anthropic",
    "gemini": "gemini",
}


def _section(name: str, price: ModelPrice) -> str | None:
    """Where a model goes in the shipped table; None: not shipped."""
    provider = price.provider or ""
    head, slash, rest = name.partition("/")
    if not slash:
        return _BARE.get(provider)
    if "/" in rest:  # azure/eu/..., vertex_ai/xai/...
        return None
    if head == "vertex_ai" and provider.startswith("vertex_ai"):
        return "vertex_ai" if rest.startswith(("gemini", "claude")) else None
    if head == "azure" and provider == "azure":
        return None if rest.startswith("mistral") else "azure"
    return None


def select(models: dict[str, ModelPrice]) -> dict[str, ModelPrice]:
    """The shipped table's models, each with the provider Tollway names."""
    kept = {}
    for name, price in models.items():
        section = _section(name, price)
        if section is not None:
            kept[name] = price.model_copy(update={"provider": section})
    return kept


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if value is None:
            merged.pop(key, None)
        elif key == "aliases":
            merged[key] = list(dict.fromkeys([*merged.get(key, ()), *value]))
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_overrides(path: Path | None = None) -> dict[str, Any]:
    if path is None:
        text = resources.files(__package__).joinpath("overrides.yaml").read_text("utf-8")
    else:
        text = path.read_text(encoding="utf-8")
    data = yaml.safe_load(text) or {}
    models = data.get("models") or {}
    if not isinstance(models, dict):
        raise ConfigError("overrides.yaml: models: expected a mapping of model names")
    return models


def apply_overrides(
    models: dict[str, ModelPrice], overrides: dict[str, Any], skipped: list[str] | None = None
) -> dict[str, ModelPrice]:
    """Tollway's corrections over the models, and the models it adds. A correction
    (no input price) of a model the map no longer has is left out, and named in skipped."""
    from . import _validated

    result = dict(models)
    raw = {}
    for name, over in overrides.items():
        if not isinstance(over, dict):
            raise ConfigError(f"overrides.yaml: models.{name}: expected a mapping")
        base = result.get(name)
        if base is None and "input" not in over:
            if skipped is not None:
                skipped.append(name)
        elif base is None:
            raw[name] = {**over, "source": "tollway"}
        else:
            merged = _merge(base.model_dump(exclude_none=True), over)
            raw[name] = {**merged, "source": f"{base.source or 'shipped'}, tollway"}
    result.update(_validated(raw, "overrides.yaml"))
    return result


def _plain(value: Any) -> Any:
    """Whole numbers without ".0", the way a person writes prices."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _long_first(value: Any) -> Any:
    """A long-context tier's threshold ahead of its rates."""
    if isinstance(value, dict):
        value = {k: _long_first(v) for k, v in value.items()}
        if "threshold" in value:
            value = {"threshold": value.pop("threshold"), **value}
    return value


def _entry(price: ModelPrice) -> dict[str, Any]:
    data = price.model_dump(exclude_none=True)
    head = {k: data.pop(k) for k in ("provider", "source") if k in data}
    tail = {k: data.pop(k) for k in ("long_context", "service_tiers", "aliases") if k in data}
    if not tail.get("service_tiers"):
        tail.pop("service_tiers", None)
    if not tail.get("aliases"):
        tail.pop("aliases", None)
    entry: dict[str, Any] = _plain(_long_first({**head, **data, **tail}))
    return entry


class _Block(dict[str, Any]):
    """A mapping written in block style (others of scalars only go on one line)."""


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(
    _Block, lambda dumper, data: dumper.represent_mapping("tag:yaml.org,2002:map", data, False)
)


def _model_lines(name: str, price: ModelPrice) -> list[str]:
    text = yaml.dump(
        {name: _Block(_entry(price))},
        Dumper=_Dumper,
        sort_keys=False,
        default_flow_style=None,
        width=100,
        allow_unicode=True,
    )
    return ["  " + line for line in text.splitlines()]


def render(models: dict[str, ModelPrice], today: str, litellm_version: str) -> str:
    lines = [
        "# Tollway's shipped price table: USD per 1M tokens. Generated, do not edit:",
        "# scripts/update-prices (tollway prices --update-from) writes it from LiteLLM's",
        "# model_prices_and_context_window.json and extproc/pricing/overrides.yaml (Tollway's",
        "# corrections, source 'tollway'). Each model's source names the LiteLLM entry.",
        "# Config: pricing.models over this; pricing.table_file for a table of your own.",
        f'last_updated: "{today}"',
        f'litellm_version: "{litellm_version}"',
        "models:",
    ]
    by_section: dict[str, list[str]] = {section: [] for section in _SECTIONS}
    for name in sorted(models):
        by_section.setdefault(models[name].provider or "other", []).append(name)
    for section, names in by_section.items():
        if not names:
            continue
        lines.append(f"  # --- {_SECTIONS.get(section, section)} ---")
        for name in names:
            lines.extend(_model_lines(name, models[name]))
    return "\n".join(lines) + "\n"


def update_table(
    litellm_file: Path,
    output: Path | None = None,
    litellm_version: str = "unknown",
    today: str | None = None,
    overrides: Path | None = None,
    skipped: list[str] | None = None,
) -> dict[str, ModelPrice]:
    """Write the table from a LiteLLM file; the models it wrote."""
    selected = select(load_litellm(litellm_file))
    models = apply_overrides(selected, read_overrides(overrides), skipped)
    text = render(models, today or datetime.date.today().isoformat(), litellm_version)
    target = output or SHIPPED_TABLE
    fd, temp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        os.unlink(temp)
        raise
    return models
