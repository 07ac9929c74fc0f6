"""What a transport needs of a stream processor: a reply now, or one that comes later.

``handle`` answers most messages at once (a ``ProcessingResponse``, or None for
a message of a kind this Envoy API lacks). A decision that waits for a backend
(Redis) returns an awaitable instead; the transport holds that stream's later
messages until the reply has been sent. Both transports import this module; it
imports nothing of the package.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, Protocol, TypeAlias

from envoy.service.ext_proc.v3.external_processor_pb2 import ProcessingRequest, ProcessingResponse

log = logging.getLogger("tollway")

Reply: TypeAlias = ProcessingResponse | Awaitable[ProcessingResponse | None] | None


class Processor(Protocol):
    """One ext_proc stream's state (processor.StreamProcessor), as the transports use it."""

    @property
    def failed(self) -> bool:
        """After a fault the stream has answered with a 500 and should end."""
        ...

    def handle(self, request: ProcessingRequest) -> Reply: ...

    def abandon(self) -> None:
        """The stream went away while a reply was pending: told at once, before the
        pending work completes (whatever it decides then was abandoned)."""
        ...

    def close(self) -> None:
        """The stream is over (ended or reset); called exactly once."""
        ...


class Abandoned:
    """Processors of streams that went away (reset, connection lost) while a reply was pending.

    The pending work is not cancelled halfway: when it completes, its reply is
    dropped and the processor closed, exactly once (its flows finish as
    abandoned). On shutdown the server waits for them within its drain timeout
    (``settle``); what is still pending then is closed without waiting.
    """

    def __init__(self) -> None:
        self._processors: dict[asyncio.Future[Any], Processor] = {}
        self._settled = False  # after shutdown nothing waits: close at once

    def __len__(self) -> int:
        return len(self._processors)

    def add(self, pending: asyncio.Future[Any], processor: Processor) -> None:
        processor.abandon()
        if self._settled:
            processor.close()
            return
        self._processors[pending] = processor
        pending.add_done_callback(self._completed)

    def _completed(self, pending: asyncio.Future[Any]) -> None:
        processor = self._processors.pop(pending, None)
        if processor is None:  # closed by settle() already
            return
        if not pending.cancelled() and (fault := pending.exception()) is not None:
            log.error("fault in the pending reply of a stream that is gone", exc_info=fault)
        processor.close()

    async def settle(self, grace: float) -> None:
        """Wait up to ``grace`` s for pending work to complete, then close the rest."""
        if self._processors and grace > 0:
            await asyncio.wait(list(self._processors), timeout=grace)
        self._settled = True
        if self._processors:
            log.warning("shutdown: %d abandoned replies still pending", len(self._processors))
        processors, self._processors = self._processors, {}
        for processor in processors.values():
            processor.close()
