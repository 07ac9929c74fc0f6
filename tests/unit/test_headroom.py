"""The header map as Envoy will check it after Tollway's edits (no I/O)."""

from __future__ import annotations

import pytest

from extproc.decisions import Outcome
from extproc.exchange import Exchange
from extproc.headroom import (
    BODY_PHASE_SLACK_BYTES,
    TOO_LARGE,
    HeaderLimits,
    after_edits,
    over_limits,
    response_headers_fit,
)
from extproc.pipeline import Pipeline

from .factories import PROVIDER_KEYS, bearer, build_pipeline, new_key, request

ALICE, ALICE_RECORD = new_key("alice", tenant="acme")


def exchange(
    headers: dict[str, str],
    repeated: frozenset[str] = frozenset(),
    set_headers: dict[str, str] | None = None,
    remove: set[str] | None = None,
) -> Exchange:
    ex = Exchange("GET", "/v1/models", "", headers, repeated, None, 0.0)
    ex.set_headers.update(set_headers or {})
    ex.remove_headers.update(remove or set())
    return ex


@pytest.mark.parametrize(
    ("ex", "expected"),
    [
        (exchange({"a": "1"}), (1, 2)),
        (exchange({"a": "1"}, set_headers={"b": "22"}), (2, 5)),
        (exchange({"a": "1"}, set_headers={"a": "333"}), (1, 4)),  # overwritten, not added
        (exchange({"a": "1", "b": "2"}, remove={"b"}), (1, 2)),
        (exchange({"a": "1"}, remove={"a"}, set_headers={"a": "4444"}), (1, 5)),
        # Repeats arrive joined: "a: 1" and "a: 22" are two entries of 1 + 1 and 1 + 2 bytes.
        (exchange({"a": "1,22"}, frozenset({"a"})), (2, 5)),
        (exchange({"a": "1,22", "b": "2"}, frozenset({"a"}), remove={"a"}), (1, 2)),
        # A value's own comma is only counted as a line of its own when the name repeats.
        (exchange({"accept": "x, y"}), (1, 10)),
    ],
)
def test_entries_and_bytes_after_edits(ex: Exchange, expected: tuple[int, int]) -> None:
    assert after_edits(ex) == expected


def test_limits_are_inclusive() -> None:
    limits = HeaderLimits(count=2, kb=1)
    assert over_limits(exchange({"a": "1", "b": "2"}), limits) is None
    assert over_limits(exchange({"a": "1", "b": "2", "c": "3"}), limits) is TOO_LARGE
    fits = 1024 - BODY_PHASE_SLACK_BYTES - 1
    assert over_limits(exchange({"a": "v" * fits}), limits) is None
    assert over_limits(exchange({"a": "v" * (fits + 1)}), limits) is TOO_LARGE


def _pipeline(limits: HeaderLimits) -> Pipeline:
    pipeline = build_pipeline([ALICE_RECORD], PROVIDER_KEYS)
    pipeline.header_limits = limits
    return pipeline


def test_the_headers_tollway_adds_can_tip_a_request_over_and_it_answers_431() -> None:
    headers = {":method": "GET", ":path": "/v1/models", **bearer(ALICE)}
    fits = _pipeline(HeaderLimits(count=len(headers) + 2))  # + x-tollway-key-id, -tenant
    run = request(fits, "/v1/models", headers, method="GET")
    assert run.request_headers() is not TOO_LARGE and run.ex.outcome is Outcome.FORWARDED

    tight = _pipeline(HeaderLimits(count=len(headers) + 1))
    run = request(tight, "/v1/models", headers, method="GET")
    decision = run.request_headers()
    assert decision is TOO_LARGE and decision.status == 431
    assert run.ex.outcome is Outcome.DENIED


def test_a_denial_before_any_edit_is_not_turned_into_a_431() -> None:
    pipeline = _pipeline(HeaderLimits(count=1))
    decision = request(pipeline, "/v1/models", {}, method="GET").request_headers()
    assert decision is not TOO_LARGE and getattr(decision, "code", "") == "missing_api_key"


def test_response_headers_tollway_adds_must_fit_envoys_count() -> None:
    ex = exchange({})
    ex.response_headers = {f"x-{i}": "v" for i in range(99)}
    ex.set_response_headers["x-tollway-cost-usd"] = "0.000000100"
    assert response_headers_fit(ex)  # 99 + 1
    ex.response_headers["date"] = "Tue, 01 Dec 2026 18:00:00 GMT"  # a comma: counted as 2
    assert not response_headers_fit(ex)
    ex.remove_response_headers.add("date")
    assert response_headers_fit(ex)
