"""Secret detectors: provider credentials by their structural markers, and generic
``key=value`` secrets above an entropy threshold (sans-IO).

What is found (``SECRET_KINDS``), each span being the secret value only:

- Provider tokens by prefix and shape, with a word boundary on both sides: the
  character before must not be a letter or digit (so ``task-proj-…`` is not an
  OpenAI key, and a base64 blob that happens to hold ``AKIA`` is not an AWS key)
  and the body must not run on. A body that is a placeholder (``xxxx``,
  ``your…``, ``EXAMPLE``, a run of one character, ``12345678``/``abcdefgh``, or too
  little entropy) is not a secret. GitHub's classic tokens carry a CRC32 of their
  30 random characters in base62 as the last six: a token whose checksum holds is
  taken whatever it looks like; one whose checksum fails (hand-made fakes, which
  are most doc examples) must pass the placeholder test like any other.
- Stripe: secret and restricted keys (``sk_``/``rk_``, live and test: a test key
  still reads and writes the test account) and webhook secrets (``whsec_``);
  publishable keys (``pk_``) are meant to be public and are not flagged.
- Slack: bot, user, app and refresh tokens, and incoming-webhook URLs (the whole
  URL: whoever has it can post).
- OpenAI: project, service-account, admin and legacy keys; a bare ``sk-`` followed
  by 32 to 100 letters and digits is also taken as one (the key shape of the
  OpenAI-compatible providers Tollway fronts).
- JWTs: three base64url parts whose header decodes to a JSON object with ``alg``
  (no signature only when ``alg`` is ``none``).
- Private keys: the whole PEM/PGP block from ``-----BEGIN … PRIVATE KEY`` to its
  ``-----END`` line (or to the end of its base64 when the end is cut off);
  public keys and certificates are not secrets.
- ``aws_secret_key`` and ``generic_secret``: a value assigned to a name that says
  secret (``password``, ``api_key``, ``client_secret``, ``Authorization: Bearer``,
  …) in ``key=value``, ``key: value``, JSON, env, header or XML form, when the
  value looks random (see ``_generic_value``), and the password of a URL
  (``postgres://user:PASSWORD@host``). Prose ("the password is in the vault") has
  no assignment and is left alone; so are placeholders, code references
  (``os.environ``, ``${VAR}``, ``config.api_key``) and plain words.

Every regex is linear: bounded repetitions, no nested quantifiers over the same
characters, and each starts with a literal so that ``re`` scans with its
prefix search. Each rule runs only when one of its literal triggers is in the
text (``str.__contains__`` is a fast C scan), and the generic scan only looks
at the few places where a secret-sounding word meets ``=``, ``:`` or a quote.
"""

from __future__ import annotations

import base64
import binascii
import math
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import orjson
import re2  # type: ignore[import-untyped]

from .findings import Finding, resolve

SECRET_KINDS = (
    "openai_key",
    "anthropic_key",
    "aws_access_key",
    "aws_secret_key",
    "github_token",
    "gitlab_token",
    "slack_token",
    "stripe_key",
    "google_api_key",
    "jwt",
    "private_key",
    "tollway_key",
    "generic_secret",
)

_ENTITY = "secrets"
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

# ---- is a token body random, or a placeholder? -------------------------------

_PLACEHOLDER_WORDS = (
    "xxxx",
    "****",
    "...",
    "your",
    "example",
    "sample",
    "dummy",
    "placeholder",
    "redacted",
    "changeme",
    "change_me",
    "insert",
    "replace",
    "fake",
)
# Runs such as 12345678, abcdefgh: typed by a person, not drawn at random. (Eight: six
# turn up by chance in a Slack token's 40 digits one time in a few thousand.)
_SEQUENCE_RE = re.compile(
    "|".join(
        run[i : i + 8]
        for run in ("0123456789", "abcdefghijklmnopqrstuvwxyz")
        for i in range(len(run) - 7)
    )
)
# One character 8 times in a row (\1 written out: twice as fast as \1{7} in ``re``).
_REPEAT_RE = re.compile(r"(.)\1\1\1\1\1\1\1")


def _entropy(value: str) -> float:
    """Shannon entropy in bits per character."""
    n = len(value)
    return -sum(c / n * math.log2(c / n) for c in Counter(value).values())


def _entropy_at_least(value: str, bits: float) -> bool:
    """``_entropy(value) >= bits``, mostly without counting each character: ``k``
    distinct characters give at most log2(k) bits, and at least what one character
    ``n - k + 1`` times and the others once give. Random values (many distinct
    characters) pass on the bound, runs of a few characters fail on it; only the ones
    in between are counted. (Close to a bound the count decides.)"""
    n, k = len(value), len(set(value))
    if k < 2:  # no entropy
        return bits <= 0
    if math.log2(k) < bits - 1e-9:
        return False
    p = (n - k + 1) / n
    if (k - 1) / n * math.log2(n) - p * math.log2(p) > bits + 1e-9:
        return True
    return _entropy(value) >= bits


_PLACEHOLDER_WORD_RE = re.compile("|".join(map(re.escape, _PLACEHOLDER_WORDS)))
# Each run of 8 holds one of these aligned runs of 4: a quick test before the regex.
_SEQUENCE_QUARTERS = ("0123", "4567", "abcd", "efgh", "ijkl", "mnop", "qrst", "uvwx")


def _placeholder_word(value: str) -> bool:
    """A placeholder word written as a word (``EXAMPLE``, ``your_key``, ``Fake``), not
    letters of a random value that happen to spell one in mixed case (``…FaKE…``:
    about one AWS secret key in 150)."""
    for m in _PLACEHOLDER_WORD_RE.finditer(value.lower()):
        word = value[m.start() : m.end()]
        if word.islower() or word.isupper() or word.istitle() or not word.isalpha():
            return True
    return False


def _typed_run(lower: str) -> bool:
    if _REPEAT_RE.search(lower) is not None:
        return True
    return any(q in lower for q in _SEQUENCE_QUARTERS) and _SEQUENCE_RE.search(lower) is not None


def _placeholder(value: str) -> bool:
    return _placeholder_word(value) or _typed_run(value.lower())


def _random_body(body: str) -> bool:
    """A token body as a provider issues it: no placeholder, some entropy. The
    prefix is the strong evidence, so the bar is low (random bodies of 16 characters
    have entropy 2.5 at the very least; ``XXXX…`` has 0). A placeholder word inside
    a long random body (``…yIbyour_z…``: one ``sk-proj`` key in about 7,000) is
    chance, not a placeholder: placeholders made of words have entropy below 4."""
    lower = body.lower()
    if _typed_run(lower) or not _entropy_at_least(body, 2.2):
        return False
    return not _placeholder_word(body) or _entropy_at_least(body, 4.0)


# ---- provider tokens --------------------------------------------------------

_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def _github_checksum_ok(token: str) -> bool:
    """Classic tokens: ``prefix_`` + 30 random + base62(crc32(random)), 6 digits."""
    random_part, check = token[4:-6], token[-6:]
    value = 0
    for char in check:
        value = value * 62 + _BASE62.index(char)
    return value == binascii.crc32(random_part.encode("ascii"))


Check = Callable[[re.Match[str]], bool]


def _body_after(prefix_len: int) -> Check:
    return lambda m: _random_body(m.group()[prefix_len:])


def _body_group(m: re.Match[str]) -> bool:
    return _random_body(m.group("body"))


def _github(m: re.Match[str]) -> bool:
    token = m.group()
    if token.startswith("github_pat_"):
        return _random_body(token[11:])
    return _github_checksum_ok(token) or _random_body(token[4:])


_DIGIT_RE = re.compile("[0-9]")


def _slack(m: re.Match[str]) -> bool:
    body = m.group("body")
    return _DIGIT_RE.search(body) is not None and _random_body(body.replace("-", ""))


def _jwt(m: re.Match[str]) -> bool:
    header = m.group("header")
    try:
        decoded = orjson.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (ValueError, binascii.Error):
        return False
    if not isinstance(decoded, dict) or not isinstance(decoded.get("alg"), str):
        return False
    return bool(m.group("signature")) or decoded["alg"].lower() == "none"


@dataclass(frozen=True, slots=True)
class _Rule:
    kind: str
    prefixes: tuple[str, ...]  # literals the secret starts with (what the scan looks for)
    pattern: re.Pattern[str]  # matched at a prefix; the whole match is the secret
    check: Check


_RULES = (
    _Rule(
        "anthropic_key",
        ("sk-ant-",),
        re.compile(
            r"sk-ant-(?:api|admin|oat|ort)[0-9]{2}-(?P<body>[A-Za-z0-9_-]{32,200})(?![\w-])"
        ),
        _body_group,
    ),
    _Rule(
        "openai_key",
        ("sk-",),
        re.compile(
            r"sk-(?:"
            r"(?:proj|svcacct|admin|None)-(?P<body>[A-Za-z0-9_-]{32,300})(?![\w-])"
            r"|(?P<legacy>[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20})(?![\w-])"
            r"|(?P<bare>[A-Za-z0-9]{32,100})(?![\w-]))"
        ),
        lambda m: _random_body(m.group("body") or m.group("legacy") or m.group("bare")),
    ),
    _Rule(
        "aws_access_key",
        ("AKIA", "ASIA", "ABIA", "ACCA", "A3T"),
        re.compile(r"A(?:KIA|SIA|BIA|CCA|3T[A-Z0-9])[A-Z2-7]{16}(?![A-Za-z0-9])"),
        _body_after(4),
    ),
    _Rule(
        "github_token",
        ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
        re.compile(r"(?:gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{70,100})(?![\w-])"),
        _github,
    ),
    _Rule(
        "gitlab_token",
        (
            "glpat-",
            "gldt-",
            "glrt-",
            "glptt-",
            "glcbt-",
            "glimt-",
            "glagent-",
            "gloas-",
            "glsoat-",
            "glffct-",
            "GR1348941",
        ),
        re.compile(
            r"(?:gl(?:pat|dt|rt|ptt|cbt|imt|agent|oas|soat|ffct)-|GR1348941)"
            r"(?P<body>[A-Za-z0-9_-]{20,300})(?:\.[0-9a-z]{2}\.[0-9a-z]{7,11})?(?![\w-])"
        ),
        _body_group,
    ),
    _Rule(
        "slack_token",
        ("xox", "xapp-"),
        re.compile(
            r"(?:xox[abposr]|xoxe(?:\.xox[bp])?|xapp)-(?P<body>[0-9A-Za-z-]{10,300})(?![\w-])"
        ),
        _slack,
    ),
    _Rule(
        "slack_token",
        ("hooks.slack.com/",),  # the span takes in the https:// before it
        re.compile(
            r"hooks\.slack\.com/(?:services|workflows|triggers)/"
            r"(?P<body>[A-Za-z0-9_-]{1,40}/[A-Za-z0-9_-]{1,40}/[A-Za-z0-9_-]{8,100})(?![\w-])"
        ),
        _body_group,
    ),
    _Rule(
        "stripe_key",
        ("sk_live_", "sk_test_", "rk_live_", "rk_test_", "whsec_"),
        re.compile(
            r"(?:[sr]k_(?:live|test)_(?P<body>[A-Za-z0-9]{20,247})"
            r"|whsec_(?P<hook>[A-Za-z0-9+/=]{32,100}))(?![\w-])"
        ),
        lambda m: _random_body(m.group("body") or m.group("hook")),
    ),
    _Rule(
        "google_api_key",
        ("AIza",),
        re.compile(r"AIza[0-9A-Za-z_-]{35}(?![\w-])"),
        _body_after(4),
    ),
    _Rule(
        "tollway_key",
        ("tw_",),
        re.compile(r"tw_[0-9a-f]{12}_(?P<body>[A-Za-z0-9_-]{43})(?![\w-])"),
        _body_group,
    ),
    _Rule(
        "jwt",
        ("eyJ",),
        re.compile(
            r"(?P<header>eyJ[A-Za-z0-9_-]{8,4096})\.[A-Za-z0-9_-]{2,65536}"
            r"\.(?P<signature>[A-Za-z0-9_-]{0,4096})(?![\w-])"
        ),
        _jwt,
    ),
)


_RULES_BY_PREFIX: dict[str, list[_Rule]] = {}
for _rule in _RULES:
    for _prefix in _rule.prefixes:
        _RULES_BY_PREFIX.setdefault(_prefix, []).append(_rule)


_PREFIXES = tuple(_RULES_BY_PREFIX)


def _token_at(text: str, start: int, prefix: str) -> Finding | None:
    if start and text[start - 1] in _ALNUM:  # not a word boundary
        return None
    for rule in _RULES_BY_PREFIX[prefix]:
        m = rule.pattern.match(text, start)
        if m is not None and rule.check(m):
            if prefix == "hooks.slack.com/" and text[start - 8 : start] == "https://":
                start -= 8
            return Finding(start, m.end(), _ENTITY, rule.kind)
    return None


# ---- private keys -----------------------------------------------------------

_PEM_BEGIN_RE = re.compile(r"-----BEGIN (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END_RE = re.compile(r"-----END (?:[A-Z0-9]{1,20} ){0,3}PRIVATE KEY(?: BLOCK)?-----")
# What a block's body holds: base64 lines, headers (Proc-Type: 4,ENCRYPTED; DEK-Info;
# PGP's Version:/Comment:), and \n written out when the key sits in a JSON string.
# A cut-off block runs over whole lines of base64 and headers, each line after a line
# break (or a \n written out, as in a JSON string).
_PEM_BODY_RE = re.compile(
    r"(?:[ \t]{0,8}(?:\r?\n|\\r?\\n)[ \t]{0,8}"
    r"(?:[A-Za-z0-9+/=]{4,128}|[A-Za-z][A-Za-z-]{0,30}:[^\r\n\\]{0,200})"
    r"(?=[ \t]{0,8}(?:\r?\n|\\r?\\n|$)))*"
)
_PEM_MAX = 65536  # an RSA-16384 key is about 13 KB; past this it is not one block
_BASE64_64_RE = re.compile(r"(?:[^A-Za-z0-9+/]*+[A-Za-z0-9+/]){64}")  # 64 base64 characters


class _PemEnds:
    """The next ``-----END … PRIVATE KEY-----`` at or after a position, remembered, so
    that many ``BEGIN`` lines cost one search of the text, not one each."""

    __slots__ = ("_end", "_from", "_text")

    def __init__(self, text: str) -> None:
        self._text = text
        self._from = len(text) + 1
        self._end: re.Match[str] | None = None

    def after(self, pos: int) -> re.Match[str] | None:
        if not (self._from <= pos and (self._end is None or self._end.start() >= pos)):
            self._from, self._end = pos, _PEM_END_RE.search(self._text, pos)
        return self._end


def _private_key_at(text: str, start: int, ends: _PemEnds) -> Finding | None:
    begin = _PEM_BEGIN_RE.match(text, start)
    if begin is None:
        return None
    body_start = begin.end()
    end = ends.after(body_start)
    if end is not None and end.start() - body_start <= _PEM_MAX:
        body_end, stop = end.start(), end.end()
    else:  # cut off: the key runs as far as its base64 does
        body = _PEM_BODY_RE.match(text, body_start)
        assert body is not None  # (…)* always matches
        body_end = stop = body.end()
    if _BASE64_64_RE.match(text, body_start, body_end) is None:
        # "-----BEGIN … KEY-----\n...\n-----END …" is no key
        return None
    return Finding(start, stop, _ENTITY, "private_key")


# ---- generic key = value ----------------------------------------------------

# Where to look: a secret-sounding word in a name followed by a separator or quote.
_KEYWORDS = ("pass", "pwd", "secret", "token", "key", "auth", "cred")
_IDENT_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_NAME_MAX = 64
_WORD_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|[0-9]+")

_SECRET_WORDS = frozenset(
    (
        "password",
        "passwd",
        "pwd",
        "pass",
        "passphrase",
        "secret",
        "secrets",
        "token",
        "apikey",
        "accesskey",
        "secretkey",
        "privatekey",
        "clientsecret",
        "auth",
        "authorization",
        "bearer",
        "credential",
        "credentials",
        "creds",
    )
)
# "<word> key" names a secret for these words (api key, access key, …); "key" alone
# (a cache key, a sort key, a JSON "key") does not.
_KEY_QUALIFIERS = frozenset(
    (
        "api",
        "access",
        "private",
        "secret",
        "master",
        "encryption",
        "signing",
        "client",
        "app",
        "service",
        "account",
        "auth",
        "session",
        "shared",
        "admin",
        "root",
        "ssh",
        "hmac",
        "jwt",
        "webhook",
        "deploy",
        "subscription",
        "license",
        "x",  # x-api-key, x-key
    )
)
# A name that ends in one of these is about a secret, not the secret: token_count,
# password_hash, auth_url, api_key_id, secret_name, …
_NOT_SECRET_SUFFIXES = frozenset(
    (
        "id",
        "ids",
        "name",
        "names",
        "type",
        "types",
        "count",
        "length",
        "len",
        "limit",
        "limits",
        "url",
        "uri",
        "urls",
        "endpoint",
        "file",
        "path",
        "dir",
        "expiry",
        "expires",
        "expiration",
        "ttl",
        "timeout",
        "usage",
        "format",
        "version",
        "header",
        "prefix",
        "field",
        "env",
        "var",
        "policy",
        "mode",
        "method",
        "scheme",
        "enabled",
        "required",
        "min",
        "max",
        "size",
        "hint",
        "label",
        "prompt",
        "reset",
        "rotation",
        "provider",
        "store",
        "manager",
        "source",
        "location",
        "hash",
        "hashed",
        "digest",
        "kind",
        "param",
        "arg",
        "error",
        "status",
        "regex",
        "pattern",
        "index",
        "start",
        "end",
        "file",
    )
)
_AWS_SECRET_NAME_RE = re.compile(r"(?:aws.{0,20}secret|secret.?access).{0,10}key", re.IGNORECASE)
_AWS_SECRET_VALUE_RE = re.compile(r"[A-Za-z0-9/+]{40}")

# From the end of a name: separator, optional quote, optional auth scheme, value.
# Quotes may come escaped (\") when the text is a JSON string pasted whole.
_SCHEME = r"(?:(?i:bearer|basic|token|bot|apikey)[ \t]{1,4})?"
_ASSIGN_RE = re.compile(
    r"""(?:\\?["'])?[ \t]{0,4}(?::=|=>|[:=])[ \t]{0,4}(?:"""
    r"""(?P<quote>\\?["'`])""" + _SCHEME + r"""(?P<quoted>[^\s"'`\\]{1,1024})(?=\\?["'`])"""
    r"""|""" + _SCHEME + r"""(?P<value>[^\x00-\x20"'`\\,;<>(){}\[\]\x7f-\U0010ffff]{1,1024}))"""
)
_XML_VALUE_RE = re.compile(r">(?P<value>[^\s<>\"']{1,4096})</")
_BEARER_VALUE_RE = re.compile(r"[ \t]{1,4}(?P<value>[A-Za-z0-9._~+/-]{8,4096}=*)")
_PLACEHOLDER_VALUES = frozenset(
    (
        "null",
        "none",
        "nil",
        "true",
        "false",
        "undefined",
        "empty",
        "string",
        "required",
        "optional",
        "secret",
        "password",
    )
)
# Long enough not to turn up in a random value by chance ("key" does, one in 2,000).
_VALUE_SECRET_WORDS = ("password", "passwd", "secret", "token")
_VALUE_WORD_RE = re.compile("|".join(map(re.escape, _PLACEHOLDER_WORDS + _VALUE_SECRET_WORDS)))
# <API_KEY>, [token], {secret}, OPENAI_API_KEY: a name standing in for the value.
_NAMED_PLACEHOLDER_RE = re.compile(
    r"<[^<>]{1,64}>|\[[^\[\]]{1,64}\]|\{[^{}]{1,64}\}|[A-Z][A-Z0-9]*(?:_[A-Z0-9]+)+"
)
_CODE_REF_RE = re.compile(
    r"\$\{|\$\(|%\(|\$[A-Za-z_][A-Za-z0-9_]{0,64}$|%[A-Za-z_][A-Za-z0-9_]{0,64}%$"
    r"|(?:process\.env|os\.environ|env\.|getenv|self\.|this\.)"
    r"|[A-Za-z_$][A-Za-z_$]{0,64}(?:\.[A-Za-z_$][A-Za-z_$]{0,64}){1,8}$"
)


def _words(name: str) -> list[str]:
    return [w.lower() for w in _WORD_RE.findall(name)]


def _secret_name(name: str) -> bool:
    words = _words(name)
    if not words or words[-1] in _NOT_SECRET_SUFFIXES:
        return False
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(a in _KEY_QUALIFIERS and b == "key" for a, b in pairwise(words))


def _generic_value(value: str) -> bool:
    """A value that looks like a secret rather than a word, a number, a placeholder
    or a reference to where the secret lives."""
    n = len(value)
    if n < 8 or value.isdigit():
        return False
    lower = value.lower()
    if lower in _PLACEHOLDER_VALUES or _VALUE_WORD_RE.search(lower) or _typed_run(lower):
        return False
    if _CODE_REF_RE.match(value) or _NAMED_PLACEHOLDER_RE.fullmatch(value):
        return False
    if value.isalpha():  # a word or an identifier unless long and random
        return n >= 16 and _entropy_at_least(value, 3.3)
    return _entropy_at_least(value, min(2.8, math.log2(n) - 0.8))


def _name_start(text: str, end: int) -> int:
    start = end
    while start > 0 and end - start < _NAME_MAX and text[start - 1] in _IDENT_CHARS:
        start -= 1
    return start


_NAME_END_RE = re.compile(f"[A-Za-z0-9_.-]{{0,{_NAME_MAX}}}")  # _IDENT_CHARS


def _name_end(text: str, start: int) -> int:
    m = _NAME_END_RE.match(text, start)
    assert m is not None  # {0,…} always matches
    return m.end()


def _assignment_at(
    text: str, keyword_start: int, names: dict[str, bool]
) -> tuple[Finding | None, int]:
    """The value assigned to the name around a keyword (``db_password`` around
    ``pass``), if the name says secret and the value looks like one; and where the
    value ends (a name inside it is part of it, not a name: ``a=b=c=…`` is looked at
    once, not once a name). ``names`` remembers which names say secret (a text
    assigns the same few names over and over)."""
    start, name_end = _name_start(text, keyword_start), _name_end(text, keyword_start)
    name = text[start:name_end].strip(".-")
    if name.lower() == "key" and text[start - 1 : start] == " ":
        # "API key: …" in prose: the qualifier is the word before.
        before = _name_start(text, start - 1)
        name = text[before : start - 1] + "_" + name
    secret = names.get(name)
    if secret is None:
        secret = names[name] = _secret_name(name)
    if not secret:
        return None, name_end
    if text[start - 1 : start] == "<" and text[name_end : name_end + 1] == ">":
        m = _XML_VALUE_RE.match(text, name_end)
    else:
        m = _ASSIGN_RE.match(text, name_end)
    if m is None:
        return None, name_end
    return _secret_value(m, name), m.end()


def _bearer_at(text: str, start: int) -> Finding | None:
    """``Bearer <token>`` on its own, as in a log line or a curl command."""
    if start and text[start - 1] in _ALNUM:
        return None
    m = _BEARER_VALUE_RE.match(text, start + len("bearer"))
    return None if m is None else _secret_value(m, "bearer")


def _secret_value(m: re.Match[str], name: str) -> Finding | None:
    text = m.string
    group = "quoted" if m.re is _ASSIGN_RE and m.group("quoted") else "value"
    value_start, value_end = m.span(group)
    if group == "value":  # unquoted, the value may end a sentence
        while value_end > value_start and text[value_end - 1] in ".:!?":
            value_end -= 1
    value = text[value_start:value_end]
    if value.startswith(_PREFIXES):  # a provider's token, or a placeholder of one
        return None
    if _AWS_SECRET_NAME_RE.search(name) and _AWS_SECRET_VALUE_RE.fullmatch(value):
        if not _placeholder(value):
            return Finding(value_start, value_end, _ENTITY, "aws_secret_key")
        return None
    if not _generic_value(value):
        return None
    return Finding(value_start, value_end, _ENTITY, "generic_secret")


# ---- passwords in URLs ------------------------------------------------------

_URL_USERINFO_RE = re.compile(
    r"(?P<user>[^\s:/@?#\"'<>]{0,64}):(?P<password>[^\s/?#\"'<>]{1,128})@"
)
_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,30}$")
_URL_PLACEHOLDERS = frozenset(
    (
        "password",
        "passwd",
        "pass",
        "pwd",
        "secret",
        "changeme",
        "admin",
        "root",
        "user",
        "guest",
        "postgres",
        "mysql",
        "redis",
        "test",
        "example",
        "default",
    )
)


def _url_password_at(text: str, pos: int) -> Finding | None:
    """The password of ``scheme://user:password@host``; ``pos`` is at ``://``."""
    if _SCHEME_RE.search(text, max(0, pos - 31), pos) is None:
        return None
    m = _URL_USERINFO_RE.match(text, pos + 3)
    if m is None or not _url_password(m.group("user"), m.group("password")):
        return None
    return Finding(*m.span("password"), _ENTITY, "generic_secret")


def _url_password(user: str, password: str) -> bool:
    lower = password.lower()
    if len(password) < 4 or lower == user.lower() or lower in _URL_PLACEHOLDERS:
        return False
    if _CODE_REF_RE.match(password) or any(c in password for c in "{}<>"):
        return False
    return not _placeholder(password)


# ---- all together -----------------------------------------------------------


# One pass of RE2 (a DFA: linear, and fast on literal alternations, where ``re`` tries
# each alternative at every position) finds where a secret may start; the rules then
# run there only. No groups: the matched text says what was found (a prefix is one of
# the literals; a name starts with a keyword and ends with a separator, ``bearer``
# with a blank), and each group costs RE2's Python wrapper time at every match.
def _longest(prefix: str) -> tuple[int, str]:
    return -len(prefix), prefix


_PEM_PREFIX, _URL_PREFIX = "-----BEGIN ", "://"
_SCAN_PREFIXES = frozenset({*_RULES_BY_PREFIX, _PEM_PREFIX, _URL_PREFIX})
_SCAN = re2.compile(
    # Longest first: RE2 takes the first alternative that matches (sk-ant- before sk-).
    "|".join(re.escape(p) for p in sorted(_SCAN_PREFIXES, key=_longest))
    + "|(?i:"
    + "|".join(_KEYWORDS)
    + r""")[A-Za-z0-9_.-]{0,64}[ \t]{0,4}[=:>"'\\]|(?i:bearer)[ \t]"""
)


def _candidates(text: str) -> Iterator[Finding]:
    # RE2 reports offsets in the UTF-8 of a str and its wrapper maps each back, at a
    # cost per match; in bytes with one byte a character (anything not ASCII made
    # "?", which no pattern of the scan takes) the offsets are the text's own.
    subject = text.encode("ascii", "replace")
    pem_ends = _PemEnds(text)
    names: dict[str, bool] = {}
    value_end = 0
    for m in _SCAN.finditer(subject):
        start, end = m.span()
        matched = text[start:end]
        found: Finding | None
        if matched in _SCAN_PREFIXES:
            if matched == _PEM_PREFIX:
                found = _private_key_at(text, start, pem_ends)
            elif matched == _URL_PREFIX:
                found = _url_password_at(text, start)
            else:
                found = _token_at(text, start, matched)
        elif matched[-1] in " \t":  # "bearer " (a name ends with a separator or quote)
            found = _bearer_at(text, start)
        else:
            if start < value_end:
                continue
            found, value_end = _assignment_at(text, start, names)
        if found is not None:
            yield found


_KIND_RANK = {kind: i for i, kind in enumerate(SECRET_KINDS)}


def find_secrets(text: str) -> Iterator[Finding]:
    """The secrets in ``text``; where two overlap, the longer wins (a token inside a
    private key block), and of two the same, the provider's kind (a generic value
    that is also a provider token)."""
    yield from resolve(list(_candidates(text)), lambda f: _KIND_RANK[f.kind])
