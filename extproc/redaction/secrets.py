"""Secret detectors: provider credentials by their structural markers, and generic
``key=value`` secrets above an entropy threshold."""

from __future__ import annotations

from collections.abc import Iterator

from .findings import Finding


def find_secrets(text: str) -> Iterator[Finding]:
    raise NotImplementedError
