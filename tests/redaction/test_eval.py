"""The redaction evaluation: its corpus (bench/redaction_corpus.py) is labelled right,
its scorer (bench/redaction_eval.py) counts right, and the real detectors meet the
targets on a fresh corpus."""

from __future__ import annotations

import base64
import ipaddress
import itertools
import json
import os
import random
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import phonenumbers
import pytest

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import redaction_corpus as corpus
import redaction_eval as evaluation
from redaction_corpus import Decoy, Document, Label

from extproc import keys
from extproc.redaction.detect import Detector
from extproc.redaction.findings import ENTITIES, Finder, Finding

SEEDS = (0, 1, 7, 2024)
DOCUMENTS = 8000  # of the fresh corpus the targets are checked on


@pytest.fixture(scope="module")
def corpora() -> dict[int, list[Document]]:
    return {seed: corpus.generate(seed, 400) for seed in SEEDS}


# ---- the scorer, on fake detectors --------------------------------------------


def _doc(text: str, labels: Sequence[Label] = (), decoys: Sequence[Decoy] = ()) -> Document:
    return Document(text, list(labels), list(decoys), "en_US", "chat")


def _finder(*findings: Finding) -> evaluation.Find:
    return lambda text: list(findings)


@pytest.mark.parametrize(
    ("start", "end", "entity", "match"),
    [
        (10, 20, "phone", True),  # exact
        (11, 20, "phone", True),  # without a leading "+"
        (15, 20, "phone", True),  # half of the label
        (16, 20, "phone", False),  # less than half
        (0, 30, "phone", True),  # wider than the label (a key and its value)
        (10, 20, "email", False),  # another type
        (20, 30, "phone", False),  # adjacent, no overlap
    ],
)
def test_a_finding_matches_a_label_of_its_type_overlapping_half_of_it(
    start: int, end: int, entity: str, match: bool
) -> None:
    label = Label(10, 20, "phone", "phone")
    assert evaluation.matches(Finding(start, end, entity, entity), label) is match


def test_the_scorer_counts_found_missed_and_false_findings() -> None:
    text = "x" * 100
    doc = _doc(
        text,
        [
            Label(0, 10, "email", "email"),
            Label(20, 30, "email", "email"),
            Label(40, 50, "phone", "phone"),
        ],
    )
    find = _finder(
        Finding(0, 10, "email", "email"),  # TP
        Finding(2, 8, "email", "email"),  # a second finding of the same label: not a FP
        Finding(40, 44, "phone", "phone"),  # under half: a FP, and the label a FN
        Finding(60, 70, "email", "email"),  # FP
    )
    report = evaluation.score([doc], find, ["email", "phone"])
    email, phone = report.by_entity["email"], report.by_entity["phone"]
    assert (email.labels, email.found, email.missed, email.findings, email.false) == (2, 1, 1, 3, 1)
    assert (phone.labels, phone.found, phone.missed, phone.findings, phone.false) == (1, 0, 1, 1, 1)
    assert email.recall == 0.5 and email.precision == pytest.approx(2 / 3)
    assert phone.recall == 0.0 and phone.precision == 0.0
    assert sorted((e.entity, e.start, e.missed) for e in report.errors) == [
        ("email", 20, True),
        ("email", 60, False),
        ("phone", 40, False),
        ("phone", 40, True),
    ]
    assert report.negatives == 0 and email.negative_docs_hit == 0


def test_types_not_evaluated_are_ignored_both_ways() -> None:
    doc = _doc("x" * 40, [Label(0, 10, "iban", "iban")])
    report = evaluation.score([doc], _finder(Finding(20, 30, "phone", "phone")), ["email"])
    assert list(report.by_entity) == ["email"]
    assert report.by_entity["email"].labels == 0 and not report.errors


def test_secrets_are_tallied_per_kind_and_a_wrong_kind_still_matches() -> None:
    doc = _doc(
        "y" * 100,
        [
            Label(0, 40, "secrets", "github_token"),
            Label(50, 70, "secrets", "aws_access_key"),
            Label(80, 90, "secrets", "jwt"),
        ],
    )
    find = _finder(
        Finding(0, 40, "secrets", "github_token"),
        Finding(50, 70, "secrets", "generic_secret"),  # found, under another kind
        Finding(72, 78, "secrets", "slack_token"),  # FP
    )
    report = evaluation.score([doc], find, ["secrets"])
    kinds = report.by_kind
    assert (kinds["github_token"].found, kinds["github_token"].wrong_kind) == (1, 0)
    assert (kinds["aws_access_key"].found, kinds["aws_access_key"].wrong_kind) == (1, 1)
    assert (kinds["jwt"].labels, kinds["jwt"].missed) == (1, 1)
    assert (kinds["generic_secret"].findings, kinds["generic_secret"].false) == (1, 0)
    assert (kinds["slack_token"].findings, kinds["slack_token"].false) == (1, 1)
    assert kinds["slack_token"].precision == 0.0 and kinds["stripe_key"].recall is None
    secrets = report.by_entity["secrets"]
    assert (secrets.found, secrets.missed, secrets.false, secrets.wrong_kind) == (2, 1, 1, 1)
    rows = evaluation.table(report, evaluation.targets(report)).splitlines()
    assert any(r.split()[:4] == ["secrets:aws_access_key", "1", "0", "0"] for r in rows)
    slack = next(r for r in rows if r.strip().startswith("secrets:slack_token"))
    assert "MISSED precision" in slack


def test_false_findings_in_negative_documents_are_counted_per_document() -> None:
    docs = [
        _doc("z" * 50, decoys=[Decoy(0, 16, "non_luhn")]),
        _doc("z" * 50),
        _doc("z" * 50, [Label(30, 40, "email", "email")]),
    ]
    find = _finder(Finding(0, 16, "credit_card", "credit_card"), Finding(1, 5, "credit_card", "x"))
    report = evaluation.score(docs, find, ["credit_card", "email"])
    card = report.by_entity["credit_card"]
    assert report.negatives == 2
    assert card.false == 6 and card.negative_docs_hit == 2
    assert report.errors[0].near == "decoy non_luhn"
    failed = {(t.name, t.metric) for t in evaluation.targets(report) if not t.met}
    assert ("credit_card", "negatives with FP") in failed
    assert ("email", "recall") in failed  # the email was never found
    assert ("credit_card", "recall") not in failed  # no card labels: nothing to miss


def test_show_errors_prints_k_examples_with_context() -> None:
    text = "before " * 10 + "alice@example.org" + " after" * 10
    start = text.index("alice")
    doc = _doc(text, [Label(start, start + 17, "email", "email")])
    report = evaluation.score([doc, doc, doc], _finder(), ["email"])
    out = evaluation.show_errors(report, [doc, doc, doc], 2)
    assert "-- email FN: 3" in out
    assert out.count("⟦alice@example.org⟧") == 2
    assert "before before ⟦" in out and "⟧ after after" in out


def _oracle(
    documents: Sequence[Document], skip: Sequence[str] = ()
) -> Callable[[Sequence[str], Sequence[str]], tuple[evaluation.Find, list[str], list[str]]]:
    """A stand-in for evaluation.build: a detector that knows the corpus and finds
    exactly what was planted, except the kinds it is told to skip."""
    planted = {d.text: d.labels for d in documents}

    def build(
        entities: Sequence[str], regions: Sequence[str]
    ) -> tuple[evaluation.Find, list[str], list[str]]:
        def find(text: str) -> list[Finding]:
            return [
                Finding(label.start, label.end, label.entity, label.kind)
                for label in planted.get(text, [])
                if label.kind not in skip and label.entity in entities
            ]

        return find, list(entities), []

    return build


def test_the_exit_status_says_whether_the_targets_are_met(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    documents = corpus.generate(5, 300)
    monkeypatch.setattr(evaluation, "build", _oracle(documents))
    assert evaluation.main(["--seed", "5", "--documents", "300"]) == 0
    out = capsys.readouterr().out
    assert "seed 5" in out and "throughput:" in out and "MISSED" not in out

    monkeypatch.setattr(evaluation, "build", _oracle(documents, skip=["jwt"]))
    assert evaluation.main(["--seed", "5", "--documents", "300", "--show-errors", "1"]) == 1
    out = capsys.readouterr().out
    assert "MISSED secrets:jwt recall" in out and "-- secrets FN:" in out
    # ip_address has no target: missing every address still passes.
    monkeypatch.setattr(evaluation, "build", _oracle(documents, skip=["ip_address"]))
    assert evaluation.main(["--seed", "5", "--documents", "300"]) == 0


def test_detectors_not_implemented_are_left_out_and_fail(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def finder(entity: str, regions: Sequence[str]) -> Finder:
        def find(text: str) -> list[Finding]:
            if entity == "phone":
                raise NotImplementedError
            start = text.find("@")
            return [Finding(start - 1, start + 9, "email", "email")] if entity == "email" else []

        return find

    def no_detector(**_: object) -> None:
        raise NotImplementedError  # as detect.py does while any finder is missing

    monkeypatch.setattr(evaluation, "_finder", finder)
    monkeypatch.setattr(evaluation, "Detector", no_detector)
    find, entities, missing = evaluation.build(["email", "phone", "iban"], ["US"])
    assert (entities, missing) == (["email", "iban"], ["phone"])
    assert find("x a@b.example y") == [Finding(2, 12, "email", "email")]

    assert evaluation.main(["--seed", "6", "--documents", "100"]) == 1
    out = capsys.readouterr().out
    assert "not implemented, not evaluated: phone" in out
    assert "MISSED phone runs" in out


# ---- the corpus ---------------------------------------------------------------

_SECRET_SHAPES = {
    "openai_key": r"sk-[A-Za-z0-9]{20}T3BlbkFJ[A-Za-z0-9]{20}"
    r"|sk-(?:proj|svcacct|admin)-[A-Za-z0-9_-]{74}T3BlbkFJ[A-Za-z0-9_-]{74}",
    "anthropic_key": r"sk-ant-(?:api03|admin01)-[A-Za-z0-9_-]{93}AA",
    "aws_access_key": r"(?:AKIA|ASIA)[A-Z2-7]{16}",
    "aws_secret_key": r"[A-Za-z0-9+/]{40}",
    "github_token": r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59}",
    "gitlab_token": r"gl(?:pat|dt|rt)-[A-Za-z0-9_-]{20}",
    "slack_token": r"xoxb-[0-9]{10,13}-[0-9]{12}-[A-Za-z0-9]{24}"
    r"|xoxp-[0-9]{10,13}-[0-9]{10,13}-[0-9]{10,13}-[0-9a-f]{32}",
    "stripe_key": r"(?:sk_live|rk_live|sk_test)_(?:[A-Za-z0-9]{24}|[A-Za-z0-9]{99})",
    "google_api_key": r"AIza[A-Za-z0-9_-]{35}",
    "jwt": r"eyJ[A-Za-z0-9_-]+\.eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+",
    "private_key": r"-----BEGIN ([A-Z ]*PRIVATE KEY)-----(?:\n|\\n)[A-Za-z0-9+/=\n\\]+"
    r"-----END \1-----",
    "generic_secret": r"[A-Za-z0-9!@#%^*+=._-]{16,40}",
}


def _valid(doc: Document, label: Label) -> bool:
    value = doc.text[label.start : label.end]
    if value != value.strip() or not value:
        return False
    if label.entity == "email":
        return re.fullmatch(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[a-z]{2,}", value) is not None
    if label.entity == "phone":
        region = corpus.REGIONS[doc.locale]
        number = phonenumbers.parse(value, region)
        return phonenumbers.is_valid_number_for_region(number, region)
    if label.entity == "credit_card":
        digits = re.sub(r"[ -]", "", value)
        return digits.isdigit() and 12 <= len(digits) <= 19 and corpus.luhn_ok(digits)
    if label.entity == "iban":
        return corpus.iban_ok(value)
    if label.entity == "us_ssn":
        if re.fullmatch(r"[0-9]{9}", value):  # bare: only next to "SSN"
            return "ssn" in doc.text[max(0, label.start - 12) : label.start].lower()
        m = re.fullmatch(r"([0-9]{3})-([0-9]{2})-([0-9]{4})", value)
        return m is not None and m[1] not in ("000", "666") and m[1] < "900" and m[2] != "00"
    if label.entity == "ip_address":
        return ipaddress.ip_address(value) is not None
    assert label.entity == "secrets" and label.kind in corpus.SECRET_KINDS
    if label.kind == "tollway_key":
        return keys._KEY_RE.fullmatch(value) is not None
    if not re.fullmatch(_SECRET_SHAPES[label.kind], value):
        return False
    if label.kind == "github_token" and value[3] == "_":
        return corpus.github_checksum(value[4:34]) == value[34:]
    if label.kind == "jwt":
        header = value.split(".")[0]
        return "alg" in json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    if label.kind in corpus.NAMED_ONLY:  # assigned to its name, and random
        name = doc.text[max(0, label.start - 40) : label.start].lower()
        said = ("pass", "secret", "key", "://")
        return doc.shape != "csv" and any(w in name for w in said) and len(set(value)) >= 12
    return True


def _all_labels(corpora: dict[int, list[Document]]) -> Iterator[tuple[int, Document, Label]]:
    for seed, documents in corpora.items():
        for doc in documents:
            for label in doc.labels:
                yield seed, doc, label


def test_every_label_is_exactly_a_valid_value_of_its_type(
    corpora: dict[int, list[Document]],
) -> None:
    bad = [
        (seed, label, doc.text[label.start : label.end])
        for seed, doc, label in _all_labels(corpora)
        if not _valid(doc, label)
    ]
    assert not bad, bad[:5]


def test_labels_and_decoys_do_not_overlap(corpora: dict[int, list[Document]]) -> None:
    for documents in corpora.values():
        for doc in documents:
            spans = sorted(
                [(s.start, s.end) for s in doc.labels] + [(s.start, s.end) for s in doc.decoys]
            )
            assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans)), doc


def test_every_locale_shape_type_and_kind_appears(corpora: dict[int, list[Document]]) -> None:
    for documents in corpora.values():
        assert {(d.locale, d.shape) for d in documents} == {
            (locale, shape) for locale in corpus.LOCALES for shape in corpus.SHAPES
        }
        assert {label.entity for d in documents for label in d.labels} == set(ENTITIES)
        kinds = {label.kind for d in documents for label in d.labels if label.entity == "secrets"}
        assert kinds == set(corpus.SECRET_KINDS)
        assert {decoy.kind for d in documents for decoy in d.decoys} == set(corpus.DECOY_KINDS)
        assert 0.15 < sum(d.negative for d in documents) / len(documents) < 0.35


def test_decoys_really_are_negatives(corpora: dict[int, list[Document]]) -> None:
    checks: dict[str, Callable[[str], bool]] = {
        "non_luhn": lambda v: (
            len(v.replace(" ", "")) == 16 and not corpus.luhn_ok(v.replace(" ", ""))
        ),
        "bad_iban": lambda v: (
            re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9 ]+", v) is not None and not corpus.iban_ok(v)
        ),
        "placeholder": lambda v: v in corpus.PLACEHOLDERS,
        "uuid": lambda v: str(uuid.UUID(v)) == v,
        "isbn": corpus.isbn_ok,
        "git_sha": lambda v: re.fullmatch(r"[0-9a-f]{7,40}", v) is not None,
        "sha256": lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "data_uri": lambda v: v.startswith("data:image/png;base64,iVBORw0KGg"),
        "mac": lambda v: re.fullmatch(r"[0-9a-fA-F]{2}([:-][0-9a-fA-F]{2}){5}", v) is not None,
    }
    seen = set()
    for documents in corpora.values():
        for doc in documents:
            for decoy in doc.decoys:
                check = checks.get(decoy.kind)
                value = doc.text[decoy.start : decoy.end]
                assert check is None or check(value), (decoy.kind, value)
                seen.add(decoy.kind)
    assert set(checks) <= seen


def test_the_same_seed_gives_the_same_corpus() -> None:
    assert corpus.generate(11, 120) == corpus.generate(11, 120)
    assert corpus.generate(11, 120) != corpus.generate(12, 120)


def test_the_same_seed_gives_the_same_corpus_in_another_process() -> None:
    # Nothing may depend on set order (string hashing) or on today's date.
    script = (
        "import hashlib, sys; sys.path.insert(0, 'bench'); import redaction_corpus as c; "
        "print(hashlib.sha256(repr(c.generate(3, 400)).encode()).hexdigest())"
    )
    root = Path(__file__).parents[2]
    digests = {
        subprocess.run(
            [sys.executable, "-c", script],
            cwd=root,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for hash_seed in ("1", "2")
    }
    assert len(digests) == 1


# ---- the real detectors -------------------------------------------------------


def test_the_detectors_meet_the_targets_on_a_fresh_corpus() -> None:
    seed = random.SystemRandom().randrange(2**32)
    print(f"\nredaction evaluation seed {seed}")  # (on a line of its own, for a rerun)
    # 8,000 documents: ~370 of each secret kind, so that one chance coincidence (a
    # random password that looks like %NAME%) is not taken for a recall under 0.995.
    # With 3,000 (~140 each) one miss failed about one seed in 20.
    documents = corpus.generate(seed, DOCUMENTS)
    detector = Detector(entities=ENTITIES, phone_regions=list(corpus.REGIONS.values()))
    report = evaluation.score(documents, detector.find, ENTITIES)
    missed = [f"{t.name} {t.metric} {t.got}" for t in evaluation.targets(report) if not t.met]
    assert not missed, (
        f"seed {seed}: repeat with bench/redaction_eval.py --seed {seed} --documents {DOCUMENTS} "
        f"--show-errors 5; missed: {missed}"
    )
