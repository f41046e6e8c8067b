"""Durations on the command line, one form for every Weft command: Go's (`90s`, `10m`, `72h`,
`1h30m`, `250ms`) plus days and years (`3650d`, `10y`), as `weft ca serve --leaf-ttl` and
`weft sidecar --leaf-ttl` take them. Pure; errors are `argparse.ArgumentTypeError` so that argparse
names the flag.
"""

from __future__ import annotations

import argparse
import re
from datetime import timedelta

_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|y)")
_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "y": 365 * 86400}
EXAMPLES = "72h, 10m, 90s, 1h30m, 3650d"


def parse_duration(text: str) -> timedelta:
    """`72h`, `5m`, `90s`, `1h30m`, `3650d`, `10y` -> timedelta."""
    s = text.strip()
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. {EXAMPLES}")
    return timedelta(seconds=total)


def parse_duration_or_seconds(text: str) -> timedelta:
    """A duration, or (the older form some flags took) a plain number of seconds: `259200` = `72h`."""
    try:
        seconds = float(text.strip())
    except ValueError:
        return parse_duration(text)
    if seconds < 0 or seconds != seconds or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r}: use e.g. {EXAMPLES}")
    return timedelta(seconds=seconds)
