"""Durations on the command line, one form for every Weft command: Go's (`90s`, `10m`, `72h`,
`1h30m`, `250ms`) plus days and years (`3650d`, `10y`), as `weft ca serve --leaf-ttl` and
`weft sidecar --leaf-ttl` take them. Pure; errors are `argparse.ArgumentTypeError` so that argparse
names the flag. The parsing itself is Go's, shared with the rest of Weft (`consulkit.conventions`).
"""

from __future__ import annotations

import argparse
from datetime import timedelta

from consulkit.conventions import DAY, YEAR, DurationError, parse_duration_ns

EXAMPLES = "72h, 10m, 90s, 1h30m, 3650d"
_CLI_UNITS = {"d": DAY, "y": YEAR}


def parse_duration(text: str) -> timedelta:
    """`72h`, `5m`, `90s`, `1h30m`, `3650d`, `10y` -> timedelta (not negative)."""
    s = text.strip()
    try:
        ns = parse_duration_ns(s, extra_units=_CLI_UNITS)
    except DurationError:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. {EXAMPLES}") from None
    if ns < 0 or s.startswith("-"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: must not be negative")
    return timedelta(microseconds=ns // 1000)


def parse_duration_or_seconds(text: str) -> timedelta:
    """A duration, or (the older form some flags took) a plain number of seconds: `259200` = `72h`."""
    try:
        seconds = float(text.strip())
    except ValueError:
        return parse_duration(text)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. {EXAMPLES}")
    return timedelta(seconds=seconds)
