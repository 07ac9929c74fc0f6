"""One response body read into a Reading: JSON fed in chunks of any size, or SSE events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson

from . import Api, new_reader
from .sse import Parsed
from .usage import Usage, estimate_tokens


@dataclass(frozen=True, slots=True)
class Reading:
    """What one response cost in tokens, and whether the numbers are the provider's own."""

    model: str | None
    usage: Usage
    estimated: bool  # no usage arrived: tokens estimated from the text that was delivered
    # Steps priced apart (their model, None for the response's; their usage), summing
    # to usage; empty when the whole usage is one step.
    parts: tuple[tuple[str | None, Usage], ...] = ()


class ResponseMeter:
    """Feed it the response as it arrives; ask for the Reading at the end.

    JSON is kept (up to ``max_json_bytes``) and parsed once at the end; SSE
    comes as events parsed once by the pipeline (events.ResponseEvents) and is
    never kept. ``prompt_chars`` (the request body's length, when Tollway read
    it) feeds the input estimate if usage never comes.
    """

    def __init__(self, api: Api, *, max_json_bytes: int = 16 << 20, prompt_chars: int = 0) -> None:
        self.reader = new_reader(api)
        self._json = bytearray()
        self._max_json = max_json_bytes
        self._prompt_chars = prompt_chars
        self.overflow = False  # a JSON body larger than max_json_bytes was not read

    def feed(self, chunk: bytes) -> None:
        """The next chunk of a JSON body."""
        if not self.overflow:
            if len(self._json) + len(chunk) > self._max_json:
                self.overflow, self._json = True, bytearray()
            else:
                self._json += chunk

    def close(self) -> None:
        """End of a JSON body: read it."""
        if self._json:
            self.reader.on_json(_loads(self._json))
            self._json = bytearray()

    def on_events(self, events: Iterable[Parsed]) -> None:
        on_event = self.reader.on_event
        for event, doc in events:
            on_event(event, doc)

    def reading(self) -> Reading:
        reader = self.reader
        if reader.usage is not None:
            return Reading(reader.model, reader.usage, estimated=False, parts=reader.parts)
        estimate = Usage(
            input_tokens=estimate_tokens(self._prompt_chars),
            output_tokens=estimate_tokens(reader.text_chars),
        )
        return Reading(reader.model, estimate, estimated=True)


def _loads(data: bytes | bytearray) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
