"""Custom patterns from config: compiled once, refused if they could run in more
than linear time."""

from __future__ import annotations

from .findings import Finder


class PatternError(ValueError):
    """A custom pattern that does not compile, or could backtrack catastrophically."""


def custom_finder(name: str, pattern: str) -> Finder:
    raise NotImplementedError
