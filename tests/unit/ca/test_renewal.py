from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from ca.renewal import (
    Backoff,
    clamp_ttl,
    is_valid_at,
    life_fraction,
    renewal_delay,
    renewal_time,
    renewal_window,
    retry_delay,
)

NB = datetime(2026, 1, 1, tzinfo=UTC)
NA = NB + timedelta(hours=72)


def test_window_is_60_to_90_percent() -> None:
    lo, hi = renewal_window(NB, NA)
    assert lo == NB + timedelta(hours=72 * 0.6)
    assert hi == NB + timedelta(hours=72 * 0.9)
    assert renewal_time(NB, NA, 0.5) == NB + timedelta(hours=72 * 0.75)


@pytest.mark.parametrize("draw", [0.0, 0.1, 0.33, 0.5, 0.99, 1.0])
def test_renewal_inside_window(draw: float) -> None:
    at = renewal_time(NB, NA, draw)
    lo, hi = renewal_window(NB, NA)
    assert lo <= at <= hi


def test_delay_is_function_of_now() -> None:
    at = renewal_time(NB, NA, 0.0)
    assert renewal_delay(NB, NB, NA, 0.0) == (at - NB).total_seconds()
    assert renewal_delay(at - timedelta(seconds=10), NB, NA, 0.0) == 10
    assert renewal_delay(at, NB, NA, 0.0) == 0
    assert renewal_delay(NA + timedelta(days=1), NB, NA, 0.0) == 0


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="draw"):
        renewal_time(NB, NA, 1.5)
    with pytest.raises(ValueError, match="empty"):
        renewal_time(NA, NB, 0.5)


def test_validity_and_fraction() -> None:
    assert is_valid_at(NB, NB, NA)
    assert not is_valid_at(NA, NB, NA)
    assert not is_valid_at(NB - timedelta(seconds=1), NB, NA)
    assert life_fraction(NB + timedelta(hours=36), NB, NA) == 0.5


def test_backoff_grows_and_caps() -> None:
    b = Backoff(base=1, factor=2, cap=10)
    assert [b.ceiling(i) for i in range(6)] == [1, 2, 4, 8, 10, 10]
    assert b.delay(2, 0.0) == 2 and b.delay(2, 1.0) == 4
    assert b.ceiling(10_000) == 10
    with pytest.raises(ValueError):
        Backoff(base=0)
    with pytest.raises(ValueError):
        b.ceiling(-1)


def test_retry_delay_never_sleeps_past_expiry() -> None:
    b = Backoff(base=1, factor=2, cap=60)
    now = NB
    # far from expiry: plain backoff
    assert retry_delay(b, 5, 1.0, now, NA) == 32
    # 10 s left: retry well before the leaf expires
    d = retry_delay(b, 5, 1.0, now, now + timedelta(seconds=10))
    assert 1 <= d <= 5
    assert retry_delay(b, 5, 1.0, now, None) == 32


def test_clamp_ttl() -> None:
    mn, mx, df = timedelta(minutes=1), timedelta(days=30), timedelta(hours=72)
    assert clamp_ttl(None, df, mn, mx) == df
    assert clamp_ttl(timedelta(minutes=5), df, mn, mx) == timedelta(minutes=5)
    with pytest.raises(ValueError, match="shorter"):
        clamp_ttl(timedelta(seconds=5), df, mn, mx)
    with pytest.raises(ValueError, match="longer"):
        clamp_ttl(timedelta(days=90), df, mn, mx)
