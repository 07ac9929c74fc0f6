"""The embedded store: spend adds up per key and per tenant."""

from __future__ import annotations

from extproc.providers import Usage
from extproc.store import UsageRecord
from extproc.store.memory import MemoryStore


def record(key_id: str | None, tenant: str | None, cost_usd: float) -> UsageRecord:
    return UsageRecord(
        at=0.0,
        key_id=key_id,
        tenant=tenant,
        route="openai",
        provider="openai",
        api="chat",
        model="gpt-4o",
        usage=Usage(10, 5),
        cost_usd=cost_usd,
        estimated=False,
        priced=True,
    )


def test_spend_adds_up_by_key_and_tenant() -> None:
    store = MemoryStore()
    store.record_usage(record("k1", "acme", 0.25))
    store.record_usage(record("k2", "acme", 0.5))
    store.record_usage(record("k1", "acme", 0.125))
    store.record_usage(record(None, None, 9.0))  # a route with auth off: nobody to charge
    assert dict(store.spend_by_key) == {"k1": 0.375, "k2": 0.5}
    assert dict(store.spend_by_tenant) == {"acme": 0.875}
    assert store.records == 4
