"""The embedded quota backend: one replica, plain dicts, answers inline.

Same algorithms and answers as Redis (quota.py is the oracle). Each call is
O(counters) plus a few steps of an incremental sweep of expired entries, so
memory stays bounded without a timer.

Budget counters survive a restart: they are written to a small JSON file
(``{"version": 1, "budgets": {key: [used_micro_usd, expires_at]}}``) off the
hot path — from a background task at most every ``persist_every_s`` when
something changed, and on ``aclose`` — atomically (a temporary file in the
same folder, mode 0600, fsync, rename), and read back at start. Rates,
leases and reservations start afresh (an in-flight request did not survive
the restart either; what it reserved stays charged, the safe side).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from ..files import write_atomically
from .quota import (
    BUDGET_KEEP_S,
    NOT_TAKEN,
    RESERVATION_TTL_S,
    Check,
    Counter,
    Level,
    Settle,
    Take,
    Verdict,
    budget_check,
    concurrent_check,
    rate_check,
    rate_settle,
    reserved_amounts,
    verdict,
)

log = logging.getLogger("tollway")

# Tables in the expiry heap.
_RATE, _LEASES, _BUDGET = range(3)
_FORMAT_VERSION = 1


class MemoryQuota:
    def __init__(
        self,
        path: Path | None = None,
        *,
        persist_every_s: float = 5.0,
        settled_ttl_s: float = 60.0,
        reservation_ttl_s: float = RESERVATION_TTL_S,
        sweep_per_call: int = 4,
    ) -> None:
        self.path = path
        self.persist_every_s = persist_every_s
        self.settled_ttl_s = settled_ttl_s
        self.reservation_ttl_s = reservation_ttl_s
        self.sweep_per_call = sweep_per_call
        self._tat: dict[str, float] = {}
        self._leases: dict[str, dict[str, float]] = {}  # request id -> expiry, oldest first
        self._budget: dict[str, tuple[int, float]] = {}  # (used, expires_at)
        # Per request, oldest first (one TTL each, so expiry order is insertion order):
        # request id -> (expires_at, reserved per counter), and -> (expires_at, None) once
        # settled (the mark).
        self._reserved: dict[str, tuple[float, tuple[int, ...]]] = {}
        self._settled: dict[str, tuple[float, None]] = {}
        # (expires_at, table, key) pushed when an entry is created; re-pushed if it lived on.
        self._heap: list[tuple[float, int, str]] = []
        self._dirty = False
        self._persister: asyncio.Task[None] | None = None
        if path is not None:
            self._load(path)

    # The Quota protocol ---------------------------------------------------------

    def take(self, take: Take) -> Verdict:
        now = take.now
        self._sweep(now)
        checks = [self._check(c, now) for c in take.counters]
        answer, consume = verdict(take.counters, checks)
        if not answer.allowed:
            return answer
        for counter, check, took in zip(take.counters, checks, consume, strict=True):
            if took:
                self._consume(counter, check, take.request_id, now)
        self._reserved[take.request_id] = (
            now + self.reservation_ttl_s,
            reserved_amounts(take.counters, consume),
        )
        return answer

    def settle(self, settle: Settle) -> None:
        now = settle.now
        self._sweep(now)
        rid = settle.request_id
        mark = self._settled.get(rid)
        if mark is not None and mark[0] > now:
            return  # settled already
        record = self._reserved.pop(rid, None)
        reserved: tuple[int, ...] = (0,) * len(settle.counters)  # no take on record: all
        if record is not None and record[0] > now:  # an expired one: as if never recorded
            reserved = record[1]
        for counter, actual, held in zip(settle.counters, settle.actual, reserved, strict=True):
            if counter.kind == "concurrent":
                leases = self._leases.get(counter.key)
                if leases is not None:
                    leases.pop(rid, None)
                continue
            if held == NOT_TAKEN:
                continue
            delta = actual - held
            if delta == 0:
                continue
            if counter.kind == "rate":
                tat = rate_settle(
                    counter.limit, counter.period_s, delta, now, self._tat.get(counter.key)
                )
                if tat > now:
                    self._put(_RATE, self._tat, counter.key, tat, tat)
                else:
                    self._tat.pop(counter.key, None)
            else:
                used = self._budget.get(counter.key, (0, 0.0))[0]
                expires = counter.window_end + BUDGET_KEEP_S
                self._put(
                    _BUDGET, self._budget, counter.key, (max(0, used + delta), expires), expires
                )
                self._budget_changed()
        self._settled.pop(rid, None)  # its mark moves to the end: the order is expiry order
        self._settled[rid] = (now + self.settled_ttl_s, None)

    def usage(self, counters: Sequence[Counter], now: float) -> tuple[Level, ...]:
        levels = []
        for counter in counters:
            check = self._check(counter, now)
            if counter.kind == "budget":
                used = self._budget.get(counter.key, (0, 0.0))[0]
            elif counter.kind == "concurrent":
                used = len(self._leases.get(counter.key, ()))
            else:
                used = max(0, counter.limit - check.remaining_if_not)
            levels.append(Level(used, check.remaining_if_not, check.reset_if_not))
        return tuple(levels)

    async def aclose(self) -> None:
        if self._persister is not None:
            self._persister.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._persister
            self._persister = None
        if self._dirty:
            await asyncio.to_thread(self.save)

    # Persistence --------------------------------------------------------------

    def save(self) -> None:
        """Write the budget counters now (atomically); aclose and the background task call it."""
        if self.path is None:
            return
        self._dirty = False
        try:
            write_atomically(self.path, self._snapshot())
        except OSError:
            self._dirty = True  # try again next time
            raise

    def _budget_changed(self) -> None:
        self._dirty = True
        if self.path is None or self._persister is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # used without a loop: saved by save() / aclose only
            return
        self._persister = loop.create_task(self._persist_every())

    async def _persist_every(self) -> None:
        while True:
            await asyncio.sleep(self.persist_every_s)
            if not self._dirty:
                continue
            try:
                # The snapshot is taken on the loop; only the file I/O runs in a thread.
                payload = self._snapshot()
                self._dirty = False
                assert self.path is not None
                await asyncio.to_thread(write_atomically, self.path, payload)
            except OSError:
                self._dirty = True
                log.exception("could not save budget counters (will retry)")

    def _snapshot(self) -> bytes:
        budgets = {key: [used, expires] for key, (used, expires) in self._budget.items()}
        return orjson.dumps({"version": _FORMAT_VERSION, "budgets": budgets})

    def _load(self, path: Path) -> None:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return
        try:
            data = orjson.loads(raw)
            if data.get("version") != _FORMAT_VERSION:
                raise ValueError(f"unknown version {data.get('version')!r}")
            for key, (used, expires) in data["budgets"].items():
                self._put(_BUDGET, self._budget, key, (int(used), float(expires)), float(expires))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            # Refuse to start rather than forget what was spent.
            raise ValueError(f"{path}: not a Tollway budget file ({e})") from e

    # Internals ----------------------------------------------------------------

    def _check(self, counter: Counter, now: float) -> Check:
        if counter.kind == "rate":
            return rate_check(
                counter.limit, counter.period_s, counter.amount, now, self._tat.get(counter.key)
            )
        if counter.kind == "budget":
            used = self._budget.get(counter.key, (0, 0.0))[0]
            return budget_check(counter.limit, counter.window_end, counter.amount, now, used)
        leases = self._live_leases(counter.key, now)
        if not leases:
            return concurrent_check(counter.limit, counter.period_s, 0, 0.0, 0.0, now)
        earliest = next(iter(leases.values()))
        latest = next(reversed(leases.values()))
        return concurrent_check(counter.limit, counter.period_s, len(leases), earliest, latest, now)

    def _live_leases(self, key: str, now: float) -> dict[str, float]:
        leases = self._leases.get(key)
        if leases is None:
            return {}
        # Oldest first: a key's leases share one TTL, so the expired ones lead.
        while leases:
            rid, expires = next(iter(leases.items()))
            if expires > now:
                break
            del leases[rid]
        return leases

    def _consume(self, counter: Counter, check: Check, request_id: str, now: float) -> None:
        if counter.kind == "rate":
            self._put(_RATE, self._tat, counter.key, check.new_tat, check.new_tat)
        elif counter.kind == "budget":
            used = self._budget.get(counter.key, (0, 0.0))[0]
            expires = counter.window_end + BUDGET_KEEP_S
            self._put(_BUDGET, self._budget, counter.key, (used + counter.amount, expires), expires)
            self._budget_changed()
        else:
            leases = self._leases.get(counter.key)
            if leases is None:
                leases = self._leases[counter.key] = {}
                heapq.heappush(self._heap, (now + counter.period_s, _LEASES, counter.key))
            leases.pop(request_id, None)  # a renewed lease moves to the end
            leases[request_id] = now + counter.period_s

    def _put(self, table: int, store: dict[str, Any], key: str, value: Any, expires: float) -> None:
        if key not in store:
            heapq.heappush(self._heap, (expires, table, key))
        store[key] = value

    def _sweep(self, now: float) -> None:
        _drop_expired(self._reserved, now, self.sweep_per_call)
        _drop_expired(self._settled, now, self.sweep_per_call)
        heap = self._heap
        for _ in range(self.sweep_per_call):
            if not heap or heap[0][0] > now:
                return
            _, table, key = heapq.heappop(heap)
            expires = self._expiry(table, key, now)
            if expires is None:
                continue  # gone already
            if expires <= now:
                self._tables[table].pop(key, None)
            else:
                heapq.heappush(heap, (expires, table, key))  # it lived on: look again then

    @property
    def _tables(self) -> tuple[dict[str, Any], ...]:
        return (self._tat, self._leases, self._budget)

    def _expiry(self, table: int, key: str, now: float) -> float | None:
        if table == _RATE:
            return self._tat.get(key)
        if table == _BUDGET:
            budget = self._budget.get(key)
            return None if budget is None else budget[1]
        if key not in self._leases:
            return None
        leases = self._live_leases(key, now)
        return next(reversed(leases.values())) if leases else now


def _drop_expired(records: dict[str, tuple[float, Any]], now: float, most: int) -> None:
    """Up to ``most`` expired entries from the front: oldest first, one TTL each."""
    for _ in range(most):
        oldest = next(iter(records), None)
        if oldest is None or records[oldest][0] > now:
            return
        del records[oldest]
