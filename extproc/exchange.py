"""One HTTP request as the stages see it: plain values, no protobuf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .body import BodyError, RequestBody
from .decisions import Outcome
from .events import ResponseEvents
from .kinds import Dialect, Usage
from .routes import Call, Route, dialect_of, route_dialect

if TYPE_CHECKING:
    from .keys import KeyRecord

__all__ = ["BodyError", "Exchange", "MetadataValue"]

MetadataValue = str | int | float | bool


@dataclass(slots=True)
class Exchange:
    method: str
    path: str  # without the query string
    query: str
    headers: dict[str, str]  # lower-case names; repeated headers joined with ","
    repeated: frozenset[str]  # names that appeared more than once
    call: Call | None  # the route and what the request calls there; None: no route
    now: float  # wall clock, seconds since the epoch
    identity: KeyRecord | None = None
    # What Envoy verified: jwt_authn's claims (by provider) or why a token failed
    # ("failed:PROVIDER"), and the SANs of a front-door client certificate.
    jwt: dict[str, Any] = field(default_factory=dict)
    peer_names: tuple[str, ...] = ()
    # Edits for the upstream request, applied by the codec.
    set_headers: dict[str, str] = field(default_factory=dict)
    remove_headers: set[str] = field(default_factory=set)
    # Dynamic metadata for Envoy's access log (namespace "tollway").
    metadata: dict[str, MetadataValue] = field(default_factory=dict)
    body: bytes | None = None  # as the client sent it
    # The body as one document that stages edit in order (see body.py), and what it
    # became: written once after the body phase (the codec sets its content-length).
    document: RequestBody | None = None
    new_body: bytes | None = None
    # The response, once its headers arrive, and headers to add for the client.
    status: int = 0
    response_headers: dict[str, str] = field(default_factory=dict)
    set_response_headers: dict[str, str] = field(default_factory=dict)
    remove_response_headers: set[str] = field(default_factory=set)
    # An SSE response's events, parsed once for every flow (see events.py).
    events: ResponseEvents | None = None
    # The usage metering read from the response, published at finish (budgets read it).
    usage: Usage | None = None
    usage_estimated: bool = False
    cost_usd: float | None = None  # what that usage cost (None: not metered)
    outcome: Outcome | None = None  # set once, when the request is over for Tollway

    @property
    def route(self) -> Route | None:
        return self.call.route if self.call is not None else None

    @property
    def dialect(self) -> Dialect:
        """The error shape this client understands: its route's, or what it speaks."""
        if self.call is not None:
            return route_dialect(self.call.route.api)
        return dialect_of(self.path, self.headers, self.query)

    def json(self) -> dict[str, Any]:
        """The request body parsed once as a JSON object (raises BodyError)."""
        if self.document is None:
            self.document = RequestBody(self.body or b"")
        return self.document.json()
