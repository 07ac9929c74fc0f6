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
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from fnmatch import translate
from pathlib import Path
from typing import Any

import yaml

from . import yamltext

PREFIX = "tw_"
_KEY_RE = re.compile(r"tw_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class KeysFileError(Exception):
    """The keys file cannot be read or is malformed."""


class AmbiguousName(Exception):
    """Several active keys have the name given: the caller must pick one by id."""

    def __init__(self, name: str, ids: Sequence[str]) -> None:
        super().__init__(f"{len(ids)} active keys are named {name!r}: {', '.join(ids)}")
        self.ids = tuple(ids)


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


def _compile_models(models: Sequence[str]) -> re.Pattern[str] | None:
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
        _model_re=_compile_models(models),
    )


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate(
    *,
    name: str,
    tenant: str = "default",
    models: Sequence[str] = (),
    expires: datetime | None = None,
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
    )
    return key, record


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
    return item


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
    return make_record(
        key_id=key_id,
        name=str(item["name"]),
        tenant=str(item.get("tenant") or "default"),
        digest=sha,
        created=created,
        models=models,
        expires=_moment(item.get("expires"), f"{where}.expires"),
        revoked=_moment(item.get("revoked"), f"{where}.revoked"),
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(header + body)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


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
    with locked(path):
        records = read_records(path)
        if not any(r.id == key_id_or_name for r in records):
            named = [r.id for r in records if r.name == key_id_or_name and r.active(moment)]
            if len(named) > 1:
                raise AmbiguousName(key_id_or_name, named)
        changed: list[KeyRecord] = []
        updated: list[KeyRecord] = []
        for record in records:
            if key_id_or_name in (record.id, record.name) and record.revoked is None:
                record = replace(record, revoked=moment)
                changed.append(record)
            updated.append(record)
        if changed:
            write_records(path, updated)
        return changed
