"""The embedded quota backend: inline answers, bounded memory, budgets that survive a restart."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path

import pytest

from extproc.limits.memory import MemoryQuota
from extproc.limits.quota import Counter, Keys, Settle, Take, Verdict

K = Keys()
NOW = 1_790_000_000.0


def budget(limit: int, amount: int, subject: str = "t") -> Counter:
    return Counter(
        "b", K.budget("b", subject, "2026-12"), "budget", limit, 0.0, NOW + 86400, amount
    )


def _names(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir()]


def test_answers_inline_not_a_coroutine() -> None:
    verdict = MemoryQuota().take(Take("r", NOW, (budget(10, 1),)))
    assert isinstance(verdict, Verdict) and verdict.allowed


async def test_budget_spend_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "tollway-budgets.json"
    first = MemoryQuota(path)
    assert first.take(Take("r1", NOW, (budget(1000, 400),))).allowed
    first.settle(Settle("r1", NOW, (budget(1000, 400),), (700,)))
    await first.aclose()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert _names(tmp_path) == [path.name]  # no temporary left behind

    second = MemoryQuota(path)
    assert second.usage((budget(1000, 0),), NOW)[0].used == 700
    assert not second.take(Take("r2", NOW, (budget(1000, 301),))).allowed
    assert second.take(Take("r3", NOW, (budget(1000, 300),))).allowed


async def test_budgets_are_saved_off_the_hot_path_every_few_seconds(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    quota = MemoryQuota(path, persist_every_s=0.01)
    quota.take(Take("r1", NOW, (budget(1000, 5),)))
    assert not path.exists()  # not written by the take itself
    for _ in range(200):
        if path.exists():
            break
        await asyncio.sleep(0.01)
    assert json.loads(path.read_text())["budgets"][budget(1, 1).key][0] == 5
    await quota.aclose()


def test_a_corrupt_budget_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "b.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a Tollway budget file"):
        MemoryQuota(path)


def test_expired_entries_are_swept_as_calls_go_by() -> None:
    quota = MemoryQuota(sweep_per_call=4)
    for i in range(500):
        rate = Counter("r", K.rate("r", f"s{i}"), "rate", 10, 1.0, 0.0, 1)
        lease = Counter("c", K.concurrent("c", f"s{i}"), "concurrent", 1, 1.0, 0.0, 1)
        quota.take(Take(f"q{i}", NOW, (rate, lease)))
    tables = (quota._tat, quota._leases, quota._reserved)
    assert all(len(t) == 500 for t in tables)
    later = NOW + 2 * 3600.0  # rates, leases and reservations are all over
    hot = Counter("r", K.rate("r", "hot"), "rate", 10**6, 1.0, 0.0, 1)
    for i in range(400):
        quota.take(Take(f"h{i}", later + i * 1e-3, (hot,)))
    assert len(quota._tat) <= 2 and len(quota._leases) == 0
    assert len(quota._reserved) <= 401  # the hot key's own, still within their ttl
    assert len(quota._heap) <= 410


def test_a_settled_request_is_forgotten_after_its_settled_mark_expires() -> None:
    """At a thousand requests a second, an hour of reservation records would be
    gigabytes: settling drops the record, and the mark lives only settled_ttl_s."""
    quota = MemoryQuota(settled_ttl_s=60.0)
    rate = Counter("r", K.rate("r", "s"), "rate", 10**6, 1.0, 0.0, 1)
    for i in range(300):
        now = NOW + i
        quota.take(Take(f"q{i}", now, (rate,)))
        quota.settle(Settle(f"q{i}", now, (rate,), (1,)))
    assert len(quota._reserved) == 0
    assert len(quota._settled) <= 62  # the last minute's marks
    spend = budget(1000, 100)
    quota.take(Take("b", NOW + 299, (spend,)))
    quota.settle(Settle("b", NOW + 299, (spend,), (10,)))
    quota.settle(Settle("b", NOW + 300, (spend,), (50,)))  # a retried settle: a no-op
    assert quota.usage((spend,), NOW + 300)[0].used == 10
