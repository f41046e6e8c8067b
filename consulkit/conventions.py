"""Consul's conventions that both the mesh and the dev agent follow, written once (pure, no I/O).

- Go durations: `parse_duration_ns` is Go's `time.ParseDuration` ("10s", "1m30s", "-1.5h", "0"),
  `format_duration_ns` is Go's `time.Duration.String()`; `parse_duration_seconds` and
  `format_duration_seconds` are the same in (non-negative) seconds, the unit the mesh computes in.
- JSON key folding: `fold_key` is how Consul's decoders match keys (case-insensitive, snake_case
  equal to CamelCase, dashes ignored).
- Intention precedence: `intention_precedence` is Consul's computeIntentionPrecedence in the default
  namespace (keyword arguments, so that source and destination cannot be swapped unnoticed).
- Aggregate check status: `aggregate_status` is Consul's HealthChecks.AggregatedStatus.

Lives in a package of its own because the dev agent may import nothing of the mesh (see setup.cfg's
import-linter contracts), while catalog, policies, sidecar and weft all use these too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

# ---------------------------------------------------------------------------------------------------
# Go durations

NS = 1
US = 1_000
MS = 1_000_000
SECOND = 1_000_000_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR  # not Go's: only for parsers given `extra_units` (the CLI's `3650d`)
YEAR = 365 * DAY

GO_UNITS: Mapping[str, int] = {"ns": NS, "us": US, "µs": US, "μs": US, "ms": MS, "s": SECOND, "m": MINUTE,
                               "h": HOUR}
_MAX_NS = (1 << 63) - 1  # Go's Duration is an int64 of nanoseconds
_MAX_TEXT = 256  # longer than any duration anyone writes; bounds the work one bad value causes
_NUMBER = re.compile(r"\d*\.?\d*")
_UNIT = re.compile(r"[^\d.]+")


class DurationError(ValueError):
    """A duration that is not Go's syntax; the message is Go's (`time: invalid duration "x"`)."""


def parse_duration_ns(text: str, *, extra_units: Mapping[str, int] | None = None) -> int:
    """Go's ``time.ParseDuration``: "10s", "1m30s", "500ms", "-1.5h", "0" -> nanoseconds.

    A sign is allowed; every number needs a unit except a lone "0". `extra_units` adds units Go does
    not have (for example ``{"d": DAY}``). Raises `DurationError` with Go's message."""
    if not isinstance(text, str):
        raise DurationError(f"time: invalid duration {text!r}")
    orig = text
    if len(text) > _MAX_TEXT:
        raise DurationError(f'time: invalid duration "{orig[:32]}..." (longer than {_MAX_TEXT} characters)')
    units = GO_UNITS if extra_units is None else {**GO_UNITS, **extra_units}
    neg = text[:1] == "-"
    if text[:1] in ("-", "+"):
        text = text[1:]
    if text == "0":
        return 0
    if not text:
        raise DurationError(f'time: invalid duration "{orig}"')
    total = 0.0
    pos = 0
    while pos < len(text):
        number = _NUMBER.match(text, pos)
        assert number is not None  # the pattern matches the empty string
        digits = number.group()
        unit_match = _UNIT.match(text, number.end())
        if digits in ("", "."):
            raise DurationError(f'time: invalid duration "{orig}"')
        if unit_match is None:
            raise DurationError(f'time: missing unit in duration "{orig}"')
        unit = _unit_prefix(unit_match.group(), units)
        if unit is None:
            raise DurationError(f'time: invalid duration "{orig}"')
        total += float(digits) * units[unit]
        pos = unit_match.start() + len(unit)
    if total > _MAX_NS:
        raise DurationError(f'time: invalid duration "{orig}"')
    value = round(total)
    return -value if neg else value


def _unit_prefix(run: str, units: Mapping[str, int]) -> str | None:
    """The unit at the start of `run` (the longest that is one: "ms" before "m")."""
    for size in (2, 1):
        if run[:size] in units and len(run[:size]) == size:
            return run[:size]
    return None


def format_duration_ns(ns: int) -> str:
    """Go's ``time.Duration.String()``: "1m30s", "500ms", "1.5s", "0s", "1h0m0s", "7ns", "1µs"."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u < SECOND:
        if u < US:
            return f"{sign}{u}ns"
        if u < MS:
            return sign + _fraction(u, US) + "µs"
        return sign + _fraction(u, MS) + "ms"
    out = _fraction(u % MINUTE, SECOND) + "s"
    u //= MINUTE
    if u:
        out = f"{u % 60}m" + out
        u //= 60
        if u:
            out = f"{u}h" + out
    return sign + out


def _fraction(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def parse_duration_seconds(value: str | float | int, what: str = "duration") -> float:
    """Seconds in a Go duration ("15s", "1m30s", "250ms", "0"), or a number of seconds as is.

    Raises `ValueError` naming `what` on anything else (negative, empty, no unit, unknown unit)."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        if not value >= 0 or value == float("inf"):
            raise ValueError(f"{what}: must be a finite number of seconds, not negative, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a duration string like '15s', got {value!r}")
    text = value.strip()
    if not text:
        raise ValueError(f"{what}: empty duration")
    try:
        ns = parse_duration_ns(text)
    except DurationError:
        raise ValueError(f"{what}: invalid duration {value!r} (use e.g. '15s', '1m30s', '250ms')") from None
    if ns < 0 or text.startswith("-"):
        raise ValueError(f"{what}: must not be negative, got {value!r}")
    return ns / SECOND


def format_duration_seconds(seconds: float) -> str:
    """`seconds` as a Go duration for Consul to read: whole seconds as "15s" (and "60s", not Go's
    "1m0s", as the values people write in definitions), otherwise milliseconds ("1500ms"); a positive
    value below 1 ms is "1ms", so that a short wait or TTL never becomes "0s" (which Consul reads as none)."""
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"duration must be finite and not negative, got {seconds!r}")
    if float(seconds).is_integer():
        return f"{int(seconds)}s"
    return f"{max(round(seconds * 1000), 1)}ms"


# ---------------------------------------------------------------------------------------------------
# JSON keys


def fold_key(key: str) -> str:
    """How Consul matches JSON keys: case-insensitively, snake_case and kebab-case equal to CamelCase."""
    return key.replace("_", "").replace("-", "").lower()


# ---------------------------------------------------------------------------------------------------
# Intentions

WILDCARD = "*"
PRECEDENCE_EXACT_EXACT = 9  # web -> db
PRECEDENCE_ANY_EXACT = 8  # *   -> db
PRECEDENCE_EXACT_ANY = 6  # web -> *
PRECEDENCE_ANY_ANY = 5  # *   -> *


def intention_precedence(*, source: str, destination: str) -> int:
    """Consul's precedence of an intention ``source -> destination`` in the default namespace
    (agent/structs computeIntentionPrecedence): an exact destination beats a wildcard one, then an
    exact source beats a wildcard one."""
    if destination == WILDCARD:
        return PRECEDENCE_ANY_ANY if source == WILDCARD else PRECEDENCE_EXACT_ANY
    return PRECEDENCE_ANY_EXACT if source == WILDCARD else PRECEDENCE_EXACT_EXACT


# ---------------------------------------------------------------------------------------------------
# Health checks

PASSING = "passing"
WARNING = "warning"
CRITICAL = "critical"
MAINTENANCE = "maintenance"
CHECK_STATUSES = (PASSING, WARNING, CRITICAL, MAINTENANCE)
_STATUS_RANK = {PASSING: 0, WARNING: 1, CRITICAL: 2, MAINTENANCE: 3}


def aggregate_status(statuses: Iterable[str]) -> str:
    """Consul's HealthChecks.AggregatedStatus: the worst of the checks (maintenance > critical >
    warning > passing); no checks at all is passing; a status Consul does not know counts as critical."""
    worst = PASSING
    for status in statuses:
        if status not in _STATUS_RANK:
            status = CRITICAL
        if _STATUS_RANK[status] > _STATUS_RANK[worst]:
            worst = status
    return worst
