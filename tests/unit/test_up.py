"""`tollway up`'s restart policy and demo key, without processes."""

from __future__ import annotations

from pathlib import Path

from extproc import keys, up


def test_restart_delays_double_to_30s_and_reset_after_a_minute_of_running() -> None:
    backoff = up.Backoff()
    delays = [backoff.delay(ran_for=1.0) for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert backoff.delay(ran_for=60.0) == 0.5
    assert backoff.delay(ran_for=59.9) == 1


def test_each_demo_adds_a_fresh_demo_key_and_revokes_the_previous_by_id(tmp_path: Path) -> None:
    file = tmp_path / "tollway-keys.yaml"
    _, other = keys.generate(name="other")
    keys.add(file, other)
    first = up._demo_key(file)
    second = up._demo_key(file)
    ring = keys.KeyRing(keys.read_records(file))
    first_record, second_record = ring.find(first), ring.find(second)
    assert first_record is not None and first_record.revoked is not None
    assert second_record is not None and second_record.revoked is None
    assert second_record.name == "demo"
    assert [r.revoked for r in keys.read_records(file) if r.id == other.id] == [None]
