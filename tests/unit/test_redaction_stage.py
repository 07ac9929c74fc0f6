"""The redaction stage through the pipeline: what the provider gets, what the client sees."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from extproc import error_shapes, keys
from extproc.config import Config, ConfigError, Upstream
from extproc.decisions import BodyMode, Deny, Phase
from extproc.keys import KeyRecord
from extproc.metrics import Metrics
from extproc.pipeline import Pipeline, Run
from extproc.providers.sse import SSEParser
from extproc.redaction.detect import Detector
from extproc.redaction.findings import Finding
from extproc.redaction.policy import Policy
from extproc.routes import RouteTable
from extproc.stages.auth import AuthStage
from extproc.stages.credentials import CredentialStage
from extproc.stages.redaction import RedactionStage, build

from .factories import PROVIDER_KEYS, Clock, upstreams

EMAIL = "jane.doe@example.com"
CARD = "4111 1111 1111 1111"
AWS = "AKIA4HXQ7KPZ3MWRT2LB"


def config(**settings: Any) -> Config:
    routes = {
        **upstreams(),
        "trusted": Upstream(url="http://127.0.0.1:9002", prefixes=("/trusted/",), redaction=False),
    }
    return Config.model_validate({"upstreams": routes, **settings})


class World:
    def __init__(
        self, cfg: Config, *records: KeyRecord, stage: RedactionStage | None = None
    ) -> None:
        self.metrics = Metrics()
        self.stage = stage or build(cfg, self.metrics)
        self.key, record = keys.generate(name="alice", tenant="acme")
        self.keys = {"alice": self.key}
        ring = [record, *records]
        self.pipeline = Pipeline(
            RouteTable(cfg.upstreams),
            [AuthStage(keys.KeyRing(ring)), CredentialStage(PROVIDER_KEYS), self.stage],
            Clock(),
        )

    def send(
        self, body: Any, path: str = "/v1/chat/completions", key: str | None = None, **headers: str
    ) -> tuple[Run, Deny | None]:
        hdrs = {
            "authorization": f"Bearer {key or self.key}",
            "content-type": "application/json",
            **headers,
        }
        run = self.pipeline.start("POST", path, hdrs, frozenset())
        decision = run.request_headers()
        if isinstance(decision, Deny):
            return run, decision
        assert isinstance(decision, Phase)
        if Phase.REQUEST_BODY not in decision:
            return run, None
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        denied = run.request_body(raw)
        assert not hasattr(denied, "__await__")
        return run, denied  # type: ignore[return-value]

    def sent(self, run: Run) -> Any:
        """The body as the provider gets it."""
        return orjson.loads(run.ex.new_body if run.ex.new_body is not None else run.ex.body or b"")

    def count(self, entity: str, action: str, where: str = "request") -> float:
        labels = {"entity": entity, "action": action, "where": where}
        return self.metrics.registry.get_sample_value("tollway_redactions_total", labels) or 0

    def failures(self, outcome: str) -> float:
        return (
            self.metrics.registry.get_sample_value(
                "tollway_redaction_failures_total", {"outcome": outcome}
            )
            or 0
        )


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": text}], **extra}


def error_of(deny: Deny, dialect: str = "openai") -> dict[str, Any]:
    return error_shapes.error_document(dialect, deny.status, deny.type, deny.code, deny.message)  # type: ignore[arg-type]


def test_off_unless_configured() -> None:
    assert not build(config(), Metrics())


def test_placeholders_replace_pii_in_what_the_provider_gets() -> None:
    world = World(config(redaction={}))
    run, denied = world.send(chat(f"Refund {CARD} for {EMAIL}, cc {EMAIL}", temperature=0.2))
    assert denied is None
    sent = world.sent(run)
    assert sent["messages"][0]["content"] == "Refund [CREDIT_CARD_1] for [EMAIL_1], cc [EMAIL_1]"
    assert sent["temperature"] == 0.2 and sent["model"] == "gpt-4o"
    assert (
        world.count("email", "placeholder") == 2 and world.count("credit_card", "placeholder") == 1
    )


def test_entities_at_the_edges_of_many_texts_land_in_their_own_text() -> None:
    world = World(config(redaction={}))
    messages = [
        {"role": "system", "content": EMAIL},
        {"role": "user", "content": f"{CARD} is mine"},
        {"role": "user", "content": ""},
        {"role": "user", "content": f"mail {EMAIL}"},
        {"role": "user", "content": "no entity here"},
        {"role": "user", "content": [{"type": "text", "text": f"x {CARD}"}]},
    ]
    run, denied = world.send({"model": "gpt-4o", "messages": messages})
    assert denied is None
    sent = world.sent(run)["messages"]
    assert [m["content"] for m in sent[:5]] == [
        "[EMAIL_1]",
        "[CREDIT_CARD_1] is mine",
        "",
        "mail [EMAIL_1]",
        "no entity here",
    ]
    assert sent[5]["content"][0]["text"] == "x [CREDIT_CARD_1]"


def test_a_request_without_entities_goes_as_sent_byte_for_byte() -> None:
    world = World(config(redaction={}))
    raw = b'{"model":"gpt-4o",  "messages":[{"role":"user","content":"Hello there"}]}'
    run, denied = world.send(raw)
    assert denied is None and run.ex.new_body is None


def test_a_secret_blocks_the_request_naming_its_kind_never_its_value() -> None:
    world = World(config(redaction={}))
    _, denied = world.send(chat(f"my key is {AWS}, mail {EMAIL}"))
    assert denied is not None and denied.status == 400
    error = error_of(denied)["error"]
    assert (
        error["code"] == "sensitive_data_blocked" and "secret (aws_access_key)" in error["message"]
    )
    assert AWS not in error["message"] and EMAIL not in error["message"]
    assert world.count("secrets", "block") == 1
    assert world.count("email", "placeholder") == 0  # nothing was replaced: nothing went out


def test_block_answers_in_each_providers_shape() -> None:
    world = World(config(redaction={"action": "block"}))
    anthropic = {
        "model": "claude-3-5-haiku",
        "max_tokens": 5,
        "messages": [{"role": "user", "content": CARD}],
    }
    _, denied = world.send(anthropic, "/v1/messages", **{"anthropic-version": "2023-06-01"})
    assert denied is not None
    assert error_of(denied, "anthropic")["error"]["type"] == "invalid_request_error"
    gemini = {"contents": [{"parts": [{"text": f"card {CARD}"}]}]}
    run, denied = world.send(gemini, "/v1beta/models/gemini-2.0-flash:generateContent")
    assert denied is not None and run.ex.dialect == "gemini"
    assert error_of(denied, "gemini")["error"]["status"] == "INVALID_ARGUMENT"


@pytest.mark.parametrize(
    ("path", "body", "find"),
    [
        (
            "/v1/completions",
            {"model": "m", "prompt": [f"a {EMAIL}", "b"]},
            lambda d: d["prompt"][0],
        ),
        ("/v1/embeddings", {"model": "m", "input": f"x {EMAIL}"}, lambda d: d["input"]),
        (
            "/v1/responses",
            {"model": "m", "instructions": f"I {EMAIL}", "input": "y"},
            lambda d: d["instructions"],
        ),
        (
            "/v1/chat/completions",
            {
                "model": "m",
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "function": {
                                    "name": "f",
                                    "arguments": orjson.dumps({"to": EMAIL}).decode(),
                                }
                            }
                        ],
                    }
                ],
            },
            lambda d: d["messages"][0]["tool_calls"][0]["function"]["arguments"],
        ),
    ],
)
def test_each_api_is_redacted_where_the_model_reads(
    path: str, body: dict[str, Any], find: Any
) -> None:
    world = World(config(redaction={}))
    run, denied = world.send(body, path)
    assert denied is None
    assert (
        "[EMAIL_1]" in find(world.sent(run)) and EMAIL not in orjson.dumps(world.sent(run)).decode()
    )


def test_anthropic_tool_input_and_gemini_system_instruction() -> None:
    world = World(config(redaction={}))
    anthropic = {
        "model": "claude-3-5-haiku",
        "max_tokens": 5,
        "system": f"Staff mail: {EMAIL}",
        "messages": [
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t", "name": "send", "input": {"to": [EMAIL]}}
                ],
            }
        ],
    }
    run, _ = world.send(anthropic, "/v1/messages", **{"anthropic-version": "2023-06-01"})
    sent = world.sent(run)
    assert sent["system"] == "Staff mail: [EMAIL_1]"
    assert sent["messages"][0]["content"][0]["input"] == {"to": ["[EMAIL_1]"]}
    assert sent["messages"][0]["content"][0]["name"] == "send"
    gemini = {
        "systemInstruction": {"parts": [{"text": CARD}]},
        "contents": [{"parts": [{"text": "hi"}]}],
    }
    run, _ = world.send(gemini, "/v1beta/models/gemini-2.0-flash:generateContent")
    assert world.sent(run)["systemInstruction"]["parts"][0]["text"] == "[CREDIT_CARD_1]"


def test_policy_by_key_then_tenant_then_default_and_route_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    strict_key, strict_record = keys.generate(name="s", tenant="acme", redaction="strict")
    help_key, help_record = keys.generate(name="h", tenant="helpdesk")
    cfg = config(
        redaction={},
        redaction_policies={
            "strict": {"action": "mask"},
            "support": {
                "action": "hash",
                "tenants": ["helpdesk"],
                "hash_key": {"env": "TW_TEST_HASH"},
            },
        },
    )
    monkeypatch.setenv("TW_TEST_HASH", "0123456789abcdef-test-key")
    world = World(cfg, strict_record, help_record)
    text = chat(f"mail {EMAIL}")
    assert world.sent(world.send(text)[0])["messages"][0]["content"] == "mail [EMAIL_1]"
    assert (
        world.sent(world.send(text, key=strict_key)[0])["messages"][0]["content"]
        == "mail j***@example.com"
    )
    hashed = world.sent(world.send(text, key=help_key)[0])["messages"][0]["content"]
    assert hashed.startswith("mail [EMAIL_") and len(hashed) == len("mail [EMAIL_]") + 16
    assert world.sent(world.send(text, key=help_key)[0])["messages"][0]["content"] == hashed
    run, denied = world.send(text, "/trusted/v1/chat/completions")
    assert denied is None and run.ex.body is None  # not even read: no stage wanted it


def test_a_key_naming_an_unknown_policy_is_refused() -> None:
    lax_key, lax_record = keys.generate(name="l", tenant="acme", redaction="lax")
    world = World(config(redaction={}), lax_record)
    _, denied = world.send(chat("hi"), key=lax_key)
    assert denied is not None and denied.status == 500 and denied.code == "redaction_policy_unknown"


@pytest.mark.parametrize("closed", [True, False])
def test_a_body_that_cannot_be_read_follows_on_error(closed: bool) -> None:
    world = World(config(redaction={"on_error": "fail_closed" if closed else "fail_open"}))
    run, denied = world.send(b'{"messages": [ not json')
    if closed:
        assert denied is not None and denied.status == 400 and denied.code == "invalid_body"
    else:
        assert denied is None and run.ex.new_body is None
    assert world.failures("failed_closed" if closed else "failed_open") == 1


def test_a_request_without_a_body_has_nothing_to_check() -> None:
    world = World(config(redaction={}))
    run = world.pipeline.start(
        "GET", "/v1/chat/completions", {"authorization": f"Bearer {world.key}"}, frozenset()
    )
    assert not isinstance(run.request_headers(end_of_stream=True), Deny)
    assert world.failures("failed_closed") == 0


class Broken(Detector):
    def __init__(self) -> None:
        super().__init__(())

    def find(self, text: str) -> list[Finding]:
        raise RuntimeError("detector fault")


def test_a_detector_fault_fails_closed_and_is_counted() -> None:
    metrics = Metrics()
    stage = RedactionStage(Policy("default", Broken(), {}), {}, metrics)
    world = World(config(), stage=stage)
    world.metrics = metrics
    _, denied = world.send(chat("anything"))
    assert denied is not None and denied.status == 500 and denied.code == "redaction_failed"
    assert world.failures("failed_closed") == 1


def test_a_redacted_body_too_deep_to_write_out_again_is_refused_not_sent_as_is() -> None:
    deep = b'{"a":' * 300 + f'"{EMAIL}"'.encode() + b"}" * 300  # orjson reads it, cannot write it
    content = b'[{"type": "tool_use", "input": ' + deep + b"}]"
    body = (
        b'{"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": '
        + content
        + b"}]}"
    )
    world = World(config(redaction={}))
    _, denied = world.send(body, "/v1/messages", **{"anthropic-version": "2023-06-01"})
    assert denied is not None and denied.status == 400 and "nested too deeply" in denied.message


# ---- answers ----------------------------------------------------------------


def respond_json(run: Run, doc: Any, chunks: int = 3) -> bytes:
    body = orjson.dumps(doc)
    mode = run.response_headers(
        200, {"content-type": "application/json", "content-length": str(len(body))}
    )
    if mode is BodyMode.NONE:
        return body
    assert "content-length" in run.ex.remove_response_headers
    out, size = b"", -(-len(body) // chunks)
    for i in range(0, len(body), size):
        piece = body[i : i + size]
        got = run.response_body(piece, end=i + size >= len(body))
        out += piece if got is None else got
    return out


def respond_sse(
    run: Run, events: list[tuple[str | None, Any]], rng: random.Random
) -> list[tuple[str, Any]]:
    """Send the events split at random byte offsets; what the client gets, parsed."""
    wire = b"".join(
        (f"event: {kind}\n".encode() if kind else b"")
        + b"data: "
        + (data if isinstance(data, bytes) else orjson.dumps(data))
        + b"\n\n"
        for kind, data in events
    )
    mode = run.response_headers(200, {"content-type": "text/event-stream"})
    assert mode is BodyMode.STREAMED
    out = b""
    at = 0
    while at < len(wire):
        size = rng.randint(1, 40)
        piece = wire[at : at + size]
        at += size
        got = run.response_body(piece, end=at >= len(wire))
        out += piece if got is None else got
    parser = SSEParser()
    return [
        (e.type, orjson.loads(e.data) if e.data.startswith("{") else e.data)
        for e in parser.feed(out) + parser.close()
    ]


def test_restore_puts_originals_back_in_a_json_answer() -> None:
    world = World(config(redaction={"restore": True}))
    run, _ = world.send(chat(f"Write to {EMAIL}"))
    assert world.sent(run)["messages"][0]["content"] == "Write to [EMAIL_1]"
    answer = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Sure, I wrote to [EMAIL_1]."}}
        ]
    }
    got = orjson.loads(respond_json(run, answer))
    assert got["choices"][0]["message"]["content"] == f"Sure, I wrote to {EMAIL}."


def test_responses_true_redacts_what_the_model_writes_in_json() -> None:
    world = World(config(redaction={"responses": True, "action": "mask"}))
    run, _ = world.send(chat("hi"))
    answer = {
        "content": [{"type": "text", "text": f"The card is {CARD}"}],
        "usage": {"input_tokens": 1},
    }
    run2, _ = world.send(
        {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        "/v1/messages",
        **{"anthropic-version": "2023-06-01"},
    )
    got = orjson.loads(respond_json(run2, answer))
    assert got["content"][0]["text"] == "The card is **** **** **** 1111" and got["usage"] == {
        "input_tokens": 1
    }
    assert world.count("credit_card", "mask", "response") == 1
    assert respond_json(run, {"choices": []}) == orjson.dumps({"choices": []})


WRITTEN = f"Your card {CARD} is on file, write to {EMAIL} if it changes."
REDACTED = "Your card [CREDIT_CARD_1] is on file, write to [EMAIL_1] if it changes."


def words(text: str) -> list[str]:
    pieces, at = [], 0
    while at < len(text):
        n = min(len(text) - at, 1 + at % 4)
        pieces.append(text[at : at + n])
        at += n
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_an_openai_stream_is_redacted_across_any_split(seed: int) -> None:
    world = World(config(redaction={"responses": True}))
    run, _ = world.send(chat("hi", stream=True))
    chunks = [
        (
            None,
            {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}],
            },
        )
        for w in words(WRITTEN)
    ]
    chunks += [
        (None, {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        (None, b"[DONE]"),
    ]
    got = respond_sse(run, chunks, random.Random(seed))
    text = "".join(
        d["choices"][0]["delta"].get("content") or "" for _, d in got if isinstance(d, dict)
    )
    assert text == REDACTED
    assert got[-1] == ("message", "[DONE]")


@pytest.mark.parametrize("seed", range(3))
def test_an_anthropic_stream_is_redacted_and_held_text_goes_before_the_block_stop(
    seed: int,
) -> None:
    world = World(config(redaction={"responses": True}))
    run, _ = world.send(
        {
            "model": "c",
            "max_tokens": 5,
            "stream": True,
            "messages": [{"role": "user", "content": "hi"}],
        },
        "/v1/messages",
        **{"anthropic-version": "2023-06-01"},
    )
    events: list[tuple[str | None, Any]] = [
        ("message_start", {"type": "message_start", "message": {"content": []}})
    ]
    events.append(
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
    )
    events += [
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": w}},
        )
        for w in words(WRITTEN)
    ]
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_stop", {"type": "message_stop"}),
    ]
    got = respond_sse(run, events, random.Random(seed))
    text = "".join(d["delta"]["text"] for kind, d in got if kind == "content_block_delta")
    assert text == REDACTED
    kinds = [kind for kind, _ in got]
    assert (
        kinds[-2:] == ["content_block_stop", "message_stop"] and kinds[-3] == "content_block_delta"
    )


def test_a_responses_stream_redacts_deltas_and_the_done_texts() -> None:
    world = World(config(redaction={"responses": True}))
    run, _ = world.send({"model": "m", "input": "hi", "stream": True}, "/v1/responses")
    base = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    events: list[tuple[str | None, Any]] = [
        (
            "response.output_text.delta",
            {"type": "response.output_text.delta", **base, "delta": w, "sequence_number": i},
        )
        for i, w in enumerate(words(WRITTEN))
    ]
    events.append(
        (
            "response.output_text.done",
            {"type": "response.output_text.done", **base, "text": WRITTEN},
        )
    )
    completed = {
        "output": [{"type": "message", "content": [{"type": "output_text", "text": WRITTEN}]}]
    }
    events.append(("response.completed", {"type": "response.completed", "response": completed}))
    got = respond_sse(run, events, random.Random(1))
    deltas = "".join(d["delta"] for kind, d in got if kind == "response.output_text.delta")
    assert deltas == REDACTED
    done = next(d for kind, d in got if kind == "response.output_text.done")
    assert done["text"] == REDACTED
    final = next(d for kind, d in got if kind == "response.completed")
    assert final["response"]["output"][0]["content"][0]["text"] == REDACTED


def test_a_gemini_stream_is_redacted_and_restored() -> None:
    world = World(config(redaction={"responses": True, "restore": True}))
    run, _ = world.send(
        {"contents": [{"parts": [{"text": f"card {CARD}"}]}]},
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent",
    )
    said = f"Noted [CREDIT_CARD_1]; and mine is {EMAIL}."
    chunks: list[tuple[str | None, Any]] = [
        (None, {"candidates": [{"content": {"parts": [{"text": w}], "role": "model"}, "index": 0}]})
        for w in words(said)
    ]
    chunks.append(
        (
            None,
            {
                "candidates": [
                    {"content": {"parts": [], "role": "model"}, "finishReason": "STOP", "index": 0}
                ],
                "usageMetadata": {"promptTokenCount": 3},
            },
        )
    )
    got = respond_sse(run, chunks, random.Random(2))
    text = "".join(
        p["text"] for _, d in got for c in d["candidates"] for p in c["content"]["parts"]
    )
    assert text == f"Noted {CARD}; and mine is [EMAIL_1]."
    assert got[-1][1]["usageMetadata"] == {"promptTokenCount": 3}


def test_an_openai_stream_split_in_two_at_every_byte_offset_is_redacted() -> None:
    world = World(config(redaction={"responses": True}))
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
        for w in words(WRITTEN)
    ]
    chunks.append({"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    wire = b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    for cut in range(1, len(wire)):
        run, _ = world.send(chat("hi", stream=True))
        run.response_headers(200, {"content-type": "text/event-stream"})
        out = b""
        for piece, end in ((wire[:cut], False), (wire[cut:], True)):
            got = run.response_body(piece, end)
            out += piece if got is None else got
        parser = SSEParser()
        events = parser.feed(out) + parser.close()
        text = "".join(
            orjson.loads(e.data)["choices"][0]["delta"].get("content") or ""
            for e in events
            if e.data.startswith("{")
        )
        assert text == REDACTED, cut
        assert events[-1].data == "[DONE]"


async def test_a_long_prompt_is_searched_in_windows_pausing_between_them() -> None:
    pauses = 0

    async def pause() -> None:
        nonlocal pauses
        pauses += 1

    cfg = config(redaction={})
    metrics = Metrics()
    world = World(cfg, stage=build(cfg, metrics, pause))
    world.metrics = metrics
    filler = "All quiet on the western front today. " * 3000  # ~114 K characters
    messages = [
        {"role": "user", "content": f"{filler}{EMAIL} {filler}"},
        {"role": "user", "content": f"{CARD} {filler}"},
    ]
    run = world.pipeline.start(
        "POST", "/v1/chat/completions", {"authorization": f"Bearer {world.key}"}, frozenset()
    )
    assert not isinstance(run.request_headers(), Deny)
    pending = run.request_body(orjson.dumps({"model": "gpt-4o", "messages": messages}))
    assert hasattr(pending, "__await__")  # not answered inline: the loop runs meanwhile
    assert await pending is None  # type: ignore[misc]
    sent = world.sent(run)["messages"]
    assert sent[0]["content"] == f"{filler}[EMAIL_1] {filler}"
    assert sent[1]["content"] == f"[CREDIT_CARD_1] {filler}"
    assert pauses >= (2 * len(filler) + len(filler)) // (32 << 10)
    assert world.count("email", "placeholder") == 1


def test_gitleaks_rules_from_a_file_find_secrets_the_builtins_do_not(tmp_path: Any) -> None:
    rules = tmp_path / "gitleaks.toml"
    rules.write_text(
        "[[rules]]\nid = 'acme-token'\nregex = '''acme_[a-z0-9]{20}'''\nkeywords = ['acme_']\n"
    )
    world = World(config(redaction={"gitleaks_file": str(rules)}))
    _, denied = world.send(chat("use acme_k3v9q2m7x1p8w4z6r5t0 for the call"))
    assert denied is not None and "secret (acme-token)" in denied.message
    assert "acme_k3v9" not in denied.message
    placeholder = World(config(redaction={"gitleaks_file": str(rules), "entities": ["email"]}))
    _, denied = placeholder.send(chat("use acme_k3v9q2m7x1p8w4z6r5t0"))
    assert denied is not None  # secrets keep their default action, block, when only rules find them
    rules.write_text("[[rules]]\nid = 'bad'\nregex = '(a)\\1'\n")
    with pytest.raises(ConfigError, match=r"redaction: .*gitleaks.toml: rule 1 \(bad\)"):
        build(config(redaction={"gitleaks_file": str(rules)}), Metrics())


@pytest.mark.parametrize("closed", [True, False])
async def test_a_long_prompt_that_cannot_be_searched_in_time_follows_on_error(closed: bool) -> None:
    async def pause() -> None:
        pass

    cfg = config(redaction={"on_error": "fail_closed" if closed else "fail_open"})
    metrics = Metrics()
    stage = RedactionStage(build(cfg, metrics).default, {}, metrics, pause=pause, budget_s=0.0)
    world = World(cfg, stage=stage)
    world.metrics = metrics
    run = world.pipeline.start(
        "POST", "/v1/chat/completions", {"authorization": f"Bearer {world.key}"}, frozenset()
    )
    assert not isinstance(run.request_headers(), Deny)
    text = f"{EMAIL} " + "filler text " * 20000
    pending = run.request_body(orjson.dumps(chat(text)))
    denied = await pending  # type: ignore[misc]
    if closed:
        assert denied is not None and (denied.status, denied.code) == (503, "redaction_timeout")
    else:
        assert denied is None and world.sent(run)["messages"][0]["content"] == text
    assert world.failures("failed_closed" if closed else "failed_open") == 1
