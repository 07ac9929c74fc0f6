"""What detectors report: where an entity is in a text and what it is (sans-IO)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

# The entity types of `redaction.entities` (custom patterns add their own names).
ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secrets")
DEFAULT_ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "secrets")


@dataclass(frozen=True, slots=True)
class Finding:
    """``text[start:end]`` is an entity of type ``entity``. ``kind`` says exactly what:
    for secrets the credential type (``aws_access_key``, ``github_token``, ...), for a
    custom pattern its name, else the entity type itself."""

    start: int
    end: int
    entity: str
    kind: str


# A detector: every entity of its type(s) in a text, in any order, overlaps allowed.
Finder = Callable[[str], Iterable[Finding]]
