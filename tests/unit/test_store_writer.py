"""The one writer task and the circuit breaker, on their own."""

from __future__ import annotations

import asyncio

from extproc.store.breaker import Breaker
from extproc.store.writer import Writer


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


async def test_writes_in_order_and_put_never_blocks() -> None:
    written: list[int] = []

    async def write(items: list[int]) -> None:
        await asyncio.sleep(0)
        written.extend(items)

    drops: list[str] = []
    writer = Writer(write, maxsize=3, on_drop=drops.append)
    assert [writer.put(i) for i in range(5)] == [True, True, True, False, False]
    await writer.flushed()
    assert written == [0, 1, 2] and drops == ["queue_full", "queue_full"]
    await writer.drain(1.0)
    assert not writer.put(9) and drops[-1] == "shutdown"


async def test_a_failing_write_is_retried_then_dropped() -> None:
    clock = Clock()
    tries: list[int] = []

    async def write(items: list[int]) -> None:
        (item,) = items
        tries.append(item)
        clock.t += 1.0
        if item == 1 or len(tries) < 3:
            raise ConnectionError

    drops: list[str] = []
    writer = Writer(write, retry_for_s=5.0, backoff_s=(0.0, 0.0), on_drop=drops.append, clock=clock)
    writer.put(0)  # fails twice, then succeeds
    writer.put(1)  # fails until 5 s after it was queued (it waited 3 s behind item 0)
    writer.put(2)
    await asyncio.wait_for(writer.flushed(), 5.0)
    assert tries.count(0) == 3 and tries.count(1) == 2 and tries[-1] == 2
    assert drops == ["failed"] and writer.written == 2


async def test_drain_gives_up_after_its_time_and_counts_the_rest() -> None:
    async def never(items: list[int]) -> None:
        await asyncio.sleep(3600)

    drops: list[str] = []
    writer = Writer(never, on_drop=drops.append)
    for i in range(4):
        writer.put(i)
    await asyncio.wait_for(writer.drain(0.05), 2.0)
    assert drops == ["shutdown"] * 4


def test_breaker_opens_probes_once_per_cool_down_and_closes() -> None:
    clock = Clock()
    changes: list[bool] = []
    breaker = Breaker(3, 2.0, clock=clock, on_change=changes.append)
    for _ in range(2):
        breaker.failure()
    breaker.success()  # failures must be in a row
    for _ in range(3):
        assert breaker.allow()
        breaker.failure()
    assert breaker.is_open and changes == [True] and not breaker.allow()
    clock.t = 2.0
    assert breaker.allow() and not breaker.allow()  # one probe only
    breaker.failure()  # it failed: another cool-down
    clock.t = 3.0
    assert not breaker.allow()
    clock.t = 4.0
    assert breaker.allow()
    breaker.success()
    assert not breaker.is_open and changes == [True, False] and breaker.allow()


async def test_what_is_queued_goes_in_one_batch_and_a_failed_batch_is_retried_whole() -> None:
    batches: list[list[int]] = []

    async def write(items: list[int]) -> None:
        batches.append(items)
        if len(batches) == 1:
            raise ConnectionError  # retried whole: the writes are idempotent

    writer = Writer(write, batch=3, backoff_s=(0.0, 0.0))
    for i in range(5):
        writer.put(i)
    await asyncio.wait_for(writer.flushed(), 5.0)
    assert batches == [[0, 1, 2], [0, 1, 2], [3, 4]] and writer.written == 5
