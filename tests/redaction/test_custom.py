"""Custom patterns: found as configured, refused at load when they cannot run safely."""

from __future__ import annotations

import time

import pytest

from extproc.redaction.custom import PatternError, custom_finder
from extproc.redaction.findings import Finding


def test_pattern_finds_its_matches_with_its_name() -> None:
    find = custom_finder("employee_id", r"\bEMP-[0-9]{6}\b")
    text = "ask EMP-123456 or EMP-654321, not EMP-12345 or XEMP-123456"
    assert list(find(text)) == [
        Finding(4, 14, "employee_id", "employee_id"),
        Finding(18, 28, "employee_id", "employee_id"),
    ]


def test_offsets_are_characters_in_non_ascii_text() -> None:
    find = custom_finder("ticket", r"TCK-[0-9]{4}")
    text = "réf. 🎫 TCK-0042 ok"
    [f] = find(text)
    assert text[f.start : f.end] == "TCK-0042"


def test_secret_group_is_the_span() -> None:
    find = custom_finder("internal_token", r"itok=(?P<secret>[a-z0-9]{16})")
    text = "url?itok=0123456789abcdef&x=1"
    [f] = find(text)
    assert text[f.start : f.end] == "0123456789abcdef"


def test_catastrophic_pattern_runs_in_linear_time() -> None:
    # On a backtracking engine this takes minutes (2^30 ways to split the a's).
    find = custom_finder("runs", r"(a+)+$")
    started = time.perf_counter()
    assert list(find("a" * 30 + "b")) == []
    assert list(find("a" * 100_000 + "b")) == []
    assert time.perf_counter() - started < 0.5


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (r"(a+)\1", r"backreferences and lookaround cannot run in linear time"),
        (r"(?<=id=)[0-9]+", r"backreferences and lookaround cannot run in linear time"),
        (r"(?!x)y", r"backreferences and lookaround cannot run in linear time"),
        (r"EMP-[0-9", r"missing \]"),
        (r"(EMP", r"missing \)"),
        (r"x{2000}", r"invalid repetition size"),
        (r"[0-9]*", r"matches the empty string"),
    ],
)
def test_refused_pattern_says_why(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=message) as caught:
        custom_finder("bad_one", pattern)
    assert "'bad_one'" in str(caught.value)


@pytest.mark.parametrize("name", ["", "Upper", "with space", "1st", "email", "secrets"])
def test_refused_name(name: str) -> None:
    with pytest.raises(PatternError, match="custom pattern name"):
        custom_finder(name, r"x+")
