"""Anthropic Messages (/v1/messages), JSON and SSE.

Anthropic's ``input_tokens`` *excludes* the tokens read from or written to the
prompt cache (``cache_read_input_tokens``, ``cache_creation_input_tokens``), so
Usage's input is the sum of the three. ``cache_creation`` splits the writes by
lifetime (5 minutes, 1 hour: priced apart); ``output_tokens_details.thinking_tokens``
is the reasoning inside ``output_tokens``; ``service_tier`` and ``speed`` say
how it was served.

``iterations`` lists every sampling step of the request when there was more
than one kind: the answer's own (``message``, whose sum is the top-level
usage), a compaction's (``compaction``: billed, and *not* in the top level),
an advisor's (``advisor_message``, billed at the advisor's ``model``) and a
fallback model's (``fallback_message``, in place of a message). When it is
there, the request is the sum of its iterations, each priced on its own (the
long-context threshold applies per iteration).

In a stream, ``message_start`` carries the model and the input side;
``message_delta`` carries usage that is *cumulative*: each field it has
replaces the earlier value, never adds to it.
"""

from __future__ import annotations

from typing import Any

from ..kinds import add_usage
from .sse import Event
from .usage import Usage, UsageReader, count, service_tier, text_length

_INPUT = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
# Iterations the top-level usage already counts: the answer's own sampling steps.
_IN_TOP_LEVEL = frozenset({"message", "fallback_message"})


def _tokens(raw: dict[str, Any], tier: str) -> Usage:
    """One usage object (top level or an iteration) as Usage."""
    lifetimes = raw.get("cache_creation")
    written_1h = lifetimes.get("ephemeral_1h_input_tokens") if isinstance(lifetimes, dict) else 0
    details = raw.get("output_tokens_details")
    thinking = details.get("thinking_tokens") if isinstance(details, dict) else 0
    return Usage(
        input_tokens=sum(count(raw.get(name)) for name in _INPUT),
        output_tokens=count(raw.get("output_tokens")),
        cached_input_tokens=count(raw.get("cache_read_input_tokens")),
        cache_creation_tokens=count(raw.get("cache_creation_input_tokens")),
        cache_creation_1h_tokens=count(written_1h),
        reasoning_tokens=count(thinking),
        service_tier=tier,
    )


def _tier(raw: dict[str, Any]) -> str:
    if raw.get("speed") == "fast":  # fast mode: a premium the price table has no tier for
        return "fast"
    return service_tier(raw.get("service_tier"))


class MessagesReader(UsageReader):
    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, Any] = {}  # the latest value of each usage field

    def on_json(self, doc: Any) -> None:
        if isinstance(doc, dict) and doc.get("type", "message") == "message":
            self._model(doc.get("model"))
            self.text_chars += _content_text(doc.get("content"))
            self._update(doc.get("usage"))

    def on_event(self, event: Event, doc: Any) -> None:
        if not isinstance(doc, dict):
            return
        kind = doc.get("type", event.type)
        if kind == "content_block_delta":
            delta = doc.get("delta")
            if isinstance(delta, dict):
                self.text_chars += text_length(delta.get("text"))
                self.text_chars += text_length(delta.get("thinking"))
                self.text_chars += text_length(delta.get("partial_json"))
        elif kind == "message_start" and isinstance(doc.get("message"), dict):
            message = doc["message"]
            self._model(message.get("model"))
            self._update(message.get("usage"))
        elif kind == "message_delta":
            self._update(doc.get("usage"))

    def _update(self, raw: Any) -> None:
        if not isinstance(raw, dict):
            return
        for name, value in raw.items():
            if value is not None:  # cumulative: set, never add
                self._raw[name] = value
        if not any(name in self._raw for name in (*_INPUT, "output_tokens")):
            return
        tier = _tier(self._raw)
        top = _tokens(self._raw, tier)
        iterations = self._raw.get("iterations")
        if not isinstance(iterations, list) or not iterations:
            self.usage, self.parts = top, ()
            return
        parts: list[tuple[str | None, Usage]] = []
        answered = False
        for step in iterations:
            if isinstance(step, dict):
                model = step.get("model")
                parts.append(
                    (model if isinstance(model, str) and model else None, _tokens(step, tier))
                )
                answered = answered or step.get("type") in _IN_TOP_LEVEL
        if not answered:  # only the extra steps are listed: the answer is the top level
            parts.append((None, top))
        total = parts[0][1]
        for _, part in parts[1:]:
            total = add_usage(total, part)
        total.reasoning_tokens = top.reasoning_tokens  # reported for the whole request only
        self.usage, self.parts = total, tuple(parts)


def _content_text(content: Any) -> int:
    total = 0
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            total += text_length(block.get("text")) + text_length(block.get("thinking"))
    return total
