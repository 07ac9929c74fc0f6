"""What the e2e suite must never find in a log: every Tollway key its stacks made,
the provider key, and the secrets and prompts tests plant. conftest checks every
Tollway, Envoy and audit log of every stack once the session ends."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

# Any whole Tollway key, made by a test or not (keys.py's shape).
KEY = re.compile(r"tw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}")

_planted: set[str] = set()
_stacks: list[tuple[Path, dict[str, str]]] = []  # workdir, name -> key (grows as tests add)


def plant(*values: str) -> None:
    """Strings a test sent (a secret, a prompt) that no log may hold."""
    _planted.update(values)


def watch(workdir: Path, made: dict[str, str]) -> None:
    _stacks.append((workdir, made))


def watched() -> int:
    return len(_stacks)


def log_files() -> list[Path]:
    """Tollway's output (stderr and stdout, where the audit log goes by default),
    audit files and their rotations, Envoy's access log; not the demo upstream's."""
    found: list[Path] = []
    for workdir, _ in _stacks:
        for path in sorted(workdir.rglob("*")):
            name = path.name
            if path.is_file() and (
                (name.startswith(("tollway", "envoy")) and name.endswith(".log"))
                or name.startswith("audit")
            ):
                found.append(path)
    return found


def secrets() -> set[str]:
    values = set(_planted)
    for _, made in _stacks:
        for key in made.values():
            values.update((key, key.split("_", 2)[2]))  # the whole key and its secret part
    return values


def findings(files: Iterable[Path], values: set[str]) -> list[str]:
    """Each leak as 'file: what'."""
    out = []
    for path in files:
        text = path.read_text(errors="replace")
        out += [f"{path}: a Tollway key" for _ in KEY.finditer(text)][:1]
        out += [f"{path}: {value[:24]!r}" for value in values if value in text]
    return out
