"""API keys: the format users paste, the hashed file, lookups, revocation, allowlists."""

from __future__ import annotations

import hashlib
import re
import stat
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from extproc import keys
from extproc.keys import NO_LIMITS, KeyLimits, KeyRing, KeysFileError

from .factories import NOW, new_key, unknown_key

# What a secret scanner (GitHub push protection, gitleaks) would use for a Tollway key.
SCANNER = re.compile(r"(?<![A-Za-z0-9_])tw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


# ---- format ------------------------------------------------------------------


def test_generated_key_format_and_record() -> None:
    key, record = keys.generate(name="ci-bot", tenant="team-a", now=NOW)
    assert re.fullmatch(r"tw_[0-9a-f]{12}_[A-Za-z0-9_-]{43}", key)
    assert key.startswith("tw_")
    assert record.id == key[3:15]
    assert record.digest == hashlib.sha256(key.encode()).hexdigest()
    assert (record.name, record.tenant, record.created) == ("ci-bot", "team-a", NOW)
    assert record.models == () and record.expires is None and record.revoked is None


def test_a_secret_scanner_finds_the_key_in_surrounding_text() -> None:
    for _ in range(50):  # secrets vary: '-' and '_' at the edges must still match whole
        key, _record = new_key()
        leaked = f'export TOLLWAY_KEY="{key}"\nclient = OpenAI(api_key={key!r})'
        assert SCANNER.findall(leaked) == [key, key]


def test_keys_and_ids_are_unique() -> None:
    made = [new_key() for _ in range(200)]
    assert len({k for k, _ in made}) == 200
    assert len({r.id for _, r in made}) == 200


@pytest.mark.parametrize("name", ["", "-leading-dash", "has space", "x" * 65, "slash/y", "é"])
def test_generate_rejects_bad_names_and_tenants(name: str) -> None:
    with pytest.raises(ValueError, match="name"):
        keys.generate(name=name)
    with pytest.raises(ValueError, match="tenant"):
        keys.generate(name="ok", tenant=name)


# ---- the keys file -------------------------------------------------------------


def test_file_stores_only_the_hash_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    key, record = new_key()
    keys.add(path, record)
    text = path.read_text()
    assert key not in text
    assert key.split("_", 2)[2] not in text  # nor the secret on its own (it may hold "_")
    assert record.digest in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    keys.revoke(path, record.id, now=NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_file_round_trips_every_field(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "dir" / "keys.yaml"
    with pytest.raises(KeysFileError, match="does not exist"):  # no folders made on a typo
        keys.write_records(path, [])
    path.parent.mkdir(parents=True)
    _, plain = new_key("plain")
    _, full = new_key(
        "full",
        tenant="t-1",
        models=("gpt-4o*", "claude-3-5-sonnet"),
        expires=NOW + timedelta(days=30),
        revoked=NOW + timedelta(days=1),
    )
    full = replace(full, limits=KeyLimits(60, 100_000, 4, Decimal("0.1"), "day"))
    keys.write_records(path, [plain, full])
    back = keys.read_records(path)
    assert back == [plain, full]
    assert back[0].limits is NO_LIMITS
    assert str(back[1].limits.budget_usd) == "0.1"  # exact, not 0.1000000000000000055...
    assert back[1].allows_model("gpt-4o-mini") and not back[1].allows_model("gpt-4")


@pytest.mark.parametrize("text", [None, "", "# only a comment\n", "keys: []\n"])
def test_missing_or_empty_file_holds_no_keys(tmp_path: Path, text: str | None) -> None:
    path = tmp_path / "keys.yaml"
    if text is not None:
        path.write_text(text)
    assert keys.read_records(path) == []


ENTRY = (
    "{id: 0123456789ab, name: a, sha256: " + "a" * 64 + ", created: '2025-01-01T00:00:00+00:00'}"
)
LIMITS_AT = "keys[0] (key 0123456789ab): limits"  # the id, so the operator knows which key


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (f"keys:\n  - {ENTRY}\n  - {ENTRY.replace('a' * 64, 'abc')}\n", "keys[1].sha256"),
        (f"keys:\n  - {ENTRY.replace('0123456789ab', 'XYZ')}\n", "keys[0].id"),
        ("keys:\n  - {id: 0123456789ab, name: a}\n", "keys[0]: missing sha256, created"),
        ("keys:\n  - just a string\n", "keys[0]: must be a mapping"),
        (f"keys:\n  - {ENTRY[:-1]}, models: gpt-4o}}\n", "keys[0].models"),
        (f"keys:\n  - {ENTRY[:-1]}, models: ['']}}\n", "keys[0].models"),
        (f"keys:\n  - {ENTRY[:-1]}, expires: next tuesday}}\n", "keys[0].expires"),
        (
            f"keys:\n  - {ENTRY.replace('2025-01-01T00:00:00+00:00', 'yesterday')}\n",
            "keys[0].created",
        ),
        (f"keys:\n  - {ENTRY}\n  - {ENTRY.replace('name: a', 'name: b')}\n", "duplicate key ids"),
        ("keys: 5\n", "expected a mapping with a 'keys' list"),
        ("- a\n- b\n", "expected a mapping with a 'keys' list"),
        ("keys: [unclosed\n", "not valid YAML"),
        *(
            (f"keys:\n  - {ENTRY[:-1]}, limits: {limits}}}\n", f"{LIMITS_AT}{problem}")
            for limits, problem in [
                ("5", ": must be a mapping"),
                ("{rmp: 60}", ": unknown rmp (known: rpm, tpm, "),
                ("{rpm: 0}", ".rpm: must be a whole number from 1 to 1,000,000,000,000"),
                ("{tpm: true}", ".tpm: must be a whole number"),
                ("{concurrency: '4'}", ".concurrency: must be a whole number"),
                ("{rpm: 1.5}", ".rpm: must be a whole number"),
                ("{rpm: 1000000000001}", ".rpm: must be a whole number"),
                ("{budget_usd: abc}", ".budget_usd: must be an amount of US dollars"),
                ("{budget_usd: [5]}", ".budget_usd: must be an amount of US dollars"),
                ("{budget_usd: -5}", ".budget_usd: must be an amount of US dollars"),
                ("{budget_usd: 0}", ".budget_usd: must be more than 0"),
                ("{budget_usd: '0.0000001'}", ".budget_usd: must be more than 0"),
                ("{budget_usd: .nan}", ".budget_usd: must be an amount"),
                ("{budget_usd: 5, budget_period: week}", ".budget_period: must be day or month"),
                ("{budget_period: day}", ".budget_period: needs a budget_usd"),
            ]
        ),
    ],
)
def test_malformed_file_names_the_file_and_entry(tmp_path: Path, text: str, where: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as info:
        keys.read_records(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert where in message
    assert "a" * 64 not in message  # never the digest
    assert "<unicode string>" not in message
    if where == "not valid YAML":
        assert "line 2, column 1: " in message, message


@pytest.mark.parametrize("text", ["{}\n", "users: []\n"])
def test_mapping_without_keys_list_is_a_keys_file_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeysFileError, match=re.escape(str(path))):
        keys.read_records(path)


def test_unreadable_file_is_a_keys_file_error(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.mkdir()
    with pytest.raises(KeysFileError, match="cannot read"):
        keys.read_records(path)


def test_yaml_dates_in_the_file_mean_end_of_day_utc(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(
        f"keys:\n  - {ENTRY[:-1]}, expires: 2025-03-01, revoked: 2025-02-01T10:00:00+02:00}}\n"
    )
    (record,) = keys.read_records(path)
    assert record.expires == datetime(2025, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)
    assert record.revoked == datetime(2025, 2, 1, 8, 0, tzinfo=UTC)
    assert record.tenant == "default"


# A keys file as Tollway wrote it before keys had limits.
OLD_FILE = """\
# Tollway API keys: hashes only. Managed by `tollway keys`.
keys:
- id: 0123456789ab
  name: ci
  tenant: platform
  sha256: {sha}
  created: '2025-01-01T00:00:00+00:00'
  models:
  - gpt-4o*
""".format(sha="a" * 64)


def test_a_file_written_before_limits_loads_and_stays_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(OLD_FILE)
    (old,) = keys.read_records(path)
    assert old.limits == NO_LIMITS and old.models == ("gpt-4o*",)
    _, new = new_key("new")
    keys.add(path, new)  # a rewrite adds no empty limits to the old entry
    assert path.read_text().startswith(OLD_FILE)


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("{}", NO_LIMITS),
        ("null", NO_LIMITS),
        ("{rpm: null, budget_usd: null}", NO_LIMITS),
        ("{rpm: 60}", KeyLimits(rpm=60)),
        # YAML reads 0.1 as a float: its repr is what was written, so the Decimal is exact.
        (
            "{budget_usd: 0.1, budget_period: day}",
            KeyLimits(None, None, None, Decimal("0.1"), "day"),
        ),
        ("{budget_usd: 50}", KeyLimits(budget_usd=Decimal(50), budget_period="month")),
        (
            "{budget_usd: '12.345678'}",
            KeyLimits(budget_usd=Decimal("12.345678"), budget_period="month"),
        ),
    ],
)
def test_limits_as_people_write_them_in_the_file(
    tmp_path: Path, text: str, limits: KeyLimits
) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {ENTRY[:-1]}, limits: {text}}}\n")
    (record,) = keys.read_records(path)
    assert record.limits == limits


def test_only_limits_that_are_set_are_written(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, record = new_key()
    keys.write_records(
        path,
        [
            replace(
                record, limits=KeyLimits(tpm=5, budget_usd=Decimal("1E+2"), budget_period="month")
            )
        ],
    )
    assert (
        "  limits:\n    tpm: 5\n    budget_usd: '100'\n    budget_period: month\n"
        in path.read_text()
    )


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"rpm": 0}, "rpm: must be a whole number"),
        ({"concurrency": True}, "concurrency: must be a whole number"),
        ({"budget_usd": Decimal(5)}, "give both or neither"),
        ({"budget_period": "day"}, "give both or neither"),
        ({"budget_usd": Decimal("Infinity"), "budget_period": "day"}, "budget_usd: must be more"),
        ({"budget_usd": Decimal("0.1234567"), "budget_period": "day"}, "at most 6 decimals"),
        ({"budget_usd": Decimal(1), "budget_period": "week"}, "budget_period: must be day or"),
    ],
)
def test_key_limits_refuse_nonsense_however_made(fields: dict[str, Any], problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        KeyLimits(**fields)
    with pytest.raises(ValueError, match=problem):
        replace(NO_LIMITS, **fields)


def test_trailing_zeros_are_not_decimals() -> None:
    assert KeyLimits(budget_usd=Decimal("0.1000000"), budget_period="day").budget_usd == Decimal(
        "0.1"
    )


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", 1), ("60", 60), ("1000000000000", 10**12), ("none", None)],
)
def test_parse_count(text: str, value: int | None) -> None:
    assert keys.parse_count(text, "--rpm") == value


@pytest.mark.parametrize(
    "text", ["0", "-1", "1.5", "abc", "", " 5", "5_000", "\u0665", "None", "1000000000001"]
)
def test_parse_count_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=f"--rpm {re.escape(repr(text))}: must be a whole number"):
        keys.parse_count(text, "--rpm")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("50", (Decimal(50), "month")),
        ("50/month", (Decimal(50), "month")),
        ("0.1/day", (Decimal("0.1"), "day")),
        ("0.000001/day", (Decimal("0.000001"), "day")),
        ("1000000000000", (Decimal(10**12), "month")),
        ("none", None),
    ],
)
def test_parse_budget(text: str, value: tuple[Decimal, str] | None) -> None:
    assert keys.parse_budget(text, "--budget-usd") == value


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("5/week", "the period must be /day or /month"),
        ("5/", "the period must be /day or /month"),
        ("5/Day", "the period must be /day or /month"),
        ("abc", "must be an amount of US dollars"),
        ("/day", "must be an amount of US dollars"),
        ("-5", "must be an amount of US dollars"),
        ("1e3", "must be an amount of US dollars"),
        ("nan", "must be an amount of US dollars"),
        ("$5", "must be an amount of US dollars"),
        ("0", "must be more than 0"),
        ("0.0000001", "at most 6 decimals"),
        ("1000000000000.01", "at most 1,000,000,000,000 US dollars"),
    ],
)
def test_parse_budget_rejects(text: str, problem: str) -> None:
    with pytest.raises(ValueError, match=f"--budget-usd {re.escape(repr(text))}: .*{problem}"):
        keys.parse_budget(text, "--budget-usd")


def test_concurrent_adds_lose_no_record(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    threads, per_thread = 8, 4
    made = [[new_key(f"k{t}-{i}")[1] for i in range(per_thread)] for t in range(threads)]
    start = threading.Barrier(threads)

    def worker(records: list[keys.KeyRecord]) -> None:
        start.wait()
        for record in records:
            keys.add(path, record)

    pool = [threading.Thread(target=worker, args=(batch,)) for batch in made]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join(timeout=10)
    stored = keys.read_records(path)
    assert len(stored) == threads * per_thread
    assert {r.id for r in stored} == {r.id for batch in made for r in batch}


# ---- revocation ------------------------------------------------------------------


def test_revoke_by_id_and_by_name(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, a = new_key("alice")
    _, ci1 = new_key("ci")
    _, ci2 = new_key("ci")
    keys.write_records(path, [a, ci1, ci2])
    later = NOW + timedelta(hours=1)

    changed = keys.revoke(path, a.id, now=later)
    assert [r.id for r in changed] == [a.id]
    with pytest.raises(keys.AmbiguousName) as ambiguous:  # rotation: two keys named ci
        keys.revoke(path, "ci", now=later)
    assert sorted(ambiguous.value.ids) == sorted([ci1.id, ci2.id])
    assert [r.revoked for r in keys.read_records(path)] == [later, None, None]
    assert [r.id for r in keys.revoke(path, ci1.id, now=later)] == [ci1.id]
    assert [r.id for r in keys.revoke(path, "ci", now=later)] == [ci2.id]  # one left: by name
    assert {r.id: r.revoked for r in keys.read_records(path)} == {
        a.id: later,
        ci1.id: later,
        ci2.id: later,
    }


def test_an_expired_key_of_the_same_name_does_not_make_revoke_ambiguous(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, old = new_key("svc", expires=NOW - timedelta(days=1))
    _, current = new_key("svc")
    keys.write_records(path, [old, current])
    changed = keys.revoke(path, "svc", now=NOW)
    assert current.id in [r.id for r in changed]


def test_revoke_again_or_unknown_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, a = new_key("alice")
    keys.write_records(path, [a])
    first = keys.revoke(path, "alice", now=NOW)
    assert len(first) == 1
    before = path.read_text()
    assert keys.revoke(path, "alice", now=NOW + timedelta(days=1)) == []
    assert keys.revoke(path, "nobody") == []
    assert path.read_text() == before  # first revocation time kept


# ---- limits on an existing key ------------------------------------------------------


def test_set_limits_by_id_or_name_changes_only_what_it_is_given(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, a = new_key("alice")
    _, b = new_key("bob")
    a = replace(a, limits=KeyLimits(rpm=60, tpm=1000))
    keys.write_records(path, [a, b])

    changed = keys.set_limits(path, "alice", lambda old: replace(old, rpm=120, concurrency=2), NOW)
    expected = KeyLimits(rpm=120, tpm=1000, concurrency=2)
    assert [r.limits for r in changed] == [expected]
    assert [r.limits for r in keys.read_records(path)] == [expected, NO_LIMITS]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    keys.set_limits(path, a.id, lambda old: replace(old, tpm=None, rpm=None), NOW)
    assert keys.read_records(path)[0].limits == KeyLimits(concurrency=2)
    assert keys.read_records(path)[0] == replace(a, limits=KeyLimits(concurrency=2))


def test_set_limits_refuses_an_ambiguous_name_and_skips_inactive_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, ci1 = new_key("ci")
    _, ci2 = new_key("ci")
    _, gone = new_key("gone", revoked=NOW)
    keys.write_records(path, [ci1, ci2, gone])
    before = path.read_text()

    def rpm(old: KeyLimits) -> KeyLimits:
        return replace(old, rpm=1)

    with pytest.raises(keys.AmbiguousName):
        keys.set_limits(path, "ci", rpm, NOW)
    assert keys.set_limits(path, "gone", rpm, NOW) == []
    assert keys.set_limits(path, gone.id, rpm, NOW) == []
    assert path.read_text() == before
    assert [r.id for r in keys.set_limits(path, ci2.id, rpm, NOW)] == [ci2.id]


# ---- lookups ---------------------------------------------------------------------


def _other_secret(key: str) -> str:
    secret = key[-43:]
    flipped = ("B" if secret[0] == "A" else "A") + secret[1:]
    return key[:-43] + flipped


@pytest.mark.parametrize(
    ("presented", "found"),
    [
        (lambda k: k, True),
        (_other_secret, False),
        (lambda k: unknown_key(), False),
        (lambda k: "hello", False),
        (lambda k: "", False),
        (lambda k: k[:-1], False),
        (lambda k: k + "x", False),
        (lambda k: "sk_" + k[3:], False),
        (lambda k: "sk-" + k[3:], False),
        (lambda k: k[:3] + k[3:15].upper() + k[15:], False),
        (lambda k: " " + k, False),
        (lambda k: f"Bearer {k}", False),
    ],
    ids=[
        "right",
        "wrong-secret",
        "unknown-id",
        "malformed",
        "empty",
        "truncated",
        "extended",
        "other-prefix-underscore",
        "other-prefix-dash",
        "uppercase-id",
        "leading-space",
        "with-scheme",
    ],
)
def test_keyring_find(presented: object, found: bool) -> None:
    key, record = new_key("target")
    while record.id.isdigit():  # "uppercase-id" needs a letter to change
        key, record = new_key("target")
    _, other = new_key("other")
    ring = KeyRing([other, record])
    result = ring.find(presented(key))  # type: ignore[operator]
    assert (result == record) if found else (result is None)


def test_keyring_finds_revoked_and_expired_records_too() -> None:
    # find() identifies; deciding revoked/expired is the auth stage's job.
    key, record = new_key(revoked=NOW, expires=NOW - timedelta(days=1))
    assert KeyRing([record]).find(key) == record


# ---- expiry --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2025-03-01", datetime(2025, 3, 1, 23, 59, 59, 999999, tzinfo=UTC)),
        ("2025-03-01T10:30:00", datetime(2025, 3, 1, 10, 30, tzinfo=UTC)),
        ("2025-03-01T10:30:00Z", datetime(2025, 3, 1, 10, 30, tzinfo=UTC)),
        (
            "2025-03-01T10:30:00+02:00",
            datetime(2025, 3, 1, 10, 30, tzinfo=timezone(timedelta(hours=2))),
        ),
    ],
)
def test_parse_expiry(text: str, expected: datetime) -> None:
    parsed = keys.parse_expiry(text)
    assert parsed == expected
    assert parsed.tzinfo is not None


@pytest.mark.parametrize("text", ["tomorrow", "2025-13-01", "01/03/2025", "", "2025-02-30"])
def test_parse_expiry_rejects_bad_input(text: str) -> None:
    with pytest.raises(ValueError, match="use YYYY-MM-DD or an ISO 8601 date-time"):
        keys.parse_expiry(text)


# ---- model allowlist -------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        ((), "anything-at-all", True),
        (("gpt-4o",), "gpt-4o", True),
        (("gpt-4o",), "gpt-4o-mini", False),
        (("gpt-4o",), "GPT-4o", False),
        (("gpt-4o*",), "gpt-4o-mini", True),
        (("gpt-4o*",), "gpt-4o", True),
        (("gpt-4o*",), "gpt-4", False),
        (("gpt-4o*",), "my-gpt-4o", False),
        (("*-mini",), "gpt-4o-mini", True),
        (("*",), "whatever", True),
        (("a.b",), "a.b", True),
        (("a.b",), "axb", False),
        (("a+b",), "aab", False),
        (("a+b",), "a+b", True),
        (("(x|y)",), "x", False),
        (("(x|y)",), "(x|y)", True),
        (("x$",), "x", False),
        (("claude-*", "gpt-4o"), "claude-3-5-haiku", True),
        (("claude-*", "gpt-4o"), "gpt-4o", True),
        (("claude-*", "gpt-4o"), "gpt-4o-mini", False),
    ],
)
def test_model_allowlist(models: tuple[str, ...], model: str, allowed: bool) -> None:
    _, record = new_key(models=models)
    assert record.restricts_models == bool(models)
    assert record.allows_model(model) is allowed


def test_allowlist_survives_dataclass_replace() -> None:
    _, record = new_key(models=("gpt-4o*",))
    revoked = replace(record, revoked=NOW)
    assert revoked.restricts_models and not revoked.allows_model("gpt-4")
