"""The `tollway` command as an operator uses it (real subprocesses)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from extproc import keys


def tollway(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "extproc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_help_lists_every_subcommand_with_a_line_of_help() -> None:
    out = tollway("--help").stdout
    commands = ("serve", "up", "check-config", "render-envoy", "keys", "prices", "demo-upstream")
    for command in commands:
        assert re.search(rf"^\s+{command}\b", out, re.M), command
    keys_help = tollway("keys", "--help").stdout
    for action in ("create", "list", "revoke"):
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
        rf"{record.id}\s+ci-bot\s+platform\s+active\s+2099-01-31\s+gpt-4o-mini,claude-\*", listed
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
