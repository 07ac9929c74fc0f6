"""An incremental Server-Sent Events parser: bytes in any split, events out.

Follows the WHATWG event-stream rules: lines end in LF, CRLF or CR; ``:`` starts
a comment; ``data`` lines of one event are joined with LF; a blank line
dispatches. Chunks may split anywhere, inside a UTF-8 character or between CR
and LF, since lines are only decoded once complete. Memory is bounded: only
the unfinished line and the unfinished event's data are kept, each at most
``max_event_bytes``; a larger event is dropped and counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True, slots=True)
class Event:
    type: str  # "message" unless the event set one
    data: str


Parsed = tuple[Event, Any]  # an event and its data as JSON (None if it is not JSON)


class SSEParser:
    __slots__ = (
        "_data",
        "_discarding",
        "_long_line",
        "_max",
        "_size",
        "_skip_lf",
        "_start",
        "_tail",
        "_type",
        "dropped_events",
    )

    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self._max = max_event_bytes
        self._tail = b""  # the unfinished last line
        self._skip_lf = False  # the previous chunk ended in CR: a leading LF is part of it
        self._start = True  # a BOM may open the stream
        self._data: list[bytes] = []
        self._size = 0
        self._type = b""
        self._discarding = False  # the current event outgrew the limit
        self._long_line = False  # inside a line that outgrew it: skip to its end
        self.dropped_events = 0

    @property
    def at_boundary(self) -> bool:
        """Nothing of an unfinished event is held: what was fed so far ended with an event."""
        return not (self._tail or self._data or self._type or self._discarding or self._long_line)

    def feed(self, chunk: bytes) -> list[Event]:
        if self._skip_lf:
            self._skip_lf = False
            if chunk.startswith(b"\n"):
                chunk = chunk[1:]
        buf = self._tail + chunk if self._tail else chunk
        if b"\r" in buf:
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[Event] = []
        if self._long_line:
            end = buf.find(b"\n")
            if end < 0:
                return events
            buf, self._long_line = buf[end + 1 :], False
        lines = buf.split(b"\n")
        self._tail = lines.pop()
        if len(self._tail) > self._max:
            self._tail, self._long_line = b"", True
            self._discard()
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[Event]:
        """End of stream. Unlike a browser, dispatch an event left without its blank line:
        some servers end the stream right after the last (usage-bearing) event."""
        events: list[Event] = []
        if self._tail:
            self._line(self._tail, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[Event]) -> None:
        if self._start:
            self._start = False
            line = line.removeprefix(_BOM)
        if not line:
            if self._data and not self._discarding:
                data = b"\n".join(self._data).decode("utf-8", "replace")
                events.append(Event(self._type.decode("utf-8", "replace") or "message", data))
            self._data, self._size, self._type, self._discarding = [], 0, b"", False
            return
        if line[0] == 0x3A:  # ":" comment, e.g. a keep-alive
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._size += len(value) + 1
            if self._size > self._max:
                self._discard()
            elif not self._discarding:
                self._data.append(value)
        elif name == b"event":
            self._type = value
        # "id" and "retry" do not matter to metering.

    def _discard(self) -> None:
        if not self._discarding:
            self.dropped_events += 1
        self._discarding = True
        self._data, self._size = [], 0
