"""Metering through the real front door: the tokens the upstream reported, priced, exported.

For each provider and mode the usage the client received (or, where Tollway strips
it, the same request's JSON usage) must equal what /metrics and the access log say,
and the cost must be tokens x the table's prices to 1e-9 USD.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc import up
from extproc.config import Config, ModelPrice, PricingConfig, Upstream
from extproc.pricing import cost as price_of
from extproc.pricing import load_prices
from extproc.providers import Usage
from extproc.stages.metering import TOKEN_TYPES

from .conftest import PROVIDER_KEY, Stack, eventually, start_stack

pytestmark = pytest.mark.e2e

LONG = "word " * 1200  # over 4096 characters: the demo upstream reports half the prompt cached
# Models the demo upstream treats specially, priced in config like a custom model.
EXTRA_PRICES = {
    "claude-sonnet-4-5-cache-write": ModelPrice(
        provider="anthropic", input=3, output=15, cached_input=0.3, cache_write=3.75
    ),
    "gemini-2.5-flash-thinking": ModelPrice(
        provider="gemini", input=0.3, output=2.5, cached_input=0.03
    ),
}


def with_prices(config: Config) -> Config:
    """The test stack, plus the extra prices and an upstream that is down."""
    dead = Upstream(url=f"http://127.0.0.1:{up.free_port()}", api="openai", prefixes=("/dead/",))
    return config.model_copy(
        update={
            "pricing": PricingConfig(models=EXTRA_PRICES),
            "upstreams": {**config.upstreams, "dead": dead},
        }
    )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("metering"), customize=with_prices)
    yield s
    s.gateway.stop()


@dataclass(frozen=True)
class Labels:
    model: str
    provider: str
    api: str
    source: str = "reported"
    tenant: str = "acme"


def read(stack: Stack, labels: Labels) -> tuple[Usage, float, float]:
    """(tokens, cost, requests finished) for these labels, from one scrape."""
    samples = stack.scrape()
    base = {"tenant": labels.tenant, "model": labels.model, "provider": labels.provider}
    base |= {"api": labels.api, "source": labels.source}

    def sample(name: str, **values: str) -> float:
        return samples.get((name, frozenset(values.items())), 0.0)

    counts = {
        field: int(sample("tollway_gen_ai_tokens_total", **base, type=kind))
        for kind, field in TOKEN_TYPES.items()
    }
    done = sample(
        "tollway_gen_ai_request_duration_seconds_count",
        provider=labels.provider,
        api=labels.api,
        model=labels.model,
    )
    return Usage(**counts), sample("tollway_gen_ai_cost_usd_total", **base), done


def metered(
    stack: Stack, labels: Labels, call: Callable[[], Any], *, logged: bool = True
) -> tuple[Any, Usage, float]:
    """Run ``call``; return its result and the tokens and cost it added to /metrics.

    With ``logged``, the access log must carry the same tokens and cost for it.
    """
    before, spent_before, done_before = read(stack, labels)
    log_before = len(stack.access_log())
    result = call()
    # A stream's last chunk may reach the client before Tollway has answered Envoy's
    # end-of-stream message: poll until the request is counted as finished (the duration
    # is observed after the tokens and the cost), then read once more.
    eventually(lambda: read(stack, labels)[2] > done_before)
    after, spent, _ = read(stack, labels)
    delta = Usage(**{f: getattr(after, f) - getattr(before, f) for f in TOKEN_TYPES.values()})
    if logged:
        eventually(lambda: logged_as(stack.access_log()[log_before:], delta, spent - spent_before))
    return result, delta, spent - spent_before


def logged_as(entries: list[dict[str, Any]], usage: Usage, spent: float) -> bool:
    """Some new access-log entry holds exactly these tokens and this cost."""
    return any(
        (
            e["input_tokens"],
            e["output_tokens"],
            e["cached_input_tokens"],
            e["cache_creation_tokens"],
            e["reasoning_tokens"],
        )
        == (
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.cache_creation_tokens,
            usage.reasoning_tokens,
        )
        and abs(float(e["cost_usd"]) - spent) < 1e-9
        and e["usage_estimated"] is False
        for e in entries
    )


def expected_cost(stack: Stack, model: str, usage: Usage) -> float:
    table = load_prices(stack.gateway.config.pricing)
    found = table.lookup(model)
    assert found is not None, model
    return price_of(found[1], usage).usd


def oai(stack: Stack) -> openai.OpenAI:
    key = stack.keys["alice"]
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=key, max_retries=0, timeout=20)


def openai_usage(raw: Any) -> Usage:
    """Usage as OpenAI reports it (chat and completions, or the Responses API)."""
    if hasattr(raw, "prompt_tokens"):
        prompt, completion = raw.prompt_tokens, raw.completion_tokens
        cached = raw.prompt_tokens_details.cached_tokens if raw.prompt_tokens_details else 0
        details = getattr(raw, "completion_tokens_details", None)
    else:
        prompt, completion = raw.input_tokens, raw.output_tokens
        cached = raw.input_tokens_details.cached_tokens
        details = raw.output_tokens_details
    reasoning = details.reasoning_tokens if details else 0
    return Usage(prompt, completion, cached or 0, 0, reasoning or 0)


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": LONG}], **extra}


def test_openai_chat_json_cached_and_reasoning(stack: Stack) -> None:
    labels = Labels("o4-mini", "openai", "chat")
    response, tokens, spent = metered(
        stack, labels, lambda: oai(stack).chat.completions.create(**chat("o4-mini"))
    )
    reported = openai_usage(response.usage)
    assert reported.cached_input_tokens and reported.reasoning_tokens  # the traps are exercised
    assert tokens == reported
    assert spent == pytest.approx(expected_cost(stack, "o4-mini", reported), abs=1e-9)


def test_openai_stream_gets_usage_the_client_did_not_ask_for(stack: Stack) -> None:
    labels = Labels("gpt-4o-mini", "openai", "chat")
    plain = oai(stack).chat.completions.create(**chat("gpt-4o-mini"))

    def stream() -> list[Any]:
        return list(oai(stack).chat.completions.create(**chat("gpt-4o-mini"), stream=True))

    chunks, tokens, spent = metered(stack, labels, stream)
    assert all(chunk.choices for chunk in chunks)  # the usage-only chunk was taken out
    assert all(chunk.usage is None for chunk in chunks)
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == plain.choices[0].message.content
    )
    assert tokens == openai_usage(plain.usage)
    # Reported, not estimated: the upstream was asked for usage on the client's behalf.
    assert spent == pytest.approx(expected_cost(stack, "gpt-4o-mini", tokens), abs=1e-9)


def test_a_stream_sent_with_a_content_length_still_loses_only_the_usage_chunk(
    stack: Stack,
) -> None:
    """Some servers send SSE in one piece with a content-length; the stripped body is shorter."""
    labels = Labels("gpt-4o-mini", "openai", "chat")
    plain = oai(stack).chat.completions.create(**chat("gpt-4o-mini"))

    def stream() -> list[Any]:
        client = oai(stack).with_options(default_headers={"x-demo-sse-whole": "1"})
        return list(client.chat.completions.create(**chat("gpt-4o-mini"), stream=True))

    chunks, tokens, _ = metered(stack, labels, stream)
    assert chunks and all(chunk.choices for chunk in chunks)
    assert tokens == openai_usage(plain.usage)


def test_openai_stream_with_include_usage_keeps_its_usage_chunk(stack: Stack) -> None:
    labels = Labels("gpt-4o", "openai", "chat")
    options = {"stream_options": {"include_usage": True}}

    def stream() -> list[Any]:
        return list(oai(stack).chat.completions.create(**chat("gpt-4o", **options), stream=True))

    chunks, tokens, spent = metered(stack, labels, stream)
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert tokens == openai_usage(last.usage)
    assert spent == pytest.approx(expected_cost(stack, "gpt-4o", tokens), abs=1e-9)


def test_a_stream_in_one_byte_chunks_gives_the_same_numbers(stack: Stack) -> None:
    labels = Labels("gpt-4.1-mini", "openai", "chat")
    plain = oai(stack).chat.completions.create(**chat("gpt-4.1-mini"))
    before = stack.metric("tollway_extproc_messages_total", kind="response_body")

    def stream() -> list[Any]:
        client = oai(stack).with_options(default_headers={"x-demo-chunk-bytes": "1"})
        return list(client.chat.completions.create(**chat("gpt-4.1-mini"), stream=True))

    chunks, tokens, _ = metered(stack, labels, stream)
    body_messages = stack.metric("tollway_extproc_messages_total", kind="response_body") - before
    assert body_messages > 200  # it really did arrive in pieces
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == plain.choices[0].message.content
    )
    assert tokens == openai_usage(plain.usage)


def test_openai_responses_json_and_stream(stack: Stack) -> None:
    labels = Labels("gpt-5", "openai", "responses")
    client = oai(stack)
    response, tokens, spent = metered(
        stack, labels, lambda: client.responses.create(model="gpt-5", input=LONG)
    )
    reported = openai_usage(response.usage)
    assert reported.reasoning_tokens and reported.cached_input_tokens
    assert tokens == reported
    assert spent == pytest.approx(expected_cost(stack, "gpt-5", reported), abs=1e-9)

    def stream() -> Any:
        events = list(client.responses.create(model="gpt-5", input=LONG, stream=True))
        return events[-1].response

    final, tokens, _ = metered(stack, labels, stream)
    assert tokens == openai_usage(final.usage) == reported


def test_openai_embeddings_on_a_route_without_auth(stack: Stack) -> None:
    """The stack's /v1/embeddings route has auth off: metered all the same, tenant "none"."""
    labels = Labels("text-embedding-3-small", "openai", "embeddings", tenant="none")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=PROVIDER_KEY, max_retries=0)

    def embed() -> Any:
        return client.embeddings.create(model="text-embedding-3-small", input=["a", LONG])

    response, tokens, spent = metered(stack, labels, embed)
    assert tokens == Usage(response.usage.prompt_tokens, 0)
    assert spent == pytest.approx(expected_cost(stack, "text-embedding-3-small", tokens), abs=1e-9)


def anthropic_usage(raw: Any) -> Usage:
    """Anthropic's input_tokens excludes cache reads and writes; Usage's input does not."""
    read_, write = raw.cache_read_input_tokens or 0, raw.cache_creation_input_tokens or 0
    return Usage(raw.input_tokens + read_ + write, raw.output_tokens, read_, write, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_anthropic_messages_with_cache_reads_and_writes(stack: Stack, stream: bool) -> None:
    model = "claude-sonnet-4-5-cache-write"
    labels = Labels(model, "anthropic", "messages")
    client = anthropic.Anthropic(base_url=stack.url, api_key=stack.keys["alice"], max_retries=0)
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": LONG}],
    }

    def call() -> Any:
        if not stream:
            return client.messages.create(**request)
        with client.messages.stream(**request) as events:
            return events.get_final_message()

    message, tokens, spent = metered(stack, labels, call)
    reported = anthropic_usage(message.usage)
    assert reported.cached_input_tokens and reported.cache_creation_tokens
    assert tokens == reported
    assert spent == pytest.approx(expected_cost(stack, model, reported), abs=1e-9)


def gemini_usage(raw: dict[str, Any]) -> Usage:
    """Gemini's thoughts are outside candidatesTokenCount; Usage's output includes them."""
    thoughts = raw.get("thoughtsTokenCount", 0)
    return Usage(
        raw["promptTokenCount"],
        raw["candidatesTokenCount"] + thoughts,
        raw.get("cachedContentTokenCount", 0),
        0,
        thoughts,
    )


@pytest.mark.parametrize(
    ("verb", "query"),
    [("generateContent", ""), ("streamGenerateContent", "?alt=sse")],
    ids=["json", "sse"],
)
def test_gemini_generate_content_with_thoughts(stack: Stack, verb: str, query: str) -> None:
    model = "gemini-2.5-flash-thinking"
    labels = Labels(model, "gemini", "generate_content")
    url = f"{stack.url}/v1beta/models/{model}:{verb}{query}"
    body = {"contents": [{"role": "user", "parts": [{"text": LONG}]}]}
    headers = {"x-goog-api-key": stack.keys["alice"]}

    def call() -> dict[str, Any]:
        response = httpx.post(url, json=body, headers=headers, timeout=20)
        response.raise_for_status()
        if not query:
            return dict(response.json())
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        return dict(json.loads(events[-1]))

    last, tokens, spent = metered(stack, labels, call)
    reported = gemini_usage(last["usageMetadata"])
    assert reported.reasoning_tokens and reported.cached_input_tokens
    assert tokens == reported
    assert spent == pytest.approx(expected_cost(stack, model, reported), abs=1e-9)


def test_json_responses_carry_their_cost_and_streams_do_not(stack: Stack) -> None:
    client = oai(stack)
    raw = client.chat.completions.with_raw_response.create(**chat("gpt-4o"))
    usage = openai_usage(raw.parse().usage)
    header = raw.headers.get("x-tollway-cost-usd")
    assert header is not None
    assert float(header) == pytest.approx(expected_cost(stack, "gpt-4o", usage), abs=1e-9)
    with client.chat.completions.with_streaming_response.create(
        **chat("gpt-4o"), stream=True
    ) as streamed:
        assert "x-tollway-cost-usd" not in streamed.headers
        streamed.read()


def test_access_log_carries_model_tokens_and_cost(stack: Stack) -> None:
    client = oai(stack).with_options(default_headers={"user-agent": "metering-log"})
    response = client.chat.completions.create(**chat("o4-mini"))
    usage = openai_usage(response.usage)

    def entry() -> dict[str, Any] | None:
        found = [e for e in stack.access_log() if e["user_agent"] == "metering-log"]
        return found[-1] if found else None

    logged = eventually(entry)
    assert logged["request_model"] == "o4-mini"
    assert logged["model"] == response.model
    assert (
        logged["input_tokens"],
        logged["output_tokens"],
        logged["cached_input_tokens"],
        logged["cache_creation_tokens"],
        logged["reasoning_tokens"],
    ) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        0,
        usage.reasoning_tokens,
    )
    # A decimal string with 9 places, like the cost header: no float noise.
    assert logged["cost_usd"] == f"{expected_cost(stack, 'o4-mini', usage):.9f}"
    assert logged["usage_estimated"] is False


def test_a_stream_the_client_abandons_is_counted_as_estimated(stack: Stack) -> None:
    labels = Labels("gpt-4o-mini", "openai", "chat", source="estimated")
    client = oai(stack).with_options(default_headers={"x-demo-chunk-bytes": "4"})

    def abandon() -> None:
        stream = client.chat.completions.create(**chat("gpt-4o-mini"), stream=True)
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # got some text, then hang up
        stream.close()

    # The client is gone before the end: the access log line is written without usage.
    _, tokens, _ = metered(stack, labels, abandon, logged=False)
    assert tokens.input_tokens > 0 and tokens.output_tokens > 0


def test_an_unpriced_model_costs_nothing_and_is_counted(stack: Stack) -> None:
    before = stack.metric("tollway_gen_ai_unpriced_requests_total", provider="openai", api="chat")
    labels = Labels("other", "openai", "chat")
    _, tokens, spent = metered(
        stack, labels, lambda: oai(stack).chat.completions.create(**chat("my-own-finetune"))
    )
    assert tokens.input_tokens > 0 and spent == 0
    after = stack.metric("tollway_gen_ai_unpriced_requests_total", provider="openai", api="chat")
    assert after == before + 1


def test_a_large_json_response_is_metered_whole(stack: Stack) -> None:
    """Several MB of embeddings: over Envoy's default 1 MiB buffer, still buffered and read."""
    labels = Labels("text-embedding-3-large", "openai", "embeddings", tenant="none")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=PROVIDER_KEY, max_retries=0)
    inputs = [f"line {i}" for i in range(20_000)]

    def embed() -> Any:
        raw = client.embeddings.with_raw_response.create(
            model="text-embedding-3-large", input=inputs, encoding_format="float"
        )
        assert len(raw.content) > 2_000_000
        return raw.parse()

    response, tokens, _ = metered(stack, labels, embed)
    assert len(response.data) == len(inputs)
    assert tokens == Usage(response.usage.prompt_tokens, 0)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "sse"])
def test_openai_legacy_completions(stack: Stack, stream: bool) -> None:
    labels = Labels("gpt-3.5-turbo-instruct", "openai", "completions")
    client = oai(stack)
    request = {"model": "gpt-3.5-turbo-instruct", "prompt": LONG, "max_tokens": 8}
    plain = client.completions.create(**request)

    def call() -> Any:
        if not stream:
            return client.completions.create(**request)
        return list(client.completions.create(**request, stream=True))

    result, tokens, spent = metered(stack, labels, call)
    if stream:
        assert "".join(c.choices[0].text for c in result) == plain.choices[0].text
    assert tokens == openai_usage(plain.usage)
    assert spent == pytest.approx(expected_cost(stack, "gpt-3.5-turbo-instruct", tokens), abs=1e-9)


def test_an_upstream_error_costs_nothing(stack: Stack) -> None:
    labels = Labels("text-embedding-3-small", "openai", "embeddings", tenant="none")
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key="sk-wrong", max_retries=0)
    before = read(stack, labels)
    with pytest.raises(openai.AuthenticationError):  # the demo upstream refuses the key
        client.embeddings.create(model="text-embedding-3-small", input="hello")
    assert read(stack, labels) == before


def test_an_unreachable_upstream_costs_nothing(stack: Stack) -> None:
    labels = Labels("gpt-4o", "openai", "chat")
    estimated = Labels("gpt-4o", "openai", "chat", source="estimated")
    before = read(stack, labels), read(stack, estimated)
    client = openai.OpenAI(base_url=f"{stack.url}/dead/v1", api_key=stack.keys["alice"])
    with pytest.raises(openai.InternalServerError):  # Envoy's 503: nothing listens there
        client.with_options(max_retries=0).chat.completions.create(**chat("gpt-4o"))
    # Envoy ends the failed request's ext_proc stream before it opens the next one on
    # the same connection: once a later request is metered, a late record would show.
    later = Labels("gpt-4o-mini", "openai", "chat")
    metered(stack, later, lambda: oai(stack).chat.completions.create(**chat("gpt-4o-mini")))
    assert (read(stack, labels), read(stack, estimated)) == before
