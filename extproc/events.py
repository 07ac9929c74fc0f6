"""One SSE response, parsed once for every flow and re-emitted by one writer.

The pipeline makes one for a ``text/event-stream`` response that some flow
reads (``Exchange.events``). Each chunk is parsed once into events, each with
its data parsed as JSON; every flow reads the same events, and a flow that
declared ``edits_events`` may drop an event or replace its data. The writer
then decides what the client gets: the chunk exactly as it came when nothing
was edited and the chunk ended on an event boundary, else the complete events
written out again, without the dropped ones. While an editing flow is
present, an unfinished event is held back until it is complete: it may still
have to go.
"""

from __future__ import annotations

from typing import Any

import orjson

from .providers.sse import Event, Parsed, SSEParser


class ResponseEvents:
    __slots__ = ("_edits", "_parser", "_whole_before", "closed", "editable", "new")

    def __init__(self, max_event_bytes: int) -> None:
        # An event is kept whole until it ends (it may have to be written out again).
        self._parser = SSEParser(max_event_bytes=max_event_bytes)
        self.editable = False  # set once the flows that read the body are known
        self.new: list[Parsed] = []  # the events the last chunk completed
        self.closed = False
        self._edits: dict[int, str | None] | None = None  # id(event) -> new data, None: dropped
        self._whole_before = True

    @property
    def dropped_events(self) -> int:
        """Events too large to keep: not read, and not passed on when editing."""
        return self._parser.dropped_events

    def feed(self, chunk: bytes, end: bool) -> list[Parsed]:
        """Parse the next chunk; ``end`` also completes an event left unterminated."""
        parser = self._parser
        self._whole_before = parser.at_boundary
        events = parser.feed(chunk)
        if end:
            events += parser.close()
            self.closed = True
        self._edits = None
        self.new = [(e, _loads(e.data) if e.data[:1] in ("{", "[") else None) for e in events]
        return self.new

    def drop(self, event: Event) -> None:
        """This event of the last chunk does not reach the client."""
        self._edit(event, None)

    def replace(self, event: Event, data: str) -> None:
        """The client gets this event of the last chunk with ``data`` instead."""
        self._edit(event, data)

    def write(self) -> bytes | None:
        """What the client gets for the last chunk; None: the chunk as it came."""
        if not self.editable:
            return None
        if self._edits is None and self._whole_before and self._parser.at_boundary:
            return None
        edits = self._edits or {}
        out: list[str] = []
        for event, _ in self.new:
            data = edits.get(id(event), event.data)
            if data is None:
                continue
            if event.type != "message":
                out.append(f"event: {event.type}\n")
            out.extend(f"data: {line}\n" for line in data.split("\n"))
            out.append("\n")
        return "".join(out).encode()

    def _edit(self, event: Event, data: str | None) -> None:
        if not self.editable:
            raise RuntimeError("a flow edited events without declaring edits_events")
        if self._edits is None:
            self._edits = {}
        self._edits[id(event)] = data


def _loads(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
