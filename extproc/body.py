"""The request body as one document that stages edit in order (sans-IO).

It is parsed once (every stage reads the same document), edited in place, and
written out once, after the body phase, only if something changed. When every
edit added a top-level member the client did not send, the new members are
spliced in front of the client's own bytes, which stay exactly as sent;
otherwise the document is serialised again.
"""

from __future__ import annotations

from typing import Any

import orjson


class BodyError(ValueError):
    """The request body is not the JSON object this request needs."""


class RequestBody:
    __slots__ = ("_added", "_doc", "_rewritten", "raw", "required")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw  # as the client sent it
        self._doc: dict[str, Any] | None = None
        self._added: dict[str, Any] = {}  # top-level members the client did not send
        self._rewritten = False  # an edit that splicing cannot express
        self.required = False  # an edit the request must not go out without

    def json(self) -> dict[str, Any]:
        """The body parsed once as a JSON object (raises BodyError)."""
        if self._doc is None:
            if not self.raw:
                raise BodyError("the request body is empty; a JSON object is required")
            try:
                parsed = orjson.loads(self.raw)
            except orjson.JSONDecodeError:
                raise BodyError("the request body is not valid JSON") from None
            if not isinstance(parsed, dict):
                raise BodyError("the request body must be a JSON object")
            self._doc = parsed
        return self._doc

    def set(self, name: str, value: Any) -> None:
        """Set a top-level member (the body must be a JSON object)."""
        doc = self.json()
        if name not in doc and name not in self._added:
            self._added[name] = value
        else:
            self._rewritten = True
        doc[name] = value

    def edited(self, required: bool = False) -> None:
        """Say that the document returned by ``json()`` was changed in place;
        ``required``: the request must not go out as sent (a redaction)."""
        self._rewritten = True
        self.required = self.required or required

    def written(self) -> bytes | None:
        """The body to send instead of ``raw``; None when nothing changed or when the
        document cannot be written out again (orjson writes at most 254 levels of
        nesting but reads 1024): the request then goes on as the client sent it,
        unless an edit was ``required`` (the pipeline refuses it then)."""
        if self._doc is None:  # never parsed, so never edited
            return None
        if self._rewritten:
            try:
                return orjson.dumps(self._doc)
            except orjson.JSONEncodeError:
                return None
        if not self._added:
            return None
        if len(self._doc) == len(self._added):  # "{}" as sent: nothing to splice before
            return orjson.dumps(self._doc)
        members = b"".join(orjson.dumps({k: v})[1:-1] + b"," for k, v in self._added.items())
        start = self.raw.index(b"{") + 1
        return self.raw[:start] + members + self.raw[start:]
