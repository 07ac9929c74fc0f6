"""Runs the stages phase by phase; the first denial wins."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from .decisions import Deny, Phase
from .exchange import Exchange
from .routes import RouteTable
from .stages import Stage

INTERNAL_HEADER_PREFIX = "x-tollway-"

_NO_ROUTE = Deny(
    404, "invalid_request_error", "unknown_url", "Unknown request URL.", "tollway_no_route"
)


class Pipeline:
    def __init__(
        self,
        routes: RouteTable,
        stages: Sequence[Stage],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.routes = routes
        self.stages = tuple(stages)
        self.clock = clock

    def exchange(
        self, method: str, path: str, headers: dict[str, str], repeated: frozenset[str]
    ) -> Exchange:
        path, _, query = path.partition("?")
        return Exchange(
            method, path, query, headers, repeated, self.routes.match(path), self.clock()
        )

    def request_headers(self, ex: Exchange) -> Deny | Phase:
        # Clients must not be able to forge headers that upstreams trust.
        for name in ex.headers:
            if name.startswith(INTERNAL_HEADER_PREFIX):
                ex.remove_headers.add(name)
        if ex.route is None:
            return _NO_ROUTE
        ex.metadata["route"] = ex.route.name
        wants = Phase.NONE
        for stage in self.stages:
            decision = stage.on_request_headers(ex)
            if isinstance(decision, Deny):
                return decision
            wants |= decision
        return wants

    def request_body(self, ex: Exchange, body: bytes) -> Deny | None:
        ex.body = body
        for stage in self.stages:
            decision = stage.on_request_body(ex)
            if decision is not None:
                return decision
        return None
