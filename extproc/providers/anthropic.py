"""Anthropic Messages (/v1/messages), JSON and SSE.

Anthropic's ``input_tokens`` *excludes* the tokens read from or written to the
prompt cache (``cache_read_input_tokens``, ``cache_creation_input_tokens``), so
Usage's input is the sum of the three. In a stream, ``message_start`` carries
the model and the input side; ``message_delta`` carries usage that is
*cumulative*: each field it has replaces the earlier value, never adds to it.
Thinking tokens are inside ``output_tokens`` and not reported apart.
"""

from __future__ import annotations

from typing import Any

from .sse import Event
from .usage import Usage, UsageReader, count, text_length

_FIELDS = ("input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


class MessagesReader(UsageReader):
    def __init__(self) -> None:
        super().__init__()
        self._raw: dict[str, int] = {}  # the latest value of each usage field

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
        for name in (*_FIELDS, "output_tokens"):
            if raw.get(name) is not None:  # cumulative: set, never add
                self._raw[name] = count(raw[name])
        if not self._raw:
            return
        cache_read = self._raw.get("cache_read_input_tokens", 0)
        cache_write = self._raw.get("cache_creation_input_tokens", 0)
        self.usage = Usage(
            input_tokens=sum(self._raw.get(name, 0) for name in _FIELDS),
            output_tokens=self._raw.get("output_tokens", 0),
            cached_input_tokens=cache_read,
            cache_creation_tokens=cache_write,
        )


def _content_text(content: Any) -> int:
    total = 0
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict):
            total += text_length(block.get("text")) + text_length(block.get("thinking"))
    return total
