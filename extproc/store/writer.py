"""One writer task for a backend's writes that must not wait on the hot path.

``put`` never blocks: a full queue drops the item and counts it. One task
writes items in order, in batches of what is queued (at most ``batch``: one
round trip for many); a failed batch is retried with backoff for at most
``retry_for_s`` from when its oldest item was queued (so writes must be
idempotent), then dropped and counted. ``drain(within_s)`` on shutdown writes what it can in the
time given and drops (and counts) the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Generic, Literal, TypeVar

T = TypeVar("T")
DropReason = Literal["queue_full", "failed", "shutdown"]

log = logging.getLogger("tollway")


class Writer(Generic[T]):
    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[object]],
        *,
        batch: int = 1,
        maxsize: int = 10_000,
        retry_for_s: float = 30.0,
        backoff_s: tuple[float, float] = (0.05, 1.0),  # first and longest wait between tries
        on_drop: Callable[[DropReason], None] = lambda reason: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.batch = batch
        self._queue: asyncio.Queue[tuple[float, T]] = asyncio.Queue(maxsize)
        self.retry_for_s = retry_for_s
        self.backoff_s = backoff_s
        self._on_drop = on_drop
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.written = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def put(self, item: T) -> bool:
        """Queue an item (from the event loop's thread); False if it was dropped."""
        if self._closed:
            self._drop("shutdown")
            return False
        try:
            self._queue.put_nowait((self._clock(), item))
        except asyncio.QueueFull:
            self._drop("queue_full")
            return False
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return True

    async def flushed(self) -> None:
        """Wait until everything queued so far was written or dropped."""
        await self._queue.join()

    async def drain(self, within_s: float) -> None:
        """Stop taking items; write the queued ones for at most ``within_s`` seconds."""
        self._closed = True
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), within_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        while not self._queue.empty():
            self._queue.get_nowait()
            self._queue.task_done()
            self._drop("shutdown")

    def _drop(self, reason: DropReason) -> None:
        self.dropped += 1
        self._on_drop(reason)

    async def _run(self) -> None:
        low, high = self.backoff_s
        queue = self._queue
        while True:
            batch = [await queue.get()]
            while len(batch) < self.batch and not queue.empty():
                batch.append(queue.get_nowait())
            try:
                wait = low
                while True:
                    try:
                        await self._write([item for _, item in batch])
                    except Exception as e:
                        if self._clock() - batch[0][0] >= self.retry_for_s:
                            log.warning("write dropped after retries (%s)", type(e).__name__)
                            for _ in batch:
                                self._drop("failed")
                            break
                        await asyncio.sleep(wait)
                        wait = min(high, wait * 2)
                    else:
                        self.written += len(batch)
                        break
            except asyncio.CancelledError:
                for _ in batch:  # those in hand when drain ran out of time
                    self._drop("shutdown")
                raise
            finally:
                for _ in batch:
                    queue.task_done()
