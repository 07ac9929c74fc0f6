"""Azure OpenAI and Vertex AI through the real Envoy, configured as the README shows.

The upstreams are the README's own snippets (Routing: "Azure OpenAI", "Vertex AI"),
pointed at the demo upstream, which answers as those services do. Real SDKs send
JSON and streaming requests; each must get its answer, reach the provider with the
provider's credential (never the client's Tollway key), and be metered: the tokens
the upstream reported, under the right provider and API, priced (no dollar amounts
are asserted here: see test_metering.py).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml
from google import genai
from google.oauth2.credentials import Credentials

from extproc.config import Config, Credential, Upstream

from .conftest import PROVIDER_ENV, PROVIDER_KEY, Stack, eventually, start_stack

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
AZURE_VERSION = "2024-10-21"
PROJECT, LOCATION = "my-project", "us-central1"
HELLO = [{"role": "user", "content": "Say hello to the gateway, please."}]
TYPES = ("input", "output", "cached_input", "cache_creation", "reasoning")


def readme_upstream(heading: str, name: str) -> dict[str, Any]:
    """Upstream ``name`` of the YAML snippet under ``### {heading}`` in the README."""
    section = README.read_text().split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    snippet = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    found = yaml.safe_load(snippet)["upstreams"][name]
    assert isinstance(found, dict)
    return found


def token_file(workdir: Path) -> Path:
    return workdir / "vertex-token"


def write_token(path: Path, token: str) -> None:
    """As the README's refresher does: a file next to it, renamed over it."""
    new = path.with_name(path.name + ".new")
    new.write_text(token + "\n")  # `gcloud auth print-access-token` ends with a newline
    os.replace(new, path)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("provider-routes")
    write_token(token_file(workdir), PROVIDER_KEY)

    def with_azure_and_vertex(config: Config) -> Config:
        demo = config.upstreams["openai"].url
        # The README's upstreams as written, but for the URL (the demo upstream) and where
        # the key comes from (the test's provider key; the token file of the refresher).
        azure = readme_upstream("Azure OpenAI", "azure")
        azure |= {"url": demo, "credential": Credential(env=PROVIDER_ENV)}
        vertex = readme_upstream("Vertex AI", "vertex")
        vertex["credential"]["file"] = token_file(workdir)
        # Vertex's prices follow from its aiplatform URL; the demo's URL needs them said.
        vertex |= {"url": demo, "credential": Credential(**vertex["credential"])}
        vertex["prices"] = "vertex_ai"
        upstreams = {
            **config.upstreams,
            "azure": Upstream.model_validate(azure),
            "vertex": Upstream.model_validate(vertex),
        }
        return Config.model_validate({**config.model_dump(), "upstreams": upstreams})

    s = start_stack(workdir, customize=with_azure_and_vertex)
    yield s
    s.gateway.stop()


# ---- helpers ---------------------------------------------------------------------------


def tagged() -> dict[str, str]:
    """A user agent of our own, to find the request in Envoy's access log."""
    return {"user-agent": f"provider-routes/{uuid.uuid4()}"}


def logged(stack: Stack, tag: dict[str, str]) -> dict[str, Any]:
    """The access-log line of the request sent with ``tag`` (google-genai prefixes its own
    user agent to the one it is given)."""

    def find() -> dict[str, Any] | None:
        ua = tag["user-agent"]
        lines = [e for e in stack.access_log() if (e["user_agent"] or "").endswith(ua)]
        return lines[-1] if lines and lines[-1]["model"] else None

    line = eventually(find)
    assert isinstance(line, dict)
    return line


def received(stack: Stack, tag: dict[str, str]) -> dict[str, Any]:
    """What the provider (the demo upstream) received for the request sent with ``tag``."""

    def find() -> dict[str, Any] | None:
        ua = tag["user-agent"]
        found = [r for r in stack.upstream_requests() if r["headers"]["user-agent"].endswith(ua)]
        return found[-1] if found else None

    request = eventually(find)
    assert isinstance(request, dict)
    return request


Tokens = dict[tuple[str, str], int]  # (model label, token type) -> tokens


def token_samples(stack: Stack, provider: str, api: str) -> Tokens:
    out: Tokens = {}
    for (name, labels), value in stack.scrape().items():
        found = dict(labels)
        if (
            name == "tollway_gen_ai_tokens_total"
            and (found.get("provider"), found.get("api")) == (provider, api)
            and (found.get("tenant"), found.get("source")) == ("acme", "reported")
        ):
            out[found["model"], found["type"]] = int(value)
    return out


def finished(stack: Stack, provider: str, api: str) -> float:
    return sum(
        value
        for (name, labels), value in stack.scrape().items()
        if name == "tollway_gen_ai_request_duration_seconds_count"
        and dict(labels).get("provider") == provider
        and dict(labels).get("api") == api
    )


def metered(stack: Stack, provider: str, api: str, call: Callable[[], Any]) -> tuple[Any, Tokens]:
    """Run ``call``; return its result and the tokens it added under ``provider``/``api``."""
    before, done = token_samples(stack, provider, api), finished(stack, provider, api)
    result = call()
    # A stream's last chunk may reach the client before Tollway answered Envoy's last
    # message: wait until the request is counted as finished (after its tokens).
    eventually(lambda: finished(stack, provider, api) > done)
    after = token_samples(stack, provider, api)
    delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
    return result, delta


def reported(model: str, input: int, output: int, cached: int = 0, reasoning: int = 0) -> Tokens:
    counts = dict(zip(TYPES, (input, output, cached, 0, reasoning), strict=True))
    return {(model, kind): n for kind, n in counts.items() if n}


def assert_priced(line: dict[str, Any], tokens: Tokens) -> None:
    """The access log has the same tokens and a nonzero cost, under a priced model."""
    ((model, _), *_) = tokens
    assert model != "other", "the model the answer named is not priced"
    assert line["input_tokens"] == tokens.get((model, "input"), 0)
    assert line["output_tokens"] == tokens.get((model, "output"), 0)
    assert line["usage_estimated"] is False
    assert float(line["cost_usd"]) > 0


def no_tollway_key(request: dict[str, Any], stack: Stack) -> None:
    everything = str(request["headers"]) + request["query"]
    assert all(key not in everything for key in stack.keys.values())
    assert "tw_" not in everything


# ---- Azure OpenAI ----------------------------------------------------------------------


def azure(stack: Stack, tag: dict[str, str]) -> openai.AzureOpenAI:
    """The README's client: the /azure mount as the Azure endpoint."""
    return openai.AzureOpenAI(
        azure_endpoint=f"{stack.url}/azure",
        api_version=AZURE_VERSION,
        api_key=stack.keys["alice"],
        default_headers=tag,
        max_retries=0,
        timeout=20,
    )


def azure_v1(stack: Stack, tag: dict[str, str]) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.url}/azure/openai/v1",
        api_key=stack.keys["alice"],
        default_headers=tag,
        max_retries=0,
        timeout=20,
    )


def azure_credential_swapped(stack: Stack, request: dict[str, Any]) -> None:
    assert request["headers"]["api-key"] == PROVIDER_KEY
    assert "authorization" not in request["headers"]
    no_tollway_key(request, stack)


def test_azure_deployment_chat_json(stack: Stack) -> None:
    tag = tagged()

    def call() -> Any:
        return azure(stack, tag).chat.completions.with_raw_response.create(
            model="chat", messages=HELLO
        )

    raw, tokens = metered(stack, "azure", "chat", call)
    answer = raw.parse()
    assert answer.choices[0].message.content
    # The deployment "chat" runs gpt-4o-mini: Azure answers with that model's name.
    assert answer.model == "gpt-4o-mini-2024-07-18"
    usage = answer.usage
    assert usage is not None
    assert tokens == reported("azure/gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
    assert float(raw.headers["x-tollway-cost-usd"]) > 0
    request = received(stack, tag)
    assert request["path"] == "/openai/deployments/chat/chat/completions"
    assert request["query"] == f"api-version={AZURE_VERSION}"
    azure_credential_swapped(stack, request)
    line = logged(stack, tag)
    assert (line["route"], line["upstream"], line["status"]) == ("azure", "upstream_azure", 200)
    assert line["path"] == "/azure/openai/deployments/chat/chat/completions"
    assert_priced(line, tokens)


def test_azure_deployment_chat_stream(stack: Stack) -> None:
    """Azure's stream opens with a chunk of prompt filter results (no choices, no model);
    the usage chunk Tollway asked for on the client's behalf is taken out again."""
    plain = azure(stack, tagged()).chat.completions.create(model="prod-4o", messages=HELLO)
    assert plain.usage is not None
    tag = tagged()

    def call() -> list[Any]:
        client = azure(stack, tag)
        return list(client.chat.completions.create(model="prod-4o", messages=HELLO, stream=True))

    chunks, tokens = metered(stack, "azure", "chat", call)
    assert chunks[0].choices == []  # Azure's prompt_filter_results chunk reaches the client
    assert all(c.usage is None for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    usage = plain.usage
    assert tokens == reported("azure/gpt-4o", usage.prompt_tokens, usage.completion_tokens)
    azure_credential_swapped(stack, received(stack, tag))
    assert_priced(logged(stack, tag), tokens)


def test_azure_deployment_embeddings_and_responses(stack: Stack) -> None:
    tag = tagged()
    vectors, tokens = metered(
        stack,
        "azure",
        "embeddings",
        lambda: azure(stack, tag).embeddings.create(model="embed", input=["a", "bb"]),
    )
    assert len(vectors.data) == 2
    assert tokens == reported("azure/text-embedding-3-small", vectors.usage.prompt_tokens, 0)
    assert_priced(logged(stack, tag), tokens)
    # The Responses API is not under a deployment: /openai/responses?api-version=...
    tag = tagged()
    answer, tokens = metered(
        stack,
        "azure",
        "responses",
        lambda: azure(stack, tag).responses.create(model="reasoner", input="hello"),
    )
    assert answer.output_text and answer.usage is not None
    usage = answer.usage
    assert usage.output_tokens_details.reasoning_tokens  # o4-mini reasons
    assert tokens == reported(
        "azure/o4-mini",  # Azure's own price for the model
        usage.input_tokens,
        usage.output_tokens,
        reasoning=usage.output_tokens_details.reasoning_tokens,
    )
    request = received(stack, tag)
    assert (request["path"], request["query"]) == (
        "/openai/responses",
        f"api-version={AZURE_VERSION}",
    )
    azure_credential_swapped(stack, request)
    assert_priced(logged(stack, tag), tokens)


def test_azure_v1_api_json_and_stream(stack: Stack) -> None:
    """OpenAI(base_url=".../azure/openai/v1"): a Bearer key from the client, `api-key` to
    Azure; the body's model names the deployment."""
    tag = tagged()
    answer, tokens = metered(
        stack,
        "azure",
        "chat",
        lambda: azure_v1(stack, tag).chat.completions.create(model="chat", messages=HELLO),
    )
    assert answer.model == "gpt-4o-mini-2024-07-18" and answer.usage is not None
    assert tokens == reported(
        "azure/gpt-4o-mini", answer.usage.prompt_tokens, answer.usage.completion_tokens
    )
    request = received(stack, tag)
    assert (request["path"], request["query"]) == ("/openai/v1/chat/completions", "")
    azure_credential_swapped(stack, request)
    assert_priced(logged(stack, tag), tokens)

    tag = tagged()

    def stream() -> list[Any]:
        return list(
            azure_v1(stack, tag).chat.completions.create(
                model="chat",
                messages=HELLO,
                stream=True,
                stream_options={"include_usage": True},  # asked for: the client keeps it
            )
        )

    chunks, tokens = metered(stack, "azure", "chat", stream)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert tokens == reported("azure/gpt-4o-mini", usage.prompt_tokens, usage.completion_tokens)
    azure_credential_swapped(stack, received(stack, tag))
    assert_priced(logged(stack, tag), tokens)

    tag = tagged()
    events, tokens = metered(
        stack,
        "azure",
        "responses",
        lambda: list(azure_v1(stack, tag).responses.create(model="chat", input="hi", stream=True)),
    )
    done = events[-1].response
    assert done.usage is not None and done.model == "gpt-4o-mini-2024-07-18"
    assert tokens == reported(
        "azure/gpt-4o-mini", done.usage.input_tokens, done.usage.output_tokens
    )
    assert_priced(logged(stack, tag), tokens)


def test_azure_errors_reach_the_client_in_openais_shape(stack: Stack) -> None:
    """Tollway's own refusal on an Azure route is in the OpenAI shape the SDK reads."""
    client = openai.AzureOpenAI(
        azure_endpoint=f"{stack.url}/azure",
        api_version=AZURE_VERSION,
        api_key="tw_wrong",
        max_retries=0,
    )
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="chat", messages=HELLO)


# ---- Vertex AI -------------------------------------------------------------------------


def vertex(stack: Stack, tag: dict[str, str], api_version: str | None = None) -> genai.Client:
    """The README's client: the Tollway key as a fixed OAuth access token."""
    options: dict[str, Any] = {"base_url": stack.url, "headers": tag}
    if api_version is not None:
        options["api_version"] = api_version
    return genai.Client(
        vertexai=True,
        project=PROJECT,
        location=LOCATION,
        credentials=Credentials(token=stack.keys["alice"]),  # type: ignore[no-untyped-call]
        http_options=options,
    )


def model_path(version: str, model: str, method: str) -> str:
    return (
        f"/{version}/projects/{PROJECT}/locations/{LOCATION}"
        f"/publishers/google/models/{model}:{method}"
    )


def vertex_credential_swapped(stack: Stack, request: dict[str, Any]) -> None:
    assert request["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"
    assert "x-goog-api-key" not in request["headers"]
    no_tollway_key(request, stack)


@pytest.mark.parametrize("version", [None, "v1"])  # google-genai's default for Vertex: v1beta1
def test_vertex_generate_content(stack: Stack, version: str | None) -> None:
    tag = tagged()
    client = vertex(stack, tag, version)  # held: a client collected mid-call closes it
    answer, tokens = metered(
        stack,
        "gemini",
        "generate_content",
        lambda: client.models.generate_content(model="gemini-2.0-flash", contents="hi there"),
    )
    assert answer.text
    assert answer.model_version == "gemini-2.0-flash-001"  # priced as gemini-2.0-flash
    usage = answer.usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    assert tokens == reported(
        "vertex_ai/gemini-2.0-flash", usage.prompt_token_count, usage.candidates_token_count
    )
    request = received(stack, tag)
    assert request["path"] == model_path(
        version or "v1beta1", "gemini-2.0-flash", "generateContent"
    )
    vertex_credential_swapped(stack, request)
    line = logged(stack, tag)
    assert (line["route"], line["upstream"], line["status"]) == ("vertex", "upstream_vertex", 200)
    assert_priced(line, tokens)


def test_vertex_stream_sse(stack: Stack) -> None:
    """google-genai streams with ?alt=sse; Vertex reports usage in the last chunk only."""
    tag = tagged()
    client = vertex(stack, tag)

    def call() -> list[Any]:
        return list(client.models.generate_content_stream(model="gemini-2.5-pro", contents="hi"))

    chunks, tokens = metered(stack, "gemini", "generate_content", call)
    assert "".join(c.text or "" for c in chunks)
    assert len(chunks) > 1 and all(c.usage_metadata is None for c in chunks[:-1])
    usage = chunks[-1].usage_metadata
    assert usage is not None and usage.prompt_token_count and usage.candidates_token_count
    assert tokens == reported(
        "vertex_ai/gemini-2.5-pro", usage.prompt_token_count, usage.candidates_token_count
    )
    request = received(stack, tag)
    assert request["path"] == model_path("v1beta1", "gemini-2.5-pro", "streamGenerateContent")
    assert request["query"] == "alt=sse"
    vertex_credential_swapped(stack, request)
    assert_priced(logged(stack, tag), tokens)


def test_vertex_stream_as_a_json_array_with_thoughts(stack: Stack) -> None:
    """Without ?alt=sse Vertex streams one JSON array. google-genai always asks for SSE, so
    this is httpx with the path and the Bearer header the SDK sends. Thoughts are output
    (and reasoning); the demo's thinking model is not priced, its tokens count all the same."""
    tag = tagged()
    path = model_path("v1", "gemini-2.5-flash-thinking", "streamGenerateContent")
    body = {"contents": [{"role": "user", "parts": [{"text": "hello"}]}]}
    headers = {"authorization": f"Bearer {stack.keys['alice']}", **tag}
    response, tokens = metered(
        stack,
        "gemini",
        "generate_content",
        lambda: httpx.post(f"{stack.url}{path}", headers=headers, json=body, timeout=20),
    )
    assert response.status_code == 200
    docs = response.json()
    assert len(docs) > 1 and "usageMetadata" not in docs[0]
    usage = docs[-1]["usageMetadata"]
    thoughts = usage["thoughtsTokenCount"]
    assert tokens == reported(
        "other",
        usage["promptTokenCount"],
        usage["candidatesTokenCount"] + thoughts,
        reasoning=thoughts,
    )
    request = received(stack, tag)
    assert (request["path"], request["query"]) == (path, "")
    vertex_credential_swapped(stack, request)


def test_vertex_express_mode_client_routes_to_vertex(stack: Stack) -> None:
    """google-genai's express mode (vertexai=True with an API key) sends no project and the
    key in x-goog-api-key: still Vertex's route, and the key is swapped all the same."""
    tag = tagged()
    client = genai.Client(
        vertexai=True,
        api_key=stack.keys["alice"],
        http_options={"base_url": stack.url, "headers": tag},
    )
    answer, tokens = metered(
        stack,
        "gemini",
        "generate_content",
        lambda: client.models.generate_content(model="gemini-2.5-flash", contents="hi"),
    )
    assert answer.text and answer.usage_metadata is not None
    usage = answer.usage_metadata
    assert usage.prompt_token_count and usage.candidates_token_count
    assert tokens == reported(
        "vertex_ai/gemini-2.5-flash", usage.prompt_token_count, usage.candidates_token_count
    )
    request = received(stack, tag)
    assert request["path"] == "/v1beta1/publishers/google/models/gemini-2.5-flash:generateContent"
    vertex_credential_swapped(stack, request)  # this upstream's credential: a Bearer token
    line = logged(stack, tag)
    assert line["route"] == "vertex"
    assert_priced(line, tokens)


def claude_on_vertex(stack: Stack, tag: dict[str, str]) -> anthropic.AnthropicVertex:
    """anthropic's Vertex client, the front door as its base URL and the Tollway key as
    its access token."""
    return anthropic.AnthropicVertex(
        region="us-east5",
        project_id="my-project",
        access_token=stack.keys["alice"],
        base_url=f"{stack.url}/v1",
        default_headers=tag,
        max_retries=0,
    )


def test_claude_on_vertex_json_and_stream(stack: Stack) -> None:
    """AnthropicVertex: Anthropic's Messages API at .../publishers/anthropic/models/{m}:
    rawPredict (streamRawPredict), metered as messages at Vertex's price for the model."""
    tag = tagged()
    client = claude_on_vertex(stack, tag)
    hello = [{"role": "user", "content": "hello"}]
    model = "claude-sonnet-4-5@20250929"
    answer, tokens = metered(
        stack,
        "gemini",
        "messages",
        lambda: client.messages.create(model=model, max_tokens=64, messages=hello),  # type: ignore[arg-type]
    )
    assert answer.content and answer.usage.output_tokens
    assert tokens == reported(
        "vertex_ai/claude-sonnet-4-5", answer.usage.input_tokens, answer.usage.output_tokens
    )
    request = received(stack, tag)
    assert request["path"] == (
        f"/v1/projects/my-project/locations/us-east5/publishers/anthropic/models/{model}:rawPredict"
    )
    vertex_credential_swapped(stack, request)
    line = logged(stack, tag)
    assert (line["route"], line["request_model"]) == ("vertex", model)
    assert_priced(line, tokens)
    assert float(line["cost_usd"]) == pytest.approx(
        (answer.usage.input_tokens * 3 + answer.usage.output_tokens * 15) / 1e6, abs=1e-9
    )

    tag = tagged()
    client = claude_on_vertex(stack, tag)

    def stream() -> Any:
        with client.messages.stream(model=model, max_tokens=64, messages=hello) as s:  # type: ignore[arg-type]
            return s.get_final_message()

    final, tokens = metered(stack, "gemini", "messages", stream)
    assert tokens == reported(
        "vertex_ai/claude-sonnet-4-5", final.usage.input_tokens, final.usage.output_tokens
    )
    assert received(stack, tag)["path"].endswith(f"/{model}:streamRawPredict")
    assert_priced(logged(stack, tag), tokens)


def test_vertex_token_refreshed_in_the_file_is_used_without_a_restart(stack: Stack) -> None:
    """The README's refresher: a new token renamed over the file is sent from then on."""
    token = token_file(stack.gateway.workdir)
    try:
        write_token(token, "ya29.an-expired-token")
        tag = tagged()
        path = model_path("v1", "gemini-2.5-flash", "generateContent")
        body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
        headers = {"authorization": f"Bearer {stack.keys['alice']}", **tag}

        def sent_with(expected: str) -> httpx.Response | None:
            response = httpx.post(f"{stack.url}{path}", headers=headers, json=body, timeout=20)
            request = received(stack, tag)
            return response if request["headers"]["authorization"] == expected else None

        stale = eventually(lambda: sent_with("Bearer ya29.an-expired-token"))
        # Vertex's own 401 for an expired token reaches the client (Google's shape).
        assert stale.status_code == 401
        assert stale.json()["error"]["status"] == "UNAUTHENTICATED"
    finally:
        write_token(token, PROVIDER_KEY)
    fresh = eventually(lambda: sent_with(f"Bearer {PROVIDER_KEY}"))
    assert fresh.status_code == 200 and fresh.json()["candidates"]
