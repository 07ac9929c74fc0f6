"""One response body, JSON or SSE, fed in chunks of any size, read into a Reading."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from . import Api, new_reader
from .sse import Event, SSEParser
from .usage import Usage, estimate_tokens

Parsed = tuple[Event, Any]  # an SSE event and its data as JSON (None if not JSON)


@dataclass(frozen=True, slots=True)
class Reading:
    """What one response cost in tokens, and whether the numbers are the provider's own."""

    model: str | None
    usage: Usage
    estimated: bool  # no usage arrived: tokens estimated from the text that was delivered


class ResponseMeter:
    """Feed it the response body as Envoy hands it over; ask for the Reading at the end.

    JSON is kept (up to ``max_json_bytes``) and parsed once at the end; SSE is
    parsed event by event and never kept. ``prompt_chars`` (the request body's
    length, when Tollway read it) feeds the input estimate if usage never comes.
    """

    def __init__(
        self, api: Api, *, sse: bool, max_json_bytes: int = 16 << 20, prompt_chars: int = 0
    ) -> None:
        self.reader = new_reader(api)
        # An event is kept whole until it ends (it may have to be passed on again):
        # the same bound as a JSON body.
        self.sse = SSEParser(max_event_bytes=max_json_bytes) if sse else None
        self._json = bytearray()
        self._max_json = max_json_bytes
        self._prompt_chars = prompt_chars
        self.overflow = False  # a JSON body larger than max_json_bytes was not read

    def feed(self, chunk: bytes) -> list[Parsed]:
        """Take the next chunk; for SSE, return the events it completed."""
        if self.sse is None:
            if not self.overflow:
                if len(self._json) + len(chunk) > self._max_json:
                    self.overflow, self._json = True, bytearray()
                else:
                    self._json += chunk
            return []
        return self._events(self.sse.feed(chunk))

    def close(self) -> list[Parsed]:
        """End of body: for SSE, any event left unterminated."""
        if self.sse is None:
            if self._json:
                self.reader.on_json(_loads(self._json))
                self._json = bytearray()
            return []
        return self._events(self.sse.close())

    def reading(self) -> Reading:
        reader = self.reader
        if reader.usage is not None:
            return Reading(reader.model, reader.usage, estimated=False)
        estimate = Usage(
            input_tokens=estimate_tokens(self._prompt_chars),
            output_tokens=estimate_tokens(reader.text_chars),
        )
        return Reading(reader.model, estimate, estimated=True)

    def _events(self, events: list[Event]) -> list[Parsed]:
        parsed = []
        on_event = self.reader.on_event
        for event in events:
            doc = _loads(event.data) if event.data[:1] in ("{", "[") else None
            on_event(event, doc)
            parsed.append((event, doc))
        return parsed


def _loads(data: bytes | bytearray | str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
