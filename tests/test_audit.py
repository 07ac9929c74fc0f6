"""The audit log on real files: modes, rotation shared by writers, the denial
throttle under a flood (through the real stream processor), reloads, the CLI."""

from __future__ import annotations

import os
import pwd
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from envoy.config.core.v3.base_pb2 import HeaderMap, HeaderValue
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf.struct_pb2 import Struct, Value

from extproc import audit, keys
from extproc.config import Config, LimitRule, MetricsConfig
from extproc.metrics import Metrics
from extproc.processor import StreamProcessor
from extproc.runtime import Runtime

from .tollway_up import tollway

SECRET_PROMPT = "the launch code is swordfish-7731"


def lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def test_the_file_and_every_rotated_file_are_0600_whatever_the_umask(
    tmp_path: Path, umask_zero: None
) -> None:
    path = tmp_path / "audit.log"
    sink = audit.RotatingFile(path, max_bytes=4096, backups=3)
    log = audit.AuditLog(sink)
    for i in range(200):  # ~60 bytes a line: several rotations
        log.event("keys_reloaded", n=i)
    log.close()
    files = sorted(tmp_path.glob("audit.log*"))
    names = {f.name for f in files}
    assert {"audit.log", "audit.log.1", "audit.log.2", "audit.log.3"} <= names
    assert "audit.log.4" not in names  # the oldest was dropped
    for f in files:
        assert f.stat().st_mode & 0o777 == 0o600, f
    for f in ("audit.log.1", "audit.log.2", "audit.log.3"):
        assert 4096 <= (tmp_path / f).stat().st_size < 4096 + 100
    # The newest lines are all there, in order, across the files kept.
    kept = [
        e["n"]
        for f in ("audit.log.3", "audit.log.2", "audit.log.1", "audit.log")
        for e in lines(tmp_path / f)
    ]
    assert kept == list(range(kept[0], 200))


def test_an_existing_file_with_a_loose_mode_is_tightened(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    path.write_text("")
    path.chmod(0o644)
    audit.RotatingFile(path, 1 << 20, 1).close()
    assert path.stat().st_mode & 0o777 == 0o600


def test_two_writers_share_one_file_and_follow_each_others_rotation(tmp_path: Path) -> None:
    """Replicas (and `tollway keys`) append to the same file: no line is lost."""
    path = tmp_path / "audit.log"
    a = audit.AuditLog(audit.RotatingFile(path, 8192, 50))
    b = audit.AuditLog(audit.RotatingFile(path, 8192, 50))
    for i in range(600):
        (a if i % 2 else b).event("keys_reloaded", n=i)
    a.close()
    b.close()
    seen = [
        e["n"]
        for f in tmp_path.glob("audit.log*")
        if not f.name.endswith(".lock")
        for e in lines(f)
    ]
    assert sorted(seen) == list(range(600))
    assert len(list(tmp_path.glob("audit.log.*"))) >= 3  # it did rotate, more than once


def attributes(address: str, request_id: str) -> dict[str, Struct]:
    fields = {
        "source.address": Value(string_value=address),
        "request.id": Value(string_value=request_id),
    }
    return {"envoy.filters.http.ext_proc": Struct(fields=fields)}


def request(key: str, request_id: str = "rid-1", body_model: str = "") -> pb.ProcessingRequest:
    pairs = [
        HeaderValue(key=k, raw_value=v.encode())
        for k, v in (
            (":method", "POST"),
            (":path", "/v1/chat/completions"),
            ("authorization", f"Bearer {key}"),
            ("x-request-id", request_id),
            ("content-type", "application/json"),
        )
    ]
    return pb.ProcessingRequest(
        request_headers=pb.HttpHeaders(headers=HeaderMap(headers=pairs), end_of_stream=True),
        attributes=attributes("192.0.2.7:41234", request_id),
    )


def runtime_with_audit(
    tmp_path: Path, clock: list[float], rules: tuple[LimitRule, ...] = (), **audit_options: Any
) -> tuple[Runtime, audit.AuditLog, Path, dict[str, str]]:
    keys_file = tmp_path / "keys.yaml"
    made = {}
    for name in ("alice", "gone"):
        key, record = keys.generate(name=name, tenant="acme")
        keys.add(keys_file, record)
        made[name] = key
    keys.revoke(keys_file, "gone")
    config = Config(
        metrics=MetricsConfig(enabled=False),
        auth={"keys_file": keys_file},
        limits=rules,  # type: ignore[arg-type]
    )
    runtime = Runtime(config, Metrics())
    path = tmp_path / "audit.log"
    log = audit.AuditLog(
        audit.RotatingFile(path, 1 << 20, 2),
        runtime.metrics,
        clock=lambda: clock[0],
        **audit_options,
    )
    runtime.attach_audit(log)
    return runtime, log, path, made


def ask(runtime: Runtime, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
    processor = StreamProcessor(runtime.pipeline, runtime.metrics)
    reply = processor.handle(message)
    processor.close()
    assert isinstance(reply, pb.ProcessingResponse)
    return reply


def sample(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_flood_of_10000_auth_failures_writes_a_bounded_number_of_lines(
    tmp_path: Path, provider_keys_in_env: None
) -> None:
    clock = [1_000_000.0]
    runtime, log, path, made = runtime_with_audit(tmp_path, clock, rate=5.0, burst=50)
    wrong = made["alice"][:-4] + "AAAA"  # alice's id, a wrong secret
    for i in range(10_000):
        if i and i % 1000 == 0:
            clock[0] += 1.0  # 1,000 a second for ten seconds: 5 more lines each second
        reply = ask(runtime, request(wrong, f"flood-{i}"))
        assert reply.immediate_response.status.code == 401
    log.flush_suppressed()
    written = lines(path)
    failures = [e for e in written if e["event"] == "auth_failure"]
    assert len(failures) == 50 + 5 * 9  # the burst, then the rate
    (summary,) = [e for e in written if e["event"] == "suppressed"]
    assert (summary["of"], summary["reason"]) == ("auth_failure", "invalid_api_key")
    assert summary["count"] + len(failures) == 10_000
    first = failures[0]
    alice_id = made["alice"][3:15]
    assert first == {
        "time": first["time"],
        "event": "auth_failure",
        "reason": "invalid_api_key",
        "status": 401,
        "request_id": "flood-0",
        "client": "192.0.2.7:41234",
        "method": "POST",
        "path": "/v1/chat/completions",
        "route": "openai",
        "claimed_key_id": alice_id,
    }
    assert wrong.split("_", 2)[2] not in path.read_text()
    assert path.stat().st_size < 50_000
    assert sample(runtime, "tollway_audit_events_total", event="auth_failure") == 95
    assert sample(runtime, "tollway_audit_events_total", event="suppressed") == 1
    assert sample(runtime, "tollway_audit_suppressed_total", event="auth_failure") == 9_905


def test_a_revoked_key_and_a_limit_denial_are_audited_with_who_and_which_rule(
    tmp_path: Path, provider_keys_in_env: None
) -> None:
    rule = LimitRule(name="per-key-rpm", requests=1, per="minute", by=("key",))
    runtime, _log, path, made = runtime_with_audit(tmp_path, [0.0], rules=(rule,))
    assert ask(runtime, request(made["gone"], "r-gone")).immediate_response.status.code == 401
    assert not ask(runtime, request(made["alice"], "r-ok")).HasField("immediate_response")
    denied = ask(runtime, request(made["alice"], "r-limited"))
    assert denied.immediate_response.status.code == 429
    gone, limited = lines(path)
    assert (gone["event"], gone["reason"], gone["key_id"]) == (
        "auth_failure",
        "revoked_api_key",
        made["gone"][3:15],
    )
    alice_id = made["alice"][3:15]
    assert {k: limited[k] for k in ("event", "reason", "status", "request_id", "key_id")} == {
        "event": "limit_denied",
        "reason": "rate_limit_exceeded",
        "status": 429,
        "request_id": "r-limited",
        "key_id": alice_id,
    }
    assert (limited["rule"], limited["kind"], limited["by"], limited["subject"]) == (
        "per-key-rpm",
        "requests",
        "key",
        alice_id,
    )
    assert (limited["key_name"], limited["tenant"]) == ("alice", "acme")
    text = path.read_text()
    for key in made.values():
        assert key.split("_", 2)[2] not in text
    assert "r-ok" not in text  # nothing for an allowed request


def test_a_denied_body_is_never_in_the_audit_line(
    tmp_path: Path, provider_keys_in_env: None
) -> None:
    keys_file = tmp_path / "keys.yaml"
    key, record = keys.generate(name="narrow", models=["gpt-4o-mini"])
    keys.add(keys_file, record)
    config = Config(metrics=MetricsConfig(enabled=False), auth={"keys_file": keys_file})  # type: ignore[arg-type]
    runtime = Runtime(config, Metrics())
    path = tmp_path / "audit.log"
    runtime.attach_audit(audit.AuditLog(audit.RotatingFile(path, 1 << 20, 1)))
    headers = request(key)
    headers.request_headers.end_of_stream = False
    processor = StreamProcessor(runtime.pipeline, runtime.metrics)
    processor.handle(headers)
    body = orjson.dumps(
        {"model": "gpt-4o", "messages": [{"role": "user", "content": SECRET_PROMPT}]}
    )
    reply = processor.handle(
        pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True))
    )
    processor.close()
    assert isinstance(reply, pb.ProcessingResponse)
    assert reply.immediate_response.status.code == 403
    (line,) = lines(path)
    assert (line["event"], line["reason"], line["key_id"]) == (
        "auth_failure",
        "model_not_allowed",
        record.id,
    )
    assert "swordfish" not in path.read_text() and 'gpt-4o"' not in path.read_text()


def test_a_reload_says_what_changed_and_a_bad_file_says_it_failed(tmp_path: Path) -> None:
    runtime, _log, path, made = runtime_with_audit(tmp_path, [0.0])
    keys_file = runtime.config.auth.keys_file
    _, new = keys.generate(name="bob", tenant="acme")
    keys.add(keys_file, new)
    keys.set_limits(keys_file, "alice", lambda limits: keys.KeyLimits(rpm=10))
    runtime.reload_if_changed()
    keys_file.write_text("keys: [oops")
    runtime.reload_if_changed()
    ok, failed = lines(path)
    assert ok == {
        "time": ok["time"],
        "event": "keys_reloaded",
        "outcome": "ok",
        "file": str(keys_file),
        "keys": 3,
        "added": 1,
        "removed": 0,
        "changed": 1,
        "added_ids": [new.id],
        "changed_ids": [made["alice"][3:15]],
    }
    assert (failed["event"], failed["outcome"]) == ("keys_reloaded", "failed")
    assert str(keys_file) in failed["error"]


def test_a_threaded_log_writes_off_the_caller_and_counts_what_it_cannot_write(
    tmp_path: Path,
) -> None:
    metrics = Metrics()
    path = tmp_path / "audit.log"
    log = audit.AuditLog(audit.RotatingFile(path, 1 << 20, 1), metrics, threaded=True)
    for i in range(100):
        log.event("keys_reloaded", n=i)
    log.close()
    assert [e["n"] for e in lines(path)] == list(range(100))
    full = audit.AuditLog(audit.RotatingFile(Path("/dev/full"), 1 << 20, 1), metrics, threaded=True)
    full.event("keys_reloaded")
    full.close()
    assert (
        metrics.registry.get_sample_value("tollway_audit_dropped_total", {"reason": "error"}) == 1
    )


def test_a_stalled_pipe_loses_lines_not_the_caller(tmp_path: Path) -> None:
    """Nobody reads the pipe (a stuck log collector): the writer thread blocks once the
    pipe is full, the queue fills, and further lines are dropped at once and counted."""
    metrics = Metrics()
    read_end, write_end = os.pipe()
    log = audit.AuditLog(audit.StreamSink(write_end), metrics, threaded=True, max_queued=10)
    for i in range(5000):  # ~300 KB of lines: far more than a pipe holds
        log.event("keys_reloaded", n=i, pad="x" * 32)
    dropped = metrics.registry.get_sample_value(
        "tollway_audit_dropped_total", {"reason": "queue_full"}
    )
    assert dropped is not None and dropped > 1000
    got: list[bytes] = []
    with os.fdopen(read_end, "rb") as reader:
        draining = threading.Thread(target=lambda: got.extend(reader.read().splitlines()))
        draining.start()  # the collector wakes up: the queued lines reach it
        log.close(timeout=5)
        os.close(write_end)
        draining.join(5)
    assert len(got) + dropped == 5000
    written = [orjson.loads(x)["n"] for x in got]
    assert written == sorted(written) and written[0] == 0  # in order, gaps where dropped


def test_closing_a_log_whose_sink_is_stalled_does_not_hang() -> None:
    read_end, write_end = os.pipe()
    log = audit.AuditLog(audit.StreamSink(write_end), threaded=True, max_queued=10)
    for i in range(5000):
        log.event("keys_reloaded", n=i, pad="x" * 32)
    started = time.monotonic()
    log.close(timeout=0.2)  # nobody ever reads: given up after the timeout
    assert time.monotonic() - started < 2
    os.close(read_end)  # the writer thread's blocked write fails (EPIPE), counted
    # write_end stays open: the daemon writer may still hold it (no fd reused under it).


def test_values_shaped_like_keys_keep_only_their_id() -> None:
    key, _ = keys.generate(name="x")
    assert audit.public(key) == key[:16] + "..."
    assert audit.public(f"revoke {key} now") == f"revoke {key[:16]}... now"
    assert audit.public("ci-bot") == "ci-bot"


# ---- the CLI ---------------------------------------------------------------------


def test_every_key_command_that_changes_a_key_is_audited_with_who_and_the_options(
    tmp_path: Path,
) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text(
        yaml.safe_dump({"auth": {"keys_file": "keys.yaml"}, "audit": {"file": "audit.log"}})
    )
    c = ("--config", str(config))
    created = tollway("keys", "create", *c, "--name", "ci-bot", "--rpm", "60", cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    key_id = key[3:15]
    assert tollway("keys", "limits", *c, "ci-bot", "--tpm", "1000", cwd=tmp_path).returncode == 0
    assert tollway("keys", "revoke", *c, key_id, cwd=tmp_path).returncode == 0
    assert tollway("keys", "revoke", *c, key_id, cwd=tmp_path).returncode == 1  # nothing changed
    log = tmp_path / "audit.log"
    assert log.stat().st_mode & 0o777 == 0o600
    made, limited, revoked = lines(log)
    user = pwd.getpwuid(os.getuid()).pw_name
    assert (made["event"], made["command"], made["key_id"], made["by"]["user"]) == (
        "key_created",
        "keys create",
        key_id,
        user,
    )
    assert made["options"]["name"] == "ci-bot" and made["options"]["rpm"] == "60"
    assert (limited["event"], limited["options"]["tpm"], limited["key_id"]) == (
        "key_changed",
        "1000",
        key_id,
    )
    assert (revoked["event"], revoked["options"]["key"]) == ("key_revoked", key_id)
    assert key.split("_", 2)[2] not in log.read_text()


def test_a_key_command_that_cannot_write_its_audit_line_changes_nothing(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text(
        yaml.safe_dump({"auth": {"keys_file": "keys.yaml"}, "audit": {"file": "missing/audit.log"}})
    )
    created = tollway("keys", "create", "--config", str(config), "--name", "x", cwd=tmp_path)
    assert created.returncode == 2 and "audit.file" in created.stderr
    assert created.stdout == "" and not (tmp_path / "keys.yaml").exists()


def test_with_stdout_as_the_audit_file_the_cli_writes_its_line_to_stderr(tmp_path: Path) -> None:
    created = tollway(
        "keys", "create", "--keys-file", str(tmp_path / "k.yaml"), "--name", "x", cwd=tmp_path
    )
    assert created.returncode == 0
    key = created.stdout.strip()  # stdout is the key alone: scripts read it
    assert keys.PREFIX in key and "\n" not in key
    (line,) = [orjson.loads(x) for x in created.stderr.splitlines() if x.startswith("{")]
    assert (line["event"], line["key_id"]) == ("key_created", key[3:15])


def test_serve_and_check_config_refuse_an_audit_file_they_could_not_write(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text(
        yaml.safe_dump({"auth": {"keys_file": "keys.yaml"}, "audit": {"file": "nowhere/a.log"}})
    )
    for args in (("check-config", str(config)), ("serve", "--config", str(config))):
        refused = tollway(*args, cwd=tmp_path)
        assert refused.returncode == 2, refused.stderr
        assert "audit.file" in refused.stderr and "does not exist" in refused.stderr


def test_a_fault_in_the_audit_never_changes_the_answer(
    tmp_path: Path, provider_keys_in_env: None, caplog: pytest.LogCaptureFixture
) -> None:
    runtime, log, _, made = runtime_with_audit(tmp_path, [0.0])
    # A bug in the audit path (a TypeError, not the OSError the log counts itself).
    log.sink.write = None  # type: ignore[method-assign,assignment]
    reply = ask(runtime, request(made["gone"]))
    assert reply.immediate_response.status.code == 401  # still the 401, not a 500
    assert "audit of a denial failed" in caplog.text
