"""Go durations and Consul-style body decoding."""

from __future__ import annotations

import pytest

from devagent.codec import (
    MINUTE,
    MS,
    SECOND,
    DecodeError,
    decode_struct,
    format_duration,
    lookup,
    parse_duration,
    uuid_to_uint64,
)


@pytest.mark.parametrize(("text", "ns"), [
    ("10s", 10 * SECOND), ("1m30s", 90 * SECOND), ("500ms", 500 * MS), ("0", 0), ("1.5h", 90 * MINUTE),
    ("-2s", -2 * SECOND), ("1us", 1000), ("1µs", 1000), ("3ns", 3), ("1h0m0s", 60 * MINUTE),
])
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration(text) == ns


@pytest.mark.parametrize("text", ["", "10", "s", "1x", "1.5", "abc", "1s2"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(DecodeError):
        parse_duration(text)


@pytest.mark.parametrize(("ns", "text"), [
    (0, "0s"), (10 * SECOND, "10s"), (90 * SECOND, "1m30s"), (500 * MS, "500ms"), (60 * MINUTE, "1h0m0s"),
    (1500 * MS, "1.5s"), (1000, "1µs"), (7, "7ns"), (24 * 60 * MINUTE, "24h0m0s"),
])
def test_format_duration(ns: int, text: str) -> None:
    assert format_duration(ns) == text


def test_decode_struct_matches_snake_and_camel_case() -> None:
    spec = {"Name": None, "Meta": None, "Proxy": {"Upstreams": [{"DestinationName": None, "LocalBindPort": None}]}}
    raw = {"name": "web", "meta": {"some_key": "v"},
           "proxy": {"upstreams": [{"destination_name": "api", "LocalBindPort": 9191}]}}
    out = decode_struct(raw, spec)
    assert out == {"Name": "web", "Meta": {"some_key": "v"},
                   "Proxy": {"Upstreams": [{"DestinationName": "api", "LocalBindPort": 9191}]}}
    assert lookup({"local_bind_port": 1}, "LocalBindPort") == 1
    with pytest.raises(DecodeError):
        decode_struct([1], spec)
    with pytest.raises(DecodeError):
        decode_struct({"proxy": {"upstreams": 3}}, spec)
    with pytest.raises(DecodeError):
        decode_struct({"nope": 1}, spec, strict=True)


def test_uuid_to_uint64() -> None:
    assert uuid_to_uint64("00000000-0000-0001-0000-000000000001") == 0
    assert uuid_to_uint64("00000000-0000-0000-0000-000000000005") == 5
