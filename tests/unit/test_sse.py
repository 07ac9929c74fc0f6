"""The SSE parser: the WHATWG rules, and the same events however the bytes are split."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.providers.sse import Event, SSEParser

FIXTURES = Path(__file__).parent.parent / "fixtures" / "usage"


def parse(*chunks: bytes, max_event_bytes: int = 1 << 20) -> list[Event]:
    parser = SSEParser(max_event_bytes)
    events = [e for chunk in chunks for e in parser.feed(chunk)]
    return events + parser.close()


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: a\n\n", [Event("message", "a")]),
        (b"data:a\r\n\r\n", [Event("message", "a")]),  # CRLF, no space after the colon
        (b"data: a\r\rdata: b\r\r", [Event("message", "a"), Event("message", "b")]),  # bare CR
        (b"data: one\ndata: two\n\n", [Event("message", "one\ntwo")]),  # multi-line data
        (b"data:  indented\n\n", [Event("message", " indented")]),  # only one space is eaten
        (b"event: ping\ndata: {}\n\n", [Event("ping", "{}")]),
        (b": keep-alive\n\ndata: x\n\n", [Event("message", "x")]),  # comments are skipped
        (b"event: lonely\n\ndata: x\n\n", [Event("message", "x")]),  # type resets, no data
        (b"data\n\n", [Event("message", "")]),  # a field with no colon has an empty value
        (b"id: 7\nretry: 10\ndata: x\n\n", [Event("message", "x")]),
        (b"\xef\xbb\xbfdata: bom\n\n", [Event("message", "bom")]),
        (b"data: [DONE]\n\n", [Event("message", "[DONE]")]),
        ("data: ça 🙂\n\n".encode(), [Event("message", "ça 🙂")]),
        (b"data: \xff\n\n", [Event("message", "\ufffd")]),  # invalid UTF-8 is replaced
        (b"data: last, no blank line", [Event("message", "last, no blank line")]),
        (b"data: a\n\n\n\n", [Event("message", "a")]),
    ],
)
def test_event_stream_rules(stream: bytes, expected: list[Event]) -> None:
    assert parse(stream) == expected


def test_an_oversized_event_is_dropped_and_the_stream_goes_on() -> None:
    parser = SSEParser(max_event_bytes=64)
    stream = b"data: " + b"x" * 100 + b"\n\ndata: small\n\n"
    events = [e for piece in split_at(stream, [10, 50, 90]) for e in parser.feed(piece)]
    assert events == [Event("message", "small")]
    assert parser.dropped_events == 1


def test_a_huge_line_split_over_chunks_is_not_misread_as_a_field() -> None:
    parser = SSEParser(max_event_bytes=16)
    chunks = [b"data: " + b"y" * 40, b"data: not-a-field" + b"z" * 10, b"\n\ndata: ok\n\n"]
    assert [e for c in chunks for e in parser.feed(c)] == [Event("message", "ok")]


def test_memory_stays_bounded_over_a_long_stream() -> None:
    parser = SSEParser(max_event_bytes=1024)
    for _ in range(10_000):
        parser.feed(b'data: {"choices":[{"delta":{"content":"word"}}]}\n\n')
    assert not parser._tail and not parser._data


EXAMPLES = sorted(FIXTURES.glob("*.sse"))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from([p.name for p in EXAMPLES]),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=40),
)
def test_any_split_gives_the_same_events(name: str, cuts: list[int]) -> None:
    stream = (FIXTURES / name).read_bytes()
    assert parse(*split_at(stream, cuts)) == parse(stream)


@settings(max_examples=200, deadline=None)
@given(
    events=st.lists(
        st.tuples(
            st.sampled_from(["", "message_delta", "ping"]),
            st.text(
                alphabet=st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)),
                max_size=30,
            ),
        ),
        max_size=8,
    ),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
)
def test_generated_streams_survive_any_split_and_any_line_ending(
    events: list[tuple[str, str]], newline: str, cuts: list[int]
) -> None:
    text = "".join(
        (f"event: {kind}{newline}" if kind else "") + f"data: {data}{newline}{newline}"
        for kind, data in events
    )
    stream = text.encode()
    expected = [Event(kind or "message", data) for kind, data in events]
    assert parse(*split_at(stream, cuts)) == expected


def test_every_single_byte_split_of_every_fixture() -> None:
    for path in EXAMPLES:
        stream = path.read_bytes()
        assert parse(*[stream[i : i + 1] for i in range(len(stream))]) == parse(stream), path
