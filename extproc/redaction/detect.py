"""All enabled detectors over one text: the entities, without overlaps (sans-IO)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

from . import pii, secrets
from .custom import GitleaksRule, custom_finder, gitleaks_finder
from .findings import DEFAULT_ENTITIES, Finder, Finding, resolve

# A window of a long text is searched with this much text around it: before, for
# context words; after, so that an entity starting in the window is seen whole
# (a PEM private key block is the longest, a few KB). PII is short (an email at most
# 254 characters), so its finders look only SHORT_MARGIN past the window.
CONTEXT = 256
MARGIN = 8 << 10  # an 8192-bit RSA key in PEM is about 6.3 KB
SHORT_MARGIN = 1 << 10
_SHORT = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address")
# When two findings overlap, the longer wins; of equal length, the earlier here.
_PRIORITY = ("secrets", "credit_card", "iban", "us_ssn", "phone", "email", "ip_address")


class Detector:
    def __init__(
        self,
        entities: Iterable[str] = DEFAULT_ENTITIES,
        phone_regions: Sequence[str] = ("US",),
        custom: Sequence[tuple[str, str]] = (),  # (name, pattern)
        gitleaks: Sequence[GitleaksRule] = (),  # rules that find more secrets
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
        if gitleaks:
            self._finders.append(gitleaks_finder(list(gitleaks)))
        margins = [SHORT_MARGIN if e in _SHORT else MARGIN for e in self.entities]
        self._margins = margins + [MARGIN] * (len(self._finders) - len(margins))
        names = [*_PRIORITY, *(name for name, _ in custom)]
        self._rank = {name: i for i, name in enumerate(names)}

    def find(self, text: str, start: int = 0, end: int | None = None) -> list[Finding]:
        """The findings in text order, none overlapping another; with ``start`` and
        ``end``, those that start in text[start:end] (looking around it: CONTEXT before,
        a finder's margin after)."""
        try:
            return self._find(text, start, end)
        finally:
            pii.forget_texts()

    def _find(self, text: str, start: int, end: int | None) -> list[Finding]:
        if start <= 0 and (end is None or end >= len(text)):
            return self._resolve([f for finder in self._finders for f in finder(text)])
        stop = len(text) if end is None else end
        lo = max(0, start - CONTEXT)
        pieces: dict[int, str] = {}  # by margin: each searched once
        found: list[Finding] = []
        for finder, margin in zip(self._finders, self._margins, strict=True):
            piece = pieces.get(margin)
            if piece is None:
                piece = pieces[margin] = text[lo : min(len(text), stop + margin)]
            found += finder(piece)
        return [
            Finding(f.start + lo, f.end + lo, f.entity, f.kind)
            for f in self._resolve(found)
            if start <= f.start + lo < stop
        ]

    def find_all(self, text: str, window: int) -> Iterator[list[Finding]]:
        """``find(text)`` a window at a time (the caller may pause in between); an
        entity that crosses a window's end is found in that window."""
        last = 0
        for start in range(0, max(len(text), 1), window):
            found = [f for f in self.find(text, start, start + window) if f.start >= last]
            if found:
                last = found[-1].end
            yield found

    def _resolve(self, found: list[Finding]) -> list[Finding]:
        ranks, last = self._rank, len(self._rank)
        return resolve(found, lambda f: ranks.get(f.entity, last))
