"""The embedded store: state in this process's memory, for a single replica."""

from __future__ import annotations

from collections import defaultdict

from . import UsageRecord


class MemoryStore:
    def __init__(self) -> None:
        self.spend_by_key: defaultdict[str, float] = defaultdict(float)
        self.spend_by_tenant: defaultdict[str, float] = defaultdict(float)
        self.records = 0

    def record_usage(self, record: UsageRecord) -> None:
        self.records += 1
        if record.key_id is not None:
            self.spend_by_key[record.key_id] += record.cost_usd
        if record.tenant is not None:
            self.spend_by_tenant[record.tenant] += record.cost_usd

    async def aclose(self) -> None:
        pass  # nothing queued: records are applied as they come
