"""The demo upstream, driven by the real openai / anthropic SDKs and raw httpx (Gemini)."""

from __future__ import annotations

import asyncio
import base64
import math
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from google import genai
from google.genai import types as genai_types

from extproc import demo_upstream
from extproc.demo_upstream import REPLY

KEY = "sk-demo-test"
TIMEOUT = 5.0
WORDS = REPLY.split(" ")


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            state["server"], state["port"] = loop.run_until_complete(
                demo_upstream.start("127.0.0.1", 0, provider_key=KEY)
            )
        finally:
            ready.set()
        loop.run_forever()
        loop.run_until_complete(state["server"].close())
        loop.close()

    thread = threading.Thread(target=serve, name="demo-upstream", daemon=True)
    thread.start()
    assert ready.wait(TIMEOUT) and "port" in state, "demo upstream did not start"
    yield state["port"]
    loop.call_soon_threadsafe(loop.stop)
    thread.join(TIMEOUT)
    assert not thread.is_alive()


@pytest.fixture
def oai(port: int) -> Iterator[openai.OpenAI]:
    base = f"http://127.0.0.1:{port}/v1"
    with openai.OpenAI(base_url=base, api_key=KEY, timeout=TIMEOUT, max_retries=0) as client:
        yield client


@pytest.fixture
def claude(port: int) -> Iterator[anthropic.Anthropic]:
    base = f"http://127.0.0.1:{port}"
    with anthropic.Anthropic(base_url=base, api_key=KEY, timeout=TIMEOUT, max_retries=0) as c:
        yield c


@pytest.fixture
def http(port: int) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=TIMEOUT) as client:
        yield client


def prompt_tokens(*texts: str) -> int:
    return max(1, math.ceil(sum(len(t) for t in texts) / 4))


# ------------------------------------------------------------------------------ OpenAI


def test_chat_completion_plain(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": "Say hello, please!"}]},
        ],
    )
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.choices[0].message.content == REPLY
    assert resp.choices[0].finish_reason == "stop"
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens == prompt_tokens("You are terse.", "Say hello, please!") == 8
    assert (usage.completion_tokens, usage.total_tokens) == (12, 20)
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


@pytest.mark.parametrize(
    ("asked", "served"),
    [(None, "default"), ("auto", "default"), ("flex", "flex"), ("priority", "priority")],
)
def test_chat_completion_names_the_tier_that_served_it(
    oai: openai.OpenAI, asked: str | None, served: str
) -> None:
    extra = {} if asked is None else {"service_tier": asked}
    resp = oai.chat.completions.create(
        model="o4-mini",
        messages=[{"role": "user", "content": "hi"}],
        **extra,  # type: ignore[arg-type]
    )
    assert resp.service_tier == served
    stream = oai.chat.completions.create(
        model="o4-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        **extra,  # type: ignore[arg-type]
    )
    assert {chunk.service_tier for chunk in stream} == {served}


def test_chat_completion_max_tokens_truncates(oai: openai.OpenAI) -> None:
    resp = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert resp.choices[0].message.content == "Hello from Tollway's"
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (1, 3)


def test_chat_completion_cached_and_reasoning_variants(oai: openai.OpenAI) -> None:
    text = "x" * 400  # 100 prompt tokens
    cached = oai.chat.completions.create(
        model="demo-cached", messages=[{"role": "user", "content": text}]
    ).usage
    assert cached is not None and cached.prompt_tokens_details is not None
    assert (cached.prompt_tokens, cached.prompt_tokens_details.cached_tokens) == (100, 50)

    long_prompt = oai.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "y" * 4100}]
    ).usage
    assert long_prompt is not None and long_prompt.prompt_tokens_details is not None
    assert (long_prompt.prompt_tokens, long_prompt.prompt_tokens_details.cached_tokens) == (
        1025,
        512,
    )

    reasoning = oai.chat.completions.create(
        model="o3-mini", messages=[{"role": "user", "content": text}], max_completion_tokens=10
    ).usage
    assert reasoning is not None and reasoning.completion_tokens_details is not None
    assert reasoning.completion_tokens == 10
    assert reasoning.completion_tokens_details.reasoning_tokens == 5
    assert reasoning.prompt_tokens_details is not None
    assert reasoning.prompt_tokens_details.cached_tokens == 0


def test_chat_completion_stream_include_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-5-mini",
        messages=[{"role": "user", "content": "abcdefgh"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        2,
        12,
        14,
    )
    assert last.usage.completion_tokens_details is not None
    assert last.usage.completion_tokens_details.reasoning_tokens == 6  # gpt-5* reasons
    assert all(c.usage is None for c in body)
    assert body[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in body) == REPLY
    assert [c.choices[0].finish_reason for c in body][-2:] == [None, "stop"]


def test_chat_completion_stream_wire_format(http: httpx.Client) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    plain = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    raw = http.post("/v1/chat/completions", json=plain, headers=auth)
    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = raw.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [orjson.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert len(payloads) == 1 + len(WORDS) + 1  # role, one per word, finish
    assert all("usage" not in p for p in payloads)  # no include_usage -> no usage key at all

    with_usage = {**plain, "stream_options": {"include_usage": True}}
    text = http.post("/v1/chat/completions", json=with_usage, headers=auth).text
    payloads = [orjson.loads(e.removeprefix("data: ")) for e in text.split("\n\n")[:-2]]
    assert all(p["usage"] is None for p in payloads[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 12


def test_legacy_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(model="gpt-3.5-turbo-instruct", prompt="abcd" * 3, max_tokens=5)
    assert resp.object == "text_completion"
    assert resp.choices[0].text == " ".join(WORDS[:5])
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, 5)

    stream = oai.completions.create(
        model="gpt-3.5-turbo-instruct",
        prompt=["one", "two"],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == REPLY
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (2, 12)


def test_embeddings(oai: openai.OpenAI, http: httpx.Client) -> None:
    resp = oai.embeddings.create(model="text-embedding-3-small", input=["hello", "world!"])
    assert [d.index for d in resp.data] == [0, 1]
    first, second = (d.embedding for d in resp.data)
    assert len(first) == len(second) == 8
    assert first != second
    assert math.isclose(math.fsum(x * x for x in first), 1.0, rel_tol=1e-4)
    assert resp.usage.prompt_tokens == resp.usage.total_tokens == prompt_tokens("hello", "world!")

    again = oai.embeddings.create(model="text-embedding-3-small", input="hello")
    assert again.data[0].embedding == pytest.approx(first, abs=1e-6)  # deterministic

    raw = http.post(
        "/v1/embeddings",
        json={"model": "e", "input": "hello", "encoding_format": "float"},
        headers={"authorization": f"Bearer {KEY}"},
    ).json()
    assert raw["data"][0]["embedding"] == pytest.approx(first, abs=1e-6)
    b64 = http.post(
        "/v1/embeddings",
        json={"model": "e", "input": "hello", "encoding_format": "base64"},
        headers={"authorization": f"Bearer {KEY}"},
    ).json()
    decoded = struct.unpack("<8f", base64.b64decode(b64["data"][0]["embedding"]))
    assert list(decoded) == pytest.approx(first, abs=1e-6)


def test_responses_plain(oai: openai.OpenAI) -> None:
    resp = oai.responses.create(model="gpt-5-mini", instructions="be brief", input="hi there")
    assert resp.status == "completed"
    assert resp.output_text == REPLY
    assert [item.type for item in resp.output] == ["reasoning", "message"]
    usage = resp.usage
    assert usage is not None
    assert usage.input_tokens == prompt_tokens("be brief", "hi there") == 4
    assert (usage.output_tokens, usage.total_tokens) == (12, 16)
    assert usage.output_tokens_details.reasoning_tokens == 6
    assert usage.input_tokens_details.cached_tokens == 0

    short = oai.responses.create(
        model="demo-cached",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "z" * 40}]}],
        max_output_tokens=2,
    )
    assert short.status == "incomplete"
    assert short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.output_text == "Hello from"
    assert short.usage is not None
    assert (short.usage.input_tokens, short.usage.input_tokens_details.cached_tokens) == (10, 5)
    assert short.usage.output_tokens_details.reasoning_tokens == 0


def test_responses_streaming(oai: openai.OpenAI) -> None:
    events = list(oai.responses.create(model="gpt-4o-mini", input="hello", stream=True))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == REPLY and len(deltas) == 12
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None
    assert (final.response.usage.input_tokens, final.response.usage.output_tokens) == (2, 12)

    # The SDK's stateful stream helper must accept the event sequence (reasoning item first).
    with oai.responses.stream(model="o4-mini", input="hello") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        response = stream.get_final_response()
    assert text == response.output_text == REPLY
    assert response.usage is not None
    assert response.usage.output_tokens_details.reasoning_tokens == 6


def test_models_list(oai: openai.OpenAI) -> None:
    ids = [m.id for m in oai.models.list()]
    assert "gpt-4o-mini" in ids and len(ids) >= 3


# --------------------------------------------------------------------------- Anthropic


def test_anthropic_messages_plain(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model="claude-demo-sonnet",
        max_tokens=100,
        system="Be nice.",
        messages=[{"role": "user", "content": "hello world!"}],
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.content[0].type == "text" and msg.content[0].text == REPLY
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == prompt_tokens("Be nice.", "hello world!") == 5
    assert msg.usage.output_tokens == 12
    assert msg.usage.cache_read_input_tokens == 0
    assert msg.usage.cache_creation_input_tokens == 0


def test_anthropic_cache_usage(claude: anthropic.Anthropic) -> None:
    msg = claude.messages.create(
        model="claude-cached-cache-write",
        max_tokens=4,
        messages=[{"role": "user", "content": [{"type": "text", "text": "q" * 400}]}],
    )
    usage = msg.usage  # P = 100: read 50, creation (100 - 50) // 2 = 25, uncached 25
    assert (usage.cache_read_input_tokens, usage.cache_creation_input_tokens) == (50, 25)
    assert (usage.input_tokens, usage.output_tokens) == (25, 4)
    assert msg.stop_reason == "max_tokens"
    assert msg.content[0].type == "text" and msg.content[0].text == " ".join(WORDS[:4])


def test_anthropic_messages_stream(claude: anthropic.Anthropic, http: httpx.Client) -> None:
    with claude.messages.stream(
        model="claude-demo-haiku", max_tokens=64, messages=[{"role": "user", "content": "abcd"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (1, 12)

    raw = http.post(
        "/v1/messages",
        json={
            "model": "claude-demo-haiku",
            "max_tokens": 64,
            "stream": True,
            "messages": [{"role": "user", "content": "abcd"}],
        },
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"},
    )
    blocks = [b for b in raw.text.split("\n\n") if b]
    names = [b.split("\n")[0].removeprefix("event: ") for b in blocks]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 12,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    data = [orjson.loads(b.split("\n")[1].removeprefix("data: ")) for b in blocks]
    assert [d["type"] for d in data] == names
    start_usage = data[0]["message"]["usage"]
    assert start_usage["output_tokens"] == 1
    assert start_usage["input_tokens"] == 1
    assert start_usage["cache_read_input_tokens"] == start_usage["cache_creation_input_tokens"] == 0
    assert data[-2]["usage"] == {"output_tokens": 12}


# ------------------------------------------------------------------------------ Gemini


def test_gemini_generate_content(http: httpx.Client) -> None:
    resp = http.post(
        "/v1beta/models/gemini-2.5-flash:generateContent",
        json={
            "systemInstruction": {"parts": [{"text": "Be nice."}]},
            "contents": [{"role": "user", "parts": [{"text": "hello world!"}]}],
            "generationConfig": {"maxOutputTokens": 7},
        },
        headers={"x-goog-api-key": KEY},
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    candidate = body["candidates"][0]
    assert candidate["content"]["role"] == "model"
    assert candidate["content"]["parts"][0]["text"] == " ".join(WORDS[:7])
    assert candidate["finishReason"] == "MAX_TOKENS"
    usage = body["usageMetadata"]
    assert (usage["promptTokenCount"], usage["candidatesTokenCount"]) == (5, 7)
    assert usage["totalTokenCount"] == 12
    assert "cachedContentTokenCount" not in usage and "thoughtsTokenCount" not in usage


def test_gemini_stream_generate_content_sse(http: httpx.Client) -> None:
    resp = http.post(
        "/v1beta/models/gemini-2.5-flash-thinking-cached:streamGenerateContent",
        params={"alt": "sse"},
        json={"contents": [{"role": "user", "parts": [{"text": "p" * 80}]}]},
        headers={"x-goog-api-key": KEY},
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.text.endswith("\r\n\r\n")
    chunks = [orjson.loads(c.removeprefix("data: ")) for c in resp.text.split("\r\n\r\n") if c]
    assert len(chunks) == 12
    text = "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks)
    assert text == REPLY
    assert all("finishReason" not in c["candidates"][0] for c in chunks[:-1])
    assert chunks[-1]["candidates"][0]["finishReason"] == "STOP"
    assert all("usageMetadata" in c for c in chunks)
    usage = chunks[-1]["usageMetadata"]  # P = 20, C = 12, thoughts 6 on top, cached 10 of P
    assert usage["promptTokenCount"] == 20
    assert usage["candidatesTokenCount"] == 12
    assert usage["thoughtsTokenCount"] == 6
    assert usage["cachedContentTokenCount"] == 10
    assert usage["totalTokenCount"] == 20 + 12 + 6


def test_gemini_sdk_on_v1_and_v1beta(port: int, http: httpx.Client) -> None:
    """google-genai as users configure it: the same answers on /v1/ and /v1beta/ paths."""
    http.delete("/__demo/requests")
    answers = {}
    for version in ("v1", "v1beta"):
        options = genai_types.HttpOptions(
            base_url=f"http://127.0.0.1:{port}", api_version=version, timeout=int(TIMEOUT * 1000)
        )
        client = genai.Client(api_key=KEY, http_options=options)
        resp = client.models.generate_content(model="gemini-2.5-flash", contents="hello world!")
        streamed = client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi")
        answers[version] = (resp.text, "".join(c.text or "" for c in streamed))
        assert resp.usage_metadata is not None
        assert resp.usage_metadata.prompt_token_count == prompt_tokens("hello world!") == 3
        assert resp.usage_metadata.candidates_token_count == 12
    assert answers["v1"] == answers["v1beta"] == (REPLY, REPLY)
    paths = [r["path"] for r in http.get("/__demo/requests").json()]
    assert "/v1/models/gemini-2.5-flash:generateContent" in paths
    assert "/v1/models/gemini-2.5-flash:streamGenerateContent" in paths
    assert "/v1beta/models/gemini-2.5-flash:generateContent" in paths


def test_gemini_model_list(port: int, http: httpx.Client) -> None:
    raw = http.get("/v1beta/models", headers={"x-goog-api-key": KEY})
    assert raw.status_code == 200, raw.text
    models = raw.json()["models"]
    assert all(m["name"].startswith("models/") for m in models)
    assert all("generateContent" in m["supportedGenerationMethods"] for m in models)
    for version in ("v1", "v1beta"):  # GET /v1/models with a Gemini key is Gemini's, too
        options = genai_types.HttpOptions(base_url=f"http://127.0.0.1:{port}", api_version=version)
        client = genai.Client(api_key=KEY, http_options=options)
        names = [m.name for m in client.models.list()]
        assert "models/gemini-2.5-flash" in names
        assert client.models.get(model="gemini-2.5-pro").name == "models/gemini-2.5-pro"


def test_anthropic_version_selects_anthropic_shapes(
    claude: anthropic.Anthropic, oai: openai.OpenAI, http: httpx.Client
) -> None:
    """`GET /v1/models` with `anthropic-version` is Anthropic's list; without it, OpenAI's."""
    listed = list(claude.models.list())
    assert [m.type for m in listed] == ["model"] * len(listed) and listed
    assert all(m.id.startswith("claude-") and m.display_name for m in listed)
    raw = http.get("/v1/models", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    body = raw.json()
    assert set(body) == {"data", "has_more", "first_id", "last_id"}
    assert body["has_more"] is False
    assert (body["first_id"], body["last_id"]) == (body["data"][0]["id"], body["data"][-1]["id"])
    assert set(body["data"][0]) == {"type", "id", "display_name", "created_at"}
    assert "gpt-4o-mini" in [m.id for m in oai.models.list()]  # no anthropic-version: OpenAI
    # An Anthropic request for an endpoint the demo lacks is Anthropic's 404, not OpenAI's.
    missing = http.get("/v1/files", headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert missing.status_code == 404 and missing.json()["type"] == "error"


def test_sse_paced_whole_and_chunked_request_body(http: httpx.Client) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    plain = http.post("/v1/chat/completions", json=body, headers=auth)
    paced = http.post(
        "/v1/chat/completions", json=body, headers={**auth, demo_upstream.CHUNK_HEADER: "7"}
    )
    whole = http.post(
        "/v1/chat/completions", json=body, headers={**auth, demo_upstream.WHOLE_HEADER: "1"}
    )
    strip = [ln for ln in plain.text.split("\n") if '"id"' not in ln]
    assert len(strip) == len([ln for ln in paced.text.split("\n") if '"id"' not in ln])
    assert paced.headers["transfer-encoding"] == "chunked"
    assert int(whole.headers["content-length"]) == len(whole.content)
    assert whole.text.endswith("data: [DONE]\n\n") and paced.text.endswith("data: [DONE]\n\n")

    def pieces() -> Iterator[bytes]:  # no content-length: httpx sends it chunked
        yield b'{"model": "m", "messages": [{"role": "user",'
        yield b' "content": "abcdefgh"}]}'

    chunked = http.post("/v1/chat/completions", content=pieces(), headers=auth)
    assert chunked.status_code == 200, chunked.text
    assert chunked.json()["usage"]["prompt_tokens"] == 2


def test_body_over_the_limit_is_413_in_the_provider_format(http: httpx.Client) -> None:
    big = b"x" * (demo_upstream.MAX_BODY_BYTES + 1)
    resp = http.post("/v1/messages", content=big, headers={"x-api-key": KEY})
    assert resp.status_code == 413
    assert resp.json()["error"]["type"] == "request_too_large"
    assert http.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


# ------------------------------------------------------------------------ errors, auth


def test_wrong_key_is_401_in_each_provider_format(port: int, http: httpx.Client) -> None:
    bad_oai = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", timeout=TIMEOUT, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError) as oai_err:
        bad_oai.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert oai_err.value.status_code == 401
    assert oai_err.value.code == "invalid_api_key"
    assert oai_err.value.type == "invalid_request_error"
    bad_oai.close()

    bad_claude = anthropic.Anthropic(
        base_url=f"http://127.0.0.1:{port}", api_key="sk-wrong", timeout=TIMEOUT, max_retries=0
    )
    with pytest.raises(anthropic.AuthenticationError) as claude_err:
        bad_claude.messages.create(
            model="m", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert claude_err.value.status_code == 401
    assert claude_err.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "invalid x-api-key"},
    }
    bad_claude.close()

    gemini = http.post(
        "/v1beta/models/gemini-2.5-flash:generateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "wrong"},
    )
    assert gemini.status_code == 401
    assert gemini.json()["error"]["status"] == "UNAUTHENTICATED"
    assert gemini.json()["error"]["code"] == 401

    # The right key in another provider's header does not count.
    misplaced = http.post("/v1/chat/completions", json={}, headers={"x-api-key": KEY})
    assert misplaced.status_code == 401
    # Anthropic: x-api-key wins over a Bearer token when both are sent.
    both = http.post(
        "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": "wrong", "authorization": f"Bearer {KEY}"},
    )
    assert both.status_code == 401
    raw_key = http.post(
        "/v1/messages",
        json={"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        headers={"x-api-key": KEY},
    )
    assert raw_key.status_code == 200


def test_malformed_json_is_400_in_each_provider_format(http: httpx.Client) -> None:
    oai = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"authorization": f"Bearer {KEY}"}
    )
    assert oai.status_code == 400
    assert oai.json()["error"]["type"] == "invalid_request_error"

    claude = http.post("/v1/messages", content=b"[1, 2", headers={"x-api-key": KEY})
    assert claude.status_code == 400
    assert claude.json()["type"] == "error"
    assert claude.json()["error"]["type"] == "invalid_request_error"

    gemini = http.post(
        "/v1beta/models/g:generateContent", content=b"\xff\xfe", headers={"x-goog-api-key": KEY}
    )
    assert gemini.status_code == 400
    assert gemini.json()["error"]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", []),
        ("/v1/chat/completions", {"model": "m"}),
        ("/v1/chat/completions", {"model": 3, "messages": [{"content": "x"}]}),
        ("/v1/chat/completions", {"model": "m", "messages": [{}], "max_tokens": "9"}),
        ("/v1/chat/completions", {"model": "m", "messages": [{}], "max_tokens": 0}),
        ("/v1/completions", {"model": "m", "prompt": 5}),
        ("/v1/embeddings", {"model": "m", "input": []}),
        ("/v1/embeddings", {"model": "m", "input": "x", "encoding_format": "int8"}),
        ("/v1/responses", {"model": "m", "max_output_tokens": True}),
        ("/v1/messages", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
        ("/v1beta/models/g:generateContent", {"contents": "x"}),
        ("/v1beta/models/g:generateContent", {"contents": [{}], "generationConfig": 1}),
    ],
)
def test_invalid_requests_are_400_not_500(http: httpx.Client, path: str, body: Any) -> None:
    # Each API's own key header (an x-goog-api-key would make any request Gemini's).
    if path.startswith("/v1beta/"):
        headers = {"x-goog-api-key": KEY}
    elif path == "/v1/messages":
        headers = {"x-api-key": KEY}
    else:
        headers = {"authorization": f"Bearer {KEY}"}
    resp = http.post(path, json=body, headers=headers)
    assert resp.status_code == 400, resp.text
    assert "error" in resp.json()


def test_unknown_path_is_openai_style_404(http: httpx.Client) -> None:
    resp = http.post("/v1/nope", json={})
    assert resp.status_code == 404
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["type"] == "invalid_request_error"
    unknown_method = http.post(
        "/v1beta/models/g:bogusMethod", json={}, headers={"x-goog-api-key": KEY}
    )
    assert unknown_method.status_code == 404
    assert unknown_method.json()["error"]["status"] == "NOT_FOUND"


def test_request_recording(http: httpx.Client, oai: openai.OpenAI) -> None:
    assert http.delete("/__demo/requests").status_code == 204
    assert http.get("/__demo/requests").json() == []
    oai.models.list(extra_headers={"X-Tollway-Trace": "abc123"})
    http.post("/v1beta/models/g:streamGenerateContent?alt=sse", content=b"{}")  # 401, still kept
    records = http.get("/__demo/requests").json()
    assert [(r["method"], r["path"], r["query"]) for r in records] == [
        ("GET", "/v1/models", ""),
        ("POST", "/v1beta/models/g:streamGenerateContent", "alt=sse"),
    ]
    headers = records[0]["headers"]
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["x-tollway-trace"] == "abc123"
    assert all(name == name.lower() for name in headers)
    assert records[0]["body"] == "" and records[1]["body"] == "{}"


def test_echo_answers_with_the_prompt_text_in_every_api(
    oai: openai.OpenAI, claude: anthropic.Anthropic, http: httpx.Client
) -> None:
    echo = {"x-demo-echo": "1"}
    chat = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi  there"},
        ],
        extra_headers=echo,
    )
    assert chat.choices[0].message.content == "Be brief.\nHi  there"
    assert chat.choices[0].finish_reason == "stop" and chat.usage is not None
    assert chat.usage.completion_tokens == 4  # one a word
    stream = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": [{"type": "text", "text": "one two three"}]}],
        stream=True,
        extra_headers=echo,
    )
    pieces = [
        c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content
    ]
    assert pieces == ["one", " two", " three"]
    message = claude.messages.create(
        model="claude-3-5-haiku",
        max_tokens=50,
        system="S",
        messages=[{"role": "user", "content": [{"type": "text", "text": "A b"}]}],
        extra_headers=echo,
    )
    assert message.content[0].text == "S\nA b"  # type: ignore[union-attr]
    reply = oai.responses.create(
        model="gpt-4o-mini", instructions="I", input="R s", extra_headers=echo
    )
    assert reply.output_text == "I\nR s"
    gemini = http.post(
        "/v1beta/models/gemini-2.0-flash:generateContent",
        headers={"x-goog-api-key": KEY, **echo},
        json={"contents": [{"role": "user", "parts": [{"text": "G h"}]}]},
    ).json()
    assert gemini["candidates"][0]["content"]["parts"][0]["text"] == "G h"


def test_reply_header_sets_the_answer(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "anything"}],
        extra_headers={"x-demo-reply": "Call me at +1 415 555 0100"},
    )
    assert chat.choices[0].message.content == "Call me at +1 415 555 0100"


def test_recording_keeps_last_100(http: httpx.Client) -> None:
    http.delete("/__demo/requests")
    for i in range(105):
        http.get(f"/v1/models?i={i}")
    records = http.get("/__demo/requests").json()
    assert len(records) == 100
    assert records[0]["query"] == "i=5" and records[-1]["query"] == "i=104"


def test_run_prints_one_line_and_stops_on_sigterm() -> None:
    code = "from extproc.demo_upstream import run; run('127.0.0.1', 0, 'k')"
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("demo upstream listening on http://127.0.0.1:")
        bound = int(line.strip().rsplit(":", 1)[1])
        models = httpx.get(
            f"http://127.0.0.1:{bound}/v1/models",
            headers={"authorization": "Bearer k"},
            timeout=TIMEOUT,
        )
        assert models.status_code == 200
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
    assert proc.returncode == 0
    assert out == "" and err == ""


# ---- Azure OpenAI ---------------------------------------------------------------------

AZURE_VERSION = "2024-10-21"


def azure(port: int) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=f"http://127.0.0.1:{port}",
        api_version=AZURE_VERSION,
        api_key=KEY,
        timeout=TIMEOUT,
        max_retries=0,
    )


def test_azure_deployments_answer_with_the_deployments_model(port: int) -> None:
    """AzureOpenAI sends /openai/deployments/{model}/...?api-version= with an api-key header;
    the answer names the model the deployment serves, not the deployment."""
    client = azure(port)
    chat = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.model == "gpt-4o-mini-2024-07-18"
    assert chat.choices[0].message.content == REPLY
    assert chat.usage is not None and chat.usage.prompt_tokens == prompt_tokens("hi")
    assert chat.usage.completion_tokens == len(WORDS)
    extra = chat.model_extra or {}
    assert extra["prompt_filter_results"][0]["content_filter_results"]["hate"]["filtered"] is False
    legacy = client.completions.create(model="my-instruct", prompt="abcd", max_tokens=3)
    assert (legacy.model, legacy.usage and legacy.usage.completion_tokens) == ("my-instruct", 3)
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert vectors.model == "text-embedding-3-small" and len(vectors.data) == 2
    # The Responses API is not under a deployment: /openai/responses?api-version=...
    answer = client.responses.create(model="reasoner", input="hello")
    assert answer.model == "o4-mini-2025-04-16"
    assert answer.usage is not None and answer.usage.output_tokens_details.reasoning_tokens == 6


def test_azure_stream_opens_with_the_prompt_filter_chunk(port: int, http: httpx.Client) -> None:
    response = http.post(
        "/openai/deployments/chat/chat/completions",
        params={"api-version": AZURE_VERSION},
        headers={"api-key": KEY},
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
              "stream_options": {"include_usage": True}},
    )  # fmt: skip
    assert response.status_code == 200
    lines = [x for x in response.text.split("\n\n") if x]
    assert lines[-1] == "data: [DONE]"
    docs = [orjson.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    assert docs[0]["choices"] == [] and docs[0]["model"] == ""
    assert docs[0]["prompt_filter_results"][0]["prompt_index"] == 0
    assert {d["model"] for d in docs[1:]} == {"gpt-4o-mini-2024-07-18"}
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in docs[1:-1]) == REPLY
    assert docs[-1]["choices"] == [] and docs[-1]["usage"]["completion_tokens"] == len(WORDS)
    # The SDK reads the same stream (the first chunk has no choices, as on Azure).
    chunks = list(
        azure(int(http.base_url.port or 0)).chat.completions.create(
            model="prod-4o", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks[0].choices == []
    assert "".join(c.choices[0].delta.content or "" for c in chunks[1:]) == REPLY


def test_azure_v1_api_takes_the_deployment_from_the_body(port: int) -> None:
    """OpenAI(base_url=".../openai/v1"): no api-version needed, a Bearer key is accepted."""
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT
    )
    chat = client.chat.completions.create(
        model="prod-4o", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.model == "gpt-4o-2024-11-20"
    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(WORDS)
    assert client.responses.create(model="gpt-4.1", input="x").model == "gpt-4.1"
    assert client.embeddings.create(model="embed", input="x").usage.prompt_tokens == 1
    assert [m.id for m in client.models.list()]


def test_azure_errors_in_azures_shape(http: httpx.Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    path = "/openai/deployments/chat/chat/completions"
    missing = http.post(path, headers={"api-key": KEY}, json=body)
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "404", "message": "Resource not found"}}
    wrong = http.post(
        path, params={"api-version": AZURE_VERSION}, headers={"api-key": "x"}, json=body
    )
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "401"
    bearer = http.post(
        path, params={"api-version": AZURE_VERSION}, headers={"authorization": f"Bearer {KEY}"},
        json=body,
    )  # fmt: skip
    assert bearer.status_code == 200  # an Entra ID token, in the demo the provider key
    unknown = http.post("/openai/deployments/chat/nope", params={"api-version": "x"}, json={})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "404"


# ---- Vertex AI ------------------------------------------------------------------------

VERTEX = "/v1/projects/demo-project/locations/us-central1/publishers/google/models"


def vertex(port: int, version: str | None = None) -> genai.Client:
    """google-genai as Vertex AI users configure it, with a fixed OAuth access token."""
    from google.oauth2.credentials import Credentials

    options: dict[str, Any] = {"base_url": f"http://127.0.0.1:{port}"}
    if version is not None:
        options["api_version"] = version
    return genai.Client(
        vertexai=True,
        project="demo-project",
        location="us-central1",
        credentials=Credentials(token=KEY),  # type: ignore[no-untyped-call]
        http_options=options,
    )


@pytest.mark.parametrize("version", [None, "v1"])  # the SDK's default for Vertex is v1beta1
def test_vertex_generate_content_with_the_sdk(
    port: int, http: httpx.Client, version: str | None
) -> None:
    http.delete("/__demo/requests")
    client = vertex(port, version)  # held: a client collected mid-call closes its connection
    reply = client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert reply.text == REPLY
    assert reply.model_version == "gemini-2.0-flash-001"  # Vertex answers with the version
    assert reply.usage_metadata is not None
    assert reply.usage_metadata.prompt_token_count == prompt_tokens("hi")
    assert reply.usage_metadata.candidates_token_count == len(WORDS)
    assert reply.usage_metadata.traffic_type == genai_types.TrafficType.ON_DEMAND
    (sent,) = [r for r in http.get("/__demo/requests").json() if "generate" in r["path"]]
    assert sent["path"] == (
        f"/{version or 'v1beta1'}/projects/demo-project/locations/us-central1"
        "/publishers/google/models/gemini-2.0-flash:generateContent"
    )
    assert sent["headers"]["authorization"] == f"Bearer {KEY}"


def test_vertex_stream_reports_usage_in_its_last_chunk(port: int, http: httpx.Client) -> None:
    client = vertex(port)
    stream = client.models.generate_content_stream(
        model="gemini-2.5-flash-thinking", contents="hello"
    )
    chunks = list(stream)
    assert "".join(c.text or "" for c in chunks) == REPLY
    assert all(c.usage_metadata is None for c in chunks[:-1])
    last = chunks[-1].usage_metadata
    assert last is not None and last.candidates_token_count == len(WORDS)
    assert last.thoughts_token_count == len(WORDS) // 2
    # Without ?alt=sse, the same chunks as one JSON array.
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    auth = {"authorization": f"Bearer {KEY}"}
    array = http.post(f"{VERTEX}/gemini-2.5-pro:streamGenerateContent", headers=auth, json=body)
    assert array.status_code == 200
    docs = array.json()
    assert "usageMetadata" not in docs[0] and docs[-1]["usageMetadata"]["totalTokenCount"] == (
        prompt_tokens("hello") + len(WORDS)
    )
    assert {d["modelVersion"] for d in docs} == {"gemini-2.5-pro"}
    sse = http.post(
        f"/v1beta1{VERTEX.removeprefix('/v1')}/gemini-2.5-pro:streamGenerateContent?alt=sse",
        headers=auth,
        json=body,
    )
    assert sse.headers["content-type"].startswith("text/event-stream")
    events = [orjson.loads(e.removeprefix("data: ")) for e in sse.text.split("\r\n\r\n") if e]
    assert [e["candidates"] for e in events] == [d["candidates"] for d in docs]


def test_vertex_express_mode_and_errors(port: int, http: httpx.Client) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    express = http.post(
        "/v1/publishers/google/models/gemini-2.5-flash:generateContent",
        headers={"x-goog-api-key": KEY},
        json=body,
    )
    assert express.status_code == 200 and express.json()["modelVersion"] == "gemini-2.5-flash"
    wrong = http.post(
        f"{VERTEX}/gemini-2.5-flash:generateContent",
        headers={"authorization": "Bearer x"},
        json=body,
    )
    assert wrong.status_code == 401
    assert wrong.json()["error"]["status"] == "UNAUTHENTICATED"
    assert "OAuth 2 access token" in wrong.json()["error"]["message"]
    unknown = http.post(f"{VERTEX}/gemini-2.5-flash:countTokens", json=body)
    assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"


# ---- Claude on Vertex AI ---------------------------------------------------------------


def anthropic_vertex(port: int) -> anthropic.AnthropicVertex:
    """anthropic's Vertex client as its users configure it, with a fixed access token."""
    return anthropic.AnthropicVertex(
        region="us-east5",
        project_id="demo-project",
        access_token=KEY,
        base_url=f"http://127.0.0.1:{port}/v1",
        max_retries=0,
    )


def test_claude_on_vertex_with_the_sdk(port: int) -> None:
    client = anthropic_vertex(port)
    message = client.messages.create(
        model="claude-sonnet-4-5@20250929",
        max_tokens=64,
        messages=[{"role": "user", "content": "Say hello, please!"}],
    )
    assert message.model == "claude-sonnet-4-5"
    assert message.content[0].type == "text" and message.content[0].text == REPLY
    assert message.usage.output_tokens == 12
    with client.messages.stream(
        model="claude-sonnet-4-5@20250929",
        max_tokens=64,
        messages=[{"role": "user", "content": "Say hello, please!"}],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == REPLY and final.usage.output_tokens == 12


def test_claude_on_vertex_wants_an_anthropic_version_in_the_body(http: httpx.Client) -> None:
    path = (
        "/v1/projects/demo-project/locations/us-east5/publishers/anthropic/models/"
        "claude-sonnet-4-5@20250929:rawPredict"
    )
    body = {"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    headers = {"authorization": f"Bearer {KEY}"}
    assert http.post(path, headers=headers, json=body).status_code == 400
    body["anthropic_version"] = "vertex-2023-10-16"
    assert http.post(path, headers=headers, json=body).status_code == 200
    assert http.post(path, headers={"authorization": "Bearer x"}, json=body).status_code == 401
