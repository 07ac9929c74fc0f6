"""All enabled detectors over one text: the entities, without overlaps (sans-IO)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from . import pii, secrets
from .custom import custom_finder
from .findings import DEFAULT_ENTITIES, Finder, Finding

# When two findings overlap, the longer wins; of equal length, the earlier here.
_PRIORITY = ("secrets", "credit_card", "iban", "us_ssn", "phone", "email", "ip_address")


class Detector:
    def __init__(
        self,
        entities: Iterable[str] = DEFAULT_ENTITIES,
        phone_regions: Sequence[str] = ("US",),
        custom: Sequence[tuple[str, str]] = (),  # (name, pattern)
    ) -> None:
        finders: dict[str, Callable[[], Finder]] = {
            "email": lambda: pii.find_email,
            "phone": lambda: pii.phone_finder(phone_regions),
            "credit_card": lambda: pii.find_credit_card,
            "iban": lambda: pii.find_iban,
            "us_ssn": lambda: pii.find_us_ssn,
            "ip_address": lambda: pii.find_ip_address,
            "secrets": lambda: secrets.find_secrets,
        }
        self.entities = tuple(entities)
        self._finders = [finders[e]() for e in self.entities]
        self._finders += [custom_finder(name, pattern) for name, pattern in custom]
        names = [*_PRIORITY, *(name for name, _ in custom)]
        self._rank = {name: i for i, name in enumerate(names)}

    def find(self, text: str) -> list[Finding]:
        """The findings in text order, none overlapping another."""
        found = [f for finder in self._finders for f in finder(text)]
        if len(found) < 2:
            return found
        found.sort(key=lambda f: (f.start - f.end, self._rank.get(f.entity, len(self._rank))))
        kept: list[Finding] = []
        for f in found:
            if all(f.end <= k.start or f.start >= k.end for k in kept):
                kept.append(f)
        kept.sort(key=lambda f: f.start)
        return kept
