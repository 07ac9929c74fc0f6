"""The demo upstream's HTTP/1.1 server: the standard library's asyncio streams, nothing else.

Just what an upstream behind Envoy needs: keep-alive, ``content-length`` or
chunked request bodies (bounded), ``expect: 100-continue``, and replies that are
either one body with a ``content-length`` or a chunked stream written piece by
piece (each piece flushed, so SSE events reach the client as they are written).
Handlers are plain functions from a :class:`Request` to a :class:`Response` or
:class:`Stream`; they never see a socket.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote

__all__ = ["Handler", "Reply", "Request", "Response", "Server", "Stream"]

log = logging.getLogger("tollway.demo")

_MAX_HEAD_BYTES = 64 * 1024
_PACE_S = 0.0005  # between pieces of a paced stream, so that each arrives on its own


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # percent-decoded, without the query
    query: str  # the raw query string
    headers: Mapping[str, str]  # lowercased names; repeated headers joined with ", "
    body: bytes | None  # None: larger than the server's limit (read and dropped)

    def query_param(self, name: str) -> str | None:
        values = parse_qs(self.query).get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stream:
    """A chunked 200 response: each element of ``pieces`` is written and flushed on its own;
    ``step`` > 0 cuts them further into ``step``-byte writes, paced."""

    pieces: Iterable[bytes]
    content_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    step: int = 0


Reply = Response | Stream
Handler = Callable[[Request], Reply]


class _BadRequest(Exception):
    pass


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes any byte
        raise _BadRequest("undecodable head") from None
    request_line, *lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {request_line[:80]!r}")
    headers: dict[str, str] = {}
    for line in lines:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"bad header line {line[:80]!r}")
        name, value = name.lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return parts[0], parts[1], parts[2], headers


async def _discard(reader: asyncio.StreamReader, length: int) -> None:
    while length > 0:
        length -= len(await reader.readexactly(min(length, 1 << 16)))


async def _read_chunked(reader: asyncio.StreamReader, limit: int) -> bytes | None:
    body: bytearray | None = bytearray()
    while True:
        size_line = await reader.readline()
        try:
            size = int(size_line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadRequest("bad chunk size") from None
        if size == 0:
            while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return None if body is None else bytes(body)
        if body is not None and len(body) + size > limit:
            body = None  # over the limit: read on, keep nothing
        if body is None:
            await _discard(reader, size)
        else:
            body += await reader.readexactly(size)
        await reader.readexactly(2)


async def _read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], limit: int
) -> bytes | None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, limit)
    raw = headers.get("content-length", "0")
    if not raw.isdigit():
        raise _BadRequest("bad content-length")
    length = int(raw)
    if length > limit:  # read it all the same, so that the client sees the answer
        await _discard(reader, length)
        return None
    return await reader.readexactly(length) if length else b""


def _head(status: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write(writer: asyncio.StreamWriter, reply: Reply, keep_alive: bool) -> None:
    connection = {} if keep_alive else {"connection": "close"}
    if isinstance(reply, Response):
        headers = {"content-type": reply.content_type, "content-length": str(len(reply.body))}
        writer.write(_head(reply.status, {**headers, **reply.headers, **connection}))
        writer.write(reply.body)
        await writer.drain()
        return
    headers = {"content-type": reply.content_type, "transfer-encoding": "chunked"}
    writer.write(_head(200, {**headers, **reply.headers, **connection}))
    await writer.drain()
    for piece in reply.pieces:
        step = reply.step or len(piece) or 1
        for i in range(0, len(piece), step):
            part = piece[i : i + step]
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            if reply.step:
                await asyncio.sleep(_PACE_S)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


class Server:
    """Serves ``handler`` on one listening socket until :meth:`close`."""

    def __init__(self, handler: Handler, max_body_bytes: int) -> None:
        self._handler = handler
        self._max_body = max_body_bytes
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the bound port."""
        self._server = await asyncio.start_server(
            self._connection, host, port, limit=_MAX_HEAD_BYTES
        )
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()  # each connection's read ends, and so does its task
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._writers.add(writer)
        self._tasks.add(task)
        try:
            while await self._one_exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away, possibly mid-stream
        except asyncio.CancelledError:
            # Shutting down. Ending quietly: asyncio (3.11) logs a traceback for a
            # cancelled connection task.
            pass
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()

    async def _one_exchange(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Read one request and answer it; False when the connection is done."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False  # closed between requests
        except asyncio.LimitOverrunError:
            await _write(writer, Response(431, b"headers too large", "text/plain"), False)
            return False
        try:
            method, target, version, headers = _parse_head(head)
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = await _read_body(reader, headers, self._max_body)
        except _BadRequest as exc:
            await _write(writer, Response(400, str(exc).encode(), "text/plain"), False)
            return False
        path, _, query = target.partition("?")
        request = Request(method, unquote(path), query, headers, body)
        try:
            reply = self._handler(request)
        except Exception:
            log.exception("demo upstream: handler failed for %s %s", method, request.path)
            reply = Response(500, b'{"error": {"message": "internal error"}}')
        keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "").lower()
        await _write(writer, reply, keep_alive)
        return keep_alive
