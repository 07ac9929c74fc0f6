"""Sans-IO stages: each looks at an Exchange and returns a decision value."""

from __future__ import annotations

from typing import Protocol

from ..decisions import BodyMode, Deny, Phase
from ..exchange import Exchange


class Stage(Protocol):
    def on_request_headers(self, ex: Exchange) -> Deny | Phase:
        """Decide at request headers; return the later phases this stage needs."""
        ...

    def on_request_body(self, ex: Exchange) -> Deny | None:
        """Decide on the buffered request body (only if some stage asked for it)."""
        ...


class ResponseStage(Protocol):
    def on_response_headers(self, ex: Exchange) -> BodyMode:
        """``ex.status`` and ``ex.response_headers`` are set; how should the body come?"""
        ...

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        """Each chunk as asked for; return a replacement or None."""
        ...

    def on_stream_end(self, ex: Exchange) -> None:
        """The ext_proc stream is over, finished or not (client gone, upstream cut)."""
        ...
