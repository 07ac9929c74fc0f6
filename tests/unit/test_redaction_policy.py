"""What replaces a finding (redaction/policy.py): mask, placeholder, hash."""

from __future__ import annotations

import pytest

from extproc.redaction.detect import Detector
from extproc.redaction.findings import Finding
from extproc.redaction.policy import Policy, Rewrite, mask


@pytest.mark.parametrize(
    ("entity", "value", "masked"),
    [
        ("credit_card", "4111 1111 1111 1111", "**** **** **** 1111"),
        ("credit_card", "5555555555554444", "************4444"),
        ("phone", "+49 30 1234567", "+** ** ***4567"),
        ("us_ssn", "123-45-6789", "***-**-6789"),
        ("iban", "DE89 3704 0044 0532 0130 00", "DE** **** **** **** **30 00"),
        ("email", "alice.smith@example.com", "a***@example.com"),
        ("ip_address", "192.168.10.20", "192.***.**.**"),
        ("ip_address", "2001:db8::1", "2001:***::*"),
        ("secrets", "sk-proj-abcdefghijklmnopqrstuvwxyz012345", "sk-proj-****"),
        ("secrets", "AKIAIOSFODNN7EXAMPLE", "AKIAI****"),
        ("employee_id", "EMP-123456", "***-**3456"),
        ("employee_id", "EMP-12", "******"),
    ],
)
def test_mask_keeps_only_what_recognises_the_value(entity: str, value: str, masked: str) -> None:
    assert mask(entity, value) == masked


def test_mask_of_a_pem_block_keeps_its_armour_lines_only() -> None:
    pem = "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nAbCd\n-----END RSA PRIVATE KEY-----"
    assert mask("secrets", pem) == (
        "-----BEGIN RSA PRIVATE KEY-----\n****\n-----END RSA PRIVATE KEY-----"
    )


def test_mask_never_shows_a_short_value_whole() -> None:
    assert mask("credit_card", "1234") == "****"
    assert mask("secrets", "abc") == "****"


def policy(action: str, hash_key: bytes | None = None) -> Policy:
    actions = {e: action for e in ("email", "credit_card", "employee_id")}
    return Policy("p", Detector(()), actions, hash_key=hash_key)


def findings(text: str, *values: tuple[str, str]) -> list[Finding]:
    out = []
    for entity, value in values:
        start = text.index(value)
        out.append(Finding(start, start + len(value), entity, entity))
    return sorted(out, key=lambda f: f.start)


def test_placeholders_are_numbered_per_type_and_reused_for_the_same_value() -> None:
    rewrite = Rewrite(policy("placeholder"))
    first = "mail a@x.io and b@y.io, card 4111111111111111"
    out1 = rewrite.apply(
        first,
        findings(
            first, ("email", "a@x.io"), ("email", "b@y.io"), ("credit_card", "4111111111111111")
        ),
    )
    assert out1 == "mail [EMAIL_1] and [EMAIL_2], card [CREDIT_CARD_1]"
    second = "again b@y.io"  # another text of the same request
    assert rewrite.apply(second, findings(second, ("email", "b@y.io"))) == "again [EMAIL_2]"
    assert rewrite.originals == {
        "[EMAIL_1]": "a@x.io",
        "[EMAIL_2]": "b@y.io",
        "[CREDIT_CARD_1]": "4111111111111111",
    }
    assert rewrite.counts == {("email", "placeholder"): 3, ("credit_card", "placeholder"): 1}
    assert Rewrite(policy("placeholder")).apply(second, findings(second, ("email", "b@y.io"))) == (
        "again [EMAIL_1]"  # numbering is per request
    )


def test_hash_is_deterministic_under_one_key_and_differs_under_another() -> None:
    text = "id EMP-123456 and EMP-123456"
    f = [
        Finding(3, 13, "employee_id", "employee_id"),
        Finding(18, 28, "employee_id", "employee_id"),
    ]
    one = Rewrite(policy("hash", b"k" * 32)).apply(text, f)
    again = Rewrite(policy("hash", b"k" * 32)).apply(text, f)
    other = Rewrite(policy("hash", b"j" * 32)).apply(text, f)
    assert one == again != other
    label = one.split()[1]
    assert label.startswith("[EMPLOYEE_ID_") and len(label) == len("[EMPLOYEE_ID_]") + 16
    assert one.split()[3] == label and "123456" not in one


def test_block_findings_are_noted_by_type_and_kind_without_values() -> None:
    p = Policy("p", Detector(()), {"secrets": "block", "email": "placeholder"})
    rewrite = Rewrite(p)
    rewrite.check([Finding(0, 5, "email", "email"), Finding(6, 20, "secrets", "aws_access_key")])
    assert rewrite.blocked == {"secrets": {"aws_access_key"}}
