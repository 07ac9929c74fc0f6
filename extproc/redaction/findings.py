"""What detectors report: where an entity is in a text and what it is (sans-IO)."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable
from typing import NamedTuple

# The entity types of `redaction.entities` (custom patterns add their own names).
ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "ip_address", "secrets")
DEFAULT_ENTITIES = ("email", "phone", "credit_card", "iban", "us_ssn", "secrets")


class Finding(NamedTuple):
    """``text[start:end]`` is an entity of type ``entity``. ``kind`` says exactly what:
    for secrets the credential type (``aws_access_key``, ``github_token``, ...), for a
    custom pattern its name, else the entity type itself. (A tuple: a dense megabyte
    makes tens of thousands, and a frozen dataclass costs ~3x as much to make.)"""

    start: int
    end: int
    entity: str
    kind: str


# A detector: every entity of its type(s) in a text, in any order, overlaps allowed.
Finder = Callable[[str], Iterable[Finding]]


def resolve(found: list[Finding], rank: Callable[[Finding], int]) -> list[Finding]:
    """``found`` in text order without overlaps: of two that overlap the longer wins,
    of two as long the lower ``rank``. In text order, findings fall into clusters of
    overlapping ones (most are alone); each cluster is settled longest first."""
    if len(found) < 2:
        return found
    found.sort(key=lambda f: f.start)
    kept: list[Finding] = []
    cluster = [found[0]]
    reach = found[0].end
    for f in found[1:]:
        if f.start < reach:
            cluster.append(f)
            reach = max(reach, f.end)
            continue
        kept += cluster if len(cluster) == 1 else _settle(cluster, rank)
        cluster, reach = [f], f.end
    kept += cluster if len(cluster) == 1 else _settle(cluster, rank)
    return kept


def _settle(cluster: list[Finding], rank: Callable[[Finding], int]) -> list[Finding]:
    cluster.sort(key=lambda f: (f.start - f.end, rank(f)))
    kept: list[Finding] = []  # by start; not overlapping, so ends are in order too
    starts: list[int] = []
    ends: list[int] = []
    for f in cluster:
        i = bisect_right(starts, f.start)
        if (i == 0 or ends[i - 1] <= f.start) and (i == len(starts) or starts[i] >= f.end):
            starts.insert(i, f.start)
            ends.insert(i, f.end)
            kept.insert(i, f)
    return kept
