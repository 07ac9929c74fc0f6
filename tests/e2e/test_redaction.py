"""Redaction through the real Envoy with the real SDKs: what the provider (the demo
upstream) received, what the client got back, and that nothing leaked into logs."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from google import genai
from google.genai import errors as genai_errors

from extproc import keys
from extproc.config import Config, RedactionConfig, Upstream

from . import leaks
from .conftest import Stack, eventually, start_stack

pytestmark = pytest.mark.e2e

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
IBAN = "DE89 3704 0044 0532 0130 00"
AWS = "AKIA4HXQ7KPZ3MWRT2LB"
PROMPT = f"Refund card {CARD} to {IBAN} and mail {EMAIL}"
ECHO = {"x-demo-echo": "1"}
leaks.plant(EMAIL, CARD, IBAN, AWS, CARD.replace(" ", ""))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    def customize(config: Config) -> Config:
        demo = config.upstreams["openai"]
        trusted = Upstream(
            url=demo.url,
            prefixes=("/unused/",),
            mount="/trusted",
            credential=demo.credential,
            redaction=False,
        )
        policies = {
            "strict": RedactionConfig(action="mask", responses=True),
            "support": RedactionConfig(restore=True, tenants=("helpdesk",)),
        }
        return config.model_copy(
            update={
                "redaction": RedactionConfig(),
                "redaction_policies": policies,
                "upstreams": {**config.upstreams, "trusted": trusted},
            }
        )

    s = start_stack(tmp_path_factory.mktemp("redaction"), customize=customize)
    for name, extra in (("strict", {"redaction": "strict"}), ("helpdesk", {"tenant": "helpdesk"})):
        key, record = keys.generate(name=name, **{"tenant": "acme", **extra})  # type: ignore[arg-type]
        keys.add(s.keys_file, record)
        s.keys[name] = key
    # The server re-reads the keys file within its reload interval.
    eventually(
        lambda: (
            chat_status(s, s.keys["helpdesk"]) == 200 and chat_status(s, s.keys["strict"]) == 200
        )
    )
    yield s
    s.gateway.stop()


def chat_status(stack: Stack, key: str) -> int:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(
        f"{stack.url}/v1/chat/completions",
        json=body,
        headers={"authorization": f"Bearer {key}"},
        timeout=5,
    ).status_code


def oai(stack: Stack, key: str = "", base: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{stack.url}{base}", api_key=key or stack.keys["alice"], max_retries=0, timeout=10
    )


def claude(stack: Stack, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.url, api_key=key, max_retries=0, timeout=10)


def ask(client: openai.OpenAI, content: str, **extra: Any) -> Any:
    """One user message as a chat completion (``stream=True``: the stream)."""
    return client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": content}], **extra
    )


def received(stack: Stack, marker: str) -> dict[str, Any]:
    """The body the upstream received for the request whose prompt has ``marker``."""
    bodies = [
        orjson.loads(r["body"]) for r in stack.upstream_requests() if marker in (r["body"] or "")
    ]
    assert len(bodies) == 1, f"{len(bodies)} upstream requests carry {marker!r}"
    return bodies[0]


def tag() -> str:
    return f"t{secrets.token_hex(4)}"


def test_openai_chat_reaches_the_provider_with_placeholders(stack: Stack) -> None:
    marker = tag()
    reply = ask(oai(stack), f"{marker} {PROMPT}", extra_headers=ECHO)
    want = f"{marker} Refund card [CREDIT_CARD_1] to [IBAN_1] and mail [EMAIL_1]"
    assert reply.choices[0].message.content == want
    assert received(stack, marker)["messages"][0]["content"] == want


def test_a_streamed_chat_request_is_redacted_too(stack: Stack) -> None:
    marker = tag()
    stream = ask(oai(stack), f"{marker} {PROMPT}", stream=True, extra_headers=ECHO)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == f"{marker} Refund card [CREDIT_CARD_1] to [IBAN_1] and mail [EMAIL_1]"


def test_a_secret_is_refused_before_any_provider_sees_it(stack: Stack) -> None:
    marker = tag()
    with pytest.raises(openai.BadRequestError) as caught:
        ask(oai(stack), f"{marker} my key {AWS}")
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "sensitive_data_blocked"
    assert "aws_access_key" in error["message"] and AWS not in error["message"]
    assert not [r for r in stack.upstream_requests() if marker in (r["body"] or "")]


def test_anthropic_sdk_system_and_tool_result_are_redacted(stack: Stack) -> None:
    marker = tag()
    client = claude(stack, stack.keys["alice"])
    message = client.messages.create(
        model="claude-3-5-haiku",
        max_tokens=200,
        system=f"{marker} Staff contact: {EMAIL}",
        messages=[
            {"role": "user", "content": "Look the customer up"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t1", "name": "crm", "input": {"q": EMAIL}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": f"card {CARD}"}
                ],
            },
        ],
        extra_headers=ECHO,
    )
    got = received(stack, marker)
    assert got["system"] == f"{marker} Staff contact: [EMAIL_1]"
    assert got["messages"][1]["content"][0]["input"] == {"q": "[EMAIL_1]"}
    assert got["messages"][2]["content"][0]["content"] == "card [CREDIT_CARD_1]"
    assert CARD not in message.content[0].text and EMAIL not in message.content[0].text  # type: ignore[union-attr]


def test_google_genai_sdk_is_redacted_and_a_block_is_googles_400(stack: Stack) -> None:
    marker = tag()
    client = genai.Client(
        api_key=stack.keys["alice"], http_options={"base_url": stack.url, "headers": ECHO}
    )
    reply = client.models.generate_content(model="gemini-2.0-flash", contents=f"{marker} {PROMPT}")
    assert reply.text == f"{marker} Refund card [CREDIT_CARD_1] to [IBAN_1] and mail [EMAIL_1]"
    with pytest.raises(genai_errors.ClientError) as caught:
        client.models.generate_content(model="gemini-2.0-flash", contents=f"key {AWS}")
    assert (caught.value.code, caught.value.status) == (400, "INVALID_ARGUMENT")
    assert AWS not in (caught.value.message or "")


def test_restore_gives_the_client_its_own_values_back_json_and_streamed(stack: Stack) -> None:
    client = oai(stack, stack.keys["helpdesk"])
    marker = tag()
    reply = ask(client, f"{marker} {PROMPT}", extra_headers=ECHO)
    assert reply.choices[0].message.content == f"{marker} {PROMPT}"
    assert EMAIL not in orjson.dumps(received(stack, marker)).decode()
    marker = tag()
    split = {**ECHO, "x-demo-chunk-bytes": "7"}  # SSE split at arbitrary bytes
    stream = ask(client, f"{marker} {PROMPT}", stream=True, extra_headers=split)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == f"{marker} {PROMPT}"
    )


def test_strict_masks_the_prompt_and_what_the_model_writes(stack: Stack) -> None:
    client = oai(stack, stack.keys["strict"])
    marker = tag()
    reply = ask(client, f"{marker} mail {EMAIL}", extra_headers=ECHO)
    assert reply.choices[0].message.content == f"{marker} mail j***@example.com"
    said = f"Sure: your card {CARD} and IBAN {IBAN} are on file."
    masked = "Sure: your card **** **** **** 1111 and IBAN DE** **** **** **** **30 00 are on file."
    stream = client.responses.create(
        model="gpt-4o-mini",
        input="what is on file?",
        stream=True,
        extra_headers={"x-demo-reply": said, "x-demo-chunk-bytes": "5"},
    )
    deltas, done = "", ""
    for event in stream:
        if event.type == "response.output_text.delta":
            deltas += event.delta
        elif event.type == "response.completed":
            done = event.response.output_text
    assert deltas == masked and done == masked
    with claude(stack, stack.keys["strict"]).messages.stream(
        model="claude-3-5-haiku",
        max_tokens=100,
        messages=[{"role": "user", "content": "?"}],
        extra_headers={"x-demo-reply": said},
    ) as s:
        assert "".join(s.text_stream) == masked


def test_a_route_with_redaction_off_passes_the_prompt_as_sent(stack: Stack) -> None:
    marker = tag()
    reply = ask(oai(stack, base="/trusted/v1"), f"{marker} {PROMPT}", extra_headers=ECHO)
    assert reply.choices[0].message.content == f"{marker} {PROMPT}"


def test_a_body_that_cannot_be_checked_is_refused_and_counted(stack: Stack) -> None:
    before = stack.metric("tollway_redaction_failures_total", outcome="failed_closed")
    response = httpx.post(
        f"{stack.url}/v1/chat/completions",
        content=b'{"model": "gpt-4o-mini", "messages": [',
        headers={
            "authorization": f"Bearer {stack.keys['alice']}",
            "content-type": "application/json",
        },
        timeout=5,
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_body"
    eventually(
        lambda: (
            stack.metric("tollway_redaction_failures_total", outcome="failed_closed") == before + 1
        )
    )


def test_metrics_count_by_type_and_action_and_logs_hold_no_planted_value(stack: Stack) -> None:
    labels = {"entity": "credit_card", "action": "placeholder", "where": "request"}
    before = stack.metric("tollway_redactions_total", **labels)
    ask(oai(stack), PROMPT)
    eventually(lambda: stack.metric("tollway_redactions_total", **labels) == before + 1)
    assert (
        stack.metric("tollway_redactions_total", entity="secrets", action="block", where="request")
        >= 1
    )
    assert (
        stack.metric(
            "tollway_redactions_total", entity="credit_card", action="mask", where="response"
        )
        >= 1
    )
    logs = "".join(
        p.read_text(errors="replace")
        for p in stack.gateway.workdir.glob("*.log")
        if p.name != "demo.log"
    )
    for planted in (EMAIL, CARD, IBAN, AWS, CARD.replace(" ", "")):
        assert planted not in logs


def test_a_long_prompt_searched_window_by_window_reaches_the_provider_redacted(
    stack: Stack,
) -> None:
    marker = tag()
    filler = "The quarterly report shows revenue grew while costs fell. " * 6000  # ~350 K
    prompt = f"{marker} {filler}card {CARD} at the end"
    reply = ask(oai(stack), prompt)
    assert reply.choices[0].finish_reason == "stop"
    sent = received(stack, marker)["messages"][0]["content"]
    assert sent.endswith("card [CREDIT_CARD_1] at the end") and CARD not in sent
