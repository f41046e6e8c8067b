"""Consul's conventions, shared by the mesh and the dev agent: durations, key folding, precedence, status."""

from __future__ import annotations

import pytest

from consulkit.conventions import (
    DAY,
    MINUTE,
    MS,
    SECOND,
    DurationError,
    aggregate_status,
    fold_key,
    format_duration_ns,
    format_duration_seconds,
    intention_precedence,
    parse_duration_ns,
    parse_duration_seconds,
)


@pytest.mark.parametrize(("text", "ns"), [
    ("10s", 10 * SECOND), ("1m30s", 90 * SECOND), ("500ms", 500 * MS), ("0", 0), ("-0", 0), ("+0", 0),
    ("1.5h", 90 * MINUTE), ("-2s", -2 * SECOND), ("+2s", 2 * SECOND), ("1us", 1000), ("1µs", 1000),
    ("1μs", 1000), ("3ns", 3), ("1h0m0s", 60 * MINUTE), (".5s", 500 * MS), ("1.s", SECOND),
    ("2562047h", 2562047 * 60 * MINUTE),
])
def test_parse_duration_ns_is_gos(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize(("text", "message"), [
    ("", 'time: invalid duration ""'), ("10", 'time: missing unit in duration "10"'),
    ("s", 'time: invalid duration "s"'), ("1x", 'time: invalid duration "1x"'),
    ("1.5", 'time: missing unit in duration "1.5"'), ("1s2", 'time: missing unit in duration "1s2"'),
    (".s", 'time: invalid duration ".s"'), ("1d", 'time: invalid duration "1d"'),
    ("10 s", 'time: invalid duration "10 s"'), ("-", 'time: invalid duration "-"'),
    ("3000000h", 'time: invalid duration "3000000h"'),  # beyond Go's int64 of nanoseconds
])
def test_parse_duration_ns_rejects_with_gos_message(text: str, message: str) -> None:
    with pytest.raises(DurationError) as exc:
        parse_duration_ns(text)
    assert str(exc.value) == message


def test_parse_duration_ns_bounds_its_input() -> None:
    with pytest.raises(DurationError, match="longer than 256"):
        parse_duration_ns("1s" * 1000)
    with pytest.raises(DurationError):
        parse_duration_ns(5)  # type: ignore[arg-type]


def test_extra_units_are_added_only_when_asked() -> None:
    assert parse_duration_ns("2d12h", extra_units={"d": DAY}) == 60 * 60 * MINUTE
    assert parse_duration_ns("1ms", extra_units={"d": DAY}) == MS  # "ms" still wins over "m"


@pytest.mark.parametrize(("ns", "text"), [
    (0, "0s"), (10 * SECOND, "10s"), (90 * SECOND, "1m30s"), (500 * MS, "500ms"), (60 * MINUTE, "1h0m0s"),
    (1500 * MS, "1.5s"), (1000, "1µs"), (1500, "1.5µs"), (7, "7ns"), (-90 * SECOND, "-1m30s"),
    (24 * 60 * MINUTE, "24h0m0s"),
])
def test_format_duration_ns_is_gos(ns: int, text: str) -> None:
    assert format_duration_ns(ns) == text
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize(("value", "seconds"), [
    ("15s", 15.0), ("1m30s", 90.0), ("250ms", 0.25), ("0", 0.0), (" 1h ", 3600.0), ("1.5s", 1.5), (7, 7.0),
    (0.5, 0.5),
])
def test_parse_duration_seconds(value: str | float, seconds: float) -> None:
    assert parse_duration_seconds(value) == seconds


@pytest.mark.parametrize("bad", ["", "15", "s", "-1s", "-0s", "1d", True, -3, float("nan"), float("inf"), None])
def test_parse_duration_seconds_rejects_naming_the_field(bad: object) -> None:
    with pytest.raises(ValueError, match=r"^ttl: "):
        parse_duration_seconds(bad, "ttl")  # type: ignore[arg-type]


def test_format_duration_seconds() -> None:
    assert format_duration_seconds(15) == "15s"
    assert format_duration_seconds(90) == "90s"
    assert format_duration_seconds(1.5) == "1500ms"
    assert format_duration_seconds(0) == "0s"
    assert format_duration_seconds(0.0004) == "1ms"  # never rounded down to "no duration"
    assert parse_duration_seconds(format_duration_seconds(2.25)) == 2.25
    for bad in (-1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            format_duration_seconds(bad)


@pytest.mark.parametrize(("key", "folded"), [
    ("DestinationName", "destinationname"), ("destination_name", "destinationname"),
    ("destination-name", "destinationname"), ("TLS_Skip-Verify", "tlsskipverify"), ("", ""),
])
def test_fold_key(key: str, folded: str) -> None:
    assert fold_key(key) == folded


def test_intention_precedence() -> None:
    assert intention_precedence(source="web", destination="db") == 9
    assert intention_precedence(source="*", destination="db") == 8
    assert intention_precedence(source="web", destination="*") == 6
    assert intention_precedence(source="*", destination="*") == 5


@pytest.mark.parametrize(("statuses", "status"), [
    ([], "passing"), (["passing"], "passing"), (["passing", "warning"], "warning"),
    (["warning", "critical", "passing"], "critical"), (["critical", "maintenance"], "maintenance"),
    (["passing", "bogus"], "critical"), (iter(["warning"]), "warning"),
])
def test_aggregate_status(statuses: list[str], status: str) -> None:
    assert aggregate_status(statuses) == status
