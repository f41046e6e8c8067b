"""Connection bookkeeping: unfinished handshakes bounded oldest-first, idle connections found by sweeps."""

from __future__ import annotations

import pytest

from sidecar.connlimits import IdleTracker, PendingHandshakes


def test_past_the_limit_the_oldest_pending_handshake_is_evicted() -> None:
    pending: PendingHandshakes[str] = PendingHandshakes(3)
    assert [pending.add(c) for c in ("a", "b", "c")] == [None, None, None]
    assert pending.add("d") == "a"
    pending.done("b")  # finished its handshake: no longer a candidate
    assert pending.add("e") is None
    assert pending.add("f") == "c"
    assert "a" not in pending and "d" in pending and len(pending) == 3
    assert pending.evicted == 2


def test_a_real_caller_survives_a_flood_of_half_open_connections() -> None:
    pending: PendingHandshakes[str] = PendingHandshakes(4)
    for i in range(10):
        pending.add(f"flood-{i}")
    pending.add("caller")
    for i in range(10, 13):  # the flood goes on while the caller's handshake takes a moment
        assert pending.add(f"flood-{i}") != "caller"
    assert "caller" in pending
    pending.done("caller")
    assert "caller" not in pending


def test_done_on_an_unknown_connection_is_harmless_and_the_limit_is_checked() -> None:
    pending: PendingHandshakes[int] = PendingHandshakes(1)
    pending.done(7)
    with pytest.raises(ValueError, match="at least 1"):
        PendingHandshakes(0)


def test_idle_connections_are_those_without_bytes_for_the_timeout() -> None:
    tracker: IdleTracker[str] = IdleTracker(10.0)
    assert tracker.sweep(0.0, [("quiet", 100, False), ("busy", 100, True), ("moving", 0, False)]) == []
    assert tracker.sweep(5.0, [("quiet", 100, False), ("busy", 100, True), ("moving", 10, False)]) == []
    assert tracker.sweep(10.0, [("quiet", 100, False), ("busy", 100, True), ("moving", 10, False)]) == ["quiet"]
    # "moving" last moved at 5.0; "busy" has an open stream
    assert tracker.sweep(14.9, [("busy", 100, True), ("moving", 10, False)]) == []
    assert tracker.sweep(15.0, [("busy", 100, True), ("moving", 10, False)]) == ["moving"]


def test_connections_that_went_away_are_forgotten() -> None:
    tracker: IdleTracker[str] = IdleTracker(1.0)
    tracker.sweep(0.0, [("a", 0, False), ("b", 0, False)])
    tracker.sweep(0.5, [("b", 0, False)])
    assert len(tracker) == 1
    # a connection seen again starts a new clock
    assert tracker.sweep(1.0, [("a", 0, False), ("b", 0, False)]) == ["b"]
    assert tracker.sweep(1.9, [("a", 0, False)]) == []
    assert tracker.sweep(2.0, [("a", 0, False)]) == ["a"]


def test_sweep_period_and_timeout_validation() -> None:
    assert IdleTracker(300.0).period == 5.0
    assert IdleTracker(1.0).period == 0.25
    assert IdleTracker(0.01).period == 0.05
    with pytest.raises(ValueError, match="positive"):
        IdleTracker(0.0)
