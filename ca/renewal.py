"""When to renew a leaf, and how long to back off after a failure (pure: no I/O, no clock).

Every function takes ``now`` (and any randomness) as an argument, so the whole window is a plain
function of its inputs and is tested with plain values.

A leaf valid from ``not_before`` to ``not_after`` is renewed at a random point between 60 % and 90 %
of its life, as Consul does, so that a fleet of sidecars issued together does not renew together.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

RENEW_MIN_FRACTION = 0.6
RENEW_MAX_FRACTION = 0.9


def _check_draw(draw: float) -> float:
    if not 0.0 <= draw <= 1.0:
        raise ValueError(f"random draw must be in [0, 1], got {draw!r}")
    return draw


def renewal_fraction(draw: float) -> float:
    """Map a uniform draw in [0, 1] to a fraction of life in [0.6, 0.9]."""
    return RENEW_MIN_FRACTION + (RENEW_MAX_FRACTION - RENEW_MIN_FRACTION) * _check_draw(draw)


def renewal_time(not_before: datetime, not_after: datetime, draw: float) -> datetime:
    """The instant to renew a leaf valid from ``not_before`` to ``not_after``.

    ``draw`` is a uniform random number in [0, 1] chosen once per leaf (``random.random()``).
    """
    if not_after <= not_before:
        raise ValueError(f"certificate life is empty: not_after {not_after} <= not_before {not_before}")
    return not_before + (not_after - not_before) * renewal_fraction(draw)


def renewal_window(not_before: datetime, not_after: datetime) -> tuple[datetime, datetime]:
    """The earliest and latest renewal instants (60 % and 90 % of life)."""
    return renewal_time(not_before, not_after, 0.0), renewal_time(not_before, not_after, 1.0)


def seconds_until(now: datetime, when: datetime) -> float:
    """Seconds from ``now`` until ``when``; zero when ``when`` has passed."""
    return max(0.0, (when - now).total_seconds())


def renewal_delay(now: datetime, not_before: datetime, not_after: datetime, draw: float) -> float:
    """Seconds to wait at ``now`` before renewing; zero when the renewal point has passed."""
    return seconds_until(now, renewal_time(not_before, not_after, draw))


def is_valid_at(now: datetime, not_before: datetime, not_after: datetime) -> bool:
    return not_before <= now < not_after


def life_fraction(now: datetime, not_before: datetime, not_after: datetime) -> float:
    """How much of the certificate's life has passed at ``now`` (may be <0 or >1)."""
    total = (not_after - not_before).total_seconds()
    if total <= 0:
        return 1.0
    return (now - not_before).total_seconds() / total


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential backoff with full jitter.

    ``delay(attempt, draw)``: attempt 0 is the first retry; the ceiling is ``base * factor**attempt``
    capped at ``cap``; the delay is a draw in [ceiling/2, ceiling] so retries spread out but do not
    collapse to zero.
    """

    base: float = 0.5
    factor: float = 2.0
    cap: float = 30.0

    def __post_init__(self) -> None:
        if self.base <= 0 or self.cap < self.base or self.factor < 1:
            raise ValueError("backoff needs base > 0, cap >= base and factor >= 1")

    def ceiling(self, attempt: int) -> float:
        if attempt < 0:
            raise ValueError("attempt must be >= 0")
        # avoid float overflow for long outages
        exponent = min(attempt, 64)
        return float(min(self.cap, self.base * self.factor**exponent))

    def delay(self, attempt: int, draw: float) -> float:
        ceiling = self.ceiling(attempt)
        return ceiling / 2 + (ceiling / 2) * _check_draw(draw)


def retry_delay(backoff: Backoff, attempt: int, draw: float, now: datetime, not_after: datetime | None) -> float:
    """The next retry after a failed renewal: the backoff delay, but never past the leaf's expiry.

    While a current leaf is still valid we keep serving it and retry; once it is close to expiry we
    retry at least every ``backoff.base`` seconds.
    """
    delay = backoff.delay(attempt, draw)
    if not_after is not None:
        remaining = seconds_until(now, not_after)
        if remaining < delay:
            delay = max(min(backoff.base, delay), remaining / 2)
    return delay


def clamp_ttl(requested: timedelta | None, default: timedelta, minimum: timedelta, maximum: timedelta) -> timedelta:
    """The TTL to sign with: ``requested`` (or ``default``) within [minimum, maximum]; raises if outside."""
    ttl = default if requested is None else requested
    if ttl < minimum:
        raise ValueError(f"TTL {ttl} is shorter than the minimum {minimum}")
    if ttl > maximum:
        raise ValueError(f"TTL {ttl} is longer than the maximum {maximum}")
    return ttl
