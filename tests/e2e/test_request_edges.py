"""Requests at the edges of what Envoy hands ext_proc: trailers, empty bodies, refused bodies.

Each of these once slipped past a decision (a restricted key got a model it may not
use) or was counted for a request that never reached a provider.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from .conftest import PROVIDER_KEY, Stack, eventually
from .h2client import h2_request

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
# What the auth stage answers a restricted key's empty body on a model endpoint (its
# wording is the auth stage's: invalid_body, or missing_model since the classifier).
REFUSED_EMPTY = {"invalid_body", "missing_model"}


def chat_body(model: str, **extra: Any) -> bytes:
    doc = {"model": model, "messages": [{"role": "user", "content": "Hello there"}], **extra}
    return json.dumps(doc).encode()


def error_code(body: bytes) -> str:
    return str(json.loads(body)["error"]["code"])


def bearer(stack: Stack, name: str) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.keys[name]}", "content-type": "application/json"}


def sse_docs(body: bytes) -> list[Any]:
    lines = body.decode().splitlines()
    return [json.loads(line[6:]) for line in lines if line.startswith("data: {")]


def gen_ai_samples(stack: Stack) -> dict[Any, float]:
    return {k: v for k, v in stack.scrape().items() if k[0].startswith("tollway_gen_ai_")}


def settled(stack: Stack) -> None:
    """Tollway has seen every earlier ext_proc stream end.

    Envoy resets a finished request's ext_proc stream before it opens the next on
    the same connection: once a later request is answered, earlier ends are counted.
    """
    r = httpx.get(f"{stack.url}/v1/models", headers=bearer(stack, "alice"), timeout=10)
    assert r.status_code == 200


# ---- HTTP/2 request trailers ------------------------------------------------------


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "no-length"])
def test_trailers_do_not_bypass_the_model_allowlist(stack: Stack, declare_length: bool) -> None:
    stack.clear_upstream_requests()
    answer = h2_request(
        stack,
        CHAT,
        bearer(stack, "restricted"),
        chat_body("gpt-4o"),
        trailers={"x-checksum": "abc"},
        declare_length=declare_length,
    )
    status, body = answer.status, answer.body
    assert (status, error_code(body)) == (403, "model_not_allowed")
    assert stack.upstream_requests() == []  # nothing reached the provider

    answer = h2_request(
        stack,
        CHAT,
        bearer(stack, "restricted"),
        chat_body("gpt-4o-mini"),
        trailers={"x-checksum": "abc"},
        declare_length=declare_length,
    )
    status, body = answer.status, answer.body
    assert status == 200 and json.loads(body)["model"] == "gpt-4o-mini"
    assert len(stack.upstream_requests()) == 1


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "no-length"])
def test_a_stream_with_trailers_is_still_rewritten_and_metered(
    stack: Stack, declare_length: bool
) -> None:
    """Metering's body edit (include_usage, and the new content-length) survives trailers."""
    labels = {"tenant": "acme", "model": "gpt-4o-mini", "provider": "openai", "api": "chat"}
    before = stack.metric("tollway_gen_ai_tokens_total", **labels, type="output", source="reported")
    stack.clear_upstream_requests()
    sent = chat_body("gpt-4o-mini", stream=True)
    answer = h2_request(
        stack,
        CHAT,
        bearer(stack, "alice"),
        sent,
        trailers={"x-checksum": "abc"},
        declare_length=declare_length,
    )
    status, body = answer.status, answer.body
    assert status == 200
    docs = sse_docs(body)
    assert docs and all(doc["choices"] for doc in docs)  # the usage chunk Tollway asked for is gone
    (seen,) = stack.upstream_requests()
    # include_usage was spliced in, and a declared length follows the longer body.
    rewritten = len(sent) + len(b'"stream_options":{"include_usage":true},')
    length = seen["headers"].get("content-length")
    assert int(length) == rewritten if declare_length else length in (None, str(rewritten))
    eventually(
        lambda: (
            stack.metric("tollway_gen_ai_tokens_total", **labels, type="output", source="reported")
            > before
        )
    )


# ---- empty bodies -----------------------------------------------------------------


def test_an_empty_http1_body_is_checked_not_forwarded(stack: Stack) -> None:
    stack.clear_upstream_requests()
    r = httpx.post(
        f"{stack.url}{CHAT}",
        headers={**bearer(stack, "restricted"), "content-length": "0"},
        content=b"",
        timeout=10,
    )
    assert r.status_code == 400 and r.json()["error"]["code"] in REFUSED_EMPTY
    assert stack.upstream_requests() == []


def test_an_http2_request_without_a_body_is_checked_not_forwarded(stack: Stack) -> None:
    stack.clear_upstream_requests()
    answer = h2_request(stack, CHAT, bearer(stack, "restricted"), declare_length=False)
    status, body = answer.status, answer.body
    assert status == 400 and error_code(body) in REFUSED_EMPTY
    assert stack.upstream_requests() == []


def test_an_empty_body_on_an_unrestricted_key_still_reaches_the_upstream(stack: Stack) -> None:
    """Decided at the headers, with the header edits (the provider key) applied."""
    stack.clear_upstream_requests()
    r = httpx.post(
        f"{stack.url}{CHAT}",
        headers={**bearer(stack, "alice"), "content-length": "0"},
        content=b"",
        timeout=10,
    )
    assert r.status_code == 400  # the upstream's own complaint about the body
    (seen,) = stack.upstream_requests()
    assert seen["headers"]["x-tollway-tenant"] == "acme"
    assert stack.keys["alice"] not in json.dumps(seen)


# ---- bodies refused before they are sent --------------------------------------------


def start_chunked(stack: Stack, path: str, headers: dict[str, str]) -> socket.socket:
    """An HTTP/1.1 POST with a chunked body, sent up to its first chunk."""
    parts = urlsplit(stack.url)
    head = [f"POST {path} HTTP/1.1", f"host: {parts.netloc}", "transfer-encoding: chunked"]
    head += [f"{name}: {value}" for name, value in headers.items()]
    start = b'{"model": "gpt-4o", "input": "'
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + b"%x\r\n%s\r\n" % (len(start), start))
    return sock


def send_until_answered(sock: socket.socket, size: int) -> int:
    """Send ``size`` more bytes of body, stopping once Envoy answers; the status."""
    chunk = b"x" * 65536
    piece = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    out, queued, received = bytearray(), 0, b""
    sock.setblocking(False)
    with selectors.DefaultSelector() as selector:
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        while b"\r\n\r\n" not in received:
            ready = selector.select(timeout=10)
            assert ready, "no answer in time"
            for _, events in ready:
                if events & selectors.EVENT_READ:
                    data = sock.recv(65536)
                    assert data, "closed without an answer"
                    received += data
                elif out or queued < size:
                    if not out:
                        out += piece
                        queued += len(chunk)
                    with contextlib.suppress(
                        BlockingIOError, BrokenPipeError, ConnectionResetError
                    ):
                        del out[: sock.send(out)]
                else:
                    selector.modify(sock, selectors.EVENT_READ)
    return int(received.split(b" ", 2)[1])


def chunked_headers(stack: Stack, key: str | None) -> dict[str, str]:
    secret = PROVIDER_KEY if key is None else stack.keys[key]
    return {"content-type": "application/json", "authorization": f"Bearer {secret}"}


def request_headers_seen(stack: Stack) -> float:
    return stack.metric("tollway_extproc_messages_total", kind="request_headers")


@pytest.mark.parametrize(
    ("path", "key"),
    [(CHAT, "alice"), ("/v1/embeddings", None)],
    ids=["chat", "embeddings"],
)
def test_a_chunked_body_over_the_limit_costs_nothing_and_counts_nowhere(
    stack: Stack, path: str, key: str | None
) -> None:
    """Chat: metering waits for the body; embeddings (auth off here): it does not ask.

    Envoy's body_size_limit answers 413 once the body passes max_body_bytes, often
    while Tollway's answer to the headers is still on its way: Tollway then sees the
    stream end with neither a body nor a response.
    """
    settled(stack)
    before = gen_ai_samples(stack)
    with start_chunked(stack, path, chunked_headers(stack, key)) as sock:
        assert send_until_answered(sock, stack.gateway.config.max_body_bytes + (1 << 20)) == 413
    settled(stack)
    assert gen_ai_samples(stack) == before  # no tokens, no cost, no unpriced request


@pytest.mark.parametrize(
    ("path", "key"),
    [(CHAT, "alice"), ("/v1/embeddings", None)],
    ids=["chat", "embeddings"],
)
def test_a_request_abandoned_before_its_body_ended_costs_nothing(
    stack: Stack, path: str, key: str | None
) -> None:
    """The same end, made certain: Tollway has the headers, then the client hangs up."""
    settled(stack)
    before, seen = gen_ai_samples(stack), request_headers_seen(stack)
    with start_chunked(stack, path, chunked_headers(stack, key)):
        eventually(lambda: request_headers_seen(stack) > seen)
    settled(stack)
    assert gen_ai_samples(stack) == before


# ---- bodies metering cannot rewrite, values too long to log -------------------------


def deep_tool(levels: int) -> dict[str, Any]:
    """A tool whose JSON schema nests ``levels`` objects deep (arrays of arrays of ...)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return {"type": "function", "function": {"name": "f", "parameters": schema}}


def test_a_stream_too_deep_to_rewrite_goes_on_unchanged_and_is_estimated(stack: Stack) -> None:
    labels = {"tenant": "acme", "model": "gpt-4o-mini", "provider": "openai", "api": "chat"}

    def estimated() -> float:
        return stack.metric(
            "tollway_gen_ai_tokens_total", **labels, type="output", source="estimated"
        )

    settled(stack)
    before, faults = estimated(), stack.metric("tollway_internal_errors_total")
    stack.clear_upstream_requests()
    body = chat_body(
        "gpt-4o-mini", stream=True, stream_options={"include_usage": False}, tools=[deep_tool(300)]
    )
    r = httpx.post(f"{stack.url}{CHAT}", headers=bearer(stack, "alice"), content=body, timeout=10)
    assert r.status_code == 200, r.text
    assert "".join(doc["choices"][0]["delta"].get("content") or "" for doc in sse_docs(r.content))
    (seen,) = stack.upstream_requests()
    assert int(seen["headers"]["content-length"]) == len(body)  # forwarded as it was sent
    settled(stack)
    assert estimated() > before  # no usage came back: counted from the text delivered
    assert stack.metric("tollway_internal_errors_total") == faults


def test_a_huge_model_name_is_cut_short_in_the_access_log(stack: Stack) -> None:
    model = "m" * (1 << 20)
    body = chat_body(model)
    headers = {**bearer(stack, "alice"), "user-agent": "huge-model-name"}
    r = httpx.post(f"{stack.url}{CHAT}", headers=headers, content=body, timeout=10)
    assert r.status_code == 200

    def entry() -> dict[str, Any] | None:
        found = [e for e in stack.access_log() if e["user_agent"] == "huge-model-name"]
        return found[-1] if found else None

    logged = eventually(entry)
    cut = "m" * 256 + "...[truncated]"
    assert (logged["request_model"], logged["model"]) == (cut, cut)
    line = next(
        line
        for line in (stack.gateway.workdir / "envoy.log").read_text().splitlines()
        if "huge-model-name" in line
    )
    assert len(line) < 4096
