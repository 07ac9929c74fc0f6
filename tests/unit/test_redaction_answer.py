"""An answer's text redacted and restored as it streams (redaction/answer.py).

The detector here is a stand-in that finds fixed strings, so these tests are
about splitting, holding back and restoring, not about detection.
"""

from __future__ import annotations

import re

import pytest

from extproc.redaction.answer import WINDOW, AnswerText
from extproc.redaction.detect import Detector
from extproc.redaction.findings import Finding
from extproc.redaction.policy import Policy, Rewrite

CARD = "4111 1111 1111 1111"
KEY = "sk-live-" + "a1B2c3D4" * 6  # one run of 56 non-space characters


class Literal(Detector):
    """Finds the card and the key above (and what looks like an SSN after "SSN")."""

    def __init__(self) -> None:
        super().__init__(())

    def find(self, text: str) -> list[Finding]:
        found = [
            Finding(m.start(), m.end(), "credit_card", "credit_card")
            for m in re.finditer(CARD, text)
        ]
        found += [
            Finding(m.start(), m.end(), "secrets", "stripe_key")
            for m in re.finditer(re.escape(KEY), text)
        ]
        found += [
            Finding(m.start(1), m.end(1), "us_ssn", "us_ssn")
            for m in re.finditer(r"SSN\D{0,80}(\d{9})\b", text)
        ]
        return sorted(found, key=lambda f: f.start)


def answer(
    redact: bool = True, restore: bool = False, originals: dict[str, str] | None = None
) -> AnswerText:
    actions = {
        "credit_card": "mask",
        "secrets": "placeholder",
        "us_ssn": "mask",
        "email": "placeholder",
    }
    rewrite = Rewrite(Policy("p", Literal(), actions))
    rewrite.originals.update(originals or {})
    return AnswerText(rewrite, redact=redact, restore=restore)


def stream(text: str, sizes: list[int], a: AnswerText) -> tuple[str, list[str]]:
    """Feed ``text`` in pieces of the given sizes (cycled); the last piece ends the stream."""
    out, pieces, at, i = [], [], 0, 0
    while at < len(text):
        size = sizes[i % len(sizes)]
        piece = text[at : at + size]
        at += size
        i += 1
        sent = a.piece(("choice", 0), piece, last=at >= len(text))
        out.append(sent)
        pieces.append(piece)
    return "".join(out), out


TEXT = f"Your card {CARD} was charged. The key {KEY} is live; SSN on file: 123456789. Thanks!"
REDACTED = (
    "Your card **** **** **** 1111 was charged. The key [SECRET_1] is live; "
    "SSN on file: *****6789. Thanks!"
)


def test_a_whole_text_is_redacted() -> None:
    assert answer().whole(TEXT) == REDACTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 11, 16, 64, 1000])
def test_pieces_of_any_size_give_the_same_redacted_text(size: int) -> None:
    assert stream(TEXT, [size], answer())[0] == REDACTED


def test_an_entity_split_at_every_offset_is_caught() -> None:
    for cut in range(1, len(TEXT)):
        a = answer()
        got = a.piece(("choice", 0), TEXT[:cut]) + a.piece(("choice", 0), TEXT[cut:], last=True)
        assert got == REDACTED, cut


def test_text_is_held_back_by_the_window_at_most_while_no_entity_is_open() -> None:
    prose = "word " * 40  # no entity, spaces everywhere
    a = answer()
    sent = ""
    for i in range(0, len(prose), 3):
        sent += a.piece(("choice", 0), prose[i : i + 3])
        assert len(prose[: i + 3]) - len(sent) <= WINDOW + 5  # the window, to a word boundary
    assert sent + a.flush(("choice", 0)) == prose


def test_streams_are_held_apart() -> None:
    a = answer()
    left = a.piece(("choice", 0), "Your card 4111 1111 ")
    right = a.piece(("choice", 1), "another text entirely " * 4)
    left += a.piece(("choice", 0), "1111 1111 done", last=True)
    assert left == "Your card **** **** **** 1111 done"
    assert right and "4111" not in right


def test_restore_puts_originals_back_even_when_a_placeholder_is_split() -> None:
    originals = {"[EMAIL_1]": "jane@example.com", "[PHONE_2]": "+1 415 555 0100"}
    text = "Write to [EMAIL_1] or call [PHONE_2]; [UNKNOWN_3] stays."
    want = "Write to jane@example.com or call +1 415 555 0100; [UNKNOWN_3] stays."
    for size in (1, 2, 4, 9):
        a = answer(redact=False, restore=True, originals=originals)
        assert stream(text, [size], a)[0] == want
    assert answer(redact=False, restore=True, originals=originals).whole(text) == want


def test_restore_alone_holds_back_only_an_open_bracket() -> None:
    a = answer(redact=False, restore=True, originals={"[EMAIL_1]": "x@y.io"})
    assert a.piece(("c", 0), "Hello there [EMA") == "Hello there "
    assert a.piece(("c", 0), "IL_1] bye") == "x@y.io bye"
    assert a.piece(("c", 0), "[not one") == "[not one"  # a lower-case letter: never a placeholder


def test_restore_of_a_request_without_placeholders_is_off() -> None:
    assert not answer(redact=False, restore=True).active


def test_redact_then_restore_leaves_the_clients_own_value() -> None:
    a = answer(redact=True, restore=True, originals={"[CREDIT_CARD_1]": CARD})
    assert a.whole(f"You sent [CREDIT_CARD_1]; mine is {CARD}.") == (
        f"You sent {CARD}; mine is **** **** **** 1111."
    )


def test_the_first_text_goes_out_once_the_window_has_filled() -> None:
    """Time to first token grows by the time the model takes to write WINDOW
    characters: with pieces of 4 characters (about a token each), the client sees
    the first text at the piece that completes the window (a word boundary)."""
    a = answer()
    words = ("The weather today is mild and dry with a light breeze from the west, " * 3).split(" ")
    sent_at = None
    total = 0
    for i, word in enumerate(words):
        total += len(word) + 1
        if a.piece(("choice", 0), word + " ") and sent_at is None:
            sent_at = (i + 1, total)
    assert sent_at is not None
    pieces, chars = sent_at
    assert WINDOW < chars <= WINDOW + max(len(w) + 1 for w in words)
    assert pieces <= WINDOW // 3  # ~12 tokens of 4 characters
