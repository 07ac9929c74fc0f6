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


# ---- gitleaks rules ----------------------------------------------------------------

GITLEAKS = """
title = "team rules"

[[rules]]
id = "acme-api-token"
description = "ACME API token"
regex = '''(?i)acme[_-]?token\\s*[:=]\\s*['"]?([a-z0-9]{24,40})'''
entropy = 3.0
keywords = ["acme"]
[rules.allowlist]
regexes = ['''^0+$''']
stopwords = ["example"]

[[rules]]
id = "internal-host-cred"
regex = '''svc://(?P<user>[a-z]+):([A-Za-z0-9]{12,})@'''
secretGroup = 2

[[rules]]
id = "no-regex-rule"
path = '''\\.pem$'''
"""


def test_gitleaks_rules_find_secrets_with_their_group_entropy_keywords_and_allowlist() -> None:
    from extproc.redaction.custom import gitleaks_finder, load_gitleaks

    rules = load_gitleaks(GITLEAKS)
    assert [r.id for r in rules] == ["acme-api-token", "internal-host-cred"]  # path-only skipped
    find = gitleaks_finder(rules)
    token = "k3v9q2m7x1p8w4z6r5t0y2u8"
    text = f"ACME_TOKEN = '{token}' and svc://deploy:Zq8Wm2Lk9Rt4Yp@db.internal"
    got = [(text[f.start : f.end], f.entity, f.kind) for f in find(text)]
    assert got == [
        (token, "secrets", "acme-api-token"),
        ("Zq8Wm2Lk9Rt4Yp", "secrets", "internal-host-cred"),
    ]
    low_entropy = "acme_token: aaaaaaaaaaaaaaaaaaaaaaaaaaaa"
    allowed = "acme_token: 000000000000000000000000"
    stopword = "acme_token: example1234567890abcdefghij"
    no_keyword = f"token = '{token}'"  # no "acme" in the text: the rule does not run
    for quiet in (low_entropy, allowed, stopword, no_keyword):
        assert list(find(quiet)) == [], quiet


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[[rules]]\nregex = 'x'\n", "rule 1: a rule needs an id"),
        ("[[rules]]\nid = 'a'\nregex = '(a)\\1'\n", "cannot run in linear time"),
        ("[[rules]]\nid = 'a'\nregex = 'x(y)'\nsecretGroup = 3\n", "secretGroup 3 is not a group"),
        ("rules = [", "not valid TOML"),
    ],
)
def test_bad_gitleaks_rules_are_refused_with_the_rule_named(toml: str, message: str) -> None:
    from extproc.redaction.custom import PatternError, load_gitleaks

    with pytest.raises(PatternError) as caught:
        load_gitleaks(toml, "rules.toml")
    assert message in str(caught.value) and "rules.toml" in str(caught.value)
