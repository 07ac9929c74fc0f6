"""Each SDK, used as its docs show, reaches its own provider with that provider's key;
denials come back in the provider's own error shape; a restricted key cannot smuggle
a model past its allowlist."""

from __future__ import annotations

import uuid
from typing import Any

import anthropic
import httpx
import openai
import pytest
from google import genai
from google.genai import errors as genai_errors

from .conftest import PROVIDER_KEY, Stack, eventually

pytestmark = pytest.mark.e2e

HELLO = [{"role": "user", "content": "hi"}]


def provider_request(stack: Stack, path: str) -> dict[str, Any]:
    """The last request the upstream received on ``path`` (the mount already removed)."""

    def find() -> dict[str, Any] | None:
        found = [r for r in stack.upstream_requests() if r["path"] == path]
        return found[-1] if found else None

    found = eventually(find)
    assert isinstance(found, dict)
    return found


def tagged() -> dict[str, str]:
    """A user agent of our own, to find the request in Envoy's access log."""
    return {"user-agent": f"routing-test/{uuid.uuid4()}"}


def routed(stack: Stack, tag: dict[str, str]) -> dict[str, Any]:
    """The access-log line of the request sent with ``tag`` (flushed within a second)."""

    def find() -> dict[str, Any] | None:
        # google-genai puts its own version before the user agent it is given.
        ua = tag["user-agent"]
        lines = [e for e in stack.access_log() if (e["user_agent"] or "").endswith(ua)]
        return lines[-1] if lines else None

    line = eventually(find)
    assert isinstance(line, dict)
    return line


def test_google_genai_sdk_default_api_version_reaches_gemini(stack: Stack) -> None:
    """google-genai with a base URL calls /v1/models/{m}:generateContent: Gemini's, not OpenAI's."""
    stack.clear_upstream_requests()
    tag = tagged()
    for version in (None, "v1", "v1beta"):
        options: dict[str, Any] = {"base_url": stack.url, "headers": tag}
        if version is not None:
            options["api_version"] = version
        client = genai.Client(api_key=stack.keys["alice"], http_options=options)
        reply = client.models.generate_content(model="gemini-2.0-flash", contents="hi")
        assert reply.text
    received = [r for r in stack.upstream_requests() if "generateContent" in r["path"]]
    assert {r["path"].split("/")[1] for r in received} >= {"v1", "v1beta"}
    for request in received:
        assert request["headers"]["x-goog-api-key"] == PROVIDER_KEY
        assert "authorization" not in request["headers"]
    line = routed(stack, tag)
    assert (line["route"], line["upstream"]) == ("gemini", "upstream_gemini")


def test_anthropic_sdk_beyond_messages_reaches_anthropic(stack: Stack) -> None:
    tag = tagged()
    client = anthropic.Anthropic(
        base_url=stack.url,
        api_key=stack.keys["alice"],
        max_retries=0,
        timeout=10,
        default_headers=tag,
    )
    stack.clear_upstream_requests()
    client.models.list()
    request = provider_request(stack, "/v1/models")
    assert request["headers"]["x-api-key"] == PROVIDER_KEY
    assert "authorization" not in request["headers"]
    line = routed(stack, tag)
    assert (line["route"], line["upstream"]) == ("anthropic", "upstream_anthropic")


def test_openai_sdk_models_list_stays_with_openai(stack: Stack) -> None:
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.keys["alice"], max_retries=0)
    stack.clear_upstream_requests()
    assert client.models.list().data
    request = provider_request(stack, "/v1/models")
    assert request["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-api-key" not in request["headers"]


def test_each_provider_has_an_unambiguous_base_url(stack: Stack) -> None:
    key = stack.keys["alice"]
    tags = tagged(), tagged()
    gpt = openai.OpenAI(
        base_url=f"{stack.url}/openai/v1", api_key=key, max_retries=0, default_headers=tags[0]
    )
    assert gpt.chat.completions.create(model="gpt-4o-mini", messages=HELLO).choices  # type: ignore[arg-type]
    claude = anthropic.Anthropic(
        base_url=f"{stack.url}/anthropic", api_key=key, max_retries=0, default_headers=tags[1]
    )
    assert claude.messages.create(
        model="claude-haiku-4-5",
        max_tokens=8,
        messages=HELLO,  # type: ignore[arg-type]
    ).content
    gemini = genai.Client(api_key=key, http_options={"base_url": f"{stack.url}/gemini"})
    assert gemini.models.generate_content(model="gemini-2.0-flash", contents="hi").text
    for tag, route, path in zip(
        tags,
        ("openai", "anthropic"),
        ("/openai/v1/chat/completions", "/anthropic/v1/messages"),
        strict=True,
    ):
        line = routed(stack, tag)
        # The access log shows the path the client used, mount included.
        assert (line["route"], line["upstream"], line["status"], line["path"]) == (
            route,
            f"upstream_{route}",
            200,
            path,
        )
    # The provider sees its own path, the mount removed.
    assert provider_request(stack, "/v1/messages")["headers"]["x-api-key"] == PROVIDER_KEY


@pytest.mark.parametrize("path", ["/v2/chat/completions", "/openai", "/anthropicx/v1/messages"])
def test_a_request_that_matches_no_provider_is_404(stack: Stack, path: str) -> None:
    response = httpx.post(f"{stack.url}{path}", json={}, timeout=10)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"


# ---- errors in each provider's own shape ------------------------------------------


@pytest.mark.parametrize(
    ("path", "headers", "shape"),
    [
        ("/v2/x", {}, "openai"),
        ("/v2/x", {"anthropic-version": "2023-06-01"}, "anthropic"),
        ("/v2/models/gemini-2.0-flash:generateContent", {}, "gemini"),
        ("/v2/x?key=abc", {}, "gemini"),
    ],
)
def test_unknown_url_in_the_shape_the_client_speaks(
    stack: Stack, path: str, headers: dict[str, str], shape: str
) -> None:
    response = httpx.post(f"{stack.url}{path}", headers=headers, json={}, timeout=10)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    if shape == "anthropic":
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error"
    elif shape == "gemini":
        assert (body["error"]["code"], body["error"]["status"]) == (404, "NOT_FOUND")
    else:
        assert body["error"]["code"] == "unknown_url"


def test_anthropic_sdk_gets_anthropic_errors(stack: Stack) -> None:
    client = anthropic.Anthropic(base_url=stack.url, api_key="tw_wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    restricted = anthropic.Anthropic(
        base_url=stack.url, api_key=stack.keys["restricted"], max_retries=0
    )
    with pytest.raises(anthropic.PermissionDeniedError) as denied:
        restricted.messages.create(model="gpt-4o", max_tokens=8, messages=HELLO)  # type: ignore[arg-type]
    assert "may not use the model 'gpt-4o'" in str(denied.value)


def test_google_genai_sdk_gets_google_errors(stack: Stack) -> None:
    client = genai.Client(api_key="tw_wrong", http_options={"base_url": stack.url})
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gemini-2.0-flash", contents="hi")
    assert caught.value.code == 401
    assert caught.value.status == "UNAUTHENTICATED"
    assert caught.value.message == "Incorrect API key provided."
    assert caught.value.details["error"]["details"][0]["reason"] == "INVALID_API_KEY"
    restricted = genai.Client(
        api_key=stack.keys["restricted"], http_options={"base_url": stack.url}
    )
    with pytest.raises(genai_errors.ClientError) as denied:
        restricted.models.generate_content(model="gemini-2.5-pro", contents="hi")
    assert (denied.value.code, denied.value.status) == (403, "PERMISSION_DENIED")


def test_openai_shape_stays_for_openai_clients(stack: Stack) -> None:
    response = httpx.get(f"{stack.url}/v1/models", headers={"authorization": "Bearer tw_x"})
    assert response.status_code == 401
    assert response.json() == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "authentication_error",
            "code": "invalid_api_key",
            "param": None,
        }
    }


# ---- the allowlist, whatever the request looks like ---------------------------------


def restricted(stack: Stack) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.keys['restricted']}"}


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        (
            "/v1/audio/transcriptions",
            {"data": {"model": "gpt-4o"}, "files": {"file": ("a.wav", b"RIFF")}},
            403,
        ),
        (
            "/v1/images/edits",
            {"data": {"model": "gpt-4o", "prompt": "x"}, "files": {"image": ("a.png", b"\x89PNG")}},
            403,
        ),
        ("/v1/images/variations", {"data": {"model": "gpt-4o", "n": "1"}}, 403),
        ("/v1/batches", {"json": {"input_file_id": "f", "endpoint": "/v1/chat/completions"}}, 403),
        ("/v1/realtime/client_secrets", {"json": {"session": {"model": "gpt-4o"}}}, 403),
        ("/v1/realtime/client_secrets", {"json": {"session": {"type": "realtime"}}}, 400),
        (
            "/anthropic/v1/messages/batches",
            {"json": {"requests": [{"custom_id": "a", "params": {"model": "gpt-4o"}}]}},
            403,
        ),
        ("/v1beta/models/gemini-2.5-pro:x:generateContent", {"json": {"contents": []}}, 400),
        ("/v1/models/gemini-2.5-pro:x:generateContent", {"json": {"contents": []}}, 400),
    ],
)
def test_restricted_key_cannot_smuggle_a_model(
    stack: Stack, path: str, kwargs: dict[str, Any], status: int
) -> None:
    stack.clear_upstream_requests()
    headers = restricted(stack)
    if "generateContent" in path:
        headers = {"x-goog-api-key": stack.keys["restricted"]}
    response = httpx.post(f"{stack.url}{path}", headers=headers, timeout=10, **kwargs)
    assert response.status_code == status, response.text
    assert not [r for r in stack.upstream_requests() if not r["path"].startswith("/__demo")]


def test_restricted_key_named_model_in_a_form_passes(stack: Stack) -> None:
    stack.clear_upstream_requests()
    response = httpx.post(
        f"{stack.url}/v1/images/variations",
        headers=restricted(stack),
        data={"model": "gpt-4o-mini", "n": "1"},
        timeout=10,
    )
    assert response.status_code != 403, response.text
    assert provider_request(stack, "/v1/images/variations")


def test_a_key_in_the_query_never_reaches_any_provider(stack: Stack) -> None:
    stack.clear_upstream_requests()
    key = stack.keys["alice"]
    tag = tagged()
    response = httpx.post(
        f"{stack.url}/openai/v1/chat/completions?key={key}&x=1",
        headers={"authorization": f"Bearer {key}", **tag},
        json={"model": "gpt-4o-mini", "messages": HELLO},
        timeout=10,
    )
    assert response.status_code == 200
    request = provider_request(stack, "/v1/chat/completions")
    assert key not in request["query"] and request["query"] == "x=1"
    line = routed(stack, tag)  # the client's path, without its query
    assert line["path"] == "/openai/v1/chat/completions"
    assert key not in str(line)


@pytest.mark.parametrize(
    "path", ["/v1/models?key={key}", "/v1/models/gemini-2.0-flash:countTokens?key={key}"]
)
def test_a_gemini_key_in_the_query_routes_to_gemini_and_stays_there(
    stack: Stack, path: str
) -> None:
    """Tollway strips ?key=; the route Envoy chose on the client's request must hold."""
    stack.clear_upstream_requests()
    key = stack.keys["alice"]
    method = "GET" if "countTokens" not in path else "POST"
    tag = tagged()
    httpx.request(method, f"{stack.url}{path.format(key=key)}", json={}, headers=tag, timeout=10)
    request = provider_request(stack, path.partition("?")[0])
    assert request["headers"]["x-goog-api-key"] == PROVIDER_KEY
    assert key not in request["query"]
    line = routed(stack, tag)
    assert (line["route"], line["upstream"]) == ("gemini", "upstream_gemini")


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/anthropic/v1/messages", {}),
        ("/v1/messages", {"anthropic-version": "2023-06-01"}),
        ("/v1beta/models/gemini-2.0-flash:generateContent", {}),
        ("/v1/chat/completions", {}),
    ],
)
def test_envoys_own_refusals_come_in_the_routes_shape(
    stack: Stack, path: str, headers: dict[str, str]
) -> None:
    """A 413 is Envoy's answer, not Tollway's: still in the provider's shape."""
    too_big = b"x" * (stack.gateway.config.max_body_bytes + 1)
    response = httpx.post(f"{stack.url}{path}", headers=headers, content=too_big, timeout=30)
    assert response.status_code == 413
    body = response.json()
    if "anthropic" in path or headers:
        assert body == {
            "type": "error",
            "error": {"type": "request_too_large", "message": "Request body too large."},
        }
    elif "gemini" in path:
        assert (body["error"]["code"], body["error"]["status"]) == (413, "INVALID_ARGUMENT")
    else:
        assert body["error"]["code"] == "request_too_large"
