"""PII detectors: linear-time patterns find candidates, code validates them.

Every pattern here is linear: repetitions are bounded, and no two quantified parts
can match the same text. What a pattern cannot say (checksums, numbering plans,
brand prefixes, context words) is checked in code, on candidates only.

Scanning is what costs (Python's regex engine tries a pattern at every position of a
text, ~10 ns a character for a pattern that starts with a class), so the scans are
few: email looks for "@", IPv6 for ":", and the digit finders share one scan for
runs of digits (``_numbers``), done once per text.
"""

from __future__ import annotations

import ipaddress
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from itertools import accumulate

from phonenumbers import COUNTRY_CODE_TO_REGION_CODE, PhoneMetadata

from .findings import Finder, Finding

# What may touch a number on either side without making it part of a longer token.
_WORDY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
_DIGITS = frozenset("0123456789")


def _glued_after(text: str, end: int) -> bool:
    """A letter or digit right after ``end``, or a decimal part or the rest of a time
    (``.5``, ``:30``, ``-X``). A comma is no glue: it separates CSV fields."""
    if end >= len(text):
        return False
    c = text[end]
    if c in _WORDY:
        return True
    if end + 1 >= len(text):
        return False
    after = text[end + 1]
    return (c in ".:" and after in _DIGITS) or (c == "-" and after in _WORDY)


def _decimal_before(text: str, start: int) -> bool:
    """A digit joined to ``start`` by a decimal point (0.4111...)."""
    return start >= 2 and text[start - 1] == "." and text[start - 2] in _DIGITS


# A text's shape: every ASCII letter (and _) made "a", every digit "0". Patterns
# on it find tokens by their shape (runs of digits, a letter pair and two digits)
# with a fast search for a literal instead of trying a character class at each
# position (~3x faster). Made in UTF-8, where the bytes of letters and digits are
# those characters only: str.translate() is slow on text that is not ASCII (55 ms
# a MB against ~3).
_SHAPES = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_", b"0" * 10 + b"a" * 53
)
_SP = "\u00a0\u202f"  # no-break spaces (French writes "01 23 45 67 89" with them)
# Runs of digits and the separators numbers are written with, at least four
# characters from digit to digit.
_NUMBER = re.compile(rf"0[0 {_SP}().\-/]{{2,}}0")


@lru_cache(maxsize=2)
def _shape(text: str) -> str:
    """``text`` with letters made "a" and digits "0". Cached for the last texts:
    every finder of a Detector asks for the same text's shape in turn."""
    return text.encode("utf-8", "surrogatepass").translate(_SHAPES).decode("utf-8", "surrogatepass")


@lru_cache(maxsize=2)
def _numbers(text: str) -> tuple[tuple[int, int], ...]:
    """The runs of digits in ``text`` (start, end), for every digit finder."""
    return tuple([m.span() for m in _NUMBER.finditer(_shape(text))])


def forget_texts() -> None:
    """Drop the texts the caches remember: no prompt outlives its search."""
    _shape.cache_clear()
    _numbers.cache_clear()
    _ibans.cache_clear()


def _near(pattern: re.Pattern[str], text: str, start: int, end: int) -> Iterator[re.Match[str]]:
    """``pattern``'s matches that start in the run ``text[start:end]`` (lookbehinds
    see the text before it, lookaheads two characters after it)."""
    for m in pattern.finditer(text, start, end + 2):
        if m.start() >= end:
            return
        yield m


# --- email ------------------------------------------------------------------------

# Letters, digits and hyphens of a domain label, Unicode letters (IDN) included but
# not CJK (U+2E80 on), which sits next to an address without a space in between.
_L = r"[^\W_\u2e80-\uffff\U00010000-\U0010ffff]"
_DOMAIN = re.compile(
    rf"(?:{_L}(?:(?:{_L}|-){{0,61}}{_L})?\.){{1,8}}"  # labels, each ending at its dot
    r"(?:[^\W\d_\u2e80-\uffff\U00010000-\U0010ffff]{2,63}|xn--[a-z0-9]{1,59})"  # the TLD
    rf"(?!{_L}|[-_]|\.{_L})",  # (text in Japanese may follow without a space)
    re.IGNORECASE,
)
_LOCAL_PUNCT = frozenset("._%+-")
# File names that look like addresses (icon@2x.png): extensions that are no TLD.
# (Not .py and .rs: Paraguay and Serbia.)
_NOT_TLDS = frozenset(
    ("png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "tif", "tiff", "heic", "js",
     "mjs", "ts", "tsx", "jsx", "css", "scss", "json", "yaml", "yml", "toml", "lock", "txt",
     "log", "pdf", "html", "htm", "xml", "csv", "tsv", "rb", "java", "kt", "swift")
)  # fmt: skip


def _local_char(c: str) -> bool:
    if c.isascii():
        return c.isalnum() or c in _LOCAL_PUNCT
    return c.isalpha() and c < "\u2e80"


def find_email(text: str) -> Iterator[Finding]:
    """``local@domain.tld``: a dot-atom local part of at most 64 characters, a domain
    of labels with a TLD of two letters or more (no ``user@localhost``)."""
    at = text.find("@")
    while at != -1:
        start = at
        while start > 0 and at - start <= 64 and _local_char(text[start - 1]):
            start -= 1
        too_long = at - start > 64
        while start < at and text[start] == ".":
            start += 1
        local = text[start:at]
        m = _DOMAIN.match(text, at + 1)
        if (
            m is not None
            and local
            and not too_long
            and not local.endswith(".")
            and ".." not in local
            and m.group().rsplit(".", 1)[1].lower() not in _NOT_TLDS
            # git@github.com:owner/repo is an SSH remote, not an address
            and not (text.startswith(":", m.end()) and _glued_after(text, m.end() + 1))
        ):
            yield Finding(start, m.end(), "email", "email")
            at = text.find("@", m.end())
        else:
            at = text.find("@", at + 1)


# --- phone ------------------------------------------------------------------------

# At most this many groups of digits in a run without other separators: a longer one
# is a table or dump of numbers, and checking each window would cost too much.
_MAX_GROUPS = 24
# What may not come right before a phone number (or its + or parenthesis).
_NOT_BEFORE_PHONE = _WORDY | frozenset("+#@$€£¥%./-")
# What may stand between two groups of digits: ") ", " - ", "/", "-(", ".", ...
_SEP = re.compile(rf"\)?(?:[ {_SP}]?[-/][ {_SP}]?|\.|[ {_SP}])?\(?")
_EXTENSION = re.compile(r"[ ]?(?:x|ext\.?[ ]?)[0-9]{1,6}(?![0-9A-Za-z])", re.IGNORECASE)
_EXTENSION_FIRST = frozenset(" xXeE")
# 4-4-4, 4-4-4-1..4 and 4-4-4-4-1..3 with one separator: what _phone_run rejects as a
# card's grouping, found without taking the run apart.
_CARD_RUN = re.compile(r"[0-9]{4}([ -])[0-9]{4}\1[0-9]{4}(?:\1[0-9]{4}\1[0-9]{1,3}|\1[0-9]{1,4})?")


# A letter or digit right after a run (not one that may start an extension: x, ext),
# or before it (not a +, which makes the character before it the one that counts).
_GLUED = _WORDY - frozenset("xXeE")
_BUTTED = _NOT_BEFORE_PHONE - frozenset("+")
_POINTS = frozenset(".:")
# A run's groups of digits and what separates them: [group, sep, group, ...].
_PARTS = re.compile(r"([^0-9]+)")
# Runs in which no window of a phone number's length leaves out three groups that
# say it is none: 3-2-4 with one separator twice (as _window says), or one date
# (as _is_date says: 2024-01-15, 15.01.2024, 1/15/24).
_DAY = r"(?:0?[1-9]|[12][0-9]|3[01])"
_MONTH = r"(?:0?[1-9]|1[0-2])"
_NO_WINDOW = re.compile(
    r"[0-9]{3}([^0-9]+)[0-9]{2}\1[0-9]{4}"
    r"|[0-9]{4}([-./])(?:0[1-9]|1[0-2])\2(?:0[1-9]|[12][0-9]|3[01])"
    rf"|{_DAY}([-./]){_MONTH}\3(?:[0-9]{{4}}|[0-9]{{2}})"
    rf"|{_MONTH}([-./]){_DAY}\4(?:[0-9]{{4}}|[0-9]{{2}})"
)
# Runs _phone_run rejects whole when no + comes before them: a card's or account's
# groups of four (_CARD_RUN), two groups joined by a point (a decimal).
_NOT_PHONE_RUN = re.compile(rf"{_CARD_RUN.pattern}|[0-9]+\.[0-9]+")


@lru_cache(maxsize=256)
def _joins(sep: str) -> bool:
    """Whether ``sep`` may stand between two groups of one phone number."""
    return _SEP.fullmatch(sep) is not None


def _extension_end(text: str, end: int) -> int:
    """Where an extension written after ``end`` (x123, ext. 45) ends, else ``end``."""
    if text[end : end + 1] not in _EXTENSION_FIRST or end >= len(text):
        return end
    m = _EXTENSION.match(text, end)
    return end if m is None else m.end()


# Words that say a number is a phone number, in the languages of the regions we
# validate: whole words, beginnings of words, and (for scripts without spaces
# between words) parts of words. Lower case.
_PHONE_WORDS = frozenset(
    ("tel", "ph", "mob", "fax", "sms", "cell", "call", "dial", "ring", "text", "bel", "tél")
)
_PHONE_PREFIXES = (
    "phone", "telef", "teléf", "télé", "telep", "mobil", "móvil", "movil", "celular",
    "cellul", "calling", "called", "calls", "whatsapp", "contact", "kontakt", "reach",
    "landline", "hotline", "handy", "ruf", "anruf", "numéro", "portable", "chiam",
    "llam", "llám", "appel", "ligue", "ligar", "bellen", "mobiel", "faxnummer", "dial",
)  # fmt: skip
_PHONE_PARTS = ("電話", "携帯", "連絡", "tel", "फ़ोन", "फोन", "मोबाइल", "संपर्क", "कॉल")
# Words that say a number is something else: an order, an invoice, a version.
_NUMBER_WORDS = frozenset(
    ("id", "ref", "inv", "po", "case", "part", "ver", "v", "sku", "txn", "oid",
     "acct", "isbn", "build", "serial", "item", "art", "zip", "plz", "cep", "ts", "exp",
     "iat", "nbf", "epoch", "unix")
)  # fmt: skip
_NUMBER_PREFIXES = (
    "order", "invoice", "ticket", "tracking", "reference", "account", "serial",
    "confirmation", "booking", "transaction", "version", "release", "bestell", "rechnung",
    "kundennummer", "commande", "facture", "pedido", "factura", "ordine", "fattura",
    "bestelling", "factuur", "isbn", "postcode", "postal", "timestamp", "expires",
    "created", "updated",
)  # fmt: skip
_NUMBER_PARTS = ("注文", "請求", "オーダー", "ऑर्डर")
_WORD = re.compile(r"[^\W_]+")
# Where the context of a value ends: its line, its CSV field, its clause.
_FIELD_END = re.compile(r"[\n,;|\t。、]")


@lru_cache(maxsize=4096)
def _word_kind(word: str) -> int:
    """1 for a word for phone, -1 for a word for another number, else 0."""
    if word in _PHONE_WORDS or word.startswith(_PHONE_PREFIXES):
        return 1
    if word in _NUMBER_WORDS or word.startswith(_NUMBER_PREFIXES):
        return -1
    if not word.isascii():
        if any(p in word for p in _PHONE_PARTS):
            return 1
        if any(p in word for p in _NUMBER_PARTS):
            return -1
    return 0


# National prefixes people commonly leave out (Indian mobiles: 98765 43210).
_PREFIX_OPTIONAL = frozenset(("IN",))
_TYPES = (
    "premium_rate",
    "toll_free",
    "shared_cost",
    "voip",
    "personal_number",
    "pager",
    "uan",
    "voicemail",
    "fixed_line",
    "mobile",
)


@dataclass(frozen=True, slots=True)
class _Desc:
    """One number type of a plan: its lengths and its pattern."""

    lengths: frozenset[int]
    pattern: re.Pattern[str]

    def matches(self, nsn: str) -> bool:
        return (not self.lengths or len(nsn) in self.lengths) and bool(self.pattern.fullmatch(nsn))


@dataclass(frozen=True, slots=True)
class _Plan:
    """One region's numbering plan from phonenumbers' metadata, compiled. ``valid``
    and ``strip`` do what ``phonenumbers.parse`` and ``is_valid_number`` do, without
    the parsing and objects around them (about 40 µs a number)."""

    region: str
    country_code: str
    general: re.Pattern[str]
    lengths: tuple[int, ...]  # sorted
    local_lengths: frozenset[int]
    types: tuple[_Desc, ...]
    # By length: the patterns of the types a number of that length may be, as one
    typed: dict[int, re.Pattern[str]]
    prefix: str | None
    prefix_for_parsing: re.Pattern[str] | None
    transform: str | None
    leading_digits: re.Pattern[str] | None
    # (leading digits, pattern, whether its national format writes the prefix)
    formats: tuple[tuple[re.Pattern[str] | None, re.Pattern[str], bool], ...]

    def valid(self, nsn: str) -> bool:
        typed = self.typed.get(len(nsn))  # (None: not a length of this plan)
        if typed is None or not self.general.fullmatch(nsn):
            return False
        return typed.fullmatch(nsn) is not None

    def _length_ok(self, nsn: str) -> bool:
        """Not too short, local-only or of an invalid length (too long is allowed)."""
        n = len(nsn)
        if n in self.local_lengths or n < self.lengths[0]:
            return False
        return n > self.lengths[-1] or n in self.lengths

    def _strip_prefix(self, number: str) -> str:
        if self.prefix_for_parsing is None or not number:
            return number
        m = self.prefix_for_parsing.match(number)
        if m is None:
            return number
        groups = m.groups()
        if not self.transform or not groups or groups[-1] is None:
            stripped = number[m.end() :]
        else:
            stripped = self.prefix_for_parsing.sub(self.transform, number, count=1)
        if self.general.fullmatch(number) and not self.general.fullmatch(stripped):
            return number
        return stripped

    def strip(self, number: str) -> str:
        """The national significant number of a number dialled in this region."""
        stripped = self._strip_prefix(number)
        return stripped if self._length_ok(stripped) else number

    def national(self, digits: str) -> tuple[str, bool]:
        """The national significant number of ``digits`` written nationally, and
        whether they start with the national prefix or the country code (as
        phonenumbers reads 1 415 555 2671 in the US)."""
        cc = self.country_code
        if digits.startswith(cc):
            rest = self._strip_prefix(digits[len(cc) :])
            too_long = len(digits) > self.lengths[-1]
            if (not self.general.fullmatch(digits) and self.general.fullmatch(rest)) or too_long:
                return self.strip(rest), True
        nsn = self.strip(digits)
        return nsn, nsn != digits

    def writes_prefix(self, nsn: str) -> bool:
        """Whether this region's national format of ``nsn`` starts with its prefix."""
        for leading, pattern, with_prefix in self.formats:
            if (leading is None or leading.match(nsn)) and pattern.fullmatch(nsn):
                return with_prefix
        return False


def _compile_desc(desc: object) -> _Desc | None:
    pattern = getattr(desc, "national_number_pattern", None)
    if not pattern:
        return None
    lengths = frozenset(n for n in getattr(desc, "possible_length", ()) if n > 0)
    return _Desc(lengths, re.compile(pattern))


def _typed(types: Sequence[_Desc], n: int) -> re.Pattern[str]:
    """One pattern for the types a number of ``n`` digits may be: it matches a whole
    number if one of theirs does."""
    patterns = [t.pattern.pattern for t in types if not t.lengths or n in t.lengths]
    return re.compile("|".join(f"(?:{p})" for p in patterns) or "(?!)")


@cache
def _plan(region: str, country_code: int = 0) -> _Plan | None:
    """A region's plan; for "001" (Inmarsat, UIFN, ...) that of ``country_code``."""
    if region == "001":
        meta = PhoneMetadata.metadata_for_nongeo_region(country_code)
    else:
        meta = PhoneMetadata.metadata_for_region(region)
    if meta is None:
        return None
    general = meta.general_desc
    if general is None:
        return None
    types = tuple(d for d in (_compile_desc(getattr(meta, t)) for t in _TYPES) if d is not None)
    prefix = meta.national_prefix
    formats = []
    for f in meta.number_format:
        leading = re.compile(f.leading_digits_pattern[-1]) if f.leading_digits_pattern else None
        rule = f.national_prefix_formatting_rule or ""
        with_prefix = prefix is not None and prefix != "" and prefix in rule.split("\\1")[0]
        formats.append((leading, re.compile(f.pattern or "(?!)"), with_prefix))
    return _Plan(
        region=region,
        country_code=str(meta.country_code),
        general=re.compile(general.national_number_pattern or "(?!)"),
        lengths=tuple(sorted(general.possible_length)),
        local_lengths=frozenset(general.possible_length_local_only),
        types=types,
        typed={n: _typed(types, n) for n in general.possible_length},
        prefix=prefix,
        prefix_for_parsing=(
            re.compile(meta.national_prefix_for_parsing)
            if meta.national_prefix_for_parsing
            else None
        ),
        transform=meta.national_prefix_transform_rule,
        leading_digits=re.compile(meta.leading_digits) if meta.leading_digits else None,
        formats=tuple(formats),
    )


@cache
def _country(country_code: int) -> tuple[tuple[_Plan, ...], frozenset[int]]:
    """The plans of a country code's regions, and every length they allow."""
    regions = COUNTRY_CODE_TO_REGION_CODE.get(country_code, ())
    plans = tuple(p for p in (_plan(r, country_code) for r in regions) if p is not None)
    return plans, frozenset(n for p in plans for n in p.lengths)


def _valid_for_country(country_code: int, nsn: str) -> bool:
    """``is_valid_number``: the region of a shared country code is the first whose
    leading digits match, else the first whose plan has the number."""
    plans, lengths = _country(country_code)
    if len(nsn) not in lengths:
        return False
    for plan in plans:
        if plan.leading_digits is not None:
            if plan.leading_digits.match(nsn):
                return plan.valid(nsn)
        elif plan.valid(nsn):
            return True
    return False


@lru_cache(maxsize=4096)
def _valid_international(digits: str) -> bool:
    """``+digits``: a country code (they are prefix-free) and a valid number. Cached:
    a chat sends its history again with every turn, and the numbers in it."""
    for n in (1, 2, 3):
        cc = int(digits[:n])
        plans, _ = _country(cc)
        if plans:
            nsn = plans[0].strip(digits[n:])
            return _valid_for_country(cc, nsn)
    return False


_DATE_SEPS = frozenset("-./")


def _is_date(groups: Sequence[str]) -> bool:
    """2024-01-15, 15.01.2024, 01/15/2024, 15/01/24 and the like."""
    g0, g1, g2 = groups
    a, b, c = len(g0), len(g1), len(g2)
    if a == 4 and b == 2 and c == 2:
        return 1 <= int(g1) <= 12 and 1 <= int(g2) <= 31
    if a <= 2 and b <= 2 and c in (2, 4):
        x, y = int(g0), int(g1)
        return (1 <= x <= 31 and 1 <= y <= 12) or (1 <= x <= 12 and 1 <= y <= 31)
    return False


def _has_date(groups: Sequence[str], seps: Sequence[str]) -> bool:
    """Whether three groups in a row are a date (see ``dates`` in _segment)."""
    return any(
        seps[k] == seps[k + 1] and seps[k] in _DATE_SEPS and _is_date(groups[k : k + 3])
        for k in range(len(groups) - 2)
    )


def _thousands(groups: Sequence[str]) -> bool:
    return len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:])


class _PhoneFinder:
    """Phone numbers: international (``+``/``00``) ones of any country, national ones
    of ``regions`` when written like phone numbers or next to a word for phone. All
    are valid by phonenumbers' metadata."""

    def __init__(self, regions: Sequence[str]) -> None:
        plans = [_plan(r.upper()) for r in regions]
        unknown = [r for r, p in zip(regions, plans, strict=True) if p is None]
        if unknown:
            raise ValueError(f"unknown phone regions: {', '.join(unknown)}")
        self._plans = tuple(p for p in plans if p is not None)
        self._national = lru_cache(maxsize=4096)(self._national_uncached)
        self._tables: dict[tuple[int, str, int], tuple[int, list[str]]] = {}

    def __call__(self, text: str) -> Iterator[Finding]:
        self._tables = {}  # this text's table headers, by line (see _column_header)
        found: list[Finding] = []
        run = self._run
        try:
            for start, end in _numbers(text):
                # What _run rejects first, without a call: most runs of dense text.
                if end - start < 7 or text[start - 1 : start] in _BUTTED:
                    continue
                after = text[end : end + 1]
                if after in _GLUED or (after in _POINTS and text[end + 1 : end + 2] in _DIGITS):
                    continue  # (12:30, 1.5: what _glued_after says without an extension)
                run(text, start, end, found)
        finally:
            self._tables = {}
        return iter(found)

    def _run(self, text: str, start: int, end: int, found: list[Finding]) -> None:
        """The phone numbers in the run of digits ``text[start:end]``, appended to
        ``found``. Most runs are rejected whole here, before they are taken apart."""
        after = _extension_end(text, end) if text[end : end + 1] in _EXTENSION_FIRST else end
        if _glued_after(text, after):
            return
        lead = start
        if start > 0 and text[start - 1] in "+(":
            lead = start - 1
            if lead > 0 and text[lead - 1] in _NOT_BEFORE_PHONE:
                return
        # (else the character before is no _BUTTED one: __call__ looked)
        if (
            text[start - 6 : start - 5] == " "
            and _letters_group(text[start - 6 : start])
            and _in_iban(text, start)
        ):
            return  # the rest of an IBAN (NL91 ABNA 0417 1643 00)
        run = text[start:end]
        if run.isdigit():  # (no separators: most runs)
            self._bare(text, lead, start, end, after, run, found)
            return
        if _NO_WINDOW.fullmatch(run):
            return
        if text[lead] != "+" and _NOT_PHONE_RUN.fullmatch(run):
            return  # a card or account number in groups of four, a decimal
        parts = _PARTS.split(run)
        groups, seps = parts[::2], parts[1::2]
        if end - start - sum(map(len, seps)) < 7:
            return  # too few digits for any window
        starts = list(accumulate(map(len, parts), initial=start))[::2]
        if all(map(_joins, seps)):  # (most runs: one segment)
            self._segment(text, lead, starts, groups, seps, found)
            return
        # Segments of groups joined the way phone numbers are ("030 / 1234567", not
        # "1234567. 12"); the first one may start with the + or parenthesis.
        lo = 0
        for k, sep in enumerate(seps):
            if not _joins(sep):
                self._segment(text, lead, starts[lo : k + 1], groups[lo : k + 1], seps[lo:k], found)
                lo, lead = k + 1, starts[k + 1]
        self._segment(text, lead, starts[lo:], groups[lo:], seps[lo:], found)

    def _bare(
        self, text: str, lead: int, start: int, end: int, after: int, run: str, found: list[Finding]
    ) -> None:
        """A run of digits alone (what _segment and _window say of one group)."""
        n = end - start
        if n > 17:
            return  # too many digits for any window
        if text[lead] == "+":
            if _valid_international(run):
                found.append(Finding(lead, after, "phone", "phone"))
            return
        if n >= 12 and _card_brand_ok(run) and _luhn(run):
            return  # a card number
        if run.startswith("00"):
            if not _valid_international(run[2:]):
                return
            if self._context(text, start, after) is not False:
                found.append(Finding(start, after, "phone", "phone"))
            return
        # One group is no format: a word for phone must say it is one.
        if self._context(text, start, after) is True and self._national(run):
            found.append(Finding(start, after, "phone", "phone"))

    def _segment(
        self,
        text: str,
        lead: int,
        starts: Sequence[int],
        groups: Sequence[str],
        seps: Sequence[str],
        found: list[Finding],
    ) -> None:
        if len(groups) > _MAX_GROUPS:
            return  # a table of numbers, not phone numbers in text (and bounded work)
        lengths = list(map(len, groups))
        total = sum(lengths)
        if total < 7:
            return  # too few digits for any window
        plus = text[lead] == "+"
        if total > 17 and len(groups) == 1:
            return  # too many digits for any window
        if not plus and not _phone_run(groups, lengths, seps):
            return
        dotted = bool(seps) and seps.count(".") == len(seps)
        loose = list(map(_loose, seps))
        if not any(loose):
            # The one window a number may end at: the whole segment (in dotted runs,
            # or of at most the eight groups a window may have).
            if total <= 17 and (dotted or len(groups) <= 8) and not _has_date(groups, seps):
                end = starts[-1] + lengths[-1]
                window = self._window(text, lead, starts[0], end, groups, seps)
                if window is not None:
                    found.append(window)
            return
        # Several numbers in one run (030 1234567 / 030 7654321): from each group on,
        # the longest valid window, one without a spaced slash inside if there is one,
        # ending at a space or slash. Not in dotted runs (192.168.0.1, 1.2.840.113549).
        count = len(groups)
        slashed = [" / " in s for s in seps] if any(" / " in s for s in seps) else None
        dates = None  # dates[k]: groups k, k+1 and k+2 are a date (2024-01-15, 15.01.2024)
        if any(s in _DATE_SEPS for s in seps):
            dates = [
                seps[k] == seps[k + 1] and seps[k] in _DATE_SEPS and _is_date(groups[k : k + 3])
                for k in range(count - 2)
            ]
        reach = list(accumulate(lengths, initial=0))  # reach[i]: the digits of groups[:i]
        lo = 0
        while lo < count:
            if lo > 0 and not loose[lo - 1]:
                lo += 1
                continue
            # The windows from lo of 7 to 17 digits and at most eight groups, longest first.
            top = min(count, lo + 8, bisect_right(reach, reach[lo] + 17) - 1)
            bottom = max(lo + 1, bisect_left(reach, reach[lo] + 7))
            his: Sequence[int] = range(top, bottom - 1, -1)
            if slashed is not None and any(slashed[lo : lo + 8]):
                his = sorted(his, key=lambda hi: sum(slashed[lo : hi - 1]))
            for hi in his:
                if hi < count and not loose[hi - 1]:
                    continue
                if dates is not None and any(dates[lo : hi - 2]):
                    continue  # 2024-01-15, 2023-02-06 19 (:47)
                s0 = lead if lo == 0 else starts[lo]
                e0 = starts[hi - 1] + lengths[hi - 1]
                window = self._window(text, s0, starts[lo], e0, groups[lo:hi], seps[lo : hi - 1])
                if window is not None:
                    found.append(window)
                    lo = hi
                    break
            else:
                lo += 1

    def _window(
        self,
        text: str,
        lead: int,
        start: int,
        end: int,
        groups: Sequence[str],
        seps: Sequence[str],
    ) -> Finding | None:
        """Whether ``groups`` (from ``lead``, a + or parenthesis before the first
        group if there is one, no date among them) is a phone number. The checks
        that need no context come first: the words around a number cost the most."""
        shape = [len(g) for g in groups]
        if len(groups) == 3 and shape == [3, 2, 4] and seps[0] == seps[1]:
            return None  # written like a social security number
        plus = text[lead] == "+"
        if plus or (text[lead] == "(" and seps and seps[0].startswith(")")):
            start = lead  # +49 30..., (415) 555-2671: the area code's parenthesis
        end = _extension_end(text, end)
        digits = "".join(groups)
        if plus:  # (a + says phone louder than any word before it)
            return Finding(start, end, "phone", "phone") if _valid_international(digits) else None
        if digits.startswith("00"):
            if not _valid_international(digits[2:]):
                return None
            word = self._context(text, start, end)
        else:
            if _not_national(shape, seps):
                return None
            needs_word = len(digits) <= 7 or not _formatted(groups, seps)
            word = self._context(text, start, end)
            if word is False or (needs_word and not word) or not self._national(digits):
                return None
        return None if word is False else Finding(start, end, "phone", "phone")

    def _national_uncached(self, digits: str) -> bool:
        for plan in self._plans:
            nsn, had_prefix = plan.national(digits)
            if not _valid_for_country(int(plan.country_code), nsn):
                continue
            if had_prefix or plan.region in _PREFIX_OPTIONAL or not plan.writes_prefix(nsn):
                return True
        return False

    def _context(self, text: str, start: int, end: int) -> bool | None:
        """True after a word for phone, False after a word for another number (order,
        invoice, version) nearer than any for phone, or after a number sign; None
        without either."""
        before = _FIELD_END.split(text[max(0, start - 48) : start])[-1].lower()
        if before.rstrip().endswith(("#", "№", "nº", "n°")):
            return False
        # The nearest word decides; Devanagari and CJK words are looked for as parts
        # (\w does not match Devanagari vowel signs, CJK needs no spaces).
        if before.isascii():
            for word in reversed(_WORD.findall(before)):
                kind = _word_kind(word)
                if kind:
                    return kind > 0
        else:
            phone = other = -1
            for m in _WORD.finditer(before):
                kind = _word_kind(m.group())
                if kind > 0:
                    phone = m.end()
                elif kind < 0:
                    other = m.end()
            phone = max(phone, *(before.rfind(p) for p in _PHONE_PARTS))
            if phone != other:
                return phone > other
        # A table's cell: its column's name decides.
        header = _column_header(text, start, self._tables)
        if header is not None:
            kinds = [_word_kind(m.group()) for m in _WORD.finditer(header.lower())]
            if any(kinds):
                return max(kinds) > 0
        # Hindi and Japanese put the verb after the number (मुझे ... पर कॉल करें).
        after = _FIELD_END.split(text[end : end + 24], 1)[0]
        if not after.isascii() and any(p in after for p in _PHONE_PARTS):
            return True
        return None


_CELL_SEPS = (",", "\t", ";", "|")
_HEADER_REACH = 8192  # how far back a table's first line is looked for


def _column_header(
    text: str, start: int, tables: dict[tuple[int, str, int], tuple[int, list[str]]]
) -> str | None:
    """The name of the column of the table cell at ``start`` (CSV, TSV): that cell
    of the first line, at most _HEADER_REACH back, of the block of lines with as
    many cells as this one. ``tables`` remembers, by (line start, separator,
    width), where each line's block starts and its first line's cells, so a long
    table is walked up once, not once a row; the answer is the same either way."""
    line_start = text.rfind("\n", 0, start) + 1
    line_end = text.find("\n", start)
    line = text[line_start : len(text) if line_end < 0 else line_end]
    for sep in _CELL_SEPS:
        if sep in line:
            break
    else:
        return None
    if '"' in line:
        width = len(_cells(line, sep))
        column = len(_cells(text[line_start:start], sep)) - 1
    else:  # (what _cells would say, counted)
        width = line.count(sep) + 1
        column = text.count(sep, line_start, start)
    walked: list[int] = []  # lines above of the same width, nearest first
    header: list[str] | None = None
    top = -1  # where the block starts, once known
    at, floor = line_start, max(0, start - _HEADER_REACH)
    while at > floor:
        above = text.rfind("\n", floor, at - 1) + 1
        known = tables.get((above, sep, width))
        if known is not None and known[0] >= floor:
            top, header = known
            break
        cells = _cells(text[above : at - 1], sep)
        if len(cells) != width:
            top = at if walked else -1
            break
        walked.append(above)
        header, at = cells, above
    else:
        top = at if at == 0 and walked else -1  # the text starts with the table
    if top >= 0 and header is not None:
        for line_at in walked:
            tables[line_at, sep, width] = (top, header)
    return header[column] if header is not None else None


def _cells(line: str, sep: str) -> list[str]:
    """A line's cells; a separator inside double quotes does not split."""
    if '"' not in line:
        return line.split(sep)
    # Between the quotes: the pieces at odd places of a split at every quote.
    cells = [""]
    for i, piece in enumerate(line.split('"')):
        if i:
            cells[-1] += '"'
        if i % 2:
            cells[-1] += piece
        else:
            first, *rest = piece.split(sep)
            cells[-1] += first
            cells += rest
    return cells


def _phone_run(groups: Sequence[str], lengths: Sequence[int], seps: Sequence[str]) -> bool:
    """Whether a run of digits may hold phone numbers at all: not a card number,
    not a dotted address, OID or version (1.2.840.113549, 10.0.19041.1)."""
    digits = "".join(groups)
    card = 12 <= len(digits) <= 19 and len(set(seps)) <= 1 and _card_grouping(lengths)
    if card and len(lengths) > 2 and all(n == 4 for n in lengths[:-1]):
        return False  # a card or account number in groups of four
    if card and _card_brand_ok(digits) and _luhn(digits):
        return False
    if seps and all(s == "." for s in seps):
        if len(groups) == 2 or (len(groups) == 4 and all(n <= 3 for n in lengths)):
            return False
        if any(n == 1 for n in lengths[1:]) or (lengths[0] == 1 and len(groups) >= 5):
            return False
    return True


@lru_cache(maxsize=256)
def _loose(sep: str) -> bool:
    """A separator that may end a phone number: a space or a slash, not 1-2 or 1.2."""
    return " " in sep or "/" in sep or "\u00a0" in sep or "\u202f" in sep


def _not_national(shape: Sequence[int], seps: Sequence[str]) -> bool:
    """Groupings no national phone number is written in: a lone pair of digits at the
    end (5733-0613-34, not 01 23 45 67 89), ZIP+4 and Brazilian postcodes."""
    if len(shape) >= 2 and shape[-1] == 2 and shape[-2] != 2:
        return True
    return len(shape) == 2 and seps[0] == "-" and shape[0] == 5 and shape[1] in (3, 4)


def _formatted(groups: Sequence[str], seps: Sequence[str]) -> bool:
    """Written the way phone numbers are: an area code in parentheses, or groups of
    two digits or more (a lone leading trunk digit aside), not amounts like 1.234.567."""
    if len(groups) < 2:
        return False
    if any(len(g) == 1 for g in groups[1:]):
        return False
    return not (all(s == "." for s in seps) and _thousands(groups))


def phone_finder(regions: Sequence[str]) -> Finder:
    return _PhoneFinder(regions)


# --- credit cards -----------------------------------------------------------------


def _span(lo: str, hi: str, lengths: Sequence[int]) -> tuple[str, str, frozenset[int]]:
    return lo, hi, frozenset(lengths)


_16_19 = range(16, 20)
# Issuer identification number ranges (first digits, inclusive) and card lengths.
_IIN = (
    _span("4", "4", (13, 16, 19)),  # Visa
    _span("51", "55", (16,)),  # Mastercard
    _span("2221", "2720", (16,)),  # Mastercard 2-series
    _span("34", "34", (15,)),  # American Express
    _span("37", "37", (15,)),
    _span("6011", "6011", _16_19),  # Discover
    _span("644", "649", _16_19),
    _span("65", "65", _16_19),
    _span("622126", "622925", _16_19),
    _span("3528", "3589", _16_19),  # JCB (and 35xx below)
    _span("2131", "2131", (15,)),
    _span("1800", "1800", (15,)),
    _span("300", "305", range(14, 20)),  # Diners Club
    _span("3095", "3095", range(14, 20)),
    _span("36", "36", range(14, 20)),
    _span("38", "39", range(14, 20)),
    _span("62", "62", _16_19),  # UnionPay
    _span("81", "81", _16_19),
    _span("50", "50", range(12, 20)),  # Maestro
    _span("56", "69", range(12, 20)),
    _span("2200", "2204", _16_19),  # Mir
    _span("60", "60", (16,)),  # RuPay (65 and 81 are above)
    _span("82", "82", (16,)),
    _span("508", "508", (16,)),
    _span("353", "353", (16,)),
    _span("356", "356", (16,)),
    _span("2205", "2205", (16,)),  # BORICA
    _span("1", "1", (15,)),  # UATP
    _span("0604", "0604", range(12, 20)),  # Maestro (an old range, still in tables)
    # The rest of 35xx for 16 to 19 digits: unassigned or JCB co-brands, and what
    # test-card generators (Faker) write for JCB; a Luhn-valid 35... is a card.
    _span("35", "35", _16_19),
    _span("9792", "9792", (16,)),  # Troy
)
_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


_DOUBLE = str.maketrans("0123456789", "".join(map(str, _DOUBLED)))


def _luhn(digits: str) -> bool:
    total = sum(map(int, digits[-1::-2])) + sum(map(int, digits[-2::-2].translate(_DOUBLE)))
    return total % 10 == 0


def _brand_heads() -> dict[int, tuple[tuple[int, frozenset[str]], ...]]:
    """By card length, the issuer ranges as sets of leading digits, by how many."""
    heads: dict[tuple[int, int], set[str]] = {}
    for lo, hi, lengths in _IIN:
        for n in lengths:
            size = len(lo)
            heads.setdefault((n, size), set()).update(
                str(i).zfill(size) for i in range(int(lo), int(hi) + 1)
            )
    by_length: dict[int, list[tuple[int, frozenset[str]]]] = {}
    for (n, size), values in sorted(heads.items()):
        by_length.setdefault(n, []).append((size, frozenset(values)))
    return {n: tuple(v) for n, v in by_length.items()}


_BRAND_HEADS = _brand_heads()


def _card_brand_ok(digits: str) -> bool:
    # (the lengths are 12 to 19 digits: each range's leading digits are all there)
    return any(digits[:size] in heads for size, heads in _BRAND_HEADS.get(len(digits), ()))


def _card_grouping(lengths: Sequence[int]) -> bool:
    """4-4-4-4 (and 4-4-4-1..4, 4-4-4-4-1..3), Amex 4-6-5, Diners 4-6-4, or none."""
    if len(lengths) == 1:
        return True
    if len(lengths) >= 3 and all(n == 4 for n in lengths[:-1]) and 1 <= lengths[-1] <= 4:
        return True
    return tuple(lengths) in ((4, 6, 5), (4, 6, 4))


def find_credit_card(text: str) -> Iterator[Finding]:
    """Card numbers of a known brand and length that pass the Luhn check, written
    without separators or in one separator's usual groups."""
    for start, end in _numbers(text):
        if end - start < 12 or text[end : end + 1] in _WORDY or text[start - 1 : start] in _WORDY:
            continue  # (a letter or digit either side: what the calls below say first)
        if _glued_after(text, end) or _decimal_before(text, start):
            continue
        if end - start - text.count(" ", start, end) - text.count("-", start, end) < 12:
            continue  # too few digits
        if _joined_before(text, start):
            continue  # the digits of a token (xoxb-8680200964-...)
        if (
            text[start - 6 : start - 5] == " "
            and _letters_group(text[start - 6 : start])
            and _in_iban(text, start)
        ):
            continue  # the rest of an IBAN (GB88 MIBG 5028 6203 0020 13)
        run = text[start:end]
        if run.isdigit():  # one group: the whole run or nothing
            if end - start <= 19 and _card_brand_ok(run) and _luhn(run):
                yield Finding(start, end, "credit_card", "credit_card")
            continue
        whole = _CARD_RUN.fullmatch(run)
        if whole is not None:
            digits = run.replace(whole[1], "")
            if _card_brand_ok(digits) and _luhn(digits):  # (the first window tried below)
                yield Finding(start, end, "credit_card", "credit_card")
                continue
        parts = _PARTS.split(run)
        groups, seps = parts[::2], parts[1::2]
        lengths = [len(g) for g in groups]
        # A card is one group of 12 to 19 digits or groups starting with one of four.
        if 4 not in lengths and not any(12 <= n <= 19 for n in lengths):
            continue
        starts = [start]
        for n, sep in zip(lengths, seps, strict=False):
            starts.append(starts[-1] + n + len(sep))
        lo = 0
        while lo < len(groups):
            if lengths[lo] != 4 and not 12 <= lengths[lo] <= 19:
                lo += 1
                continue
            for hi in range(min(len(groups), lo + 5), lo, -1):
                if 12 <= sum(lengths[lo:hi]) <= 19 and _card_window(groups, seps, lo, hi):
                    last = starts[hi - 1] + lengths[hi - 1]
                    yield Finding(starts[lo], last, "credit_card", "credit_card")
                    lo = hi
                    break
            else:
                lo += 1


def _joined_before(text: str, start: int) -> bool:
    """A letter or digit joined to ``start`` by a hyphen, dot or slash."""
    return start >= 2 and text[start - 1] in "-./" and text[start - 2] in _WORDY


def _card_window(groups: Sequence[str], seps: Sequence[str], lo: int, hi: int) -> bool:
    """Whether ``groups[lo:hi]`` is a card number: one separator, a card's grouping,
    not the middle of a longer grouping (5994 8928 0405 7650 is no card's 5994 8928
    0405) or of a number joined by hyphens or decimal points; brand, Luhn."""
    inner = set(seps[lo : hi - 1])
    if len(inner) > 1 or not inner <= {" ", "-"}:
        return False
    lengths = [len(g) for g in groups[lo:hi]]
    if not _card_grouping(lengths):
        return False
    before = seps[lo - 1] if lo > 0 else None
    after = seps[hi - 1] if hi < len(groups) else None
    if before in (".", "-") or after in (".", "-"):
        return False
    grouped = len(lengths) > 1
    if grouped and inner == {before} and len(groups[lo - 1]) == 4:
        return False
    if grouped and inner == {after} and len(groups[hi]) == 4:
        return False
    digits = "".join(groups[lo:hi])
    return _card_brand_ok(digits) and _luhn(digits)


# --- IBAN -------------------------------------------------------------------------

# Lengths by country, from the SWIFT IBAN registry (release 2024).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24,
    "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18,
    "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20,
    "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20,
    "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25,
    "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30,
}  # fmt: skip
# A country code and check digits starting a token (GB82WEST...; GB82 WEST ...), in
# the text's shape: two letters and two digits after no letter or digit.
_IBAN_HEAD = re.compile(r"aa00(?<![a0]aa00)")
_IBAN_RUN = re.compile(r"[A-Za-z]{2}[0-9]{2}(?:[ ]?[A-Za-z0-9]){11,30}")


# Letters as the numbers mod 97 counts them (A = 10, ..., Z = 35).
_IBAN_LETTERS = str.maketrans({c: str(int(c, 36)) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"})


def _mod97(iban: str) -> int:
    return int((iban[4:] + iban[:4]).translate(_IBAN_LETTERS)) % 97


def find_iban(text: str) -> Iterator[Finding]:
    """IBANs of registry countries, of their country's length, checksum valid (mod 97),
    compact or in groups of four; upper or lower case, not mixed."""
    done = 0
    for found, valid in _ibans(text):
        if valid and found.start >= done:
            done = found.end
            yield found


@lru_cache(maxsize=2)
def _ibans(text: str) -> tuple[tuple[Finding, bool], ...]:
    """What is written like an IBAN in ``text`` (a registry country's length, in
    groups of four or none), in text order, and whether its checksum is valid."""
    found = []
    for head in _IBAN_HEAD.finditer(_shape(text)):
        start = head.start()
        iban = _iban_at(text, start)
        if iban is not None:
            valid = _mod97(text[iban.start : iban.end].replace(" ", "").upper()) == 1
            found.append((iban, valid))
    return tuple(found)


def _letters_group(before: str) -> bool:
    """Whether ``before`` ends with a word of four letters and digits, then a space."""
    group = before[-5:-1]
    return (
        len(before) == 6
        and before[0] == " "
        and group.isalnum()
        and group.isascii()
        and not group.isdigit()
    )


def _in_iban(text: str, start: int) -> bool:
    """Whether ``start`` is inside something written like an IBAN (checksum or not):
    its digits are not a card's or a phone's (GB88 MIBG 5028 6203 0020 13)."""
    ibans = _ibans(text)
    # (the last that starts before ``start``; they do not overlap but for junk)
    i = bisect_left(ibans, start, key=lambda found: found[0].start)
    return any(found.start < start < found.end for found, _ in ibans[max(0, i - 2) : i])


def _iban_at(text: str, start: int) -> Finding | None:
    """The IBAN written from ``start``, its checksum unchecked."""
    m = _IBAN_RUN.match(text, start)
    if m is None:
        return None
    run = m.group()
    length = _IBAN_LENGTHS.get(run[:2].upper())
    if length is None:
        return None
    grouped = run[4:5] == " "
    span = length + (length - 1) // 4 if grouped else length
    iban = run[:span]
    if len(iban) < span or _glued_after(text, start + span):
        return None
    if grouped and iban[4::5].strip(" "):
        return None  # (a space after each group of four)
    compact = iban.replace(" ", "")
    if len(compact) != length:
        return None
    # (digits have no case: the letters are all upper or all lower case)
    if not (compact.isupper() or compact.islower()):
        return None
    return Finding(start, start + span, "iban", "iban")


# --- US social security numbers ---------------------------------------------------

_SSN = re.compile(
    r"(?<![A-Za-z0-9_\-])([0-9]{3})(?:([- ])([0-9]{2})\2([0-9]{4})|([0-9]{2})([0-9]{4}))"
)
# Printed on a wallet insert and in an advertisement, then voided by the SSA.
_SSN_VOID = frozenset((("078", "05", "1120"), ("219", "09", "9999")))
_SSN_CONTEXT = re.compile(r"ssn|social\s*security|soc\.?\s*sec|\bss\s?#|\bss\s?no")


def find_us_ssn(text: str) -> Iterator[Finding]:
    """AAA-GG-SSSS or AAA GG SSSS of a possible area, group and serial; nine bare
    digits only after a word for social security number."""
    found: list[Finding] = []
    for run_start, run_end in _numbers(text):
        length = run_end - run_start
        if length < 9 or (length > 11 and " " not in text[run_start:run_end]):
            continue  # (not inside one long token of digits and hyphens: no SSN is)
        for m in _SSN.finditer(text, run_start, run_end + 2):  # (as _near)
            start, end = m.span()
            if start >= run_end:
                break
            if _glued_after(text, end) or _decimal_before(text, start):
                continue
            area = m.group(1)
            group = m.group(3) or m.group(5)
            serial = m.group(4) or m.group(6)
            if area in ("000", "666") or area[0] == "9" or group == "00" or serial == "0000":
                continue
            if (area, group, serial) in _SSN_VOID:
                continue
            if m.group(2) is None and not _SSN_CONTEXT.search(
                text[max(0, start - 40) : start].lower()
            ):
                continue
            found.append(Finding(start, end, "us_ssn", "us_ssn"))
    return iter(found)


# --- IP addresses -----------------------------------------------------------------

_IPV4 = re.compile(r"(?<![A-Za-z0-9_.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![0-9A-Za-z_]|\.[0-9A-Za-z])")
_NOT_IP = re.compile(
    r"(?:\bv|version|\bver\.?|release|\bbuild|firmware|section|\bsec\.?|chapter|"
    r"\bch\.?|figure|\bfig\.?|table|clause|§|rule|item|step|oid)[\s:=]*$"
)
# From a colon on; the up to four hex digits before it are found in code.
_IPV6 = re.compile(r":[0-9A-Fa-f:.]{2,44}(?![A-Za-z0-9_:])")
_HEX = frozenset("0123456789abcdefABCDEF")


def _ipv4_ok(text: str, start: int, address: str) -> bool:
    if any((len(o) > 1 and o[0] == "0") or int(o) > 255 for o in address.split(".")):
        return False
    if start >= 2 and text[start - 1] == "/" and text[start - 2].isalpha():
        return False  # Chrome/120.0.0.0
    return not _NOT_IP.search(text[max(0, start - 12) : start].lower())


def find_ip_address(text: str) -> Iterator[Finding]:
    """IPv4 (dotted quads of octets without leading zeros; not versions, section
    numbers or OIDs) and IPv6 (``ipaddress``; not MAC addresses or times)."""
    for run_start, run_end in _numbers(text):
        length = run_end - run_start
        if length >= 7 and (length <= 15 or " " in text[run_start:run_end]):
            for m in _near(_IPV4, text, run_start, run_end):
                if _ipv4_ok(text, m.start(), m.group()):
                    yield Finding(m.start(), m.end(), "ip_address", "ip_address")
    if text.count(":") >= 2:
        yield from _ipv6s(text)


def _ipv6s(text: str) -> Iterator[Finding]:
    for m in _IPV6.finditer(text):
        start = m.start()
        while start > 0 and m.start() - start < 4 and text[start - 1] in _HEX:
            start -= 1
        if start > 0 and (text[start - 1] in _WORDY or text[start - 1] in ":."):
            continue
        candidate = text[start : m.end()].rstrip(".")
        if "::" not in candidate and candidate.count(":") < 6:
            continue  # 12:30:45
        if candidate.count(":") < 2:
            continue
        try:
            address = ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        parts = candidate.split(":")
        if address.ipv4_mapped is None and "." not in candidate:
            if sum(len(p) for p in parts) < 4:
                continue  # ::1, 1::2 (a slice), ::
            if "::" not in candidate and all(len(p) == 2 for p in parts):
                continue  # an EUI-64 or MAC-like 00:1a:2b:...
        yield Finding(start, start + len(candidate), "ip_address", "ip_address")
