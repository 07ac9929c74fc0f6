"""A stream processor whose replies to some messages come later, when the test says.

Every message is a request body whose bytes are its label; the reply carries the
label back (as a body mutation), so the order of replies is visible. A message
labelled ``hold...`` is answered later: handle() returns an awaitable (a Future,
or a coroutine, by ``Backend.kind``) that waits on an answer the test gives with
``Ask.release()`` or ``Ask.fail()``, as a Redis reply would come. A message
labelled ``raise`` makes handle() raise (a fault the processor did not catch).
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.replies import Reply

TIMEOUT = 5  # seconds: every wait in these tests is bounded


def message(label: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=label))


def echo(label: bytes) -> pb.ProcessingResponse:
    mutation = pb.BodyMutation(body=label)
    body = pb.BodyResponse(response=pb.CommonResponse(body_mutation=mutation))
    return pb.ProcessingResponse(request_body=body)


def label_of(reply: pb.ProcessingResponse) -> bytes:
    label: bytes = reply.request_body.response.body_mutation.body
    return label


@dataclass
class Ask:
    """One held message: its backend answer is given by the test."""

    label: bytes
    answer: asyncio.Future[None]

    def release(self) -> None:
        self.answer.set_result(None)

    def fail(self) -> None:
        self.answer.set_exception(RuntimeError("backend broke"))


class Backend:
    """Makes the processors (the transports' ``new_processor``) and holds their asks."""

    def __init__(self, kind: Literal["future", "coroutine"] = "future") -> None:
        self.kind = kind
        self.processors: list[HeldProcessor] = []
        self._asks: asyncio.Queue[Ask] = asyncio.Queue()

    def new_processor(self) -> HeldProcessor:
        processor = HeldProcessor(self)
        self.processors.append(processor)
        return processor

    def ask(self, label: bytes) -> Ask:
        ask = Ask(label, asyncio.get_running_loop().create_future())
        self._asks.put_nowait(ask)
        return ask

    async def next_ask(self) -> Ask:
        """The next held message, once a processor has handled it."""
        return await asyncio.wait_for(self._asks.get(), TIMEOUT)

    def pending_asks(self) -> int:
        return self._asks.qsize()


class HeldProcessor:
    """What the transports see of processor.StreamProcessor, with replies held on asks."""

    failed = False

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.handled: list[bytes] = []  # labels, in the order handle() saw them
        self.overlapped = False  # handle() was called while an earlier reply was pending
        self.completed: list[bytes] = []  # held messages whose pending work ran to its end
        self.unfinished = 0  # awaitables returned and not yet done
        self.closes = 0
        self.abandoned = False  # told the stream went away while a reply was pending
        self.closed_while_pending = False
        self.closed = asyncio.Event()

    def handle(self, request: pb.ProcessingRequest) -> Reply:
        label = request.request_body.body
        self.overlapped = self.overlapped or self.unfinished > 0
        self.handled.append(label)
        if label == b"raise":
            raise RuntimeError("bug")
        if not label.startswith(b"hold"):
            return echo(label)
        ask = self.backend.ask(label)
        self.unfinished += 1
        if self.backend.kind == "coroutine":
            return self._later(ask)
        reply: asyncio.Future[pb.ProcessingResponse | None] = (
            asyncio.get_running_loop().create_future()
        )
        ask.answer.add_done_callback(lambda answer: self._answered(ask, answer, reply))
        return reply

    def _answered(
        self,
        ask: Ask,
        answer: asyncio.Future[None],
        reply: asyncio.Future[pb.ProcessingResponse | None],
    ) -> None:
        self.unfinished -= 1
        if answer.exception() is not None:
            reply.set_exception(answer.exception())  # type: ignore[arg-type]
            return
        self.completed.append(ask.label)
        reply.set_result(echo(ask.label))

    def _later(self, ask: Ask) -> Coroutine[Any, Any, pb.ProcessingResponse]:
        async def later() -> pb.ProcessingResponse:
            try:
                await ask.answer
            finally:
                self.unfinished -= 1
            self.completed.append(ask.label)
            return echo(ask.label)

        return later()

    def abandon(self) -> None:
        self.abandoned = True

    def close(self) -> None:
        self.closes += 1
        self.closed_while_pending = self.unfinished > 0
        self.closed.set()

    async def wait_closed(self) -> None:
        await asyncio.wait_for(self.closed.wait(), TIMEOUT)
