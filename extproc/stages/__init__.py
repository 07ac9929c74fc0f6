"""The stage contract: a stage (one per process) starts a flow per request.

A stage holds what it compiled from config and its backends. For each request
its ``start`` looks at the request headers and returns a denial, nothing (it
is done with this request), or a ``Flow``: that request's state, private to
the stage. The pipeline calls a flow only for the phases it declared in
``wants`` (the response body: only if it asked for a body mode; an SSE body
as events parsed once, see events.py), and calls its
``finish`` exactly once, in reverse order of start, with the request's
``Outcome``. Stages are sans-IO: plain values in, decision values out.
"""

from __future__ import annotations

from typing import Protocol

from ..decisions import Ask, BodyMode, Deny, Outcome, Phase
from ..events import ResponseEvents
from ..exchange import Exchange


class Flow:
    """One request's state for one stage. Override what the stage needs."""

    __slots__ = ()
    wants: Phase = Phase.NONE  # later phases this flow must see
    edits_events: bool = False  # may drop or replace response events (known at response headers)

    def on_request_body(self, ex: Exchange) -> Deny | Ask[Deny | None] | None:
        """The whole request body is in ``ex.body`` (empty when the request has none);
        an Ask when the decision needs a backend first."""
        return None

    def on_response_headers(self, ex: Exchange) -> BodyMode:
        """``ex.status`` and ``ex.response_headers`` are set; how should the body come?"""
        return BodyMode.NONE

    def on_response_body(self, ex: Exchange, chunk: bytes, end: bool) -> bytes | None:
        """Each chunk of a body that is not SSE, in the mode asked for; a replacement or
        None to pass it on."""
        return None

    def on_response_events(self, ex: Exchange, events: ResponseEvents, end: bool) -> None:
        """Each chunk of an SSE body: ``events.new`` are the events it completed (maybe
        none). A flow with ``edits_events`` may drop or replace them."""
        return None

    def finish(self, ex: Exchange, outcome: Outcome) -> None:
        """The request is over for Tollway: called exactly once."""
        return None


class Stage(Protocol):
    def start(self, ex: Exchange) -> Flow | Deny | Ask[Flow | Deny | None] | None:
        """Decide at request headers; a flow if this request needs more of this stage;
        an Ask when the decision needs a backend first (see decisions.Ask)."""
        ...
