"""One classifier per request: which upstream, what it calls there, which model."""

from __future__ import annotations

import pytest

from extproc.config import Config, ConfigError, load
from extproc.providers import Api
from extproc.routes import RouteTable, dialect_of

from .factories import upstreams

ANTHROPIC = {"anthropic-version": "2023-06-01"}
TABLE = RouteTable(upstreams())


@pytest.mark.parametrize(
    ("method", "path", "headers", "route", "api"),
    [
        ("POST", "/v1/chat/completions", {}, "openai", "chat"),
        ("POST", "/v1/completions", {}, "openai", "completions"),
        ("POST", "/v1/embeddings", {}, "openai", "embeddings"),
        ("POST", "/v1/responses", {}, "openai", "responses"),
        ("GET", "/v1/models", {}, "openai", None),
        ("POST", "/v1/files", {}, "openai", None),
        ("POST", "/v1/audio/speech", {}, "openai", None),
        ("POST", "/openai/v1/chat/completions", {}, "openai", "chat"),
        ("POST", "/openai/deployments/prod-4o/chat/completions", {}, "azure", "chat"),
        ("POST", "/openai/deployments/emb/embeddings", {}, "azure", "embeddings"),
        ("POST", "/azure/openai/Deployments/d/Chat/Completions", {}, "azure", "chat"),
        ("POST", "/v1/messages", ANTHROPIC, "anthropic", "messages"),
        ("POST", "/anthropic/v1/messages", {}, "anthropic", "messages"),
        ("POST", "/v1/messages/count_tokens", ANTHROPIC, "anthropic", None),
        ("POST", "/v1/messages/batches", ANTHROPIC, "anthropic", None),
        ("GET", "/v1/models", ANTHROPIC, "anthropic", None),
        # Without its header, a messages call is not Anthropic's on the shared /v1/.
        ("POST", "/v1/messages", {}, "openai", None),
        ("POST", "/v1beta/models/gemini-2.5-pro:generateContent", {}, "gemini", "generate_content"),
        ("POST", "/v1/models/gemini-2.5-pro:generateContent", {}, "gemini", "generate_content"),
        ("POST", "/gemini/v1beta/models/m:streamGenerateContent", {}, "gemini", "generate_content"),
        ("POST", "/v1beta/models/g-2.5-pro%3AgenerateContent", {}, "gemini", "generate_content"),
        ("POST", "/v1/models/gemini-2.5-pro%3agenerateContent", {}, "gemini", "generate_content"),
        ("POST", "/v1beta/models/gemini-2.5-pro:countTokens", {}, "gemini", None),
        ("POST", "/v1beta/models/text-embedding-004:embedContent", {}, "gemini", None),
        ("GET", "/v1/models", {"x-goog-api-key": "k"}, "gemini", None),
        (
            "POST",
            "/v1/projects/p/locations/us/publishers/google/models/gemini-2.0-flash:generateContent",
            {},
            "gemini",
            "generate_content",
        ),
    ],
)
def test_what_a_request_calls(
    method: str, path: str, headers: dict[str, str], route: str, api: Api | None
) -> None:
    call = TABLE.match(method, path, headers)
    assert call is not None
    assert (call.route.name, call.api) == (route, api)


@pytest.mark.parametrize(
    ("path", "model", "unreadable"),
    [
        ("/v1beta/models/gemini-2.0-flash:generateContent", "gemini-2.0-flash", False),
        ("/v1/models/gemini-2.0-flash:generateContent", "gemini-2.0-flash", False),
        ("/v1beta/tunedModels/my-tune:generateContent", "my-tune", False),
        ("/v1beta/models/gemini-2.5-pro:x:generateContent", None, True),
        ("/v1beta/models", None, False),
        ("/openai/deployments/gpt-4o%2Dmini/chat/completions", "gpt-4o-mini", False),
        ("/v1/chat/completions", None, False),
    ],
)
def test_the_model_a_path_names(path: str, model: str | None, unreadable: bool) -> None:
    call = TABLE.match("POST", path, {})
    assert call is not None
    assert (call.path_model, call.path_model_unreadable) == (model, unreadable)


def test_a_mount_is_removed_from_the_path_the_provider_sees() -> None:
    call = TABLE.match("POST", "/anthropic/v1/messages", {})
    assert call is not None and call.path == "/v1/messages"


@pytest.mark.parametrize("path", ["/", "/v2/chat/completions", "/v1", "/V1/models", "/openai"])
def test_no_route_is_no_guess(path: str) -> None:
    assert TABLE.match("GET", path, {}) is None


def test_a_shared_prefix_without_an_openai_upstream_refuses_the_rest() -> None:
    only = {k: v for k, v in Config().upstreams.items() if k == "anthropic"}
    table = RouteTable(only)
    # Alone on /v1/, Anthropic takes every request there.
    call = table.match("GET", "/v1/models", {})
    assert call is not None and call.route.name == "anthropic"
    both = {k: v for k, v in Config().upstreams.items() if k != "openai"}
    table = RouteTable(both)
    assert table.match("GET", "/v1/models", {}) is None
    call = table.match("GET", "/v1/models", ANTHROPIC)
    assert call is not None and call.route.name == "anthropic"


@pytest.mark.parametrize(
    ("path", "headers", "query", "dialect"),
    [
        ("/nowhere", {}, "", "openai"),
        ("/nowhere", ANTHROPIC, "", "anthropic"),
        ("/nowhere/models/g:generateContent", {}, "", "gemini"),
        ("/nowhere", {}, "alt=sse&key=k", "gemini"),
    ],
)
def test_error_shape_without_a_route(
    path: str, headers: dict[str, str], query: str, dialect: str
) -> None:
    assert dialect_of(path, headers, query) == dialect


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        (
            "upstreams:\n  a: {url: 'https://a.example', prefixes: [/v1/]}\n"
            "  b: {url: 'https://b.example', api: azure, prefixes: [/v1/]}\n",
            "speak the same API",
        ),
        (
            "upstreams:\n  a: {url: 'https://a.example', prefixes: [/x/]}\n"
            "  b: {url: 'https://b.example', api: anthropic, mount: /x}\n",
            "also a prefix",
        ),
        (
            "upstreams:\n  a: {url: 'https://a.example', mount: /x}\n"
            "  b: {url: 'https://b.example', api: anthropic, mount: /x}\n",
            "same mount",
        ),
        ("upstreams:\n  a: {url: 'https://a.example', mount: /x/}\n", "not end with '/'"),
    ],
)
def test_routes_that_could_not_be_told_apart_are_refused(
    tmp_path: object, yaml_text: str, message: str
) -> None:
    from pathlib import Path

    file = Path(str(tmp_path)) / "c.yaml"
    file.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message):
        load(file, environ={})
