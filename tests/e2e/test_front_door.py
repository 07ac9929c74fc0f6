"""Through the real front door: Envoy 1.40 + Tollway + the demo upstream, real SDKs."""

from __future__ import annotations

from dataclasses import replace
from decimal import Decimal
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest

from .conftest import PROVIDER_KEY, Stack, eventually
from .h2client import h2_request

pytestmark = pytest.mark.e2e

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hello there"}]}


def oai(stack: Stack, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=10)


def post(stack: Stack, path: str, headers: dict[str, str], json: Any = CHAT) -> httpx.Response:
    return httpx.post(f"{stack.url}{path}", headers=headers, json=json, timeout=10)


def chat_status(url: str, key: str) -> int:
    """The status of a chat completion with ``key`` at the front door ``url`` (0: none)."""
    try:
        return httpx.post(
            f"{url}/v1/chat/completions",
            json=CHAT,
            headers={"authorization": f"Bearer {key}"},
            timeout=5,
        ).status_code
    except httpx.HTTPError:
        return 0


# ---- allowed traffic -----------------------------------------------------------


def test_openai_sdk_chat_plain_and_streamed(stack: Stack) -> None:
    client = oai(stack, stack.keys["alice"])
    reply = client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert "demo upstream" in reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.prompt_tokens > 0

    chunks = list(
        client.chat.completions.create(**CHAT, stream=True, stream_options={"include_usage": True})
    )  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_anthropic_sdk_messages_plain_and_streamed(stack: Stack) -> None:
    client = anthropic.Anthropic(
        base_url=stack.url, api_key=stack.keys["alice"], max_retries=0, timeout=10
    )
    args: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}],
    }
    message = client.messages.create(**args)
    assert message.content[0].type == "text" and "demo upstream" in message.content[0].text
    with client.messages.stream(**args) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == message.content[0].text
    assert final.usage.output_tokens == message.usage.output_tokens


def test_gemini_generate_content_with_goog_api_key(stack: Stack) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "Hello"}]}]}
    r = post(
        stack,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {"x-goog-api-key": stack.keys["alice"]},
        body,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usageMetadata"]["promptTokenCount"] > 0


def test_key_accepted_in_azure_style_header(stack: Stack) -> None:
    r = post(stack, "/v1/chat/completions", {"api-key": stack.keys["alice"]})
    assert r.status_code == 200, r.text


# ---- denials --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({}, "missing_api_key"),
        ({"authorization": "Bearer tw_000000000000_" + "A" * 43}, "invalid_api_key"),
        ({"authorization": "Bearer sk-not-a-tollway-key"}, "invalid_api_key"),
        ({"authorization": "Basic dXNlcjpwYXNz"}, "invalid_authorization_header"),
        ({"authorization": "Bearer {revoked}"}, "revoked_api_key"),
        ({"authorization": "Bearer {expired}"}, "expired_api_key"),
        ({"authorization": "Bearer {alice}", "x-api-key": "{restricted}"}, "ambiguous_credentials"),
    ],
)
def test_401_with_openai_style_error(stack: Stack, headers: dict[str, str], code: str) -> None:
    stack.clear_upstream_requests()
    sent = {name: value.format(**stack.keys) for name, value in headers.items()}
    r = post(stack, "/v1/chat/completions", sent)
    assert r.status_code == 401
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "authentication_error"
    assert error["message"]
    assert stack.upstream_requests() == []  # the provider never saw it


def test_a_missing_provider_key_is_a_clear_500_and_nothing_reaches_the_provider(
    stack: Stack,
) -> None:
    stack.clear_upstream_requests()
    client = openai.OpenAI(
        base_url=f"{stack.url}/keyless/v1", api_key=stack.keys["alice"], max_retries=0
    )
    with pytest.raises(openai.InternalServerError) as error:
        client.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert error.value.status_code == 500
    assert error.value.code == "provider_credential_missing"
    assert stack.upstream_requests() == []
    # Without a valid Tollway key, the caller learns nothing about the gateway's setup.
    assert post(stack, "/keyless/v1/chat/completions", {}).status_code == 401


def test_repeated_authorization_header_is_rejected(stack: Stack) -> None:
    key = stack.keys["alice"]
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=CHAT,
        timeout=10,
        headers=[("authorization", f"Bearer {key}"), ("authorization", f"Bearer {key}")],
    )
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "ambiguous_credentials"


def test_sdk_raises_authentication_error_on_wrong_key(stack: Stack) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        oai(stack, "tw_wrong").chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert caught.value.code == "invalid_api_key"


def test_model_allowlist(stack: Stack) -> None:
    client = oai(stack, stack.keys["restricted"])
    assert client.chat.completions.create(**CHAT).choices  # type: ignore[call-overload]
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(**{**CHAT, "model": "gpt-4o"})  # type: ignore[call-overload]
    assert caught.value.code == "model_not_allowed"

    claude = anthropic.Anthropic(
        base_url=stack.url, api_key=stack.keys["restricted"], max_retries=0, timeout=10
    )
    assert claude.messages.create(
        model="claude-haiku-4-5-20251001",
        max_tokens=16,
        messages=[{"role": "user", "content": "hi"}],
    ).content

    gemini = {"contents": [{"parts": [{"text": "hi"}]}]}
    denied = post(
        stack,
        "/v1beta/models/gemini-2.5-pro:generateContent",
        {"x-goog-api-key": stack.keys["restricted"]},
        gemini,
    )
    assert denied.status_code == 403
    error = denied.json()["error"]  # Google's shape on a Gemini route
    assert error["status"] == "PERMISSION_DENIED"
    assert error["details"][0]["reason"] == "MODEL_NOT_ALLOWED"

    no_model = post(
        stack,
        "/v1/chat/completions",
        {"authorization": f"Bearer {stack.keys['restricted']}"},
        {"messages": []},
    )
    assert no_model.status_code == 400 and no_model.json()["error"]["code"] == "missing_model"
    bad_json = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=b"{not json",
        timeout=10,
        headers={"authorization": f"Bearer {stack.keys['restricted']}"},
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_body"


def test_only_restricted_keys_pay_for_the_body(stack: Stack) -> None:
    """Anthropic messages are metered from the response alone: the body is auth's cost."""

    def messages() -> tuple[float, float]:
        return (
            stack.metric("tollway_extproc_messages_total", kind="request_headers"),
            stack.metric("tollway_extproc_messages_total", kind="request_body"),
        )

    def call(key: str) -> None:
        client = anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0)
        client.messages.create(
            model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )

    before = messages()
    call(stack.keys["alice"])
    after_open = messages()
    assert (after_open[0] - before[0], after_open[1] - before[1]) == (1, 0)
    call(stack.keys["restricted"])
    after_restricted = messages()
    assert (after_restricted[0] - after_open[0], after_restricted[1] - after_open[1]) == (1, 1)


def test_large_body_is_buffered_for_a_restricted_key(stack: Stack) -> None:
    # 6 MB: over Envoy's default 1 MiB buffer and grpcio's default 4 MiB message.
    big = {"model": "gpt-4o", "messages": [{"role": "user", "content": "x" * 6_000_000}]}
    r = post(
        stack, "/v1/chat/completions", {"authorization": f"Bearer {stack.keys['restricted']}"}, big
    )
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "model_not_allowed"


OVER_LIMIT = 11 * 1024 * 1024


def test_body_over_limit_is_413_on_http1(stack: Stack) -> None:
    r = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=b"x" * OVER_LIMIT,
        timeout=20,
        headers={"authorization": f"Bearer {stack.keys['alice']}"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


@pytest.mark.parametrize("declare_length", [True, False], ids=["content-length", "streamed"])
def test_body_over_limit_is_413_on_http2(stack: Stack, declare_length: bool) -> None:
    answer = h2_request(
        stack,
        "/v1/chat/completions",
        {"authorization": f"Bearer {stack.keys['alice']}"},
        b"x" * OVER_LIMIT,
        declare_length=declare_length,
    )
    status, body = answer.status, answer.body
    assert status == 413
    assert orjson.loads(body)["error"]["code"] == "request_too_large"


# ---- what the upstream sees ------------------------------------------------------


def test_provider_key_injected_and_client_key_never_forwarded(stack: Stack) -> None:
    key = stack.keys["alice"]
    stack.clear_upstream_requests()
    post(stack, "/v1/chat/completions", {"authorization": f"Bearer {key}"}).raise_for_status()
    post(
        stack,
        "/v1/messages",
        {"x-api-key": key, "anthropic-version": "2023-06-01"},
        {
            "model": "claude-haiku-4-5",
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ).raise_for_status()
    post(
        stack,
        "/v1beta/models/gemini-2.0-flash:generateContent",
        {"x-goog-api-key": key},
        {"contents": [{"parts": [{"text": "hi"}]}]},
    ).raise_for_status()
    seen = stack.upstream_requests()
    assert [r["path"] for r in seen] == [
        "/v1/chat/completions",
        "/v1/messages",
        "/v1beta/models/gemini-2.0-flash:generateContent",
    ]
    openai_h, anthropic_h, gemini_h = (r["headers"] for r in seen)
    assert openai_h["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert anthropic_h["x-api-key"] == PROVIDER_KEY and "authorization" not in anthropic_h
    assert gemini_h["x-goog-api-key"] == PROVIDER_KEY and "authorization" not in gemini_h
    for headers in (openai_h, anthropic_h, gemini_h):
        assert not any(key in value for value in headers.values())
        assert "accept-encoding" not in headers


def test_client_sent_internal_headers_are_stripped(stack: Stack) -> None:
    stack.clear_upstream_requests()
    r = post(
        stack,
        "/v1/chat/completions",
        {
            "authorization": f"Bearer {stack.keys['alice']}",
            "x-tollway-tenant": "someone-else",
            "x-tollway-key-id": "000000000000",
            "x-tollway-admin": "true",
        },
    )
    assert r.status_code == 200
    (seen,) = stack.upstream_requests()
    headers = seen["headers"]
    assert headers["x-tollway-tenant"] == "acme"
    assert headers["x-tollway-key-id"] == stack.keys["alice"][3:15]
    assert "x-tollway-admin" not in headers


def test_route_with_auth_off_passes_the_clients_own_key(stack: Stack) -> None:
    client = oai(stack, PROVIDER_KEY)  # no Tollway key at all
    result = client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert len(result.data[0].embedding) > 0
    with pytest.raises(openai.AuthenticationError):  # the provider's own 401
        oai(stack, "sk-wrong").embeddings.create(model="text-embedding-3-small", input="x")


# ---- operations -------------------------------------------------------------------


def test_healthz_is_served_without_extproc(stack: Stack) -> None:
    before = stack.metric("tollway_extproc_streams_total")
    r = httpx.get(f"{stack.url}/healthz", timeout=5)
    assert (r.status_code, r.text) == (200, "ok\n")
    assert stack.metric("tollway_extproc_streams_total") == before


def test_unknown_path_is_json_404(stack: Stack) -> None:
    r = httpx.get(f"{stack.url}/admin", timeout=5)
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_url"


def test_access_log_carries_identity_and_denials(stack: Stack) -> None:
    alice = stack.keys["alice"]
    post(
        stack, "/v1/chat/completions", {"authorization": f"Bearer {alice}", "user-agent": "log-ok"}
    ).raise_for_status()
    post(
        stack,
        "/v1/chat/completions",
        {"authorization": "Bearer tw_bad", "user-agent": "log-denied"},
    )

    def lines() -> dict[str, dict[str, Any]]:
        found = {e["user_agent"]: e for e in stack.access_log()}
        return found if {"log-ok", "log-denied"} <= found.keys() else {}

    entries = eventually(lines)
    ok, denied = entries["log-ok"], entries["log-denied"]
    assert (ok["status"], ok["key_id"], ok["tenant"], ok["key_name"], ok["route"]) == (
        200,
        alice[3:15],
        "acme",
        "alice",
        "openai",
    )
    assert (denied["status"], denied["denied"], denied["details"]) == (
        401,
        "invalid_api_key",
        "tollway_invalid_api_key",
    )
    text = (stack.gateway.workdir / "envoy.log").read_text()
    assert alice not in text and PROVIDER_KEY not in text


def test_keys_file_changes_apply_without_restart(stack: Stack) -> None:
    from extproc import keys

    key, record = keys.generate(name="late", tenant="acme", limits=keys.KeyLimits(rpm=1000))
    r = post(stack, "/v1/chat/completions", {"authorization": f"Bearer {key}"})
    assert r.status_code == 401
    keys.add(stack.keys_file, record)
    eventually(
        lambda: (
            post(stack, "/v1/chat/completions", {"authorization": f"Bearer {key}"}).status_code
            == 200
        )
    )
    reloads = stack.metric("tollway_reloads_total", file="keys", result="ok")
    keys.set_limits(  # the reload reads the new field; the key keeps working
        stack.keys_file,
        record.id,
        lambda old: replace(old, budget_usd=Decimal("0.1"), budget_period="day"),
    )
    eventually(lambda: stack.metric("tollway_reloads_total", file="keys", result="ok") > reloads)
    assert (
        post(stack, "/v1/chat/completions", {"authorization": f"Bearer {key}"}).status_code == 200
    )
    keys.revoke(stack.keys_file, record.id)
    eventually(
        lambda: (
            post(stack, "/v1/chat/completions", {"authorization": f"Bearer {key}"}).status_code
            == 401
        )
    )
    assert stack.metric("tollway_reloads_total", file="keys", result="ok") >= 3
