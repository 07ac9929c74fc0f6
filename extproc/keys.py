"""Tollway API keys: generation, the hashed keys file, and verification.

A key looks like ``tw_<id>_<secret>``: the ``tw_`` prefix lets secret scanners
spot leaked keys, the 12-hex-digit id is public (it names the key in logs and
metrics) and the secret carries 256 random bits. The keys file stores only
``sha256(key)``; a plain SHA-256 is enough because the secret is random and
long, so there is nothing to brute-force. Lookup is by id, and the digest is
compared in constant time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal
from fnmatch import translate
from pathlib import Path
from typing import Any, Literal

import yaml

from . import yamltext
from .files import write_atomically

PREFIX = "tw_"
_KEY_RE = re.compile(r"tw_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_AMOUNT_RE = re.compile(r"[0-9]+(?:\.[0-9]+)?")  # plain decimal: no sign, exponent, nan or inf

# Caps well past any real need, so that counters and micro-dollar sums stay exact in
# 64-bit integers (what a store such as Redis counts in).
MAX_COUNT = 10**12
MAX_USD = Decimal(10**12)

COUNT_LIMITS = ("rpm", "tpm", "concurrency")  # the KeyLimits fields that are counts
BudgetPeriod = Literal["day", "month"]
_PERIODS: dict[str, BudgetPeriod] = {"day": "day", "month": "month"}


class KeysFileError(Exception):
    """The keys file cannot be read or is malformed."""


class AmbiguousName(Exception):
    """Several active keys have the name given: the caller must pick one by id."""

    def __init__(self, name: str, ids: Sequence[str]) -> None:
        super().__init__(f"{len(ids)} active keys are named {name!r}: {', '.join(ids)}")
        self.ids = tuple(ids)


@dataclass(frozen=True, slots=True)
class KeyLimits:
    """Per-key overrides of the configured limits; None: no override for that one."""

    rpm: int | None = None  # requests a minute
    tpm: int | None = None  # tokens a minute
    concurrency: int | None = None  # requests in flight at once
    # Money is Decimal: 0.1 stays 0.1. At most 6 decimals, so a budget is a whole
    # number of micro-dollars (an integer counter in a store).
    budget_usd: Decimal | None = None
    budget_period: BudgetPeriod | None = None  # set exactly when budget_usd is

    def __post_init__(self) -> None:
        for name in COUNT_LIMITS:
            value = getattr(self, name)
            if value is not None:
                _check_count(value, name)
        if (self.budget_usd is None) != (self.budget_period is None):
            raise ValueError("budget_usd and budget_period: give both or neither")
        if self.budget_usd is not None:
            _check_amount(self.budget_usd, "budget_usd")
        if self.budget_period is not None and self.budget_period not in _PERIODS:
            raise ValueError("budget_period: must be day or month")


NO_LIMITS = KeyLimits()


def _check_count(value: object, name: str) -> int:
    # bool is an int subclass: `rpm: true` in a file is a mistake, not 1.
    if type(value) is not int or not 0 < value <= MAX_COUNT:
        raise ValueError(f"{name}: must be a whole number from 1 to {MAX_COUNT:,}")
    return value


def _check_amount(value: Decimal, name: str) -> Decimal:
    # Bounded first, so normalize() is exact (28 digits of precision) and its exponent
    # an int; normalize() also reads 0.1000000 as the one decimal it is.
    if not (value.is_finite() and 0 < value <= MAX_USD) or _decimals(value) > 6:
        raise ValueError(
            f"{name}: must be more than 0 and at most {MAX_USD:,} US dollars, "
            "with at most 6 decimals"
        )
    return value


def _decimals(value: Decimal) -> int:
    exponent = value.normalize().as_tuple().exponent
    assert isinstance(exponent, int)  # finite
    return max(0, -exponent)


def _parse_amount(text: str, name: str) -> Decimal:
    if not _AMOUNT_RE.fullmatch(text):
        raise ValueError(f"{name}: must be an amount of US dollars, like 50 or 0.25")
    return _check_amount(Decimal(text), name)


def amount_text(value: Decimal) -> str:
    """The amount as written in the keys file and shown by the CLI: never 1E+2."""
    return format(value, "f")


def parse_count(text: str, name: str) -> int | None:
    """A limit typed on the command line: a positive integer, or ``none`` to clear it."""
    if text == "none":
        return None
    number = int(text) if text.isascii() and text.isdigit() else None  # not int(): " 5", "5_0"
    return _check_count(number, f"{name} {text!r}")


def parse_budget(text: str, name: str) -> tuple[Decimal, BudgetPeriod] | None:
    """``AMOUNT[/day|/month]`` in US dollars (a month by default), or ``none``."""
    if text == "none":
        return None
    amount, slash, period_text = text.partition("/")
    period = _PERIODS.get(period_text if slash else "month")
    if period is None:
        raise ValueError(f"{name} {text!r}: the period must be /day or /month")
    return _parse_amount(amount, f"{name} {text!r}"), period


@dataclass(frozen=True, slots=True)
class KeyRecord:
    id: str
    name: str
    tenant: str
    digest: str  # hex sha256 of the whole key
    created: datetime
    models: tuple[str, ...] = ()  # empty: every model; entries may use * wildcards
    expires: datetime | None = None
    revoked: datetime | None = None
    limits: KeyLimits = NO_LIMITS
    redaction: str | None = None  # a policy of redaction_policies, over the tenant's
    roles: tuple[str, ...] = ()  # names in the config's roles: what the key may do
    # A key of the keys file, or an identity Envoy verified that Tollway made a record
    # of for the request (stages/auth.py): a JWT's claims, a client certificate.
    kind: Literal["key", "jwt", "cert"] = "key"
    _model_re: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def allows_model(self, model: str) -> bool:
        return self._model_re is None or self._model_re.fullmatch(model) is not None

    @property
    def restricts_models(self) -> bool:
        return self._model_re is not None

    def active(self, now: datetime | None = None) -> bool:
        """Neither revoked nor expired."""
        moment = now or datetime.now(UTC)
        return self.revoked is None and (self.expires is None or self.expires > moment)


def compile_models(models: Sequence[str]) -> re.Pattern[str] | None:
    if not models:
        return None
    # fnmatch patterns become plain alternations of literals and ".*": linear.
    return re.compile("|".join(f"(?:{translate(m)})" for m in models))


def make_record(
    *,
    name: str,
    tenant: str,
    digest: str,
    key_id: str,
    created: datetime,
    models: Sequence[str] = (),
    expires: datetime | None = None,
    revoked: datetime | None = None,
    limits: KeyLimits = NO_LIMITS,
    redaction: str | None = None,
    roles: Sequence[str] = (),
    kind: Literal["key", "jwt", "cert"] = "key",
) -> KeyRecord:
    return KeyRecord(
        id=key_id,
        name=name,
        tenant=tenant,
        digest=digest,
        created=created,
        models=tuple(models),
        expires=expires,
        revoked=revoked,
        limits=limits,
        redaction=redaction,
        roles=tuple(roles),
        kind=kind,
        _model_re=compile_models(models),
    )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate(
    *,
    name: str,
    tenant: str = "default",
    models: Sequence[str] = (),
    expires: datetime | None = None,
    limits: KeyLimits = NO_LIMITS,
    redaction: str | None = None,
    roles: Sequence[str] = (),
    now: datetime | None = None,
) -> tuple[str, KeyRecord]:
    """A new key and its record; the key itself is shown once and never stored."""
    if not _NAME_RE.fullmatch(name):
        raise ValueError("name: 1-64 characters of letters, digits, '.', '_' or '-'")
    if not _NAME_RE.fullmatch(tenant):
        raise ValueError("tenant: 1-64 characters of letters, digits, '.', '_' or '-'")
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = make_record(
        name=name,
        tenant=tenant,
        digest=digest(key),
        key_id=key_id,
        created=now or datetime.now(UTC),
        models=models,
        expires=expires,
        limits=limits,
        redaction=check_policy_name(redaction),
        roles=[check_policy_name(r) or "" for r in roles],
    )
    return key, record


def check_policy_name(name: str | None) -> str | None:
    if name is not None and not _NAME_RE.fullmatch(name):
        raise ValueError("redaction: a policy name of letters, digits, '.', '_' or '-'")
    return name


def parse_expiry(text: str) -> datetime:
    """``YYYY-MM-DD`` (end of that day, UTC) or an ISO 8601 date-time."""
    try:
        if len(text) == 10:
            return datetime.combine(date.fromisoformat(text), time.max, tzinfo=UTC)
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expiry {text!r}: use YYYY-MM-DD or an ISO 8601 date-time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class KeyRing:
    """The keys currently valid for lookups; immutable, swapped whole on reload."""

    __slots__ = ("_by_id",)

    def __init__(self, records: Sequence[KeyRecord] = ()) -> None:
        self._by_id = {r.id: r for r in records}

    def __len__(self) -> int:
        return len(self._by_id)

    def __iter__(self) -> Iterator[KeyRecord]:
        return iter(self._by_id.values())

    def find(self, key: str) -> KeyRecord | None:
        """The record whose digest matches ``key``, or None."""
        match = _KEY_RE.fullmatch(key)
        if match is None:
            return None
        record = self._by_id.get(match.group(1))
        if record is None or not hmac.compare_digest(record.digest, digest(key)):
            return None
        return record


# ---- the keys file ----------------------------------------------------------


def _to_yaml(record: KeyRecord) -> dict[str, Any]:
    item: dict[str, Any] = {
        "id": record.id,
        "name": record.name,
        "tenant": record.tenant,
        "sha256": record.digest,
        "created": record.created.isoformat(),
    }
    if record.models:
        item["models"] = list(record.models)
    if record.expires:
        item["expires"] = record.expires.isoformat()
    if record.revoked:
        item["revoked"] = record.revoked.isoformat()
    if record.limits != NO_LIMITS:
        item["limits"] = _limits_to_yaml(record.limits)
    if record.redaction is not None:
        item["redaction"] = record.redaction
    if record.roles:
        item["roles"] = list(record.roles)
    return item


def _limits_to_yaml(limits: KeyLimits) -> dict[str, Any]:
    item: dict[str, Any] = {}
    for f in fields(limits):
        value = getattr(limits, f.name)
        if value is not None:
            # A string keeps the amount exact; a YAML float would not.
            item[f.name] = amount_text(value) if isinstance(value, Decimal) else value
    return item


def _limits_from_yaml(value: Any, where: str) -> KeyLimits:
    if value is None:
        return NO_LIMITS
    if not isinstance(value, dict):
        raise KeysFileError(f"{where}: must be a mapping")
    known = [f.name for f in fields(KeyLimits)]
    unknown = sorted(str(k) for k in value if k not in known)
    if unknown:  # a misspelt limit would otherwise be silently no limit
        raise KeysFileError(f"{where}: unknown {', '.join(unknown)} (known: {', '.join(known)})")
    try:
        rpm, tpm, concurrency = (
            None if value.get(n) is None else _check_count(value[n], n) for n in COUNT_LIMITS
        )
        budget, period = _budget_from_yaml(value.get("budget_usd"), value.get("budget_period"))
        return KeyLimits(rpm, tpm, concurrency, budget, period)
    except ValueError as exc:
        raise KeysFileError(f"{where}.{exc}") from None


def _budget_from_yaml(amount: Any, period: Any) -> tuple[Decimal | None, BudgetPeriod | None]:
    if amount is None:
        if period is not None:
            raise ValueError("budget_period: needs a budget_usd")
        return None, None
    # YAML reads 0.1 as a float; its shortest repr is the text that was written.
    if isinstance(amount, bool) or not isinstance(amount, str | int | float):
        raise ValueError("budget_usd: must be an amount of US dollars, like 50 or 0.25")
    found = _PERIODS.get("month" if period is None else str(period))
    if found is None:
        raise ValueError("budget_period: must be day or month")
    return _parse_amount(str(amount), "budget_usd"), found


def _moment(value: Any, where: str) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime.combine(value, time.max, tzinfo=UTC)
    try:
        return parse_expiry(str(value))
    except ValueError as exc:
        raise KeysFileError(f"{where}: {exc}") from None


def _from_yaml(item: Any, where: str) -> KeyRecord:
    if not isinstance(item, dict):
        raise KeysFileError(f"{where}: must be a mapping")
    missing = [k for k in ("id", "name", "sha256", "created") if k not in item]
    if missing:
        raise KeysFileError(f"{where}: missing {', '.join(missing)}")
    key_id, sha = str(item["id"]), str(item["sha256"])
    if not re.fullmatch(r"[0-9a-f]{12}", key_id):
        raise KeysFileError(f"{where}.id: must be 12 hex digits")
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise KeysFileError(f"{where}.sha256: must be 64 hex digits")
    models = item.get("models") or []
    if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
        raise KeysFileError(f"{where}.models: must be a list of model names")
    created = _moment(item["created"], f"{where}.created")
    assert created is not None
    redaction = item.get("redaction")
    if redaction is not None and not (isinstance(redaction, str) and _NAME_RE.fullmatch(redaction)):
        raise KeysFileError(f"{where}.redaction: must be a policy name")
    roles = item.get("roles") or []
    if not isinstance(roles, list) or not all(
        isinstance(r, str) and _NAME_RE.fullmatch(r) for r in roles
    ):
        raise KeysFileError(f"{where}.roles: must be a list of role names")
    return make_record(
        key_id=key_id,
        name=str(item["name"]),
        tenant=str(item.get("tenant") or "default"),
        digest=sha,
        created=created,
        models=models,
        expires=_moment(item.get("expires"), f"{where}.expires"),
        revoked=_moment(item.get("revoked"), f"{where}.revoked"),
        # The id, not only the index: the operator fixes a key they know by id.
        limits=_limits_from_yaml(item.get("limits"), f"{where} (key {key_id}): limits"),
        redaction=redaction,
        roles=roles,
    )


def read_records(path: Path) -> list[KeyRecord]:
    """All records in the keys file; a missing file holds no keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KeysFileError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KeysFileError(f"{path}: not valid YAML: {yamltext.describe(exc)}") from None
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("keys", ()), list | None):
        raise KeysFileError(f"{path}: expected a mapping with a 'keys' list")
    entries = data["keys"] or []
    records = [_from_yaml(item, f"{path}: keys[{i}]") for i, item in enumerate(entries)]
    ids = [r.id for r in records]
    if len(set(ids)) != len(ids):
        raise KeysFileError(f"{path}: duplicate key ids")
    return records


def write_records(path: Path, records: Sequence[KeyRecord]) -> None:
    """Replace the file atomically (readers see the old or the new file), mode 0600.
    The folder must exist: a mistyped path is an error, not a new tree of folders."""
    _folder_exists(path)
    body = yaml.safe_dump(
        {"keys": [_to_yaml(r) for r in records]}, sort_keys=False, default_flow_style=False
    )
    header = "# Tollway API keys: hashes only. Managed by `tollway keys`.\n"
    write_atomically(path, (header + body).encode("utf-8"))


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """Serialise concurrent `tollway keys` commands on the same file (lock file 0600)."""
    _folder_exists(path)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _folder_exists(path: Path) -> None:
    if not path.parent.is_dir():
        raise KeysFileError(f"{path}: the folder {path.parent} does not exist")


def add(path: Path, record: KeyRecord) -> None:
    with locked(path):
        write_records(path, [*read_records(path), record])


def revoke(path: Path, key_id_or_name: str, now: datetime | None = None) -> list[KeyRecord]:
    """Revoke the key with this id, or the one active key with this name; returns those
    changed. Several active keys of that name raise :class:`AmbiguousName` (rotation
    creates a key with the same name, then revokes the old one by id)."""
    moment = now or datetime.now(UTC)
    return _update(
        path,
        key_id_or_name,
        moment,
        lambda r: r.revoked is None,
        lambda r: replace(r, revoked=moment),
    )


def set_limits(
    path: Path,
    key_id_or_name: str,
    change: Callable[[KeyLimits], KeyLimits],
    now: datetime | None = None,
) -> list[KeyRecord]:
    """Give the active key with this id, or the one active key with this name, the limits
    ``change`` makes of its current ones; returns the records changed. A running server
    picks the new limits up when it re-reads the file."""
    moment = now or datetime.now(UTC)
    return _update(
        path,
        key_id_or_name,
        moment,
        lambda r: r.active(moment),
        lambda r: replace(r, limits=change(r.limits)),
    )


def set_redaction(
    path: Path, key_id_or_name: str, policy: str | None, now: datetime | None = None
) -> list[KeyRecord]:
    """Give the active key with this id (or the one active key with this name) a
    redaction policy by name, or None for its tenant's (or the default)."""
    moment = now or datetime.now(UTC)
    check_policy_name(policy)
    return _update(
        path,
        key_id_or_name,
        moment,
        lambda r: r.active(moment),
        lambda r: replace(r, redaction=policy),
    )


def _unambiguous(records: Sequence[KeyRecord], key_id_or_name: str, moment: datetime) -> None:
    """An id, or a name at most one active key has (else AmbiguousName)."""
    if not any(r.id == key_id_or_name for r in records):
        named = [r.id for r in records if r.name == key_id_or_name and r.active(moment)]
        if len(named) > 1:
            raise AmbiguousName(key_id_or_name, named)


def resolve(
    records: Sequence[KeyRecord], key_id_or_name: str, now: datetime | None = None
) -> KeyRecord | None:
    """The key with this id (in any state), or the one active key with this name."""
    moment = now or datetime.now(UTC)
    _unambiguous(records, key_id_or_name, moment)
    by_id = [r for r in records if r.id == key_id_or_name]
    named = [r for r in records if r.name == key_id_or_name and r.active(moment)]
    return next(iter(by_id or named), None)


def _update(
    path: Path,
    key_id_or_name: str,
    moment: datetime,
    pick: Callable[[KeyRecord], bool],
    change: Callable[[KeyRecord], KeyRecord],
) -> list[KeyRecord]:
    """Rewrite, under the lock, the picked records that this id or name selects."""
    with locked(path):
        records = read_records(path)
        _unambiguous(records, key_id_or_name, moment)
        changed: list[KeyRecord] = []
        updated: list[KeyRecord] = []
        for record in records:
            if key_id_or_name in (record.id, record.name) and pick(record):
                record = change(record)
                changed.append(record)
            updated.append(record)
        if changed:
            write_records(path, updated)
        return changed
