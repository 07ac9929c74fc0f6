"""The compiled runtime: files re-read on change, a bad file never unseats a good one."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from extproc import keys
from extproc.decisions import Deny, Phase
from extproc.keys import KeyLimits, KeyRecord, KeysFileError
from extproc.runtime import Runtime
from extproc.stages.credentials import CREDENTIAL_MISSING

from .factories import NOW, Clock, bearer, new_key, runtime_config


class Env:
    """A keys file and a provider credential file in tmp_path, and a Runtime over them."""

    def __init__(self, tmp_path: Path, records: list[KeyRecord]) -> None:
        self.keys_file = tmp_path / "keys.yaml"
        self.credential_file = tmp_path / "openai.key"
        self.credential_file.write_text("sk-provider-one\n")
        keys.write_records(self.keys_file, records)
        self.runtime = Runtime(runtime_config(self.keys_file, self.credential_file), clock=Clock())

    def decide(self, key: str) -> tuple[dict[str, str], Deny | Phase]:
        p = self.runtime.pipeline
        run = p.start("GET", "/v1/models", bearer(key), frozenset())
        return run.ex.set_headers, run.request_headers()

    def code(self, key: str) -> str:
        decision = self.decide(key)[1]
        return decision.code if isinstance(decision, Deny) else "allowed"

    def sample(self, name: str, **labels: str) -> float:
        value = self.runtime.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def reloads(self, file: str, result: str) -> float:
        return self.sample("tollway_reloads_total", file=file, result=result)


@pytest.fixture
def alice() -> tuple[str, KeyRecord]:
    return new_key("alice")


@pytest.fixture
def env(tmp_path: Path, alice: tuple[str, KeyRecord]) -> Env:
    return Env(tmp_path, [alice[1]])


def test_serves_the_keys_file_at_start(env: Env, alice: tuple[str, KeyRecord]) -> None:
    headers, decision = env.decide(alice[0])
    assert decision == Phase.NONE
    assert headers["authorization"] == "Bearer sk-provider-one"
    assert env.code(new_key("stranger")[0]) == "invalid_api_key"


def test_key_added_after_start_is_accepted_after_reload(
    env: Env, alice: tuple[str, KeyRecord]
) -> None:
    bob, bob_record = new_key("bob")
    keys.add(env.keys_file, bob_record)
    assert env.code(bob) == "invalid_api_key"  # nothing changes until the reload
    env.runtime.reload_if_changed()
    assert env.code(bob) == "allowed"
    assert env.code(alice[0]) == "allowed"
    assert env.reloads("keys", "ok") == 1


def test_revoked_key_is_rejected_after_reload(env: Env, alice: tuple[str, KeyRecord]) -> None:
    assert keys.revoke(env.keys_file, "alice", now=NOW)
    assert env.code(alice[0]) == "allowed"
    env.runtime.reload_if_changed()
    assert env.code(alice[0]) == "revoked_api_key"


def test_limits_changed_after_start_are_served_after_reload(
    env: Env, alice: tuple[str, KeyRecord]
) -> None:
    limits = KeyLimits(rpm=120, budget_usd=Decimal("0.1"), budget_period="day")
    assert keys.set_limits(env.keys_file, "alice", lambda _old: limits, now=NOW)
    env.runtime.reload_if_changed()
    assert env.reloads("keys", "ok") == 1
    assert env.runtime.auth.keys.find(alice[0]) == replace(alice[1], limits=limits)
    assert env.code(alice[0]) == "allowed"


def test_unchanged_files_are_not_reloaded(env: Env) -> None:
    for _ in range(3):
        env.runtime.reload_if_changed()
    assert env.reloads("keys", "ok") == 0
    assert env.reloads("keys", "error") == 0
    assert env.reloads("credentials", "ok") == 0


@pytest.mark.parametrize(
    "corrupt",
    [
        "keys: [unclosed\n",
        "keys:\n  - {id: nothex, name: x, sha256: abc, created: '2025-01-01'}\n",
        "keys: 7\n",
        "keys:\n  - {id: 0123456789ab, name: x, sha256: " + "a" * 64 + ", created: '2025-01-01',"
        " limits: {rpm: 0}}\n",
    ],
)
def test_corrupt_keys_file_keeps_the_previous_keys_serving(
    env: Env, alice: tuple[str, KeyRecord], corrupt: str
) -> None:
    env.keys_file.write_text(corrupt)
    env.runtime.reload_if_changed()
    assert env.code(alice[0]) == "allowed"
    assert env.reloads("keys", "error") == 1
    assert env.reloads("keys", "ok") == 0
    assert env.sample("tollway_api_keys", state="active") == 1

    env.runtime.reload_if_changed()  # the same bad file is reported once
    assert env.reloads("keys", "error") == 1

    bob, bob_record = new_key("bob")
    keys.write_records(env.keys_file, [bob_record])  # fixed: alice is gone, bob is in
    env.runtime.reload_if_changed()
    assert env.code(bob) == "allowed"
    assert env.code(alice[0]) == "invalid_api_key"
    assert env.reloads("keys", "ok") == 1


def test_deleted_keys_file_means_no_keys(env: Env, alice: tuple[str, KeyRecord]) -> None:
    env.keys_file.unlink()
    env.runtime.reload_if_changed()
    assert env.code(alice[0]) == "invalid_api_key"
    assert env.sample("tollway_api_keys", state="active") == 0


def test_corrupt_keys_file_at_start_is_fatal(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys_file.write_text("keys: [unclosed\n")
    with pytest.raises(KeysFileError, match=str(keys_file)):
        Runtime(runtime_config(keys_file))


def test_provider_key_file_is_re_read_when_it_changes(
    env: Env, alice: tuple[str, KeyRecord]
) -> None:
    env.credential_file.write_text("sk-provider-two-rotated\n")
    assert env.decide(alice[0])[0]["authorization"] == "Bearer sk-provider-one"
    env.runtime.reload_if_changed()
    assert env.decide(alice[0])[0]["authorization"] == "Bearer sk-provider-two-rotated"
    assert env.reloads("credentials", "ok") == 1
    assert env.reloads("keys", "ok") == 0


def test_emptied_provider_key_file_refuses_requests_until_it_is_refilled(
    env: Env, alice: tuple[str, KeyRecord]
) -> None:
    p = env.runtime.pipeline
    env.credential_file.write_text("")
    env.runtime.reload_if_changed()
    run = p.start("GET", "/v1/models", bearer(alice[0]), frozenset())
    assert run.request_headers() == CREDENTIAL_MISSING  # not sent upstream keyless
    env.credential_file.write_text("sk-new")
    env.runtime.reload_if_changed()
    run = p.start("GET", "/v1/models", bearer(alice[0]), frozenset())
    assert run.request_headers() == Phase.NONE
    assert run.ex.set_headers["authorization"] == "Bearer sk-new"


def test_missing_provider_key_file_at_start(tmp_path: Path) -> None:
    key, record = new_key()
    keys_file = tmp_path / "keys.yaml"
    keys.write_records(keys_file, [record])
    runtime = Runtime(runtime_config(keys_file, tmp_path / "absent.key"))
    run = runtime.pipeline.start("GET", "/v1/models", bearer(key), frozenset())
    assert run.request_headers() == CREDENTIAL_MISSING
    (tmp_path / "absent.key").write_text("sk-late")
    runtime.reload_if_changed()
    run = runtime.pipeline.start("GET", "/v1/models", bearer(key), frozenset())
    run.request_headers()
    assert run.ex.set_headers["authorization"] == "Bearer sk-late"


def test_key_gauge_counts_keys_by_state(tmp_path: Path) -> None:
    long_ago = datetime(2000, 1, 1, tzinfo=UTC)
    far_future = datetime.now(UTC) + timedelta(days=3650)
    records = [
        new_key("a1")[1],
        new_key("a2", expires=far_future)[1],
        new_key("gone", revoked=long_ago)[1],
        new_key("gone-and-old", revoked=long_ago, expires=long_ago)[1],
        new_key("old", expires=long_ago)[1],
    ]
    env = Env(tmp_path, records)
    assert env.sample("tollway_api_keys", state="active") == 2
    assert env.sample("tollway_api_keys", state="revoked") == 2
    assert env.sample("tollway_api_keys", state="expired") == 1

    keys.revoke(env.keys_file, "a1", now=NOW)
    keys.add(env.keys_file, new_key("a3")[1])
    keys.add(env.keys_file, new_key("a4")[1])
    env.runtime.reload_if_changed()
    assert env.sample("tollway_api_keys", state="active") == 3
    assert env.sample("tollway_api_keys", state="revoked") == 3
    assert env.sample("tollway_api_keys", state="expired") == 1


def test_runtime_clock_decides_expiry(tmp_path: Path) -> None:
    key, record = new_key(expires=NOW + timedelta(minutes=5))
    keys_file = tmp_path / "keys.yaml"
    keys.write_records(keys_file, [record])
    clock = Clock()
    runtime = Runtime(runtime_config(keys_file), clock=clock)

    def decide() -> Deny | Phase:
        p = runtime.pipeline
        return p.start("GET", "/v1/models", bearer(key), frozenset()).request_headers()

    assert decide() == Phase.NONE
    clock.advance(5 * 60)
    decision = decide()
    assert isinstance(decision, Deny) and decision.code == "expired_api_key"


def test_each_runtime_has_its_own_registry(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.yaml"
    keys.write_records(keys_file, [new_key()[1]])
    first, second = Runtime(runtime_config(keys_file)), Runtime(runtime_config(keys_file))
    assert first.metrics.registry is not second.metrics.registry
    assert first.metrics.registry.get_sample_value("tollway_api_keys", {"state": "active"}) == 1


def test_keys_file_without_keys_list_is_a_counted_reload_error(
    env: Env, alice: tuple[str, KeyRecord]
) -> None:
    env.keys_file.write_text("{}\n")
    env.runtime.reload_if_changed()
    assert env.code(alice[0]) == "allowed"
    assert env.reloads("keys", "error") == 1
