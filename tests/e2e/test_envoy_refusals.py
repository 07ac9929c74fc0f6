"""Every answer the front door makes is an HTTP status with a JSON error body.

Envoy's own refusals (bad framing, HTTP/1.0, upgrades, huge headers), the
header limits Tollway's edits could cross, a stalled Tollway, and a 413 on
HTTP/2 — each driven through the real Envoy with raw sockets, h2 and httpx.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import orjson
import pytest

from extproc import codec, envoyconf
from extproc.config import Config, Upstream
from extproc.stages import auth

from .conftest import Stack, eventually, start_stack
from .h2client import Answer, h2_request

pytestmark = pytest.mark.e2e


# ---- clients -------------------------------------------------------------------


def _address(stack: Stack) -> tuple[str, int]:
    parts = urlsplit(stack.url)
    assert parts.hostname and parts.port
    return parts.hostname, parts.port


def http1(stack: Stack, request: bytes, timeout: float = 10) -> Answer:
    """Send raw bytes; read one response (Envoy closes or sends content-length)."""
    with socket.create_connection(_address(stack), timeout=timeout) as sock:
        sock.sendall(request)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                headers = _parse_headers(head.split(b"\r\n")[1:])
                if len(body) >= int(headers.get("content-length", "0")):
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"HTTP/1.1 "), data[:200]
    return Answer(int(lines[0].split()[1]), _parse_headers(lines[1:]), body)


def _parse_headers(lines: list[bytes]) -> dict[str, str]:
    pairs = (line.decode("latin-1").split(":", 1) for line in lines if b":" in line)
    return {name.strip().lower(): value.strip() for name, value in pairs}


def _alice(stack: Stack) -> str:
    return f"Bearer {stack.keys['alice']}"


# ---- Envoy's own refusals --------------------------------------------------------

REFUSALS = {
    "http/1.0": (b"GET /v1/models HTTP/1.0\r\n\r\n", 426, "upgrade_required"),
    "http/0.9": (b"GET /\r\n\r\n", 426, "upgrade_required"),
    "OPTIONS *": (b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n", 404, "unknown_url"),
    "NUL in a header": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-a: a\x00b\r\n\r\n",
        400,
        "bad_request",
    ),
    "space in a header name": (b"GET / HTTP/1.1\r\nHost: x\r\nx a: b\r\n\r\n", 400, "bad_request"),
    "no host": (b"GET /v1/models HTTP/1.1\r\n\r\n", 400, "bad_request"),
    "garbage": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
    "path without /": (b"GET v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_request"),
    "content-length and chunked": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "bad_request",
    ),
    "bad content-length": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        400,
        "bad_request",
    ),
    "transfer-encoding gzip": (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
        "not_implemented",
    ),
    "websocket upgrade": (
        b"GET /v1/realtime HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        403,
        "upgrade_not_supported",
    ),
    "one huge header": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",
        431,
        "request_header_fields_too_large",
    ),
    "too many headers": (
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"x-h%d: v\r\n" % i for i in range(120))
        + b"\r\n",
        431,
        "request_header_fields_too_large",
    ),
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_envoys_own_refusals_are_json_errors(stack: Stack, name: str) -> None:
    request, status, code = REFUSALS[name]
    answer = http1(stack, request)
    assert answer.status == status, answer
    assert answer.error_code() == code
    error = orjson.loads(answer.body)["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert "param" in error


def test_tollways_own_answers_pass_the_mappers_unchanged(stack: Stack) -> None:
    """ImmediateResponses are local replies too: a mapper must not rewrite them."""
    r = httpx.get(f"{stack.url}/v1/models", timeout=10)
    assert r.status_code == 401
    assert r.content == codec.error_body(auth._MISSING)  # byte for byte what Tollway sent
    h2_answer = h2_request(stack, "/v1/models", method="GET")
    assert (h2_answer.status, h2_answer.body) == (401, codec.error_body(auth._MISSING))


def test_a_routes_direct_response_passes_the_mappers_unchanged(stack: Stack) -> None:
    """The 404 route for unknown URLs answers in its own words (a shape per provider)."""
    rendered = envoyconf.render(stack.gateway.config)
    hcm = rendered["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    routes = hcm["typed_config"]["route_config"]["virtual_hosts"][0]["routes"]
    bodies = {
        r["direct_response"]["body"]["inline_string"].encode()
        for r in routes
        if r.get("direct_response", {}).get("status") == 404
    }
    r = httpx.get(f"{stack.url}/no/such/url", timeout=5)
    assert r.status_code == 404 and r.content in bodies


def test_healthz_is_not_an_error(stack: Stack) -> None:
    r = httpx.get(f"{stack.url}/healthz", timeout=5)
    assert (r.status_code, r.text) == (200, "ok\n")


# ---- header limits and Tollway's edits ----------------------------------------------


def _many_headers(count: int, size: int = 8) -> list[tuple[str, str]]:
    return [(f"x-filler-{i}", "v" * size) for i in range(count)]


@pytest.mark.parametrize("count", [80, 88, 91, 92, 95, 99, 100, 101, 120])
def test_many_request_headers_never_get_a_5xx_on_http1(stack: Stack, count: int) -> None:
    # count client header lines in all, as Envoy's HTTP/1 codec counts them
    lines = [("host", "x"), ("authorization", _alice(stack)), *_many_headers(count - 2)]
    request = b"GET /v1/models HTTP/1.1\r\n" + b"".join(
        f"{name}: {value}\r\n".encode() for name, value in lines
    )
    answer = http1(stack, request + b"\r\n")
    assert answer.status in (200, 431), answer
    if answer.status == 431:
        assert answer.error_code() == "request_header_fields_too_large"
    if count <= 80:
        assert answer.status == 200  # ordinary requests keep well clear of the limit


@pytest.mark.parametrize("count", [80, 94, 95, 100])
def test_many_request_headers_never_get_a_5xx_on_http2(stack: Stack, count: int) -> None:
    # count header fields in all, pseudo-headers included, as Envoy's HTTP/2 codec counts them
    headers = [("authorization", _alice(stack))]  # and :method, :path, :scheme, :authority
    answer = h2_request(stack, "/v1/models", headers + _many_headers(count - 5), method="GET")
    assert answer.status in (200, 431), answer
    if answer.status == 431:
        assert answer.error_code() == "request_header_fields_too_large"


def test_over_the_header_count_on_http2_envoy_resets_the_stream(stack: Stack) -> None:
    """Envoy's HTTP/2 codec answers nothing over max_headers_count: RST_STREAM, documented."""
    headers = [("authorization", _alice(stack))]
    answer = h2_request(stack, "/v1/models", headers + _many_headers(120), method="GET")
    assert answer.status == 0 and answer.reset is not None


def test_large_header_values_near_the_size_limit_never_get_a_5xx(stack: Stack) -> None:
    """Sweep the total header size across Envoy's 60 KiB: each request is a 200 or a 431."""
    seen = set()
    for total in range(60 * 1024 - 800, 60 * 1024 + 100, 20):
        lines = [("host", "x"), ("authorization", _alice(stack))]
        left, i = total, 0
        while left > 0:  # under 8 KiB a line: the demo upstream's own limit
            lines.append((f"x-f{i}", "v" * min(7000, left)))
            left -= 7000
            i += 1
        request = b"GET /v1/models HTTP/1.1\r\n" + b"".join(
            f"{name}: {value}\r\n".encode() for name, value in lines
        )
        answer = http1(stack, request + b"\r\n")
        assert answer.status in (200, 431), (total, answer)
        if answer.status == 431:
            assert answer.error_code() == "request_header_fields_too_large"
        seen.add(answer.status)
    assert seen == {200, 431}


# ---- upstream answers and timeouts are told apart ------------------------------------


class _OddUpstream(BaseHTTPRequestHandler):
    """/odd/status/N answers N with its own JSON; /odd/hang never answers (bounded)."""

    release = threading.Event()

    def do_GET(self) -> None:
        if self.path.startswith("/odd/status/"):
            status = int(self.path.rsplit("/", 1)[1])
            body = b'{"upstream": "its own body"}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            self.release.wait(timeout=15)

    def do_POST(self) -> None:
        """/odd/v1/embeddings: a metered answer with x-lines extra header lines."""
        self.rfile.read(int(self.headers.get("content-length", "0")))
        body = orjson.dumps(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1]}],
                "model": "text-embedding-3-small",
                "usage": {"prompt_tokens": 5, "total_tokens": 5},
            }
        )
        self.send_response(200)  # with server and date: 4 lines and the extra ones
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for i in range(int(self.headers.get("x-lines", "0"))):
            self.send_header(f"x-line-{i}", "v")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def odd_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _OddUpstream)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    def add_odd(config: Config) -> Config:
        odd = Upstream(url=url, api="openai", prefixes=("/odd/",), auth=False, timeout_s=1)
        return config.model_copy(update={"upstreams": {**config.upstreams, "odd": odd}})

    s = start_stack(tmp_path_factory.mktemp("odd"), customize=add_odd)
    yield s
    _OddUpstream.release.set()
    s.gateway.stop()
    server.shutdown()


@pytest.mark.parametrize("status", [400, 403, 404, 500, 503, 504])
def test_an_upstreams_own_error_reaches_the_client_unchanged(odd_stack: Stack, status: int) -> None:
    r = httpx.get(f"{odd_stack.url}/odd/status/{status}", timeout=10)
    assert (r.status_code, r.json()) == (status, {"upstream": "its own body"})


def test_an_upstream_that_times_out_is_504_upstream_error_not_503(odd_stack: Stack) -> None:
    started = time.monotonic()
    r = httpx.get(f"{odd_stack.url}/odd/hang", timeout=10)
    assert r.status_code == 504 and r.json()["error"]["code"] == "upstream_error"
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("lines", [10, 90, 94, 96])
def test_a_response_near_envoys_header_count_is_answered_without_the_cost_header(
    odd_stack: Stack, lines: int
) -> None:
    """Envoy checks the response's header count again after Tollway adds x-tollway-cost-usd."""
    r = httpx.post(
        f"{odd_stack.url}/odd/v1/embeddings",
        json={"model": "text-embedding-3-small", "input": "hi"},
        headers={"x-lines": str(lines)},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 5
    if lines <= 90:
        assert r.headers["x-tollway-cost-usd"]  # room for it: still there


# ---- a stalled Tollway -----------------------------------------------------------------

# envoy.extproc_message_timeout_s (2 s) plus the time a request needs anyway.
FIRST_ANSWER_BOUND_S = 3.5
EJECTED_ANSWER_BOUND_S = 0.5


def test_a_stopped_tollway_fails_closed_fast_with_503_and_recovers(fresh_stack: Stack) -> None:
    stack = fresh_stack
    headers = {"authorization": _alice(stack)}

    def get() -> tuple[httpx.Response, float]:
        started = time.monotonic()
        r = httpx.get(f"{stack.url}/v1/models", headers=headers, timeout=15)
        return r, time.monotonic() - started

    assert get()[0].status_code == 200
    stack.tollway.send_signal(signal.SIGSTOP)  # hung, not dead: its sockets stay open
    try:
        r, took = get()
        assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
        assert took < FIRST_ANSWER_BOUND_S

        # Once the health check ejects the replica, no request waits at all.
        def ejected() -> bool:
            r, took = get()
            assert r.status_code == 503 and took < FIRST_ANSWER_BOUND_S
            return took < EJECTED_ANSWER_BOUND_S

        eventually(ejected, timeout=10)
        for _ in range(5):
            r, took = get()
            assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
            assert took < EJECTED_ANSWER_BOUND_S
    finally:
        stack.tollway.send_signal(signal.SIGCONT)
    eventually(lambda: get()[0].status_code == 200, timeout=10)


# ---- 413 on HTTP/2 -----------------------------------------------------------------------

OVER_LIMIT = 11 * 1024 * 1024


def test_http2_413_is_a_complete_response_then_rst_stream_no_error(stack: Stack) -> None:
    """What is on the wire: Envoy answers early and tells the client to stop sending."""
    answer = h2_request(
        stack,
        "/v1/chat/completions",
        {"authorization": _alice(stack)},
        b"x" * OVER_LIMIT,
        declare_length=True,
    )
    assert answer.status == 413 and answer.error_code() == "request_too_large"
    assert answer.events == ["headers", "end_stream", "rst_stream(NO_ERROR)"]


def test_httpx_http2_reads_the_413_of_a_streamed_body(stack: Stack) -> None:
    chunks = (b"x" * 65536 for _ in range(OVER_LIMIT // 65536))
    with httpx.Client(http1=False, http2=True, timeout=20) as client:
        r = client.post(
            f"{stack.url}/v1/chat/completions",
            content=chunks,
            headers={"authorization": _alice(stack)},
        )
    assert r.http_version == "HTTP/2"
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_httpx_http2_with_a_declared_length_sees_a_protocol_error(stack: Stack) -> None:
    """httpcore keeps sending after the early 413 and fails on the reset stream (README)."""
    with (
        httpx.Client(http1=False, http2=True, timeout=20) as client,
        pytest.raises(httpx.LocalProtocolError),
    ):
        client.post(
            f"{stack.url}/v1/chat/completions",
            content=b"x" * OVER_LIMIT,
            headers={"authorization": _alice(stack)},
        )


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_http2_prior_knowledge_on_a_413(stack: Stack, tmp_path: Path) -> None:
    """Recorded for the README: what this curl makes of the early 413 (status, exit code)."""
    body = tmp_path / "big.bin"
    body.write_bytes(b"x" * OVER_LIMIT)
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "-o",
            str(tmp_path / "out"),
            "-w",
            "%{http_code}",
            "-H",
            f"authorization: {_alice(stack)}",
            "--data-binary",
            f"@{body}",
            f"{stack.url}/v1/chat/completions",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    # Either curl reads the 413 (newer curl), or it reports the reset (curl 7.88: exit 92).
    if result.returncode == 0:
        assert result.stdout == "413"
        assert orjson.loads((tmp_path / "out").read_bytes())["error"]["code"] == "request_too_large"
    else:
        assert result.returncode == 92, result
