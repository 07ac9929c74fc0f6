"""A small asyncio RESP2 client: one connection to one Redis node, for pipelining.

``Connection.send(commands)`` packs every command with hiredis, writes them in
one ``transport.write`` and returns a future per command; ``execute`` awaits
them. The protocol's ``data_received`` feeds a ``hiredis.Reader`` and resolves
a FIFO of futures in order. An error reply (``-ERR ...``) is a value, a
``ReplyError`` in that command's place: the other commands are not touched. A
reply whose future is done already (its caller's deadline passed) is dropped;
the FIFO keeps its order.

The connection opens on first use and again after it is lost: connect, then
AUTH and SELECT pipelined; callers arriving meanwhile wait for the same
attempt. Deadlines are the caller's (``asyncio.timeout`` around ``execute``):
a caller stops waiting, but the attempt goes on within ``connect_timeout_s``,
so a handshake slower than one deadline still ends with a connection. A lost
connection fails every pending command with ConnectionError at once;
``close()`` does the same on purpose (a stalled server), and the next call
reconnects.

URLs: redis://, rediss:// (TLS, with the ``ssl_*`` query arguments redis-py
reads and its defaults: certificate and host name verified) and unix://; the
``password`` argument (from the environment) wins over the URL's.
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, cast
from urllib.parse import urlsplit

import hiredis
from redis.asyncio.connection import parse_url

Arg: TypeAlias = str | bytes | int | float
Command: TypeAlias = Sequence[Arg]


class ReplyError(Exception):
    """An error reply from Redis, returned in its command's place (not raised)."""

    @property
    def code(self) -> str:
        """The error's first word: ERR, NOSCRIPT, WRONGPASS, ..."""
        return str(self).split(" ", 1)[0]


_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def _tls(query: Mapping[str, Any]) -> ssl.SSLContext:
    """As redis-py's SSLConnection builds it from the same URL arguments."""
    reqs = _CERT_REQS.get(str(query.get("ssl_cert_reqs", "required")).lower())
    if reqs is None:
        raise ValueError("ssl_cert_reqs: none, optional or required")
    context = ssl.create_default_context()
    context.check_hostname = reqs != ssl.CERT_NONE and query.get("ssl_check_hostname") is not False
    context.verify_mode = reqs
    if query.get("ssl_certfile") or query.get("ssl_keyfile"):
        context.load_cert_chain(
            query["ssl_certfile"], query.get("ssl_keyfile"), query.get("ssl_password")
        )
    if query.get("ssl_ca_certs") or query.get("ssl_ca_path"):
        context.load_verify_locations(query.get("ssl_ca_certs"), query.get("ssl_ca_path"))
    if query.get("ssl_min_version") is not None:
        context.minimum_version = ssl.TLSVersion(query["ssl_min_version"])
    if query.get("ssl_ciphers"):
        context.set_ciphers(query["ssl_ciphers"])
    return context


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where one Redis node is and how to log in."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str | None = None  # a unix socket instead of host and port
    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = None

    @classmethod
    def from_url(cls, url: str, password: str | None = None) -> Endpoint:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError("use redis://, rediss:// or unix://")
        parts = cast(dict[str, Any], parse_url(url))
        return cls(
            host=parts.get("host", "127.0.0.1"),
            port=parts.get("port", 6379),
            path=parts.get("path") if scheme == "unix" else None,
            username=parts.get("username"),
            password=password if password is not None else parts.get("password"),
            db=parts.get("db", 0),
            tls=_tls(parts) if scheme == "rediss" else None,
        )

    def __str__(self) -> str:  # no secrets
        return self.path or f"{self.host}:{self.port}"

    def setup(self) -> list[tuple[str, ...]]:
        """What a new connection sends first."""
        commands: list[tuple[str, ...]] = []
        if self.password is not None:
            auth = (self.username, self.password) if self.username else (self.password,)
            commands.append(("AUTH", *auth))
        if self.db:
            commands.append(("SELECT", str(self.db)))
        return commands


# hiredis's stub types its argument as a 1-tuple.
_pack = cast(Callable[[tuple[Arg, ...]], bytes], hiredis.pack_command)
_NOT_YET = object()  # hiredis.Reader: no complete reply buffered


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ReplyError, notEnoughData=_NOT_YET)
        self._pending: deque[asyncio.Future[Any]] = deque()
        self._transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def send(self, commands: Sequence[Command]) -> list[asyncio.Future[Any]]:
        transport = self._transport
        if self.lost or transport is None or transport.is_closing():
            raise ConnectionError("connection to Redis lost")
        data = b"".join([_pack(tuple(command)) for command in commands])
        create = self._loop.create_future
        futures = [create() for _ in commands]
        self._pending.extend(futures)
        transport.write(data)
        return futures

    def data_received(self, data: bytes) -> None:
        reader, pending = self._reader, self._pending
        reader.feed(data)
        try:
            while (reply := reader.gets()) is not _NOT_YET:
                future = pending.popleft()  # IndexError: a reply nobody asked for
                if not future.done():  # else its caller gave up: dropped, order kept
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as e:
            self.close(f"protocol error ({type(e).__name__})")

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection to Redis lost ({exc})" if exc else "connection to Redis lost")

    def close(self, why: str = "connection to Redis closed") -> None:
        """Fail what is pending now and drop the socket (its unsent bytes too)."""
        self._fail(why)
        if self._transport is not None:
            self._transport.abort()

    def _fail(self, why: str) -> None:
        self.lost = True
        pending = self._pending
        while pending:
            future = pending.popleft()
            if not future.done():
                future.set_exception(ConnectionError(why))


async def replies(futures: Sequence[asyncio.Future[Any]]) -> list[Any]:
    """Every future's reply, in order. If the caller gives up (its deadline) or the
    connection is lost, the rest are cancelled or marked seen (no warnings later)."""
    try:
        return [await future for future in futures]
    except BaseException:
        replies_seen(futures)
        raise


def replies_seen(futures: Sequence[asyncio.Future[Any]]) -> None:
    """Nobody will read these: cancel those still pending, mark failures as seen."""
    for future in futures:
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


class Connection:
    def __init__(self, endpoint: Endpoint, *, connect_timeout_s: float = 1.0) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None

    @classmethod
    def from_url(
        cls, url: str, *, password: str | None = None, connect_timeout_s: float = 1.0
    ) -> Connection:
        return cls(Endpoint.from_url(url, password), connect_timeout_s=connect_timeout_s)

    @property
    def connected(self) -> bool:
        return self._protocol is not None and not self._protocol.lost

    async def send(
        self, commands: Sequence[Command], deadline: float | None = None
    ) -> list[asyncio.Future[Any]]:
        """Write ``commands`` in one write (connected first, by ``deadline`` if given:
        loop time); their futures."""
        protocol = self._protocol
        if protocol is None or protocol.lost:
            async with asyncio.timeout_at(deadline):
                protocol = await self._connect()
        return protocol.send(commands)

    async def execute(
        self, commands: Sequence[Command], deadline: float | None = None
    ) -> list[Any]:
        """The replies to ``commands``, in order; an error reply is a ReplyError.

        ``deadline`` (loop time): TimeoutError after it. A reply read by then counts,
        even in the loop's turn that also runs the deadline's timer (a cancelled
        await would lose it): under load that turn can be long."""
        futures = await self.send(commands, deadline)
        if deadline is not None:
            loop = asyncio.get_running_loop()
            # Replies come in order: the last one done means all are.
            await asyncio.wait(futures[-1:], timeout=max(0.0, deadline - loop.time()))
            if not futures[-1].done():
                replies_seen(futures)
                raise TimeoutError
        return await replies(futures)

    def close(self) -> None:
        """Drop the connection, failing what is pending; the next call reconnects.
        An attempt to connect that is under way goes on."""
        if self._protocol is not None:
            self._protocol.close()
            self._protocol = None

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            await asyncio.gather(self._connecting, return_exceptions=True)
        self.close()  # and the connection it may have opened meanwhile

    async def _connect(self) -> _Protocol:
        """The one attempt under way, or a new one; bounded by the caller's deadline
        (the caller stops waiting) and by ``connect_timeout_s`` (the attempt stops)."""
        if self._connecting is None:
            self._connecting = asyncio.get_running_loop().create_task(self._open())
            self._connecting.add_done_callback(self._opened)
        return await asyncio.shield(self._connecting)

    def _opened(self, task: asyncio.Task[_Protocol]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is None:  # seen, if nobody waits
            self._protocol = task.result()

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        where = self.endpoint
        async with asyncio.timeout(self.connect_timeout_s):
            if where.path is not None:
                _, protocol = await loop.create_unix_connection(_Protocol, where.path)
            else:
                _, protocol = await loop.create_connection(
                    _Protocol, where.host, where.port, ssl=where.tls
                )
            try:
                setup = where.setup()
                for command, reply in zip(setup, await replies(protocol.send(setup)), strict=True):
                    if isinstance(reply, ReplyError):
                        raise ConnectionError(f"Redis at {where} refused {command[0]}: {reply}")
            except BaseException:
                protocol.close()
                raise
        return protocol
