"""Token usage in one shape for every provider, and the base of the per-API readers."""

from __future__ import annotations

import math
from typing import Any

from ..kinds import Usage
from .sse import Event

__all__ = ["Usage", "UsageReader", "count", "estimate_tokens", "service_tier", "text_length"]


def count(value: Any) -> int:
    """A token count from JSON: a non-negative int, anything else (null, "12", 1.5) is 0."""
    return value if type(value) is int and value > 0 else 0


_STANDARD = frozenset({"", "standard", "default", "auto", "on_demand", "unspecified"})
_TIERS = {"flex": "flex", "priority": "priority", "batch": "batch"}


def service_tier(value: Any) -> str:
    """The tier a response says served it, as price tables name tiers: "" (standard),
    flex, priority, batch, or "other" (scale, provisioned throughput, a new one).

    OpenAI says ``service_tier: "flex"``, Anthropic ``usage.service_tier``, Gemini
    ``usageMetadata.serviceTier`` and Vertex AI ``trafficType: ON_DEMAND_FLEX``.
    """
    if not isinstance(value, str):
        return ""
    name = value.lower().removeprefix("service_tier_").removeprefix("traffic_type_")
    name = name.removeprefix("on_demand_") if name != "on_demand" else name
    if name in _STANDARD:
        return ""
    return _TIERS.get(name, "other")


def estimate_tokens(chars: int) -> int:
    """About four characters a token, the providers' own rule of thumb."""
    return math.ceil(chars / 4)


class UsageReader:
    """Reads one response: its model, its usage once reported, the text it delivered.

    Subclasses know one API. ``on_json`` takes a whole JSON response, ``on_event``
    one SSE event; both ignore what they do not recognise: a response without
    usage leaves ``usage`` None.
    """

    def __init__(self) -> None:
        self.model: str | None = None
        self.usage: Usage | None = None
        # Steps priced apart, when a response reports them (Anthropic's iterations):
        # (their model, None for the response's; their usage). They sum to usage.
        self.parts: tuple[tuple[str | None, Usage], ...] = ()
        self.text_chars = 0  # delivered text, for an estimate when usage never comes

    def on_json(self, doc: Any) -> None:
        raise NotImplementedError

    def on_event(self, event: Event, doc: Any) -> None:
        """``doc`` is the event's data parsed as JSON (None if it is not JSON)."""
        raise NotImplementedError

    def _model(self, value: Any) -> None:
        if isinstance(value, str) and value:
            self.model = value


def text_length(value: Any) -> int:
    return len(value) if isinstance(value, str) else 0
