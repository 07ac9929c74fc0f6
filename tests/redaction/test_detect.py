"""The Detector: all finders over a text, overlaps settled, long texts a window at a time."""

from __future__ import annotations

import random

import pytest

from extproc.redaction.detect import Detector
from extproc.redaction.findings import ENTITIES

PEM = (
    "-----BEGIN RSA PRIVATE KEY-----\n"
    + "\n".join("MIIEow" + "AbCdEfGh" * 8 for _ in range(12))
    + "\n-----END RSA PRIVATE KEY-----"
)
PIECES = [
    "jane.doe@example.com",
    "+49 30 1234567",
    "4111 1111 1111 1111",
    "DE89 3704 0044 0532 0130 00",
    "SSN 123-45-6789",
    "10.20.30.40",
    "AKIA4HXQ7KPZ3MWRT2LB",
    "EMP-123456",
    PEM,
]


@pytest.mark.parametrize("seed", range(3))
def test_a_long_text_a_window_at_a_time_gives_what_the_whole_text_gives(seed: int) -> None:
    rng = random.Random(seed)
    words = [
        "the",
        "order",
        "was",
        "shipped",
        "on",
        "2024-01-15",
        "and",
        "version",
        "1.2.3",
        "is",
        "fine",
    ]
    parts = []
    for _ in range(1500):
        parts.append(rng.choice(PIECES) if rng.random() < 0.15 else rng.choice(words))
    text = " ".join(parts)
    detector = Detector(ENTITIES, ("US", "DE"), [("employee_id", r"EMP-[0-9]{6}")])
    whole = detector.find(text)
    assert len(whole) > 100 and any(f.kind == "private_key" for f in whole)
    for window in (700, 4096, 32768):
        windowed = [f for found in detector.find_all(text, window) for f in found]
        assert windowed == whole, window


def test_the_longer_of_two_overlapping_findings_wins() -> None:
    detector = Detector(("email", "secrets"), ("US",), [("mail_domain", r"example\.com")])
    text = "write to jane.doe@example.com now"
    assert [(text[f.start : f.end], f.entity) for f in detector.find(text)] == [
        ("jane.doe@example.com", "email")
    ]


def test_no_prompt_text_is_kept_after_a_search() -> None:
    from extproc.redaction import pii

    detector = Detector(ENTITIES, ("US",))
    detector.find("call +1 415 555 0100 about card 4111 1111 1111 1111")
    assert pii._numbers.cache_info().currsize == 0
