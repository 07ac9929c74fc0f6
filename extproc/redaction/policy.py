"""What replaces a finding: mask, placeholder, hash, or a refusal (block). Sans-IO.

A ``Policy`` is compiled once from a config block; a ``Rewrite`` is one
request's: it numbers placeholders consistently within the request (the same
value is always ``[EMAIL_1]``), remembers what they stood for (to restore them
in the answer), and counts what it replaced.

- mask keeps what a person needs to recognise the value and no more: a card's
  or phone's last four digits, an email's first letter and domain, an IBAN's
  country and last four, an IP's first part, a secret's first few characters
  (at most a quarter of it), a PEM block's BEGIN and END lines.
- placeholder: ``[EMAIL_1]``, ``[CREDIT_CARD_2]``, ``[SECRET_1]``, ``[EMPLOYEE_ID_1]``.
- hash: ``[EMAIL_9f86d081884c7d65]``, HMAC-SHA256 of the value under the
  deployment's key, so the same value gives the same text in every request
  (joins still work) and nobody without the key can test a guess.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .detect import Detector
from .findings import Finding

_DIGIT = re.compile(r"\d")
_WORD = re.compile(r"[0-9A-Za-z]")
_PEM_BODY = re.compile(r"(-----BEGIN [A-Z0-9 ]+-----)[\s\S]*?(-----END [A-Z0-9 ]+-----)")

# What a placeholder calls an entity type (a custom pattern: its name, upper case).
_LABELS = {
    "email": "EMAIL",
    "phone": "PHONE",
    "credit_card": "CREDIT_CARD",
    "iban": "IBAN",
    "us_ssn": "US_SSN",
    "ip_address": "IP_ADDRESS",
    "secrets": "SECRET",
}
# What a refusal calls them.
NAMES = {
    "email": "email address",
    "phone": "phone number",
    "credit_card": "payment card number",
    "iban": "IBAN",
    "us_ssn": "US social security number",
    "ip_address": "IP address",
    "secrets": "secret",
}


@dataclass(frozen=True, slots=True)
class Policy:
    name: str  # "default" or the policy's name in redaction_policies
    detector: Detector
    actions: Mapping[str, str]  # entity type -> mask | placeholder | hash | block
    hash_key: bytes | None = None
    responses: bool = False  # also redact the answer
    restore: bool = False  # put placeholders' originals back into the answer
    fails_closed: bool = True
    tenants: tuple[str, ...] = ()  # a policy of redaction_policies: the tenants it is for


class Rewrite:
    """One request's replacements."""

    __slots__ = ("_last", "_numbers", "blocked", "counts", "originals", "policy")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._numbers: dict[tuple[str, str], str] = {}  # (entity, value) -> placeholder
        self._last: dict[str, int] = {}  # entity -> its last placeholder's number
        self.originals: dict[str, str] = {}  # placeholder -> value
        self.counts: dict[tuple[str, str], int] = {}  # (entity, action) -> replaced
        self.blocked: dict[str, set[str]] = {}  # entity -> kinds found, where it blocks

    def check(self, findings: Sequence[Finding]) -> None:
        """Note the findings whose action refuses the request."""
        actions = self.policy.actions
        for f in findings:
            if actions[f.entity] == "block":
                self.blocked.setdefault(f.entity, set()).add(f.kind)
                self.counts[f.entity, "block"] = self.counts.get((f.entity, "block"), 0) + 1

    def apply(self, text: str, findings: Sequence[Finding]) -> str:
        """``text`` with every finding replaced (findings in order, not overlapping)."""
        actions = self.policy.actions
        out: list[str] = []
        at = 0
        for f in findings:
            action = actions[f.entity]
            value = text[f.start : f.end]
            out.append(text[at : f.start])
            out.append(self._replacement(f, value, action))
            at = f.end
            self.counts[f.entity, action] = self.counts.get((f.entity, action), 0) + 1
        out.append(text[at:])
        return "".join(out)

    def _replacement(self, f: Finding, value: str, action: str) -> str:
        label = _LABELS.get(f.entity) or f.entity.upper()
        if action == "placeholder":
            found = self._numbers.get((f.entity, value))
            if found is None:
                number = self._last[f.entity] = self._last.get(f.entity, 0) + 1
                found = self._numbers[f.entity, value] = f"[{label}_{number}]"
                self.originals[found] = value
            return found
        if action == "hash":
            key = self.policy.hash_key
            assert key is not None  # config refuses a hash action without a key
            digest = hmac.new(key, f"{f.entity}:{value}".encode(), hashlib.sha256).hexdigest()
            return f"[{label}_{digest[:16]}]"
        return mask(f.entity, value)


def mask(entity: str, value: str) -> str:
    if entity in ("credit_card", "phone", "us_ssn"):
        return _keep_last(value, _DIGIT, 4)
    if entity == "iban":
        return value[:2] + _keep_last(value[2:], _WORD, 4)
    if entity == "email":
        local, _, domain = value.rpartition("@")
        return f"{local[:1]}***@{domain}"
    if entity == "ip_address":
        sep = ":" if ":" in value else "."
        head, _, rest = value.partition(sep)
        return head + "".join(c if c in ":." else "*" for c in sep + rest)
    if entity == "secrets":
        pem = _PEM_BODY.fullmatch(value)
        if pem is not None:
            return f"{pem[1]}\n****\n{pem[2]}"
        return value[: min(8, len(value) // 4)] + "****"
    return _keep_last(value, _WORD, 4) if len(value) > 8 else "*" * len(value)


def _keep_last(value: str, kind: re.Pattern[str], keep: int) -> str:
    """Every character of ``kind`` starred but the last ``keep``; separators kept."""
    positions = [m.start() for m in kind.finditer(value)]
    hidden = set(positions[:-keep] if len(positions) > keep else positions)
    return "".join("*" if i in hidden else c for i, c in enumerate(value))
