"""The metrics port: Prometheus' ``/metrics``, ``/v1/spend``, and health probes.

``/metrics`` is prometheus_client's own WSGI app, so scrapes get what they got
from ``start_http_server`` (content negotiation, gzip, ``name[]`` filters). Like
that server this one answers from threads, so a scrape never waits on the event
loop. ``/v1/spend`` reads the quota, whose state the loop owns and mutates: the
read is handed to the loop and waited for with a deadline. It binds only where
metrics bind (loopback by default) and is what ``tollway spend`` asks when the
counters live in this process.

``/healthz`` (liveness) answers 200 when the event loop runs a task within the
deadline: a wedged loop is a process to restart. ``/readyz`` (readiness) asks
``ready`` on the loop: 503 with the reason while the server drains or while the
shared store (Redis, when configured) does not answer a PING.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIEnvironment

import orjson
from prometheus_client import CollectorRegistry, make_wsgi_app

from .limits.quota import StoreUnavailable
from .limits.spend import Query, parse_query

log = logging.getLogger("tollway")

SPEND_PATH = "/v1/spend"
LIVE_PATH = "/healthz"
READY_PATH = "/readyz"
_NO_SUCH_PATH = f"no such path: /metrics, {SPEND_PATH}, {LIVE_PATH} or {READY_PATH}"
Spend = Callable[[Query], Awaitable[dict[str, Any] | None]]
# Why this process should get no traffic now (draining, store down), or None: ready.
Ready = Callable[[], Awaitable[str | None]]


async def _always_ready() -> str | None:
    return None


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow client never holds up exit


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per scrape would drown the log


class MetricsServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        spend: Spend,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout_s: float = 5.0,
        ready: Ready = _always_ready,
        probe_timeout_s: float = 1.0,
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._spend = spend
        self._ready = ready
        self.probe_timeout_s = probe_timeout_s
        self._loop = loop
        self.timeout_s = timeout_s
        self._httpd: WSGIServer | None = None

    def start(self, host: str, port: int) -> int:
        """Listen (port 0: any free one) and serve from a thread; returns the port."""
        # Like prometheus_client: the address decides IPv4 or IPv6.
        family, _, _, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        httpd: WSGIServer = make_server(
            str(sockaddr[0]), port, self.app, server_class, handler_class=_QuietHandler
        )
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
        return int(httpd.server_address[1])

    def close(self) -> None:
        """Stop serving (blocks up to half a second: call it from a thread)."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def app(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            body: Iterable[bytes] = self._metrics(environ, start_response)
            return body
        if path in (LIVE_PATH, READY_PATH):
            status, doc = self._probe(path)
            return _json(start_response, status, doc)
        if path != SPEND_PATH:
            return _json(start_response, 404, {"error": _NO_SUCH_PATH})
        if environ.get("REQUEST_METHOD") != "GET":
            return _json(start_response, 405, {"error": "use GET"}, (("allow", "GET"),))
        try:
            query = parse_query(environ.get("QUERY_STRING", ""))
        except ValueError as exc:
            return _json(start_response, 400, {"error": str(exc)})
        status, answer = self._answer(query)
        return _json(start_response, status, answer)

    def _probe(self, path: str) -> tuple[int, dict[str, Any]]:
        """Liveness: the loop runs a callback in time. Readiness: ``ready`` says so in time."""
        future: concurrent.futures.Future[str | None]
        try:
            if path == LIVE_PATH:
                future = concurrent.futures.Future()
                self._loop.call_soon_threadsafe(future.set_result, None)
            else:
                future = asyncio.run_coroutine_threadsafe(_reason(self._ready), self._loop)
        except RuntimeError:  # the loop has closed: the server is stopping
            return 503, {"status": "stopping"}
        try:
            reason = future.result(self.probe_timeout_s)
        except TimeoutError:
            future.cancel()
            return 503, {"status": f"no answer within {self.probe_timeout_s:g}s"}
        except Exception:
            log.exception("readiness check failed")
            return 503, {"status": "internal error"}
        return (200, {"status": "ok"}) if reason is None else (503, {"status": reason})

    def _answer(self, query: Query) -> tuple[int, dict[str, Any]]:
        try:
            future = asyncio.run_coroutine_threadsafe(_call(self._spend, query), self._loop)
        except RuntimeError:  # the loop has closed: the server is stopping
            return 503, {"error": "the server is stopping"}
        try:
            found = future.result(self.timeout_s)
        except TimeoutError:
            future.cancel()
            return 503, {"error": f"the limits store did not answer within {self.timeout_s:g}s"}
        except StoreUnavailable as exc:
            return 503, {"error": f"the limits store is unavailable ({exc.reason})"}
        except Exception:
            log.exception("spend query failed")
            return 500, {"error": "internal error"}
        if found is None:
            if query.key_id is not None:
                return 404, {"error": f"no key with id {query.key_id!r}"}
            return 404, {"error": f"no key has tenant {query.tenant!r}"}
        return 200, found


async def _reason(check: Ready) -> str | None:
    return await check()


async def _call(spend: Spend, query: Query) -> dict[str, Any] | None:
    return await spend(query)  # run_coroutine_threadsafe takes a coroutine, not any awaitable


def _json(
    start_response: StartResponse,
    status: int,
    doc: dict[str, Any],
    headers: tuple[tuple[str, str], ...] = (),
) -> list[bytes]:
    body = orjson.dumps(doc)
    start_response(
        f"{status} {HTTPStatus(status).phrase}",
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            *headers,
        ],
    )
    return [body]
