"""Custom patterns from config: compiled once, refused if they could run in more
than linear time (sans-IO).

Custom patterns run on RE2 (the ``google-re2`` wheel), not on Python's ``re``.
RE2 matches with automata, in time linear in the text whatever the pattern, so
no pattern can backtrack catastrophically; what RE2 cannot do in linear time
(backreferences, lookaround) it refuses to compile, and so do we, at load. The
alternative, ``re`` with a static check that refuses nested unbounded repeats,
overlapping alternations under a repeat and backreferences, is a heuristic: it
either refuses sound patterns or lets through polynomial ones (``\\s*\\s*\\s*$``
and ``.*=.*=.*;`` are cubic on ``re`` with no nested repeat at all). Gitleaks
rules are written for Go's RE2 syntax, which this one is.

Measured (Python 3.11, x86_64, google-re2 1.1.20251105; medians):

=========================================  ============  ============
case                                        ``re``        RE2
=========================================  ============  ============
``\\bACME-[0-9]{6}\\b``, 2 KB prompt          25 µs         4.6 µs
same, 40-character text                     0.3 µs        3.7 µs
same, 1 MB text, no match                   13.5 ms       1.7 ms
same, 1 MB text, 50,000 matches             19 ms         128 ms
``(a+)+$`` on ``"a" * 30 + "b"``            ~75 s (2^n:    1.5 µs
                                            0.29 s at 22)
=========================================  ============  ============

RE2's wrapper costs about 3 µs a call and 2.5 µs a match (so a text that is
mostly matches is slower than on ``re``; the scan itself is several times
faster), and for a ``str`` it encodes to UTF-8 and maps each match's offsets
back; an ASCII text is passed as bytes, where offsets need no mapping. It
releases the GIL while matching (two threads on two cores: 39 ms against 63 ms
one after the other). RE2 syntax differs from
``re``'s in small ways: ``\\b``, ``\\w`` and ``\\d`` are ASCII-only, and the end
of text is ``\\z``.

The span found is the whole match, or the group named ``secret`` when the
pattern has one (``token=(?P<secret>[a-z0-9]{32})`` redacts only the value).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import re2  # type: ignore[import-untyped]

from .findings import ENTITIES, Finder, Finding

_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_MAX_MEM = 8 << 20  # RE2's default budget for one compiled pattern


class PatternError(ValueError):
    """A custom pattern that does not compile, or could backtrack catastrophically."""


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # the error goes into PatternError, not to stderr
    options.max_mem = _MAX_MEM
    return options


def _message(exc: Exception) -> str:
    detail = exc.args[0] if exc.args else ""
    return detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)


def compile_pattern(name: str, pattern: str) -> Any:  # an re2._Regexp (untyped)
    """The compiled RE2 pattern, or PatternError saying what is wrong with it."""
    if not _NAME_RE.fullmatch(name):
        raise PatternError(
            f"custom pattern name {name!r}: use 1-64 lower-case letters, digits, '_' or '-', "
            "starting with a letter"
        )
    if name in ENTITIES:
        raise PatternError(f"custom pattern name {name!r}: that is a built-in entity")
    return _compile(pattern, f"custom pattern {name!r}")


def _compile(pattern: str, what: str) -> Any:
    try:
        compiled = re2.compile(pattern, _options())
    except re2.error as exc:
        detail = _message(exc)
        hint = ""
        if re.search(r"\\[1-9]|\(\?<?[=!]", pattern):
            hint = (
                " (backreferences and lookaround cannot run in linear time, so they "
                "are not supported)"
            )
        raise PatternError(f"{what}: {detail}{hint}") from None
    if compiled.fullmatch("") is not None:
        raise PatternError(f"{what}: matches the empty string (use + rather than *?)")
    return compiled


def custom_finder(name: str, pattern: str) -> Finder:
    """A finder for one pattern from config: entity and kind are ``name``."""
    compiled = compile_pattern(name, pattern)
    group: int = compiled.groupindex.get("secret", 0)  # re2 spans take numbers only

    def find(text: str) -> Iterator[Finding]:
        subject: str | bytes = text.encode("ascii") if text.isascii() else text
        for m in compiled.finditer(subject):
            start, end = m.span(group)
            if start < end:  # an empty or unmatched secret group: nothing to redact
                yield Finding(start, end, name, name)

    return find


# ---- gitleaks rules ------------------------------------------------------------


class GitleaksRule:
    """One ``[[rules]]`` entry of a gitleaks config: what this importer uses of it."""

    __slots__ = ("allow", "entropy", "group", "id", "keywords", "regex", "stopwords")

    def __init__(self, item: dict[str, Any], where: str) -> None:
        rule_id = item.get("id")
        if not isinstance(rule_id, str) or not rule_id:
            raise PatternError(f"{where}: a rule needs an id")
        self.id = rule_id
        where = f"{where} ({rule_id})"
        self.regex = _compile(_text(item, "regex", where), where)
        group = item.get("secretGroup", 0)
        if not isinstance(group, int) or not 0 <= group <= self.regex.groups:
            raise PatternError(f"{where}: secretGroup {group!r} is not a group")
        self.group = group  # 0: the first group that matched, else the whole match
        entropy = item.get("entropy", 0)
        if not isinstance(entropy, int | float):
            raise PatternError(f"{where}: entropy must be a number")
        self.entropy = float(entropy)
        self.keywords = tuple(str(k).lower() for k in item.get("keywords", ()))
        allow = item.get("allowlist", {})
        allows = item.get("allowlists", [allow] if isinstance(allow, dict) else [])
        self.allow: list[Any] = []  # a secret these match is not one
        self.stopwords: list[str] = []  # nor one that holds these
        for entry in allows if isinstance(allows, list) else []:
            if isinstance(entry, dict):
                self.allow += [
                    compile_pattern("gitleaks", str(p)) for p in entry.get("regexes", ())
                ]
                self.stopwords += [str(w).lower() for w in entry.get("stopwords", ())]

    def span(self, m: Any) -> tuple[int, int]:
        if self.group or not self.regex.groups:
            return m.span(self.group)  # type: ignore[no-any-return]
        for group in range(1, self.regex.groups + 1):
            start, end = m.span(group)
            if start < end:
                return start, end
        return m.span(0)  # type: ignore[no-any-return]


def _text(item: dict[str, Any], key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str) or not value:
        raise PatternError(f"{where}: {key} must be a non-empty string")
    return value


def load_gitleaks(toml_text: str, source: str = "gitleaks rules") -> list[GitleaksRule]:
    """The rules of a gitleaks config (TOML) that match text: those with a ``regex``
    (rules on file paths only are not for prompts)."""
    import tomllib

    try:
        doc = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise PatternError(f"{source}: not valid TOML: {exc}") from None
    items = doc.get("rules", [])
    if not isinstance(items, list):
        raise PatternError(f"{source}: [[rules]] must be a list of tables")
    return [
        GitleaksRule(item, f"{source}: rule {i + 1}")
        for i, item in enumerate(items)
        if isinstance(item, dict) and "regex" in item
    ]


def gitleaks_finder(rules: list[GitleaksRule]) -> Finder:
    """Secrets by the user's gitleaks rules: entity ``secrets``, kind the rule's id.

    As gitleaks does: a rule runs only on a text holding one of its keywords (if
    it has any); a secret below the rule's entropy, or matching its allowlist, is
    not one."""

    def find(text: str) -> Iterator[Finding]:
        lower = text.lower()
        ascii_text = text.isascii()
        subject: str | bytes = text.encode("ascii") if ascii_text else text
        for rule in rules:
            if rule.keywords and not any(k in lower for k in rule.keywords):
                continue
            for m in rule.regex.finditer(subject):
                start, end = rule.span(m)
                if start >= end:
                    continue
                secret = text[start:end]
                if rule.entropy and _entropy(secret) < rule.entropy:
                    continue
                if any(a.search(secret) for a in rule.allow) or any(
                    w in secret.lower() for w in rule.stopwords
                ):
                    continue
                yield Finding(start, end, "secrets", rule.id)

    return find


def _entropy(value: str) -> float:
    counts: dict[str, int] = {}
    for c in value:
        counts[c] = counts.get(c, 0) + 1
    n = len(value)
    return -sum(k / n * math.log2(k / n) for k in counts.values())
