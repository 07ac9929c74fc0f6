"""One SSE response, parsed once for every flow and re-emitted by one writer.

The pipeline makes one for a ``text/event-stream`` response that some flow
reads (``Exchange.events``). Each chunk is parsed once into events, each with
its data parsed as JSON; every flow reads the same events, and a flow that
declared ``edits_events`` may drop an event, replace its data, or put a new
event before it. The writer then decides what the client gets: the chunk
exactly as it came when nothing was edited and the chunk ended on an event
boundary, else the complete events written out again, without the dropped
ones. While an editing flow is present, an unfinished event is held back
until it is complete: it may still have to go.
"""

from __future__ import annotations

from typing import Any

import orjson

from .providers.sse import Event, Parsed, SSEParser


class ResponseEvents:
    __slots__ = ("_edits", "_inserts", "_parser", "_whole_before", "closed", "editable", "new")

    def __init__(self, max_event_bytes: int) -> None:
        # An event is kept whole until it ends (it may have to be written out again).
        self._parser = SSEParser(max_event_bytes=max_event_bytes)
        self.editable = False  # set once the flows that read the body are known
        self.new: list[Parsed] = []  # the events the last chunk completed
        self.closed = False
        self._edits: dict[int, str | None] | None = None  # id(event) -> new data, None: dropped
        self._inserts: dict[int, list[Event]] = {}  # id(event) -> events to write before it
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
        self._inserts = {}
        self.new = [(e, _loads(e.data) if e.data[:1] in ("{", "[") else None) for e in events]
        return self.new

    def drop(self, event: Event) -> None:
        """This event of the last chunk does not reach the client."""
        self._edit(event, None)

    def replace(self, event: Event, data: str) -> None:
        """The client gets this event of the last chunk with ``data`` instead."""
        self._edit(event, data)

    def insert_before(self, event: Event, new: Event) -> None:
        """The client gets ``new`` just before this event of the last chunk."""
        if not self.editable:
            raise RuntimeError("a flow edited events without declaring edits_events")
        self._inserts.setdefault(id(event), []).append(new)

    def write(self) -> bytes | None:
        """What the client gets for the last chunk; None: the chunk as it came."""
        if not self.editable:
            return None
        unedited = self._edits is None and not self._inserts
        if unedited and self._whole_before and self._parser.at_boundary:
            return None
        edits = self._edits or {}
        out: list[str] = []
        for event, _ in self.new:
            for new in self._inserts.get(id(event), ()):
                _write(out, new.type, new.data)
            data = edits.get(id(event), event.data)
            if data is not None:
                _write(out, event.type, data)
        return "".join(out).encode()

    def _edit(self, event: Event, data: str | None) -> None:
        if not self.editable:
            raise RuntimeError("a flow edited events without declaring edits_events")
        if self._edits is None:
            self._edits = {}
        self._edits[id(event)] = data


def _write(out: list[str], kind: str, data: str) -> None:
    if kind != "message":
        out.append(f"event: {kind}\n")
    out.extend(f"data: {line}\n" for line in data.split("\n"))
    out.append("\n")


def _loads(data: str) -> Any:
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
