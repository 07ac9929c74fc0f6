"""PII detectors: what each finds (the entity's span) and the near misses it must not."""

from __future__ import annotations

import random
import re

import phonenumbers
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.redaction import pii
from extproc.redaction.findings import Finder

REGIONS = ("US", "GB", "DE", "FR", "ES", "IT", "NL", "BR", "IN", "JP")
PHONE = pii.phone_finder(REGIONS)


def found(finder: Finder, text: str) -> list[str]:
    return [text[f.start : f.end] for f in finder(text)]


def entities(finder: Finder, text: str) -> set[tuple[str, str]]:
    return {(f.entity, f.kind) for f in finder(text)}


# --- email ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "emails"),
    [
        ("write to jane.doe@example.com today", ["jane.doe@example.com"]),
        ("<bob+billing@mail.example.co.uk>.", ["bob+billing@mail.example.co.uk"]),
        ('"ops@sub.corp.example.org", next', ["ops@sub.corp.example.org"]),
        ("(a_b-c%d@x-y.io)", ["a_b-c%d@x-y.io"]),
        ("mailto:first.last@example.museum", ["first.last@example.museum"]),
        ("josé@exämple.de", ["josé@exämple.de"]),  # Unicode local part, IDN domain
        ("メールアドレスはtaro@example.jpです", ["taro@example.jp"]),  # CJK around it
        ("two: a@x.org,b@y.net", ["a@x.org", "b@y.net"]),
        ("end of sentence: x@example.com.\nnext", ["x@example.com"]),
        ("user@localhost", []),  # no dot in the domain
        ("user@example.c", []),  # one-letter TLD
        ("user@example.123", []),
        ("icon@2x.png and logo@3x.jpg", []),  # file names, not addresses
        ("git@github.com:owner/repo.git", []),  # an SSH remote
        ("@decorator and @types/node", []),
        (".user@example.com", ["user@example.com"]),  # no leading dot
        ("a..b@example.com", []),
        ("trailing.@example.com", []),
        ("x" * 65 + "@example.com", []),  # local part longer than 64
    ],
)
def test_email(text: str, emails: list[str]) -> None:
    assert found(pii.find_email, text) == emails


def test_email_finding_names_its_entity() -> None:
    assert entities(pii.find_email, "a@example.com") == {("email", "email")}


# --- phone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "phones"),
    [
        # International forms, of any country, wherever they are.
        ("ring +1 415-555-2671 now", ["+1 415-555-2671"]),
        ("+14155552671", ["+14155552671"]),
        ("x,+49(0)30 1234567,y", ["+49(0)30 1234567"]),
        ("+33 (0)1 23 45 67 89", ["+33 (0)1 23 45 67 89"]),
        ("0049 30 1234567", ["0049 30 1234567"]),
        ("001-415-555-2671x123", ["001-415-555-2671x123"]),  # with its extension
        ("+81 90-1234-5678", ["+81 90-1234-5678"]),
        ("+91 98765 43210", ["+91 98765 43210"]),
        ("+55 11 91234-5678", ["+55 11 91234-5678"]),
        ("+65 6123 4567", ["+65 6123 4567"]),  # not one of the regions: still found
        # National forms written like phone numbers, one per region.
        ("call (415) 555-2671.", ["(415) 555-2671"]),
        ("415.555.2671", ["415.555.2671"]),
        ("1-800-555-0199", ["1-800-555-0199"]),
        ("020 7946 0958", ["020 7946 0958"]),
        ("(0113) 496 0123", ["(0113) 496 0123"]),
        ("030 12345678", ["030 12345678"]),
        ("(0221) 123456", ["(0221) 123456"]),
        ("01 23 45 67 89", ["01 23 45 67 89"]),
        ("01\u00a023\u00a045\u00a067\u00a089", ["01\u00a023\u00a045\u00a067\u00a089"]),
        ("912 345 678", ["912 345 678"]),
        ("06 1234 5678", ["06 1234 5678"]),
        ("020-1234567", ["020-1234567"]),
        ("(11) 91234-5678", ["(11) 91234-5678"]),
        ("98765 43210", ["98765 43210"]),
        ("03-1234-5678", ["03-1234-5678"]),
        ("電話03-1234-5678です", ["03-1234-5678"]),
        # Unformatted national numbers next to a word for phone.
        ("mobile: 4155552671", ["4155552671"]),
        ("Telefon 03012345678", ["03012345678"]),
        ("llámame al 912345678", ["912345678"]),
        ("मेरा फ़ोन नंबर 9876543210 है", ["9876543210"]),
        ("मुझे 9876543210 पर कॉल करें", ["9876543210"]),
        ("電話番号は0312345678です", ["0312345678"]),
        # Two numbers in one run of digits.
        ("Tel/Fax: 030 1234567 / 030 7654321", ["030 1234567", "030 7654321"]),
        ("Tel 030 / 1234567", ["030 / 1234567"]),
    ],
)
def test_phone(text: str, phones: list[str]) -> None:
    assert found(PHONE, text) == phones


def test_a_table_columns_name_gives_its_bare_numbers_context() -> None:
    table = (
        "name,city,phone,order\n"
        'Anna Weber,Berlin,03012345678,"1,5 kg"\n'
        "Tom Brown,Leeds,01134960000,0305551234\n"
    )
    assert found(PHONE, table) == ["03012345678", "01134960000"]  # not the order column
    tsv = "name\tTelefon\nAnna\t03012345678\n"
    assert found(PHONE, tsv) == ["03012345678"]
    # Without a header that names phones, bare national numbers stay unflagged.
    assert found(PHONE, "name,city,ref\nAnna,Berlin,03012345678\n") == []


@pytest.mark.parametrize(
    "text",
    [
        "4155552671",  # unformatted, no word for phone
        "on 2024-01-15, 15.01.2024 and 01/15/2024",
        "UPDATED_AT=2023-02-06 19:47:34",
        "at 12:30:45 and 09:15",
        "order #123456789 and order number 415-555-2671",
        "PO-2024-55512",
        "invoice 2024-118, INV-2022-898391",
        "ISBN 978-3-16-148410-0 and 979-8-0357-1041-4, 0-306-40615-2",
        "1,234,567.89 USD and 1.234.567,89 €",
        "version 10.0.19041.1 and v1.2.3.4",
        "550e8400-e29b-41d4-a716-446655440000",
        "created 1705312345, ts=1705312345678",
        "card 4111 1111 1111 1111, Amex 3782 822463 10005",
        "DE89 3704 0044 0532 0130 00 and NL91 ABNA 0417 1643 00",
        "192.168.218.55 and 1.2.840.113549.1.1.11",
        "SSN 123-45-6789",
        "zip 94105-1234, CEP 01310-100",
        "PART_NO=5733-0613-34",
        "32.781160,166.432266",
        "30 1234567",  # a German area code without its trunk 0
        "+1 555 0100",  # an invalid international number
        "call 555-0100",  # a US local number: valid nowhere without its area code
    ],
)
def test_phone_near_misses(text: str) -> None:
    assert found(PHONE, text) == []


def test_phone_regions_limit_national_forms_only() -> None:
    us = pii.phone_finder(["US"])
    assert found(us, "030 12345678") == []  # German, written nationally
    assert found(us, "+49 30 12345678") == ["+49 30 12345678"]
    assert found(us, "(415) 555-2671") == ["(415) 555-2671"]
    assert entities(us, "(415) 555-2671") == {("phone", "phone")}


def test_phone_validity_cache_is_per_finder() -> None:
    """A national number valid in one finder's regions is not taken from its cache by
    a finder of other regions; found again, it is found the same."""
    de = pii.phone_finder(["DE"])
    assert found(de, "Tel. 030 12345678") == ["030 12345678"]
    assert found(pii.phone_finder(["US"]), "Tel. 030 12345678") == []
    assert found(de, "ruf an: 030 12345678") == ["030 12345678"]


def test_phone_unknown_region_is_refused() -> None:
    with pytest.raises(ValueError, match="XX"):
        pii.phone_finder(["US", "XX"])


def test_phone_validity_is_phonenumbers() -> None:
    """The compiled plans decide as phonenumbers.parse + is_valid_number do, for
    national numbers of each region and international ones."""
    rng = random.Random(7)
    for region in REGIONS:
        plan = pii._plan(region)
        assert plan is not None
        for _ in range(1500):
            digits = rng.choice(("0", "", "1", "3", "6", "9")) + "".join(
                rng.choice("0123456789") for _ in range(rng.randint(6, 12))
            )
            if digits.startswith("0") and digits[1:2] == "0":
                continue  # an international prefix: read as + by the finder
            try:
                want = phonenumbers.is_valid_number(phonenumbers.parse(digits, region))
            except phonenumbers.NumberParseException:
                want = False
            nsn, _ = plan.national(digits)
            assert pii._valid_for_country(int(plan.country_code), nsn) == want, (region, digits)
            if digits[0] != "0":
                try:
                    want = phonenumbers.is_valid_number(phonenumbers.parse("+" + digits))
                except phonenumbers.NumberParseException:
                    want = False
                assert pii._valid_international(digits) == want, digits


# --- credit cards -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cards"),
    [
        ("card 4111 1111 1111 1111, thanks", ["4111 1111 1111 1111"]),  # Visa
        ("4111-1111-1111-1111", ["4111-1111-1111-1111"]),
        ("4111111111111111", ["4111111111111111"]),
        ("4222222222222", ["4222222222222"]),  # Visa, 13 digits
        ("5555 5555 5555 4444", ["5555 5555 5555 4444"]),  # Mastercard
        ("2221 0000 0000 0009", ["2221 0000 0000 0009"]),  # Mastercard 2-series
        ("2720 9999 9999 9996", ["2720 9999 9999 9996"]),
        ("3782 822463 10005", ["3782 822463 10005"]),  # Amex, 4-6-5
        ("371449635398431", ["371449635398431"]),
        ("3056 930902 5904", ["3056 930902 5904"]),  # Diners, 4-6-4
        ("6011 1111 1111 1117", ["6011 1111 1111 1117"]),  # Discover
        ("6221 2600 0000 0000", ["6221 2600 0000 0000"]),  # Discover 622126-622925
        ("3530 1113 3330 0000", ["3530 1113 3330 0000"]),  # JCB
        ("6200 0000 0000 0005", ["6200 0000 0000 0005"]),  # UnionPay
        ("2200 0000 0000 0004", ["2200 0000 0000 0004"]),  # Mir
        ("6759 6498 2643 8453", ["6759 6498 2643 8453"]),  # Maestro
        ("5081 2600 0000 0001", ["5081 2600 0000 0001"]),  # RuPay 508
        ("4111 1111 1111 1111 12/25", ["4111 1111 1111 1111"]),  # expiry after it
        ("(4111111111111111)", ["4111111111111111"]),
        ("pan=4111111111111111\n", ["4111111111111111"]),
        ("a,4111111111111111,b", ["4111111111111111"]),
    ],
)
def test_credit_card(text: str, cards: list[str]) -> None:
    assert found(pii.find_credit_card, text) == cards


@pytest.mark.parametrize(
    "text",
    [
        "4111111111111112",  # fails Luhn
        "4111 1111-1111 1111",  # mixed separators
        "41111 11111 11111 1",  # no card's grouping
        "14111111111111111",  # inside a longer run of digits
        "4111111111111111234",  # 19 digits: Luhn fails for the whole
        "0.4111111111111111",  # a decimal
        "x4111111111111111",  # part of a token
        "xoxb-500698883294-4111111111111111",
        "7111 1111 1111 1114",  # Luhn-valid, no brand starts with 7
        "3411 1111 1111 1110",  # Luhn-valid, an Amex prefix but 16 digits
        "5994 8928 0405 7650",  # 12 Luhn-valid digits inside a 16-digit grouping
        "4745 5622 9155 5463",
        "GB88 MIBG 5028 6203 0020 13",  # the rest of an IBAN
    ],
)
def test_credit_card_near_misses(text: str) -> None:
    assert found(pii.find_credit_card, text) == []


# --- IBAN -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "cards"),
    [
        # the whole run a card in groups of four, or one group: taken without windows
        ("4111-1111-1111-1111", ["4111-1111-1111-1111"]),
        ("4111111111111111", ["4111111111111111"]),
        ("5500 0000 0000 0004 and 5500 0000 0000 0004", ["5500 0000 0000 0004"] * 2),
        # the whole run no card: its windows still are looked at
        ("4111 1111 1111 1111 123", ["4111 1111 1111 1111"]),
        ("4111 1111 1111 1112", []),
        ("pay 4111 1111 1111 1111 1111", []),
    ],
)
def test_credit_card_whole_run_or_windows(text: str, cards: list[str]) -> None:
    assert found(pii.find_credit_card, text) == cards


def test_phone_skips_card_groupings_without_plus() -> None:
    assert found(PHONE, "call 4111 1111 1111") == []
    assert found(PHONE, "card 4111 1111 1111 1111, phone +1 415 555 0132") == ["+1 415 555 0132"]


@pytest.mark.parametrize(
    ("text", "ibans"),
    [
        ("IBAN: DE89 3704 0044 0532 0130 00.", ["DE89 3704 0044 0532 0130 00"]),
        ("DE89370400440532013000", ["DE89370400440532013000"]),
        ("GB82 WEST 1234 5698 7654 32", ["GB82 WEST 1234 5698 7654 32"]),
        ("GB82WEST12345698765432", ["GB82WEST12345698765432"]),
        ("gb82west12345698765432", ["gb82west12345698765432"]),  # lower case
        ("FR14 2004 1010 0505 0001 3M02 606", ["FR14 2004 1010 0505 0001 3M02 606"]),
        ("NL91ABNA0417164300,", ["NL91ABNA0417164300"]),
        ("(ES91 2100 0418 4502 0005 1332)", ["ES91 2100 0418 4502 0005 1332"]),
        ("IT60X0542811101000000123456", ["IT60X0542811101000000123456"]),
        ("BE68539007547034", ["BE68539007547034"]),
        ("NO9386011117947", ["NO9386011117947"]),  # the shortest
        ("CH9300762011623852957", ["CH9300762011623852957"]),
        ('"iban": "PL61109010140000071219812874"', ["PL61109010140000071219812874"]),
    ],
)
def test_iban(text: str, ibans: list[str]) -> None:
    assert found(pii.find_iban, text) == ibans


@pytest.mark.parametrize(
    "text",
    [
        "DE89 3704 0044 0532 0130 01",  # bad checksum
        "DE88370400440532013000",
        "DE89 3704 0044 0532 0130",  # too short for Germany
        "DE8937040044053201300012",  # too long, and glued to more digits
        "XX89370400440532013000",  # no such country
        "GB82West12345698765432",  # mixed case
        "DE89 37040044 0532 0130 00",  # groups that are not of four
        "xDE89370400440532013000",
    ],
)
def test_iban_near_misses(text: str) -> None:
    assert found(pii.find_iban, text) == []


# --- US social security numbers ---------------------------------------------------


@pytest.mark.parametrize(
    ("text", "ssns"),
    [
        ("SSN 123-45-6789.", ["123-45-6789"]),
        ("123 45 6789", ["123 45 6789"]),
        ("a,567-12-3456,b", ["567-12-3456"]),
        ("SSN: 123456789", ["123456789"]),
        ("social security number 123456789", ["123456789"]),
        ("ssn=123456789", ["123456789"]),
        ("000-12-3456 666-12-3456 900-12-3456 999-12-3456", []),  # no such areas
        ("123-00-4567 123-45-0000", []),  # group 00, serial 0000
        ("078-05-1120", []),  # the wallet card's, voided
        ("123456789", []),  # bare, no word for it
        ("123-45-67890 1123-45-6789", []),  # inside longer numbers
        ("123-45 6789", []),  # mixed separators
        ("x123-45-6789", []),
    ],
)
def test_us_ssn(text: str, ssns: list[str]) -> None:
    assert found(pii.find_us_ssn, text) == ssns


# --- IP addresses -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "addresses"),
    [
        ("host 10.0.0.1:8080", ["10.0.0.1"]),
        ("from 192.168.1.254.", ["192.168.1.254"]),
        ("ip=0.0.0.0, 255.255.255.255", ["0.0.0.0", "255.255.255.255"]),
        ("http://93.184.216.34/index", ["93.184.216.34"]),
        ("10.0.0.0/8", ["10.0.0.0"]),
        ("v1.2.3.4 and version 10.0.0.1", []),
        ("1.3.6.1.4.1.311", []),  # an OID
        ("256.1.1.1 and 1.2.3", []),
        ("01.2.3.4", []),  # a leading zero
        ("Chrome/120.0.0.0", []),
        ("see section 1.2.3.4", []),
        ("2001:db8::1", ["2001:db8::1"]),
        (
            "[2001:0db8:85a3:0000:0000:8a2e:0370:7334]:443",
            ["2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
        ),
        ("fe80::1%eth0", ["fe80::1"]),
        ("::ffff:192.0.2.1", ["192.0.2.1", "::ffff:192.0.2.1"]),
        ("12:30:45", []),  # a time
        ("00:1A:2B:3C:4D:5E and 00:1a:2b:ff:fe:3c:4d:5e", []),  # MAC, EUI-64
        ("::1 and a[1::2]", []),
        ("std::vector and Foo::bar", []),
    ],
)
def test_ip_address(text: str, addresses: list[str]) -> None:
    assert sorted(found(pii.find_ip_address, text)) == sorted(addresses)


# --- every finder -----------------------------------------------------------------

FINDERS: dict[str, Finder] = {
    "email": pii.find_email,
    "phone": PHONE,
    "credit_card": pii.find_credit_card,
    "iban": pii.find_iban,
    "us_ssn": pii.find_us_ssn,
    "ip_address": pii.find_ip_address,
}
# Text made mostly of what the finders look at: digits, separators, @, letters.
NOISE = st.text(
    alphabet=st.sampled_from("0123456789 -./()+:@,#\nxXDEde\u00a0電é"), max_size=300
) | st.text(max_size=200)


@pytest.mark.parametrize("entity", FINDERS)
@settings(max_examples=300, deadline=None)
@given(text=NOISE)
def test_random_text_never_breaks_a_finder(entity: str, text: str) -> None:
    for f in FINDERS[entity](text):
        assert 0 <= f.start < f.end <= len(text)
        assert f.entity == f.kind == entity


# The runs _numbers finds, matched on the digits as they are.
RUNS = re.compile(r"[0-9][0-9 \u00a0\u202f().\-/]{2,}[0-9]")


@settings(max_examples=300, deadline=None)
@given(text=NOISE | st.text(alphabet=st.sampled_from("0123456789 .-٣९\ud800日😀"), max_size=80))
def test_numbers_are_the_runs_of_digits_in_any_text(text: str) -> None:
    """Found with the digits made 0 (in UTF-8 for text that is not ASCII, lone
    surrogates included), the runs are those of the text itself."""
    pii.forget_texts()
    assert pii._numbers(text) == tuple(m.span() for m in RUNS.finditer(text))


@pytest.mark.parametrize(
    "text",
    [
        "1 " * 20000,
        "01 23 " * 8000,
        "1." * 20000,
        "1-" * 20000,
        "a@" * 20000,
        ":" * 40000,
        "DE89 " * 8000,
        ("a" * 63 + "@") * 600,
    ],
)
def test_long_adversarial_text_takes_linear_time(text: str) -> None:
    """Bounded work per character: 40 KB of the worst shapes in well under a second."""
    import time

    began = time.perf_counter()
    for finder in FINDERS.values():
        list(finder(text))
    assert time.perf_counter() - began < 2.0


def test_a_long_tables_header_counts_within_reach_of_its_rows() -> None:
    from extproc.redaction.detect import Detector

    rows = [f"Person {i},0301234{i:04d}" for i in range(600)]
    table = "name,phone\n" + "\n".join(rows) + "\n"
    detector = Detector(("phone",), ("DE",))
    whole = [table[f.start : f.end] for f in detector.find(table)]
    numbers = [f"0301234{i:04d}" for i in range(600)]
    first_row = len("name,phone\n")
    # The header line is found from a number at most 8 KB below the first row.
    assert whole == [n for n in numbers if table.index(n) < 8192 + first_row]
    assert whole == [table[f.start : f.end] for f in detector.find(table)]  # the same again
    # A long prompt searched a window at a time sees a header only in its own window.
    windowed = [table[f.start : f.end] for w in detector.find_all(table, 2048) for f in w]
    assert windowed == whole[: len(windowed)] and 0 < len(windowed) < len(whole)


@pytest.mark.parametrize(
    "before",
    ["te207f5e5 Refund card", "Order AB12: card", "ref xy99 then the card", "GB82 note: card"],
)
def test_a_four_letter_word_after_an_iban_like_head_is_not_an_iban(before: str) -> None:
    """Found by CI: "card" (four letters) within 40 characters of "te20" made the
    card below look like the rest of an IBAN, so it went out unredacted."""
    text = f"{before} 4111 1111 1111 1111 to mail"
    assert found(pii.find_credit_card, text) == ["4111 1111 1111 1111"]


def test_the_digits_of_an_iban_are_not_a_card_or_a_phone_even_with_a_bad_checksum() -> None:
    for iban in ("GB82 WEST 1234 5698 7654 32", "GB88 MIBG 5028 6203 0020 14"):
        text = f"pay to {iban} today"
        assert found(pii.find_credit_card, text) == [] and found(PHONE, text) == []
