"""The audit log and JSON logs through the real Envoy: a denied and a forwarded request
with planted secrets, a limit, a flood, a reload; lines that join the access log."""

from __future__ import annotations

import secrets
import string
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from extproc import keys
from extproc.config import AuditConfig, Config, RedactionConfig

from . import leaks
from .conftest import Stack, eventually, start_stack

pytestmark = pytest.mark.e2e

CHAT = "/v1/chat/completions"
BURST = 20


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("audit")

    def customize(config: Config) -> Config:
        audit = AuditConfig(
            file=workdir / "audit.log",
            denials_per_s=0.5,
            denials_burst=BURST,
            summary_interval_s=0.5,
        )
        return config.model_copy(update={"audit": audit, "redaction": RedactionConfig()})

    s = start_stack(workdir, customize=customize, log_format="json")
    yield s
    s.gateway.stop()


def audit_lines(stack: Stack) -> list[dict[str, Any]]:
    text = (stack.gateway.workdir / "audit.log").read_bytes()
    return [orjson.loads(line) for line in text.split(b"\n")[:-1]]


def chat(stack: Stack, key: str, content: str, request_id: str = "") -> httpx.Response:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}]}
    headers = {"authorization": f"Bearer {key}", "user-agent": request_id or "audit-test"}
    return httpx.post(f"{stack.url}{CHAT}", json=body, headers=headers, timeout=10)


def access_entry(stack: Stack, user_agent: str, status: int | None = None) -> dict[str, Any]:
    """The last access-log entry of this client (of this status), once Envoy wrote it."""

    def find() -> dict[str, Any] | None:
        found = [
            e
            for e in stack.access_log()
            if e["user_agent"] == user_agent and status in (None, e["status"])
        ]
        return found[-1] if found else None

    entry: dict[str, Any] = eventually(find)
    return entry


def marker() -> str:
    return f"audit-{secrets.token_hex(6)}"


def test_a_denied_request_is_audited_and_joins_the_access_log_without_its_secrets(
    stack: Stack,
) -> None:
    secret = f"sk-live-{secrets.token_hex(16)}"  # a provider-shaped secret in the prompt
    prompt = f"{marker()} please keep {secret} safe"
    wrong_key = stack.keys["alice"][:-6] + "ZZZZZZ"  # alice's id, a wrong secret
    leaks.plant(secret, prompt, wrong_key, wrong_key.split("_", 2)[2])
    agent = marker()
    assert chat(stack, wrong_key, prompt, agent).status_code == 401
    entry = access_entry(stack, agent)

    def line() -> dict[str, Any] | None:
        found = [e for e in audit_lines(stack) if e.get("request_id") == entry["request_id"]]
        return found[0] if found else None

    audited = eventually(line)
    assert (audited["event"], audited["reason"], audited["status"]) == (
        "auth_failure",
        "invalid_api_key",
        401,
    )
    assert audited["claimed_key_id"] == stack.keys["alice"][3:15]
    assert audited["client"].startswith("127.0.0.1:")  # Envoy's source.address, with its port
    assert (stack.gateway.workdir / "audit.log").stat().st_mode & 0o777 == 0o600
    text = (stack.gateway.workdir / "audit.log").read_text()
    assert secret not in text and "please keep" not in text


def letters(n: int) -> str:
    """Random letters: nothing redaction would find (no digits, no known shape)."""
    return "".join(secrets.choice(string.ascii_lowercase) for _ in range(n))


def test_a_forwarded_request_writes_no_audit_line(stack: Stack) -> None:
    secret = f"passphrase {letters(24)}"  # a secret no detector knows
    prompt = f"{marker()} the vault opens with {secret}"
    leaks.plant(secret, prompt)
    agent = marker()
    before = len(audit_lines(stack))
    assert chat(stack, stack.keys["alice"], prompt, agent).status_code == 200
    sent = [r for r in stack.upstream_requests() if secret in orjson.dumps(r).decode()]
    assert sent  # it really went upstream, secret and all
    entry = access_entry(stack, agent)
    assert entry["status"] == 200
    assert len(audit_lines(stack)) == before


def test_a_limit_denial_names_the_rule_and_the_key(stack: Stack) -> None:
    key, record = keys.generate(name="one-a-minute", tenant="acme", limits=keys.KeyLimits(rpm=1))
    keys.add(stack.keys_file, record)
    stack.keys["one-a-minute"] = key
    eventually(lambda: chat(stack, key, "hi").status_code == 429)

    def line() -> dict[str, Any] | None:
        found = [e for e in audit_lines(stack) if e["event"] == "limit_denied"]
        return found[-1] if found else None

    denied = eventually(line)
    assert (denied["rule"], denied["kind"], denied["by"], denied["subject"]) == (
        "key_rpm",
        "requests",
        "key",
        record.id,
    )
    assert (denied["key_id"], denied["key_name"], denied["tenant"]) == (
        record.id,
        "one-a-minute",
        "acme",
    )
    reloads = [e for e in audit_lines(stack) if e["event"] == "keys_reloaded"]
    assert any(record.id in e.get("added_ids", ()) for e in reloads)


def test_a_flood_of_bad_keys_writes_a_bounded_number_of_lines_and_a_summary(
    stack: Stack,
) -> None:
    suppressed = stack.metric("tollway_audit_suppressed_total", event="auth_failure")
    before = [e for e in audit_lines(stack) if e.get("reason") == "missing_api_key"]
    assert not before
    flood = 300
    with httpx.Client(timeout=10) as client:
        for _ in range(flood):
            assert client.get(f"{stack.url}/v1/models").status_code == 401

    def summarised() -> list[dict[str, Any]]:
        return [
            e
            for e in audit_lines(stack)
            if e["event"] == "suppressed" and e["reason"] == "missing_api_key"
        ]

    summaries = eventually(summarised)
    written = [e for e in audit_lines(stack) if e.get("reason") == "missing_api_key"]
    written = [e for e in written if e["event"] == "auth_failure"]
    # The burst, and half a line a second over the few seconds the flood took.
    assert BURST <= len(written) <= BURST + 10
    eventually(lambda: sum(e["count"] for e in summarised()) + len(written) == flood)
    assert len(summaries) < 20
    grew = stack.metric("tollway_audit_suppressed_total", event="auth_failure") - suppressed
    assert grew == flood - len(written)


def test_json_log_lines_carry_the_request_id_of_the_access_log(stack: Stack) -> None:
    # A key naming a redaction policy that is not configured: a 500 and an error line
    # about that request.
    key, record = keys.generate(name="odd-policy", tenant="acme", redaction="nowhere")
    keys.add(stack.keys_file, record)
    stack.keys["odd-policy"] = key
    agent = marker()
    # (until the key is loaded it is a 401: the entry to join is the 500's)
    eventually(lambda: chat(stack, key, "hi", agent).status_code == 500)
    entry = access_entry(stack, agent, status=500)
    log = stack.gateway.workdir / "tollway.log"

    def error_line() -> dict[str, Any] | None:
        for line in log.read_text().splitlines():
            parsed = orjson.loads(line)  # every line is JSON
            if "nowhere" in parsed["message"]:
                return dict(parsed)
        return None

    found = eventually(error_line)
    assert (found["level"], found["logger"]) == ("error", "tollway")
    assert found["request_id"] == entry["request_id"]
    every = [orjson.loads(line) for line in log.read_text().splitlines()]
    assert len(every) >= 2  # start-up lines too
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in every)
