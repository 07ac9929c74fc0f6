"""PII detectors: linear-time patterns find candidates, code validates them."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from .findings import Finder, Finding


def find_email(text: str) -> Iterator[Finding]:
    raise NotImplementedError


def phone_finder(regions: Sequence[str]) -> Finder:
    raise NotImplementedError


def find_credit_card(text: str) -> Iterator[Finding]:
    raise NotImplementedError


def find_iban(text: str) -> Iterator[Finding]:
    raise NotImplementedError


def find_us_ssn(text: str) -> Iterator[Finding]:
    raise NotImplementedError


def find_ip_address(text: str) -> Iterator[Finding]:
    raise NotImplementedError
