"""One classifier per request: which upstream, what it calls there, which model."""

from __future__ import annotations

from pathlib import Path

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


# ---- Azure OpenAI and Vertex AI, as the README configures them ----------------------

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_config(heading: str, tmp_path: Path) -> Config:
    """The YAML snippet under ``### {heading}`` in the README, loaded as `serve` would."""
    section = README.read_text().split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    file = tmp_path / "tollway.yaml"
    file.write_text(snippet)
    return load(file, environ={})


AZURE_PATHS = [
    # What openai.AzureOpenAI(azure_endpoint=".../azure") sends (api-version in the query).
    ("POST", "/azure/openai/deployments/prod-4o/chat/completions", "chat", "prod-4o"),
    ("POST", "/azure/openai/deployments/prod-4o/completions", "completions", "prod-4o"),
    ("POST", "/azure/openai/deployments/embed/embeddings", "embeddings", "embed"),
    ("POST", "/azure/openai/responses", "responses", None),
    ("GET", "/azure/openai/models", None, None),
    # openai.OpenAI(base_url=".../azure/openai/v1"): the body names the deployment.
    ("POST", "/azure/openai/v1/chat/completions", "chat", None),
    ("POST", "/azure/openai/v1/responses", "responses", None),
    ("POST", "/azure/openai/v1/embeddings", "embeddings", None),
]


@pytest.mark.parametrize(("method", "path", "api", "model"), AZURE_PATHS)
def test_the_readme_azure_config_routes_what_the_sdk_sends(
    tmp_path: Path, method: str, path: str, api: Api | None, model: str | None
) -> None:
    config = readme_config("Azure OpenAI", tmp_path)
    azure = config.upstreams["azure"]
    assert (azure.api, azure.host, azure.key_header) == (
        "azure",
        "my-resource.openai.azure.com",
        "api-key",
    )
    table = RouteTable(config.upstreams)
    call = table.match(method, path, {"api-key": "tw_x"}, "api-version=2024-10-21")
    assert call is not None
    assert (call.route.name, call.path, call.api, call.path_model) == (
        "azure",
        path.removeprefix("/azure"),
        api,
        model,
    )


def test_azure_next_to_openai_leaves_openai_its_own_paths(tmp_path: Path) -> None:
    table = RouteTable(readme_config("Azure OpenAI", tmp_path).upstreams)
    for path in ("/v1/chat/completions", "/openai/v1/chat/completions"):
        call = table.match("POST", path, {})
        assert call is not None and (call.route.name, call.path) == (
            "openai",
            "/v1/chat/completions",
        )
    # Without the mount, Azure's paths are under OpenAI's /openai mount: OpenAI's to answer.
    call = table.match("POST", "/openai/deployments/d/chat/completions", {})
    assert call is not None and call.route.name == "openai"


def test_azure_at_its_own_paths_alone(tmp_path: Path) -> None:
    """The README's variant: prefixes ["/openai/"], and no /openai mount elsewhere."""
    file = tmp_path / "c.yaml"
    azure = "{url: 'https://r.openai.azure.com', api: azure, prefixes: [/openai/]}"
    alone = f"upstreams:\n  azure: {azure}\n"
    file.write_text(alone)
    table = RouteTable(load(file, environ={}).upstreams)
    call = table.match("POST", "/openai/deployments/d/chat/completions", {})
    assert call is not None and (call.path, call.api, call.path_model) == (
        "/openai/deployments/d/chat/completions",
        "chat",
        "d",
    )
    call = table.match("POST", "/openai/v1/responses", {})
    assert call is not None and (call.route.name, call.api) == ("azure", "responses")
    file.write_text(alone + "  openai: {url: 'https://api.openai.com', mount: /openai}\n")
    with pytest.raises(ConfigError, match="also a prefix"):
        load(file, environ={})


def test_an_upstream_needs_a_prefix_or_a_mount(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text("upstreams:\n  azure: {url: 'https://r.openai.azure.com', prefixes: []}\n")
    with pytest.raises(ConfigError, match="at least one path prefix, or a mount"):
        load(file, environ={})


VERTEX = "projects/my-project/locations/us-central1/publishers/google/models"
CLAUDE = "projects/my-project/locations/us-east5/publishers/anthropic/models"


@pytest.mark.parametrize(
    ("method", "path", "api", "model"),
    [
        # google-genai with vertexai=True: v1beta1 by default, v1 when asked.
        ("POST", f"/v1beta1/{VERTEX}/gemini-2.0-flash:generateContent", "generate_content",
         "gemini-2.0-flash"),
        ("POST", f"/v1beta1/{VERTEX}/gemini-2.5-pro:streamGenerateContent", "generate_content",
         "gemini-2.5-pro"),
        ("POST", f"/v1/{VERTEX}/gemini-2.5-flash:generateContent", "generate_content",
         "gemini-2.5-flash"),
        ("POST", f"/v1/{VERTEX}/gemini-2.5-flash%3AstreamGenerateContent", "generate_content",
         "gemini-2.5-flash"),
        ("POST", f"/v1/{VERTEX}/gemini-2.5-flash:countTokens", None, "gemini-2.5-flash"),
        # Express mode (an API key, no project) and the SDK's list of base models.
        ("POST", "/v1/publishers/google/models/gemini-2.5-flash:generateContent",
         "generate_content", "gemini-2.5-flash"),
        ("GET", "/v1beta1/publishers/google/models", None, None),
        # Claude on Vertex AI (anthropic's AnthropicVertex): Anthropic's Messages API.
        ("POST", f"/v1/{CLAUDE}/claude-sonnet-4-5@20250929:rawPredict", "messages",
         "claude-sonnet-4-5@20250929"),
        ("POST", f"/v1/{CLAUDE}/claude-sonnet-4-5@20250929:streamRawPredict", "messages",
         "claude-sonnet-4-5@20250929"),
        ("POST", f"/v1/{CLAUDE}/count-tokens:rawPredict", None, None),  # bills nothing
        ("POST", f"/v1/{VERTEX}/gemini-2.5-flash:rawPredict", None, "gemini-2.5-flash"),
    ],
)  # fmt: skip
def test_the_readme_vertex_config_routes_what_the_sdk_sends(
    tmp_path: Path, method: str, path: str, api: Api | None, model: str | None
) -> None:
    config = readme_config("Vertex AI", tmp_path)
    vertex = config.upstreams["vertex"]
    assert (vertex.api, vertex.host, vertex.key_header) == (
        "gemini",
        "us-central1-aiplatform.googleapis.com",
        "authorization",  # the access token goes as "Bearer <token>"
    )
    call = RouteTable(config.upstreams).match(
        method, path, {"authorization": "Bearer tw_x"}, "alt=sse"
    )
    assert call is not None
    assert (call.route.name, call.path, call.api, call.path_model) == ("vertex", path, api, model)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/gemini-2.0-flash:generateContent",
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
        "/gemini/v1beta/models/gemini-2.0-flash:generateContent",
    ],
)
def test_the_gemini_api_keeps_its_paths_next_to_vertex(tmp_path: Path, path: str) -> None:
    call = RouteTable(readme_config("Vertex AI", tmp_path).upstreams).match("POST", path, {})
    assert call is not None and call.route.name == "gemini"


def test_without_a_vertex_upstream_vertex_paths_go_nowhere_new(tmp_path: Path) -> None:
    """The default table has no /v1beta1/: Vertex's default API version is a 404."""
    assert TABLE.match("POST", f"/v1beta1/{VERTEX}/gemini-2.0-flash:generateContent", {}) is None
