"""The `tollway` command as an operator uses it (real subprocesses)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from extproc import keys

from .tollway_up import tollway


def test_help_lists_every_subcommand_with_a_line_of_help() -> None:
    out = tollway("--help").stdout
    commands = ("serve", "up", "check-config", "render-envoy", "keys", "prices", "demo-upstream")
    for command in commands:
        assert re.search(rf"^\s+{command}\b", out, re.M), command
    keys_help = tollway("keys", "--help").stdout
    for action in ("create", "list", "revoke", "limits"):
        assert re.search(rf"^\s+{action}\s+\S", keys_help, re.M), action


def test_key_lifecycle(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    created = tollway(
        "keys",
        "create",
        "--keys-file",
        str(file),
        "--name",
        "ci-bot",
        "--tenant",
        "platform",
        "--models",
        "gpt-4o-mini,claude-*",
        "--expires",
        "2099-01-31",
    )
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    assert re.fullmatch(r"tw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    assert "shown only now" in created.stderr
    text = file.read_text()
    assert key not in text and key.split("_", 2)[2] not in text  # only the hash is kept
    assert file.stat().st_mode & 0o777 == 0o600
    (record,) = keys.read_records(file)
    assert keys.KeyRing([record]).find(key) == record

    listed = tollway("keys", "list", "--keys-file", str(file)).stdout
    assert re.search(
        rf"{record.id}\s+ci-bot\s+platform\s+active\s+2099-01-31 23:59\s+gpt-4o-mini,claude-\*",
        listed,
    )
    assert key.split("_", 2)[2] not in listed

    revoked = tollway("keys", "revoke", "--keys-file", str(file), "ci-bot")
    assert revoked.returncode == 0 and record.id in revoked.stdout
    assert "revoked" in tollway("keys", "list", "--keys-file", str(file)).stdout
    again = tollway("keys", "revoke", "--keys-file", str(file), "ci-bot")
    assert again.returncode == 1 and "no active key" in again.stderr


def test_key_create_rejects_bad_input(tmp_path: Path) -> None:
    file = str(tmp_path / "keys.yaml")
    for extra in (
        ["--expires", "2001-01-01"],
        ["--expires", "tomorrow"],
        ["--tenant", "bad tenant"],
    ):
        result = tollway("keys", "create", "--keys-file", file, "--name", "x", *extra)
        assert result.returncode == 2 and result.stderr.startswith("tollway: "), extra
        assert "Traceback" not in result.stderr
    assert not Path(file).exists() or keys.read_records(Path(file)) == []


def test_key_limits_set_at_creation_changed_and_cleared(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    limits = ("--rpm", "60", "--tpm", "100000", "--concurrency", "4", "--budget-usd", "50")
    created = tollway("keys", "create", "--keys-file", str(file), "--name", "a", *limits)
    assert created.returncode == 0, created.stderr
    (record,) = keys.read_records(file)
    assert record.limits == keys.KeyLimits(60, 100_000, 4, Decimal(50), "month")
    other = tollway("keys", "create", "--keys-file", str(file), "--name", "plain")
    assert other.returncode == 0

    listed = tollway("keys", "list", "--keys-file", str(file)).stdout
    assert re.search(r"\bLIMITS$", listed.splitlines()[0])
    assert re.search(
        rf"^{record.id}\s+a\s.*\s\*\s+-\s+-\s+rpm=60 tpm=100000 concurrency=4 budget-usd=50/month$",
        listed,
        re.M,
    )
    assert re.search(r"^\S+\s+plain\s.*\s\*\s+-\s+-\s+-$", listed, re.M)  # roles, redaction, limits

    changed = tollway(
        "keys", "limits", "--keys-file", str(file), "a", "--rpm", "120", "--budget-usd", "0.1/day"
    )
    assert changed.returncode == 0, changed.stderr
    expected = "rpm=120 tpm=100000 concurrency=4 budget-usd=0.1/day"
    assert changed.stdout == f"{record.id} (a): {expected}\n"
    assert expected in tollway("keys", "list", "--keys-file", str(file)).stdout
    assert file.stat().st_mode & 0o777 == 0o600

    cleared = tollway(
        "keys",
        "limits",
        "--keys-file",
        str(file),
        record.id,
        "--tpm",
        "none",
        "--budget-usd",
        "none",
    )
    assert cleared.returncode == 0, cleared.stderr
    assert keys.read_records(file)[0].limits == keys.KeyLimits(rpm=120, concurrency=4)

    missing = tollway("keys", "limits", "--keys-file", str(file), "nobody", "--rpm", "1")
    assert missing.returncode == 1 and "no active key" in missing.stderr


@pytest.mark.parametrize(
    ("action", "flags", "problem"),
    [
        ("create", ["--rpm", "0"], "--rpm '0': must be a whole number"),
        ("create", ["--tpm", "lots"], "--tpm 'lots': must be a whole number"),
        ("create", ["--budget-usd", "5/week"], "the period must be /day or /month"),
        ("create", ["--budget-usd", "abc"], "must be an amount of US dollars"),
        ("limits", ["--concurrency", "-1"], "--concurrency '-1': must be a whole number"),
        ("limits", ["--budget-usd", "0.0000001"], "at most 6 decimals"),
        ("limits", [], "give a limit to set or clear"),
    ],
)
def test_key_limits_refuse_nonsense(
    tmp_path: Path, action: str, flags: list[str], problem: str
) -> None:
    file = tmp_path / "keys.yaml"
    keys.write_records(file, [keys.generate(name="x")[1]])
    before = file.read_text()
    target = ["--name", "y"] if action == "create" else ["x"]
    result = tollway("keys", action, "--keys-file", str(file), *target, *flags)
    assert result.returncode == 2 and result.stderr.startswith("tollway: "), result.stderr
    assert problem in result.stderr and "Traceback" not in result.stderr
    assert file.read_text() == before


def test_check_config_names_file_key_and_problem(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("max_body_bytes: 2097152\n")
    ok = tollway("check-config", str(good))
    assert ok.returncode == 0 and "ok" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"upstreams": {"openai": {"url": "ftp://x", "api": "openai"}}}))
    result = tollway("check-config", str(bad))
    assert result.returncode == 2
    assert str(bad) in result.stderr and "upstreams.openai.url" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_a_bad_config_with_a_clear_message(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("server:\n  address: 0.0.0.0\n")
    result = tollway("serve", "--config", str(bad))
    assert result.returncode == 2
    assert "server" in result.stderr and "server.tls" in result.stderr


def test_prices_lists_the_table_and_resolves_names(tmp_path: Path) -> None:
    listing = tollway("prices", cwd=tmp_path)
    assert listing.returncode == 0
    assert re.search(r"^gpt-4o\s+openai\s+2\.5\s+10\s+1\.25\b", listing.stdout, re.M)
    config = tmp_path / "tollway.yaml"
    config.write_text(yaml.safe_dump({"pricing": {"models": {"house-llm": {"input": 1}}}}))
    found = tollway("prices", "-c", str(config), "gpt-4o-2024-08-06", "house-llm", cwd=tmp_path)
    assert found.returncode == 0
    assert "gpt-4o-2024-08-06: gpt-4o (input 2.5, output 10)" in found.stdout
    assert "house-llm: house-llm (input 1, output 0)" in found.stdout
    missing = tollway("prices", "no-such-model", cwd=tmp_path)
    assert missing.returncode == 1 and "not priced" in missing.stdout


def test_revoke_by_name_refuses_when_several_active_keys_share_it(tmp_path: Path) -> None:
    """Rotation: a new key with the same name, then the old one revoked by id."""
    file = str(tmp_path / "keys.yaml")
    old = tollway("keys", "create", "--keys-file", file, "--name", "svc")
    assert old.returncode == 0 and "warning" not in old.stderr
    new = tollway("keys", "create", "--keys-file", file, "--name", "svc")
    assert new.returncode == 0
    old_id, new_id = (r.id for r in keys.read_records(Path(file)))
    assert f"other active key(s) named 'svc' ({old_id})" in new.stderr
    assert "revoke by id" in new.stderr

    ambiguous = tollway("keys", "revoke", "--keys-file", file, "svc")
    assert ambiguous.returncode == 2
    assert old_id in ambiguous.stderr and new_id in ambiguous.stderr
    assert "by id" in ambiguous.stderr
    assert all(r.revoked is None for r in keys.read_records(Path(file)))  # nothing revoked
    limits = tollway("keys", "limits", "--keys-file", file, "svc", "--rpm", "5")
    assert limits.returncode == 2 and old_id in limits.stderr and "by id" in limits.stderr
    assert all(r.limits == keys.NO_LIMITS for r in keys.read_records(Path(file)))

    assert tollway("keys", "revoke", "--keys-file", file, old_id).returncode == 0
    states = {r.id: r.revoked for r in keys.read_records(Path(file))}
    assert states[old_id] is not None and states[new_id] is None
    assert tollway("keys", "revoke", "--keys-file", file, "svc").returncode == 0  # one left


@pytest.mark.parametrize("models", ["", " , ,", ","])
def test_an_empty_model_list_is_refused_not_unrestricted(tmp_path: Path, models: str) -> None:
    file = tmp_path / "keys.yaml"
    result = tollway("keys", "create", "--keys-file", str(file), "--name", "x", "--models", models)
    assert result.returncode == 2 and "--models names no model" in result.stderr
    assert not file.exists()


def test_keys_file_folder_must_exist_and_lock_is_private(tmp_path: Path) -> None:
    missing = tmp_path / "nonexistent" / "k.yaml"
    result = tollway("keys", "create", "--keys-file", str(missing), "--name", "x")
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert not missing.parent.exists()
    file = tmp_path / "k.yaml"
    assert tollway("keys", "create", "--keys-file", str(file), "--name", "x").returncode == 0
    assert (tmp_path / "k.yaml.lock").stat().st_mode & 0o777 == 0o600


def test_prices_into_a_closed_pipe_exits_quietly() -> None:
    """`tollway prices | head -n 1`: head has gone when the rest is written; no traceback.
    (The read end is closed before prices starts, so the broken pipe is certain.)"""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        prices = subprocess.run(
            [sys.executable, "-m", "extproc", "prices"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin"},
        )
    finally:
        os.close(write_end)
    assert prices.stderr == ""
    assert prices.returncode == 0


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("pricing: {litellm_file: nope.json}\n", "nope.json: cannot read"),
        ("server:\n  tls: {cert_file: nope.pem, key_file: nope.key}\n", "server.tls.cert_file"),
        ("auth: {keys_file: bad-keys.yaml}\n", "bad-keys.yaml: not valid YAML"),
        (
            "redaction: {custom: [{name: ref, pattern: '(a)\\1'}]}\n",
            "redaction: custom pattern 'ref'",
        ),
        (
            "redaction: {action: hash, hash_key: {env: TOLLWAY_TEST_UNSET_HASH_KEY}}\n",
            "redaction.hash_key: environment variable TOLLWAY_TEST_UNSET_HASH_KEY must hold",
        ),
    ],
)
def test_check_config_refuses_what_serve_refuses(tmp_path: Path, text: str, problem: str) -> None:
    (tmp_path / "bad-keys.yaml").write_text("keys: [\n")
    path = tmp_path / "tollway.yaml"
    path.write_text(text)
    checked = tollway("check-config", str(path))
    assert checked.returncode == 2 and problem in checked.stderr, checked.stderr
    served = tollway("serve", "--config", str(path))  # the same refusal, from the same code
    assert served.returncode == 2 and problem in served.stderr, served.stderr


def test_check_config_refuses_replicas_that_would_each_count_limits(tmp_path: Path) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text(
        "server: {replicas: 2}\n"
        "limits: [{name: rpm, by: [key], requests: 5, per: minute}]\n"
        "auth: {keys_file: keys.yaml}\n"
    )
    (tmp_path / "keys.yaml").write_text("keys: []\n")
    checked = tollway("check-config", str(path))
    assert checked.returncode == 2 and "set store.redis" in checked.stderr, checked.stderr
    path.write_text(path.read_text() + "store: {redis: {url: 'redis://127.0.0.1:6379/0'}}\n")
    assert tollway("check-config", str(path)).returncode == 0


def test_check_config_warns_of_missing_provider_keys(tmp_path: Path) -> None:
    path = tmp_path / "tollway.yaml"
    path.write_text("{}\n")
    result = tollway("check-config", str(path))
    assert result.returncode == 0
    assert "upstream openai: no provider key in environment variable OPENAI_API_KEY" in (
        result.stderr
    )
    assert "3 warnings" in result.stdout


@pytest.mark.parametrize(("count", "why"), [("0", "greater than or equal to 1"), ("33", "32")])
def test_up_refuses_a_replica_count_out_of_range(tmp_path: Path, count: str, why: str) -> None:
    result = tollway("up", "--replicas", count, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("tollway: --replicas: invalid configuration\n")
    assert "server.replicas" in result.stderr and why in result.stderr


def test_key_redaction_policy_named_at_creation_changed_and_cleared(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    config = tmp_path / "tollway.yaml"
    config.write_text(
        f"auth: {{keys_file: {file}}}\nredaction_policies: {{strict: {{action: mask}}}}\n"
    )
    unknown = tollway(
        "keys", "create", "--config", str(config), "--name", "a", "--redaction", "lax"
    )
    assert unknown.returncode == 2 and "not in redaction_policies (strict)" in unknown.stderr
    assert not file.exists() or keys.read_records(file) == []
    made = tollway(
        "keys", "create", "--config", str(config), "--name", "a", "--redaction", "strict"
    )
    assert made.returncode == 0, made.stderr
    assert [r.redaction for r in keys.read_records(file)] == ["strict"]
    listed = tollway("keys", "list", "--config", str(config)).stdout
    assert re.search(r"\bREDACTION\s+LIMITS$", listed.splitlines()[0])
    assert re.search(r"\sa\s.*\s\*\s+-\s+strict\s+-$", listed, re.M)  # (no roles: -)
    cleared = tollway("keys", "redaction", "--config", str(config), "a", "none")
    assert cleared.returncode == 0 and "redaction none" in cleared.stdout
    assert [r.redaction for r in keys.read_records(file)] == [None]
    bad = tollway("keys", "redaction", "--config", str(config), "a", "lax")
    assert bad.returncode == 2 and "lax" in bad.stderr


def test_key_roles_must_be_the_configs_and_are_listed(tmp_path: Path) -> None:
    file = tmp_path / "keys.yaml"
    config = tmp_path / "tollway.yaml"
    config.write_text(f"auth: {{keys_file: {file}}}\nroles: {{chat: {{}}, ops: {{}}}}\n")
    unknown = tollway("keys", "create", "--config", str(config), "--name", "a", "--roles", "root")
    assert unknown.returncode == 2 and "root not in roles (chat, ops)" in unknown.stderr
    made = tollway("keys", "create", "--config", str(config), "--name", "a", "--roles", "chat,ops")
    assert made.returncode == 0, made.stderr
    assert [r.roles for r in keys.read_records(file)] == [("chat", "ops")]
    listed = tollway("keys", "list", "--config", str(config)).stdout
    assert re.search(r"\sROLES\s+REDACTION\s", listed.splitlines()[0])
    assert re.search(r"\s\*\s+chat,ops\s+-\s+-$", listed, re.M)
