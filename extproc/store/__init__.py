"""Where state lives: the Store protocol and the usage records written to it.

The embedded default is memory.MemoryStore (one replica). Recording usage is
fire-and-forget from the request's point of view: a store that does I/O
queues the record and writes it off the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from ..providers.usage import Usage


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request, as budgets and spend reports need it."""

    at: float  # wall clock, seconds since the epoch, when the response ended
    key_id: str | None  # None on a route with auth off
    tenant: str | None
    route: str
    provider: str
    api: str
    model: str | None  # as the upstream named it (else as requested)
    usage: Usage
    cost_usd: float
    estimated: bool  # usage never arrived: estimated from the delivered text
    priced: bool  # the model was in the price table


class Store(Protocol):
    def record_usage(self, record: UsageRecord) -> None:
        """Never blocks: a store that does I/O queues the record for its writer task."""
        ...

    async def aclose(self) -> None:
        """Write what is queued (``serve`` awaits this on shutdown)."""
        ...


class StoreObserver(Protocol):
    """What a backend that does I/O reports (metrics.StoreMetrics implements it).
    ``op`` is take | settle | usage."""

    def latency(self, op: str, seconds: float) -> None: ...
    def error(self, op: str, reason: Literal["timeout", "error", "breaker_open"]) -> None: ...
    def breaker_open(self, is_open: bool) -> None: ...
    def settlement_dropped(self, reason: Literal["queue_full", "failed", "shutdown"]) -> None: ...


class _NoObserver:
    def latency(self, op: str, seconds: float) -> None:
        pass

    def error(self, op: str, reason: Literal["timeout", "error", "breaker_open"]) -> None:
        pass

    def breaker_open(self, is_open: bool) -> None:
        pass

    def settlement_dropped(self, reason: Literal["queue_full", "failed", "shutdown"]) -> None:
        pass


NO_OBSERVER: StoreObserver = _NoObserver()
