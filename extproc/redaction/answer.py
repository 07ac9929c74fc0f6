"""An answer's text, redacted and restored as it streams (sans-IO).

Two jobs, both optional: redact what the model wrote (``responses``), and put
the originals back for the request's placeholders (``restore``), in that order
(a restored value is the client's own and is not redacted again).

Streamed text comes in pieces that can split an entity (or a placeholder)
anywhere. Each text stream (a choice, a content block) therefore holds back
its last ``WINDOW`` characters, and more while they end inside a run of
non-space characters (a key or a token still being written, up to
``MAX_HELD``); the held text goes out with the next piece, or when the stream
ends. Detection sees ``CONTEXT`` characters already sent, so a context word
("SSN", "phone") sent earlier still counts. An entity longer than the window
that contains spaces (a PEM block) can be missed in a stream; it is found in
a JSON answer, which is read whole. Time to first token grows by the time the
model takes to write ``WINDOW`` characters (about 12 tokens).
"""

from __future__ import annotations

import re

from ..providers.texts import Stream
from .findings import Finding
from .policy import Rewrite

WINDOW = 48  # the longest spaced entity: an IBAN in groups of four, 42 characters
CONTEXT = 64
MAX_HELD = 4096

_PLACEHOLDER = re.compile(r"\[[A-Z][A-Z0-9_]*_[0-9]+\]")
_OPEN_PLACEHOLDER = re.compile(r"\[[A-Z0-9_]{0,48}\Z")  # may still become one


class AnswerText:
    __slots__ = ("_context", "_held", "_originals", "redact", "restore", "rewrite")

    def __init__(self, rewrite: Rewrite, redact: bool, restore: bool) -> None:
        self.rewrite = rewrite
        self.redact = redact
        # The request's placeholders only: one made for the answer stays.
        self._originals = dict(rewrite.originals) if restore else {}
        self.restore = bool(self._originals)
        self._held: dict[Stream, str] = {}
        self._context: dict[Stream, str] = {}  # the end of what each stream sent

    @property
    def active(self) -> bool:
        return self.redact or self.restore

    def whole(self, text: str) -> str:
        """A text that is complete (a JSON answer's, a "done" event's)."""
        if self.redact:
            findings = self.rewrite.policy.detector.find(text)
            if findings:
                text = self.rewrite.apply(text, findings)
        return self._restored(text)

    def piece(self, stream: Stream, text: str, last: bool = False) -> str:
        """What to send of the stream now, given its next piece."""
        held = self._held.pop(stream, "")
        context = self._context.get(stream, "")
        buffer = context + held + text
        start = len(context)
        findings: list[Finding] = []
        if self.redact:
            findings = [f for f in self.rewrite.policy.detector.find(buffer) if f.start >= start]
        cut = len(buffer) if last else self._cut(buffer, start, findings)
        out = buffer[start:cut]
        if cut < len(buffer):
            self._held[stream] = buffer[cut:]
        self._context[stream] = (context + out)[-CONTEXT:]
        inside = [
            Finding(f.start - start, f.end - start, f.entity, f.kind)
            for f in findings
            if f.end <= cut
        ]
        if inside:
            out = self.rewrite.apply(out, inside)
        return self._restored(out)

    def flush(self, stream: Stream) -> str:
        """The text held back of a stream that ended, to send now."""
        return self.piece(stream, "", last=True) if stream in self._held else ""

    def streams_held(self) -> list[Stream]:
        return list(self._held)

    def _cut(self, buffer: str, start: int, findings: list[Finding]) -> int:
        cut = max(start, len(buffer) - WINDOW) if self.redact else len(buffer)
        if self.redact and start < cut < len(buffer) and not buffer[cut].isspace():
            # Inside a run of non-space characters: hold all of it, if it is not too long.
            floor = max(start, cut - MAX_HELD)
            space = max(buffer.rfind(c, floor, cut) for c in " \n\t\r")
            if space >= 0:
                cut = space + 1
            elif floor == start:
                cut = start
        for f in findings:  # never send part of an entity
            if f.start < cut < f.end:
                cut = f.start
        if self.restore:
            open_ = _OPEN_PLACEHOLDER.search(buffer, max(start, cut - 50), cut)
            if open_ is not None:
                cut = open_.start()
        return cut

    def _restored(self, text: str) -> str:
        if not self.restore or "[" not in text:
            return text
        originals = self._originals
        return _PLACEHOLDER.sub(lambda m: originals.get(m[0], m[0]), text)
